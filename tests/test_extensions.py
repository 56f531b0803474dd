"""The toy world's extensions (freeseg/extensions.py): the decoder's positional terms, the stride-2
refiner, and how the model plugs them in and loads checkpoints that name them the old way."""

import pytest
import torch
import torch.nn.functional as F

from freeseg.clip import CLIP, default_tokenizer
from freeseg.config import ExtensionsConfig, apply_overrides, from_dict, to_dict
from freeseg.extensions import (
    COORD_UNIT, RENAMED_KEYS, PositionalMaskDecoder, StrideTwoRefiner, build_pixel_decoder, cell_coords,
)
from freeseg.modeling.freeseg import build_freeseg
from freeseg.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from freeseg.modeling.transformer_decoder import MaskedTransformerDecoder
from freeseg.presets import get_preset

torch.set_num_threads(1)

DECODER_ARGS = dict(in_channels=16, hidden_dim=16, num_queries=10, num_layers=3, num_heads=4, ffn_dim=32,
                    mask_dim=12, embed_dim=20, class_mlp_hidden=24)


def decoder_inputs(batch: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    multi_scale = [torch.randn(batch, 16, 2 * 2**i, 3 * 2**i, generator=g) for i in range(3)]
    return multi_scale, torch.randn(batch, 12, 16, 24, generator=g)


def positional(coord_masks: bool, coord_values: bool) -> PositionalMaskDecoder:
    return PositionalMaskDecoder(coord_masks=coord_masks, coord_values=coord_values, **DECODER_ARGS)


def test_coord_masks_start_as_mask2former_and_draw_a_disc():
    multi_scale, mask_features = decoder_inputs(2)
    torch.manual_seed(0)
    plain = MaskedTransformerDecoder(**DECODER_ARGS).eval()
    torch.manual_seed(0)
    coord = positional(coord_masks=True, coord_values=False).eval()
    assert coord.coord_value is None and set(coord.state_dict()) - set(plain.state_dict()) == {
        "coord_embed.weight", "coord_embed.bias"}
    with torch.no_grad():  # zero-initialised: the same network as without the option
        a, b = plain(multi_scale, mask_features), coord(multi_scale, mask_features)
        assert torch.equal(a["pred_masks"], b["pred_masks"]) and torch.equal(a["pred_embeds"], b["pred_embeds"])
        # Queries -> (a, b, c) through the bias alone. A disc of radius 3 cells around cell
        # (row 5, col 14) of a 16 x 24 map (centre at 7.5, 11.5): in coordinate units
        # rho^2 - (u - u0)^2 - (v - v0)^2 = 2 u0 u + 2 v0 v - (u^2 + v^2) + (rho^2 - u0^2 - v0^2).
        u0, v0, rho = (14 - 11.5) / COORD_UNIT, (5 - 7.5) / COORD_UNIT, 3 / COORD_UNIT
        coord.coord_embed.bias.copy_(torch.tensor([2 * u0, 2 * v0, -1.0]))
        # Zero mask features: Mask2Former's term is 0 and the logits are the disc alone.
        logits = coord.mask_logits(torch.zeros(1, 1, 16), torch.zeros(1, 12, 16, 24))[0, 0]
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")
    disc = logits + rho**2 - u0**2 - v0**2
    inside = (rows - 5) ** 2 + (cols - 14) ** 2 < 3**2
    assert torch.equal(disc > 1e-4, inside) and inside.sum() == 25
    assert divmod(int(logits.argmax()), 24) == (5, 14)


def test_coord_values_start_as_mask2former_and_share_the_disc_coordinates():
    multi_scale, mask_features = decoder_inputs(2)
    torch.manual_seed(0)
    plain = positional(coord_masks=True, coord_values=False).eval()
    torch.manual_seed(0)
    both = positional(coord_masks=True, coord_values=True).eval()
    assert set(both.state_dict()) - set(plain.state_dict()) == {"coord_value.weight", "coord_value.bias"}
    with torch.no_grad():  # zero-initialised: the same network as without the option
        a, b = plain(multi_scale, mask_features), both(multi_scale, mask_features)
        assert torch.equal(a["pred_masks"], b["pred_masks"]) and torch.equal(a["pred_embeds"], b["pred_embeds"])
        both.coord_value.weight.normal_()  # now the queries read positions and their masks change
        assert not torch.allclose(both(multi_scale, mask_features)["pred_masks"], a["pred_masks"], atol=1e-3)
    # The attended levels (2x3, 4x6, 8x12) over the 16x24 mask features: each coarse cell sits
    # at the mean of the mask-feature cells it covers, and those are the disc's coordinates.
    fine = torch.stack(cell_coords((16, 24), (16, 24), torch.float64, "cpu"))
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")
    torch.testing.assert_close(fine, torch.stack([cols - 11.5, rows - 7.5]).double() / COORD_UNIT)
    for h, w in [(2, 3), (4, 6), (8, 12)]:
        coarse = torch.stack(cell_coords((h, w), (16, 24), torch.float64, "cpu"))
        torch.testing.assert_close(coarse, F.avg_pool2d(fine, 16 // h))


def test_stride_two_refiner_is_local_and_trainable():
    """The refiner gives stride-2 mask features; a change of one image pixel moves them only near
    that pixel, and the gradient reaches the path over the image."""
    torch.manual_seed(0)
    refiner = StrideTwoRefiner(fine_dim=8, mask_dim=12, num_groups=4)
    refiner.reset_parameters()
    image = torch.randn(2, 3, 64, 96)
    mask_features = torch.randn(2, 12, 16, 24)
    with torch.no_grad():
        refined = refiner(mask_features, refiner.read_image(image))
        assert refined.shape == (2, 12, 32, 48)
        image2 = image.clone()
        image2[0, :, 40, 60] += 5.0  # stride-2 cell (20, 30)
        changed = (refiner(mask_features, refiner.read_image(image2)) - refined).abs().amax(1)  # (2, 32, 48)
    assert changed[0, 20, 30] > 1e-3
    row, col = divmod(int(changed[0].argmax()), 48)
    assert abs(row - 20) <= 2 and abs(col - 30) <= 2  # within the three 3x3 convs' reach
    # Two 3x3 convs at stride 2 after a strided one: nothing moves 4 cells away, nor in image 1
    # (GroupNorm normalises each image over the whole map, so a tiny global shift remains).
    peak = changed.max()
    assert changed[0, :, :25].max() < 1e-2 * peak and changed[0, :15].max() < 1e-2 * peak
    assert changed[1].max() < 1e-2 * peak
    refiner(mask_features, refiner.read_image(image)).square().mean().backward()
    assert refiner.image_path[0].weight.grad.abs().sum() > 0


def test_refiner_layers_are_made_between_the_fpn_layers_and_their_initialisation():
    """build_pixel_decoder makes the refiner inside the pixel decoder's construction: the pixel
    decoder's FPN convs then start from other values than without it (the draws in between),
    and the same seed gives the same refiner twice."""
    cfg = get_preset("toy")
    channels, strides = {"res2": 16, "res3": 32, "res4": 64, "res5": 128}, {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    torch.manual_seed(0)
    plain, none = build_pixel_decoder(apply_overrides(get_preset("toy"), ["extensions.fine_dim=0"]), channels, strides)
    torch.manual_seed(0)
    decoder, refiner = build_pixel_decoder(cfg, channels, strides)
    torch.manual_seed(0)
    _, again = build_pixel_decoder(cfg, channels, strides)
    assert none is None and isinstance(plain, MSDeformAttnPixelDecoder) and isinstance(refiner, StrideTwoRefiner)
    assert torch.equal(plain.input_proj[0][0].weight, decoder.input_proj[0][0].weight)  # made before the hook
    assert not torch.equal(plain.mask_features.weight, decoder.mask_features.weight)  # initialised after it
    assert all(torch.equal(a, b) for a, b in zip(refiner.state_dict().values(), again.state_dict().values()))
    assert not any(n.startswith(("image_path", "fine_")) for n, _ in decoder.named_parameters())


def tiny_toy_model(**ext):
    cfg = get_preset("toy")
    cfg.extensions = ExtensionsConfig(**ext)
    torch.manual_seed(0)
    clip = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
                context_length=24, vocab_size=49408, transformer_width=32, transformer_heads=2, transformer_layers=1)
    return cfg, build_freeseg(cfg, clip, default_tokenizer())


def test_extensions_off_give_the_paper_modules():
    _, model = tiny_toy_model()
    assert type(model.decoder) is MaskedTransformerDecoder and model.mask_refiner is None
    _, model = tiny_toy_model(coord_values=True)
    assert type(model.decoder) is PositionalMaskDecoder and model.decoder.coord_embed is None


def test_old_checkpoint_layout_loads():
    """A checkpoint written with `fine_dim` and the coord flags in the model's sections and the
    refiner's weights under the pixel decoder: its config reads into `extensions`, its weights
    load into the model that config builds, and the model computes the same as before."""
    cfg, model = tiny_toy_model(coord_masks=True, coord_values=True, fine_dim=8)
    old_config = to_dict(cfg)
    del old_config["extensions"]
    old_config["model"]["decoder"].update(coord_masks=True, coord_values=True)
    old_config["model"]["pixel_decoder"]["fine_dim"] = 8
    old_state = {}
    for key, value in model.state_dict().items():
        for old, new in RENAMED_KEYS.items():
            if key.startswith(new):
                key = old + key[len(new):]
        old_state[key] = value.clone() + 0.01  # other values than the fresh model's
    assert any(k.startswith("pixel_decoder.fine_lateral.") for k in old_state)
    read = from_dict(old_config)
    assert read.extensions == ExtensionsConfig(coord_masks=True, coord_values=True, fine_dim=8)
    assert not hasattr(read.model.decoder, "coord_masks") and not hasattr(read.model.pixel_decoder, "fine_dim")
    _, fresh = tiny_toy_model(**vars(read.extensions))
    fresh.load_state_dict(old_state)  # strict
    assert torch.equal(fresh.mask_refiner.lateral[0].weight, old_state["pixel_decoder.fine_lateral.0.weight"])
    # The config of the new layout round-trips unchanged.
    assert from_dict(to_dict(read)) == read


def test_from_dict_does_not_change_its_input():
    data = to_dict(get_preset("toy"))
    del data["extensions"]
    data["model"]["pixel_decoder"]["fine_dim"] = 32
    from_dict(data)
    assert data["model"]["pixel_decoder"]["fine_dim"] == 32 and "extensions" not in data


@pytest.mark.parametrize("task", ["semantic", "panoptic"])
def test_stride_two_masks_in_the_model(task):
    _, model = tiny_toy_model(fine_dim=8)
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 64) * 255, ["sky", "grass"], task)
    assert out["pred_masks"].shape[-2:] == (32, 32)
    _, model = tiny_toy_model()
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 64) * 255, ["sky", "grass"], task)
    assert out["pred_masks"].shape[-2:] == (16, 16)


def test_old_inference_and_training_keys_read_into_extensions():
    """A toy checkpoint's config with the inference extensions under `inference` and
    `semantic_targets` under `train` (before they moved) reads into `extensions`, values kept;
    a command-line override of an old key names its new place."""
    from freeseg.config import MOVED_KEYS, ConfigKeyError

    toy = get_preset("toy")
    old_config = to_dict(toy)
    moved = {old: new for old, new in MOVED_KEYS.items()
             if old.startswith(("inference.", "train.")) and new.startswith("extensions.")}
    assert len(moved) == 6
    for old, new in moved.items():
        section, name = old.split(".")
        old_config[section][name] = old_config["extensions"].pop(new.split(".")[1])
    assert old_config["inference"]["unclaimed_min_area"] == 0.01
    assert old_config["train"]["semantic_targets"] == "segments"
    assert from_dict(old_config) == toy
    with pytest.raises(ConfigKeyError, match="'inference.clip_flip' is now 'extensions.clip_flip'"):
        apply_overrides(get_preset("toy"), ["inference.clip_flip=false"])


def test_inference_extensions_may_change_after_training_and_are_checked():
    from freeseg.config import ConfigError
    from freeseg.evaluation.runner import apply_inference_overrides

    cfg = get_preset("toy")
    apply_inference_overrides(cfg, ["extensions.clip_flip=false", "extensions.unclaimed_min_area=0"])
    assert not cfg.extensions.clip_flip and cfg.extensions.unclaimed_min_area == 0
    with pytest.raises(ConfigError, match="can change after training"):
        apply_inference_overrides(cfg, ["extensions.fine_dim=0"])
    with pytest.raises(ConfigError, match="extensions.clip_erode=1: must be 0 unless extensions.clip_largest_part"):
        apply_inference_overrides(cfg, ["extensions.clip_largest_part=false"])
