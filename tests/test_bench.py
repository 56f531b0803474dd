"""The inference benchmark's arithmetic: CLIP's FLOPs per crop against torch's FLOP counter."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from freeseg.bench_infer import vit_gflop_per_crop
from freeseg.clip import CLIP


def test_vit_gflop_per_crop_agrees_with_torchs_flop_counter():
    torch.manual_seed(0)
    clip = CLIP(512, 224, 2, 768, 16, 77, 49408, 512, 8, 2)  # ViT-B/16's shape, 2 layers of 12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        clip.encode_image(torch.zeros(1, 3, 224, 224))
    # The counter counts the products and the convolution, not CPU attention: add that by hand.
    tokens, width = (224 // 16) ** 2 + 1, 768
    attention = 2 * 4 * tokens ** 2 * width
    assert abs(vit_gflop_per_crop(clip.visual) - (counter.get_total_flops() + attention) / 1e9) < 1e-9
    twelve = CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 1)
    assert round(vit_gflop_per_crop(twelve.visual), 2) == 35.13  # ViT-B/16 at 224: 17.6 G multiply-adds
