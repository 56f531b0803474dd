"""Sine position encoding, MSDeformAttn module and the multi-scale deformable pixel decoder."""

import math

import pytest
import torch

from freeseg.config import PixelDecoderConfig
from freeseg.modeling.pixel_decoder import (
    DeformableEncoder, MSDeformAttn, MSDeformAttnPixelDecoder, build_pixel_decoder,
)
from freeseg.modeling.position_encoding import PositionEmbeddingSine

torch.set_num_threads(1)

CHANNELS = {"res2": 8, "res3": 16, "res4": 24, "res5": 32}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def features(batch: int, h: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, c, h // STRIDES[k], w // STRIDES[k], generator=g) for k, c in CHANNELS.items()}


def tiny_decoder(**kwargs) -> MSDeformAttnPixelDecoder:
    args = dict(conv_dim=16, mask_dim=12, num_encoder_layers=2, num_heads=4, num_points=2, ffn_dim=32, num_groups=4)
    return MSDeformAttnPixelDecoder(CHANNELS, STRIDES, **{**args, **kwargs})


def test_position_encoding_hand_values():
    pe = PositionEmbeddingSine(num_pos_feats=4)(torch.zeros(2, 3, 2, 3))
    assert pe.shape == (2, 8, 2, 3)
    # Row 0 of 2 is at y = 1/2 * 2pi = pi; channels 0..3 encode y with frequencies 1, 1, 1/100, 1/100.
    y = math.pi
    assert torch.allclose(pe[0, :4, 0, 0], torch.tensor([math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)]), atol=1e-5)
    # Column 2 of 3 is at x = 3/3 * 2pi = 2pi; channels 4..7 encode x.
    x = 2 * math.pi
    assert torch.allclose(pe[1, 4:, 1, 2], torch.tensor([math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]), atol=1e-5)
    assert torch.equal(pe[0, :4, 0, 0], pe[0, :4, 0, 2])  # y channels do not depend on the column


def test_msdeformattn_initialisation():
    attn = MSDeformAttn(dim=16, num_levels=3, num_heads=4, num_points=2)
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)  # (M, L, P, xy)
    # Head m looks along angle 2*pi*m/4, scaled onto the unit square; point p at distance p+1.
    want = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert torch.allclose(bias[:, 0, 0], want, atol=1e-6)
    assert torch.allclose(bias[:, 2, 1], 2 * want, atol=1e-6)
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()


def test_msdeformattn_samples_the_reference_pixel():
    # One level, zero offsets and uniform weights: every point samples the query's own pixel
    # centre exactly, so the module reduces to output_proj(value_proj(value)) token by token.
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=8, num_levels=1, num_heads=2, num_points=3)
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    h, w = 3, 5
    value = torch.randn(2, h * w, 8)
    ref = DeformableEncoder.reference_points([(h, w)], value.device)[None, :, None].expand(2, -1, 1, -1)
    shapes = torch.tensor([[h, w]])
    out = attn(torch.randn(2, h * w, 8), ref, value, shapes, torch.tensor([0]))
    assert torch.allclose(out, attn.output_proj(attn.value_proj(value)), atol=1e-5)


def test_reference_points_are_pixel_centres():
    ref = DeformableEncoder.reference_points([(2, 4), (1, 1)], torch.device("cpu"))
    assert ref.shape == (9, 2)
    assert torch.allclose(ref[:4], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]]))
    assert torch.allclose(ref[4], torch.tensor([0.125, 0.75])) and torch.allclose(ref[8], torch.tensor([0.5, 0.5]))


def test_pixel_decoder_shapes_and_order():
    torch.manual_seed(0)
    dec = tiny_decoder().eval()
    mask_features, multi_scale = dec(features(2, 64, 96))
    assert mask_features.shape == (2, 12, 16, 24)
    assert [tuple(m.shape) for m in multi_scale] == [(2, 16, 2, 3), (2, 16, 4, 6), (2, 16, 8, 12)]
    # input_proj[0] reads res5, as in the official checkpoint (lowest resolution first).
    assert [p[0].in_channels for p in dec.input_proj] == [32, 24, 16]


def test_pixel_decoder_batched_equals_per_image():
    torch.manual_seed(0)
    dec = tiny_decoder().eval()
    feats = features(3, 64, 64)
    with torch.no_grad():
        mask_b, ms_b = dec(feats)
        for i in range(3):
            mask_i, ms_i = dec({k: v[i : i + 1] for k, v in feats.items()})
            assert torch.allclose(mask_b[i : i + 1], mask_i, atol=1e-5)
            for a, b in zip(ms_b, ms_i):
                assert torch.allclose(a[i : i + 1], b, atol=1e-5)


def test_encoder_mixes_levels():
    # Deformable attention samples all levels: changing res5 alone changes the res3-level output.
    torch.manual_seed(0)
    dec = tiny_decoder().eval()
    feats = features(1, 64, 64)
    with torch.no_grad():
        _, before = dec(feats)
        feats["res5"] = feats["res5"] + 1.0
        _, after = dec(feats)
    assert (before[2] - after[2]).abs().max() > 1e-3


def test_build_pixel_decoder_reads_config():
    cfg = PixelDecoderConfig(conv_dim=16, mask_dim=8, num_encoder_layers=3, num_heads=2, num_points=1, ffn_dim=24, num_groups=2)
    dec = build_pixel_decoder(cfg, CHANNELS, STRIDES)
    assert len(dec.transformer.layers) == 3
    assert dec.transformer.layers[0].linear1.out_features == 24
    assert dec.mask_features.out_channels == 8
    assert dec.transformer.layers[0].self_attn.attention_weights.out_features == 2 * 3 * 1
    with pytest.raises(ValueError, match="strides"):
        build_pixel_decoder(cfg, CHANNELS, {**STRIDES, "res5": 16})
