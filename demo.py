"""Segment your own image with any class names: semantic, instance or panoptic.

    python demo.py                                               # the toy model on a toy scene
    python demo.py --image street.jpg --classes "car, person, road, sky, tree" \
        --task panoptic --checkpoint runs/coco/alltask/checkpoint.pt --out street.png

Writes a PNG with colored masks, outlines, labels and a legend, and a JSON of the segments
next to it. Classes in the vocabulary that the model never trained on are treated as unseen
(their CLIP vote counts more, docs/design.md, "Seen and unseen classes"); prefix a name with "+" to mark a class
as a thing (instances), otherwise a class the training set calls a thing is a thing. Names are
matched as CLIP's tokenizer reads them (case and runs of spaces do not count), so "Wall" is the
training set's "wall", and "red star, Red  Star" is one class given twice (an error). The image
is read as a viewer shows it (EXIF orientation, 16-bit and float images, transparency).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from freeseg.clip.tokenizer import clean
from freeseg.data.io import check_output_file, read_rgb_image, save_image_atomic
from freeseg.errors import ConfigError, MissingFileError, run_cli
from freeseg.serialization import trust_files
from freeseg.visualize import demo_toy, draw, save_segments_json, segments_from_result

TOY_CHECKPOINT = Path("runs/toy/alltask/checkpoint.pt")
# Picture formats the demo writes (those this Pillow can save).
PICTURES = tuple(e for e in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
                 if Image.registered_extensions().get(e) in Image.SAVE)


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL-readable file: grayscale, RGBA, 16-bit, float and EXIF
    orientation included (freeseg.data.io.read_rgb_image); an unreadable file is a DataError."""
    return read_rgb_image(path)


def parse_classes(text: str) -> list[str]:
    """Comma-separated names; a leading "+" (kept here) marks a thing class. Two names that CLIP's
    tokenizer reads alike (same words up to case and spacing) are duplicates: an error naming them."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--classes is empty: give comma-separated class names, e.g. --classes \"cat, dog, grass\"")
    bare = [n.lstrip("+").strip() for n in names]
    if not all(bare):
        raise ConfigError(f"--classes has an empty name (a lone '+'): {names}")
    seen: dict[str, list[str]] = {}
    for name in bare:
        seen.setdefault(clean(name), []).append(name)
    duplicates = [f"{' / '.join(repr(n) for n in spelled)} (all read as {key!r})" if len(set(spelled)) > 1 else repr(key)
                  for key, spelled in seen.items() if len(spelled) > 1]
    if duplicates:
        raise ConfigError(f"--classes has duplicates as CLIP's tokenizer reads them: {'; '.join(duplicates)}")
    return names


def output_paths(out: str, tasks: tuple[str, ...]) -> tuple[list[Path], Path]:
    """The picture of each task (one task: `out` itself) and the segments' JSON beside them."""
    out = Path(out)
    pictures = [out] if len(tasks) == 1 else [out.with_name(f"{out.stem}_{t}{out.suffix}") for t in tasks]
    return pictures, out.with_suffix(".json")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", help="input image (default: a toy scene)")
    p.add_argument("--classes", help="comma-separated vocabulary")
    p.add_argument("--task", default="all", choices=["semantic", "instance", "panoptic", "all"])
    p.add_argument("--checkpoint", default=str(TOY_CHECKPOINT))
    p.add_argument("--out", default="demo.png", help="picture to write (.png, .jpg, ...)")
    p.add_argument("--fast", action="store_true",
                   help="fast inference: region CLIP only where it can matter, an approximation (docs/speed.md)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully even if it holds more than weights: only for a file you "
                        "trust, as unpickling can run code hidden in it")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    trust_files(args.trust_checkpoint)
    if not Path(args.checkpoint).is_file():
        hint = " (run `python train.py --dataset toy` first)" if args.checkpoint == str(TOY_CHECKPOINT) else ""
        raise MissingFileError(f"checkpoint {args.checkpoint} not found{hint}")
    # Checked before any work: every file this command writes, against every file it reads.
    inputs = (args.checkpoint, args.image)
    tasks = ("semantic", "instance", "panoptic") if args.task == "all" else (args.task,)
    if args.image is None:
        check_output_file(args.out, "--out", PICTURES, inputs)
        demo_toy(args.checkpoint, args.out, fast=args.fast)
        return
    if args.classes is None:
        raise ConfigError("--classes is required with --image")
    raw = parse_classes(args.classes)
    image_paths, json_path = output_paths(args.out, tasks)
    for path in image_paths:
        check_output_file(path, "--out", PICTURES, inputs)
    check_output_file(json_path, "segments JSON (beside --out)", (".json",), inputs)
    image = read_image(args.image)
    run_demo(args.checkpoint, image, raw, tasks, image_paths, json_path, args.fast)


def vocabulary(raw: list[str], dataset: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, unseen (K,) bool, is_thing (K,) bool) of `parse_classes` output: a name is seen, or
    a thing, when the training set's class of that name is, compared as CLIP's tokenizer reads
    them ("Wall" and "wall  " are the training set's "wall")."""
    from freeseg.data.categories import get_categories

    names = [n.lstrip("+").strip() for n in raw]
    train_cats = {clean(c["name"]): c for c in get_categories(dataset)}
    unseen = torch.tensor([not train_cats.get(clean(n), {"seen": False})["seen"] for n in names])
    is_thing = torch.tensor([r.startswith("+") or bool(train_cats.get(clean(n), {"isthing": False})["isthing"])
                             for r, n in zip(raw, names)])
    return names, unseen, is_thing


def run_demo(checkpoint: str, image: np.ndarray, raw: list[str], tasks: tuple[str, ...], image_paths: list[Path],
             json_path: Path, fast: bool = False) -> None:
    from freeseg.evaluation.runner import load_model
    from freeseg.extensions import predict_hooks
    from freeseg.modeling.inference import predict

    model, cfg, _ = load_model(checkpoint)
    cfg.fast.enabled = cfg.fast.enabled or fast
    names, unseen, is_thing = vocabulary(raw, cfg.data.dataset)
    with torch.no_grad():
        result = predict(model, torch.from_numpy(image.copy()).permute(2, 0, 1), names, unseen, is_thing,
                         tasks, cfg.inference, hooks=predict_hooks(cfg))
    per_task = {t: segments_from_result(t, result[t]) for t in tasks}
    for t, path in zip(tasks, image_paths):
        save_image_atomic(draw(image, per_task[t], names, unseen), path)
        print(f"{t}: {len(per_task[t])} segments -> {path}")
    save_segments_json(json_path, per_task, names)


if __name__ == "__main__":
    sys.exit(run_cli(main))
