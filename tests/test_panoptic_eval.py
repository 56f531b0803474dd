"""PanopticEvaluator: a hand-computed PQ case and parity with panopticapi's definition.

The reference below re-implements `pq_compute_single_core` of cocodataset/panopticapi (read for
its rules, not copied): a dict of (gt id, pred id) -> intersection from `np.unique` over
gt * OFFSET + pred, then plain loops over segments.
"""

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from freeseg.evaluation import PanopticEvaluator

# id, isthing, seen: A thing seen, B thing unseen, S stuff seen.
A, B, S = 0, 1, 2
CATEGORIES = [{"id": A, "isthing": True, "seen": True},
              {"id": B, "isthing": True, "seen": False},
              {"id": S, "isthing": False, "seen": True}]


def image1(pred5_category=B):
    gt = torch.tensor([[1, 1, 1, 2, 2, 2],
                       [1, 1, 1, 2, 2, 2],
                       [3, 3, 3, 3, 0, 0],
                       [3, 3, 3, 3, 4, 4]])
    gt_segments = [{"id": 1, "category_id": A, "iscrowd": 0}, {"id": 2, "category_id": A, "iscrowd": 0},
                   {"id": 3, "category_id": S, "iscrowd": 0}, {"id": 4, "category_id": B, "iscrowd": 1}]
    pred = torch.tensor([[1, 1, 1, 1, 2, 2],
                         [1, 1, 1, 2, 2, 2],
                         [3, 3, 3, 3, 5, 5],
                         [3, 3, 0, 0, 5, 5]])
    pred_segments = [{"id": 1, "category_id": A}, {"id": 2, "category_id": A},
                     {"id": 3, "category_id": S}, {"id": 5, "category_id": pred5_category}]
    return pred, pred_segments, gt, gt_segments


def image2():
    gt = torch.tensor([[1, 1, 1, 1, 0, 0],
                       [2, 2, 2, 2, 2, 2]])
    gt_segments = [{"id": 1, "category_id": A, "iscrowd": 0}, {"id": 2, "category_id": S, "iscrowd": 0}]
    pred = torch.tensor([[0, 1, 1, 1, 1, 1],
                         [2, 2, 2, 3, 3, 3]])
    pred_segments = [{"id": 1, "category_id": A}, {"id": 2, "category_id": S}, {"id": 3, "category_id": A}]
    return pred, pred_segments, gt, gt_segments


def image3():
    gt = torch.tensor([[7, 7, 7, 7]])
    pred = torch.tensor([[9, 9, 9, 9]])
    return pred, [{"id": 9, "category_id": B}], gt, [{"id": 7, "category_id": B, "iscrowd": 0}]


def test_hand_computed_case():
    ev = PanopticEvaluator(CATEGORIES)
    for image in (image1(), image2(), image3()):
        ev.update(*image)
    # Image 1:
    #   gt1 (A, 6 px) ~ pred1 (A, 7 px): overlap 6, union 7 + 6 - 6 = 7, IoU 6/7  -> TP
    #   gt2 (A, 6 px) ~ pred2 (A, 5 px): overlap 5, union 5 + 6 - 5 = 6, IoU 5/6  -> TP
    #   gt3 (S, 8 px) ~ pred3 (S, 6 px): overlap 6, union 6 + 8 - 6 = 8, IoU 3/4  -> TP
    #   gt4 is crowd (B): never a FN. pred5 (B, 4 px) is unmatched, but 2 px lie on VOID and
    #   2 px on the B crowd: 4/4 > 0.5 -> not a FP.
    # Image 2:
    #   gt1 (A, 4 px) ~ pred1 (A, 5 px): overlap 3, 2 px of pred1 on VOID are removed from the
    #   union: 5 + 4 - 3 - 2 = 4, IoU 3/4 -> TP (it would be 3/6 = 0.5, no match, without that).
    #   gt2 (S, 6 px) ~ pred2 (S, 3 px): overlap 3, union 6, IoU exactly 0.5 -> no match (> 0.5):
    #   gt2 is a FN, pred2 a FP (nothing of it on VOID).
    #   pred3 (A, 3 px) lies on stuff S only -> FP for A.
    # Image 3: gt7 (B) == pred9 (B), IoU 1 -> TP (segment ids need not agree).
    assert ev.tp.tolist() == [3, 1, 1]
    assert ev.fp.tolist() == [1, 0, 1]
    assert ev.fn.tolist() == [0, 0, 1]
    assert ev.iou_sum.tolist() == pytest.approx([6 / 7 + 5 / 6 + 3 / 4, 1.0, 3 / 4])
    # A: PQ = (6/7 + 5/6 + 3/4) / (3 + 1/2) = 2.44048 / 3.5 = 0.69728, SQ = 2.44048 / 3, RQ = 3 / 3.5
    # B: PQ = SQ = RQ = 1
    # S: PQ = 0.75 / (1 + 1/2 + 1/2) = 0.375, SQ = 0.75, RQ = 1 / 2
    pq_a, sq_a, rq_a = (6 / 7 + 5 / 6 + 3 / 4) / 3.5, (6 / 7 + 5 / 6 + 3 / 4) / 3, 3 / 3.5
    s = ev.summary()
    expected = {
        "PQ": (pq_a + 1 + 0.375) / 3, "SQ": (sq_a + 1 + 0.75) / 3, "RQ": (rq_a + 1 + 0.5) / 3,
        "PQ_th": (pq_a + 1) / 2, "PQ_st": 0.375, "SQ_st": 0.75, "RQ_st": 0.5,
        "PQ_seen": (pq_a + 0.375) / 2, "SQ_seen": (sq_a + 0.75) / 2,
        "PQ_unseen": 1.0, "RQ_unseen": 1.0,
    }
    for key, value in expected.items():
        assert s[key] == pytest.approx(100 * value), key
    assert s["PQ"] == pytest.approx(69.076, abs=1e-3)


def test_void_threshold_and_crowd_of_other_class():
    # Same image 1, but pred5 now says A: only its 2 VOID pixels excuse it (the crowd is B):
    # 2/4 = 0.5 is not > 0.5 -> a FP for A.
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(*image1(pred5_category=A))
    assert ev.fp.tolist() == [1, 0, 0] and ev.fn.tolist() == [0, 0, 0]
    # With no category valid for a group, the group's value is NaN (image 1 has only A, S stats).
    assert math.isnan(ev.summary()["PQ_unseen"])


def test_bad_input():
    ev = PanopticEvaluator(CATEGORIES)
    pred, pred_segments, gt, gt_segments = image2()
    with pytest.raises(KeyError, match=r"segment ids \[3\]"):
        ev.update(pred, pred_segments[:2], gt, gt_segments)
    with pytest.raises(KeyError, match=r"listed"):
        ev.update(pred, pred_segments + [{"id": 8, "category_id": A}], gt, gt_segments)
    with pytest.raises(KeyError, match="category_id"):
        ev.update(pred, [dict(s, category_id=42) for s in pred_segments], gt, gt_segments)
    with pytest.raises(ValueError, match="same"):
        ev.update(pred[:, :3], pred_segments, gt, gt_segments)


# ----------------------------------------------------------------------------------------------
# Reference: panopticapi's rules with dicts and loops.

OFFSET = 256 * 256 * 256


def reference_image_stats(pred, pred_segments, gt, gt_segments):
    stats = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    gt_segms = {s["id"]: dict(s) for s in gt_segments}
    pred_segms = {s["id"]: dict(s) for s in pred_segments}
    for segms, seg in ((gt_segms, gt), (pred_segms, pred)):
        ids, counts = np.unique(seg, return_counts=True)
        for i, c in zip(ids.tolist(), counts.tolist()):
            if i != 0:
                segms[i]["area"] = c
    pairs, counts = np.unique(gt.astype(np.uint64) * OFFSET + pred.astype(np.uint64), return_counts=True)
    inter = {(int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs, counts)}

    gt_matched, pred_matched = set(), set()
    for (g, p), overlap in inter.items():
        if g not in gt_segms or p not in pred_segms:
            continue
        if gt_segms[g]["iscrowd"] == 1 or gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
            continue
        union = pred_segms[p]["area"] + gt_segms[g]["area"] - overlap - inter.get((0, p), 0)
        iou = overlap / union
        if iou > 0.5:
            stats[gt_segms[g]["category_id"]]["tp"] += 1
            stats[gt_segms[g]["category_id"]]["iou"] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd_of_category = {}
    for g, info in gt_segms.items():
        if g in gt_matched:
            continue
        if info["iscrowd"] == 1:
            crowd_of_category[info["category_id"]] = g
            continue
        stats[info["category_id"]]["fn"] += 1
    excused_by_crowd = 0  # false positives forgiven only thanks to a crowd region
    for p, info in pred_segms.items():
        if p in pred_matched:
            continue
        on_void = on_ignored = inter.get((0, p), 0)
        if info["category_id"] in crowd_of_category:
            on_ignored += inter.get((crowd_of_category[info["category_id"]], p), 0)
        if on_ignored / info["area"] > 0.5:
            excused_by_crowd += on_void / info["area"] <= 0.5
            continue
        stats[info["category_id"]]["fp"] += 1
    return stats, excused_by_crowd


def reference_pq(stats, categories, select):
    pq, sq, rq, n = 0.0, 0.0, 0.0, 0
    for c in categories:
        if not select(c):
            continue
        st = stats[c["id"]]
        if st["tp"] + st["fp"] + st["fn"] == 0:
            continue
        n += 1
        denom = st["tp"] + 0.5 * st["fp"] + 0.5 * st["fn"]
        pq += st["iou"] / denom
        sq += st["iou"] / st["tp"] if st["tp"] else 0.0
        rq += st["tp"] / denom
    return (100 * pq / n, 100 * sq / n, 100 * rq / n) if n else (math.nan,) * 3


def random_image(rng, categories, H=24, W=32):
    """Rectangles of random categories, VOID holes, a few crowds; prediction = shifted, relabelled,
    partly overwritten copy with fresh segment ids."""
    K = len(categories)
    gt = np.zeros((H, W), np.int64)
    gt_cat = {}
    for sid in range(1, 10):
        y, x = rng.integers(0, H - 2), rng.integers(0, W - 2)
        gt[y:y + rng.integers(3, 14), x:x + rng.integers(3, 18)] = sid
        gt_cat[sid] = int(rng.integers(0, K))
    for _ in range(2):
        y, x = rng.integers(0, H - 2), rng.integers(0, W - 2)
        gt[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = 0
    gt_segments, crowd_categories = [], set()
    for sid in np.unique(gt).tolist():
        if sid == 0:
            continue
        c = gt_cat[sid]
        crowd = categories[c]["isthing"] and c not in crowd_categories and rng.random() < 0.25
        if crowd:
            crowd_categories.add(c)  # panopticapi assumes at most one crowd per category
        gt_segments.append({"id": sid, "category_id": c, "iscrowd": int(crowd)})

    pred = np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    for sid in range(20, 23):
        y, x = rng.integers(0, H - 2), rng.integers(0, W - 2)
        pred[y:y + rng.integers(2, 10), x:x + rng.integers(2, 10)] = sid
    y, x = rng.integers(0, H - 2), rng.integers(0, W - 2)
    pred[y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = 0
    pred_segments, remapped = [], np.zeros_like(pred)
    for new_id, sid in enumerate(np.unique(pred).tolist(), start=100):
        if sid == 0:
            continue
        keep = sid in gt_cat and rng.random() < 0.8
        c = gt_cat[sid] if keep else int(rng.integers(0, K))
        remapped[pred == sid] = new_id
        pred_segments.append({"id": new_id, "category_id": c})
    return remapped, pred_segments, gt, gt_segments


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_panopticapi_definition_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    categories = [{"id": k, "isthing": k < 4, "seen": k % 3 != 0} for k in range(7)]
    ev = PanopticEvaluator(categories)
    total = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    for _ in range(6):
        pred, pred_segments, gt, gt_segments = random_image(rng, categories)
        ev.update(torch.from_numpy(pred), pred_segments, torch.from_numpy(gt), gt_segments)
        stats, _ = reference_image_stats(pred, pred_segments, gt, gt_segments)
        for c, st in stats.items():
            for key in st:
                total[c][key] += st[key]
    for k in range(7):
        assert ev.tp[k] == total[k]["tp"] and ev.fp[k] == total[k]["fp"] and ev.fn[k] == total[k]["fn"]
        assert ev.iou_sum[k].item() == pytest.approx(total[k]["iou"], abs=1e-12)
    # The random case exercises every rule, or it proves nothing.
    assert sum(total[k]["tp"] for k in range(7)) > 0 and sum(total[k]["fp"] for k in range(7)) > 0
    assert sum(total[k]["fn"] for k in range(7)) > 0
    s = ev.summary()
    groups = {"": lambda c: True, "_th": lambda c: c["isthing"], "_st": lambda c: not c["isthing"],
              "_seen": lambda c: c["seen"], "_unseen": lambda c: not c["seen"]}
    for suffix, select in groups.items():
        pq, sq, rq = reference_pq(total, categories, select)
        assert s[f"PQ{suffix}"] == pytest.approx(pq, nan_ok=True)
        assert s[f"SQ{suffix}"] == pytest.approx(sq, nan_ok=True)
        assert s[f"RQ{suffix}"] == pytest.approx(rq, nan_ok=True)


def test_random_maps_exercise_the_crowd_rule():
    # Over the seeds above, some false positives are forgiven only because of a crowd region,
    # so the parity test does check that rule.
    categories = [{"id": k, "isthing": k < 4, "seen": k % 3 != 0} for k in range(7)]
    rngs = [np.random.default_rng(seed) for seed in range(5)]
    assert sum(reference_image_stats(*random_image(rng, categories))[1]
               for rng in rngs for _ in range(6)) > 0


def test_official_seen_unseen_count_absent_classes_as_zero():
    # Category B (unseen) and a fourth, seen stuff class C never occur in image 2.
    categories = CATEGORIES + [{"id": 3, "isthing": False, "seen": True}]
    ours, official = PanopticEvaluator(categories), PanopticEvaluator(categories, official=True)
    for ev in (ours, official):
        ev.update(*image2())
    a, s = ours.summary(), official.summary()
    pq = ours.per_category()["pq"] * 100
    # Seen: A and S occur; the official mean also counts C as 0 -> (A + S + 0) / 3.
    assert a["PQ_seen"] == pytest.approx(float(pq[A] + pq[S]) / 2)
    assert s["PQ_seen"] == pytest.approx(float(pq[A] + pq[S]) / 3)
    assert math.isnan(a["PQ_unseen"]) and s["PQ_unseen"] == 0.0  # B never occurs
    assert s["PQ"] == a["PQ"] and s["PQ_th"] == a["PQ_th"]  # panopticapi's own averages unchanged
