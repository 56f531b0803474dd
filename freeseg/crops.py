"""Cutting a segment out of an image for CLIP: the crop of FreeSeg's region classifier and of its
prompt stage.

Region crop, as the official code does it (bytedance/FreeSeg,
mask2former/modeling/clip_adapter/adapter.py `MaskFormerClipAdapter._preprocess_image` and
clip_adapter/clip.py `mask2box`, `expand_box`, `crop_with_mask`):
  1. tight box (x1, y1, x2 + 1, y2 + 1) of the binary mask, grown about its centre by
     `expand_ratio` (official MASK_EXPAND_RATIO 1.0), coordinates truncated to int, then clipped
     to the image;
  2. pixels of the box outside the mask are set to the fill colour (CLIP's mean colour for
     MASK_FILL "mean", so they become zero after CLIP's normalisation);
  3. bicubic resize to CLIP's input resolution with align_corners=True.
The official code normalises before resizing; normalisation is a per-channel affine map and
bicubic weights sum to one, so the order does not matter and we resize first (crops in 0-255).

This module depends on torch alone, so the data pipeline (freeseg/data) and the model
(freeseg/modeling) both use it without depending on each other.
"""

import torch
import torch.nn.functional as F


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks: masks (N, H, W) bool -> (N, 4) long (x1, y1, x2, y2), x2/y2
    exclusive (detectron2's BitMasks convention). Empty masks give (0, 0, 0, 0)."""
    N, H, W = masks.shape
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    x = torch.arange(W, device=masks.device)
    y = torch.arange(H, device=masks.device)
    # First/last occupied column: max over x where occupied (and over -x for the minimum).
    x1 = torch.where(cols, W - x, 0).amax(dim=1)
    x2 = torch.where(cols, x + 1, 0).amax(dim=1)
    y1 = torch.where(rows, H - y, 0).amax(dim=1)
    y2 = torch.where(rows, y + 1, 0).amax(dim=1)
    empty = ~cols.any(dim=1)
    boxes = torch.stack([W - x1, H - y1, x2, y2], dim=1)  # (N, 4)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


def expand_boxes(boxes: torch.Tensor, expand_ratio: float, height: int, width: int) -> torch.Tensor:
    """Grow boxes (N, 4) about their centre by `expand_ratio`, truncate to int (as the official
    `expand_box` does with `int()`, i.e. towards zero), clip to the image. -> (N, 4) long."""
    b = boxes.double()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    half_w, half_h = (b[:, 2] - b[:, 0]) * expand_ratio / 2, (b[:, 3] - b[:, 1]) * expand_ratio / 2
    grown = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1).trunc().long()
    limits = torch.tensor([width, height, width, height], device=boxes.device)
    return torch.minimum(grown.clamp(min=0), limits)


def crop_masked_regions(image: torch.Tensor, masks: torch.Tensor, size: int, expand_ratio: float,
                        fill: tuple[float, float, float] | torch.Tensor) -> torch.Tensor:
    """Cut each mask's region out of the image for CLIP.

    image (3, H, W) float 0-255; masks (N, H, W) bool, none empty; fill (3,) 0-255 colour of the
    pixels outside the mask -> crops (N, 3, size, size) float 0-255 (bicubic, so values may
    overshoot 0-255 slightly, as in the official code).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"crop_masked_regions: image must be (3, H, W), got {tuple(image.shape)}")
    if masks.dim() != 3 or masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"crop_masked_regions: masks must be (N, {image.shape[1]}, {image.shape[2]}), "
                         f"got {tuple(masks.shape)}")
    masks = masks.bool()
    image = image.float()
    N, H, W = masks.shape
    if N == 0:
        return image.new_zeros(0, 3, size, size)
    empty = ~masks.flatten(1).any(dim=1)
    if empty.any():
        raise ValueError(f"crop_masked_regions: masks {empty.nonzero().flatten().tolist()} are empty")
    fill = torch.as_tensor(fill, dtype=image.dtype, device=image.device).view(3, 1, 1)
    boxes = expand_boxes(mask_boxes(masks), expand_ratio, H, W).tolist()
    crops = []
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        # A box can collapse to zero width only if expand_ratio shrinks it below one pixel.
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        region = torch.where(mask[y1:y2, x1:x2], image[:, y1:y2, x1:x2], fill)  # (3, h, w)
        crops.append(F.interpolate(region[None], size=(size, size), mode="bicubic", align_corners=True))
    return torch.cat(crops)  # (N, 3, size, size)
