"""Tests of `freeseg/visualize.py`: the demo picture and the segments JSON.

Pixel checks on a flat gray image: a mask pixel is 45% image + 55% palette colour, its outline is
white, the rest is untouched, the picture is scaled by pixel repetition and the legend shows a
swatch of every class drawn.
"""

import json

import numpy as np
import pytest
import torch
from PIL import ImageFont

from freeseg.visualize import PALETTE, draw, label_point, save_segments_json, segments_from_result

GRAY = 100


def _tint(k: int) -> np.ndarray:
    return 0.45 * GRAY + 0.55 * PALETTE[k % len(PALETTE)].astype(np.float64)  # (3,)


def _close(pixel: np.ndarray, expected: np.ndarray) -> bool:
    return bool(np.all(np.abs(pixel.astype(np.float64) - expected) <= 1))  # uint8 truncation


def _two_boxes() -> tuple[np.ndarray, list[dict], list[str]]:
    """A 40x48 gray image; class 1 at rows 4-35 cols 4-23, class 22 (palette 2) at cols 28-43."""
    image = np.full((40, 48, 3), GRAY, dtype=np.uint8)
    a = np.zeros((40, 48), dtype=bool)
    a[4:36, 4:24] = True
    b = torch.zeros(40, 48, dtype=torch.bool)  # masks may be numpy or torch
    b[4:36, 28:44] = True
    names = [f"c{k}" for k in range(23)]
    return image, [{"mask": a, "category_id": 1, "score": 0.9}, {"mask": b, "category_id": 22, "score": 0.8}], names


def test_draw_tints_masks_outlines_them_in_white_and_scales_by_repetition():
    image, segments, names = _two_boxes()
    scale = 2
    out = draw(image, segments, names, scale=scale)
    assert out.mode == "RGB"
    assert out.height == 40 * scale and out.width > 48 * scale  # the legend sits to the right
    big = np.asarray(out)
    canvas = big[: 40 * scale : scale, : 48 * scale : scale]  # (40, 48, 3), one sample per pixel
    top = big[: 10 * scale, : 48 * scale]  # no label is drawn up there (labels sit at the centres)
    assert np.array_equal(top, np.repeat(np.repeat(canvas[:10], scale, 0), scale, 1))

    for y, x in [(5, 5), (6, 20), (30, 10), (34, 22)]:  # inside box a, off its outline and label
        assert _close(canvas[y, x], _tint(1)), (y, x, canvas[y, x])
    for y, x in [(5, 29), (34, 42)]:
        assert _close(canvas[y, x], _tint(22)), (y, x, canvas[y, x])
    assert np.array_equal(_tint(22), _tint(2))  # class ids past the palette cycle through it
    for y, x in [(4, 10), (35, 10), (20, 4), (20, 23), (4, 28), (35, 43)]:  # first/last rows/cols
        assert canvas[y, x].tolist() == [255, 255, 255], (y, x)
    for y, x in [(0, 0), (2, 30), (20, 25), (20, 26), (39, 47)]:  # outside every mask
        assert canvas[y, x].tolist() == [GRAY] * 3, (y, x)


def test_legend_shows_a_swatch_for_every_class_and_grows_with_them():
    h, w = 4, 12
    image = np.full((h, w, 3), GRAY, dtype=np.uint8)
    segments = []
    for k in range(w):  # one column per class: twelve classes, taller legend than picture
        mask = np.zeros((h, w), dtype=bool)
        mask[:, k] = True
        segments.append({"mask": mask, "category_id": k, "score": 1.0})
    out = draw(image, segments, [f"class{k}" for k in range(w)])
    assert out.height >= 16 * w, "the legend rows must fit"
    legend = np.asarray(out)[:, w:].reshape(-1, 3)
    colors = {tuple(c) for c in legend.tolist()}
    for k in range(w):
        assert tuple(PALETTE[k].tolist()) in colors, f"no swatch for class {k}"


def test_unseen_tag_only_changes_the_legend():
    image, segments, names = _two_boxes()
    unseen = torch.zeros(len(names), dtype=torch.bool)
    plain = np.asarray(draw(image, segments, names, unseen))
    unseen[22] = True
    tagged = np.asarray(draw(image, segments, names, unseen))
    assert plain.shape == tagged.shape
    assert np.array_equal(plain[:, :48], tagged[:, :48])
    assert not np.array_equal(plain[:, 48:], tagged[:, 48:])


@pytest.mark.parametrize("name", ["potted plant", "refrigerator", "baseball glove"])
def test_legend_is_wide_enough_for_an_unseen_name(name):
    image = np.full((8, 8, 3), GRAY, dtype=np.uint8)
    segments = [{"mask": np.ones((8, 8), dtype=bool), "category_id": 0, "score": 1.0}]
    out = draw(image, segments, [name], unseen=torch.tensor([True]))
    text = ImageFont.load_default().getlength(f"{name} (unseen)")
    assert out.width >= 8 + text, f"legend {out.width - 8} px wide for a {text:.0f} px label"


# ---------------------------------------------------------------- segments_from_result


def test_semantic_result_gives_one_segment_per_class_present():
    scores = torch.zeros(4, 5, 6)  # (K, H, W): class 0 on the left, class 2 on the right
    scores[0, :, :3] = 1.0
    scores[2, :, 3:] = 1.0
    scores[3] = 0.5  # never the top class: no segment
    segments = segments_from_result("semantic", scores)
    assert sorted(s["category_id"] for s in segments) == [0, 2]
    by_class = {s["category_id"]: s["mask"] for s in segments}
    assert by_class[0][:, :3].all() and not by_class[0][:, 3:].any()
    assert by_class[2][:, 3:].all() and not by_class[2][:, :3].any()


def test_instance_result_keeps_confident_instances():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2] = masks[1, 2:] = masks[2, :, :2] = True
    result = {"masks": masks, "scores": torch.tensor([0.9, 0.3, 0.6]), "labels": torch.tensor([1, 2, 3])}
    segments = segments_from_result("instance", result)
    assert [s["category_id"] for s in segments] == [1, 3]
    assert [s["score"] for s in segments] == pytest.approx([0.9, 0.6])
    assert torch.equal(segments[1]["mask"], masks[2])


def test_panoptic_result_gives_one_segment_per_id():
    seg = torch.tensor([[0, 1, 1], [2, 2, 1]], dtype=torch.int32)  # 0 = void
    info = [{"id": 1, "category_id": 4, "isthing": True, "score": 0.8},
            {"id": 2, "category_id": 0, "isthing": False}]
    segments = segments_from_result("panoptic", (seg, info))
    assert [(s["category_id"], s["score"]) for s in segments] == [(4, pytest.approx(0.8)), (0, 1.0)]
    assert segments[0]["mask"].tolist() == [[False, True, True], [False, False, True]]
    assert segments[1]["mask"].tolist() == [[False, False, False], [True, True, False]]


# ---------------------------------------------------------------- segments JSON


def test_save_segments_json_writes_class_score_area_and_box(tmp_path):
    image, segments, names = _two_boxes()
    segments.append({"mask": np.zeros((40, 48), dtype=bool), "category_id": 3, "score": 0.123456})
    path = tmp_path / "out" / "demo.json"
    save_segments_json(path, {"instance": segments, "semantic": segments[:1]}, names)
    payload = json.loads(path.read_text())
    assert set(payload) == {"instance", "semantic"}
    rows = payload["instance"]
    assert [r["class"] for r in rows] == ["c1", "c22", "c3"]
    assert [r["category_id"] for r in rows] == [1, 22, 3]
    assert [r["score"] for r in rows] == [0.9, 0.8, 0.1235]
    assert [r["area"] for r in rows] == [32 * 20, 32 * 16, 0]
    assert rows[0]["box_xyxy"] == [4, 4, 24, 36]  # x0, y0, exclusive x1, y1
    assert rows[1]["box_xyxy"] == [28, 4, 44, 36]
    assert rows[2]["box_xyxy"] is None  # an empty mask has no box
    assert payload["semantic"] == rows[:1]


def test_labels_sit_inside_their_segment():
    """A box is labelled at its centre of mass; a ring (a wall around an object), whose centre of
    mass is in the hole, is labelled on the ring itself, in its thick part."""
    box = np.zeros((40, 48), dtype=bool)
    box[4:36, 4:24] = True
    x, y = label_point(box)
    assert abs(x - 13.5) <= 0.5 and abs(y - 19.5) <= 0.5
    yy, xx = np.mgrid[0:60, 0:60]
    radius = np.hypot(yy - 30, xx - 30)
    ring = (radius < 28) & ~(radius < 12)
    ring[:, :10] = False  # thinner on the left: the label goes to the thick part
    x, y = label_point(ring)
    assert ring[int(y), int(x)] and not ring[30, 30]
    assert x > 30  # the right half, where the ring is 16 px thick
