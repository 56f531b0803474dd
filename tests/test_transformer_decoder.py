"""Masked-attention transformer decoder, and the whole proposal network (tiny and full size)."""

import time

import pytest
import torch

from freeseg.config import BackboneConfig, DecoderConfig, PixelDecoderConfig
from freeseg.modeling.backbone import build_backbone
from freeseg.modeling.pixel_decoder import MSDeformAttn, build_pixel_decoder
from freeseg.modeling.transformer_decoder import MaskedTransformerDecoder, build_transformer_decoder

torch.set_num_threads(1)


def tiny_decoder(**kwargs) -> MaskedTransformerDecoder:
    args = dict(in_channels=16, hidden_dim=16, num_queries=10, num_layers=3, num_heads=4, ffn_dim=32,
                mask_dim=12, embed_dim=20, class_mlp_hidden=24)
    return MaskedTransformerDecoder(**{**args, **kwargs})


def inputs(batch: int, seed: int = 0, channels: int = 16) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    multi_scale = [torch.randn(batch, channels, 2 * 2**i, 3 * 2**i, generator=g) for i in range(3)]
    return multi_scale, torch.randn(batch, 12, 16, 24, generator=g)


def test_output_dict():
    torch.manual_seed(0)
    out = tiny_decoder()(*inputs(2))
    assert out["pred_embeds"].shape == (2, 10, 20)
    assert out["pred_masks"].shape == (2, 10, 16, 24)
    assert len(out["aux_outputs"]) == 3  # query init + layers 1 and 2
    assert all(a["pred_embeds"].shape == (2, 10, 20) and a["pred_masks"].shape == (2, 10, 16, 24)
               for a in out["aux_outputs"])
    # Layer outputs differ from each other (each layer refines the queries).
    assert not torch.allclose(out["aux_outputs"][0]["pred_masks"], out["pred_masks"])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_batched_equals_per_image(pre_norm):
    torch.manual_seed(0)
    dec = tiny_decoder(pre_norm=pre_norm, in_channels=8).eval()  # in_channels 8: a 1x1 input_proj
    multi_scale, mask_features = inputs(3, channels=8)
    with torch.no_grad():
        batched = dec(multi_scale, mask_features)
        for i in range(3):
            single = dec([m[i : i + 1] for m in multi_scale], mask_features[i : i + 1])
            assert torch.allclose(batched["pred_masks"][i : i + 1], single["pred_masks"], atol=1e-4)
            assert torch.allclose(batched["pred_embeds"][i : i + 1], single["pred_embeds"], atol=1e-5)
            for a, b in zip(batched["aux_outputs"], single["aux_outputs"]):
                assert torch.allclose(a["pred_masks"][i : i + 1], b["pred_masks"], atol=1e-4)


def test_attention_mask_rule():
    dec = tiny_decoder(num_queries=3, num_heads=2)
    with torch.no_grad():  # mask_embed = identity on channels 0..11 (ReLU keeps positive parts)
        for layer in dec.mask_embed.layers:
            torch.nn.init.eye_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    # After decoder_norm, q0 and q2 are positive on channel 0 only, q1 on channel 1 only
    # (the ReLUs drop the negative channel), so each mask logit is a positive multiple of one
    # mask-feature channel.
    x = torch.zeros(1, 3, 16)
    x[0, 0, :2] = torch.tensor([1.0, -1.0])
    x[0, 1, :2] = torch.tensor([-1.0, 1.0])
    x[0, 2, :2] = torch.tensor([1.0, -1.0])
    mask_features = torch.zeros(1, 12, 4, 4)
    mask_features[0, 0, :, :2], mask_features[0, 0, :, 2:] = 5.0, -5.0  # q0/q2: left half in
    mask_features[0, 1] = -5.0  # q1: nowhere
    _, masks, attn_mask = dec.prediction_heads(x, mask_features, (2, 2))
    assert attn_mask.shape == (2 * 1, 3, 4)  # (B*M, Q, h*w)
    # q0: on the 2x2 level it sees only the left column (True = hidden).
    assert attn_mask[0, 0].tolist() == [False, True, False, True]
    # q1: its mask is empty (sigmoid < 0.5 everywhere) -> it attends everywhere instead.
    assert (masks[0, 1].sigmoid() < 0.5).all() and attn_mask[0, 1].tolist() == [False] * 4
    assert torch.equal(attn_mask[0], attn_mask[1])  # the same mask for every head


def test_masked_pixels_do_not_reach_the_query():
    # One query, one layer: perturbing level-0 pixels that the query's first mask hides leaves
    # the layer's output unchanged; perturbing a visible pixel changes it.
    torch.manual_seed(3)
    dec = tiny_decoder(num_queries=1, num_layers=1).eval()
    multi_scale, mask_features = inputs(1, seed=1)
    with torch.no_grad():
        _, _, attn_mask = dec.prediction_heads(dec.query_feat.weight[None], mask_features, multi_scale[0].shape[-2:])
        hidden = attn_mask[0, 0]  # (h*w,)
        assert 0 < hidden.sum() < hidden.numel(), "precondition: a partly visible mask"
        base = dec(multi_scale, mask_features)["pred_embeds"]
        bumped = [m.clone() for m in multi_scale]
        bumped[0].flatten(2)[:, :, hidden] += 10.0
        assert torch.allclose(dec(bumped, mask_features)["pred_embeds"], base, atol=1e-5)
        bumped = [m.clone() for m in multi_scale]
        bumped[0].flatten(2)[:, :, ~hidden] += 10.0
        assert (dec(bumped, mask_features)["pred_embeds"] - base).abs().max() > 1e-3


def test_official_sizes_and_names():
    dec = build_transformer_decoder(DecoderConfig(), in_channels=256, mask_dim=256, embed_dim=512)
    names = dict(dec.named_parameters())
    assert names["class_embed.layers.0.weight"].shape == (1024, 256)
    assert names["class_embed.layers.1.weight"].shape == (512, 1024)
    assert len(dec.mask_embed.layers) == 3 and len(dec.transformer_ffn_layers) == 10
    assert "transformer_cross_attention_layers.9.multihead_attn.in_proj_weight" in names
    assert "transformer_self_attention_layers.0.self_attn.out_proj.weight" in names
    assert not any(n.startswith("input_proj") for n in names)  # 256 -> 256: identity


def _perturb_zero_inits(*modules: torch.nn.Module) -> None:
    # Deformable DETR starts the offset / attention-weight matrices at zero, so at init the
    # gradient into the query path (and the level embedding) is exactly zero. Perturb them so
    # that every parameter's gradient path is exercised.
    for module in modules:
        for m in module.modules():
            if isinstance(m, MSDeformAttn):
                torch.nn.init.normal_(m.sampling_offsets.weight, std=0.01)
                torch.nn.init.normal_(m.attention_weights.weight, std=0.01)


def build_network(bb: BackboneConfig, pd: PixelDecoderConfig, dec: DecoderConfig, embed_dim: int):
    backbone = build_backbone(bb)
    pixel_decoder = build_pixel_decoder(pd, backbone.out_channels, backbone.out_strides)
    decoder = build_transformer_decoder(dec, in_channels=pd.conv_dim, mask_dim=pd.mask_dim, embed_dim=embed_dim)
    return backbone, pixel_decoder, decoder


def run_network(backbone, pixel_decoder, decoder, images):
    mask_features, multi_scale = pixel_decoder(backbone(images))
    return decoder(multi_scale, mask_features)


def test_tiny_network_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    modules = build_network(
        BackboneConfig(depth=18, stem="basic", width=8, res5_multi_grid=(1, 1)),
        PixelDecoderConfig(conv_dim=16, mask_dim=16, num_encoder_layers=2, num_heads=4, num_points=2, ffn_dim=32, num_groups=4),
        DecoderConfig(hidden_dim=16, num_queries=10, num_layers=3, num_heads=4, ffn_dim=32, class_mlp_hidden=24),
        embed_dim=20,
    )
    _perturb_zero_inits(*modules)
    out = run_network(*modules, torch.randn(2, 3, 64, 64))
    loss = sum(o["pred_embeds"].pow(2).mean() + o["pred_masks"].sigmoid().mean() for o in [out, *out["aux_outputs"]])
    loss.backward()
    params = [(n, p) for m in modules for n, p in m.named_parameters()]
    assert len(params) > 100 and all(p.requires_grad for _, p in params)
    no_grad = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0 or not p.grad.isfinite().all()]
    assert no_grad == []


@pytest.mark.slow
def test_full_size_forward_640():
    torch.manual_seed(0)
    modules = build_network(BackboneConfig(), PixelDecoderConfig(), DecoderConfig(), embed_dim=512)
    for m in modules:
        m.eval()
    start = time.perf_counter()
    with torch.no_grad():
        out = run_network(*modules, torch.randn(1, 3, 640, 640))
    elapsed = time.perf_counter() - start
    assert out["pred_embeds"].shape == (1, 100, 512)
    assert out["pred_masks"].shape == (1, 100, 160, 160)
    assert len(out["aux_outputs"]) == 10 and out["pred_masks"].isfinite().all()
    assert elapsed < 600, f"full-size forward took {elapsed:.0f} s"
