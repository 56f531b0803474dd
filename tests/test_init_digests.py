"""The models' initial weights do not depend on where the toy world's extensions live.

Random initial values depend on the order in which layers are made (every nn.Linear / nn.Conv2d
draws from torch's generator when made, and re-initialisations draw again). The toy preset's
results are reproducible only if its model starts from the same weights, whichever module holds
each layer. tests/data/init_digests.json holds a digest (`digest` below) of the state dicts of
two models built with `torch.manual_seed(0)`: the toy preset's and the paper's COCO
configuration at tiny width (tests/test_paper_path.py). It was generated once, with the code of
commit 1eaca26, in which the extensions' layers were still made inside the pixel decoder and
the transformer decoder; it must not be regenerated from the code under test. Keys that moved
are compared under their new names (extensions.RENAMED_KEYS); the digest also fixes the order of
the parameters, which the optimizer and the gradient norm follow.
"""

import hashlib
import json
from pathlib import Path

import torch

from freeseg.clip import CLIP, default_tokenizer
from freeseg.extensions import RENAMED_KEYS
from freeseg.modeling.freeseg import build_freeseg
from freeseg.presets import get_preset
from test_paper_path import tiny_paper_model

REFERENCE = Path(__file__).parent / "data" / "init_digests.json"
GROUPED = ("backbone", "clip_model")  # one hash over all their tensors, in order


def digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per tensor a short sha256 of its bytes (in state-dict order); the backbone and CLIP
    (hundreds of tensors, made by code no extension touches) one hash each over names and bytes."""
    out, groups = {}, {name: hashlib.sha256() for name in GROUPED}
    for key, value in state.items():
        data = value.detach().cpu().contiguous().numpy().tobytes()
        group = key.split(".")[0]
        if group in groups:
            groups[group].update(key.encode())
            groups[group].update(data)
        else:
            out[key] = hashlib.sha256(data).hexdigest()[:16]
    return {**out, **{f"{name}.*": h.hexdigest()[:16] for name, h in groups.items()}}


def toy_model():
    cfg = get_preset("toy")
    c = cfg.model.clip
    torch.manual_seed(0)
    clip = CLIP(embed_dim=c.embed_dim, image_resolution=c.image_resolution, vision_layers=tuple(c.vision_layers),
                vision_width=c.vision_width, vision_patch_size=None, context_length=c.context_length,
                vocab_size=49408, transformer_width=c.text_width, transformer_heads=c.text_heads,
                transformer_layers=c.text_layers)
    return build_freeseg(cfg, clip, default_tokenizer())


def renamed(reference: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in reference.items():
        for old, new in RENAMED_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def test_toy_model_starts_from_the_same_weights_in_the_same_order():
    reference = renamed(json.loads(REFERENCE.read_text())["toy"])
    assert any(k.startswith("mask_refiner.") for k in reference) and "decoder.coord_embed.weight" in reference
    assert list(digest(toy_model().state_dict()).items()) == list(reference.items())


def test_paper_model_starts_from_the_same_weights_in_the_same_order():
    reference = json.loads(REFERENCE.read_text())["coco_tiny"]
    assert list(digest(tiny_paper_model().state_dict()).items()) == list(reference.items())


def test_digest_sees_one_changed_value():
    state = {"decoder.w": torch.zeros(3), "backbone.a": torch.zeros(2)}
    base = digest(state)
    for key in state:
        changed = {k: v.clone() for k, v in state.items()}
        changed[key][1] = 1e-30
        assert digest(changed) != base
