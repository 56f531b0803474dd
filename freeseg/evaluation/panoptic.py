"""Panoptic quality (PQ, SQ, RQ) overall / things / stuff / seen / unseen, computed in memory.

Definitions are those of COCO's `panopticapi` (`pq_compute_single_core`; Kirillov et al.,
"Panoptic Segmentation", CVPR 2019, sec. 4), written here as per-image matrix operations:
- segment id 0 in a map is VOID (unlabelled in the ground truth, "no segment" in a prediction);
- a prediction p and a non-crowd ground-truth segment g of the same category match when
  IoU(p, g) > 0.5, where the union leaves out the part of p lying on VOID ground truth:
  union = |p| + |g| - |p & g| - |p & VOID|. Above 0.5 a match is necessarily unique;
- unmatched non-crowd ground truth is a false negative; crowd segments never are;
- an unmatched prediction is a false positive unless more than half of it lies on VOID plus
  crowd regions of its own category;
- per category PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2);
  a group's value is the mean over its categories with TP + FP + FN > 0.
The state is four (K,) tensors (IoU sum, TP, FP, FN), summed over images and ranks
(a sum is all that ranks need to exchange), so no PNG or JSON is written.

Differences from the official FreeSeg code (which writes PNGs and calls panopticapi):
- panopticapi reads a ground-truth segment's area from the JSON; we count it in the map.
- with several crowd segments of one category in an image, panopticapi uses only the last one
  listed when excusing false positives; we use all of them (COCO has at most one anyway).
- the official seen/unseen PQ (evaluation/panoptic_seg_evaluation.py) averages over every
  category of the group, counting categories absent from both ground truth and predictions as 0;
  we apply panopticapi's own rule (skip them) to every group, unless `official=True` (evaluate.py
  --protocol official). On COCO val every category occurs, so both give the same numbers.
"""

import math

import torch

from freeseg.distributed import all_reduce_sum


class PanopticEvaluator:
    """PQ accumulator.

    Args:
        categories: [{"id": category id, "isthing": bool, "seen": bool}, ...] (K entries).
        official: PQ_seen / PQ_unseen (and their SQ, RQ) count a category that never occurs as 0,
            as the official FreeSeg evaluator does (PQ, _th, _st keep panopticapi's rule).
    """

    def __init__(self, categories: list[dict], official: bool = False):
        self.category_ids = [int(c["id"]) for c in categories]
        self.index = {cid: k for k, cid in enumerate(self.category_ids)}
        if len(self.index) != len(categories):
            raise ValueError("PanopticEvaluator: duplicate category ids in categories")
        self.isthing = torch.tensor([bool(c["isthing"]) for c in categories])  # (K,)
        self.seen = torch.tensor([bool(c["seen"]) for c in categories])  # (K,)
        self.official = official
        K = len(categories)
        self.iou_sum = torch.zeros(K, dtype=torch.float64)
        self.tp = torch.zeros(K, dtype=torch.int64)
        self.fp = torch.zeros(K, dtype=torch.int64)
        self.fn = torch.zeros(K, dtype=torch.int64)

    def _category_index(self, segments: list[dict], what: str) -> torch.Tensor:
        unknown = [s["category_id"] for s in segments if s["category_id"] not in self.index]
        if unknown:
            raise KeyError(f"PanopticEvaluator.update: {what} segments have unknown "
                           f"category_id {unknown}")
        return torch.tensor([self.index[s["category_id"]] for s in segments], dtype=torch.long)

    @staticmethod
    def _rows(seg: torch.Tensor, segments: list[dict], what: str) -> torch.Tensor:
        """(H*W,) row per pixel: 0 for VOID, 1 + position in `segments` for a listed segment id."""
        row_of = {int(s["id"]): i + 1 for i, s in enumerate(segments)}
        if len(row_of) != len(segments) or 0 in row_of:
            raise ValueError(f"PanopticEvaluator.update: {what} segment ids must be unique and "
                             f"non-zero (0 is VOID), got {[s['id'] for s in segments]}")
        ids, inverse = torch.unique(seg.flatten(), return_inverse=True)
        unknown = [i for i in ids.tolist() if i != 0 and i not in row_of]
        if unknown:
            raise KeyError(f"PanopticEvaluator.update: {what} map holds segment ids {unknown} "
                           f"that are not in its segments list")
        return torch.tensor([row_of.get(i, 0) for i in ids.tolist()], dtype=torch.long)[inverse]

    def update(self, pred_seg: torch.Tensor, pred_segments: list[dict],
               gt_seg: torch.Tensor, gt_segments: list[dict]) -> None:
        """Add one image.

        pred_seg, gt_seg: (H, W) integer segment-id maps, 0 = VOID.
        pred_segments: [{"id", "category_id"}]; gt_segments: [{"id", "category_id", "iscrowd"}].
        """
        pred_seg, gt_seg = torch.as_tensor(pred_seg).cpu(), torch.as_tensor(gt_seg).cpu()
        if pred_seg.shape != gt_seg.shape or pred_seg.dim() != 2:
            raise ValueError(f"PanopticEvaluator.update: pred_seg {tuple(pred_seg.shape)} and "
                             f"gt_seg {tuple(gt_seg.shape)} must be the same (H, W)")
        G, P = len(gt_segments), len(pred_segments)
        gt_rows = self._rows(gt_seg.long(), gt_segments, "ground-truth")  # (H*W,)
        pred_rows = self._rows(pred_seg.long(), pred_segments, "predicted")  # (H*W,)
        gt_cat = self._category_index(gt_segments, "ground-truth")  # (G,)
        pred_cat = self._category_index(pred_segments, "predicted")  # (P,)
        crowd = torch.tensor([bool(s.get("iscrowd", 0)) for s in gt_segments], dtype=torch.bool)

        # Joint histogram of (gt row, pred row): row/column 0 is VOID.
        inter = torch.bincount(gt_rows * (P + 1) + pred_rows, minlength=(G + 1) * (P + 1))
        inter = inter.view(G + 1, P + 1).double()  # (G+1, P+1)
        gt_area, pred_area = inter.sum(1)[1:], inter.sum(0)[1:]  # (G,), (P,)
        if (pred_area == 0).any():
            empty = (pred_area == 0).nonzero().flatten().tolist()
            missing = [pred_segments[p]["id"] for p in empty]
            raise KeyError(f"PanopticEvaluator.update: predicted segments {missing} are listed "
                           f"but have no pixel in pred_seg")
        on_void = inter[0, 1:]  # (P,) predicted pixels on VOID ground truth
        overlap = inter[1:, 1:]  # (G, P)
        same_cat = gt_cat[:, None] == pred_cat[None, :]  # (G, P)

        union = pred_area[None, :] + gt_area[:, None] - overlap - on_void[None, :]  # (G, P)
        iou = overlap / union.clamp(min=1)
        match = (iou > 0.5) & same_cat & ~crowd[:, None]  # (G, P), at most one True per row/col
        g, p = match.nonzero(as_tuple=True)
        self.tp.index_add_(0, gt_cat[g], torch.ones_like(g))
        self.iou_sum.index_add_(0, gt_cat[g], iou[g, p])

        missed = ~match.any(1) & ~crowd  # (G,)
        self.fn.index_add_(0, gt_cat[missed], torch.ones_like(gt_cat[missed]))

        # A prediction mostly on VOID or on a crowd region of its own class is not penalised.
        on_crowd = (overlap * (same_cat & crowd[:, None])).sum(0)  # (P,)
        excused = (on_void + on_crowd) / pred_area > 0.5
        false_pos = ~match.any(0) & ~excused  # (P,)
        self.fp.index_add_(0, pred_cat[false_pos], torch.ones_like(pred_cat[false_pos]))

    def all_reduce(self) -> None:
        """Sum the per-category statistics over ranks."""
        for tensor in (self.iou_sum, self.tp, self.fp, self.fn):
            all_reduce_sum(tensor)

    def per_category(self) -> dict[str, torch.Tensor]:
        """(K,) float64 "pq", "sq", "rq" in [0, 1] and bool "valid" (TP + FP + FN > 0)."""
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        denom = tp + 0.5 * fp + 0.5 * fn
        return {
            "pq": self.iou_sum / denom.clamp(min=0.5),
            "sq": self.iou_sum / tp.clamp(min=1),  # 0 when TP = 0, as panopticapi
            "rq": tp / denom.clamp(min=0.5),
            "valid": denom > 0,
        }

    def summary(self) -> dict:
        """PQ, SQ, RQ and their _th / _st / _seen / _unseen variants, percent (NaN: empty group)."""
        stats = self.per_category()
        groups = {"": torch.ones_like(self.seen), "_th": self.isthing, "_st": ~self.isthing,
                  "_seen": self.seen, "_unseen": ~self.seen}
        result = {}
        for suffix, members in groups.items():
            # per_category gives 0 for a category that never occurs.
            absent_as_zero = self.official and suffix in ("_seen", "_unseen")
            chosen = members if absent_as_zero else members & stats["valid"]
            for name in ("pq", "sq", "rq"):
                value = stats[name][chosen].mean().item() * 100 if chosen.any() else math.nan
                result[f"{name.upper()}{suffix}"] = value
        return result
