"""Dataset readers over the prepared layout (what `prepare_data.py` writes).

- `SegmentationDataset`: one sample dict per image with the targets of all three tasks
  (paper section 3.1: one model, one image, semantic + instance + panoptic targets):
  `{"image": uint8 (3, H, W), "sem_seg": int64 (H, W) 255 = ignore, "masks": bool (N, H, W),
  "labels": int64 (N,), "isthing": bool (N,), "image_id", "file_name", "orig_size": (h, w)}`.
  With `base=True` (zero-shot training) unseen classes are ignore in `sem_seg` and have no
  segment. Crowd segments get no mask; their pixels keep their class in `sem_seg`, as in
  detectron2's panoptic mapper. Datasets without panoptic PNGs (VOC, ADE) get one segment per
  class present in the semantic map, with isthing False.
- `SegmentCropDataset`: the prompt stage's data (paper section 3.2): one ground-truth segment
  of a seen class, `{"image": uint8 (3, H, W), "mask": bool (H, W), "label": contiguous class
  id}`, which `transforms.PromptCrop` cuts out for CLIP.
Batching (samples stay a list) and the data order live in `freeseg/engine.py`.

Differences from the official code: no detectron2 dataset registry or mapper classes; every
path comes from the prepared records, and a missing file raises a DataError naming it.
"""

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from freeseg.data.io import DataError, load_json, read_image, read_rgb_image, rgb_to_id

IGNORE = 255


def load_meta(prepared_dir: str) -> dict:
    """`{"dataset", "categories"}` of a prepared dataset (see freeseg/data/categories.py)."""
    return load_json(os.path.join(prepared_dir, "meta.json"), "prepared dataset meta (run prepare_data.py)")


def _data_root(prepared_dir: str) -> str:
    """Record paths are relative to the data root, two levels above `<root>/freeseg/<dataset>`."""
    return os.path.dirname(os.path.dirname(os.path.abspath(prepared_dir)))


def _panoptic_ids(path: str) -> np.ndarray:
    return rgb_to_id(read_image(path, "RGB"))


def _same_size(image: np.ndarray, target: np.ndarray, target_path: str, what: str, image_path: str) -> None:
    """A ground-truth map must cover its image pixel for pixel: one of another size (replaced
    after prepare_data.py checked it, say) would be scored against the wrong pixels."""
    if image.shape[:2] != target.shape[:2]:
        raise DataError(f"{target_path}: {what} is {target.shape[1]}x{target.shape[0]} (WxH) but its image "
                        f"{image_path} is {image.shape[1]}x{image.shape[0]}")


class SegmentationDataset(Dataset):
    """Images of one split of a prepared dataset with semantic, instance and panoptic targets."""

    def __init__(self, prepared_dir: str, split: str, base: bool = False, transform=None) -> None:
        self.prepared_dir = prepared_dir
        self.root = _data_root(prepared_dir)
        self.split, self.base, self.transform = split, base, transform
        self.categories = load_meta(prepared_dir)["categories"]
        self.seen = np.array([c["seen"] for c in self.categories] + [False] * (256 - len(self.categories)))
        self.records = load_json(os.path.join(prepared_dir, f"{split}.json"), f"prepared {split} split")

    def __len__(self) -> int:
        return len(self.records)

    def _path(self, rel: str, what: str) -> str:
        path = os.path.join(self.root, rel)
        if not os.path.isfile(path):
            raise DataError(f"missing {what}: {path} (re-run prepare_data.py)")
        return path

    def _sem_seg_path(self, record: dict) -> str:
        if not self.base:
            return self._path(record["sem_seg_file"], "semantic map")
        name = os.path.basename(record["sem_seg_file"])
        rel = os.path.join(os.path.relpath(self.prepared_dir, self.root), "sem_seg", f"{self.split}_base", name)
        return self._path(rel, f"base-split semantic map (split {self.split!r})")

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image_path, sem_path = self._path(record["file_name"], "image"), self._sem_seg_path(record)
        image = read_rgb_image(image_path)  # (H, W, 3)
        sem = read_image(sem_path)  # (H, W) uint8
        _same_size(image, sem, sem_path, "semantic map", image_path)
        if record.get("panoptic_file"):
            pan_path = self._path(record["panoptic_file"], "panoptic PNG")
            pan = _panoptic_ids(pan_path)
            _same_size(image, pan, pan_path, "panoptic PNG", image_path)
            segs = [s for s in record["segments"]
                    if not s["iscrowd"] and (not self.base or self.seen[s["category_id"]])]
            masks = [pan == s["id"] for s in segs]
            labels = [s["category_id"] for s in segs]
            isthing = [bool(s["isthing"]) for s in segs]
        else:
            labels = [int(c) for c in np.unique(sem) if c != IGNORE]
            masks = [sem == c for c in labels]
            isthing = [False] * len(labels)
        h, w = sem.shape
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),  # (3, H, W)
            "sem_seg": torch.from_numpy(sem.astype(np.int64)),  # (H, W)
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "isthing": torch.tensor(isthing, dtype=torch.bool),
            "image_id": record["image_id"],
            "file_name": record["file_name"],
            "orig_size": (h, w),
        }
        return self.transform(sample) if self.transform is not None else sample


class SegmentCropDataset(Dataset):
    """The ground-truth segments listed in `segments_<split>.json` (the prompt stage's pool).

    Each item is `{"image": uint8 (3, H, W), "mask": bool (H, W), "label": contiguous class id}`;
    `transforms.PromptCrop` (through `engine.SeededDataset`) turns it into CLIP's input.
    """

    def __init__(self, prepared_dir: str, split: str = "train") -> None:
        self.root = _data_root(prepared_dir)
        self.index = load_json(os.path.join(prepared_dir, f"segments_{split}.json"), "prompt-stage segment index")
        records = load_json(os.path.join(prepared_dir, f"{split}.json"), f"prepared {split} split")
        self.records = {r["image_id"]: r for r in records}
        self.categories = load_meta(prepared_dir)["categories"]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict:
        entry = self.index[index]
        record = self.records[entry["image_id"]]
        image_path = os.path.join(self.root, record["file_name"])
        image = read_rgb_image(image_path)
        target = os.path.join(self.root, record.get("panoptic_file") or record["sem_seg_file"])
        if record.get("panoptic_file"):
            ids = _panoptic_ids(target)
            _same_size(image, ids, target, "panoptic PNG", image_path)
            mask = ids == entry["segment_id"]
        else:  # semantic-only datasets: the segment is the whole class region
            sem = read_image(target)
            _same_size(image, sem, target, "semantic map", image_path)
            mask = sem == entry["category_id"]
        if not mask.any():
            raise DataError(f"segment {entry['segment_id']} of image {record['file_name']} is empty in the "
                            f"prepared annotation (stale segments index? re-run prepare_data.py --force)")
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),  # (3, H, W)
                "mask": torch.from_numpy(mask), "label": int(entry["category_id"])}
