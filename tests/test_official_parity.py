"""Parity with the official FreeSeg code on outputs recorded from it (`inference.protocol = "official"`).

The fixture (`<repo>/../shared/fixtures/official/`, or $FREESEG_OFFICIAL_FIXTURE; its README says
how it was recorded) holds a tiny official model with random weights, two images through the
official eval forward with every per-task stage and final result, and 8 post-processing cases on
controlled inputs. It stays outside the repository; without it these tests skip, saying where it
is expected.

  - the tiny checkpoint is converted with the command-line converter, which reads the model's
    size from the tensor shapes and the official config (`config.yaml` = the recorded cfg.dump());
  - `predict` with the official protocol: text features, head outputs, region logits and
    ensembled probabilities within 1e-4 relative, then the final results: identical semantic
    label maps, instance masks and classes (scores within 1e-5), panoptic segments;
  - the 8 controlled cases through postprocess_official.py: the recorded outputs exactly.
"""

import io
import lzma
import os
from pathlib import Path

import pytest
import torch

from freeseg.modeling import postprocess_official as official
from freeseg.modeling.checkpoint_official import main as convert_main
from freeseg.modeling.inference import classify_with_clip, image_mask_logits, predict
from freeseg.modeling.postprocess import semantic_inference
from freeseg.modeling.region_classifier import OFFICIAL_TEMPERATURE, RegionClassifier

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(os.environ.get("FREESEG_OFFICIAL_FIXTURE", REPO.parent / "shared" / "fixtures" / "official"))
pytestmark = pytest.mark.skipif(
    not (FIXTURE / "tiny_model.pt.xz").is_file(),
    reason=f"official fixture not found: expected at {FIXTURE} (set FREESEG_OFFICIAL_FIXTURE to its folder)")
TASKS = ("semantic", "instance", "panoptic")


def load_xz(name: str):
    with open(FIXTURE / name, "rb") as f:
        return torch.load(io.BytesIO(lzma.decompress(f.read())), map_location="cpu", weights_only=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def one_thread():
    """The fixture was recorded with one thread; reductions then add up in one order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """(model, cfg, fixture dict) of the tiny official checkpoint, converted by the CLI."""
    from freeseg.evaluation.runner import load_model

    recorded = load_xz("tiny_model.pt.xz")
    folder = tmp_path_factory.mktemp("official")
    torch.save({"model": recorded["model"], "iteration": 0}, folder / "model_final.pth")
    (folder / "config.yaml").write_text(recorded["config"])  # what detectron2 writes beside it
    report = convert_main([str(folder / "model_final.pth"), str(folder / "tiny.pt"),
                           "--official-config", str(folder / "config.yaml")])
    assert report["official_keys"] == 500 and report["converted_keys"] == 497
    model, cfg, _ = load_model(folder / "tiny.pt")
    return model, cfg, recorded


@pytest.fixture(scope="module")
def outputs(one_thread):
    return load_xz("tiny_outputs.pt.xz")


@pytest.fixture(scope="module")
def cases():
    return load_xz("postprocess_cases.pt.xz")


def flags(recorded: dict) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Class names, unseen (K,) (official `trainable_flag` = 0) and is_thing (K,)."""
    return (recorded["class_names"], torch.tensor(recorded["trainable_flag"]) == 0,
            torch.tensor(recorded["thing_flags"]))


def test_converter_reads_the_tiny_size_and_the_official_protocol(tiny):
    model, cfg, _ = tiny
    m = cfg.model
    # From tensor shapes:
    assert (m.backbone.depth, m.backbone.width, m.backbone.stem) == (50, 4, "deeplab")
    assert (m.pixel_decoder.conv_dim, m.pixel_decoder.num_encoder_layers, m.pixel_decoder.num_points) == (32, 2, 4)
    assert (m.decoder.num_queries, m.decoder.hidden_dim, m.decoder.num_layers, m.decoder.ffn_dim) == (16, 32, 4, 64)
    assert (m.interaction.attn_dim, m.prompt.class_ctx, m.prompt.task_ctx) == (64, 4, 3)
    # From the official config: MASK_FORMER.NHEADS 4 (decoder and pixel decoder), SEM_SEG_HEAD.NUM_HEADS 4.
    assert (m.decoder.num_heads, m.pixel_decoder.num_heads, m.interaction.num_heads) == (4, 4, 4)
    assert cfg.inference.protocol == "official"
    assert (cfg.inference.clip_weight_seen, cfg.inference.clip_weight_unseen) == (0.2, 0.8)
    assert model.clip_model.embed_dim == 128 and len(model.decoder.query_feat.weight) == 16


@pytest.mark.parametrize("index", [0, 1])
def test_network_stages_match(tiny, outputs, index):
    """Text features, head outputs, region logits and ensembled probabilities of every task."""
    model, cfg, recorded = tiny
    names, unseen, _ = flags(recorded)
    rec = outputs["images"][index]
    image = rec["image"].float()
    H, W = rec["image_size"]
    icfg = cfg.inference
    regions = RegionClassifier(model.clip_model, icfg.mask_threshold, icfg.mask_expand_ratio,
                               temperature=OFFICIAL_TEMPERATURE, empty_fill=1.0)
    with torch.no_grad():
        features = model.extract(image[None])
        for task in TASKS:
            want = rec["tasks"][task]
            text = model.text_features(names, task)
            weights = model.classifier_weights(text)  # (K + 1, E)
            assert relative(weights, want["text_features"]) < 1e-4, task
            out = model.decode(features, text)
            assert relative(out["pred_embeds"], want["pred_embeds"]) < 1e-4, task
            assert relative(out["pred_logits"][0], want["pred_logits"]) < 1e-4, task
            assert relative(out["pred_masks"], want["pred_masks"]) < 1e-4, task
            masks = image_mask_logits(model, out["pred_masks"][0], (H, W), icfg.mask_align_corners).sigmoid()
            region_features, valid = regions.encode_regions(image, masks)
            assert torch.equal(valid, want["region_valid"]), task
            region_logits = OFFICIAL_TEMPERATURE * (region_features[valid] @ weights.t())  # (n, K + 1)
            assert relative(region_logits, want["region_logits"]) < 1e-4, task
            probs = out["pred_logits"][0].softmax(-1)
            _, _, p_ens = classify_with_clip(model, image, masks, probs, text, unseen, icfg)
            assert relative(p_ens, want["ensembled_probs"]) < 1e-4, task


@pytest.mark.parametrize("index", [0, 1])
def test_predict_gives_the_official_results(tiny, outputs, index):
    """Image 1 is asked at 68x53 (the official test-time resize): results resized as officially."""
    model, cfg, recorded = tiny
    names, unseen, is_thing = flags(recorded)
    rec = outputs["images"][index]
    want = rec["final"]
    got = predict(model, rec["image"], names, unseen, is_thing, TASKS, cfg.inference,
                  out_size=(rec["height"], rec["width"]))
    assert got["semantic"].shape == want["sem_seg"].shape
    assert torch.equal(got["semantic"].argmax(0), want["sem_seg"].argmax(0))
    assert relative(got["semantic"], want["sem_seg"]) < 1e-4
    instances, want_instances = got["instance"], want["instances"]
    assert torch.equal(instances["labels"], want_instances["pred_classes"])
    assert torch.equal(instances["masks"], want_instances["pred_masks"].bool())
    assert (instances["scores"] - want_instances["scores"]).abs().max() <= 1e-5
    seg, segments_info = got["panoptic"]
    assert torch.equal(seg, want["panoptic_seg"]["seg"].to(torch.int32))
    assert segments_info == want["panoptic_seg"]["segments_info"]
    assert len(segments_info) == (12, 11)[index] and len(instances["labels"]) == (15, 12)[index]


def test_eight_controlled_cases(cases):
    assert len(cases["cases"]) == 8 and cases["overlap_threshold"] == 0.5 and cases["clip_ensemble_weight"] == 0.8


@pytest.mark.parametrize("index", range(8))
def test_controlled_case_matches_exactly(cases, index):
    """Ensemble from the case's logits, then each task's post-processing: the recorded raw outputs
    (at the test size) and final outputs (after the official resize), exactly."""
    case = cases["cases"][index]
    names, unseen, is_thing = flags(cases)
    K = len(names)
    logits = case["mask_logits"]  # (Q, H, W)
    out_size = tuple(case["output_size"])
    # The network is stubbed in the recording: its class logits and CLIP's region logits are given.
    valid = (logits.sigmoid() > 0.5).flatten(1).any(1)  # the official crop rule: strictly above 0.5
    p_mask = case["mask_cls"].softmax(-1)[:, :K]
    p_clip = torch.where(valid[:, None], case["clip_logits"][:, :K].softmax(-1), torch.ones(()))
    p_ens = official.official_ensemble(p_mask, p_clip, unseen, 0.2, 0.8)
    for task in TASKS:
        want = case["tasks"][task]
        assert torch.equal(valid, want["region_valid"])
        assert torch.equal(p_ens, want["ensembled_probs"]), task
    raw = case["tasks"]["semantic"]["raw_output"]
    assert torch.equal(semantic_inference(p_ens, logits.sigmoid()), raw)
    final = official.official_results("semantic", p_ens, logits, is_thing, out_size)
    assert torch.equal(final, case["final"]["sem_seg"])

    raw = case["tasks"]["instance"]["raw_output"]
    got = official.instance(p_ens, logits, is_thing, cases["overlap_threshold"])
    assert torch.equal(got["labels"], raw["pred_classes"])
    assert torch.equal(got["masks"].float(), raw["pred_masks"])
    assert torch.equal(got["scores"], raw["scores"])
    final, want = official.official_results("instance", p_ens, logits, is_thing, out_size), case["final"]["instances"]
    assert torch.equal(final["masks"], want["pred_masks"].bool()) and final["masks"].shape == want["pred_masks"].shape
    assert torch.equal(final["labels"], want["pred_classes"]) and torch.equal(final["scores"], want["scores"])

    raw = case["tasks"]["panoptic"]["raw_output"]
    seg, segments_info = official.panoptic(p_ens, logits.sigmoid(), is_thing, cases["overlap_threshold"])
    assert torch.equal(seg, raw["seg"]) and segments_info == raw["segments_info"]
    seg, segments_info = official.official_results("panoptic", p_ens, logits, is_thing, out_size)
    want = case["final"]["panoptic_seg"]
    assert torch.equal(seg, want["seg"].to(torch.int32)) and segments_info == want["segments_info"]
