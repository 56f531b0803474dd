"""Official FreeSeg checkpoint converter: our full-size modules have exactly the official keys.

The official key list (shared/data/official_freeseg_r101c_keys.tsv, 1,167 entries with shapes)
is the ground truth: renaming its backbone / pixel-decoder / predictor lines must give exactly
the names and shapes of our R101c backbone, pixel decoder and transformer decoder.
"""

import pathlib

import pytest
import torch

from freeseg.config import BackboneConfig, DecoderConfig, PixelDecoderConfig
from freeseg.modeling.backbone import ResNet
from freeseg.modeling.checkpoint_official import convert_official_state_dict, official_to_ours
from freeseg.modeling.pixel_decoder import build_pixel_decoder
from freeseg.modeling.transformer_decoder import build_transformer_decoder

ROOT = pathlib.Path(__file__).resolve().parent
CANDIDATES = [ROOT / "data" / "official_freeseg_r101c_keys.tsv",
              ROOT.parent.parent / "shared" / "data" / "official_freeseg_r101c_keys.tsv"]
TSV = next((p for p in CANDIDATES if p.exists()), None)
OURS = ("backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.")


def official_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t"):
            continue
        name, shape, _dtype = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


@pytest.mark.skipif(TSV is None, reason="official_freeseg_r101c_keys.tsv not found (tests/data or ../shared/data)")
def test_converted_keys_match_our_modules():
    official = official_keys()
    assert len(official) == 1167
    # Build on the meta device: only names and shapes matter here, no memory, no init cost.
    with torch.device("meta"):
        bb_cfg = BackboneConfig()
        backbone = ResNet(depth=bb_cfg.depth, stem=bb_cfg.stem, width=bb_cfg.width,
                          res5_multi_grid=bb_cfg.res5_multi_grid, stride_in_1x1=bb_cfg.stride_in_1x1,
                          norm="frozen_bn")
        pd_cfg = PixelDecoderConfig()
        pixel_decoder = build_pixel_decoder(pd_cfg, backbone.out_channels, backbone.out_strides)
        decoder = build_transformer_decoder(DecoderConfig(), pd_cfg.conv_dim, pd_cfg.mask_dim, embed_dim=512)
    ours = {}
    for prefix, module in (("backbone.", backbone), ("pixel_decoder.", pixel_decoder), ("transformer_decoder.", decoder)):
        ours.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})

    fake = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    converted, unmapped = convert_official_state_dict(fake)
    mine = {k: tuple(v.shape) for k, v in converted.items()}
    assert sum(k.startswith(OURS) for k in official) == len(mine) == len(ours) == 842
    assert mine == ours  # same names, same shapes
    # What is left is exactly the part other components map: CLIP, prompts, interaction, criterion.
    assert unmapped and all(k.startswith(("clip_adapter.", "sem_seg_head.interaction.", "criterion.")) for k in unmapped)


def test_rename_examples():
    assert official_to_ours("backbone.stem.conv2.norm.running_var") == "backbone.stem.bn2.running_var"
    assert official_to_ours("backbone.res5.2.shortcut.norm.bias") == "backbone.layer4.2.downsample.1.bias"
    assert official_to_ours("backbone.res2.0.shortcut.weight") == "backbone.layer1.0.downsample.0.weight"
    assert official_to_ours("backbone.res4.22.conv3.weight") == "backbone.layer3.22.conv3.weight"
    assert (official_to_ours("sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.value_proj.bias")
            == "pixel_decoder.transformer.layers.5.self_attn.value_proj.bias")
    assert official_to_ours("sem_seg_head.pixel_decoder.adapter_1.norm.weight") == "pixel_decoder.adapter_1.1.weight"
    assert official_to_ours("sem_seg_head.predictor.query_feat.weight") == "transformer_decoder.query_feat.weight"
    assert official_to_ours("clip_adapter.clip_model.logit_scale") is None
