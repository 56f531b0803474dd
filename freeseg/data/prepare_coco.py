"""Convert COCO (and the toy world, which uses the same raw layout) into the prepared layout.

Raw layout read (detectron2 conventions, docs/design.md, "Data layouts"), for S in train, val:

    coco/{S}2017/*.jpg                           images (the toy world: *.png)
    coco/annotations/panoptic_{S}2017.json       COCO panoptic: images, segments_info, categories
    coco/panoptic_{S}2017/*.png                  RGB-encoded segment ids (id = R + 256 G + 256^2 B)
    coco/annotations/instances_{S}2017.json      COCO instances (polygons or RLE)
    coco/stuffthingmaps/{S}2017/*.png            COCO-Stuff labels: category id - 1, 255 unlabeled

Written under `<root>/freeseg/coco/` (COCO-Stuff's 171 categories: training, mIoU, mask AP):
meta.json; {S}.json records; sem_seg/{S}/ (171 contiguous ids, 255 ignore); sem_seg/train_base/
(unseen -> 255); panoptic/{S}/ + panoptic_{S}.json (the joined segments below, COCO panoptic
format); instances_{S}.json (the raw instance annotations, contiguous category ids: the standard
mask-AP ground truth); segments_train.json (prompt-stage index, seen classes, per-class cap).

And under `<root>/freeseg/coco_panoptic/` (val only; detectron2's 133 COCO panoptic classes,
the set the official panoptic PQ uses): the raw panoptic PNGs and JSON with contiguous ids, the
panoptic-derived semantic maps, and instances_val.json in the 133-class ids.

Joining the tasks (as the official `datasets/prepare_coco_alldata.py` does): the training
segments of an image are its COCO panoptic *thing* segments plus one segment per COCO-Stuff
*stuff* class of its stuffthingmap (COCO panoptic's merged stuff classes such as "tree-merged"
do not exist in the 171-class space and are replaced by the finer stuffthingmap classes).
Deliberate differences: where a thing segment and a stuffthingmap stuff pixel disagree, the
thing wins (the official script lets the stuff overwrite it); segment ids are renumbered
1..N per image; every input is checked and a problem raises a DataError naming the file.
"""

import functools
import os

import numpy as np

from freeseg.data.categories import get_categories, raw_to_contiguous_lut
from freeseg.data.io import (DataError, id_to_rgb, load_json, mask_bbox, parallel_map, read_image, require_dir,
                             rgb_to_id, save_json_atomic, save_png_atomic)
from freeseg.data.prepare_voc_ade import prompt_index

SPLITS = ("train", "val")


def _seen_lut(categories: list[dict]) -> np.ndarray:
    """(256,) uint8: contiguous id -> itself for seen classes, 255 for unseen ones and 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for c in categories:
        if c["seen"]:
            lut[c["id"]] = c["id"]
    return lut


def _read_checked(path: str, hw: tuple[int, int], what: str, mode: str | None = None) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"missing {what}: {path}")
    array = read_image(path, mode)
    if array.shape[:2] != hw:
        raise DataError(f"{path}: {what} is {array.shape[1]}x{array.shape[0]} (WxH) but the image is "
                        f"{hw[1]}x{hw[0]} (panoptic JSON height/width)")
    return array


def _convert_image(job: dict, ctx: dict) -> dict:
    """Check one image's inputs, write its outputs, return its record (see module docstring)."""
    hw = (job["height"], job["width"])
    image_path = os.path.join(ctx["root"], job["file_name"])
    image = read_image(image_path)  # full decode: a truncated or corrupt file fails here
    if image.shape[:2] != hw:
        raise DataError(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} (WxH) but "
                        f"{ctx['pan_json']} says {hw[1]}x{hw[0]}")
    pan_path = os.path.join(ctx["pan_dir"], job["pan_file"])
    pan = rgb_to_id(_read_checked(pan_path, hw, "panoptic PNG", "RGB"))
    infos = {s["id"]: s for s in job["segments_info"]}
    stray = set(np.unique(pan).tolist()) - set(infos) - {0}
    if stray:
        raise DataError(f"{pan_path}: segment ids {sorted(stray)[:5]} are not in segments_info of "
                        f"image {job['image_id']} in {ctx['pan_json']}")
    to_contig = ctx["to_contig"]  # raw panoptic category id -> contiguous id, or -1 (merged stuff)
    out_pan = np.zeros(hw, dtype=np.int64)
    segments = []

    def add(mask: np.ndarray, cat: int, iscrowd: int) -> None:
        out_pan[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": cat, "isthing": ctx["isthing"][cat],
                         "iscrowd": iscrowd, "area": int(mask.sum()), "bbox": mask_bbox(mask)})

    for seg_id, info in infos.items():
        cat = to_contig[info["category_id"]]
        mask = pan == seg_id
        if cat >= 0 and mask.any() and (ctx["mode"] == "panoptic" or ctx["isthing"][cat]):
            add(mask, cat, int(info.get("iscrowd", 0)))
    if ctx["mode"] == "stuff":
        stuff_path = os.path.join(ctx["stuff_dir"], job["pan_file"])
        raw = _read_checked(stuff_path, hw, "stuffthingmaps label PNG")
        if raw.ndim != 2:
            raise DataError(f"{stuff_path}: expected a single-channel label PNG, got shape {raw.shape}")
        unknown = np.setdiff1d(np.unique(raw), ctx["valid_raw"])
        if len(unknown):
            raise DataError(f"{stuff_path}: unknown category ids {unknown.tolist()} (label value = COCO "
                            f"category id - 1; known: the {len(ctx['isthing'])} classes of {ctx['dataset']}, 255)")
        sem = ctx["lut"][raw]
        things = out_pan > 0
        for cat in np.unique(sem):
            if cat != 255 and not ctx["isthing"][cat] and (mask := (sem == cat) & ~things).any():
                add(mask, int(cat), 0)
    else:  # semantic map derived from the panoptic segments (crowd included), as detectron2 does
        sem = np.full(hw, 255, dtype=np.uint8)
        for seg in segments:
            sem[out_pan == seg["id"]] = seg["category_id"]
    stem = os.path.splitext(job["pan_file"])[0]
    out = {k: os.path.join(ctx["out_rel"], *parts, f"{stem}.png") for k, parts in
           (("sem", ("sem_seg", ctx["split"])), ("base", ("sem_seg", f"{ctx['split']}_base")),
            ("pan", ("panoptic", ctx["split"])))}
    writes = [(sem, out["sem"]), (id_to_rgb(out_pan), out["pan"])]
    if ctx["split"] == "train":
        writes.append((ctx["base_lut"][sem], out["base"]))
    for array, rel in writes:
        if ctx["force"] or not os.path.isfile(os.path.join(ctx["root"], rel)):
            save_png_atomic(array, os.path.join(ctx["root"], rel))
    return {"image_id": job["image_id"], "file_name": job["file_name"], "height": hw[0], "width": hw[1],
            "sem_seg_file": out["sem"], "panoptic_file": out["pan"], "segments": segments}


def _jobs(raw_dir: str, root: str, split: str, pan_json: str, pan: dict) -> list[dict]:
    """Pair every image of the panoptic JSON with its annotation; check nothing is unpaired."""
    image_dir = require_dir(os.path.join(raw_dir, f"{split}2017"), f"{split} image directory")
    anns = {a["image_id"]: a for a in pan["annotations"]}
    jobs = []
    for img in pan["images"]:
        if img["id"] not in anns:
            raise DataError(f"{os.path.join(image_dir, img['file_name'])}: image without annotation "
                            f"(no entry for image_id {img['id']} in 'annotations' of {pan_json})")
        ann = anns[img["id"]]
        jobs.append({"image_id": img["id"], "height": img["height"], "width": img["width"],
                     "file_name": os.path.relpath(os.path.join(image_dir, img["file_name"]), root),
                     "pan_file": ann["file_name"], "segments_info": ann["segments_info"]})
    listed = {img["file_name"] for img in pan["images"]}
    extra = sorted(n for n in os.listdir(image_dir) if n not in listed and not n.startswith("."))
    if extra:
        raise DataError(f"{os.path.join(image_dir, extra[0])}: image without annotation (not in {pan_json}; "
                        f"{len(extra)} such files)")
    return sorted(jobs, key=lambda j: j["image_id"])


def _category_map(categories: list[dict], json_cats: list[dict], offset: int, json_path: str,
                  strict: bool) -> dict[int, int]:
    """JSON category id -> contiguous id, or -1 for a stuff class we replace (only if not `strict`).

    `offset`: JSON id = raw_id + offset. Ids the JSON does not declare are absent.
    """
    by_json_id = {c["raw_id"] + offset: c for c in categories}
    to_contig = {}
    for jc in json_cats:
        ours = by_json_id.get(jc["id"])
        if ours is None and (strict or jc.get("isthing", 1)):
            raise DataError(f"{json_path}: unknown category id {jc['id']} ({jc.get('name')!r}); expected one "
                            f"of the {len(categories)} categories of this dataset")
        to_contig[jc["id"]] = ours["id"] if ours is not None else -1
    return to_contig


def _instances(raw_dir: str, split: str, categories: list[dict], offset: int, images: list[dict]) -> dict:
    """The raw instance annotations of the converted images with contiguous category ids."""
    path = os.path.join(raw_dir, "annotations", f"instances_{split}2017.json")
    inst = load_json(path, "COCO instances annotations")
    to_contig = _category_map(categories, inst["categories"], offset, path, strict=True)
    image_ids = {img["id"] for img in images}
    anns = []
    for ann in inst["annotations"]:
        cat = to_contig.get(ann["category_id"], -1)
        if cat < 0:
            raise DataError(f"{path}: annotation {ann.get('id')} has unknown category id {ann['category_id']}")
        if ann["image_id"] in image_ids:
            anns.append({**ann, "category_id": cat})
    cats = [{"id": c["id"], "name": c["name"]} for c in categories if c["isthing"]]
    return {"images": images, "annotations": anns, "categories": cats}


def convert_coco_layout(root: str, raw_name: str, dataset: str, mode: str, splits: tuple[str, ...] = SPLITS,
                        force: bool = False, workers: int = 1, per_class: int = 1000) -> str:
    """Convert `<root>/<raw_name>/` into `<root>/freeseg/<dataset>/`; returns the output folder.

    mode "stuff": things from panoptic + stuff from stuffthingmaps (COCO-Stuff style, training);
    mode "panoptic": all segments from the panoptic PNGs (the 133-class panoptic evaluation).
    A split whose `<split>.json` already exists is skipped unless `force`.
    """
    raw_dir = require_dir(os.path.join(root, raw_name), f"{raw_name} dataset directory")
    categories = get_categories(dataset)
    out_rel = os.path.join("freeseg", dataset)
    out_dir = os.path.join(root, out_rel)
    cats_json = [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"])} for c in categories]
    for split in splits:
        if not force and os.path.isfile(os.path.join(out_dir, f"{split}.json")):
            continue
        pan_json = os.path.join(raw_dir, "annotations", f"panoptic_{split}2017.json")
        pan = load_json(pan_json, "COCO panoptic annotations")
        # Panoptic/instance JSONs use the category id; COCO-Stuff label maps (raw_id) use id - 1.
        offset = 0 if mode == "panoptic" else 1
        to_contig = _category_map(categories, pan["categories"], offset, pan_json, strict=mode == "panoptic")
        ctx = {"root": root, "dataset": dataset, "mode": mode, "split": split, "force": force,
               "out_rel": out_rel, "pan_json": pan_json, "to_contig": to_contig,
               "isthing": [c["isthing"] for c in categories],
               "pan_dir": require_dir(os.path.join(raw_dir, f"panoptic_{split}2017"), "panoptic PNG directory"),
               "lut": raw_to_contiguous_lut(categories), "base_lut": _seen_lut(categories)}
        if mode == "stuff":
            ctx["stuff_dir"] = require_dir(os.path.join(raw_dir, "stuffthingmaps", f"{split}2017"),
                                           "COCO-Stuff stuffthingmaps directory")
            ctx["valid_raw"] = np.array(sorted(c["raw_id"] for c in categories) + [255])
        jobs = _jobs(raw_dir, root, split, pan_json, pan)
        for j in jobs:  # category ids are checked up front, before any file is read
            for s in j["segments_info"]:
                if s["category_id"] not in to_contig:
                    raise DataError(f"{pan_json}: segment {s['id']} of image {j['image_id']} has unknown "
                                    f"category id {s['category_id']}")
        fn = functools.partial(_convert_image, ctx=ctx)
        records = parallel_map(fn, jobs, workers, desc=f"{dataset} {split}")
        images = [{"id": r["image_id"], "file_name": os.path.basename(r["file_name"]), "height": r["height"],
                   "width": r["width"]} for r in records]
        pan_out = {"images": images, "categories": cats_json, "annotations": [
            {"image_id": r["image_id"], "file_name": os.path.basename(r["panoptic_file"]),
             "segments_info": [{k: s[k] for k in ("id", "category_id", "iscrowd", "area", "bbox")}
                               for s in r["segments"]]} for r in records]}
        save_json_atomic(pan_out, os.path.join(out_dir, f"panoptic_{split}.json"))
        inst = _instances(raw_dir, split, categories, offset, images)
        save_json_atomic(inst, os.path.join(out_dir, f"instances_{split}.json"))
        if split == "train":
            save_json_atomic(prompt_index(records, categories, per_class), os.path.join(out_dir, "segments_train.json"))
        save_json_atomic(records, os.path.join(out_dir, f"{split}.json"))  # last: marks the split done
    save_json_atomic({"dataset": dataset, "categories": categories}, os.path.join(out_dir, "meta.json"))
    return out_dir


def prepare_coco(root: str, force: bool = False, workers: int = 1, per_class: int = 1000) -> list[str]:
    """COCO -> `<root>/freeseg/coco/` (171 classes) and `<root>/freeseg/coco_panoptic/` (133, val)."""
    return [convert_coco_layout(root, "coco", "coco", "stuff", SPLITS, force, workers, per_class),
            convert_coco_layout(root, "coco", "coco_panoptic", "panoptic", ("val",), force, workers, per_class)]


def prepare_toy(root: str, force: bool = False, workers: int = 1, num_train: int = 2000, num_val: int = 200,
                seed: int = 0, per_class: int = 200, size: int = 96) -> list[str]:
    """Generate the toy world into `<root>/toy/` (COCO layout), then convert it like COCO."""
    from freeseg.data.toy_world import write_coco_layout

    regenerated = write_coco_layout(os.path.join(root, "toy"), num_train, num_val, seed, size, workers, force)
    # New raw data invalidates the converted splits.
    return [convert_coco_layout(root, "toy", "toy", "stuff", SPLITS, force or regenerated, workers, per_class)]
