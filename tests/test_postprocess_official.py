"""The official protocol's rules, one quirk at a time, on hand-made inputs with hand-derived outputs
(postprocess_official.py; the recorded official outputs are checked in test_official_parity.py)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from freeseg.modeling import postprocess_official as official


def masks_from_columns(width: int, *columns: range, value: float = 1.0) -> torch.Tensor:
    """(Q, 1, width) mask probabilities: query q is `value` on its columns, 0 elsewhere."""
    masks = torch.zeros(len(columns), 1, width)
    for q, cols in enumerate(columns):
        masks[q, 0, list(cols)] = value
    return masks


def test_ensemble_is_the_raw_product_with_python_exponents():
    p_mask = torch.tensor([[0.5, 0.25, 0.125]])
    p_clip = torch.tensor([[0.25, 0.5, 1.0]])  # the last: the row of ones of an empty mask
    unseen = torch.tensor([False, True, True])
    got = official.official_ensemble(p_mask, p_clip, unseen, 0.2, 0.8)
    want = [0.5 ** 0.8 * 0.25 ** 0.2, 0.25 ** 0.2 * 0.5 ** 0.8, 0.125 ** 0.2]
    torch.testing.assert_close(got[0], torch.tensor(want), rtol=1e-6, atol=0)
    assert abs(float(got.sum()) - 1.0) > 0.1  # never renormalised
    # The official arithmetic exactly: a Python-number exponent per product.
    assert torch.equal(got[:, 1:], p_mask[:, 1:].pow(1 - 0.8) * p_clip[:, 1:].pow(0.8))
    with pytest.raises(ValueError, match="shapes differ"):
        official.official_ensemble(p_mask, p_clip[:, :2], unseen, 0.2, 0.8)


def test_sharpening_divides_by_a_hundredth():
    scores = official.sharpened_scores(torch.tensor([[0.30, 0.29, 0.0]]))
    # softmax([30, 29, 0]): e / (e + 1) for the first two, the third ~1e-13.
    torch.testing.assert_close(scores[0, :2], torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)]))


def test_panoptic_later_query_overwrites_and_ids_count_up():
    is_thing = torch.tensor([True, True, False])
    p_ens = torch.tensor([[0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])  # two things of class 0
    masks = masks_from_columns(8, range(0, 5), range(3, 8))
    seg, info = official.panoptic(p_ens, masks, is_thing)
    # No exclusivity: the second query takes columns 3-4 from the first.
    assert seg[0].tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    assert info == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": True, "category_id": 0}]


def test_panoptic_stuff_reuses_its_first_id_and_half_probability_counts():
    is_thing = torch.tensor([True, True, False])
    p_ens = torch.tensor([[0.0, 0.0, 0.5], [0.5, 0.0, 0.0], [0.0, 0.0, 0.5]])
    masks = masks_from_columns(8, range(0, 4), range(4, 6), range(6, 8))
    masks[2, 0, 6] = 0.5  # a logit of exactly 0: inside (>= 0.5)
    seg, info = official.panoptic(p_ens, masks, is_thing)
    assert seg[0].tolist() == [1, 1, 1, 1, 2, 2, 1, 1]
    assert info == [{"id": 1, "isthing": False, "category_id": 2}, {"id": 2, "isthing": True, "category_id": 0}]


def test_panoptic_drops_uncertain_things_but_not_uncertain_stuff():
    is_thing = torch.tensor([False, True, True, True])
    # Three-way ties: sharpened score 1/3, label = the first of them.
    p_ens = torch.tensor([[0.3, 0.3, 0.3, 0.0], [0.0, 0.3, 0.3, 0.3]])
    masks = masks_from_columns(4, range(0, 2), range(2, 4))
    seg, info = official.panoptic(p_ens, masks, is_thing)
    assert seg[0].tolist() == [1, 1, 0, 0]
    assert info == [{"id": 1, "isthing": False, "category_id": 0}]


def test_panoptic_keeps_only_semantic_argmax_pixels_and_tests_the_overlap():
    is_thing = torch.tensor([True, True, False])
    p_ens = torch.tensor([[0.2, 0.0, 0.0], [0.0, 0.5, 0.0]])
    # Query 1 wins the semantic argmax on columns 4-7: query 0 keeps 4 of its 8 pixels (0.5: kept).
    seg, info = official.panoptic(p_ens, masks_from_columns(8, range(0, 8), range(4, 8)), is_thing)
    assert seg[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2] and [s["category_id"] for s in info] == [0, 1]
    # On columns 3-7: query 0 keeps 3 of 8 (< 0.5): dropped, and query 1 becomes segment 1.
    seg, info = official.panoptic(p_ens, masks_from_columns(8, range(0, 8), range(3, 8)), is_thing)
    assert seg[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] and info == [{"id": 1, "isthing": True, "category_id": 1}]


def logits_from_columns(width: int, *columns: range) -> torch.Tensor:
    """(Q, 1, width) mask logits: +4 on the query's columns, -4 elsewhere."""
    logits = torch.full((len(columns), 1, width), -4.0)
    for q, cols in enumerate(columns):
        logits[q, 0, list(cols)] = 4.0
    return logits


def test_instance_never_predicts_the_last_class():
    is_thing = torch.tensor([True, True, True])
    logits = logits_from_columns(4, range(0, 4))
    got = official.instance(torch.tensor([[0.0, 0.5, 0.0]]), logits, is_thing)
    assert got["labels"].tolist() == [1]
    # The same confident query of the last class: the sharpened scores lose their last column,
    # so the best remaining class has a score near 0 and the query gives no instance.
    got = official.instance(torch.tensor([[0.0, 0.0, 0.5]]), logits, is_thing)
    assert got["labels"].tolist() == [] and got["masks"].shape == (0, 1, 4)


def test_instance_thresholds_and_score():
    is_thing = torch.tensor([True, True, False])
    logits = torch.tensor([[[3.0, 3.0, 0.25, 0.25, -3.0, -3.0]]])
    got = official.instance(torch.tensor([[0.5, 0.0, 0.0]]), logits, is_thing)
    # Kept on its logit >= 0.5 area (2 pixels); its mask is logit > 0 (4 pixels).
    assert got["masks"].tolist() == [[[True, True, True, True, False, False]]]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    sharpened = 1 / (1 + 2 * math.exp(-50))  # softmax([50, 0, 0])[0]
    mean_inside = (2 * sig(3.0) + 2 * sig(0.25)) / (4 + 1e-6)
    torch.testing.assert_close(got["scores"], torch.tensor([sharpened * mean_inside]))
    # Only logits in [0, 0.5): no area, no instance, although the mask itself would not be empty.
    got = official.instance(torch.tensor([[0.5, 0.0, 0.0]]), torch.full((1, 1, 6), 0.25), is_thing)
    assert len(got["labels"]) == 0
    # A stuff class gives no instance.
    assert len(official.instance(torch.tensor([[0.0, 0.0, 0.5]]), logits, is_thing)["labels"]) == 0


def test_instance_one_group_drops_the_largest_whatever_the_classes():
    is_thing = torch.tensor([True, True, False])
    p_ens = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])  # two different classes
    # Disjoint masks of 5 and 5 pixels: the first of the equal largest is dropped (5 / 5 > 0.8).
    got = official.instance(p_ens, logits_from_columns(10, range(0, 5), range(5, 10)), is_thing)
    assert got["labels"].tolist() == [1] and got["masks"][0, 0].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    # 5 and 4 pixels: 4 / 5 is not above 0.8, both stay.
    got = official.instance(p_ens, logits_from_columns(10, range(0, 5), range(5, 9)), is_thing)
    assert got["labels"].tolist() == [0, 1]


def pil_resize_one(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8), mode="L").resize((size[1], size[0]), Image.NEAREST))


def test_panoptic_resize_wraps_ids_and_drops_vanished_segments():
    info = [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": True, "category_id": 1},
            {"id": 256, "isthing": False, "category_id": 2}]
    seg, kept = official.resize_panoptic(torch.tensor([[1, 256, 2]], dtype=torch.int32), info, (1, 3))
    assert seg.tolist() == [[1, 0, 2]] and [s["id"] for s in kept] == [1, 2]  # 256 -> 0 as uint8
    # Halving the width with PIL's pixel-centre rule samples columns 1, 3, 5: segment 2 vanishes
    # (torch's 'nearest' would sample 0, 2, 4 and keep it).
    seg, kept = official.resize_panoptic(torch.tensor([[1, 1, 2, 1, 1, 1]], dtype=torch.int32), info, (1, 3))
    assert seg.tolist() == [[1, 1, 1]] and seg.dtype == torch.int32 and [s["id"] for s in kept] == [1]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7])
def test_instance_masks_resized_like_each_mask_alone(n):
    gen = torch.Generator().manual_seed(n)
    masks = torch.rand(n, 13, 11, generator=gen) > 0.5
    got = official.resize_instance_masks(masks, (7, 9))
    assert got.shape == (n, 7, 9) and got.dtype == torch.bool
    for k in range(n):
        assert np.array_equal(got[k].numpy(), pil_resize_one(masks[k].numpy(), (7, 9)).astype(bool))


def test_results_resize_to_the_size_asked_for():
    is_thing = torch.tensor([True, True, False])
    p_ens = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.5]])
    logits = torch.full((2, 4, 6), -4.0)
    logits[0, :2, :3] = 4.0
    logits[1, 2:, :] = 4.0
    semantic = official.official_results("semantic", p_ens, logits, is_thing, (8, 12))
    assert semantic.shape == (3, 8, 12)
    instances = official.official_results("instance", p_ens, logits, is_thing, (8, 12))
    assert instances["masks"].shape == (1, 8, 12) and int(instances["masks"].sum()) == 4 * 6
    seg, info = official.official_results("panoptic", p_ens, logits, is_thing, (8, 12))
    assert seg.shape == (8, 12) and [s["category_id"] for s in info] == [0, 2]
    with pytest.raises(ValueError, match="unknown task"):
        official.official_results("depth", p_ens, logits, is_thing, (8, 12))
