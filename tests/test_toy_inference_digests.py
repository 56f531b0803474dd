"""The toy world's inference gives the same outputs wherever its extensions live.

tests/data/toy_inference_digests.json holds digests (`summary` below) of `predict`'s outputs
(three tasks, both protocols) for a toy-preset model with random weights, with every inference
extension of the toy preset on ("all") and with each of them off in turn. They were generated
once, with the code of commit 8b3fd76, in which these extensions were still options of
InferenceConfig inside region_classifier.py and inference.py; they must not be regenerated from
the code under test. Each variant's digest differs from "all", so each hook is exercised.
The digests are of the exact bytes: they hold for one torch thread on a CPU like the one they
were recorded on (x86-64).
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from freeseg.extensions import inference_hooks
from freeseg.modeling.inference import predict
from freeseg.presets import get_preset
from test_freeseg_model import IS_THING, NAMES, synthetic_batch, tiny_model

REFERENCE = Path(__file__).parent / "data" / "toy_inference_digests.json"
# Each variant: the toy preset's extensions with these off (the keys of 8b3fd76 were inference.*).
VARIANTS = {"all": {}, "no_largest_part": {"clip_largest_part": False, "clip_erode": 0},
            "no_flip": {"clip_flip": False}, "no_task_ensemble": {"clip_task_ensemble": False},
            "no_unclaimed": {"unclaimed_min_area": 0.0}}


def summary(out: dict) -> dict[str, str]:
    """Per task a short sha256 over the shapes and bytes of its outputs."""
    digests = {}
    for task, result in out.items():
        if task == "semantic":
            parts = [result]
        elif task == "instance":
            parts = [result["masks"], result["scores"], result["labels"]]
        else:
            pan, segments = result
            info = [[s["id"], s["category_id"], int(s["isthing"])] for s in segments]
            parts = [pan, torch.tensor(info, dtype=torch.long).reshape(-1, 3)]
        d = hashlib.sha256()
        for p in parts:
            d.update(str(tuple(p.shape)).encode())
            d.update(p.detach().contiguous().numpy().tobytes())
        digests[task] = d.hexdigest()[:16]
    return digests


@pytest.fixture(scope="module")
def model_and_image():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # decoder weights spread out, so that masks differ and leave regions unclaimed
        for p in model.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    images, _ = synthetic_batch()
    yield model, images[0, :, :56, :60].to(torch.uint8)
    torch.set_num_threads(threads)


def test_reference_variants_differ():
    reference = json.loads(REFERENCE.read_text())
    for protocol in ("mask2former", "official"):
        for name in VARIANTS:
            if name != "all":
                assert reference[f"{protocol}/{name}"] != reference[f"{protocol}/all"], (protocol, name)


@pytest.mark.parametrize("protocol", ["mask2former", "official"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_toy_inference_matches_the_outputs_before_the_move(model_and_image, protocol, variant):
    model, image = model_and_image
    cfg = get_preset("toy")
    cfg.inference.protocol = protocol
    ext = dataclasses.replace(cfg.extensions, **VARIANTS[variant])
    out = predict(model, image, NAMES, torch.tensor([False, True, False, True]), IS_THING, cfg=cfg.inference,
                  hooks=inference_hooks(ext))
    assert summary(out) == json.loads(REFERENCE.read_text())[f"{protocol}/{variant}"]
