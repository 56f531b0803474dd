"""Instance segmentation mask AP (COCO protocol) overall / seen / unseen, via pycocotools.

Predictions are stored run-length encoded per image (a (n, H, W) bool stack would not fit in
memory for a whole validation set), gathered from all ranks, and scored by pycocotools'
COCOeval with iouType "segm": AP averaged over IoU thresholds 0.50:0.05:0.95, 101 recall
points, at most 100 detections per image.

Seen / unseen AP: the per-category AP is read from COCOeval's precision array
(IoU x recall x category x area x maxDets) at area "all" and 100 detections, entries of -1
(category without ground truth) left out; AP_seen / AP_unseen are the means over seen / unseen
thing categories, as the official FreeSeg `COCOEvaluator` computes them
(evaluation/instance_seg_evaluation.py, `_derive_coco_results`). A category without ground
truth has no AP (NaN): we leave it out of its group's mean; the official `np.mean` lets it make
the group NaN (`official=True`). Every category has the same number of entries, so the mean over
all categories equals COCOeval's own AP.

Differences from the official code: no detectron2 dataset registry or JSON round trip; only
the images passed to `update` are scored (a partial evaluation is not charged for images it
never ran); seen/unseen come from the category list instead of hard-coded class names.
"""

import contextlib
import io
import json
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from freeseg.distributed import all_gather_object


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """(n, H, W) bool -> n COCO RLEs (pycocotools wants Fortran-ordered uint8 (H, W, n))."""
    array = torch.as_tensor(masks).cpu().numpy().astype(np.uint8).transpose(1, 2, 0)  # (H, W, n)
    return mask_util.encode(np.asfortranarray(array))


class InstanceEvaluator:
    """Mask AP accumulator.

    Args:
        categories: [{"id", "isthing", "seen"}, ...]; only thing categories are scored.
        official: AP_seen / AP_unseen are the plain mean over the group's categories, NaN if one
            has no ground truth, as the official evaluator's `np.mean`.
    """

    def __init__(self, categories: list[dict], official: bool = False):
        things = [c for c in categories if c["isthing"]]
        self.thing_ids = [int(c["id"]) for c in things]
        self.seen = {int(c["id"]): bool(c["seen"]) for c in things}
        self.stuff_ids = {int(c["id"]) for c in categories if not c["isthing"]}
        self.official = official
        self.images: dict[int, dict] = {}  # image_id -> {"id", "height", "width"}
        self.gt: dict[int, list[dict]] = {}  # image_id -> ground-truth annotations (no "id")
        self.predictions: dict[int, list[dict]] = {}  # image_id -> detections ([] if none)
        self._gt_to_gather: set[int] = set()  # image ids whose ground truth came from samples

    def add_ground_truth(self, image_id: int, masks: torch.Tensor, labels: torch.Tensor,
                         iscrowd: torch.Tensor | None = None) -> None:
        """Ground truth of one image from a sample: masks (N, H, W) bool, labels (N,), iscrowd (N,).

        Stuff segments (samples hold them too) are skipped. iscrowd defaults to 0; pass the
        panoptic segments' flags (or use load_ground_truth) so crowd regions are not scored.
        """
        image_id = int(image_id)
        masks = torch.as_tensor(masks, dtype=torch.bool)
        labels = torch.as_tensor(labels).tolist()
        iscrowd = [0] * len(labels) if iscrowd is None else torch.as_tensor(iscrowd).tolist()
        if masks.dim() != 3 or not masks.shape[0] == len(labels) == len(iscrowd):
            raise ValueError(f"InstanceEvaluator.add_ground_truth(image {image_id}): masks "
                             f"{tuple(masks.shape)}, {len(labels)} labels, {len(iscrowd)} iscrowd")
        self._check_labels(labels, image_id, allow_stuff=True)
        keep = [i for i, label in enumerate(labels) if label not in self.stuff_ids]
        rles = encode_masks(masks[keep]) if keep else []
        self.images[image_id] = {"id": image_id, "height": masks.shape[1], "width": masks.shape[2]}
        self.gt[image_id] = [
            {"image_id": image_id, "category_id": int(labels[i]), "segmentation": rle,
             "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(),
             "iscrowd": int(iscrowd[i])}
            for i, rle in zip(keep, rles)
        ]
        self._gt_to_gather.add(image_id)

    def load_ground_truth(self, path: str | os.PathLike) -> None:
        """Ground truth of every image in a COCO instances JSON (contiguous category ids)."""
        with open(path) as f:
            data = json.load(f)
        for key in ("images", "annotations"):
            if key not in data:
                raise KeyError(f"{path}: no '{key}' field, not a COCO instances file")
        for image in data["images"]:
            self.images[int(image["id"])] = {k: image[k] for k in ("id", "height", "width")}
            self.gt.setdefault(int(image["id"]), [])
        for ann in data["annotations"]:
            if ann["image_id"] not in self.images:
                raise KeyError(f"{path}: annotation {ann.get('id')} refers to unknown image "
                               f"{ann['image_id']}")
            self._check_labels([ann["category_id"]], ann["image_id"], allow_stuff=False)
            ann = {k: v for k, v in ann.items() if k != "id"}  # ids are re-assigned in summary
            self.gt[ann["image_id"]].append(ann)

    def _check_labels(self, labels: list[int], image_id: int, allow_stuff: bool) -> None:
        allowed = set(self.thing_ids) | (self.stuff_ids if allow_stuff else set())
        unknown = sorted({int(label) for label in labels} - allowed)
        if unknown:
            raise ValueError(f"InstanceEvaluator (image {image_id}): category ids {unknown} are "
                             f"not thing categories {self.thing_ids}")

    def update(self, image_id: int, masks: torch.Tensor, scores: torch.Tensor,
               labels: torch.Tensor) -> None:
        """Predictions for one image: masks (n, H, W) bool, scores (n,), labels (n,)."""
        image_id = int(image_id)
        masks = torch.as_tensor(masks, dtype=torch.bool)
        scores, labels = torch.as_tensor(scores).tolist(), torch.as_tensor(labels).tolist()
        if masks.dim() != 3 or not masks.shape[0] == len(scores) == len(labels):
            raise ValueError(f"InstanceEvaluator.update(image {image_id}): masks "
                             f"{tuple(masks.shape)}, {len(scores)} scores, {len(labels)} labels")
        self._check_labels(labels, image_id, allow_stuff=False)
        known = self.images.get(image_id)
        if known is not None and tuple(masks.shape[1:]) != (known["height"], known["width"]):
            raise ValueError(f"InstanceEvaluator.update(image {image_id}): masks are "
                             f"{tuple(masks.shape[1:])}, ground truth is "
                             f"({known['height']}, {known['width']})")
        rles = encode_masks(masks) if len(labels) else []
        self.predictions[image_id] = [
            {"image_id": image_id, "category_id": int(label), "segmentation": rle,
             "score": float(score)}
            for rle, score, label in zip(rles, scores, labels)
        ]

    def gather(self) -> None:
        """Collect every rank's predictions (and sample ground truth) on every rank.

        An image seen by two ranks (a sampler padding its last batch) is kept once.
        """
        local_gt = {i: (self.images[i], self.gt[i]) for i in self._gt_to_gather}
        for predictions, gt in all_gather_object((self.predictions, local_gt)):
            for image_id, (image, anns) in gt.items():
                self.images.setdefault(image_id, image)
                self.gt.setdefault(image_id, anns)
            for image_id, dets in predictions.items():
                self.predictions.setdefault(image_id, dets)

    def summary(self) -> dict:
        """{"AP", "AP50", "AP75", "APs", "APm", "APl", "AP_seen", "AP_unseen"} in percent."""
        if not self.thing_ids:
            raise ValueError("InstanceEvaluator.summary: the categories hold no thing category")
        if not self.predictions:
            raise ValueError("InstanceEvaluator.summary: no image was passed to update()")
        missing = sorted(set(self.predictions) - set(self.gt))
        if missing:
            raise KeyError(f"InstanceEvaluator.summary: no ground truth for images {missing[:10]}")
        image_ids = sorted(self.predictions)
        # COCOeval treats a matched ground-truth id of 0 as "unmatched": ids must start at 1.
        annotations = [dict(ann, id=n + 1) for n, ann in
                       enumerate(a for i in image_ids for a in self.gt[i])]
        # Copies: loadRes writes "area", "bbox", "id" into the dicts it is given.
        detections = [dict(d) for i in image_ids for d in self.predictions[i]]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_gt = COCO()
            coco_gt.dataset = {"images": [self.images[i] for i in image_ids],
                               "annotations": annotations,
                               "categories": [{"id": c} for c in self.thing_ids]}
            coco_gt.createIndex()
            # loadRes cannot take an empty list; an empty result set scores AP 0.
            coco_dt = coco_gt.loadRes(detections) if detections else COCO()
            if not detections:
                coco_dt.dataset = {"images": [], "annotations": [], "categories": []}
                coco_dt.createIndex()
            coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        # COCOeval reports -1 for a metric without ground truth (e.g. no small object).
        result = {n: 100 * float(s) if s >= 0 else math.nan
                  for n, s in zip(names, coco_eval.stats[:6])}
        per_category = self._per_category_ap(coco_eval)
        for suffix, want_seen in (("_seen", True), ("_unseen", False)):
            aps = [ap for c, ap in per_category.items()
                   if self.seen[c] == want_seen and (self.official or not math.isnan(ap))]
            result[f"AP{suffix}"] = float(np.mean(aps)) if aps else math.nan
        return result

    @staticmethod
    def _per_category_ap(coco_eval: COCOeval) -> dict[int, float]:
        """{category id: AP in percent, NaN without ground truth} from the precision array."""
        precision = coco_eval.eval["precision"]  # (T IoUs, R recalls, K, A areas, M maxDets)
        result = {}
        for k, category_id in enumerate(coco_eval.params.catIds):
            values = precision[:, :, k, 0, -1]  # area "all", 100 detections
            values = values[values > -1]
            result[category_id] = 100 * float(values.mean()) if values.size else math.nan
        return result
