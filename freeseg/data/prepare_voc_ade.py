"""Convert Pascal VOC 2012 (aug) and ADE20K-150 into the prepared layout (semantic only).

Raw layouts read (detectron2 conventions under one data root, docs/design.md, "Data layouts"):

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClassAug/<id>.png   single-channel: 0 background, 1..20 classes, 255 border
    VOC2012/train.txt, VOC2012/val.txt      one <id> per line (the official prepare_voc_sem_seg.py
                                             reads exactly these); if absent, the SBD-aug lists
                                             ImageSets/Segmentation/{train_aug,val}.txt
    ADEChallengeData2016/images/{training,validation}/<id>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<id>.png   0 "other", 1..150 classes

What is written under `<root>/freeseg/{voc,ade}/` (the layout every dataset shares):
meta.json; train.json / val.json records (`panoptic_file` null; one segment per class present,
derived from the semantic map); sem_seg/train, sem_seg/train_base (unseen classes -> 255),
sem_seg/val as uint8 PNGs with contiguous ids and 255 = ignore; segments_train.json, the
prompt-stage index.

Id mappings (official scripts, bytedance/FreeSeg datasets/): VOC 0 (background) -> 255 and
1..20 -> 0..19, 255 stays 255 (prepare_voc_sem_seg.py, `full_clsID_to_trID`); ADE 0 -> 255 and
1..150 -> 0..149 (prepare_ade20k_sem_seg_novel.py, `img - 1` in uint8).

Deliberate differences from the official scripts:
- The base split keeps the 20 / 150 contiguous ids and sets unseen classes to 255; the official
  scripts renumber the seen classes 0..14 / 0..134 in a separate label space.
- A label value outside the dataset's range, an annotation of the wrong size or mode, a missing
  annotation or a corrupt image stop the conversion with a DataError naming the file (the
  official scripts map unknown values to ignore silently or fail later).
- The official VOC script writes no label file when a map is all ignore, which drops base-split
  images containing only unseen classes; here every image keeps its record, and the dataset
  reader decides (such an image has no seen segment).
- ADE20K is prepared for semantic segmentation only; the official instance/panoptic ADE data
  (prepare_ade20k_{ins,pan}_seg_novel.py, from the full ADE20K release) is not converted.
"""

import os
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from freeseg.data.categories import get_categories, raw_to_contiguous_lut
from freeseg.data.io import DataError, mask_bbox, parallel_map, read_image, require_dir, save_json_atomic, save_png_atomic

IGNORE = 255
VOC_LISTS = {
    "train": ("train.txt", "ImageSets/Segmentation/train_aug.txt"),
    "val": ("val.txt", "ImageSets/Segmentation/val.txt"),
}
ADE_SPLITS = {"train": "training", "val": "validation"}


@dataclass(frozen=True)
class _Job:
    """One image to convert (picklable for `parallel_map`)."""

    root: str
    image: str  # relative to root
    annotation: str  # absolute path of the raw label PNG
    out_full: str  # relative to root
    out_base: str | None  # relative to root; None outside the training split
    image_id: int


def _describe(valid: np.ndarray) -> str:
    """'0-20, 255' for a boolean table of allowed label values."""
    values, runs = np.flatnonzero(valid).tolist(), []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _check_labels(ann_path: str, image_shape: tuple[int, ...], valid_raw: np.ndarray) -> np.ndarray:
    """Read a raw label PNG and check mode, size and values; returns (H, W) uint8."""
    try:
        with Image.open(ann_path) as img:
            mode = img.mode
    except (OSError, SyntaxError) as err:
        raise DataError(f"{ann_path}: cannot decode annotation ({err})") from None
    if mode not in ("L", "P"):
        raise DataError(f"{ann_path}: expected a single-channel label PNG (mode L or P), got mode {mode}")
    labels = read_image(ann_path)  # P mode: the palette indices are the labels
    if labels.shape != tuple(image_shape[:2]):
        raise DataError(f"{ann_path}: annotation is {labels.shape[1]}x{labels.shape[0]} (WxH) but its image "
                        f"is {image_shape[1]}x{image_shape[0]}")
    counts = np.bincount(labels.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~valid_raw)
    if len(bad):
        raise DataError(f"{ann_path}: label values {bad.tolist()} out of range (allowed: {_describe(valid_raw)})")
    return labels


def _segments(sem: np.ndarray, categories: list[dict]) -> list[dict]:
    """One segment per class present in a contiguous map: area and COCO bbox [x, y, w, h]."""
    segments = []
    for c in np.unique(sem):
        if c == IGNORE:
            continue
        mask = sem == c
        segments.append({
            "id": int(c) + 1,  # unique per image and never 0 (0 means "no segment" in panoptic ids)
            "category_id": int(c), "isthing": bool(categories[c]["isthing"]), "iscrowd": 0,
            "area": int(mask.sum()), "bbox": mask_bbox(mask),
        })
    return segments


def _convert(job: _Job, lut: np.ndarray, base_lut: np.ndarray, valid_raw: np.ndarray, categories: list[dict],
             force: bool) -> dict:
    """Convert one image's labels (or reuse finished outputs) and return its record."""
    full_path = os.path.join(job.root, job.out_full)
    outputs = [full_path] + ([os.path.join(job.root, job.out_base)] if job.out_base else [])
    if not force and all(os.path.isfile(p) for p in outputs):
        sem = read_image(full_path)  # finished earlier: only the record is rebuilt
    else:
        image_path = os.path.join(job.root, job.image)
        if not os.path.isfile(job.annotation):
            raise DataError(f"image without annotation: {image_path} (expected {job.annotation})")
        image = read_image(image_path)  # decodes: a corrupt image fails here, naming the file
        raw = _check_labels(job.annotation, image.shape, valid_raw)
        sem = lut[raw]
        save_png_atomic(sem, full_path)
        if job.out_base:
            save_png_atomic(base_lut[raw], outputs[1])
    return {"image_id": job.image_id, "file_name": job.image, "height": int(sem.shape[0]),
            "width": int(sem.shape[1]), "sem_seg_file": job.out_full, "panoptic_file": None,
            "segments": _segments(sem, categories)}


def prompt_index(records: list[dict], categories: list[dict], per_class: int, seed: int = 0) -> list[dict]:
    """Segments of seen classes for the prompt stage, at most `per_class` per class.

    Classes with more segments keep a random subset (fixed seed, so re-runs agree).
    """
    by_class: dict[int, list[dict]] = {}
    for rec in records:
        for seg in rec["segments"]:
            if categories[seg["category_id"]]["seen"] and not seg["iscrowd"]:
                by_class.setdefault(seg["category_id"], []).append(
                    {"image_id": rec["image_id"], "segment_id": seg["id"], "category_id": seg["category_id"]})
    rng = np.random.default_rng(seed)
    index = []
    for c in sorted(by_class):
        items = by_class[c]
        if len(items) > per_class:
            items = [items[i] for i in sorted(rng.choice(len(items), per_class, replace=False))]
        index.extend(items)
    return index


def _write(root: str, dataset: str, splits: dict[str, list[tuple[str, str, str]]], valid_raw: np.ndarray,
           force: bool, workers: int, per_class: int) -> str:
    """Convert every split; `splits[name]` lists (stem, image relative to root, annotation path)."""
    categories = get_categories(dataset)
    lut, base_lut = raw_to_contiguous_lut(categories), raw_to_contiguous_lut(categories, base=True)
    out_rel = os.path.join("freeseg", dataset)
    out_dir = os.path.join(root, out_rel)
    save_json_atomic({"dataset": dataset, "categories": categories}, os.path.join(out_dir, "meta.json"))
    fn = partial(_convert, lut=lut, base_lut=base_lut, valid_raw=valid_raw, categories=categories, force=force)
    for split, items in splits.items():
        jobs = [
            _Job(root=root, image=image, annotation=ann, image_id=i,
                 out_full=os.path.join(out_rel, "sem_seg", split, stem + ".png"),
                 out_base=os.path.join(out_rel, "sem_seg", f"{split}_base", stem + ".png") if split == "train" else None)
            for i, (stem, image, ann) in enumerate(sorted(items))
        ]
        records = parallel_map(fn, jobs, workers, desc=f"{dataset} {split}")
        save_json_atomic(records, os.path.join(out_dir, f"{split}.json"))
        if split == "train":
            index = prompt_index(records, categories, per_class)
            save_json_atomic(index, os.path.join(out_dir, f"segments_{split}.json"))
    return out_dir


def _voc_valid() -> np.ndarray:
    valid = np.zeros(256, dtype=bool)
    valid[0:21] = True  # background + 20 classes
    valid[IGNORE] = True  # object borders ("void")
    return valid


def prepare_voc(root: str, force: bool = False, workers: int = 1, per_class: int = 1000) -> str:
    """Pascal VOC 2012 with the SBD-augmented training labels -> `<root>/freeseg/voc/`."""
    voc = require_dir(os.path.join(root, "VOC2012"), "Pascal VOC 2012 folder")
    require_dir(os.path.join(voc, "JPEGImages"), "VOC images folder")
    ann_dir = require_dir(os.path.join(voc, "SegmentationClassAug"), "VOC augmented label folder")
    splits = {}
    for split, candidates in VOC_LISTS.items():
        found = [os.path.join(voc, c) for c in candidates if os.path.isfile(os.path.join(voc, c))]
        if not found:
            raise DataError(f"missing VOC {split} list: expected one of "
                            f"{', '.join(os.path.join(voc, c) for c in candidates)}")
        with open(found[0]) as f:
            stems = [line.split()[0] for line in f if line.strip()]
        splits[split] = [(s, os.path.join("VOC2012", "JPEGImages", s + ".jpg"), os.path.join(ann_dir, s + ".png"))
                         for s in stems]
    return _write(root, "voc", splits, _voc_valid(), force, workers, per_class)


def prepare_ade(root: str, force: bool = False, workers: int = 1, per_class: int = 1000) -> str:
    """ADEChallengeData2016 (SceneParsing, 150 classes) -> `<root>/freeseg/ade/`."""
    ade = require_dir(os.path.join(root, "ADEChallengeData2016"), "ADE20K folder")
    valid = np.zeros(256, dtype=bool)
    valid[0:151] = True  # 0 "other" + 150 classes
    splits = {}
    for split, raw in ADE_SPLITS.items():
        images = require_dir(os.path.join(ade, "images", raw), f"ADE20K {raw} images folder")
        ann_dir = require_dir(os.path.join(ade, "annotations", raw), f"ADE20K {raw} annotations folder")
        stems = sorted(os.path.splitext(n)[0] for n in os.listdir(images) if n.endswith(".jpg"))
        splits[split] = [(s, os.path.join("ADEChallengeData2016", "images", raw, s + ".jpg"),
                          os.path.join(ann_dir, s + ".png")) for s in stems]
    return _write(root, "ade", splits, valid, force, workers, per_class)
