"""Convert a raw dataset once into the prepared layout that training and evaluation read.

    python prepare_data.py --dataset toy --data-root datasets            # generate + convert
    python prepare_data.py --dataset coco --data-root $FREESEG_DATASETS --workers 16

Reads `<data-root>/coco/`, `<data-root>/VOC2012/`, `<data-root>/ADEChallengeData2016/` (the raw
layouts of docs/design.md, "Data layouts") or generates `<data-root>/toy/`, and writes
`<data-root>/freeseg/<dataset>/`. Re-running skips finished work; `--force` redoes it. A missing
or malformed input, or a bad option, stops with one line naming the file or option (--debug
shows the traceback).
"""

import argparse
import os
import sys
import time

from freeseg.errors import ConfigError, UserError, run_cli
from freeseg.presets import get_preset

# The toy world's things are 20-48 px across (toy_world.render_scene): a smaller scene cannot hold them.
MIN_TOY_SIZE = 48


def check_args(args: argparse.Namespace) -> None:
    """Options checked before any work, each error naming the option."""
    for flag, value, low in (("--workers", args.workers, 1), ("--segments-per-class", args.segments_per_class, 1),
                             ("--num-train", args.num_train, 1), ("--num-val", args.num_val, 1),
                             ("--seed", args.seed, 0), ("--image-size", args.image_size, MIN_TOY_SIZE)):
        if value is not None and value < low:
            why = " (the toy world's things are up to 48 px across)" if flag == "--image-size" else ""
            raise ConfigError(f"{flag} {value}: must be at least {low}{why}")
    if os.path.exists(args.data_root) and not os.path.isdir(args.data_root):
        raise UserError(f"--data-root {args.data_root} is a file, not a directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=("coco", "voc", "ade", "toy"))
    parser.add_argument("--data-root", default=os.environ.get("FREESEG_DATASETS", "datasets"),
                        help="folder holding the raw datasets (default: $FREESEG_DATASETS or ./datasets)")
    parser.add_argument("--force", action="store_true", help="redo finished outputs")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes")
    parser.add_argument("--segments-per-class", type=int, default=None,
                        help="cap of the prompt-stage segment index (default: the dataset preset's "
                             "data.prompt_samples_per_class)")
    toy = parser.add_argument_group("toy world")
    toy.add_argument("--num-train", type=int, default=2000)
    toy.add_argument("--num-val", type=int, default=200)
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    check_args(args)

    per_class = args.segments_per_class or get_preset(args.dataset).data.prompt_samples_per_class
    start = time.time()
    if args.dataset == "toy":
        from freeseg.data.prepare_coco import prepare_toy

        outputs = prepare_toy(args.data_root, args.force, args.workers, args.num_train, args.num_val,
                              args.seed, per_class, args.image_size)
    elif args.dataset == "coco":
        from freeseg.data.prepare_coco import prepare_coco

        outputs = prepare_coco(args.data_root, args.force, args.workers, per_class)
    else:
        from freeseg.data import prepare_voc_ade

        prepare = prepare_voc_ade.prepare_voc if args.dataset == "voc" else prepare_voc_ade.prepare_ade
        outputs = [prepare(args.data_root, args.force, args.workers, per_class)]
    for out in outputs if isinstance(outputs, list) else [outputs]:
        print(f"wrote {out}")
    print(f"done in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
