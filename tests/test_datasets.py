"""Dataset readers: sample format, base split, crowd handling, semantic-only data, crops."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from freeseg.data.datasets import SegmentCropDataset, SegmentationDataset, load_meta
from freeseg.data.io import DataError
from freeseg.data.prepare_coco import prepare_coco, prepare_toy

from test_prepare_coco import _layout, write_coco_fixture


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    prepare_toy(root, num_train=8, num_val=4, seed=1, per_class=5)
    return os.path.join(root, "freeseg", "toy")


def test_sample_format_and_targets(toy_dir):
    ds = SegmentationDataset(toy_dir, "val")
    s = ds[0]
    H, W = s["orig_size"]
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.uint8
    assert s["sem_seg"].dtype == torch.int64 and s["masks"].dtype == torch.bool
    N = len(s["labels"])
    assert s["masks"].shape == (N, H, W) and s["isthing"].shape == (N,)
    assert (s["masks"].sum(0) == 1).all()  # toy panoptic segments tile the image
    for m, c in zip(s["masks"], s["labels"]):
        assert (s["sem_seg"][m] == c).all()


def test_base_split_drops_unseen(toy_dir):
    unseen = {c["id"] for c in load_meta(toy_dir)["categories"] if not c["seen"]}
    full, base = SegmentationDataset(toy_dir, "train"), SegmentationDataset(toy_dir, "train", base=True)
    found = 0
    for i in range(len(full)):
        f, b = full[i], base[i]
        hidden = torch.isin(f["sem_seg"], torch.tensor(sorted(unseen)))
        found += int(hidden.any())
        assert (b["sem_seg"][hidden] == 255).all() and (b["sem_seg"][~hidden] == f["sem_seg"][~hidden]).all()
        assert not set(b["labels"].tolist()) & unseen
    assert found > 0
    with pytest.raises(DataError, match="val_base"):
        SegmentationDataset(toy_dir, "val", base=True)[0]


def test_crowd_segments_have_no_mask_but_keep_sem(tmp_path):
    root = str(tmp_path)
    write_coco_fixture(root, 1, 1)
    prepare_coco(root)
    s = SegmentationDataset(os.path.join(root, "freeseg", "coco"), "val")[0]
    _, _, things = _layout(20, 24)
    assert len(s["labels"]) == 4  # person, cow, sky, grass: the crowd is not a target
    assert not s["masks"][:, torch.from_numpy(things["crowd"])].any()
    assert (s["sem_seg"][torch.from_numpy(things["crowd"])] == 0).all()  # still "person" in sem_seg


def test_semantic_only_dataset(tmp_path):
    out = tmp_path / "freeseg" / "sem"
    (out / "sem_seg" / "val").mkdir(parents=True)
    sem = np.full((6, 8), 255, np.uint8)
    sem[:3], sem[3:, :4] = 2, 0
    Image.fromarray(sem).save(out / "sem_seg" / "val" / "a.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (out / "meta.json").write_text(json.dumps({"dataset": "sem", "categories": [
        {"id": i, "raw_id": i + 1, "name": n, "isthing": True, "seen": True} for i, n in enumerate("abc")]}))
    (out / "val.json").write_text(json.dumps([{"image_id": 1, "file_name": "a.png", "height": 6, "width": 8,
                                               "sem_seg_file": "freeseg/sem/sem_seg/val/a.png",
                                               "panoptic_file": None, "segments": []}]))
    s = SegmentationDataset(str(out), "val")[0]
    assert s["labels"].tolist() == [0, 2] and not s["isthing"].any()
    assert s["masks"][0].sum() == 12 and s["masks"][1].sum() == 24


def test_crop_dataset_cuts_the_segment(toy_dir):
    from freeseg.clip import CLIP_MEAN, CLIP_STD, normalize_pixels
    from freeseg.crops import crop_masked_regions
    from freeseg.data.transforms import PromptCrop

    ds = SegmentCropDataset(toy_dir, "train")
    seen = {c["id"] for c in load_meta(toy_dir)["categories"] if c["seen"]}
    labels = [ds.index[i]["category_id"] for i in range(len(ds))]
    assert set(labels) <= seen and max(np.bincount(labels)) <= 5  # seen only, per-class cap
    sample = ds[0]
    assert sample["image"].dtype == torch.uint8 and sample["mask"].shape == sample["image"].shape[1:]
    assert sample["mask"].any() and sample["label"] == labels[0]
    # "region": exactly the region classifier's crop, CLIP's mean colour outside the mask.
    crop, label = PromptCrop("region", 32, 1.5)(sample, np.random.default_rng(0))
    mean = tuple(255.0 * m for m in CLIP_MEAN)
    assert torch.equal(crop, crop_masked_regions(sample["image"].float(), sample["mask"][None], 32, 1.5, mean)[0])
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32 and label == labels[0]
    # "random" (official): outside the mask, CLIP's mean once normalised; the same seed, the same crop.
    crop = PromptCrop("random", 32, 1.0)(sample, np.random.default_rng(0))[0]
    assert torch.equal(crop, PromptCrop("random", 32, 1.0)(sample, np.random.default_rng(0))[0])
    normalised = normalize_pixels(crop[None])[0]  # (3, 32, 32)
    outside = (normalised - torch.tensor(CLIP_MEAN).view(3, 1, 1)).abs().amax(0) < 1e-5
    assert outside.any() and not outside.all()
    assert abs(255 * CLIP_MEAN[0] * (1 + CLIP_STD[0]) - crop[0][outside][0]) < 1e-3


def _copy_prepared(toy_dir, tmp_path) -> str:
    """A private copy of the prepared toy data (raw images included) that a test may damage."""
    import shutil

    root = os.path.dirname(os.path.dirname(toy_dir))
    shutil.copytree(root, tmp_path / "data")
    return str(tmp_path / "data" / "freeseg" / "toy")


def test_ground_truth_of_another_size_is_an_error_naming_it(toy_dir, tmp_path):
    prep = _copy_prepared(toy_dir, tmp_path)
    ds = SegmentationDataset(prep, "val")
    sem_path = os.path.join(ds.root, ds.records[0]["sem_seg_file"])
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(sem_path)  # replaced after preparation
    with pytest.raises(DataError, match=rf"{sem_path}: semantic map is 12x10 \(WxH\) but its image .* is 96x96"):
        ds[0]
    pan_path = os.path.join(ds.root, ds.records[1]["panoptic_file"])
    Image.fromarray(np.zeros((96, 95, 3), dtype=np.uint8)).save(pan_path)
    with pytest.raises(DataError, match=rf"{pan_path}: panoptic PNG is 95x96"):
        ds[1]


def test_training_images_are_read_as_a_viewer_shows_them(toy_dir, tmp_path):
    """EXIF orientation applied and 16-bit images scaled, in training data as in the demo."""
    prep = _copy_prepared(toy_dir, tmp_path)
    ds = SegmentationDataset(prep, "val")
    before = ds[0]
    image_path = os.path.join(ds.root, ds.records[0]["file_name"])
    rgb = before["image"].permute(1, 2, 0).numpy()
    # The same picture stored turned a quarter (transposed), with the EXIF tag that turns it back.
    stored = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 0, 2)))
    exif = stored.getexif()
    exif[0x0112] = 5  # "transpose to view"
    stored.save(image_path, format="PNG", exif=exif)
    assert torch.equal(ds[0]["image"], before["image"])
    # A 16-bit grayscale version of the picture: 8-bit values v stored as 257 v read back as v.
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(image_path, format="PNG")
    assert torch.equal(ds[0]["image"], torch.from_numpy(np.stack([gray] * 3)))
