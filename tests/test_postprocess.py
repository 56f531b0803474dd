"""Post-processing of the three tasks on hand-made 4x4 cases with expected outputs worked out by hand."""

import pytest
import torch

from freeseg.modeling.postprocess import instance_inference, panoptic_inference, semantic_inference


def test_semantic_is_class_weighted_mask_sum():
    class_probs = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    mask_probs = torch.tensor([[[1.0, 0.5], [0.0, 0.2]], [[0.0, 0.5], [1.0, 0.8]]])
    out = semantic_inference(class_probs, mask_probs)
    # class 0: 0.6 * m0 + 0.1 * m1; class 1: 0.4 * m0 + 0.9 * m1
    expected = torch.tensor([[[0.60, 0.35], [0.10, 0.20]], [[0.40, 0.65], [0.90, 0.80]]])
    assert out.shape == (2, 2, 2)
    assert torch.allclose(out, expected)
    assert out.argmax(0).tolist() == [[0, 1], [1, 1]]


def test_instance_topk_things_only_and_mask_score():
    # classes 0 and 1 are things, class 2 is stuff
    is_thing = torch.tensor([True, True, False])
    class_probs = torch.tensor([[0.70, 0.10, 0.20], [0.05, 0.15, 0.80]])
    m0 = torch.full((4, 4), 0.1)
    m0[:2, :2] = 0.9
    m0[3, 3] = 0.6  # binary mask: 5 pixels, mean prob (4 * 0.9 + 0.6) / 5 = 0.84
    m1 = torch.full((4, 4), 0.3)
    m1[2, :3] = 0.8  # binary mask: 3 pixels, mean prob 0.8
    out = instance_inference(class_probs, torch.stack([m0, m1]), is_thing, topk=4)
    # top-4 pairs: (q1, c2) 0.80 stuff -> dropped, (q0, c0) 0.70, (q0, c2) 0.20 stuff -> dropped, (q1, c1) 0.15
    assert out["labels"].tolist() == [0, 1]
    assert out["scores"].tolist() == pytest.approx([0.70 * 0.84, 0.15 * 0.8], rel=1e-5)
    assert torch.equal(out["masks"], torch.stack([m0 > 0.5, m1 > 0.5]))
    assert out["masks"][0].sum() == 5 and out["masks"][1].sum() == 3
    # top-3 stops before (q1, c1): one instance left
    assert instance_inference(class_probs, torch.stack([m0, m1]), is_thing, topk=3)["labels"].tolist() == [0]
    # an empty binary mask scores 0, not NaN
    empty = instance_inference(class_probs[:1], torch.zeros(1, 4, 4), is_thing, topk=1)
    assert empty["scores"].tolist() == [0.0] and empty["masks"].shape == (1, 4, 4)


def _block(rows, cols, inside=0.9, outside=0.05):
    m = torch.full((4, 4), outside)
    m[rows, cols] = inside
    return m


IS_THING = torch.tensor([True, False])  # class 0 thing, class 1 stuff; column 2 = no object


def test_panoptic_no_object_and_confidence_filtering():
    class_probs = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # thing, kept
            [0.20, 0.10, 0.70],  # no object wins: dropped
            [0.60, 0.30, 0.10],  # thing but 0.6 < threshold 0.8: dropped
        ]
    )
    masks = torch.stack(
        [_block(slice(0, 2), slice(0, 2)), _block(slice(None), slice(None)), _block(slice(2, 4), slice(2, 4))]
    )
    seg, info = panoptic_inference(class_probs, masks, IS_THING, object_mask_threshold=0.8, overlap_threshold=0.8)
    assert seg.dtype == torch.int32
    assert seg.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert info == [{"id": 1, "category_id": 0, "isthing": True, "score": pytest.approx(0.9)}]
    # nothing passes: all void
    seg, info = panoptic_inference(class_probs[1:], masks[1:], IS_THING, 0.8, 0.8)
    assert info == [] and not seg.any()


def test_panoptic_keep_by_object_tests_the_object_probability():
    # Query 0 is surely an object but split between two classes (0.45 / 0.40, no object 0.15):
    # Mask2Former's rule drops it at threshold 0.5, the object rule keeps it (0.85 > 0.5) with
    # the best of the K classes and that class's probability as its score.
    class_probs = torch.tensor([[0.45, 0.40, 0.15], [0.30, 0.10, 0.60]])
    masks = torch.stack([_block(slice(0, 2), slice(0, 2)), _block(slice(2, 4), slice(2, 4))])
    seg, info = panoptic_inference(class_probs, masks, IS_THING, 0.5, 0.8, keep_by="class")
    assert info == [] and not seg.any()
    seg, info = panoptic_inference(class_probs, masks, IS_THING, 0.5, 0.8, keep_by="object")
    assert seg.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # query 1: 0.4 < 0.5
    assert info == [{"id": 1, "category_id": 0, "isthing": True, "score": pytest.approx(0.45)}]
    with pytest.raises(ValueError, match="panoptic_keep_by"):
        panoptic_inference(class_probs, masks, IS_THING, 0.5, 0.8, keep_by="score")


def test_panoptic_overlap_threshold_drops_hidden_segment():
    # Query 0 (score 0.95) covers rows 0-1; query 1 (score 0.85) covers rows 0-2 (12 pixels), so
    # the argmax gives query 1 only row 2: 4 / 12 = 0.33 of its own mask.
    class_probs = torch.tensor([[0.95, 0.03, 0.02], [0.85, 0.10, 0.05]])
    masks = torch.stack([_block(slice(0, 2), slice(None)), _block(slice(0, 3), slice(None))])
    seg, info = panoptic_inference(class_probs, masks, IS_THING, object_mask_threshold=0.5, overlap_threshold=0.8)
    assert seg.tolist() == [[1] * 4, [1] * 4, [0] * 4, [0] * 4]
    assert [s["id"] for s in info] == [1]
    seg, info = panoptic_inference(class_probs, masks, IS_THING, object_mask_threshold=0.5, overlap_threshold=0.3)
    assert seg.tolist() == [[1] * 4, [1] * 4, [2] * 4, [0] * 4]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 0, True), (2, 0, True)]


def test_panoptic_merges_stuff_of_one_class_but_not_things():
    class_probs = torch.tensor(
        [
            [0.05, 0.85, 0.10],  # stuff class 1, left columns
            [0.90, 0.05, 0.05],  # thing, top-right 2x2 block
            [0.04, 0.92, 0.04],  # stuff class 1 again, bottom of column 2 -> same segment as query 0
            [0.88, 0.06, 0.06],  # thing again, bottom of the last column: a second instance
        ]
    )
    masks = torch.stack(
        [
            _block(slice(None), slice(0, 2)),
            _block(slice(0, 2), slice(2, 4)),
            _block(slice(2, 4), slice(2, 3)),
            _block(slice(2, 4), slice(3, 4)),
        ]
    )
    seg, info = panoptic_inference(class_probs, masks, IS_THING, object_mask_threshold=0.8, overlap_threshold=0.8)
    assert seg.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 1, 3], [1, 1, 1, 3]]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 1, False), (2, 0, True), (3, 0, True)]
    assert info[0]["score"] == pytest.approx(0.92)  # the merged stuff segment keeps its best score


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_inference(torch.rand(2, 3), torch.rand(2, 4, 4), torch.tensor([True, False, True]), 0.5, 0.5)
    with pytest.raises(ValueError, match="same Q"):
        instance_inference(torch.rand(3, 2), torch.rand(2, 4, 4), torch.tensor([True, False]), topk=2)
