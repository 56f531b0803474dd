"""Category lists: counts, unseen lists exactly as docs/design.md ("Seen and unseen classes"), id mappings."""

import numpy as np
import pytest

from freeseg.data.categories import (OFFICIAL_EVAL_CATEGORY_SET, class_names, ensemble_unseen, get_categories,
                                     raw_to_contiguous_lut, thing_mask, unseen_mask)
from freeseg.data.toy_world import COLORS, SHAPES

DESIGN_UNSEEN = {
    "coco": {"cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard", "clouds",
             "grass", "playingfield", "river", "road", "tree", "wall-concrete"},
    "voc": {"pottedplant", "sheep", "sofa", "train", "tvmonitor"},
    "ade": {"grass", "table", "armchair", "tub", "fireplace", "river", "computer", "towel", "tv",
            "buffet, counter, sideboard", "basket, handbasket", "lake", "traffic light", "monitor", "flag"},
}


@pytest.mark.parametrize("dataset, total, things, unseen", [
    ("coco", 171, 80, 15), ("coco_panoptic", 133, 80, 11), ("voc", 20, 20, 5), ("ade", 150, 100, 15),
    ("toy", 35, 30, 7),
])
def test_counts(dataset, total, things, unseen):
    cats = get_categories(dataset)
    assert [c["id"] for c in cats] == list(range(total))
    assert thing_mask(cats).sum() == things and unseen_mask(cats).sum() == unseen
    assert len(set(class_names(cats))) == total
    assert len({c["raw_id"] for c in cats}) == total


@pytest.mark.parametrize("dataset", sorted(DESIGN_UNSEEN))
def test_unseen_lists_match_design(dataset):
    cats = get_categories(dataset)
    assert {c["name"] for c in cats if not c["seen"]} == DESIGN_UNSEEN[dataset]


def test_coco_ids_match_official_scripts():
    cats = get_categories("coco")
    # datasets/prepare_coco_alldata.py: novel_clsID (raw label values of the 15 unseen classes).
    assert [c["raw_id"] for c in cats if not c["seen"]] == [20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144,
                                                            147, 148, 168, 171]
    lut = raw_to_contiguous_lut(cats)
    assert lut[0] == 0 and lut[10] == 10 and lut[11] == 255 and lut[12] == 11  # COCO id 12 does not exist
    assert lut[91] == 80 and lut[181] == 170 and lut[182] == 255 and lut[255] == 255
    assert (lut != 255).sum() == 171
    base = raw_to_contiguous_lut(cats, base=True)
    assert base[20] == 255 and base[0] == 0 and (base != 255).sum() == 156
    pan = get_categories("coco_panoptic")
    assert pan[80]["name"] == "banner" and pan[80]["raw_id"] == 92 and pan[132]["raw_id"] == 200


def test_toy_split_keeps_every_colour_and_shape_seen():
    cats = get_categories("toy")
    seen_things = [c["name"] for c in cats if c["isthing"] and c["seen"]]
    assert len(seen_things) == 24
    for word in list(COLORS) + list(SHAPES):
        assert any(word in n.split() for n in seen_things), word
    unseen_things = [c["name"] for c in cats if c["isthing"] and not c["seen"]]
    assert sorted(n.split()[0] for n in unseen_things) == sorted(COLORS)  # one per colour


def test_unknown_dataset():
    with pytest.raises(KeyError, match="cityscapes"):
        get_categories("cityscapes")
    assert unseen_mask(get_categories("voc")).dtype == np.bool_


def test_official_coco_panoptic_ensemble_flags():
    pan = get_categories("coco_panoptic")
    flags = ensemble_unseen("coco_panoptic", pan, "official")
    # register_coco_panoptic.py: trainable_flag excludes raw ids (COCO id - 1) 20, 24, 32, 33, 40,
    # 56, 86, 123 (grass: not a panoptic class) and 148; cardboard, playingfield, river stay seen.
    assert sorted(c["raw_id"] - 1 for c, f in zip(pan, flags) if f) == [20, 24, 32, 33, 40, 56, 86, 148]
    assert flags.sum() == 8 and unseen_mask(pan).sum() == 11
    assert np.array_equal(ensemble_unseen("coco_panoptic", pan), unseen_mask(pan))  # our protocol: the 11
    assert np.array_equal(ensemble_unseen("coco", get_categories("coco"), "official"), unseen_mask(get_categories("coco")))
    assert OFFICIAL_EVAL_CATEGORY_SET["coco"] == {"semantic": "coco", "instance": "coco_panoptic",
                                                  "panoptic": "coco_panoptic"}
