"""The miniature world: scene invariants, determinism, COCO-layout files, tiny-CLIP data."""

import hashlib
import os
import time

import numpy as np

from freeseg.data.toy_world import (NAMES, STUFF, THING_NAMES, render_scene, sample_clip_batch,
                                    write_coco_layout, zero_shot_eval_set)


def _tree_hash(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_scene_segments_partition_the_image_and_match_sem():
    rng = np.random.default_rng(0)
    repeated = 0
    for _ in range(30):
        s = render_scene(rng, size=64)
        masks = np.stack([seg["mask"] for seg in s["segments"]])
        assert (masks.sum(0) == 1).all()  # disjoint and covering: every pixel has one segment
        for seg in s["segments"]:
            assert (s["sem"][seg["mask"]] == seg["category_id"]).all()
            assert seg["isthing"] == (seg["category_id"] < len(THING_NAMES))
            if seg["isthing"]:
                assert seg["mask"].sum() >= 24  # mostly hidden things were dropped
        things = [seg["category_id"] for seg in s["segments"] if seg["isthing"]]
        assert 1 <= len(things) <= 5 and 1 <= len(s["segments"]) - len(things) <= 3
        repeated += len(things) != len(set(things))
    assert repeated > 0  # several instances of one class do occur


def test_same_seed_same_files_and_other_seed_differs(tmp_path):
    hashes = []
    for run, seed in ((0, 5), (1, 5), (2, 6)):
        folder = str(tmp_path / str(run))
        write_coco_layout(folder, 6, 2, seed, size=48, workers=2 if run == 1 else 1)
        hashes.append(_tree_hash(folder))
    assert hashes[0] == hashes[1] and hashes[0] != hashes[2]
    assert write_coco_layout(str(tmp_path / "0"), 6, 2, 5, size=48) is False  # already there: skipped


def test_generation_speed(tmp_path):
    start = time.perf_counter()
    write_coco_layout(str(tmp_path), 100, 10, 0, workers=1)
    assert time.perf_counter() - start < 10  # 2000 + 200 images in well under a minute on 2 cores


def test_clip_batch_and_zero_shot_set():
    images, captions = sample_clip_batch(np.random.default_rng(0), 64, size=32)
    assert images.shape == (64, 3, 32, 32) and images.dtype == np.uint8 and len(captions) == 64
    for cap in captions:
        assert any(name in cap for name in NAMES) and cap.endswith(".")
    assert any(" and " in c for c in captions) or any(" on " in c for c in captions)
    images, labels = zero_shot_eval_set(seed=1, n_per_class=2, size=32)
    assert images.shape == (70, 3, 32, 32) and labels.tolist() == np.repeat(np.arange(35), 2).tolist()
    again, _ = zero_shot_eval_set(seed=1, n_per_class=2, size=32)
    assert np.array_equal(images, again)
    # A single-stuff image is made of that texture: sky is smooth, grass is not.
    sky, grass = images[2 * (30 + STUFF.index("sky"))], images[2 * (30 + STUFF.index("grass"))]
    assert np.abs(np.diff(sky.astype(int), axis=2)).mean() < np.abs(np.diff(grass.astype(int), axis=2)).mean()


def test_region_crops_cut_segments_as_the_region_classifier_does():
    import torch

    from freeseg.data.toy_world import CLIP_MEAN_255, region_crops
    from freeseg.crops import crop_masked_regions

    images, labels = region_crops(np.random.default_rng(3), 12, 32, expand=(1.5, 1.5), jitter=False)
    assert images.shape == (12, 3, 32, 32) and images.dtype == np.uint8
    assert set(labels.tolist()) <= set(range(len(NAMES)))
    # The same generator state renders the same first scene: its first crop is the region
    # classifier's crop of that segment, rounded to uint8.
    rng = np.random.default_rng(3)
    scene = render_scene(rng, size=96)
    seg = scene["segments"][rng.permutation(len(scene["segments"]))[0]]
    image = torch.from_numpy(scene["image"]).permute(2, 0, 1).float()
    want = crop_masked_regions(image, torch.from_numpy(seg["mask"])[None], 32, 1.5, CLIP_MEAN_255)[0]
    assert labels[0] == seg["category_id"]
    assert np.array_equal(images[0], want.round().clamp(0, 255).to(torch.uint8).numpy())


def test_attribute_batch_labels_shape_texture_and_colour():
    from freeseg.data.toy_world import COLORS, SHAPES, attribute_batch

    images, form, colour = attribute_batch(np.random.default_rng(0), 200, size=48)
    assert images.shape == (200, 3, 48, 48) and images.dtype == np.uint8
    assert set(form.tolist()) == set(range(len(SHAPES) + len(STUFF)))
    stuff = form >= len(SHAPES)
    assert (colour[stuff] == -1).all() and set(colour[~stuff].tolist()) == set(range(len(COLORS)))
    # A thing's colour label is the colour of its pixels: a thing is painted with its palette
    # colour times one brightness factor (0.85-1.1), so many pixels are proportional to the
    # palette entry of its label, more than to any other (objects need not cover the centre).
    palette = np.array(list(COLORS.values()), dtype=float)
    for image, c in zip(images[~stuff][:20], colour[~stuff][:20]):
        pixels = image.reshape(3, -1).T.astype(float)  # (H*W, 3)
        factor = pixels @ palette.T / (palette**2).sum(1)  # (H*W, colours): least-squares brightness
        redrawn = np.clip(factor[..., None] * palette[None], 0, 255)  # (H*W, colours, 3)
        close = (np.abs(redrawn - pixels[:, None]).max(-1) <= 6) & (factor > 0.8) & (factor < 1.15)
        counts = close.sum(0)  # (colours,)
        assert counts.argmax() == c and counts[c] > 20, (counts, c)
