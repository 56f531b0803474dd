"""Where a trained FreeSeg model loses its points: the proposals, or their classification?

    python -m freeseg.evaluation.diagnose                      # the toy run, 200 val images
    python -m freeseg.evaluation.diagnose --checkpoint runs/coco/alltask/checkpoint.pt --max-images 500

mIoU, PQ and AP mix two failures: a segment no query outlines, and a segment outlined but
misnamed. This splits them. For every ground-truth segment of the evaluation split it takes the
query whose binarised mask overlaps it most (its "best proposal") and records
  - that best IoU (how well the proposal network outlines the segment; 0.5 is PQ's bar),
    also split by whether another segment of the same class is in the image ("twin"): queries
    that cannot tell two instances apart outline both at once,
  - whether the mask classifier names the segment's class on that query (argmax over K),
  - whether CLIP names it on the crop of that query's mask (the region classifier's view),
  - whether CLIP names it on the crop of the ground-truth mask (CLIP's ceiling on this data),
  - whether the geometric ensemble of the two (paper eq. 6) names it,
and prints the means per group (thing / stuff x seen / unseen). Class names are read with the
evaluation's task prompt (`--task`, default panoptic); masks are binarised at the inference
threshold and crops cut as at inference (`inference.mask_expand_ratio`), with the extensions'
inference hooks (freeseg/extensions.py). With `extensions.unclaimed_min_area` (toy preset) the
unclaimed regions are proposals too, as at inference: CLIP alone names them, so the mask
classifier never does.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

COLUMNS = ("segments", "best IoU", "IoU>0.5", "IoU alone", "IoU twin", "mask cls", "CLIP", "CLIP on GT", "ensemble")


@torch.no_grad()
def segment_records(model, cfg, prep: Path, split: str = "val", task: str = "panoptic",
                    max_images: int | None = None) -> list[dict]:
    """One dict per ground-truth segment: {"category_id", "isthing", "seen", "area", "twin",
    "best_iou", "mask_cls", "clip", "clip_gt", "ensemble"} (the last four: bool, class named right)."""
    from freeseg.data.datasets import SegmentationDataset, load_meta
    from freeseg.data.transforms import TestResize
    from freeseg.extensions import inference_hooks
    from freeseg.modeling.inference import classify_with_clip, clip_probabilities, mask_probabilities, region_text

    cats = load_meta(prep)["categories"]
    names = [c["name"] for c in cats]
    unseen = torch.tensor([not c["seen"] for c in cats])
    dataset = SegmentationDataset(prep, split, base=False)
    resize = TestResize(cfg.data.test_short_side)
    icfg, hooks = cfg.inference, inference_hooks(cfg.extensions)
    text = model.text_features(names, task)
    clip_text = region_text(model, names, task, hooks, text=text)  # what CLIP names the regions against
    rows = []
    for i in range(len(dataset) if max_images is None else min(max_images, len(dataset))):
        sample = dataset[i]
        image = resize(sample, np.random.default_rng(0))["image"].float()
        H, W = image.shape[-2:]
        out = model.decode(model.extract(image[None]), text)
        probs = mask_probabilities(model, out["pred_masks"][0], (H, W), icfg.mask_align_corners)  # (Q, H, W)
        scores = out["pred_logits"][0].softmax(-1)  # (Q, K + 1)
        p_mask, Q = scores[:, :-1], len(probs)  # (Q, K)
        probs, p_clip, p_ens = classify_with_clip(model, image, probs, scores, clip_text, unseen, icfg, hooks)  # Q + n rows
        binary = probs > icfg.mask_threshold
        gt = torch.as_tensor(sample["masks"])
        if gt.numel() and tuple(gt.shape[-2:]) != (H, W):
            gt = F.interpolate(gt[:, None].float(), size=(H, W), mode="nearest")[:, 0].bool()
        p_gt = clip_probabilities(model, image, gt.float(), clip_text, icfg, hooks) if gt.numel() else None
        labels = sample["labels"].tolist()
        for n, label in enumerate(labels):
            inter = (binary & gt[n]).flatten(1).sum(1)
            union = (binary | gt[n]).flatten(1).sum(1).clamp_min(1)
            iou = inter / union
            q = int(iou.argmax())
            rows.append({"category_id": label, "isthing": bool(cats[label]["isthing"]), "seen": bool(cats[label]["seen"]),
                         "area": int(gt[n].sum()), "twin": labels.count(label) > 1, "best_iou": float(iou[q]),
                         "mask_cls": q < Q and int(p_mask[q].argmax()) == label, "clip": int(p_clip[q].argmax()) == label,
                         "clip_gt": int(p_gt[n].argmax()) == label, "ensemble": int(p_ens[q].argmax()) == label})
    return rows


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Means per group ("thing seen", "thing unseen", "stuff seen", ...; "all"), in percent
    except "segments" (a count) and the IoUs (0-1; nan where a group has no such segment)."""
    groups: dict[str, list[dict]] = {"all": rows}
    for r in rows:
        key = f"{'thing' if r['isthing'] else 'stuff'} {'seen' if r['seen'] else 'unseen'}"
        groups.setdefault(key, []).append(r)
    table = {}
    for key in sorted(groups, key=lambda k: (k == "all", k)):
        g = groups[key]
        mean = lambda field: 100.0 * float(np.mean([r[field] for r in g]))  # noqa: E731
        iou = lambda rs: float(np.mean([r["best_iou"] for r in rs])) if rs else float("nan")  # noqa: E731
        table[key] = {"segments": len(g), "best IoU": iou(g),
                      "IoU>0.5": 100.0 * float(np.mean([r["best_iou"] > 0.5 for r in g])),
                      "IoU alone": iou([r for r in g if not r["twin"]]), "IoU twin": iou([r for r in g if r["twin"]]),
                      "mask cls": mean("mask_cls"), "CLIP": mean("clip"), "CLIP on GT": mean("clip_gt"),
                      "ensemble": mean("ensemble")}
    return table


def format_summary(table: dict[str, dict[str, float]]) -> str:
    lines = ["group         " + "  ".join(f"{c:>10}" for c in COLUMNS)]
    for key, row in table.items():
        cells = [f"{row['segments']:>10d}"]
        cells += [f"{row[c]:>10.3f}" if c.startswith(("best", "IoU ")) else f"{row[c]:>10.1f}" for c in COLUMNS[1:]]
        lines.append(f"{key:<14}" + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    from freeseg.evaluation.runner import apply_inference_overrides, load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/toy/alltask/checkpoint.pt", help="all-task checkpoint")
    p.add_argument("--data-root", default=None, help="datasets root (default: the one the model was trained with)")
    p.add_argument("--split", default=None, help="prepared split (default: val)")
    p.add_argument("--task", default="panoptic", choices=["semantic", "instance", "panoptic"],
                   help="whose task prompt names the classes")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="inference overrides, as for evaluate.py, e.g. --set extensions.clip_flip=false")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint {args.checkpoint} not found")
    model, cfg, _ = load_model(args.checkpoint)
    apply_inference_overrides(cfg, args.overrides)
    prep = Path(args.data_root or cfg.data.root) / "freeseg" / cfg.data.dataset
    rows = segment_records(model, cfg, prep, args.split or cfg.data.val_split, args.task, args.max_images)
    print(f"{cfg.data.dataset} {args.split or cfg.data.val_split}: {args.checkpoint} ({args.task} prompts)")
    print(format_summary(summarize(rows)))


if __name__ == "__main__":
    import sys

    from freeseg.errors import run_cli

    sys.exit(run_cli(main, prog="python -m freeseg.evaluation.diagnose"))
