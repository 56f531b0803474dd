"""VOC 2012 (aug) and ADE20K-150 fixtures in their real raw layouts convert value by value."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from freeseg.data.io import DataError
from freeseg.data.prepare_voc_ade import prepare_ade, prepare_voc

I = 255
# VOC raw labels: 0 background, 1 aeroplane, 15 person, 16 pottedplant (unseen), 20 tvmonitor (unseen).
VOC_RAW = {
    "2007_000032": np.array([[0, 0, 1, 1, 1],
                             [0, 16, 16, I, 1],
                             [15, 15, 16, I, 20],
                             [15, 15, 0, 0, 20]], dtype=np.uint8),
    "2007_000039": np.array([[20, 20, 0, 0, 0],
                             [20, 20, 0, 1, 0],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0]], dtype=np.uint8),
    "2008_000002": np.array([[16, 16, 0, 0, 0],
                             [16, 16, 0, 0, 0],
                             [0, 0, 0, 2, 2],
                             [0, 0, 0, 2, 2]], dtype=np.uint8),
}
VOC_SPLITS = {"train": ["2007_000032", "2007_000039"], "val": ["2008_000002"]}
# ADE raw labels: 0 other, 1 wall, 10 grass (unseen, contiguous 9), 150 flag (unseen, 149), 3 sky.
ADE_RAW = {
    ("training", "ADE_train_00000001"): np.array([[0, 1, 1, 10], [3, 3, 10, 10], [150, 3, 3, 0]], dtype=np.uint8),
    ("training", "ADE_train_00000002"): np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.uint8),
    ("validation", "ADE_val_00000001"): np.array([[10, 10, 1, 1], [150, 0, 0, 3], [3, 3, 3, 3]], dtype=np.uint8),
}


def _jpeg(path, h, w):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, dtype=np.uint8)).save(path, format="JPEG")


def _label_png(path, labels, palette):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(labels, mode="L")
    if palette:  # SegmentationClassAug PNGs are palette images whose indices are the labels
        img = img.convert("P")
        img.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
        img.putdata(labels.ravel().tolist())
    img.save(path)


@pytest.fixture
def voc_root(tmp_path):
    voc = tmp_path / "VOC2012"
    for stem, raw in VOC_RAW.items():
        _jpeg(str(voc / "JPEGImages" / f"{stem}.jpg"), *raw.shape)
        _label_png(str(voc / "SegmentationClassAug" / f"{stem}.png"), raw, palette=True)
    for split, stems in VOC_SPLITS.items():
        (voc / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return tmp_path


@pytest.fixture
def ade_root(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for (split, stem), raw in ADE_RAW.items():
        _jpeg(str(ade / "images" / split / f"{stem}.jpg"), *raw.shape)
        _label_png(str(ade / "annotations" / split / f"{stem}.png"), raw, palette=False)
    return tmp_path


def _png(root, rel):
    return np.asarray(Image.open(os.path.join(root, rel)))


def _load(root, dataset, name):
    with open(os.path.join(root, "freeseg", dataset, name)) as f:
        return json.load(f)


def test_voc_converts_value_by_value(voc_root):
    prepare_voc(str(voc_root))
    cats = _load(voc_root, "voc", "meta.json")["categories"]
    assert len(cats) == 20 and [c["name"] for c in cats if not c["seen"]] == [
        "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    train = _load(voc_root, "voc", "train.json")
    assert [r["file_name"] for r in train] == ["VOC2012/JPEGImages/2007_000032.jpg", "VOC2012/JPEGImages/2007_000039.jpg"]
    rec = train[0]
    full = _png(voc_root, rec["sem_seg_file"])
    # 0 -> 255, k -> k - 1 (aeroplane 0, person 14, pottedplant 15, tvmonitor 19), 255 stays.
    assert full.tolist() == [[I, I, 0, 0, 0], [I, 15, 15, I, 0], [14, 14, 15, I, 19], [14, 14, I, I, 19]]
    base = _png(voc_root, "freeseg/voc/sem_seg/train_base/2007_000032.png")
    assert base.tolist() == [[I, I, 0, 0, 0], [I, I, I, I, 0], [14, 14, I, I, I], [14, 14, I, I, I]]
    assert rec["panoptic_file"] is None and (rec["height"], rec["width"]) == (4, 5)
    assert rec["segments"] == [
        {"id": 1, "category_id": 0, "isthing": True, "iscrowd": 0, "area": 4, "bbox": [2, 0, 3, 2]},
        {"id": 15, "category_id": 14, "isthing": True, "iscrowd": 0, "area": 4, "bbox": [0, 2, 2, 2]},
        {"id": 16, "category_id": 15, "isthing": True, "iscrowd": 0, "area": 3, "bbox": [1, 1, 2, 2]},
        {"id": 20, "category_id": 19, "isthing": True, "iscrowd": 0, "area": 2, "bbox": [4, 2, 1, 2]},
    ]
    # The second image holds tvmonitor (unseen) and one aeroplane pixel.
    assert np.array_equal(_png(voc_root, "freeseg/voc/sem_seg/train_base/2007_000039.png") == 0, VOC_RAW["2007_000039"] == 1)
    # Validation keeps unseen classes (pottedplant -> 15) and has no base split.
    val = _load(voc_root, "voc", "val.json")
    assert _png(voc_root, val[0]["sem_seg_file"]).tolist() == [
        [15, 15, I, I, I], [15, 15, I, I, I], [I, I, I, 1, 1], [I, I, I, 1, 1]]
    assert not os.path.exists(voc_root / "freeseg/voc/sem_seg/val_base")
    # Prompt-stage index: seen classes only.
    index = _load(voc_root, "voc", "segments_train.json")
    assert sorted((s["image_id"], s["category_id"]) for s in index) == [(0, 0), (0, 14), (1, 0)]


def test_ade_converts_value_by_value(ade_root):
    prepare_ade(str(ade_root))
    cats = _load(ade_root, "ade", "meta.json")["categories"]
    assert len(cats) == 150 and sum(not c["seen"] for c in cats) == 15
    assert not cats[9]["seen"] and not cats[149]["seen"] and cats[0]["seen"] and cats[2]["seen"]
    train = _load(ade_root, "ade", "train.json")
    assert train[0]["file_name"] == "ADEChallengeData2016/images/training/ADE_train_00000001.jpg"
    raw = ADE_RAW[("training", "ADE_train_00000001")]
    full = _png(ade_root, train[0]["sem_seg_file"])
    assert np.array_equal(full, np.where(raw == 0, I, raw.astype(int) - 1))  # 0 -> 255, k -> k - 1
    base = _png(ade_root, "freeseg/ade/sem_seg/train_base/ADE_train_00000001.png")
    assert base.tolist() == [[I, 0, 0, I], [2, 2, I, I], [I, 2, 2, I]]
    assert [s["category_id"] for s in train[0]["segments"]] == [0, 2, 9, 149]
    assert [s["isthing"] for s in train[0]["segments"]] == [cats[c]["isthing"] for c in (0, 2, 9, 149)]
    val = _load(ade_root, "ade", "val.json")
    assert _png(ade_root, val[0]["sem_seg_file"]).tolist() == [[9, 9, 0, 0], [149, I, I, 2], [2, 2, 2, 2]]
    index = _load(ade_root, "ade", "segments_train.json")
    assert sorted((s["image_id"], s["category_id"]) for s in index) == [(0, 0), (0, 2), (1, 0)]


def test_rerun_skips_finished_files_and_force_redoes(voc_root):
    prepare_voc(str(voc_root))
    out = voc_root / "freeseg/voc/sem_seg/train/2007_000032.png"
    records = _load(voc_root, "voc", "train.json")
    stamp = out.stat().st_mtime_ns
    os.remove(voc_root / "VOC2012/JPEGImages/2007_000032.jpg")  # not needed any more when skipping
    prepare_voc(str(voc_root), workers=2)
    assert out.stat().st_mtime_ns == stamp and _load(voc_root, "voc", "train.json") == records
    with pytest.raises(DataError, match="2007_000032.jpg"):
        prepare_voc(str(voc_root), force=True)


def test_prompt_index_caps_segments_per_class(voc_root):
    prepare_voc(str(voc_root), per_class=1)
    index = _load(voc_root, "voc", "segments_train.json")
    assert sorted(s["category_id"] for s in index) == [0, 14]  # aeroplane appears twice, kept once


def _break(root, what):
    """Damage the VOC fixture; return the path the error must name."""
    voc = root / "VOC2012"
    stem = "2007_000039"
    if what == "missing_dir":
        os.rename(voc / "SegmentationClassAug", voc / "labels")
        return voc / "SegmentationClassAug"
    if what == "missing_list":
        os.remove(voc / "val.txt")
        return voc / "val.txt"
    if what == "no_annotation":
        os.remove(voc / "SegmentationClassAug" / f"{stem}.png")
        return voc / "JPEGImages" / f"{stem}.jpg"
    path = voc / "SegmentationClassAug" / f"{stem}.png"
    if what == "wrong_size":
        _label_png(str(path), np.zeros((4, 6), np.uint8), palette=True)
    elif what == "out_of_range":
        _label_png(str(path), np.full((4, 5), 21, np.uint8), palette=True)
    elif what == "rgb_label":
        Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(path)
    elif what == "corrupt_image":
        path = voc / "JPEGImages" / f"{stem}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return path


@pytest.mark.parametrize("what", ["missing_dir", "missing_list", "no_annotation", "wrong_size", "out_of_range",
                                  "rgb_label", "corrupt_image"])
def test_bad_voc_input_raises_data_error_naming_the_file(voc_root, what):
    path = _break(voc_root, what)
    with pytest.raises(DataError) as err:
        prepare_voc(str(voc_root))
    assert str(path) in str(err.value), str(err.value)


def test_bad_ade_input_raises_data_error_naming_the_file(ade_root):
    ann = ade_root / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    _label_png(str(ann), np.full((3, 4), 151, np.uint8), palette=False)
    with pytest.raises(DataError, match=r"ADE_val_00000001.png: label values \[151\] out of range \(allowed: 0-150\)"):
        prepare_ade(str(ade_root))
    os.remove(ann)
    with pytest.raises(DataError, match="image without annotation: .*ADE_val_00000001.jpg"):
        prepare_ade(str(ade_root))
    os.rename(ade_root / "ADEChallengeData2016/images/validation", ade_root / "ADEChallengeData2016/val")
    with pytest.raises(DataError, match="images/validation"):
        prepare_ade(str(ade_root))


def test_prepared_voc_reads_back_through_dataset_and_augmentation(voc_root):
    """End to end: prepared base split -> SegmentationDataset -> semantic recipe, no unseen label."""
    from freeseg.config import DataConfig
    from freeseg.data.datasets import SegmentationDataset
    from freeseg.data.transforms import build_transforms

    prepared = prepare_voc(str(voc_root))
    transform = build_transforms(DataConfig(image_size=8, min_scale=0.5, max_scale=2.0, augmentation="semantic"),
                                 train=True)
    dataset = SegmentationDataset(prepared, "train", base=True)
    first = dataset[0]
    assert first["labels"].tolist() == [0, 14] and first["sem_seg"].unique().tolist() == [0, 14, 255]
    for seed in range(5):
        out = transform(first, np.random.default_rng(seed))
        assert out["image"].shape == (3, 8, 8) and set(out["labels"].tolist()) <= {0, 14}
        assert set(out["sem_seg"].unique().tolist()) <= {0, 14, 255}
