"""The paper's configuration end to end: the COCO preset at tiny width, every toy extension off."""

import torch

from freeseg.clip import CLIP, default_tokenizer
from freeseg.config import Config, apply_overrides
from freeseg.modeling.freeseg import FreeSeg, build_freeseg
from freeseg.presets import get_preset

# Widths only: depth, stem, layer counts, heads, prompt lengths and every other setting stay the
# COCO preset's (R101c backbone, 6 encoder and 10 decoder layers, 16 + 8 prompt vectors).
TINY_WIDTHS = ["model.backbone.width=8", "model.pixel_decoder.conv_dim=32", "model.pixel_decoder.mask_dim=32",
               "model.pixel_decoder.ffn_dim=64", "model.decoder.hidden_dim=32", "model.decoder.num_queries=10",
               "model.decoder.ffn_dim=64", "model.decoder.class_mlp_hidden=64", "model.interaction.attn_dim=64"]


def tiny_paper_config() -> Config:
    return apply_overrides(get_preset("coco"), TINY_WIDTHS)


def tiny_vit_clip() -> CLIP:
    """A ViT CLIP of OpenAI's layout (patch 16, context 77, OpenAI's vocabulary) at tiny width."""
    return CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2, transformer_layers=1)


def tiny_paper_model(seed: int = 0) -> FreeSeg:
    torch.manual_seed(seed)
    clip = tiny_vit_clip()
    return build_freeseg(tiny_paper_config(), clip, default_tokenizer())
