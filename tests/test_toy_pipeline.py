"""The miniature world end to end, small enough for CI: every stage of the recipe must work.

A few hundred toy images, a short tiny-CLIP pre-training, a short prompt stage and a short
all-task stage, then evaluation of the three tasks. The assertion that matters: unseen classes,
never segmented in training, are recognised well above chance (35 classes: chance mIoU is about
3%), so a regression in any stage (CLIP, prompts, proposals, region classifier, ensemble,
metrics) fails this test. The full-size run and its numbers are in the README.
"""

import json

import pytest
import torch

import train


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    from freeseg.data.prepare_coco import prepare_toy

    prepare_toy(str(root / "data"), workers=1, num_train=300, num_val=30, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train.main(["--dataset", "toy", "--data-root", str(root / "data"), "--output-dir", str(root / "run"),
                    "--set", *SMALL])
    finally:
        torch.set_num_threads(threads)
    return root / "run"


# A fraction of the default toy recipe (freeseg/config.py); every stage still runs.
SMALL = ["clip:train.iterations=500", "backbone:train.iterations=200", "prompt:train.iterations=100",
         "alltask:train.iterations=300",
         "train.checkpoint_every=10000", "train.log_every=100"]


def test_every_stage_leaves_its_output(toy_run):
    for stage in train.STAGES:
        assert (toy_run / stage / "checkpoint.pt").is_file(), stage
    assert (toy_run / "backbone" / "resnet.pth").is_file()
    assert (toy_run / "demo.png").is_file()
    results = json.loads((toy_run / "results.json").read_text())
    assert set(results) == {"semantic", "panoptic", "instance"}


def test_unseen_classes_are_recognised_well_above_chance(toy_run):
    # A model that cannot name unseen classes scores about 0-4 here (the mask classifier alone:
    # 2.9 in this run, 3.8 on the full toy run); this short run reached 20.1 unseen / 14.6 seen
    # when written (deterministic on CPU).
    results = json.loads((toy_run / "results.json").read_text())
    assert results["semantic"]["mIoU_unseen"] > 10.0, results["semantic"]
    assert results["semantic"]["mIoU_seen"] > 6.0, results["semantic"]


def test_clip_ensemble_helps_unseen_classes(toy_run):
    mask_only = json.loads((toy_run / "ablation_mask_classifier_only.json").read_text())
    ensemble = json.loads((toy_run / "ablation_CLIP_ensemble.json").read_text())
    # 2.9 -> 20.1 when written.
    assert ensemble["semantic"]["mIoU_unseen"] > mask_only["semantic"]["mIoU_unseen"] + 8.0, (mask_only, ensemble)
