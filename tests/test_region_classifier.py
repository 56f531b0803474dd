"""Region crops, CLIP region classification and the geometric ensemble (paper eq. 6)."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from freeseg.clip import CLIP, CLIP_MEAN, CLIP_STD
from freeseg.crops import crop_masked_regions, expand_boxes, mask_boxes
from freeseg.extensions import encode_with_mirror, largest_parts
from freeseg.modeling.region_classifier import RegionClassifier, geometric_ensemble

FILL = (10.0, 20.0, 30.0)


def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=32, vision_patch_size=8,
                context_length=16, vocab_size=64, transformer_width=32, transformer_heads=2,
                transformer_layers=1).eval()


def random_image(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(3, 20, 24) * 255


def small_image() -> torch.Tensor:
    return torch.arange(3 * 6 * 6, dtype=torch.float32).view(3, 6, 6)


def test_boxes_by_hand():
    masks = torch.zeros(3, 6, 6, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    masks[1, 5, 0] = True
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[2, 1, 5, 4], [0, 5, 1, 6], [0, 0, 0, 0]]
    # Ratio 2 about centre (3.5, 2.5): x 0.5..6.5 -> 0..6, y -0.5..5.5 -> 0 (truncated to zero)..5.
    assert expand_boxes(boxes[:1], 2.0, 6, 6).tolist() == [[0, 0, 6, 5]]
    # Growing past the border is clipped to the image.
    # x -1..2 -> 0..2, y 4..7 -> 4..6.
    assert expand_boxes(boxes[1:2], 3.0, 6, 6).tolist() == [[0, 4, 2, 6]]


def test_crop_identity_resize_equals_hand_crop():
    image = small_image()
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 1:4, 2:5] = True
    mask[0, 1, 2] = False  # a hole inside the box takes the fill colour
    crop = crop_masked_regions(image, mask, size=3, expand_ratio=1.0, fill=FILL)[0]
    expected = image[:, 1:4, 2:5].clone()
    expected[:, 0, 0] = torch.tensor(FILL)
    torch.testing.assert_close(crop, expected, atol=1e-4, rtol=0)


def test_crop_expanded_and_resized_matches_interpolate():
    image = small_image()
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 1:4, 2:5] = True
    crop = crop_masked_regions(image, mask, size=8, expand_ratio=2.0, fill=FILL)[0]
    region = torch.tensor(FILL).view(3, 1, 1).expand(3, 5, 6).clone()  # expanded box x 0:6, y 0:5
    region[:, 1:4, 2:5] = image[:, 1:4, 2:5]
    expected = F.interpolate(region[None], size=(8, 8), mode="bicubic", align_corners=True)[0]
    torch.testing.assert_close(crop, expected)


def test_crop_rejects_empty_and_bad_shapes():
    image = small_image()
    with pytest.raises(ValueError, match="empty"):
        crop_masked_regions(image, torch.zeros(2, 6, 6, dtype=torch.bool), 4, 1.0, FILL)
    with pytest.raises(ValueError, match="masks must be"):
        crop_masked_regions(image, torch.ones(2, 5, 6, dtype=torch.bool), 4, 1.0, FILL)
    assert crop_masked_regions(image, torch.zeros(0, 6, 6, dtype=torch.bool), 4, 1.0, FILL).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("num_masks", [0, 1, 100])
def test_region_classifier_counts(num_masks):
    clip = tiny_clip()
    torch.manual_seed(1)
    image = torch.rand(3, 20, 24) * 255
    mask_probs = torch.rand(num_masks, 20, 24) ** 4  # some pixels above 0.5 in almost every mask
    if num_masks:
        mask_probs[0] = 0.2  # one empty proposal
    text = F.normalize(torch.randn(5, 16), dim=-1)
    probs = RegionClassifier(clip, mask_threshold=0.5, expand_ratio=1.0, chunk=7)(image, mask_probs, text)
    assert probs.shape == (num_masks, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(num_masks))
    if num_masks:
        torch.testing.assert_close(probs[0], torch.full((5,), 0.2))


def test_region_classifier_matches_direct_clip():
    clip = tiny_clip()
    image = random_image(2)
    mask_probs = torch.zeros(3, 20, 24)
    mask_probs[0, 2:9, 3:15] = 0.9
    mask_probs[1, 10:18, 1:5] = 0.7
    mask_probs[2, 5:6, 20:22] = 0.6
    text = F.normalize(torch.randn(4, 16), dim=-1)
    probs = RegionClassifier(clip, mask_threshold=0.5, expand_ratio=1.0, chunk=2)(image, mask_probs, text)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    crops = crop_masked_regions(image, mask_probs > 0.5, 16, 1.0, mean.flatten())
    with torch.no_grad():
        feats = F.normalize(clip.encode_image((crops - mean) / std), dim=-1)
    torch.testing.assert_close(probs, (clip.logit_scale.exp() * feats @ text.t()).softmax(-1), atol=1e-5, rtol=1e-4)
    # Pixels outside the mask are filled with CLIP's mean, so they are zero once normalised.
    grown = crop_masked_regions(image, mask_probs[2:] > 0.5, 16, 3.0, mean.flatten())
    assert ((grown - mean) / std)[0, :, 0, 0].abs().max() < 1e-4


def test_largest_parts_by_hand():
    masks = torch.zeros(4, 12, 12, dtype=torch.bool)
    masks[0, 0:3, 0:3] = True  # 9 pixels: kept
    masks[0, 8:10, 8:10] = True  # 4 pixels: dropped
    masks[0, 5, 5] = True  # a stray pixel, diagonal neighbours do not connect (4-connectivity)
    masks[0, 6, 6] = True
    # Two blocks joined by a one-pixel bridge: one part until the erosion cuts the bridge.
    masks[1, 1:6, 1:6] = True  # 5x5, eroded by one pixel to its 3x3 middle
    masks[1, 3, 6:8] = True
    masks[1, 2:6, 8:12] = True  # 4x4 at the right border
    masks[2, 4, 1:10] = True  # a line that erosion would empty: taken as it is
    masks[3] = True  # the whole image survives erosion (the border does not erode it)
    out = largest_parts(masks, erode=0)
    expected0 = torch.zeros(12, 12, dtype=torch.bool)
    expected0[0:3, 0:3] = True
    assert torch.equal(out[0], expected0)
    assert torch.equal(out[1], masks[1]) and torch.equal(out[2], masks[2]) and torch.equal(out[3], masks[3])
    out = largest_parts(masks, erode=1)
    # Mask 0: the 3x3 block touches the top-left border, where the outside counts as inside, so
    # its 2x2 corner survives; the 2x2 block and the stray pixels erode away.
    expected0 = torch.zeros(12, 12, dtype=torch.bool)
    expected0[0:2, 0:2] = True
    assert torch.equal(out[0], expected0)
    # Mask 1: the bridge is cut; the 5x5 block's 3x3 middle (9 pixels) beats what is left of the
    # right block (rows 3-4, columns 9-11 up to the border: 6 pixels).
    expected1 = torch.zeros(12, 12, dtype=torch.bool)
    expected1[2:5, 2:5] = True
    assert torch.equal(out[1], expected1)
    assert torch.equal(out[2], masks[2]) and torch.equal(out[3], masks[3])
    assert largest_parts(masks[:0], erode=1).shape == (0, 12, 12)
    with pytest.raises(ValueError, match="erode"):
        largest_parts(masks, erode=-1)


def test_region_classifier_cleanup_and_flip():
    clip = tiny_clip()
    image = random_image(3)
    mask_probs = torch.zeros(2, 20, 24)
    mask_probs[0, 2:9, 3:15] = 0.9
    mask_probs[0, 18:20, 22:24] = 0.9  # a stray corner that stretches the box to the whole image
    mask_probs[1, 10:18, 1:6] = 0.7
    text = F.normalize(torch.randn(4, 16), dim=-1)
    # With largest_parts as its mask preparation, it crops exactly what the cleaned masks crop.
    cleaned = largest_parts(mask_probs > 0.5, erode=1).float()
    prepare = functools.partial(largest_parts, erode=1)
    torch.testing.assert_close(RegionClassifier(clip, 0.5, 1.0, 2, prepare_masks=prepare)(image, mask_probs, text),
                               RegionClassifier(clip, 0.5, 1.0, 2)(image, cleaned, text))
    assert not torch.allclose(RegionClassifier(clip, 0.5, 1.0, 2)(image, mask_probs, text),
                              RegionClassifier(clip, 0.5, 1.0, 2)(image, cleaned, text), atol=1e-3)
    # With flip, the features are the normalised mean of the crop's and its mirror image's, so a
    # mirrored image and masks (integer boxes at expand_ratio 1) give the same features.
    flip = RegionClassifier(clip, 0.5, 1.0, 2, encode=encode_with_mirror)
    plain = RegionClassifier(clip, 0.5, 1.0, 2)
    f, valid = flip.encode_regions(image, mask_probs)
    f_mirror, _ = flip.encode_regions(image.flip(-1), mask_probs.flip(-1))
    torch.testing.assert_close(f, f_mirror, atol=1e-5, rtol=1e-4)
    g, _ = plain.encode_regions(image, mask_probs)
    g_mirror, _ = plain.encode_regions(image.flip(-1), mask_probs.flip(-1))
    assert not torch.allclose(g, g_mirror, atol=1e-3)  # the tiny ViT itself is not mirror-symmetric
    torch.testing.assert_close(f, F.normalize(g + g_mirror, dim=-1), atol=1e-5, rtol=1e-4)
    assert valid.all()


def test_geometric_ensemble_by_hand():
    p_mask = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    p_clip = torch.tensor([[0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    unseen = torch.tensor([False, True, False])
    out = geometric_ensemble(p_mask, p_clip, unseen, w_seen=0.2, w_unseen=0.8)
    # seen class 0: 0.5^0.8 * 0.2^0.2; unseen class 1: 0.25^0.2 * 0.2^0.8.
    assert math.isclose(out[0, 0].item(), 0.5 ** 0.8 * 0.2 ** 0.2, rel_tol=1e-6)
    assert math.isclose(out[0, 1].item(), 0.25 ** 0.2 * 0.2 ** 0.8, rel_tol=1e-6)
    assert math.isclose(out[1, 1].item(), 0.6 ** 0.2 * 0.2 ** 0.8, rel_tol=1e-6)
    assert math.isclose(out[1, 2].item(), 0.3 ** 0.8 * 0.1 ** 0.2, rel_tol=1e-6)
    # w = 0 keeps the mask classifier, w = 1 takes CLIP.
    torch.testing.assert_close(geometric_ensemble(p_mask, p_clip, unseen, 0.0, 1.0)[:, 1], p_clip[:, 1])
    torch.testing.assert_close(geometric_ensemble(p_mask, p_clip, unseen, 0.0, 1.0)[:, 0], p_mask[:, 0])
    with pytest.raises(ValueError, match="shapes differ"):
        geometric_ensemble(p_mask, p_clip[:, :2], unseen, 0.2, 0.8)


def test_official_temperature_and_row_of_ones():
    clip = tiny_clip()
    image = random_image(3)
    mask_probs = torch.zeros(2, 20, 24)
    mask_probs[0, 2:9, 3:15] = 0.9
    mask_probs[1, 4:6, 4:6] = 0.5  # exactly the threshold: not above it, so no crop
    text = F.normalize(torch.randn(4, 16), dim=-1)
    ours = RegionClassifier(clip)(image, mask_probs, text)
    official = RegionClassifier(clip, temperature=100.0, empty_fill=1.0)
    features, valid = official.encode_regions(image, mask_probs)
    assert valid.tolist() == [True, False]
    probs = official.classify(features, valid, text)
    assert abs(clip.logit_scale.exp().item() - 100.0) > 1  # a scale that differs from the constant
    torch.testing.assert_close(probs[0], (100.0 * features[0] @ text.t()).softmax(-1))
    assert not torch.allclose(probs[0], ours[0], atol=1e-3)
    assert probs[1].tolist() == [1.0] * 4 and ours[1].tolist() == [0.25] * 4
