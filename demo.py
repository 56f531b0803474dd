"""Segment your own image with any class names: semantic, instance or panoptic.

    python demo.py                                               # the toy model on a toy scene
    python demo.py --image street.jpg --classes "car, person, road, sky, tree" \
        --task panoptic --checkpoint runs/coco/alltask/checkpoint.pt --out street.png

Writes a PNG with colored masks, outlines, labels and a legend, and a JSON of the segments
next to it. Classes in the vocabulary that the model never trained on are treated as unseen
(their CLIP vote counts more, shared/DESIGN.md section 1); prefix a name with "+" to mark a class
as a thing (instances), otherwise a class the training set calls a thing is a thing.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from freeseg.visualize import demo_toy, draw, save_segments_json, segments_from_result

TOY_CHECKPOINT = Path("runs/toy/alltask/checkpoint.pt")


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL-readable file: grayscale, RGBA and 16-bit included."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL reports a broken PNG chunk as SyntaxError and an absurd header as a "bomb".
        raise SystemExit(f"cannot read image {path}: {err}") from err
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        a = 255 * (a - a.min()) / max(a.max() - a.min(), 1)
        img = Image.fromarray(a.astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P"):  # composite transparency on white
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"))


def parse_classes(text: str) -> list[str]:
    """Comma-separated names; a leading "+" (kept here) marks a thing class."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SystemExit("--classes is empty: give comma-separated class names, e.g. --classes \"cat, dog, grass\"")
    bare = [n.lstrip("+").strip() for n in names]
    if not all(bare):
        raise SystemExit(f"--classes has an empty name (a lone '+'): {names}")
    duplicates = sorted({n for n in bare if bare.count(n) > 1})
    if duplicates:
        raise SystemExit(f"--classes has duplicates: {', '.join(duplicates)}")
    return names


def main(argv=None) -> None:
    from freeseg.evaluation.runner import load_model
    from freeseg.modeling.inference import predict
    from freeseg.data.categories import get_categories

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", help="input image (default: a toy scene)")
    p.add_argument("--classes", help="comma-separated vocabulary")
    p.add_argument("--task", default="all", choices=["semantic", "instance", "panoptic", "all"])
    p.add_argument("--checkpoint", default=str(TOY_CHECKPOINT))
    p.add_argument("--out", default="demo.png")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        hint = " (run `python train.py --dataset toy` first)" if args.checkpoint == str(TOY_CHECKPOINT) else ""
        raise SystemExit(f"checkpoint {args.checkpoint} not found{hint}")
    if args.image is None:
        demo_toy(args.checkpoint, args.out)
        return
    if args.classes is None:
        raise SystemExit("--classes is required with --image")
    model, cfg, _ = load_model(args.checkpoint)
    raw = parse_classes(args.classes)
    names = [n.lstrip("+").strip() for n in raw]
    train_cats = {c["name"]: c for c in get_categories(cfg.data.dataset)}
    unseen = torch.tensor([not train_cats.get(n, {"seen": False})["seen"] for n in names])
    is_thing = torch.tensor([r.startswith("+") or bool(train_cats.get(n, {"isthing": False})["isthing"])
                             for r, n in zip(raw, names)])
    image = read_image(args.image)
    tasks = ("semantic", "instance", "panoptic") if args.task == "all" else (args.task,)
    with torch.no_grad():
        result = predict(model, torch.from_numpy(image.copy()).permute(2, 0, 1), names, unseen, is_thing,
                         tasks, cfg.inference)
    out = Path(args.out)
    per_task = {t: segments_from_result(t, result[t]) for t in tasks}
    for t in tasks:
        path = out if len(tasks) == 1 else out.with_name(f"{out.stem}_{t}{out.suffix}")
        draw(image, per_task[t], names, unseen).save(path)
        print(f"{t}: {len(per_task[t])} segments -> {path}")
    save_segments_json(out.with_suffix(".json"), per_task, names)


if __name__ == "__main__":
    main()
