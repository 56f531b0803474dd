"""Official FreeSeg checkpoint -> our parameter names, through one visible rename table.

The official model (bytedance/FreeSeg, `OpenVocabulary` meta-architecture) nests its parts as
`backbone.*` (detectron2 ResNet names), `sem_seg_head.pixel_decoder.*`,
`sem_seg_head.predictor.*`, `sem_seg_head.interaction.*`, `clip_adapter.*` and `criterion.*`
(all 1,167 keys: shared/data/official_freeseg_r101c_keys.tsv). Ours uses torchvision names in
the backbone and Mask2Former's everywhere else, so most keys only change their prefix.

`OFFICIAL_RENAMES` is the table: (official prefix, our prefix), first match wins, so longer,
more specific prefixes come first. Backbone keys additionally go through the detectron2 ->
torchvision table of `backbone.py` (`DETECTRON2_RESNET_RENAMES`), which is where the stage and
norm names change. Our top-level attribute names (`backbone`, `pixel_decoder`,
`transformer_decoder`) are those of the FreeSeg model that holds the three modules.

Usage:
    converted, unmapped = convert_official_state_dict(torch.load(path)["model"])
    # `unmapped` lists keys no rule covers (empty once every part has its rules)
"""

import torch
from torch import Tensor

from freeseg.modeling.backbone import detectron2_to_torchvision_name

OFFICIAL_RENAMES: list[tuple[str, str]] = [
    # ---- backbone: prefix only here; detectron2 -> torchvision names in backbone.py (DeepLab stem).
    ("backbone.", "backbone."),
    # ---- pixel decoder (Mask2Former `MSDeformAttnPixelDecoder`)
    # The encoder layers sit one module shallower here (no `encoder` wrapper around `layers`).
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.", "pixel_decoder.transformer.layers."),
    # detectron2's Conv2d carries its norm as `.norm`; ours are nn.Sequential(conv, norm[, relu]).
    ("sem_seg_head.pixel_decoder.adapter_1.norm.", "pixel_decoder.adapter_1.1."),
    ("sem_seg_head.pixel_decoder.adapter_1.weight", "pixel_decoder.adapter_1.0.weight"),
    ("sem_seg_head.pixel_decoder.layer_1.norm.", "pixel_decoder.layer_1.1."),
    ("sem_seg_head.pixel_decoder.layer_1.weight", "pixel_decoder.layer_1.0.weight"),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    # ---- transformer decoder (FreeSeg `OpenTransformerPredictor`): identical names.
    ("sem_seg_head.predictor.", "transformer_decoder."),
    # ---- CLIP, prompt learner, semantic context interaction, criterion, no-object embedding:
    # rules for `clip_adapter.*`, `sem_seg_head.interaction.*` and `criterion.*` go here.
]


def official_to_ours(name: str) -> str | None:
    """One official key -> our key, or None when no rule covers it."""
    for old, new in OFFICIAL_RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
            if new == "backbone.":
                name = new + detectron2_to_torchvision_name(name[len(new):], stem="deeplab")
            return name
    return None


def convert_official_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an official FreeSeg state dict (numpy arrays are turned into tensors).

    Returns (converted state dict, official keys that no rule covers).
    """
    converted, unmapped = {}, []
    for name, value in state_dict.items():
        new = official_to_ours(name)
        if new is None:
            unmapped.append(name)
            continue
        if new in converted:
            raise ValueError(f"official checkpoint: two keys map to {new!r} (check OFFICIAL_RENAMES)")
        converted[new] = torch.as_tensor(value)
    return converted, unmapped
