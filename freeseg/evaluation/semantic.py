"""Semantic segmentation metrics: mIoU over all / seen / unseen classes, hIoU and pixel accuracy.

A (K, K) confusion matrix of pixel counts is the whole state (a sum is all that ranks need to exchange): it is
summed over images and over ranks, and every metric is read off it at the end.

Definitions follow the official FreeSeg evaluator (`GeneralizedSemSegEvaluator`, a copy of
detectron2's SemSegEvaluator as of 2021):
- IoU_k = TP_k / (GT_k + Pred_k - TP_k), with pixels whose ground truth is `ignore_index`
  removed before counting;
- a class enters a mean when its union is non-empty: a class that is neither in the ground
  truth nor predicted anywhere is left out; a class predicted but absent from the ground truth
  enters with IoU 0. (Current detectron2 also leaves out the latter; the official FreeSeg
  numbers were computed with the older rule, which we keep.)
- mIoU_seen / mIoU_unseen are the same means restricted to seen / unseen classes, and
  hIoU = 2 * seen * unseen / (seen + unseen) is their harmonic mean (paper, sec. 4.1);
- pAcc = sum_k TP_k / (number of non-ignored pixels).
All values are returned in percent.
"""

import math

import torch

from freeseg.distributed import all_reduce_sum


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when either is 0, NaN when either is NaN (no class of that kind)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


class SemanticEvaluator:
    """Confusion-matrix accumulator for one label space of K classes.

    Args:
        num_classes: K.
        seen: (K,) bool, True for classes seen in training (defines mIoU_seen / mIoU_unseen).
        ignore_index: ground-truth value of pixels that are not scored.
    """

    def __init__(self, num_classes: int, seen: torch.Tensor, ignore_index: int = 255):
        seen = torch.as_tensor(seen, dtype=torch.bool)
        if seen.shape != (num_classes,):
            raise ValueError(f"SemanticEvaluator: seen has shape {tuple(seen.shape)}, "
                             f"expected ({num_classes},)")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"SemanticEvaluator: ignore_index {ignore_index} is a class id "
                             f"(num_classes={num_classes})")
        self.num_classes = num_classes
        self.seen = seen
        self.ignore_index = ignore_index
        # Rows: ground-truth class, columns: predicted class. int64: COCO-size sums overflow int32.
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # (K, K)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one image. pred: (H, W) class ids in [0, K); gt: (H, W) class ids or ignore_index."""
        pred, gt = torch.as_tensor(pred).cpu(), torch.as_tensor(gt).cpu()
        if pred.shape != gt.shape or pred.dim() != 2:
            raise ValueError(f"SemanticEvaluator.update: pred {tuple(pred.shape)} and gt "
                             f"{tuple(gt.shape)} must be the same (H, W)")
        pred, gt = pred.long().flatten(), gt.long().flatten()  # (H*W,)
        valid = gt != self.ignore_index
        pred, gt = pred[valid], gt[valid]
        K = self.num_classes
        if gt.numel() and (gt.min() < 0 or gt.max() >= K):
            raise ValueError(f"SemanticEvaluator.update: ground-truth id {int(gt.max())} or "
                             f"{int(gt.min())} outside [0, {K}) and not ignore {self.ignore_index}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= K):
            raise ValueError(f"SemanticEvaluator.update: predicted id outside [0, {K})")
        # Pair (gt, pred) -> one index gt*K + pred; bincount is a vectorised 2-D histogram.
        self.confusion += torch.bincount(gt * K + pred, minlength=K * K).view(K, K)

    def all_reduce(self) -> None:
        """Sum the confusion matrix over ranks (every rank then holds the full-dataset matrix)."""
        all_reduce_sum(self.confusion)

    def iou(self) -> torch.Tensor:
        """(K,) float64 IoU in [0, 1]; NaN for classes with an empty union."""
        conf = self.confusion.double()
        tp = conf.diagonal()
        union = conf.sum(dim=1) + conf.sum(dim=0) - tp  # GT_k + Pred_k - TP_k
        return torch.where(union > 0, tp / union, torch.full_like(tp, math.nan))

    def summary(self) -> dict:
        """mIoU, mIoU_seen, mIoU_unseen, hIoU, pAcc (floats) and IoU (K floats), in percent."""
        iou = self.iou() * 100

        def mean(values: torch.Tensor) -> float:
            values = values[~values.isnan()]
            return values.mean().item() if values.numel() else math.nan

        seen, unseen = mean(iou[self.seen]), mean(iou[~self.seen])
        total = self.confusion.sum().item()
        return {
            "mIoU": mean(iou),
            "mIoU_seen": seen,
            "mIoU_unseen": unseen,
            "hIoU": harmonic_mean(seen, unseen),
            "pAcc": 100 * self.confusion.diagonal().sum().item() / total if total else math.nan,
            "IoU": iou.tolist(),
        }
