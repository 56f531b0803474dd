"""Per-task training targets built from one annotation (paper section 3.2, "all-task training").

FreeSeg trains one network for three tasks; at every iteration one task is drawn and the
ground truth of the *same* image is turned into that task's set of (class, binary mask) pairs:

    semantic   one mask per class present in `sem_seg` (ignore pixels, 255, belong to none)
    instance   one mask per thing instance
    panoptic   thing instances + one mask per stuff class

Input is the sample dict every segmentation dataset returns (shared contract):
    "sem_seg": int64 (H, W), 255 = ignore
    "masks":   bool  (N, H, W) panoptic segments (one per thing instance, one per stuff class)
    "labels":  int64 (N,) contiguous class ids
    "isthing": bool  (N,)
Output: {"labels": int64 (N,), "masks": bool (N, H, W)}; N may be 0 (masks of shape (0, H, W)).

Official code: bytedance/FreeSeg `mask2former/data/dataset_mappers/coco_full_task_new_baseline_
dataset_mapper.py` builds "sem_instances" (np.unique of the label map minus the ignore label),
"ins_instances" (non-crowd thing segments) and "pan_instances" (all non-crowd segments) inside the
data mapper. Differences: here the targets are derived on demand from one sample dict, so a
dataset stores a single annotation and only the drawn task's masks are built; crowd segments are
expected to be dropped by the dataset already; stuff segments that share a class are merged, so
a panoptic target holds at most one mask per stuff class even if the annotation splits one.
"""

import torch
import torch.nn.functional as F

TASKS = ("semantic", "instance", "panoptic")
IGNORE_LABEL = 255  # "ignore" value of the semantic label maps (shared contract)


def _check_sample(sample: dict, task: str) -> None:
    """Raise a clear error naming the field when `sample` does not follow the contract."""
    if task not in TASKS:
        raise ValueError(f"task_targets: unknown task {task!r}; expected one of {TASKS}")
    needed = ("sem_seg",) if task == "semantic" else ("masks", "labels", "isthing")
    for key in needed:
        if key not in sample:
            raise KeyError(f"task_targets: sample has no field {key!r} needed for the {task} task")
    if task == "semantic":
        if sample["sem_seg"].dim() != 2:
            raise ValueError(f"task_targets: sample['sem_seg'] must be (H, W), got {tuple(sample['sem_seg'].shape)}")
        return
    masks, labels, isthing = sample["masks"], sample["labels"], sample["isthing"]
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(
            f"task_targets: sample['masks'] must be bool (N, H, W), got {masks.dtype} {tuple(masks.shape)}"
        )
    if labels.shape != (masks.shape[0],) or isthing.shape != (masks.shape[0],):
        raise ValueError(
            f"task_targets: sample['labels'] {tuple(labels.shape)} and sample['isthing'] "
            f"{tuple(isthing.shape)} must both be ({masks.shape[0]},), one entry per mask"
        )


def semantic_targets(sem_seg: torch.Tensor) -> dict:
    """One mask per class present in the label map `sem_seg` (H, W); ignore pixels excluded."""
    classes = torch.unique(sem_seg)  # sorted
    classes = classes[classes != IGNORE_LABEL]
    masks = sem_seg[None] == classes[:, None, None]  # (N, H, W)
    return {"labels": classes.long(), "masks": masks}


def _merge_stuff(masks: torch.Tensor, labels: torch.Tensor, isthing: torch.Tensor) -> dict:
    """Things kept one per instance; stuff segments of the same class OR-ed into one mask.

    Order follows the first appearance of each segment (things) or class (stuff).
    """
    keep_masks: list[torch.Tensor] = []
    keep_labels: list[int] = []
    stuff_slot: dict[int, int] = {}  # stuff class -> index in keep_masks
    for mask, label, thing in zip(masks, labels.tolist(), isthing.tolist()):
        if not thing and label in stuff_slot:
            keep_masks[stuff_slot[label]] = keep_masks[stuff_slot[label]] | mask
            continue
        if not thing:
            stuff_slot[label] = len(keep_masks)
        keep_masks.append(mask)
        keep_labels.append(label)
    if not keep_masks:
        return {"labels": labels.new_zeros(0), "masks": masks.new_zeros((0, *masks.shape[1:]))}
    labels = torch.tensor(keep_labels, dtype=torch.long, device=labels.device)
    return {"labels": labels, "masks": torch.stack(keep_masks)}


def task_targets(sample: dict, task: str) -> dict:
    """The targets of `task` ("semantic" | "instance" | "panoptic") for one sample.

    Returns {"labels": int64 (N,), "masks": bool (N, H, W)}.
    """
    _check_sample(sample, task)
    if task == "semantic":
        return semantic_targets(sample["sem_seg"])
    masks, labels, isthing = sample["masks"], sample["labels"].long(), sample["isthing"].bool()
    if task == "instance":
        return {"labels": labels[isthing], "masks": masks[isthing]}
    return _merge_stuff(masks, labels, isthing)


def batch_targets(
    samples: list[dict],
    task: str,
    pad_to: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> list[dict]:
    """`task_targets` for every sample of a batch.

    pad_to: (H, W) of the padded batch tensor. When a collate function pads images of different
    sizes to one tensor (bottom/right), the masks must be padded the same way so that a
    prediction upsampled to the mask size lines up with its image; padding is background (False),
    as in the official `prepare_targets`.
    """
    out = []
    for sample in samples:
        target = task_targets(sample, task)
        masks = target["masks"]
        if pad_to is not None:
            pad_h, pad_w = pad_to[0] - masks.shape[-2], pad_to[1] - masks.shape[-1]
            if pad_h < 0 or pad_w < 0:
                raise ValueError(f"batch_targets: masks {tuple(masks.shape[-2:])} larger than pad_to {tuple(pad_to)}")
            masks = F.pad(masks, (0, pad_w, 0, pad_h), value=False)
        out.append({"labels": target["labels"].to(device), "masks": masks.to(device)})
    return out
