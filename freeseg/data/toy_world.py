"""The miniature world: coloured shapes on textured backgrounds (docs/design.md, "The toy world").

A stand-in for COCO in which the whole FreeSeg recipe runs on a CPU in minutes. Scenes have
1-3 "stuff" regions (sky, grass, sand, water, wall: five textures split by wavy boundaries) and
1-5 "things" (6 colours x 5 shapes = 30 classes such as "red circle" or "blue star") of random
size (20-48 px across in a 96-px scene), position and rotation, with repeated classes, overlaps
and occlusion. Things are this large because masks are predicted at stride 4, and a grid of
24x24 cells outlines smaller things too coarsely (docs/toy_experiments.md, "Thing sizes").

Written in the COCO raw layout under `<root>/toy/` (`train2017/`, `val2017/`,
`annotations/{panoptic,instances}_{train,val}2017.json`, `panoptic_{train,val}2017/`,
`stuffthingmaps/{train,val}2017/`), so `prepare_data.py --dataset toy` converts it with the very
code that converts COCO. Images are PNG, not JPEG as in COCO: JPEG artefacts at 96x96 smear the
edges a tiny model has to learn (the converter reads the file name from the JSON, so it does not
care).

Seen/unseen split (paper section 4.1 holds out 15 of 171 COCO-Stuff classes; we hold out 7 of
35): one thing per colour, chosen so every colour and every shape still appears in seen classes
(the CLIP tower knows every word; segmentation training never sees these combinations), plus
one stuff texture:
    unseen = red star, orange cross, yellow circle, green square, blue triangle, purple star, water

Also the data of the two pre-trainings that stand in for the web and for ImageNet:
`sample_clip_batch` (the tiny CLIP's image-caption pairs over ALL classes, as CLIP saw the web;
with `region_crops`, segments cut out of scenes as the region classifier cuts them),
`zero_shot_eval_set` (single-class images for zero-shot accuracy) and `attribute_batch` (the
backbone's shape/texture and colour classification, the toy world's ImageNet).
Everything is deterministic given the seed (numpy Generator seeded per image).
"""

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from freeseg.clip import CLIP_MEAN

# Saturated hues far apart, so colour is easy and shape is the real task (docs/design.md, "The toy world").
COLORS = {
    "red": (215, 35, 35), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (35, 165, 55), "blue": (35, 75, 215), "purple": (145, 45, 185),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
STUFF = ("sky", "grass", "sand", "water", "wall")
UNSEEN = ("red star", "orange cross", "yellow circle", "green square", "blue triangle", "purple star", "water")
THING_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
NAMES = THING_NAMES + STUFF
# CLIP's pixel mean (0-255): the fill of masked-out pixels in region crops (paper section 3.3).
CLIP_MEAN_255 = tuple(255 * m for m in CLIP_MEAN)
# Captions of several lengths: the prompt learner later puts the class words after up to ten
# other tokens, and a text tower only knows the positions its captions reached.
THING_TEMPLATES = ("a photo of {}.", "{}.", "a picture of {}.", "a drawing of {}.",  # {} = "a red circle"
                   "there is {} in the scene.", "a close-up photo of {} in the picture.")
STUFF_TEMPLATES = ("a photo of {}.", "{}.", "a picture of {}.", "a texture of {}.",
                   "there is {} in the scene.", "a close-up photo of {} in the picture.")


def toy_categories() -> list[dict]:
    """35 classes: 30 things (colour-major) then 5 stuff; raw_id = COCO-style id - 1."""
    return [
        {"id": i, "raw_id": i, "name": n, "isthing": i < len(THING_NAMES), "seen": n not in UNSEEN}
        for i, n in enumerate(NAMES)
    ]


# --------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` with circumradius r around (cx, cy), rotated by `angle` radians."""
    if shape == "square":
        rad, theta = np.full(4, r * 0.8), np.pi / 4 + np.arange(4) * np.pi / 2
    elif shape == "triangle":
        rad, theta = np.full(3, r), -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    elif shape == "star":  # 5 outer points, inner radius 0.42 r: clearly spiky at 12 px
        rad, theta = np.tile([r, 0.42 * r], 5), -np.pi / 2 + np.arange(10) * np.pi / 5
    elif shape == "cross":  # a plus sign with arms 0.32 r wide
        w = 0.32 * r
        pts = np.array([(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
                        (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)])
        rad, theta = np.hypot(pts[:, 0], pts[:, 1]), np.arctan2(pts[:, 1], pts[:, 0])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    theta = theta + angle
    return list(zip(cx + rad * np.cos(theta), cy + rad * np.sin(theta)))


def shape_mask(shape: str, cx: float, cy: float, size: float, angle: float, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of one shape of diameter `size` (pixels)."""
    canvas = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    r = size / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def stuff_texture(name: str, rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float texture of a stuff class; each has a distinct low-level statistic."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0.0, 1.0, (h, w, 1)).astype(np.float32)
    if name == "sky":  # smooth vertical gradient, almost no noise
        t = (yy / max(h - 1, 1))[..., None]
        return np.array([105, 155, 230]) * (1 - t) + np.array([195, 220, 250]) * t + 3 * noise
    if name == "grass":  # strong green noise streaked vertically like blades
        blades = ndimage.uniform_filter1d(rng.normal(0, 1, (h, w)), 5, axis=0)[..., None]
        return np.array([85, 145, 45]) + np.array([18, 45, 14]) * blades * 2 + 8 * noise
    if name == "sand":  # flat beige with sparse dark speckles
        speck = (rng.random((h, w, 1)) < 0.08) * np.array([-60, -55, -45])
        return np.array([215, 195, 145]) + speck + 5 * noise
    if name == "water":  # wavy horizontal stripes
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (yy + 2.5 * np.sin(xx / 5 + phase)) / 6)[..., None]
        return np.array([40, 100, 165]) + np.array([20, 30, 35]) * wave + 4 * noise
    if name == "wall":  # bricks 16x8 with light mortar, alternate rows offset by half a brick
        oy, ox = rng.integers(0, 8), rng.integers(0, 16)
        row = ((yy + oy) // 8).astype(int)
        mortar = ((yy + oy) % 8 < 1.5) | ((xx + ox + 8 * (row % 2)) % 16 < 1.5)
        return np.where(mortar[..., None], np.array([205, 200, 190]), np.array([155, 75, 55])) + 6 * noise
    raise ValueError(f"unknown stuff class {name!r}")


def _stuff_layout(rng: np.random.Generator, hw: tuple[int, int], k: int) -> np.ndarray:
    """(H, W) int region index in [0, k): bands split by k-1 random wavy boundaries."""
    h, w = hw
    vertical = rng.random() < 0.5
    length, across = (w, h) if vertical else (h, w)
    t = np.arange(across, dtype=np.float32)
    coord = np.arange(length, dtype=np.float32)[:, None]  # (length, 1)
    region = np.zeros((length, across), dtype=np.int64)
    for base in np.sort(rng.uniform(0.2, 0.8, k - 1)) * length:
        amp, freq, phase = rng.uniform(2, 8), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        region += coord > base + amp * np.sin(2 * np.pi * freq * t / across + phase)
    return region.T if vertical else region


def _place_things(rng: np.random.Generator, hw: tuple[int, int], min_size: int, max_size: int) -> list[tuple[int, np.ndarray]]:
    """Random things in painter's order, as (class id, full mask); mostly hidden ones are dropped.

    A thing whose visible part (after later things are painted over it) is under half its
    in-image area or under 24 pixels is removed before painting: its pixels would be a
    fragment nobody can name. Dropping one can uncover another, hence the loop.
    """
    things = []
    for _ in range(rng.integers(1, 6)):
        # One in three picks repeats a class already present: several instances of one class.
        cls = things[rng.integers(len(things))][0] if things and rng.random() < 0.33 else rng.integers(len(THING_NAMES))
        size = rng.uniform(min_size, max_size)
        cx, cy = rng.uniform(size * 0.3, hw[1] - size * 0.3), rng.uniform(size * 0.3, hw[0] - size * 0.3)
        angle = rng.uniform(-0.45, 0.45)  # +-25 degrees: a square must not become a diamond
        mask = shape_mask(SHAPES[cls % len(SHAPES)], cx, cy, size, angle, hw)
        if mask.sum() >= 24:
            things.append((int(cls), mask))
    while True:
        covered = np.zeros(hw, dtype=bool)
        keep = [True] * len(things)
        for i in range(len(things) - 1, -1, -1):  # top-most first
            visible = (things[i][1] & ~covered).sum()
            keep[i] = visible >= max(24, 0.5 * things[i][1].sum())
            if keep[i]:
                covered |= things[i][1]
        if all(keep):
            return things
        things = [t for t, k in zip(things, keep) if k]


def render_scene(rng: np.random.Generator, size: int = 96, min_thing: int = 20, max_thing: int = 48) -> dict:
    """One scene: {"image": uint8 (H, W, 3), "sem": uint8 (H, W) contiguous toy ids,
    "segments": [{"category_id", "isthing", "mask" (H, W) bool}]} (visible masks, disjoint)."""
    hw = (size, size)
    k = int(rng.integers(1, 4))
    stuff_ids = rng.choice(len(STUFF), size=k, replace=False)
    layout = _stuff_layout(rng, hw, k)
    image = np.zeros((size, size, 3), dtype=np.float32)
    sem = np.zeros(hw, dtype=np.uint8)
    segments = []
    for region, sid in enumerate(stuff_ids):
        m = layout == region
        if m.any():
            image[m] = stuff_texture(STUFF[sid], rng, hw)[m]
            sem[m] = len(THING_NAMES) + sid
            segments.append({"category_id": len(THING_NAMES) + int(sid), "isthing": False, "mask": m})
    for cls, mask in _place_things(rng, hw, min_thing, max_thing):
        # Flat colour, a per-instance brightness jitter and a darker 1-pixel outline.
        color = np.array(COLORS[THING_NAMES[cls].split()[0]]) * rng.uniform(0.85, 1.1)
        edge = mask & ~ndimage.binary_erosion(mask)
        image[mask] = color + rng.normal(0, 4, (int(mask.sum()), 3))
        image[edge] *= 0.6
        sem[mask] = cls
        for seg in segments:  # painter's order: the new thing takes its pixels from all below
            seg["mask"] = seg["mask"] & ~mask
        segments.append({"category_id": cls, "isthing": True, "mask": mask})
    segments = [s for s in segments if s["mask"].any()]
    return {"image": np.clip(image, 0, 255).astype(np.uint8), "sem": sem, "segments": segments}


# --------------------------------------------------------------------------- tiny-CLIP data


def _single_class_image(rng: np.random.Generator, cls: int, size: int, mean_fill: bool,
                        extent: tuple[float, float] = (0.45, 0.85), shift: float = 0.1) -> np.ndarray:
    """(size, size, 3) uint8: one thing on a stuff texture, or a stuff patch (cls >= 30).

    A thing is `extent` times `size` across (uniform in that range) and its centre is moved off
    the image centre by up to `shift` times `size` on each axis. With `mean_fill` the pixels
    outside the object (or outside a random blob of stuff) take CLIP's mean colour, like the
    masked crops the region classifier feeds CLIP.
    """
    hw = (size, size)
    if cls < len(THING_NAMES):
        image = stuff_texture(STUFF[rng.integers(len(STUFF))], rng, hw)
        d = rng.uniform(*extent) * size
        c = size / 2 + rng.uniform(-shift, shift, 2) * size
        mask = shape_mask(SHAPES[cls % len(SHAPES)], c[0], c[1], d, rng.uniform(-0.45, 0.45), hw)
        image[mask] = np.array(COLORS[THING_NAMES[cls].split()[0]]) * rng.uniform(0.85, 1.1)
        image[mask & ~ndimage.binary_erosion(mask)] *= 0.6
    else:
        image = stuff_texture(STUFF[cls - len(THING_NAMES)], rng, hw)
        blob = ndimage.gaussian_filter(rng.normal(0, 1, hw), size / 8)
        mask = blob > np.quantile(blob, rng.uniform(0.1, 0.5))
    if mean_fill:
        image[~mask] = CLIP_MEAN_255
    return np.clip(image, 0, 255).astype(np.uint8)


def with_article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _caption(rng: np.random.Generator, cls: int) -> str:
    if cls < len(THING_NAMES):
        return THING_TEMPLATES[rng.integers(len(THING_TEMPLATES))].format(with_article(NAMES[cls]))
    return STUFF_TEMPLATES[rng.integers(len(STUFF_TEMPLATES))].format(NAMES[cls])


def region_crops(rng: np.random.Generator, n: int, size: int, scene_size: int = 96,
                 expand: tuple[float, float] = (1.2, 2.0), jitter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`n` segments cut out of rendered scenes exactly as FreeSeg's region classifier cuts mask
    proposals (box grown by a random factor in `expand`, CLIP's mean outside the mask, bicubic
    resize to `size`) -> (uint8 (n, 3, size, size), int64 class ids).

    A real CLIP has seen objects at every scale and in every clutter on the web; the toy CLIP
    sees them here. With `jitter`, most masks are made as imperfect as proposals
    (`proposal_like`).
    """
    import torch

    from freeseg.crops import crop_masked_regions

    images, labels = np.zeros((n, 3, size, size), dtype=np.uint8), np.zeros(n, dtype=np.int64)
    i = 0
    while i < n:
        scene = render_scene(rng, size=scene_size)
        image = torch.from_numpy(scene["image"]).permute(2, 0, 1).float()
        for seg in rng.permutation(len(scene["segments"])):
            if i == n:
                break
            seg = scene["segments"][seg]
            mask = seg["mask"]
            if jitter:
                mask = proposal_like(rng, mask)
            crop = crop_masked_regions(image, torch.from_numpy(mask)[None], size, rng.uniform(*expand), CLIP_MEAN_255)
            images[i] = crop[0].round().clamp(0, 255).to(torch.uint8).numpy()
            labels[i] = seg["category_id"]
            i += 1
    return images, labels


def proposal_like(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A ground-truth mask made as imperfect as a mask proposal: 20% grown and 20% shrunk by a
    pixel, 30% redrawn from a 4x or 8x coarser grid (area mean, bilinear upsampling, threshold
    0.3-0.7: the blurred outline of a stride-4 mask head), 30% left exact.

    The region classifier reads a thing's shape off the outline of its mask, which the
    crop keeps (CLIP's mean colour outside). With exact masks only, the tiny CLIP named the
    shape of 94% of proposals above IoU 0.85 and of 33% between 0.5 and 0.7.
    """
    import torch
    import torch.nn.functional as F

    u = rng.random()
    if u < 0.2:
        return ndimage.binary_dilation(mask)
    if u < 0.4:
        eroded = ndimage.binary_erosion(mask)
        return eroded if eroded.any() else mask
    if u < 0.7:
        factor = int(rng.choice([4, 8]))
        m = torch.from_numpy(mask).float()[None, None]
        h, w = mask.shape
        coarse = F.adaptive_avg_pool2d(m, (max(h // factor, 1), max(w // factor, 1)))
        soft = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        blurred = soft > rng.uniform(0.3, 0.7)
        return blurred if blurred.any() else mask
    return mask


def scene_caption(rng: np.random.Generator, things: list[int], stuff: int | None) -> str:
    """"a photo of a red circle, a blue star and a green cross on grass.": one to three of the
    scene's things (random order), the largest stuff, and "a photo of" half of the time."""
    named = [with_article(NAMES[c]) for c in rng.permutation(things)[: rng.integers(1, 4)]]
    if not named:  # every thing was hidden: a stuff picture
        return f"a photo of {NAMES[stuff]}."
    text = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    text = f"{text} on {NAMES[stuff]}" if stuff is not None else text
    return f"a photo of {text}." if rng.random() < 0.5 else f"{text}."


def sample_clip_batch(rng: np.random.Generator, n: int, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """`n` image-caption pairs over all 35 classes -> (uint8 (n, 3, size, size), captions).

    40% single things ("a photo of a red circle.") and 10% stuff patches drawn at `size`, half
    of both mean-filled outside the mask; 35% segments cut out of 96-px scenes as the region
    classifier cuts them (`region_crops`); 15% whole scenes captioned with one to three of their
    things (`scene_caption`). Single-class captions name exactly one class, so the same-caption
    positives of the contrastive loss are the same class.
    """
    images = np.zeros((n, 3, size, size), dtype=np.uint8)
    captions = [""] * n
    kind = rng.choice(4, size=n, p=[0.4, 0.1, 0.35, 0.15])
    crops = np.flatnonzero(kind == 2)
    images[crops], crop_labels = region_crops(rng, len(crops), size)
    for i, cls in zip(crops, crop_labels):
        captions[i] = _caption(rng, int(cls))
    for i in np.flatnonzero(kind != 2):
        if kind[i] < 2:
            cls = int(rng.integers(len(THING_NAMES))) if kind[i] == 0 else len(THING_NAMES) + int(rng.integers(len(STUFF)))
            images[i] = _single_class_image(rng, cls, size, rng.random() < 0.5).transpose(2, 0, 1)
            captions[i] = _caption(rng, cls)
            continue
        scene = render_scene(rng, size=size, min_thing=size // 5, max_thing=size // 2)
        things = sorted({s["category_id"] for s in scene["segments"] if s["isthing"]})
        stuff = max((s for s in scene["segments"] if not s["isthing"]), key=lambda s: s["mask"].sum(), default=None)
        captions[i] = scene_caption(rng, things, stuff["category_id"] if stuff is not None else None)
        images[i] = scene["image"].transpose(2, 0, 1)
    return images, captions


def attribute_batch(rng: np.random.Generator, n: int, size: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The toy world's "ImageNet": labelled single-class images for pre-training the backbone.

    -> (uint8 (n, 3, size, size), form (n,), colour (n,)). The labels are attributes, never
    segmentation classes: `form` is the shape (0-4, SHAPES) of a thing or 5 + the texture
    (STUFF) of a stuff patch; `colour` is the thing's colour (0-5, COLORS), -1 for stuff.
    Every class appears, unseen ones included, as ImageNet holds pictures of COCO's unseen
    classes. At 48 px the objects are 22-48 px across, up to 7 px off centre: things are 20-48
    px in the 96-px scenes and 30-72 px at the test size of 144, and a backbone that has seen
    only centred objects of 22-41 px reads their shape worse (ImageNet pre-training, too, crops
    and rescales at random; docs/toy_experiments.md, "Thing sizes").
    """
    images = np.zeros((n, 3, size, size), dtype=np.uint8)
    classes = rng.integers(len(NAMES), size=n)
    for i, cls in enumerate(classes):
        images[i] = _single_class_image(rng, int(cls), size, mean_fill=False, extent=(0.45, 1.0),
                                        shift=0.15).transpose(2, 0, 1)
    things = classes < len(THING_NAMES)
    form = np.where(things, classes % len(SHAPES), len(SHAPES) + classes - len(THING_NAMES))
    colour = np.where(things, classes // len(SHAPES), -1)
    return images, form.astype(np.int64), colour.astype(np.int64)


def zero_shot_eval_set(seed: int, n_per_class: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Single-class images of every toy class -> (uint8 (35 n, 3, size, size), int64 labels).

    Labels are contiguous toy ids (`toy_categories()`); half the images are mean-filled.
    """
    rng = np.random.default_rng([seed, 7])
    labels = np.repeat(np.arange(len(NAMES)), n_per_class)
    images = np.stack([_single_class_image(rng, int(c), size, j % 2 == 1).transpose(2, 0, 1)
                       for j, c in enumerate(labels)])
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------- COCO layout

_SPLITS = ("train2017", "val2017")


def _write_one(job: tuple[str, int, int], raw_dir: str, seed: int, size: int) -> tuple[dict, dict, list[dict]]:
    """Render image `index` of `split` and write its image, panoptic PNG and stuff-thing map."""
    from pycocotools import mask as mask_utils

    from freeseg.data.io import id_to_rgb, mask_bbox, save_png_atomic

    split, index, image_id = job
    scene = render_scene(np.random.default_rng([seed, _SPLITS.index(split), index]), size=size)
    name = f"{image_id:012d}.png"
    pan = np.zeros((size, size), dtype=np.int64)
    segments_info, instances = [], []
    for k, seg in enumerate(scene["segments"]):
        coco_id = seg["category_id"] + 1  # toy COCO-style ids start at 1, like COCO's
        seg_id = coco_id * 1000 + k  # spread over the R and G channels, as real COCO ids are
        pan[seg["mask"]] = seg_id
        info = {"id": seg_id, "category_id": coco_id, "iscrowd": 0, "bbox": [float(v) for v in mask_bbox(seg["mask"])],
                "area": int(seg["mask"].sum())}
        segments_info.append(info)
        if seg["isthing"]:
            rle = mask_utils.encode(np.asfortranarray(seg["mask"].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            instances.append({"image_id": image_id, "category_id": coco_id, "segmentation": rle,
                              "area": info["area"], "bbox": info["bbox"], "iscrowd": 0})
    save_png_atomic(scene["image"], f"{raw_dir}/{split}/{name}")
    save_png_atomic(id_to_rgb(pan), f"{raw_dir}/panoptic_{split}/{name}")
    # COCO-Stuff convention: the label map stores the category id minus one (255 = unlabeled).
    save_png_atomic(scene["sem"], f"{raw_dir}/stuffthingmaps/{split}/{name}")
    image = {"id": image_id, "file_name": name, "height": size, "width": size}
    return image, {"image_id": image_id, "file_name": name, "segments_info": segments_info}, instances


TOY_WORLD_VERSION = 2  # raised when the generator draws other scenes: a world on disk is then redrawn


def write_coco_layout(raw_dir: str, num_train: int, num_val: int, seed: int, size: int = 96,
                      workers: int = 1, force: bool = False) -> bool:
    """Generate the toy world into `raw_dir` (COCO layout). Returns False if it was already there.

    Train image ids are 1..num_train and val ids 1_000_001.., so they never collide.
    """
    import functools
    import os

    from freeseg.data.io import load_json, parallel_map, save_json_atomic

    params = {"num_train": num_train, "num_val": num_val, "seed": seed, "size": size, "version": TOY_WORLD_VERSION}
    params_file = f"{raw_dir}/annotations/toy_world.json"
    outputs = [f"{raw_dir}/annotations/{kind}_{s}.json" for kind in ("panoptic", "instances") for s in _SPLITS]
    if not force and os.path.isfile(params_file) and all(map(os.path.isfile, outputs)):
        if load_json(params_file) == params:
            return False
    cats = toy_categories()
    pan_cats = [{"id": c["id"] + 1, "name": c["name"], "isthing": int(c["isthing"]),
                 "supercategory": "shape" if c["isthing"] else "texture"} for c in cats]
    inst_cats = [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]}
                 for c in pan_cats if c["isthing"]]
    for split, num, first_id in (("train2017", num_train, 1), ("val2017", num_val, 1_000_001)):
        jobs = [(split, i, first_id + i) for i in range(num)]
        fn = functools.partial(_write_one, raw_dir=raw_dir, seed=seed, size=size)
        results = parallel_map(fn, jobs, workers, desc=f"toy {split}")
        images = [r[0] for r in results]
        instances = [ann for r in results for ann in r[2]]
        for ann_id, ann in enumerate(instances, start=1):
            ann["id"] = ann_id
        info = {"description": "FreeSeg toy world", "seed": seed}
        save_json_atomic({"info": info, "images": images, "annotations": [r[1] for r in results],
                          "categories": pan_cats}, f"{raw_dir}/annotations/panoptic_{split}.json")
        save_json_atomic({"info": info, "images": images, "annotations": instances, "categories": inst_cats},
                         f"{raw_dir}/annotations/instances_{split}.json")
    save_json_atomic(params, params_file)
    return True


def demo_scene(seed: int, size: int = 96) -> np.ndarray:
    """(size, size, 3) uint8: the first scene from `seed` on that shows seen AND unseen things."""
    unseen = {i for i, n in enumerate(NAMES) if n in UNSEEN}
    for offset in range(1000):
        scene = render_scene(np.random.default_rng([seed, offset]), size=size)
        things = {s["category_id"] for s in scene["segments"] if s["isthing"]}
        if len(things) >= 3 and things & unseen and things - unseen:
            return scene["image"]
    raise RuntimeError(f"no toy scene with seen and unseen things for seed {seed}")
