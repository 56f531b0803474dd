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

The prompt stage cuts its training segments differently (`random_resized_masked_crop`, official
mask2former/data/dataset_mappers/mask_former_binary_semantic_dataset_mapper.py and
augmentations.py): a random resized crop of the segment's box, flipped, resized bilinearly.
Deliberate differences there: the crop is square at CLIP's input resolution (the official
MIN_SIZE_TRAIN (224, 244) gives crops 244 high and 224 wide, which its CLIP takes by
interpolating its position embeddings); the grown box may reach the image's last row and column
(the official `expand_box` clips it one pixel short); torch's antialiased bilinear resize stands
in for PIL's.

This module depends on torch and numpy alone, so the data pipeline (freeseg/data) and the model
(freeseg/modeling) both use it without depending on each other.
"""

import math

import numpy as np
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


# The prompt stage's random resized crop: the official RandomResizedCrop's defaults
# (mask2former/data/augmentations.py, as torchvision's): a window covering 8% to 100% of the
# segment's box, with aspect ratio w / h between 3/4 and 4/3.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_window(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A window (x, y, w, h) of a (height, width) area, drawn as the official RandomResizedCrop
    does: up to 10 tries of an area fraction in CROP_SCALE and a log-uniform aspect ratio in
    CROP_RATIO; if none fits, the largest central window whose aspect ratio lies in CROP_RATIO."""
    area = height * width
    log_ratio = np.log(np.array(CROP_RATIO))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_masked_crop(image: torch.Tensor, mask: torch.Tensor, size: int, expand_ratio: float,
                               fill: tuple[float, float, float] | torch.Tensor, rng: np.random.Generator
                               ) -> torch.Tensor:
    """The prompt stage's crop of one segment (official mask_former_binary_semantic mapper):
    image (3, H, W) float 0-255, mask (H, W) bool, not empty -> (3, size, size) float 0-255.

    The mask's box grown by `expand_ratio` (`expand_boxes`), a random window of it
    (`random_resized_window`) resized to size x size (image bilinear with antialiasing, like
    PIL's resize the official code calls; mask nearest), flipped left-right with probability
    0.5, and `fill` outside the mask. A window that misses the segment is drawn again (up to
    10 times, then the whole box): the official mapper drops such a sample and its loader draws
    another one.
    """
    if not mask.any():
        raise ValueError("random_resized_masked_crop: the mask is empty")
    H, W = mask.shape
    x1, y1, x2, y2 = expand_boxes(mask_boxes(mask[None]), expand_ratio, H, W)[0].tolist()
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    box_image, box_mask = image[:, y1:y2, x1:x2].float(), mask[y1:y2, x1:x2]
    for _ in range(10):
        x, y, w, h = random_resized_window(y2 - y1, x2 - x1, rng)
        small = F.interpolate(box_mask[None, None, y:y + h, x:x + w].float(), size=(size, size),
                              mode="nearest-exact")[0, 0] > 0.5  # (size, size)
        if small.any():
            break
    else:
        x, y, w, h = 0, 0, x2 - x1, y2 - y1
        small = F.interpolate(box_mask[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0] > 0.5
    crop = F.interpolate(box_image[None, :, y:y + h, x:x + w], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)[0]  # (3, size, size)
    if rng.random() < 0.5:
        crop, small = crop.flip(-1), small.flip(-1)
    fill = torch.as_tensor(fill, dtype=crop.dtype, device=crop.device).view(3, 1, 1)
    return torch.where(small, crop, fill)
