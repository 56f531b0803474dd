"""SemanticEvaluator: hand-computed mIoU / hIoU / pAcc, class-exclusion rules, bad input."""

import math

import pytest
import torch

from freeseg.evaluation import SemanticEvaluator, harmonic_mean


def test_hand_computed_case():
    # Classes 0, 1 seen, 2 unseen; 255 = ignore.
    gt = torch.tensor([[0, 0, 1, 1],
                       [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 0]])
    ev = SemanticEvaluator(num_classes=3, seen=torch.tensor([True, True, False]))
    ev.update(pred, gt)
    # The ignored pixel (1, 2) drops out: 7 scored pixels, pairs (gt, pred):
    # (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (0,0).
    # class 0: GT 3, Pred 3, TP 2 -> IoU 2 / (3 + 3 - 2) = 1/2
    # class 1: GT 2, Pred 3, TP 2 -> IoU 2 / (2 + 3 - 2) = 2/3
    # class 2: GT 2, Pred 1 (its prediction on the ignored pixel is not counted), TP 1 -> 1/2
    expected_conf = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(ev.confusion, expected_conf)
    s = ev.summary()
    assert s["IoU"] == pytest.approx([50.0, 200 / 3, 50.0])
    assert s["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3 * 100)  # 55.56
    seen, unseen = (1 / 2 + 2 / 3) / 2, 1 / 2  # 0.5833, 0.5
    assert s["mIoU_seen"] == pytest.approx(seen * 100)
    assert s["mIoU_unseen"] == pytest.approx(unseen * 100)
    assert s["hIoU"] == pytest.approx(2 * seen * unseen / (seen + unseen) * 100)  # 53.85
    assert s["pAcc"] == pytest.approx(5 / 7 * 100)  # 71.43


def test_absent_class_excluded_and_predicted_only_class_counts_zero():
    # Class 3 is neither in GT nor predicted: NaN, left out of every mean.
    # Class 2 is predicted (1 pixel) but absent from GT: IoU 0 and counted (official FreeSeg rule).
    gt = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 2, 1, 1]])
    ev = SemanticEvaluator(num_classes=4, seen=torch.tensor([True, True, False, False]))
    ev.update(pred, gt)
    s = ev.summary()
    # IoU: class 0 = 1/2, class 1 = 2/2, class 2 = 0/1, class 3 = NaN
    assert s["IoU"][:3] == pytest.approx([50.0, 100.0, 0.0]) and math.isnan(s["IoU"][3])
    assert s["mIoU"] == pytest.approx(50.0)  # (50 + 100 + 0) / 3
    assert s["mIoU_seen"] == pytest.approx(75.0)
    assert s["mIoU_unseen"] == pytest.approx(0.0)
    assert s["hIoU"] == 0.0
    assert s["pAcc"] == pytest.approx(75.0)


def test_accumulation_equals_one_big_image():
    torch.manual_seed(0)
    K = 5
    gts = [torch.randint(0, K, (6, 7)) for _ in range(3)]
    preds = [torch.randint(0, K, (6, 7)) for _ in range(3)]
    gts[1][0, :] = 255
    seen = torch.tensor([True, False, True, True, False])
    a, b = SemanticEvaluator(K, seen), SemanticEvaluator(K, seen)
    for p, g in zip(preds, gts):
        a.update(p, g)
    b.update(torch.cat(preds), torch.cat(gts))
    assert torch.equal(a.confusion, b.confusion)
    assert a.confusion.sum() == 3 * 42 - 7


def test_harmonic_mean():
    assert harmonic_mean(60.0, 40.0) == pytest.approx(48.0)  # 2*60*40/100
    assert math.isnan(harmonic_mean(60.0, math.nan))


def test_bad_input():
    ev = SemanticEvaluator(num_classes=3, seen=torch.tensor([True, True, False]))
    with pytest.raises(ValueError, match="ground-truth id"):
        ev.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7))
    with pytest.raises(ValueError, match="predicted id"):
        ev.update(torch.full((2, 2), 3), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="same"):
        ev.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="seen"):
        SemanticEvaluator(num_classes=3, seen=torch.tensor([True, False]))
