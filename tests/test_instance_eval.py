"""InstanceEvaluator: hand-computed mask AP, parity with pycocotools run directly, JSON ground truth."""

import contextlib
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from freeseg.evaluation import InstanceEvaluator

# Two thing classes (0 seen, 1 unseen) and one stuff class (2), which AP never scores.
CATEGORIES = [{"id": 0, "isthing": True, "seen": True}, {"id": 1, "isthing": True, "seen": False},
              {"id": 2, "isthing": False, "seen": True}]


def box(y0, y1, x0, x1, H=10, W=10):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_hand_computed_ap():
    ev = InstanceEvaluator(CATEGORIES)
    gt_a1, gt_a2, gt_b, stuff = box(0, 4, 0, 4), box(9, 10, 0, 8), box(0, 2, 6, 10), box(4, 9, 0, 5)
    ev.add_ground_truth(1, torch.stack([gt_a1, gt_a2, gt_b, stuff]), torch.tensor([0, 0, 1, 2]))
    ev.update(1, torch.stack([gt_a1, box(5, 8, 5, 9), box(9, 10, 0, 5), gt_b]),
              scores=torch.tensor([0.9, 0.8, 0.7, 0.6]), labels=torch.tensor([0, 0, 0, 1]))
    # Class 0, detections by score: d1 = gt_a1 (IoU 1), d2 hits nothing, d3 covers 5 of gt_a2's
    # 8 pixels (IoU 5/8 = 0.625).
    # IoU thresholds 0.50, 0.55, 0.60 (3 of 10): TP, FP, TP; recall 1/2, 1/2, 1; precision 1, 1/2,
    #   2/3 -> interpolated precision 1 at the 51 recall points 0.00..0.50, 2/3 at the 50 points
    #   0.51..1.00: (51 + 50 * 2/3) / 101 = 0.834983
    # thresholds 0.65 .. 0.95 (7 of 10): TP, FP, FP; recall never exceeds 1/2 ->
    #   precision 1 at 51 points, 0 at the other 50: 51 / 101 = 0.504950
    ap_low, ap_high = (51 + 50 * 2 / 3) / 101, 51 / 101
    ap_0 = (3 * ap_low + 7 * ap_high) / 10  # 0.603960
    ap_1 = 1.0  # class 1: one detection equal to its one ground truth
    s = ev.summary()
    assert s["AP"] == pytest.approx(100 * (ap_0 + ap_1) / 2)  # 80.198
    assert s["AP50"] == pytest.approx(100 * (ap_low + 1) / 2)  # 91.749
    assert s["AP75"] == pytest.approx(100 * (ap_high + 1) / 2)  # 75.248
    assert s["AP_seen"] == pytest.approx(100 * ap_0)
    assert s["AP_unseen"] == pytest.approx(100 * ap_1)
    assert ev.summary() == pytest.approx(s, nan_ok=True)  # summary() leaves the state unchanged


def test_no_detections_scores_zero():
    ev = InstanceEvaluator(CATEGORIES)
    ev.add_ground_truth(5, box(0, 4, 0, 4)[None], torch.tensor([0]))
    ev.update(5, torch.zeros(0, 10, 10, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    s = ev.summary()
    assert s["AP"] == 0.0 and s["AP_seen"] == 0.0 and math.isnan(s["AP_unseen"])


def random_blob(rng, H, W):
    m = np.zeros((H, W), bool)
    for _ in range(rng.integers(1, 3)):
        y, x = rng.integers(0, H - 3), rng.integers(0, W - 3)
        m[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = True
    return m


def random_dataset(seed, n_images=4, H=20, W=24):
    """Ground truth (with crowds) and noisy detections: {image_id: (gt list, det list)}."""
    rng = np.random.default_rng(seed)
    data = {}
    for image_id in range(10, 10 + n_images):
        gts = [(random_blob(rng, H, W), int(rng.integers(0, 2)), int(rng.random() < 0.15))
               for _ in range(rng.integers(1, 6))]
        dets = []
        for mask, label, _ in gts:
            for _ in range(rng.integers(0, 3)):
                noisy = np.roll(mask, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
                noisy = noisy ^ (rng.random((H, W)) < 0.01)
                label_d = label if rng.random() < 0.8 else 1 - label
                dets.append((noisy, float(rng.random()), label_d))
        dets += [(random_blob(rng, H, W), float(rng.random()), int(rng.integers(0, 2))) for _ in range(2)]
        data[image_id] = (gts, dets)
    return data, (H, W)


def pycocotools_direct(data, size, cat_ids):
    """COCOeval on COCO objects built by hand from the same masks (one RLE per mask)."""
    H, W = size
    images, anns, results = [], [], []
    for image_id, (gts, dets) in data.items():
        images.append({"id": image_id, "height": H, "width": W})
        for mask, label, crowd in gts:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": label, "iscrowd": crowd,
                         "segmentation": rle, "area": float(mask.sum()), "bbox": list(mask_util.toBbox(rle))})
        for mask, score, label in dets:
            results.append({"image_id": image_id, "category_id": label, "score": score,
                            "segmentation": mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 0}, {"id": 1}]}
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), "segm")
        coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats * 100


def fill(ev, data):
    for image_id, (gts, dets) in data.items():
        ev.add_ground_truth(image_id, torch.from_numpy(np.stack([g[0] for g in gts])),
                            torch.tensor([g[1] for g in gts]), torch.tensor([g[2] for g in gts]))
        ev.update(image_id, torch.from_numpy(np.stack([d[0] for d in dets])),
                  torch.tensor([d[1] for d in dets]), torch.tensor([d[2] for d in dets]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools_direct(seed):
    data, size = random_dataset(seed)
    ev = InstanceEvaluator(CATEGORIES)
    fill(ev, data)
    s = ev.summary()
    full = pycocotools_direct(data, size, [0, 1])
    assert [s["AP"], s["AP50"], s["AP75"]] == pytest.approx(full[:3].tolist())
    assert 0 < s["AP"] < 100  # a non-trivial case
    # Seen / unseen from the precision array == COCOeval restricted to those categories.
    assert s["AP_seen"] == pytest.approx(pycocotools_direct(data, size, [0])[0])
    assert s["AP_unseen"] == pytest.approx(pycocotools_direct(data, size, [1])[0])


def test_ground_truth_from_coco_json(tmp_path):
    data, (H, W) = random_dataset(3)
    from_samples = InstanceEvaluator(CATEGORIES)
    fill(from_samples, data)
    images, anns = [], []
    for image_id, (gts, _) in data.items():
        images.append({"id": image_id, "height": H, "width": W, "file_name": f"{image_id}.png"})
        for mask, label, crowd in gts:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": label, "iscrowd": crowd,
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                         "area": float(mask.sum()), "bbox": list(mask_util.toBbox(rle))})
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    from_json = InstanceEvaluator(CATEGORIES)
    from_json.load_ground_truth(path)
    for image_id, (_, dets) in data.items():
        from_json.update(image_id, torch.from_numpy(np.stack([d[0] for d in dets])),
                         torch.tensor([d[1] for d in dets]), torch.tensor([d[2] for d in dets]))
    assert from_json.summary() == pytest.approx(from_samples.summary(), nan_ok=True)


def test_bad_input():
    ev = InstanceEvaluator(CATEGORIES)
    with pytest.raises(ValueError, match="not thing categories"):
        ev.update(1, box(0, 2, 0, 2)[None], torch.tensor([0.5]), torch.tensor([2]))
    with pytest.raises(ValueError, match="no image"):
        ev.summary()
    ev.update(1, box(0, 2, 0, 2)[None], torch.tensor([0.5]), torch.tensor([0]))
    with pytest.raises(KeyError, match="no ground truth"):
        ev.summary()
    with pytest.raises(ValueError, match="masks"):
        ev.add_ground_truth(1, box(0, 2, 0, 2)[None], torch.tensor([0, 1]))
    ev.add_ground_truth(1, box(0, 2, 0, 2)[None], torch.tensor([0]))
    with pytest.raises(ValueError, match=r"ground truth is \(10, 10\)"):
        ev.update(1, torch.ones(1, 5, 5, dtype=torch.bool), torch.tensor([0.5]), torch.tensor([0]))


def test_official_group_mean_keeps_a_class_without_ground_truth():
    # A third thing class (seen) that no image has: its AP is NaN.
    categories = CATEGORIES + [{"id": 3, "isthing": True, "seen": True}]
    data, _ = random_dataset(4)
    ours, official = InstanceEvaluator(categories), InstanceEvaluator(categories, official=True)
    fill(ours, data)
    fill(official, data)
    a, s = ours.summary(), official.summary()
    assert not math.isnan(a["AP_seen"]) and math.isnan(s["AP_seen"])  # np.mean over [AP of 0, nan]
    assert s["AP_unseen"] == a["AP_unseen"] and s["AP"] == a["AP"]
