"""evaluate.py's official protocol: images read as detectron2 reads them, mask AP against the
instances JSON, the three tasks end to end on a few toy images with a tiny random model."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freeseg.clip import CLIP, default_tokenizer
from freeseg.data.prepare_coco import prepare_toy
from freeseg.evaluation.runner import evaluate_model, official_test_image
from freeseg.modeling.freeseg import build_freeseg
from freeseg.presets import get_preset


def test_official_image_applies_exif_orientation_and_pil_bilinear(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # H 20, W 30
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: the camera was turned; show the image rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    got = official_test_image(tmp_path / "photo.png", short_side=10)
    upright = np.ascontiguousarray(np.rot90(pixels, k=-1))  # (30, 20, 3)
    want = np.asarray(Image.fromarray(upright).resize((10, 15), Image.BILINEAR))  # short side 20 -> 10
    assert got.shape == (3, 15, 10) and got.dtype == torch.uint8
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    prepare_toy(str(root), num_train=2, num_val=3, seed=5, per_class=2)
    return root / "freeseg" / "toy"


def tiny_toy_model():
    cfg = get_preset("toy")
    cfg.model.decoder.num_queries = 6
    torch.manual_seed(0)
    clip = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
                context_length=32, vocab_size=49408, transformer_width=32, transformer_heads=2,
                transformer_layers=1).eval()
    return build_freeseg(cfg, clip, default_tokenizer()).eval(), cfg


def test_official_protocol_scores_the_three_tasks_against_the_instances_json(toy_data):
    model, cfg = tiny_toy_model()
    official = copy.deepcopy(cfg)
    official.inference.protocol = "official"  # the toy options (unclaimed regions, ...) stay on
    tasks = ("semantic", "instance", "panoptic")
    results = evaluate_model(model, official, toy_data, "val", tasks, {"run": official.inference})["run"]
    assert set(results) == set(tasks)
    assert 0 <= results["panoptic"]["PQ"] <= 100 and 0 <= results["semantic"]["mIoU"] <= 100
    # Our protocol scores AP against the panoptic thing segments; the official one needs the JSON.
    (toy_data / "instances_val.json").rename(toy_data / "moved.json")
    try:
        evaluate_model(model, cfg, toy_data, "val", tasks, {"run": cfg.inference})
        with pytest.raises(FileNotFoundError, match="instances_val.json"):
            evaluate_model(model, official, toy_data, "val", tasks, {"run": official.inference})
    finally:
        (toy_data / "moved.json").rename(toy_data / "instances_val.json")


@pytest.mark.parametrize("protocol", ["mask2former", "official"])
def test_loader_workers_give_the_same_scores(toy_data, protocol, capsys):
    """Images read ahead by DataLoader workers are the images read in the loop, in order."""
    model, cfg = tiny_toy_model()
    cfg.inference.protocol = protocol
    tasks = ("semantic", "instance", "panoptic")
    results = {}
    for workers in (0, 2):
        cfg.data.num_workers = workers
        results[workers] = evaluate_model(model, cfg, toy_data, "val", tasks, {"run": cfg.inference})["run"]
        assert "3 images in" in capsys.readouterr().out
    assert repr(results[0]) == repr(results[2])  # repr: NaN (no unseen instance) equals itself


def test_unreadable_image_read_by_a_worker_is_a_one_line_error(toy_data, tmp_path):
    import shutil

    from freeseg.data.datasets import SegmentationDataset
    from freeseg.data.io import DataError

    data = tmp_path / "freeseg" / "toy"
    shutil.copytree(toy_data.parent.parent, tmp_path, dirs_exist_ok=True)
    dataset = SegmentationDataset(data, "val", base=False)
    broken = Path(dataset.root) / dataset.records[1]["file_name"]
    broken.write_bytes(b"not an image")
    model, cfg = tiny_toy_model()
    cfg.inference.protocol = "official"
    cfg.data.num_workers = 2
    with pytest.raises(DataError) as err:
        evaluate_model(model, cfg, data, "val", ("semantic",), {"run": cfg.inference})
    assert str(err.value).startswith(f"{broken}: cannot decode image") and "\n" not in str(err.value)
