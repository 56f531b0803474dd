"""COCO conversion on a fixture written in the real COCO raw layout, and the toy world through
the same code path: values checked pixel by pixel, pycocotools loads the outputs, and every kind
of bad input stops with a DataError naming the file."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from freeseg.data.categories import get_categories
from freeseg.data.io import DataError
from freeseg.data.io import id_to_rgb, rgb_to_id
from freeseg.data.prepare_coco import prepare_coco, prepare_toy

COCO_CATS = {c["name"]: c["id"] for c in get_categories("coco")}
PAN_CATS = {c["name"]: c["id"] for c in get_categories("coco_panoptic")}
# Segment ids as a real panoptic PNG has them (spread over R, G and B).
PERSON, COW, CROWD, SKY, GRASS = 1 + 256 * 5, 2000, 3000 + 65536, 4000, 5000


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _layout(h, w):
    """Raw stuffthingmap (COCO id - 1) and panoptic ids of one fixture image."""
    person, cow, crowd = (np.zeros((h, w), bool) for _ in range(3))
    person[2:8, 2:8], cow[12:18, 10:18], crowd[2:6, 16:22] = True, True, True
    top = np.zeros((h, w), bool)
    top[:10] = True
    raw = np.where(top, 156, 123).astype(np.uint8)  # sky-other (id 157), grass (id 124)
    raw[person | crowd], raw[cow] = 0, 20  # person (id 1), cow (id 21)
    raw[h - 1, w - 1] = 255  # one unlabeled pixel
    pan = np.where(top, SKY, GRASS)
    pan[person], pan[cow], pan[crowd], pan[h - 1, w - 1] = PERSON, COW, CROWD, 0
    return raw, pan, {"person": person, "cow": cow, "crowd": crowd}


def write_coco_fixture(root, n_train=3, n_val=2):
    """A few tiny images in COCO's raw layout: JPEGs, panoptic PNG + JSON, instances, stuffthingmaps."""
    coco = os.path.join(root, "coco")
    rng = np.random.default_rng(0)
    pan_cats = [{"id": 1, "name": "person", "isthing": 1}, {"id": 21, "name": "cow", "isthing": 1},
                {"id": 187, "name": "sky-other-merged", "isthing": 0}, {"id": 193, "name": "grass-merged", "isthing": 0}]
    for split, n, first in (("train", n_train, 10), ("val", n_val, 100)):
        for d in (f"{split}2017", f"panoptic_{split}2017", f"stuffthingmaps/{split}2017", "annotations"):
            os.makedirs(os.path.join(coco, d), exist_ok=True)
        images, pan_anns, inst_anns = [], [], []
        for k in range(n):
            image_id, h, w = first + k, 20 + 2 * k, 24
            name = f"{image_id:012d}"
            raw, pan, things = _layout(h, w)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(coco, f"{split}2017", name + ".jpg"), quality=95)
            Image.fromarray(raw).save(os.path.join(coco, f"stuffthingmaps/{split}2017", name + ".png"))
            Image.fromarray(id_to_rgb(pan)).save(os.path.join(coco, f"panoptic_{split}2017", name + ".png"))
            images.append({"id": image_id, "file_name": name + ".jpg", "height": h, "width": w})
            infos = [(PERSON, 1, 0), (COW, 21, 0), (CROWD, 1, 1), (SKY, 187, 0), (GRASS, 193, 0)]
            pan_anns.append({"image_id": image_id, "file_name": name + ".png", "segments_info": [
                {"id": i, "category_id": c, "iscrowd": crowd, "area": int((pan == i).sum()), "bbox": [0, 0, 1, 1]}
                for i, c, crowd in infos]})
            for key, cat, crowd in (("person", 1, 0), ("cow", 21, 0), ("crowd", 1, 1)):
                inst_anns.append({"id": len(inst_anns) + 1 + 1000 * first, "image_id": image_id, "category_id": cat,
                                  "iscrowd": crowd, "segmentation": _rle(things[key]),
                                  "area": int(things[key].sum()), "bbox": [0, 0, 1, 1]})
        with open(os.path.join(coco, f"annotations/panoptic_{split}2017.json"), "w") as f:
            json.dump({"images": images, "annotations": pan_anns, "categories": pan_cats}, f)
        with open(os.path.join(coco, f"annotations/instances_{split}2017.json"), "w") as f:
            json.dump({"images": images, "annotations": inst_anns, "categories": pan_cats[:2]}, f)
    return coco


def _load(path):
    with open(path) as f:
        return json.load(f)


def _png(path):
    return np.asarray(Image.open(path))


def check_panoptic_consistency(out_dir, split):
    """Panoptic PNG ids == segments_info ids (areas too); instance masks == thing segments."""
    pan_json = _load(os.path.join(out_dir, f"panoptic_{split}.json"))
    inst = COCO(os.path.join(out_dir, f"instances_{split}.json"))
    assert {img["id"] for img in pan_json["images"]} == {a["image_id"] for a in pan_json["annotations"]}
    assert inst.getImgIds() and sorted(inst.getImgIds()) == sorted(img["id"] for img in pan_json["images"])
    cats = {c["id"]: c for c in _load(os.path.join(out_dir, "meta.json"))["categories"]}
    for ann in pan_json["annotations"]:
        ids = rgb_to_id(_png(os.path.join(out_dir, "panoptic", split, ann["file_name"])))
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            assert (ids == s["id"]).sum() == s["area"]
        things = {s["id"]: s for s in ann["segments_info"] if cats[s["category_id"]]["isthing"]}
        inst_anns = inst.loadAnns(inst.getAnnIds(imgIds=[ann["image_id"]]))
        assert len(inst_anns) == len(things)
        for a in inst_anns:
            m = inst.annToMask(a).astype(bool)
            match = [s for s in things.values() if np.array_equal(ids == s["id"], m)]
            assert len(match) == 1 and match[0]["category_id"] == a["category_id"]
            assert bool(match[0]["iscrowd"]) == bool(a["iscrowd"])


def test_coco_fixture_converts_value_by_value(tmp_path):
    root = str(tmp_path)
    write_coco_fixture(root)
    prepare_coco(root, workers=1)
    out = os.path.join(root, "freeseg", "coco")
    person, cow = COCO_CATS["person"], COCO_CATS["cow"]
    sky, grass = COCO_CATS["sky-other"], COCO_CATS["grass"]
    assert (person, cow, sky, grass) == (0, 19, 145, 112)  # raw 0, 20, 156, 123 with the gaps removed
    for split, image_id in (("train", 10), ("val", 100)):
        raw, pan, things = _layout(20, 24)
        name = f"{image_id:012d}.png"
        sem = _png(os.path.join(out, "sem_seg", split, name))
        expected = np.where(raw == 156, sky, np.where(raw == 123, grass, np.where(raw == 20, cow, raw)))
        np.testing.assert_array_equal(sem, expected)  # includes 255 at the unlabeled pixel
        rec = [r for r in _load(os.path.join(out, f"{split}.json")) if r["image_id"] == image_id][0]
        assert rec["file_name"] == f"coco/{split}2017/{image_id:012d}.jpg"
        got = sorted((s["category_id"], s["isthing"], s["iscrowd"], s["area"]) for s in rec["segments"])
        top_stuff = 10 * 24 - 36 - 24  # top rows minus the person and the crowd
        assert got == sorted([(person, True, 0, 36), (cow, True, 0, 48), (person, True, 1, 24),
                              (sky, False, 0, top_stuff), (grass, False, 0, 10 * 24 - 48 - 1)])
        check_panoptic_consistency(out, split)
    base = _png(os.path.join(out, "sem_seg", "train_base", "000000000010.png"))
    raw, _, things = _layout(20, 24)
    assert (base[things["cow"]] == 255).all() and (base[raw == 123] == 255).all()  # unseen -> ignore
    assert (base[things["person"]] == person).all() and (base[raw == 156] == sky).all()
    assert not os.path.exists(os.path.join(out, "sem_seg", "val_base"))
    index = _load(os.path.join(out, "segments_train.json"))
    assert {e["category_id"] for e in index} == {person, sky}  # seen, non-crowd only
    assert len(index) == 3 * 2
    # The 133-class panoptic evaluation set: raw panoptic segments, contiguous ids.
    pout = os.path.join(root, "freeseg", "coco_panoptic")
    rec = _load(os.path.join(pout, "val.json"))[0]
    got = sorted((s["category_id"], s["area"]) for s in rec["segments"])
    assert got == sorted([(PAN_CATS["person"], 36), (PAN_CATS["cow"], 48), (PAN_CATS["person"], 24),
                          (PAN_CATS["sky-other-merged"], top_stuff), (PAN_CATS["grass-merged"], 10 * 24 - 48 - 1)])
    psem = _png(os.path.join(pout, "sem_seg", "val", "000000000100.png"))
    assert psem[things["crowd"]].tolist() == [PAN_CATS["person"]] * 24 and psem[19, 23] == 255
    check_panoptic_consistency(pout, "val")


def test_rerun_skips_and_force_redoes(tmp_path):
    root = str(tmp_path)
    write_coco_fixture(root, 1, 1)
    prepare_coco(root)
    rec = os.path.join(root, "freeseg", "coco", "val.json")
    png = os.path.join(root, "freeseg", "coco", "sem_seg", "val", "000000000100.png")
    stamp = (os.stat(rec).st_mtime_ns, os.stat(png).st_mtime_ns)
    prepare_coco(root)
    assert (os.stat(rec).st_mtime_ns, os.stat(png).st_mtime_ns) == stamp
    prepare_coco(root, force=True)
    assert os.stat(png).st_mtime_ns != stamp[1]
    assert not [n for n in os.listdir(os.path.dirname(png)) if n.startswith(".tmp")]


def _break_missing_dir(coco):
    os.rename(os.path.join(coco, "stuffthingmaps", "train2017"), os.path.join(coco, "elsewhere"))
    return os.path.join(coco, "stuffthingmaps", "train2017")


def _break_unannotated_image(coco):
    path = os.path.join(coco, "val2017", "000000000999.jpg")
    Image.new("RGB", (8, 8)).save(path)
    return path


def _break_dropped_annotation(coco):
    path = os.path.join(coco, "annotations", "panoptic_val2017.json")
    data = _load(path)
    data["annotations"] = data["annotations"][1:]
    with open(path, "w") as f:
        json.dump(data, f)
    return os.path.join(coco, "val2017", "000000000100.jpg")


def _break_png_size(coco):
    path = os.path.join(coco, "stuffthingmaps", "val2017", "000000000101.png")
    Image.new("L", (30, 30)).save(path)
    return path


def _break_label_value(coco):
    path = os.path.join(coco, "stuffthingmaps", "val2017", "000000000100.png")
    raw = _png(path).copy()
    raw[0, 0] = 200  # not a COCO-Stuff class
    Image.fromarray(raw).save(path)
    return path


def _break_segment_category(coco):
    path = os.path.join(coco, "annotations", "panoptic_val2017.json")
    data = _load(path)
    data["annotations"][0]["segments_info"][0]["category_id"] = 250
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _break_corrupt_image(coco):
    path = os.path.join(coco, "val2017", "000000000101.jpg")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("breaker, words", [
    (_break_missing_dir, "missing"), (_break_unannotated_image, "without annotation"),
    (_break_dropped_annotation, "without annotation"), (_break_png_size, "30x30"),
    (_break_label_value, "unknown category ids [200]"), (_break_segment_category, "unknown category id 250"),
    (_break_corrupt_image, "cannot decode"),
])
def test_bad_input_raises_data_error_naming_the_file(tmp_path, breaker, words):
    coco = write_coco_fixture(str(tmp_path), 1, 2)
    path = breaker(coco)
    with pytest.raises(DataError) as err:
        prepare_coco(str(tmp_path))
    assert path in str(err.value) and words in str(err.value)


def test_toy_world_converts_through_the_coco_path(tmp_path):
    root = str(tmp_path)
    prepare_toy(root, workers=2, num_train=12, num_val=4, seed=3)
    out = os.path.join(root, "freeseg", "toy")
    cats = _load(os.path.join(out, "meta.json"))["categories"]
    assert len(cats) == 35 and len(_load(os.path.join(out, "train.json"))) == 12
    for split in ("train", "val"):
        check_panoptic_consistency(out, split)
        for rec in _load(os.path.join(out, f"{split}.json")):
            raw = _png(os.path.join(root, "toy", "stuffthingmaps", f"{split}2017", os.path.basename(rec["sem_seg_file"])))
            np.testing.assert_array_equal(_png(os.path.join(root, rec["sem_seg_file"])), raw)  # toy raw = contiguous
            assert sum(s["area"] for s in rec["segments"]) == rec["height"] * rec["width"]  # all labelled
    unseen = {c["id"] for c in cats if not c["seen"]}
    base = [_png(p) for p in [os.path.join(out, "sem_seg", "train_base", n)
                              for n in sorted(os.listdir(os.path.join(out, "sem_seg", "train_base")))]]
    assert not any(np.isin(b, list(unseen)).any() for b in base)
