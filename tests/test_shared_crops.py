"""Exact mode shares crops and skips what cannot matter without changing a result; fast mode's
CLIP selection.

`predict` sends all tasks' proposals through CLIP at once and encodes each distinct binary mask
once; `freeseg.bench_infer.straightforward_predict` is the path without sharing (task by task, every
crop encoded). Their outputs must agree for every task under both protocols.
"""

import pytest
import torch

from freeseg.bench_infer import straightforward_predict
from freeseg.clip import default_tokenizer
from freeseg.config import ExtensionsConfig, FastConfig, InferenceConfig
from freeseg.extensions import inference_hooks
from freeseg.fast_inference import fast_hooks
from freeseg.modeling import inference
from freeseg.modeling.freeseg import build_freeseg
from freeseg.modeling.region_classifier import shared_masks
from freeseg.presets import get_preset
from test_freeseg_model import IS_THING, NAMES, synthetic_batch, tiny_clip

UNSEEN = torch.tensor([False, True, False, True])
# The toy preset's inference extensions: unclaimed regions, largest parts, flips, task-ensembled
# text (freeseg/extensions.py), with its crop boxes and a small CLIP batch.
TOY_EXTENSIONS = ExtensionsConfig(clip_largest_part=True, clip_erode=1, clip_flip=True, clip_task_ensemble=True,
                                  unclaimed_min_area=0.02)
TOY_OPTIONS = dict(mask_expand_ratio=1.5, clip_chunk=3)


def model_with(interaction: bool, seed: int = 0):
    """A tiny model; without the interaction the three tasks' masks are identical (the decoder
    sees the text only through it), so every crop is shared three ways."""
    cfg = get_preset("toy")
    cfg.model.decoder.num_queries = 8
    cfg.model.decoder.num_layers = 3
    cfg.model.interaction.enabled = interaction
    clip = tiny_clip()
    torch.manual_seed(seed)
    return build_freeseg(cfg, clip, default_tokenizer()).eval()


def count_crops(model, fn, *args, **kwargs):
    """(fn's result, number of images through CLIP's image tower)."""
    seen = []
    handle = model.clip_model.visual.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        return fn(*args, **kwargs), sum(seen)
    finally:
        handle.remove()


def assert_same_results(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["semantic"], b["semantic"], rtol=1e-5, atol=1e-6)
    assert torch.equal(a["instance"]["masks"], b["instance"]["masks"])
    assert torch.equal(a["instance"]["labels"], b["instance"]["labels"])
    torch.testing.assert_close(a["instance"]["scores"], b["instance"]["scores"], rtol=1e-5, atol=1e-6)
    assert torch.equal(a["panoptic"][0], b["panoptic"][0])
    assert [(s["id"], s["category_id"]) for s in a["panoptic"][1]] == \
        [(s["id"], s["category_id"]) for s in b["panoptic"][1]]


@pytest.mark.parametrize("protocol", ["mask2former", "official"])
@pytest.mark.parametrize("options", [{}, TOY_OPTIONS], ids=["paper", "toy-options"])
@pytest.mark.parametrize("interaction", [True, False], ids=["interaction", "no-interaction"])
def test_exact_mode_equals_every_crop_encoded(protocol, options, interaction):
    model = model_with(interaction)
    image = synthetic_batch()[0][1]
    cfg = InferenceConfig(protocol=protocol, **options)
    hooks = inference_hooks(TOY_EXTENSIONS if options else ExtensionsConfig())
    exact, exact_crops = count_crops(model, inference.predict, model, image, NAMES, UNSEEN, IS_THING, cfg=cfg,
                                     hooks=hooks)
    plain, plain_crops = count_crops(model, straightforward_predict, model, image, NAMES, UNSEEN, IS_THING, cfg,
                                     hooks=hooks)
    assert_same_results(exact, plain)
    assert plain_crops > 0
    if not interaction:  # the tasks' masks coincide: one crop serves three
        assert exact_crops * 3 == plain_crops
    else:
        assert exact_crops <= plain_crops


def test_shared_masks():
    torch.manual_seed(0)
    masks = torch.rand(4, 9, 11) > 0.5
    binary = torch.stack([masks[0], masks[1], masks[0], masks[2], masks[1], masks[3]])
    first, inverse = shared_masks(binary)
    assert first.tolist() == [0, 1, 3, 5] and inverse.tolist() == [0, 1, 0, 2, 1, 3]
    assert torch.equal(binary[first][inverse], binary)
    first, inverse = shared_masks(binary, None)
    assert first.tolist() == list(range(6)) and inverse.tolist() == list(range(6))
    # IoU sharing: a mask that differs from the first in one pixel of 60 joins it.
    near = torch.zeros(3, 10, 12, dtype=torch.bool)
    near[0, :6] = True  # 72 pixels (36 on every second row and column)
    near[1, :6] = True
    near[1, 0, 0] = False
    near[2, 6:] = True
    first, inverse = shared_masks(near, 0.9)
    assert first.tolist() == [0, 2] and inverse.tolist() == [0, 0, 1]


def panoptic_objectness(model, image, cfg):
    """The object probabilities 1 - p(no object) (Q,) of the panoptic task's queries."""
    with torch.no_grad():
        features = model.extract(image[None].float())
        decoded = inference.decode_task(model, image.float(), features, "panoptic", NAMES, UNSEEN, cfg, None)
    return 1 - decoded["probs"][:, -1]


@pytest.mark.parametrize("keep_by", ["class", "object"])
def test_exact_mode_skips_panoptic_queries_that_cannot_be_kept(keep_by):
    """Under "mask2former" a panoptic query whose object probability does not exceed
    object_mask_threshold fails the keep test whatever CLIP says, so exact mode does not encode
    its crop, and the results are still those of every crop encoded."""
    model = model_with(True)
    model.logit_scale = 3.0  # softer class logits: object probabilities spread around 0.68, not all ~0
    image = synthetic_batch()[0][1]
    objectness = panoptic_objectness(model, image, InferenceConfig())
    threshold = float(objectness.median())  # half of the queries cannot be kept
    cfg = InferenceConfig(object_mask_threshold=threshold, panoptic_keep_by=keep_by)
    exact, exact_crops = count_crops(model, inference.predict, model, image, NAMES, UNSEEN, IS_THING, cfg=cfg)
    plain, plain_crops = count_crops(model, straightforward_predict, model, image, NAMES, UNSEEN, IS_THING, cfg)
    assert_same_results(exact, plain)
    if keep_by == "object":  # (under "class" this random model's "no object" wins every query)
        assert len(exact["panoptic"][1]) > 0  # some queries were kept, named with CLIP's help
    skipped = int((objectness <= threshold).sum())
    assert skipped >= 4 and exact_crops <= plain_crops - skipped
    # The official rules re-sharpen the ensemble before their keep test: nothing is skipped.
    official = InferenceConfig(protocol="official", object_mask_threshold=threshold)
    _, official_crops = count_crops(model, inference.predict, model, image, NAMES, UNSEEN, IS_THING, cfg=official)
    assert official_crops == plain_crops


@pytest.mark.parametrize("protocol", ["mask2former", "official"])
def test_fast_mode(protocol):
    model = model_with(True)
    image = synthetic_batch()[0][1]
    exact_cfg = InferenceConfig(protocol=protocol)
    exact = inference.predict(model, image, NAMES, UNSEEN, IS_THING, cfg=exact_cfg)
    # With nothing left out and only identical masks shared, fast mode is exact mode.
    everything = fast_hooks(FastConfig(enabled=True, min_object=0.0, semantic_queries=8, share_iou=1.0),
                            inference.PAPER)
    assert_same_results(inference.predict(model, image, NAMES, UNSEEN, IS_THING, cfg=exact_cfg, hooks=everything),
                        exact)
    # A query CLIP does not see is named by the mask classifier alone.
    fast = fast_hooks(FastConfig(enabled=True, min_object=0.0, semantic_queries=3), inference.PAPER)
    with torch.no_grad():
        features = model.extract(image[None].float())
        decoded = {"semantic": inference.decode_task(model, image.float(), features, "semantic", NAMES, UNSEEN,
                                                     exact_cfg, None)}
        (_, p_clip), = inference.region_probabilities(model, image.float(), decoded, exact_cfg, fast).values()
    probs = decoded["semantic"]["probs"]
    top = (1 - probs[:, -1]).topk(3).indices
    others = torch.ones(len(probs), dtype=torch.bool)
    others[top] = False
    torch.testing.assert_close(p_clip[others], probs[others, :-1] / probs[others, :-1].sum(-1, keepdim=True))
    fast_out, fast_crops = count_crops(model, inference.predict, model, image, NAMES, UNSEEN, IS_THING,
                                       cfg=exact_cfg, hooks=fast)
    _, exact_crops = count_crops(model, inference.predict, model, image, NAMES, UNSEEN, IS_THING, cfg=exact_cfg)
    assert fast_crops < exact_crops
    assert set(fast_out) == set(exact)


def test_fast_mode_comes_from_its_config_section():
    """`--fast` sets fast.enabled; the toy world's hooks are kept; old checkpoints' inference.fast*
    keys read into the section."""
    from freeseg.config import apply_overrides, from_dict, to_dict
    from freeseg.extensions import predict_hooks

    cfg = get_preset("toy")
    assert predict_hooks(cfg).select_proposals is None and predict_hooks(cfg).share_iou == 1.0
    apply_overrides(cfg, ["fast.enabled=true", "fast.share_iou=0.8"])
    hooks = predict_hooks(cfg)
    assert hooks.select_proposals is not None and hooks.share_iou == 0.8
    assert hooks.encode_crops is inference_hooks(cfg.extensions).encode_crops  # the toy world's mirror crops
    model, image = model_with(True), synthetic_batch()[0][1]
    crops = torch.randn(4, 3, model.clip_model.input_resolution, model.clip_model.input_resolution)
    cfg.fast.clip_bfloat16 = True
    in_bfloat16 = predict_hooks(cfg).encode_crops(model.clip_model, crops)
    in_float32 = inference_hooks(cfg.extensions).encode_crops(model.clip_model, crops)
    assert in_bfloat16.dtype == torch.float32 and not torch.equal(in_bfloat16, in_float32)
    torch.testing.assert_close(in_bfloat16, in_float32, rtol=0, atol=0.05)
    assert set(inference.predict(model, image, NAMES, UNSEEN, IS_THING, hooks=predict_hooks(cfg))) == \
        {"semantic", "instance", "panoptic"}
    old = to_dict(get_preset("toy"))
    old["inference"].update(fast=True, fast_min_object=0.3, fast_semantic_queries=7, fast_share_iou=0.7)
    del old["fast"]  # a checkpoint written before the section existed
    assert from_dict(old).fast == FastConfig(enabled=True, min_object=0.3, semantic_queries=7, share_iou=0.7)


def test_stage_timer_measures_predict_from_outside():
    """The benchmark's timer: every stage of one predict call, CLIP's images counted, and the
    model and inference.py as they were once it is detached."""
    from freeseg.bench_infer import StageTimer
    from freeseg.modeling import region_classifier

    model = model_with(True)
    image = synthetic_batch()[0][1]
    originals = (inference.decode_task, inference.finish_task, region_classifier.crop_masked_regions)
    timer = StageTimer(model, "cpu")
    cache = {}
    with timer.attached():
        inference.predict(model, image, NAMES, UNSEEN, IS_THING, cfg=InferenceConfig(), text_cache=cache)
    tasks = ("semantic", "instance", "panoptic")
    assert set(timer.times) == {"backbone", "pixel decoder", "text", "crops", "region CLIP",
                                *(f"interaction + decoder/{t}" for t in tasks), *(f"post-processing/{t}" for t in tasks)}
    assert all(seconds >= 0 for seconds in timer.times.values())
    _, crops = count_crops(model, inference.predict, model, image, NAMES, UNSEEN, IS_THING, cfg=InferenceConfig())
    assert timer.crops_encoded == crops > 0
    assert (inference.decode_task, inference.finish_task, region_classifier.crop_masked_regions) == originals
    assert not model.backbone._forward_hooks and not model.clip_model.visual._forward_pre_hooks
    cached = StageTimer(model, "cpu")  # the text cache is full: the prompt learner does not run
    with cached.attached():
        inference.predict(model, image, NAMES, UNSEEN, IS_THING, cfg=InferenceConfig(), text_cache=cache)
    assert "text" not in cached.times
