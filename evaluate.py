"""Evaluate a FreeSeg checkpoint: semantic mIoU, panoptic PQ and instance AP, seen vs unseen.

    python evaluate.py                                   # the latest toy-world run
    python evaluate.py --checkpoint runs/coco/alltask/checkpoint.pt --out results.json
    python evaluate.py --checkpoint ckpt.pt --dataset voc --tasks semantic     # cross-dataset
    torchrun --nproc_per_node=8 evaluate.py --checkpoint ckpt.pt --ttpt
    python evaluate.py --checkpoint freeseg_coco.pt --protocol official   # the official code's rules

Scores are percentages. "seen"/"unseen" follow the evaluated dataset's split
(freeseg/data/categories.py); mIoU_seen, mIoU_unseen and hIoU are computed over all classes
of the vocabulary at once (the "standard protocol" of docs/design.md, "Seen and unseen classes"), not over
unseen classes alone. `--out` writes the JSON of docs/design.md ("Results file") (checked before
the evaluation starts: a .json file in an existing folder, never the checkpoint itself).
`--protocol` chooses the inference and evaluation rules (docs/differences.md): "mask2former"
(ours) or "official" (the official FreeSeg code's, quirks included); the default is the
checkpoint's `inference.protocol` ("official" for a converted official checkpoint). An
error in what was given is one line naming the file or key (--debug shows the traceback).
"""

import argparse
import sys
from pathlib import Path

from freeseg import distributed as dist
from freeseg import engine
from freeseg.data.io import check_output_file
from freeseg.errors import ConfigError, MissingFileError, run_cli
from freeseg.evaluation.runner import evaluate_checkpoint
from freeseg.serialization import trust_files

TOY_CHECKPOINT = Path("runs/toy/alltask/checkpoint.pt")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(TOY_CHECKPOINT), help="all-task checkpoint (default: the toy run)")
    p.add_argument("--data-root", default=None, help="datasets root (default: the one the model was trained with)")
    p.add_argument("--dataset", default=None, choices=["coco", "voc", "ade", "toy"],
                   help="evaluate on this dataset and its vocabulary (default: the training dataset)")
    p.add_argument("--split", default=None, help="prepared split (default: val)")
    p.add_argument("--tasks", nargs="+", choices=["semantic", "instance", "panoptic"], default=None)
    p.add_argument("--ttpt", action="store_true", help="test-time prompt tuning for the unseen classes")
    p.add_argument("--ablation", action="store_true", help="also score mask-classifier-only and TTPT rows")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--protocol", default=None, choices=["mask2former", "official"],
                   help="inference and evaluation rules (default: the checkpoint's inference.protocol)")
    p.add_argument("--fast", action="store_true",
                   help="fast inference (fast.enabled): region CLIP only where it can matter, an approximation "
                        "(docs/speed.md)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="inference overrides, e.g. --set inference.ttpt.steps=5 inference.clip_weight_unseen=0.7")
    p.add_argument("--out", default=None, help="results JSON (written atomically)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully even if it holds more than weights: only for a file you "
                        "trust, as unpickling can run code hidden in it")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    trust_files(args.trust_checkpoint)
    if not Path(args.checkpoint).is_file():
        hint = " (run `python train.py --dataset toy` first)" if args.checkpoint == str(TOY_CHECKPOINT) else ""
        raise MissingFileError(f"checkpoint {args.checkpoint} not found{hint}")
    if args.max_images is not None and args.max_images < 1:
        raise ConfigError(f"--max-images {args.max_images}: must be at least 1 (leave it out for every image)")
    if args.out is not None:
        check_output_file(args.out, "--out", (".json",), inputs=(args.checkpoint,))
    engine.keep_freed_memory()
    device = dist.init_distributed()[3]
    evaluate_checkpoint(args.checkpoint, out=args.out, data_root=args.data_root, dataset=args.dataset,
                        split=args.split, tasks=args.tasks, ablation=args.ablation, ttpt=args.ttpt,
                        max_images=args.max_images, device=str(device),
                        overrides=args.overrides + ([f"inference.protocol={args.protocol}"] if args.protocol else [])
                        + (["fast.enabled=true"] if args.fast else []))
    dist.cleanup()


if __name__ == "__main__":
    sys.exit(run_cli(main))
