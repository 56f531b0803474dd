"""Draw segmentation results: colored masks, outlines, class labels and a legend.

Used by `demo.py` and by the toy pipeline for its demo picture. Colors come from a fixed
palette indexed by class, so the same class has the same color in every picture.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from freeseg.data.io import save_image_atomic
from freeseg.distributed import atomic_write_json

# 20 well-separated colors (Tableau-like), cycled for larger vocabularies.
PALETTE = np.array([
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
    [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [174, 199, 232], [255, 187, 120],
    [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148], [247, 182, 210], [199, 199, 199],
    [219, 219, 141], [158, 218, 229],
], dtype=np.uint8)


def segments_from_result(task: str, result) -> list[dict]:
    """A task's prediction as a list of {"mask": (H, W) bool, "category_id", "score"}."""
    if task == "semantic":
        labels = result.argmax(0)  # (H, W)
        return [{"mask": labels == k, "category_id": int(k), "score": 1.0} for k in labels.unique().tolist()]
    if task == "instance":
        return [{"mask": m, "category_id": int(c), "score": float(s)}
                for m, c, s in zip(result["masks"], result["labels"], result["scores"]) if s > 0.5]
    seg, info = result
    return [{"mask": seg == s["id"], "category_id": int(s["category_id"]), "score": float(s.get("score", 1.0))}
            for s in info]


def label_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) where a segment's label goes: of its pixels at least half as deep inside it as its
    deepest one (distance to the nearest outside pixel), the one nearest its centre of mass. For
    a compact segment that is the pixel at its centre of mass; a ring's or a C's centre of mass
    lies outside it (a wall around an object), where the label would name the wrong segment."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]  # (H, W), 0 outside
    ys, xs = np.nonzero(depth >= 0.5 * depth.max())  # the deep pixels
    all_ys, all_xs = np.nonzero(mask)
    near = np.argmin((xs - all_xs.mean()) ** 2 + (ys - all_ys.mean()) ** 2)
    return float(xs[near]), float(ys[near])


def draw(image: np.ndarray, segments: list[dict], class_names: list[str], unseen=None, scale: int = 1) -> Image.Image:
    """Overlay `segments` on an (H, W, 3) uint8 image; a legend lists the classes shown."""
    h, w = image.shape[:2]
    canvas = image.astype(np.float32).copy()
    edges = np.zeros((h, w), dtype=bool)
    for seg in segments:
        m = seg["mask"].cpu().numpy() if torch.is_tensor(seg["mask"]) else seg["mask"]
        color = PALETTE[seg["category_id"] % len(PALETTE)]
        canvas[m] = 0.45 * canvas[m] + 0.55 * color
        inner = m.copy()  # a pixel is on the outline if a 4-neighbour is outside the mask
        inner[1:] &= m[:-1]
        inner[:-1] &= m[1:]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        edges |= m & ~inner
    canvas[edges] = 255
    picture = Image.fromarray(canvas.astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
    font = ImageFont.load_default()
    shown = sorted({s["category_id"] for s in segments})
    legend_w = 10 + max([len(class_names[k]) for k in shown] + [6]) * 7 + 60
    out = Image.new("RGB", (w * scale + legend_w, max(h * scale, 16 * len(shown) + 10)), (255, 255, 255))
    out.paste(picture, (0, 0))
    pen = ImageDraw.Draw(out)
    for seg in segments:  # label each segment inside it, near its centre of mass
        m = seg["mask"].cpu().numpy() if torch.is_tensor(seg["mask"]) else seg["mask"]
        if m.any():
            x, y = label_point(m)
            pen.text((x * scale, y * scale), class_names[seg["category_id"]][:14], fill=(0, 0, 0), font=font,
                     anchor="mm")
    for row, k in enumerate(shown):
        y = 6 + 16 * row
        pen.rectangle([w * scale + 8, y, w * scale + 20, y + 12], fill=tuple(int(c) for c in PALETTE[k % len(PALETTE)]))
        tag = " (unseen)" if unseen is not None and bool(unseen[k]) else ""
        pen.text((w * scale + 26, y), class_names[k] + tag, fill=(0, 0, 0), font=font)
    return out


def save_segments_json(path: Path, task_segments: dict[str, list[dict]], class_names: list[str]) -> None:
    """The segments as JSON (class, score, area, box), written atomically."""
    payload = {}
    for task, segments in task_segments.items():
        rows = []
        for seg in segments:
            m = seg["mask"]
            ys, xs = torch.nonzero(torch.as_tensor(m), as_tuple=True)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
            rows.append({"class": class_names[seg["category_id"]], "category_id": seg["category_id"],
                         "score": round(seg["score"], 4), "area": int(len(xs)), "box_xyxy": box})
        payload[task] = rows
    atomic_write_json(payload, str(path))


def demo_toy(checkpoint: str | Path, out: str | Path, seed: int = 7, fast: bool = False) -> Path:
    """Segment one fresh toy scene with every task and save the panels side by side."""
    from freeseg.data import toy_world
    from freeseg.data.categories import get_categories
    from freeseg.data.transforms import TestResize
    from freeseg.evaluation.runner import load_model
    from freeseg.extensions import predict_hooks
    from freeseg.modeling.inference import predict

    model, cfg, _ = load_model(checkpoint)
    cfg.fast.enabled = cfg.fast.enabled or fast  # --fast: docs/speed.md
    cats = get_categories("toy")
    names = [c["name"] for c in cats]
    unseen = torch.tensor([not c["seen"] for c in cats])
    is_thing = torch.tensor([bool(c["isthing"]) for c in cats])
    image = toy_world.demo_scene(seed)  # (H, W, 3) uint8, a scene of the toy world's size
    # As in evaluation: the model sees the image resized to the test size, predictions come back
    # at the scene's size.
    pixels = TestResize(cfg.data.test_short_side)({"image": torch.from_numpy(image).permute(2, 0, 1)})["image"]
    tasks = ("semantic", "instance", "panoptic")
    with torch.no_grad():
        result = predict(model, pixels, names, unseen, is_thing, tasks, cfg.inference, out_size=image.shape[:2],
                         hooks=predict_hooks(cfg))
    panels = [draw(image, segments_from_result(t, result[t]), names, unseen, scale=3) for t in tasks]
    width = sum(p.width for p in panels)
    sheet = Image.new("RGB", (width, max(p.height for p in panels) + 14), (255, 255, 255))
    x = 0
    for task, panel in zip(tasks, panels):
        sheet.paste(panel, (x, 14))
        ImageDraw.Draw(sheet).text((x + 4, 1), task, fill=(0, 0, 0))
        x += panel.width
    out = Path(out)
    save_image_atomic(sheet, out)  # a stopped run or a full disk never leaves half a picture
    print(f"demo picture: {out}")
    return out
