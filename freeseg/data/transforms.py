"""Training and test augmentation on sample dicts (the official Mask2Former/FreeSeg recipes).

A *sample* is the dict every segmentation dataset returns (see `freeseg/data/datasets.py`):
image uint8 (3, H, W), sem_seg int64 (H, W) with 255 = ignore, masks bool (N, H, W), and the
per-segment vectors labels (N,), isthing (N,). Each transform is a callable
`t(sample, rng) -> new sample` that moves image, sem_seg and masks together: the image is
resampled bilinearly, label maps and masks with nearest neighbour (never blended), and
segments that a crop leaves empty are dropped with their labels. `rng` is a numpy Generator or
a torch Generator; the same generator state gives the same output.

Recipes (the paper, section 4.1, defers to Mask2Former; numbers from the official configs):
- `lsj`: large-scale jitter, Mask2Former's COCO "new baseline" (`build_transform_gen` in
  coco_full_task_new_baseline_dataset_mapper.py): horizontal flip, `ResizeScale` of the target
  box by a factor in [0.1, 2.0], `FixedSizeCrop` to 640 x 640 padded at the right/bottom
  (detectron2 pads the image with 128; the padding is ignore / no segment).
- `semantic`: Mask2Former's semantic mapper (mask_former_semantic_dataset_mapper.py):
  `ResizeShortestEdge` to a short side drawn from a list, `RandomCropCategoryArea`, SSD
  photometric distortion, flip, and padding to the crop size (SIZE_DIVISIBILITY = crop size,
  image 128, labels 255). Official ADE20K: short sides int(x * 0.1 * 512) for x in 5..20
  (0.5x to 2.0x the crop), max long side 2048 (4x), crop 512, single-category max area 1.0.
- test: `TestResize` of the short side (MIN_SIZE_TEST), long side at most 4x that
  (MAX_SIZE_TEST 2560 for 640, 2048 for 512).
- prompt stage: `PromptCrop` cuts one segment out for CLIP (`DataConfig.prompt_crop`).

Deliberate differences from the official code:
- The official COCO all-task mapper ("coco_full_lsj") builds the LSJ list but then hands the
  *semantic* list to the mapper (`"tfm_gens": augs` in its `from_config`), so the released
  COCO models were trained with ResizeShortestEdge(320..960, max 2560) + 640 crop + colour
  jitter + flip, not LSJ. We implement both; `DataConfig.augmentation` chooses.
- Photometric distortion works in float HSV without OpenCV and rounds to uint8 once at the end
  (OpenCV's version rounds to uint8 HSV after every step).
- The semantic recipe derives its short sides from `DataConfig.min_scale/max_scale` (steps of
  0.1 x `short_side_base`, the crop size unless set) instead of a separate list field.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from freeseg.config import DataConfig
from freeseg.crops import crop_masked_regions, random_resized_masked_crop

Sample = dict[str, Any]
Rng = np.random.Generator | torch.Generator

IGNORE = 255
PAD_PIXEL = 128  # detectron2 FixedSizeCrop pad_value and the semantic mapper's F.pad value
# Per-segment vectors that follow `masks` when a segment is dropped.
SEGMENT_KEYS = ("labels", "isthing", "iscrowd", "segment_ids")


def as_numpy_rng(rng: Rng) -> np.random.Generator:
    """A numpy Generator for `rng`; a torch Generator seeds one (and advances by one draw)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))
    raise TypeError(f"rng must be a numpy or torch Generator, got {type(rng).__name__}")


# --------------------------------------------------------------------------- geometry helpers


def _nearest_index(out_len: int, in_len: int) -> torch.Tensor:
    """Source index of each output pixel, sampling at pixel centres (PIL NEAREST, 'nearest-exact')."""
    scale = in_len / out_len
    idx = torch.floor((torch.arange(out_len, dtype=torch.float64) + 0.5) * scale).long()
    return idx.clamp_(0, in_len - 1)


def _resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of the last two axes of any dtype (labels stay labels, no blending)."""
    iy = _nearest_index(size[0], x.shape[-2])
    ix = _nearest_index(size[1], x.shape[-1])
    return x.index_select(-2, iy).index_select(-1, ix)


def _resize_image(image: torch.Tensor, size: tuple[int, int], interp: str) -> torch.Tensor:
    if interp == "nearest":
        return _resize_nearest(image, size)
    # antialias=True low-pass filters when shrinking, like PIL's BILINEAR in detectron2.
    out = F.interpolate(image[None].float(), size=size, mode=interp, align_corners=False, antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)  # (3, H, W)


def _drop_empty(sample: Sample) -> Sample:
    """Remove segments with no pixel left, and their per-segment vectors."""
    if "masks" not in sample or len(sample["masks"]) == 0:
        return sample
    keep = sample["masks"].flatten(1).any(1)  # (N,)
    if bool(keep.all()):
        return sample
    out = dict(sample)
    for key in ("masks", *SEGMENT_KEYS):
        if key in sample:
            out[key] = sample[key][keep]
    return out


def resize(sample: Sample, size: tuple[int, int], interp: str = "bilinear") -> Sample:
    """Resize image (bilinear or bicubic; "nearest" for exact tests) and label maps (nearest).

    Segments that vanish (thinner than an output pixel) are dropped.
    """
    out = dict(sample)
    out["image"] = _resize_image(sample["image"], size, interp)
    if "sem_seg" in sample:
        out["sem_seg"] = _resize_nearest(sample["sem_seg"], size)
    if "masks" in sample:
        out["masks"] = _resize_nearest(sample["masks"], size)  # (N, H, W)
    return _drop_empty(out)  # shrinking can erase a segment thinner than a pixel


def crop(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop a window lying inside the image; segments left empty are dropped."""
    out = dict(sample)
    window = (slice(top, top + height), slice(left, left + width))
    out["image"] = sample["image"][(slice(None), *window)]
    if "sem_seg" in sample:
        out["sem_seg"] = sample["sem_seg"][window]
    if "masks" in sample:
        out["masks"] = sample["masks"][(slice(None), *window)]
    return _drop_empty(out)


def pad_to(sample: Sample, height: int, width: int, pad_value: int = PAD_PIXEL, ignore: int = IGNORE) -> Sample:
    """Pad at the bottom and right up to (height, width): image pad_value, labels ignore, masks False."""
    h, w = sample["image"].shape[-2:]
    ph, pw = max(height - h, 0), max(width - w, 0)
    if ph == 0 and pw == 0:
        return sample
    out = dict(sample)
    out["image"] = F.pad(sample["image"], (0, pw, 0, ph), value=pad_value)
    if "sem_seg" in sample:
        out["sem_seg"] = F.pad(sample["sem_seg"], (0, pw, 0, ph), value=ignore)
    if "masks" in sample:
        masks = sample["masks"].new_zeros((sample["masks"].shape[0], h + ph, w + pw))
        masks[:, :h, :w] = sample["masks"]
        out["masks"] = masks
    return out


def hflip(sample: Sample) -> Sample:
    out = dict(sample)
    for key in ("image", "sem_seg", "masks"):
        if key in sample:
            out[key] = sample[key].flip(-1)
    return out


# --------------------------------------------------------------------------- transforms


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: Rng) -> Sample:
        gen = as_numpy_rng(rng)
        for t in self.transforms:
            sample = t(sample, gen)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomFlip:
    """Horizontal flip with probability `prob` (detectron2 RandomFlip default 0.5)."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, sample: Sample, rng: Rng) -> Sample:
        return hflip(sample) if as_numpy_rng(rng).random() < self.prob else sample


class ResizeScale:
    """Fit the image inside a (target x s) square box, s ~ U(min_scale, max_scale), aspect kept."""

    def __init__(self, min_scale: float, max_scale: float, target: int, interp: str = "bilinear") -> None:
        self.min_scale, self.max_scale, self.target, self.interp = min_scale, max_scale, target, interp

    def __call__(self, sample: Sample, rng: Rng) -> Sample:
        h, w = sample["image"].shape[-2:]
        s = as_numpy_rng(rng).uniform(self.min_scale, self.max_scale)
        factor = min(self.target * s / h, self.target * s / w)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        return resize(sample, size, self.interp)


class FixedSizeCrop:
    """Random `size` x `size` crop of a larger image, then padding of a smaller one to that size.

    Like detectron2's FixedSizeCrop, one uniform fraction places the window on both axes.
    """

    def __init__(self, size: int, pad_value: int = PAD_PIXEL, ignore: int = IGNORE) -> None:
        self.size, self.pad_value, self.ignore = size, pad_value, ignore

    def __call__(self, sample: Sample, rng: Rng) -> Sample:
        h, w = sample["image"].shape[-2:]
        frac = as_numpy_rng(rng).uniform(0.0, 1.0)
        top, left = round(max(h - self.size, 0) * frac), round(max(w - self.size, 0) * frac)
        sample = crop(sample, top, left, min(h, self.size), min(w, self.size))
        return pad_to(sample, self.size, self.size, self.pad_value, self.ignore)


class ResizeShortestEdge:
    """Short side drawn from `short_sides`, then shrunk so the long side is at most `max_size`."""

    def __init__(self, short_sides: Sequence[int], max_size: int, interp: str = "bilinear") -> None:
        self.short_sides, self.max_size, self.interp = list(short_sides), max_size, interp

    def output_size(self, h: int, w: int, short: int) -> tuple[int, int]:
        scale = short / min(h, w)
        if max(h, w) * scale > self.max_size:  # the long side would exceed max_size: shrink more
            scale = self.max_size / max(h, w)
        # int(x + 0.5) rounding as detectron2's ResizeShortestEdge.
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def __call__(self, sample: Sample, rng: Rng) -> Sample:
        short = self.short_sides[int(as_numpy_rng(rng).integers(len(self.short_sides)))]
        return resize(sample, self.output_size(*sample["image"].shape[-2:], short), self.interp)


class TestResize(ResizeShortestEdge):
    """Deterministic test-time resize of the short side (MIN_SIZE_TEST); rng is not used."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, short_side: int, max_size: int | None = None, interp: str = "bilinear") -> None:
        # Official configs: MAX_SIZE_TEST = 4 x MIN_SIZE_TEST (2560 for 640, 2048 for 512).
        super().__init__([short_side], max_size or 4 * short_side, interp)

    def __call__(self, sample: Sample, rng: Rng | None = None) -> Sample:
        return resize(sample, self.output_size(*sample["image"].shape[-2:], self.short_sides[0]), self.interp)


class RandomCropCategoryArea:
    """Random crop (at most size x size) in which no category covers too much of the labels.

    detectron2's RandomCrop_CategoryAreaConstraint: up to 10 windows are drawn; a window is
    accepted when it holds more than one non-ignored category and the largest one covers less
    than `single_category_max_area` of the non-ignored pixels; otherwise the last window is
    used. With the official value 1.0 the rule is off and one window is drawn.
    """

    def __init__(self, size: int, single_category_max_area: float = 1.0, ignore: int = IGNORE, tries: int = 10) -> None:
        self.size, self.max_area, self.ignore, self.tries = size, single_category_max_area, ignore, tries

    def accepts(self, labels: torch.Tensor) -> bool:
        counts = torch.bincount(labels.flatten()[labels.flatten() != self.ignore])
        counts = counts[counts > 0]
        return len(counts) > 1 and int(counts.max()) < self.max_area * int(counts.sum())

    def __call__(self, sample: Sample, rng: Rng) -> Sample:
        gen = as_numpy_rng(rng)
        h, w = sample["image"].shape[-2:]
        ch, cw = min(h, self.size), min(w, self.size)
        for _ in range(1 if self.max_area >= 1.0 else self.tries):
            top, left = int(gen.integers(h - ch + 1)), int(gen.integers(w - cw + 1))
            if self.max_area >= 1.0 or self.accepts(sample["sem_seg"][top : top + ch, left : left + cw]):
                break
        return crop(sample, top, left, ch, cw)


class PadTo:
    """Pad to size x size (the semantic mapper pads every crop to SIZE_DIVISIBILITY = crop size)."""

    def __init__(self, size: int, pad_value: int = PAD_PIXEL, ignore: int = IGNORE) -> None:
        self.size, self.pad_value, self.ignore = size, pad_value, ignore

    def __call__(self, sample: Sample, rng: Rng | None = None) -> Sample:
        return pad_to(sample, self.size, self.size, self.pad_value, self.ignore)


# --------------------------------------------------------------------------- photometric


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float RGB in [0, 255] -> (3, H, W) HSV with h in [0, 1), s in [0, 1], v in [0, 255]."""
    r, g, b = rgb
    v, _ = rgb.max(0)
    c = v - rgb.min(0).values  # chroma
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    # Hue in sixths of a turn, by which channel is the largest (the standard hexcone model).
    h = torch.where(v == r, ((g - b) / safe_c) % 6, torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([h, s, v])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv
    h6 = (h % 1.0) * 6
    sector = h6.floor().long() % 6
    f = h6 - h6.floor()
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # (R, G, B) for each of the six hue sectors.
    table = torch.stack([torch.stack(c) for c in [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
    return table.gather(0, sector[None, None].expand(1, 3, *sector.shape))[0]  # (3, H, W)


def scale_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply HSV saturation by `factor` (clipped at 1) keeping hue and value, in closed form.

    In the hexcone model every channel is x = V (1 - S k) with k set by the hue alone, so
    scaling S by a moves each channel away from V: x' = V - (V - x) min(a, 1 / S). This equals
    the RGB -> HSV -> RGB round trip and is ten times cheaper.
    """
    v = img.max(0, keepdim=True).values  # (1, H, W)
    s = (v - img.min(0, keepdim=True).values) / v.clamp(min=1e-6)
    gain = torch.minimum(torch.full_like(s, factor), 1 / s.clamp(min=1e-6))
    return v - (v - img) * gain  # (3, H, W)


class PhotometricDistort:
    """SSD colour jitter (detectron2 ColorAugSSDTransform, used with COLOR_AUG_SSD: True).

    Each step happens with probability 1/2: brightness + U(-32, 32); then either
    [contrast, saturation, hue] or [saturation, hue, contrast] (a fair coin picks the order);
    contrast multiplies by U(0.5, 1.5), saturation scales HSV's S by U(0.5, 1.5), hue shifts by
    U(-18, 18) OpenCV units (2 degrees each, so up to 36 degrees). Pixel-wise: label maps and
    masks are untouched, and equal input colours give equal output colours.
    """

    def __init__(self, brightness_delta: float = 32, contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), hue_delta: float = 18) -> None:
        self.brightness_delta, self.contrast, self.saturation, self.hue_delta = (
            brightness_delta, contrast, saturation, hue_delta)

    def __call__(self, sample: Sample, rng: Rng) -> Sample:
        gen = as_numpy_rng(rng)
        img = sample["image"].float()  # (3, H, W)
        if gen.random() < 0.5:
            img = (img + gen.uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 255)
        steps = [self._contrast, self._saturation, self._hue]
        if gen.random() < 0.5:
            steps = [self._saturation, self._hue, self._contrast]
        for step in steps:
            if gen.random() < 0.5:
                img = step(img, gen)
        out = dict(sample)
        out["image"] = img.round().clamp(0, 255).to(torch.uint8)
        return out

    def _contrast(self, img: torch.Tensor, gen: np.random.Generator) -> torch.Tensor:
        return (img * gen.uniform(*self.contrast)).clamp(0, 255)

    def _saturation(self, img: torch.Tensor, gen: np.random.Generator) -> torch.Tensor:
        return scale_saturation(img, gen.uniform(*self.saturation))

    def _hue(self, img: torch.Tensor, gen: np.random.Generator) -> torch.Tensor:
        hsv = _rgb_to_hsv(img)
        hsv[0] = (hsv[0] + gen.uniform(-self.hue_delta, self.hue_delta) / 180) % 1.0  # OpenCV H spans 180
        return _hsv_to_rgb(hsv)


# --------------------------------------------------------------------------- recipes


def lsj(size: int, min_scale: float, max_scale: float, interp: str = "bilinear") -> Compose:
    """Large-scale jitter (Mask2Former COCO new baseline): flip, ResizeScale, FixedSizeCrop."""
    return Compose([RandomFlip(), ResizeScale(min_scale, max_scale, size, interp), FixedSizeCrop(size)])


def semantic_train(size: int, short_sides: Sequence[int], max_size: int, single_category_max_area: float = 1.0,
                   color: bool = True, interp: str = "bilinear") -> Compose:
    """Mask2Former semantic mapper: resize, category-area crop, colour jitter, flip, pad."""
    steps: list[Any] = [ResizeShortestEdge(short_sides, max_size, interp),
                        RandomCropCategoryArea(size, single_category_max_area)]
    if color:
        steps.append(PhotometricDistort())
    return Compose([*steps, RandomFlip(), PadTo(size)])


def semantic_short_sides(size: int, min_scale: float, max_scale: float) -> list[int]:
    """Short sides int(x * 0.1 * size) for x from 10*min_scale to 10*max_scale (official lists)."""
    lo, hi = round(min_scale * 10), round(max_scale * 10)
    return [int(x * 0.1 * size) for x in range(lo, hi + 1)]


def build_transforms(cfg: DataConfig, train: bool) -> Compose | TestResize:
    """The training recipe named by `cfg.augmentation` ("lsj" or "semantic"), or the test resize."""
    if not train:
        return TestResize(cfg.test_short_side)
    if cfg.augmentation == "lsj":
        return lsj(cfg.image_size, cfg.min_scale, cfg.max_scale)
    if cfg.augmentation == "semantic":
        sides = semantic_short_sides(cfg.short_side_base or cfg.image_size, cfg.min_scale, cfg.max_scale)
        # Official: MAX_SIZE_TRAIN = 4 x crop (2048 for 512, 2560 for 640); max area 1.0 in
        # every FreeSeg config, so the crop rule is off unless asked for.
        return semantic_train(cfg.image_size, sides, 4 * cfg.image_size)
    raise ValueError(f"data.augmentation must be 'lsj' or 'semantic', got {cfg.augmentation!r}")


class PromptCrop:
    """A prompt-stage segment `{"image", "mask", "label"}` -> (crop float (3, size, size) 0-255, label).

    recipe "random" (the official prompt stage, freeseg/crops.py `random_resized_masked_crop`):
    outside the mask CLIP's mean colour *in normalised space*, as the official
    ProposalClipClassifier fills after normalising with CLIP's mean instead of zero, i.e. the
    colour 255 * mean * (1 + std) before normalising. recipe "region": the region classifier's
    crop at inference (`crop_masked_regions`, CLIP's mean colour, zero after normalising).
    """

    def __init__(self, recipe: str, size: int, expand_ratio: float) -> None:
        if recipe not in ("random", "region"):
            raise ValueError(f"data.prompt_crop must be 'random' or 'region', got {recipe!r}")
        from freeseg.clip import CLIP_MEAN, CLIP_STD

        self.recipe, self.size, self.expand_ratio = recipe, size, expand_ratio
        if recipe == "random":
            self.fill = tuple(255.0 * m * (1.0 + s) for m, s in zip(CLIP_MEAN, CLIP_STD))
        else:
            self.fill = tuple(255.0 * m for m in CLIP_MEAN)

    def __call__(self, sample: Sample, rng: Rng) -> tuple[torch.Tensor, int]:
        image = sample["image"].float()
        if self.recipe == "random":
            crop = random_resized_masked_crop(image, sample["mask"], self.size, self.expand_ratio, self.fill,
                                              as_numpy_rng(rng))
        else:
            crop = crop_masked_regions(image, sample["mask"][None], self.size, self.expand_ratio, self.fill)[0]
        return crop, sample["label"]
