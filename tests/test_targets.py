"""Per-task targets from one hand-made sample: 2 things of class 1, stuff class 3, ignore pixels."""

import pytest
import torch

from freeseg.modeling.targets import batch_targets, task_targets

I = 255  # ignore
SEM = [
    [1, 1, 3, 3, 3],
    [1, 1, 3, I, 3],
    [3, 3, 3, 1, 1],
    [I, 3, 3, 1, 1],
]
THING_A = [
    [1, 1, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
]
THING_B = [
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1],
    [0, 0, 0, 1, 1],
]
STUFF_3 = [
    [0, 0, 1, 1, 1],
    [0, 0, 1, 0, 1],
    [1, 1, 1, 0, 0],
    [0, 1, 1, 0, 0],
]
CLASS_1 = [[a or b for a, b in zip(ra, rb)] for ra, rb in zip(THING_A, THING_B)]


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _sample(masks, labels, isthing):
    return {
        "sem_seg": torch.tensor(SEM, dtype=torch.long),
        "masks": torch.stack([_mask(m) for m in masks]) if masks else torch.zeros(0, 4, 5, dtype=torch.bool),
        "labels": torch.tensor(labels, dtype=torch.long),
        "isthing": torch.tensor(isthing, dtype=torch.bool),
    }


@pytest.fixture
def sample():
    return _sample([STUFF_3, THING_A, THING_B], [3, 1, 1], [False, True, True])


def test_semantic_one_mask_per_class_without_ignore(sample):
    t = task_targets(sample, "semantic")
    assert t["labels"].tolist() == [1, 3]
    assert t["masks"].dtype == torch.bool
    assert torch.equal(t["masks"][0], _mask(CLASS_1))
    assert torch.equal(t["masks"][1], _mask(STUFF_3))
    # the two ignore pixels belong to no target
    covered = t["masks"].any(0)
    assert not covered[1, 3] and not covered[3, 0] and int(covered.sum()) == 18


def test_instance_things_only(sample):
    t = task_targets(sample, "instance")
    assert t["labels"].tolist() == [1, 1]
    assert torch.equal(t["masks"], torch.stack([_mask(THING_A), _mask(THING_B)]))


def test_panoptic_things_and_stuff(sample):
    t = task_targets(sample, "panoptic")
    assert t["labels"].tolist() == [3, 1, 1]
    assert torch.equal(t["masks"], torch.stack([_mask(STUFF_3), _mask(THING_A), _mask(THING_B)]))


def test_panoptic_merges_split_stuff_but_not_things():
    top = [[int(r < 2 and v) for v in row] for r, row in enumerate(STUFF_3)]
    bottom = [[int(r >= 2 and v) for v in row] for r, row in enumerate(STUFF_3)]
    s = _sample([top, THING_A, bottom, THING_B], [3, 1, 3, 1], [False, True, False, True])
    t = task_targets(s, "panoptic")
    assert t["labels"].tolist() == [3, 1, 1]
    assert torch.equal(t["masks"][0], _mask(STUFF_3))
    assert torch.equal(t["masks"][1], _mask(THING_A)) and torch.equal(t["masks"][2], _mask(THING_B))


def test_zero_segments_give_empty_targets():
    s = _sample([], [], [])
    s["sem_seg"].fill_(I)
    for task in ("semantic", "instance", "panoptic"):
        t = task_targets(s, task)
        assert t["masks"].shape == (0, 4, 5) and t["labels"].shape == (0,)
        assert t["labels"].dtype == torch.long and t["masks"].dtype == torch.bool
    # only stuff: instance targets are empty
    t = task_targets(_sample([STUFF_3], [3], [False]), "instance")
    assert t["masks"].shape == (0, 4, 5)


def test_batch_targets_pads_bottom_right(sample):
    out = batch_targets([sample, sample], "instance", pad_to=(6, 8))
    assert len(out) == 2 and out[1]["masks"].shape == (2, 6, 8)
    assert torch.equal(out[0]["masks"][:, :4, :5], task_targets(sample, "instance")["masks"])
    assert not out[0]["masks"][:, 4:].any() and not out[0]["masks"][:, :, 5:].any()
    with pytest.raises(ValueError, match="pad_to"):
        batch_targets([sample], "instance", pad_to=(3, 5))


def test_bad_input_names_the_field(sample):
    with pytest.raises(ValueError, match="unknown task"):
        task_targets(sample, "depth")
    del sample["isthing"]
    with pytest.raises(KeyError, match="isthing"):
        task_targets(sample, "panoptic")
    bad = _sample([STUFF_3], [3, 1], [False, True])
    with pytest.raises(ValueError, match="labels"):
        task_targets(bad, "instance")
