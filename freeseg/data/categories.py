"""Category lists of every dataset: names, thing/stuff flags and the seen/unseen split.

`get_categories(dataset)` returns `[{"id", "raw_id", "name", "isthing", "seen"}, ...]` where
`id` is the contiguous class index the model predicts (0..K-1, 255 = ignore in label maps)
and `raw_id` is the value the raw annotations use:

| dataset        | K   | unseen | raw_id                                             | used for                  |
|----------------|-----|--------|----------------------------------------------------|---------------------------|
| coco           | 171 | 15     | COCO-Stuff stuffthingmaps value (= COCO id - 1)    | training; semantic mIoU; instance AP |
| coco_panoptic  | 133 | 11     | COCO panoptic category id                          | panoptic PQ (detectron2's COCO panoptic val) |
| voc            | 20  | 5      | SegmentationClassAug value (0 = background)        | semantic mIoU             |
| ade            | 150 | 15     | ADEChallengeData2016 value (0 = "other")           | semantic mIoU             |
| toy            | 35  | 7      | like coco: stuffthingmaps value (= toy id - 1)     | everything (toy_world.py) |

Sources (facts, bytedance/FreeSeg): COCO-Stuff names and ids from
`mask2former/data/datasets/register_coco_full.py` and `datasets/prepare_coco_alldata.py`
(raw ids 0..181 with gaps -> 0..170); the 133 COCO panoptic categories from
`register_coco_panoptic.py` (detectron2's list); VOC from `register_voc_seg.py`; ADE20K-150 from
`register_ade20k_all_data.py` (names and thing flags). Unseen lists: docs/design.md, "Seen and unseen classes"
(the official `novel_clsID` / `NOVEL_ID` lists; the same classes).

Names are the official ones verbatim (the official prompts were learned on these strings),
except that ADE's "window " loses its trailing space.

COCO panoptic's unseen classes: we mark a panoptic class unseen when its name is one of the 15
COCO-Stuff unseen names (11 classes; the merged classes "tree-merged", "grass-merged", ... stay
seen), which is also the set the official PQ report averages as "novel"
(evaluation/panoptic_seg_evaluation.py, `novel_classes`). The official registration's
`trainable_flag`, which the CLIP ensemble reads, excludes raw ids [20, 24, 32, 33, 40, 56, 86,
123, 148] (COCO ids minus one: cow, giraffe, suitcase, frisbee, skateboard, carrot, scissors,
grass, which is not one of the 133 classes, and road): 8 classes, cardboard, playingfield and
river staying seen there. `ensemble_unseen` gives that set for the official protocol; ours uses
the 11 for both (docs/differences.md).
"""

import numpy as np

# COCO's 80 thing categories (instances/panoptic category ids 1..90 with gaps).
COCO_THING_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54,
    55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 84, 85, 86, 87, 88, 89, 90,
)
COCO_THING_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
# COCO-Stuff's 91 stuff categories, ids 92..182 without gaps.
COCO_STUFF_NAMES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other",
    "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)
COCO_UNSEEN = (
    "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard",
    "clouds", "grass", "playingfield", "river", "road", "tree", "wall-concrete",
)
# The 53 stuff categories of COCO panoptic (detectron2's list), with their panoptic ids.
COCO_PANOPTIC_STUFF = (
    (92, "banner"), (93, "blanket"), (95, "bridge"), (100, "cardboard"), (107, "counter"),
    (109, "curtain"), (112, "door-stuff"), (118, "floor-wood"), (119, "flower"), (122, "fruit"),
    (125, "gravel"), (128, "house"), (130, "light"), (133, "mirror-stuff"), (138, "net"),
    (141, "pillow"), (144, "platform"), (145, "playingfield"), (147, "railroad"), (148, "river"),
    (149, "road"), (151, "roof"), (154, "sand"), (155, "sea"), (156, "shelf"), (159, "snow"),
    (161, "stairs"), (166, "tent"), (168, "towel"), (171, "wall-brick"), (175, "wall-stone"),
    (176, "wall-tile"), (177, "wall-wood"), (178, "water-other"), (180, "window-blind"),
    (181, "window-other"), (184, "tree-merged"), (185, "fence-merged"), (186, "ceiling-merged"),
    (187, "sky-other-merged"), (188, "cabinet-merged"), (189, "table-merged"),
    (190, "floor-other-merged"), (191, "pavement-merged"), (192, "mountain-merged"),
    (193, "grass-merged"), (194, "dirt-merged"), (195, "paper-merged"),
    (196, "food-other-merged"), (197, "building-other-merged"), (198, "rock-merged"),
    (199, "wall-other-merged"), (200, "rug-merged"),
)

VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_UNSEEN = ("pottedplant", "sheep", "sofa", "train", "tvmonitor")

# ADE20K-150 in label order (raw value = index + 1); a leading "*" marks a thing class.
ADE_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road, route", "*bed", "*window",
    "grass", "*cabinet", "sidewalk, pavement", "*person", "earth, ground", "*door", "*table",
    "mountain, mount", "plant", "*curtain", "*chair", "*car", "water", "*painting, picture",
    "*sofa", "*shelf", "house", "sea", "*mirror", "rug", "field", "*armchair", "*seat", "*fence",
    "*desk", "rock, stone", "*wardrobe, closet, press", "*lamp", "*tub", "*rail", "*cushion",
    "base, pedestal, stand", "*box", "*column, pillar", "*signboard, sign",
    "*chest of drawers, chest, bureau, dresser", "*counter", "sand", "*sink", "skyscraper",
    "*fireplace", "*refrigerator, icebox", "grandstand, covered stand", "path", "*stairs",
    "runway", "*case, display case, showcase, vitrine",
    "*pool table, billiard table, snooker table", "*pillow", "*screen door, screen",
    "stairway, staircase", "river", "bridge, span", "*bookcase", "blind, screen", "*coffee table",
    "*toilet, can, commode, crapper, pot, potty, stool, throne", "*flower", "*book", "hill",
    "*bench", "*countertop", "*stove", "*palm, palm tree", "*kitchen island", "*computer",
    "*swivel chair", "*boat", "bar", "*arcade machine", "hovel, hut, hutch, shack, shanty", "*bus",
    "*towel", "*light", "*truck", "tower", "*chandelier", "*awning, sunshade, sunblind",
    "*street lamp", "*booth", "*tv", "*plane", "dirt track", "*clothes", "*pole",
    "land, ground, soil", "*bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "*ottoman, pouf, pouffe, puff, hassock",
    "*bottle", "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card",
    "stage", "*van", "*ship", "*fountain",
    "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "*washer, automatic washer, washing machine", "*plaything, toy", "pool", "*stool",
    "*barrel, cask", "*basket, handbasket", "falls", "tent", "*bag", "*minibike, motorbike",
    "cradle", "*oven", "*ball", "*food, solid food", "*step, stair", "tank, storage tank",
    "*trade name", "*microwave", "*pot", "*animal", "*bicycle", "lake", "*dishwasher", "*screen",
    "blanket, cover", "*sculpture", "*hood, exhaust hood", "*sconce", "*vase", "*traffic light",
    "*tray", "*trash can", "*fan", "pier", "crt screen", "*plate", "*monitor", "*bulletin board",
    "shower", "*radiator", "*glass, drinking glass", "*clock", "*flag",
)
# Official NOVEL_ID = [9, 15, 30, 37, 49, 60, 74, 81, 89, 99, 112, 128, 136, 143, 149].
ADE_UNSEEN = (
    "grass", "table", "armchair", "tub", "fireplace", "river", "computer", "towel", "tv",
    "buffet, counter, sideboard", "basket, handbasket", "lake", "traffic light", "monitor", "flag",
)

DATASETS = ("coco", "coco_panoptic", "voc", "ade", "toy")

# The 8 unseen classes of the official COCO panoptic ensemble (register_coco_panoptic.py,
# `trainable_flag`; see the module docstring).
COCO_PANOPTIC_ENSEMBLE_UNSEEN = ("cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "road")

# Which category set each evaluation of a dataset uses (state it next to every number).
EVAL_CATEGORY_SET = {
    "coco": {"semantic": "coco", "instance": "coco", "panoptic": "coco_panoptic"},
    "voc": {"semantic": "voc"},
    "ade": {"semantic": "ade"},
    "toy": {"semantic": "toy", "instance": "toy", "panoptic": "toy"},
}
# Under the official protocol COCO instance inference runs with the 133 panoptic classes, as the
# official all-task evaluation does (one dataset, coco_2017_val_panoptic_with_sem_seg, for
# instance and panoptic; COCO-Stuff's 171 for semantic, configs/coco-stuff-164k-156/*_test_semseg.yaml).
OFFICIAL_EVAL_CATEGORY_SET = {**EVAL_CATEGORY_SET,
                              "coco": {"semantic": "coco", "instance": "coco_panoptic", "panoptic": "coco_panoptic"}}


def _entry(idx: int, raw_id: int, name: str, isthing: bool, unseen: tuple[str, ...]) -> dict:
    return {"id": idx, "raw_id": raw_id, "name": name, "isthing": isthing, "seen": name not in unseen}


def _coco() -> list[dict]:
    things = [(cid - 1, n, True) for cid, n in zip(COCO_THING_IDS, COCO_THING_NAMES)]
    stuff = [(92 + i - 1, n, False) for i, n in enumerate(COCO_STUFF_NAMES)]
    return [_entry(i, r, n, t, COCO_UNSEEN) for i, (r, n, t) in enumerate(things + stuff)]


def _coco_panoptic() -> list[dict]:
    things = [(cid, n, True) for cid, n in zip(COCO_THING_IDS, COCO_THING_NAMES)]
    stuff = [(cid, n, False) for cid, n in COCO_PANOPTIC_STUFF]
    return [_entry(i, r, n, t, COCO_UNSEEN) for i, (r, n, t) in enumerate(things + stuff)]


def _voc() -> list[dict]:
    return [_entry(i, i + 1, n, True, VOC_UNSEEN) for i, n in enumerate(VOC_NAMES)]


def _ade() -> list[dict]:
    return [
        _entry(i, i + 1, n.lstrip("*"), n.startswith("*"), ADE_UNSEEN) for i, n in enumerate(ADE_NAMES)
    ]


def _toy() -> list[dict]:
    from freeseg.data.toy_world import toy_categories  # the toy world owns its class list

    return toy_categories()


_BUILDERS = {"coco": _coco, "coco_panoptic": _coco_panoptic, "voc": _voc, "ade": _ade, "toy": _toy}


def get_categories(dataset: str) -> list[dict]:
    """The category list of `dataset` (a fresh copy; see the table in the module docstring)."""
    if dataset not in _BUILDERS:
        raise KeyError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return _BUILDERS[dataset]()


def class_names(categories: list[dict]) -> list[str]:
    return [c["name"] for c in categories]


def unseen_mask(categories: list[dict]) -> np.ndarray:
    """(K,) bool, True for classes held out of training."""
    return np.array([not c["seen"] for c in categories], dtype=bool)


def ensemble_unseen(dataset: str, categories: list[dict], protocol: str = "mask2former") -> np.ndarray:
    """(K,) bool: the classes the CLIP ensemble treats as unseen. The official protocol on COCO
    panoptic uses the official `trainable_flag` (8 classes); otherwise the split's unseen classes."""
    if protocol == "official" and dataset == "coco_panoptic":
        return np.array([c["name"] in COCO_PANOPTIC_ENSEMBLE_UNSEEN for c in categories], dtype=bool)
    return unseen_mask(categories)


def thing_mask(categories: list[dict]) -> np.ndarray:
    """(K,) bool, True for thing (countable) classes."""
    return np.array([c["isthing"] for c in categories], dtype=bool)


def raw_to_contiguous_lut(categories: list[dict], base: bool = False) -> np.ndarray:
    """(256,) uint8 lookup table from raw label-map values to contiguous ids.

    Values not in the list (and 255) map to 255 (ignore); with `base`, unseen classes too.
    """
    lut = np.full(256, 255, dtype=np.uint8)
    for c in categories:
        if not 0 <= c["raw_id"] < 255:
            raise ValueError(f"category {c['name']!r}: raw id {c['raw_id']} does not fit a uint8 label map")
        if c["seen"] or not base:
            lut[c["raw_id"]] = c["id"]
    return lut
