"""The prompt stage's random resized crop (official mask_former_binary_semantic mapper and
RandomResizedCrop, mask2former/data/augmentations.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freeseg.crops import CROP_RATIO, CROP_SCALE, random_resized_masked_crop, random_resized_window


def test_windows_cover_the_official_range_of_areas_and_shapes():
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(2000):
        x, y, w, h = random_resized_window(240, 240, rng)
        assert 0 <= x and x + w <= 240 and 0 <= y and y + h <= 240
        fractions.append(w * h / 240**2)
        ratios.append(w / h)
    # Rounding w and h to whole pixels moves the area and the ratio by about 1%.
    assert CROP_SCALE[0] * 0.97 <= min(fractions) < 0.1 and max(fractions) > 0.9
    assert CROP_RATIO[0] * 0.97 <= min(ratios) < 0.8 and 1.25 < max(ratios) <= CROP_RATIO[1] * 1.03
    # log-uniform aspect ratio: as many wide windows as tall ones.
    assert abs(np.mean(np.log(ratios))) < 0.02


def test_window_falls_back_to_a_central_crop_of_allowed_shape():
    # A 1 x 100 strip: no window of ratio 3/4..4/3 fits at any scale; the fallback is the
    # central window of ratio 4/3 (height 1, width round(4/3) = 1).
    assert random_resized_window(1, 100, np.random.default_rng(0)) == (49, 0, 1, 1)
    assert random_resized_window(100, 1, np.random.default_rng(0)) == (0, 49, 1, 1)  # 3/4 of a pixel rounds to 1


def test_crop_keeps_the_segment_fills_outside_and_flips():
    """Crops of a red square on a blue image: every crop shows red where its mask is (the fill
    elsewhere), the window scale varies, and the crop is mirrored about half of the time."""
    image = torch.zeros(3, 60, 80)
    image[2] = 200.0
    mask = torch.zeros(60, 80, dtype=torch.bool)
    mask[10:40, 20:50] = True
    mask[10:40, 20:30] &= torch.arange(10)[None, :] < 5  # the left edge: a notch, so flips show
    image[:, mask] = torch.tensor([230.0, 10, 10])[:, None]
    fill = (1.0, 2.0, 3.0)
    left_heavy, red_fractions = 0, []
    for seed in range(200):
        crop = random_resized_masked_crop(image, mask, 16, 1.0, fill, np.random.default_rng(seed))
        assert crop.shape == (3, 16, 16)
        filled = (crop == torch.tensor(fill).view(3, 1, 1)).all(0)
        assert (~filled).any(), "the window always keeps some of the segment"
        assert (crop[0][~filled] > 100).all()  # inside the mask: the red square (blurred edges aside)
        red_fractions.append((~filled).float().mean().item())
        left_heavy += int((~filled)[:, :8].sum() > (~filled)[:, 8:].sum())
    assert 60 < left_heavy < 140
    assert min(red_fractions) < 0.9 < max(red_fractions)


def test_crop_of_a_whole_window_is_the_resized_box():
    """When the drawn window is the whole box (forced by a 1-pixel-high box: the fallback), the
    crop is the box resized bilinearly with antialiasing."""
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).view(3, 20, 30)
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[5, 3:27] = True  # a 1 x 24 box: the fallback window is its central 1 x 1
    rng = np.random.default_rng(1)
    crop = random_resized_masked_crop(image, mask, 8, 1.0, (0.0, 0.0, 0.0), rng)
    x, y, w, h = random_resized_window(1, 24, np.random.default_rng(1))
    assert (w, h) == (1, 1)
    want = F.interpolate(image[None, :, 5:6, 3 + x:4 + x], size=(8, 8), mode="bilinear", antialias=True)[0]
    assert torch.allclose(crop, want) or torch.allclose(crop, want.flip(-1))


def test_crop_rejects_an_empty_mask():
    with pytest.raises(ValueError, match="empty"):
        random_resized_masked_crop(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.bool), 4, 1.0, (0, 0, 0),
                                   np.random.default_rng(0))
    assert math.isclose(CROP_RATIO[0] * CROP_RATIO[1], 1.0)
