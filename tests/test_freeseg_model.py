"""The full FreeSeg model at toy size: output contract, frozen parts, gradients, and that it
learns a fixed synthetic batch for each of the three tasks."""

import pytest
import torch
import torch.nn.functional as F

from freeseg.clip import CLIP, default_tokenizer
from freeseg.presets import get_preset
from freeseg.modeling.criterion import build_criterion
from freeseg.modeling.freeseg import FreeSeg, build_freeseg
from freeseg.modeling.targets import TASKS, task_targets

NAMES = ["red circle", "blue star", "sky", "grass"]
IS_THING = torch.tensor([True, True, False, False])


def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
                context_length=32, vocab_size=49408, transformer_width=32, transformer_heads=2,
                transformer_layers=1).eval()


def tiny_model(seed: int = 0) -> FreeSeg:
    cfg = get_preset("toy")
    cfg.model.decoder.num_queries = 8
    cfg.model.decoder.num_layers = 3
    clip = tiny_clip()
    torch.manual_seed(seed)
    return build_freeseg(cfg, clip, default_tokenizer())


def synthetic_batch() -> tuple[torch.Tensor, list[dict]]:
    """Two 64x64 images: sky above grass, a red square and a blue square (things)."""
    images, samples = [], []
    for b in range(2):
        img = torch.zeros(3, 64, 64)
        sem = torch.full((64, 64), 2, dtype=torch.long)
        sem[32 + 4 * b:] = 3
        img[2], img[1] = (sem == 2) * 220.0, (sem == 3) * 180.0
        boxes = [(8, 8 + 6 * b, 24, 26), (36 - 4 * b, 30, 56, 50)]
        masks = [sem == 2, sem == 3]
        for label, (y1, x1, y2, x2) in enumerate(boxes):
            sem[y1:y2, x1:x2] = label
            img[:, y1:y2, x1:x2] = torch.tensor([230.0, 20, 20] if label == 0 else [20.0, 20, 230]).view(3, 1, 1)
        masks = [sem == 2, sem == 3, sem == 0, sem == 1]
        samples.append({"sem_seg": sem, "masks": torch.stack(masks), "labels": torch.tensor([2, 3, 0, 1]),
                        "isthing": torch.tensor([False, False, True, True])})
        images.append(img)
    return torch.stack(images), samples


def test_output_contract_and_frozen_parts():
    model = tiny_model().eval()
    images, _ = synthetic_batch()
    with torch.no_grad():
        out = model(images, NAMES, "panoptic")
    assert out["pred_logits"].shape == (2, 8, 5)
    assert out["pred_masks"].shape == (2, 8, 32, 32)  # stride 2: the toy preset's extensions.fine_dim
    assert len(out["aux_outputs"]) == 3
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 8, 5) and aux["pred_masks"].shape == (2, 8, 32, 32)
    # Logits are 100 x cosine similarities with [text; no object].
    assert out["pred_logits"].abs().max() <= 100 + 1e-3
    text = model.text_features(NAMES, "panoptic")
    expected = 100 * F.normalize(out["pred_embeds"], dim=-1) @ model.classifier_weights(text).t()
    torch.testing.assert_close(out["pred_logits"], expected)
    # Task-independent extraction, per-task decoding.
    feats = model.extract(images)
    with torch.no_grad():
        sem = model.decode(feats, model.text_features(NAMES, "semantic"))
    assert (sem["pred_logits"] - out["pred_logits"]).abs().max() > 1e-5
    assert not any(p.requires_grad for p in model.clip_model.parameters())
    assert not any(p.requires_grad for p in model.prompt_learner.parameters())
    model.train()
    assert not model.clip_model.training and model.decoder.training
    # CLIP is registered once; the prompt learner only refers to it.
    assert not any(k.startswith("prompt_learner.clip_model") for k in model.state_dict())
    assert "non_object_embedding" in dict(model.named_parameters())


def test_every_trainable_parameter_gets_gradient():
    model = tiny_model().train()
    images, samples = synthetic_batch()
    criterion = build_criterion(get_preset("toy").loss)
    targets = [task_targets(s, "panoptic") for s in samples]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # Two steps: Deformable DETR zero-initialises the sampling-offset and attention-weight
    # projections, so the encoder's level embedding gets a zero gradient at step one.
    for _ in range(2):
        opt.zero_grad()
        losses = criterion(model(images, NAMES, "panoptic"), targets)
        sum(criterion.weight_dict[k] * v for k, v in losses.items()).backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


@pytest.mark.parametrize("task", TASKS)
def test_learns_fixed_batch(task):
    torch.set_num_threads(1)
    model = tiny_model(seed=1).train()
    images, samples = synthetic_batch()
    targets = [task_targets(s, task) for s in samples]
    criterion = build_criterion(get_preset("toy").loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    prompts_before = model.prompt_learner.prefix_prompt.clone()
    history = []
    for _ in range(50):
        losses = criterion(model(images, NAMES, task), targets)
        loss = sum(criterion.weight_dict[k] * v for k, v in losses.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.6 * first, (task, first, last)
    torch.testing.assert_close(model.prompt_learner.prefix_prompt, prompts_before)


def test_predict_all_tasks():
    from freeseg.config import InferenceConfig
    from freeseg.modeling.inference import predict
    from freeseg.modeling.matcher import upsample_masks

    model = tiny_model().eval()
    images, _ = synthetic_batch()
    image = images[0, :, :50, :60].to(torch.uint8)  # not a multiple of 32: padded inside
    unseen = torch.tensor([False, True, False, True])
    cache = {}
    out = predict(model, image, NAMES, unseen, IS_THING, cfg=InferenceConfig(), text_cache=cache)
    assert out["semantic"].shape == (4, 50, 60)
    assert out["instance"]["masks"].shape[1:] == (50, 60)
    assert out["panoptic"][0].shape == (50, 60) and out["panoptic"][0].dtype == torch.int32
    assert set(cache) == {(tuple(NAMES), t) for t in TASKS}
    # Without CLIP the semantic map is sum_q softmax(logits)[:K] * sigmoid(upsampled masks).
    plain = predict(model, image, NAMES, unseen, IS_THING, ("semantic",), InferenceConfig(use_clip=False))
    with torch.no_grad():
        raw = model(image[None].float(), NAMES, "semantic")
    masks = F.interpolate(raw["pred_masks"], size=(64, 64), mode="bilinear", align_corners=True)[0, :, :50, :60]
    expected = torch.einsum("qk,qhw->khw", raw["pred_logits"][0].softmax(-1)[:, :4], masks.sigmoid())
    torch.testing.assert_close(plain["semantic"], expected, atol=1e-5, rtol=1e-5)
    # mask_align_corners=False upsamples as the training loss does (pixel centres aligned).
    centres = predict(model, image, NAMES, unseen, IS_THING, ("semantic",),
                      InferenceConfig(use_clip=False, mask_align_corners=False))
    masks = upsample_masks(raw["pred_masks"], (64, 64))[0, :, :50, :60]
    expected = torch.einsum("qk,qhw->khw", raw["pred_logits"][0].softmax(-1)[:, :4], masks.sigmoid())
    torch.testing.assert_close(centres["semantic"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(centres["semantic"], plain["semantic"])
    # Ensemble weights 0 leave the mask classifier alone; a cached call gives the same result.
    zero = InferenceConfig(clip_weight_seen=0.0, clip_weight_unseen=0.0)
    again = predict(model, image, NAMES, unseen, IS_THING, ("semantic",), zero, text_cache=cache)
    torch.testing.assert_close(again["semantic"], plain["semantic"])
    resized = predict(model, image, NAMES, unseen, IS_THING, ("panoptic",), out_size=(100, 120))
    assert resized["panoptic"][0].shape == (100, 120)
    with pytest.raises(ValueError, match="must be"):
        predict(model, image, NAMES, unseen[:3], IS_THING)


def test_unclaimed_regions_by_hand():
    from freeseg.extensions import unclaimed_regions

    masks = torch.zeros(3, 10, 10)
    masks[0, :, :4] = 0.9  # claims the 4 left columns
    masks[1, :, 4:] = 0.9  # an object-less query: claims nothing
    masks[2, 0:2, 4:10] = 0.6  # claims rows 0-1 right of column 4 (0.6 * 0.9 >= 0.5)
    masks[2, 9, 9] = 0.2
    objectness = torch.tensor([1.0, 0.3, 0.9])
    # Unclaimed: rows 2-9, columns 4-9 (48 pixels) -> one region.
    regions = unclaimed_regions(masks, objectness, min_area=0.1)
    assert regions.shape == (1, 10, 10)
    expected = torch.zeros(10, 10)
    expected[2:, 4:] = 1
    assert torch.equal(regions[0], expected)
    assert unclaimed_regions(masks, objectness, min_area=0.5).shape == (0, 10, 10)  # 48% < 50%
    # Split in two by a claimed column: two regions, in raster order of their first pixel.
    masks[0, 2:, 6] = 0.9
    regions = unclaimed_regions(masks, objectness, min_area=0.01)
    assert regions.shape == (2, 10, 10) and regions.sum().item() == 48 - 8
    assert regions[0, 2:, 4:6].sum() == 16 and regions[1, 2:, 7:].sum() == 24
    assert unclaimed_regions(masks, objectness, min_area=0.2).shape == (1, 10, 10)  # only the 24-pixel one
    assert unclaimed_regions(masks[:0], objectness[:0], 0.5).shape == (1, 10, 10)  # no query: all unclaimed


def test_predict_adds_unclaimed_regions_named_by_clip():
    from freeseg.config import ExtensionsConfig, InferenceConfig
    from freeseg.extensions import inference_hooks, unclaimed_regions
    from freeseg.modeling.inference import clip_probabilities, mask_probabilities, predict

    model = tiny_model().eval()
    images, _ = synthetic_batch()
    image = images[0].to(torch.uint8)
    unseen = torch.tensor([False, True, False, True])
    cfg = InferenceConfig(mask_align_corners=False)
    plain = predict(model, image, NAMES, unseen, IS_THING, ("semantic",), cfg)["semantic"]
    hooks = inference_hooks(ExtensionsConfig(unclaimed_min_area=0.01))
    extra = predict(model, image, NAMES, unseen, IS_THING, ("semantic",), cfg, hooks=hooks)["semantic"]
    with torch.no_grad():
        text = model.text_features(NAMES, "semantic")
        raw = model(image[None].float(), NAMES, "semantic", text_features=text)
        masks = mask_probabilities(model, raw["pred_masks"][0], (64, 64), False)
        objectness = 1 - raw["pred_logits"][0].softmax(-1)[:, -1]
        regions = unclaimed_regions(masks, objectness, 0.01)
        assert len(regions) > 0  # the random model leaves some of the image unclaimed
        p_clip = clip_probabilities(model, image.float(), regions, text, cfg)  # (n, K)
    # Each region adds its CLIP distribution on its own pixels and nothing elsewhere.
    torch.testing.assert_close(extra - plain, torch.einsum("nk,nhw->khw", p_clip, regions), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_clip.sum(-1), torch.ones(len(regions)))


def test_predict_official_protocol():
    from freeseg.config import InferenceConfig
    from freeseg.modeling.inference import predict

    model = tiny_model().eval()
    images, _ = synthetic_batch()
    image = images[0, :, :50, :60].to(torch.uint8)
    unseen = torch.tensor([False, True, False, True])
    # Without CLIP both protocols have the same semantic rule; they differ in where they resize:
    # "mask2former" resizes the masks to the output size, "official" its score maps.
    for size in [None, (100, 120)]:
        ours = predict(model, image, NAMES, unseen, IS_THING, ("semantic",), InferenceConfig(use_clip=False),
                       out_size=size)["semantic"]
        official = predict(model, image, NAMES, unseen, IS_THING, ("semantic",),
                           InferenceConfig(use_clip=False, protocol="official"), out_size=size)["semantic"]
        if size is None:
            assert torch.equal(official, ours)
        else:
            assert official.shape == (4, 100, 120) and not torch.equal(official, ours)
            torch.testing.assert_close(official, ours, atol=1e-5, rtol=1e-5)
    out = predict(model, image, NAMES, unseen, IS_THING, cfg=InferenceConfig(protocol="official"), out_size=(100, 120))
    assert out["instance"]["masks"].shape[1:] == (100, 120) and out["instance"]["masks"].dtype == torch.bool
    seg, info = out["panoptic"]
    assert seg.shape == (100, 120) and seg.dtype == torch.int32
    assert all(set(s) == {"id", "isthing", "category_id"} for s in info)  # the official keys, no score
    assert {s["id"] for s in info} == set(seg.unique().tolist()) - {0}
    with pytest.raises(ValueError, match="inference.protocol"):
        predict(model, image, NAMES, unseen, IS_THING, cfg=InferenceConfig(protocol="detectron2"))
