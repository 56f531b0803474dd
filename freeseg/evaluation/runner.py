"""Run a trained FreeSeg over a prepared validation set and score every task.

`evaluate_model` feeds each validation image through `freeseg.modeling.inference.predict`
(pixel decoder once per image, then each task with its own task prompt) and accumulates
the three evaluators. Ground truth is read at the original resolution: the semantic map,
the panoptic PNG with its crowd flags, and the thing segments as instance masks.
`evaluate_checkpoint` is what `evaluate.py` and the toy pipeline call; with `ablation=True`
it also scores the mask classifier alone and the model with test-time prompt tuning, the
ablation of the paper's Table 5 on whatever dataset is at hand.

Under torchrun, rank r takes images r, r+W, ...; the evaluators are reduced before scoring.

With `inference.protocol = "official"` (evaluate.py --protocol official) the official evaluation
rules apply too: images are read as detectron2 reads them (EXIF orientation, PIL's bilinear
resize); COCO instance inference runs with the 133 panoptic classes and the CLIP ensemble with the
official unseen flags (freeseg/data/categories.py); mask AP is scored against the prepared
instances JSON; seen / unseen PQ count a class that never occurs as 0 and seen / unseen AP is a
plain mean over the group's classes (evaluation/panoptic.py, instance.py).
"""

import copy
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from freeseg import distributed as dist
from freeseg.config import INFERENCE_EXTENSIONS, Config, InferenceConfig, apply_overrides, from_dict, validate
from freeseg.data.io import DataError, rgb_to_id
from freeseg.errors import CheckpointError, ConfigError, UserError
from freeseg.evaluation.instance import InstanceEvaluator
from freeseg.evaluation.panoptic import PanopticEvaluator
from freeseg.evaluation.report import format_table, results_json, write_results
from freeseg.evaluation.semantic import SemanticEvaluator


def load_model(path: str | Path, device: str = "cpu"):
    """(model, cfg, tokenizer) from an all-task checkpoint written by train.py."""
    from freeseg import clip
    from freeseg.engine import load_checkpoint, mismatch, tokenizer_for
    from freeseg.modeling.freeseg import build_freeseg

    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no config: convert official checkpoints first")
    cfg = from_dict(ckpt["config"], Config)
    if cfg.train.stage != "alltask":
        raise CheckpointError(f"checkpoint {path} is from the {cfg.train.stage!r} stage, not a FreeSeg model "
                              "(an all-task checkpoint)")
    state = ckpt["model"]
    clip_state = {k[len("clip_model."):]: v for k, v in state.items() if k.startswith("clip_model.")}
    clip_model = clip.build_model(clip_state)
    tokenizer = tokenizer_for(ckpt.get("merges"))
    cfg.model.backbone.weights = ""  # the backbone's pre-trained start is superseded by the checkpoint
    model = build_freeseg(cfg, clip_model, tokenizer)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model its config describes "
                              f"(another model size?): {mismatch(err)}") from None
    return model.to(device).eval(), cfg, tokenizer


def _panoptic_gt(root: Path, record: dict):
    """(segment-id map (H, W) int64, segments) from the prepared COCO-style panoptic PNG."""
    ids = rgb_to_id(np.asarray(Image.open(root / record["panoptic_file"]).convert("RGB")))
    return torch.from_numpy(ids), record["segments"]


def official_test_image(path: Path, short_side: int) -> torch.Tensor:
    """An evaluation image as the official test loader gives it: detectron2's `read_image` (PIL,
    EXIF orientation applied, RGB) and `ResizeShortestEdge` (PIL bilinear on uint8) to the test
    size of `TestResize` -> (3, H, W) uint8."""
    from freeseg.data.io import DataError
    from freeseg.data.transforms import TestResize

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except OSError as err:
        raise DataError(f"{path}: cannot decode image ({err})") from None
    h, w = TestResize(short_side).output_size(image.height, image.width, short_side)
    resized = np.asarray(image.resize((w, h), Image.BILINEAR))  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def _as_is(item):
    """The DataLoader's collate function: items pass unchanged (one image at a time)."""
    return item


class EvaluationImages(torch.utils.data.Dataset):
    """The validation images as the model is fed them, for a DataLoader whose workers read
    ahead: item i -> (i, the dataset's sample i, the test image (3, H, W) uint8, the panoptic
    ground truth or None). `official_short_side`: read the image as the official test loader
    does (`official_test_image`), else resize the sample's image with `resize`."""

    def __init__(self, dataset, data_root: Path, resize, official_short_side: int | None):
        self.dataset, self.data_root, self.resize = dataset, data_root, resize
        self.official_short_side = official_short_side

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        try:
            sample, record = self.dataset[i], self.dataset.records[i]
            if self.official_short_side is not None:
                image = official_test_image(Path(self.dataset.root) / record["file_name"], self.official_short_side)
            else:
                image = self.resize(sample, np.random.default_rng(0))["image"]
            pan_gt = _panoptic_gt(self.data_root, record) if record.get("panoptic_file") else None
        except UserError as err:
            # Handed over, not raised: a worker's exception reaches the main process wrapped in
            # the worker's traceback, and a bad file must stay a one-line error.
            return i, err, None, None
        return i, sample, image, pan_gt


@torch.no_grad()
def evaluate_model(model, cfg: Config, prep: Path, split: str, tasks, variants: dict[str, InferenceConfig],
                   max_images: int | None = None) -> dict[str, dict]:
    from freeseg.data.categories import ensemble_unseen
    from freeseg.data.datasets import SegmentationDataset, load_meta
    from freeseg.data.transforms import TestResize
    from freeseg.extensions import predict_hooks
    from freeseg.modeling.inference import predict

    meta = load_meta(prep)
    cats = meta["categories"]
    official = cfg.inference.protocol == "official"
    names = [c["name"] for c in cats]
    # The CLIP ensemble's unseen classes; the evaluators group by the categories' "seen".
    unseen = torch.from_numpy(ensemble_unseen(meta["dataset"], cats, cfg.inference.protocol))
    is_thing = torch.tensor([bool(c["isthing"]) for c in cats])
    dataset = SegmentationDataset(prep, split, base=False)
    records = dataset.records
    if "panoptic" in tasks or "instance" in tasks:
        if any(r.get("panoptic_file") is None for r in records):
            raise DataError(f"{prep}: {split} has no panoptic annotations; evaluate with --tasks semantic")
    resize = TestResize(cfg.data.test_short_side)
    count = len(records) if max_images is None else min(max_images, len(records))
    seen = torch.tensor([bool(c["seen"]) for c in cats])
    evaluators = {
        name: {"semantic": SemanticEvaluator(len(cats), seen=seen),
               "panoptic": PanopticEvaluator(cats, official), "instance": InstanceEvaluator(cats, official)}
        for name in variants
    }
    if official and "instance" in tasks:  # the official AP is scored against the instances JSON
        for ev in evaluators.values():
            ev["instance"].load_ground_truth(prep / f"instances_{split}.json")
    hooks = predict_hooks(cfg)  # the toy world's additions and fast mode; none for FreeSeg
    text_cache = {name: {} for name in variants}  # prompt features per (vocabulary, task), reused across images
    indices = list(range(dist.get_rank(), count, dist.get_world_size()))
    # Workers read and resize the next images while this process runs the model.
    loader = torch.utils.data.DataLoader(
        EvaluationImages(dataset, prep.parent.parent, resize, cfg.data.test_short_side if official else None),
        sampler=indices, batch_size=None, num_workers=min(cfg.data.num_workers, len(indices)),
        collate_fn=_as_is)
    start = time.perf_counter()
    for done, (i, sample, image, pan_gt) in enumerate(loader, 1):
        if isinstance(sample, UserError):
            raise sample
        record = records[i]
        h, w = sample["sem_seg"].shape
        for name, icfg in variants.items():
            ev = evaluators[name]
            out = predict(model, image, names, unseen, is_thing, tasks, icfg, out_size=(h, w),
                          text_cache=text_cache[name], hooks=hooks)
            if "semantic" in out:
                ev["semantic"].update(out["semantic"].argmax(0), sample["sem_seg"])
            if "panoptic" in out:
                seg, info = out["panoptic"]
                ev["panoptic"].update(seg, info, *pan_gt)
            if "instance" in out and official:
                ev["instance"].update(record["image_id"], out["instance"]["masks"], out["instance"]["scores"],
                                      out["instance"]["labels"])
            elif "instance" in out:
                things = [s for s in record["segments"] if s["isthing"]]
                gt_ids, gt_segs = pan_gt
                masks = torch.stack([gt_ids == s["id"] for s in things]) if things else torch.zeros(0, h, w, dtype=torch.bool)
                ev["instance"].add_ground_truth(record["image_id"], masks,
                                                torch.tensor([s["category_id"] for s in things], dtype=torch.long),
                                                torch.tensor([bool(s["iscrowd"]) for s in things]))
                ev["instance"].update(record["image_id"], out["instance"]["masks"], out["instance"]["scores"],
                                      out["instance"]["labels"])
        if dist.is_main() and done % 50 == 0:
            print(f"  evaluated {i + 1}/{count} images ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    if dist.is_main() and indices:
        print(f"  {len(indices)} images in {seconds:.1f} s: {len(indices) / seconds:.2f} images / s"
              f"{' on this rank' if dist.get_world_size() > 1 else ''} ({len(variants)} inference setting(s), "
              f"{loader.num_workers} loader worker(s))", flush=True)

    results = {}
    for name in variants:
        ev = evaluators[name]
        parts = {}
        if "semantic" in tasks:
            ev["semantic"].all_reduce()
            parts["semantic"] = ev["semantic"].summary()
        if "panoptic" in tasks:
            ev["panoptic"].all_reduce()
            parts["panoptic"] = ev["panoptic"].summary()
        if "instance" in tasks:
            ev["instance"].gather()
            if dist.is_main():
                parts["instance"] = ev["instance"].summary()
        results[name] = results_json(**parts)
    return results


def ablation_variants(base: InferenceConfig, ablation: bool, ttpt: bool) -> dict[str, InferenceConfig]:
    """The inference settings to score: the configured one, plus the ablation rows if asked."""
    variants = {}
    if ablation:
        mask_only = copy.deepcopy(base)
        mask_only.use_clip, mask_only.ttpt.enabled = False, False
        variants["mask classifier only"] = mask_only
    ensemble = copy.deepcopy(base)
    ensemble.ttpt.enabled = False
    variants["+ CLIP ensemble"] = ensemble
    if ablation or ttpt:
        tuned = copy.deepcopy(base)
        tuned.ttpt.enabled = True
        variants["+ test-time prompt tuning"] = tuned
    return variants


def apply_inference_overrides(cfg: Config, overrides: list[str] | None) -> None:
    """Apply `--set KEY=VALUE` items to a trained model's config: only the settings that may
    change after training (inference.*, fast.*, data.test_short_side, the extensions that act only at
    inference, config.INFERENCE_EXTENSIONS), and data.num_workers, the image loader's worker processes."""
    allowed = ("inference.", "fast.", "data.test_short_side", "data.num_workers", *INFERENCE_EXTENSIONS)
    for item in overrides or []:
        if not item.startswith(allowed):
            raise ConfigError(f"evaluation override {item!r}: only inference.*, fast.*, data.test_short_side, "
                              "data.num_workers and the inference extensions (extensions.clip_*, unclaimed_min_area) can change after training")
    apply_overrides(cfg, list(overrides or []))
    validate(cfg, prefixes=allowed)


def evaluate_checkpoint(path: str | Path, out: str | Path | None = None, data_root: str | None = None,
                        dataset: str | None = None, split: str | None = None, tasks=None,
                        ablation: bool = False, ttpt: bool = False, max_images: int | None = None,
                        device: str = "cpu", overrides: list[str] | None = None) -> dict:
    """Evaluate an all-task checkpoint; print the table; write `out` (the main row) atomically.

    `overrides` (`inference.ttpt.steps=5`, ...) change the stored config's inference settings.
    """
    from freeseg.data.categories import EVAL_CATEGORY_SET, OFFICIAL_EVAL_CATEGORY_SET

    model, cfg, _ = load_model(path, device)
    apply_inference_overrides(cfg, overrides)
    root = Path(data_root or cfg.data.root)
    dataset = dataset or cfg.data.dataset
    split = split or cfg.data.val_split
    category_sets = OFFICIAL_EVAL_CATEGORY_SET if cfg.inference.protocol == "official" else EVAL_CATEGORY_SET
    tasks = tuple(tasks or (t for t in cfg.inference.tasks if t in category_sets[dataset]))
    unknown = [t for t in tasks if t not in category_sets[dataset]]
    if unknown:
        raise ConfigError(f"dataset {dataset!r} has no ground truth for {unknown}")
    if out is not None and (root / "freeseg").resolve() in Path(out).resolve().parents:
        raise UserError(f"--out {out} is inside the prepared data {root / 'freeseg'}: choose another path")
    variants = ablation_variants(cfg.inference, ablation, ttpt)
    # Each task is scored on its own category set (COCO: panoptic PQ on the 133 panoptic classes).
    by_set: dict[str, list[str]] = {}
    for task in tasks:
        by_set.setdefault(category_sets[dataset][task], []).append(task)
    results = {name: {} for name in variants}
    for category_set, set_tasks in by_set.items():
        part = evaluate_model(model, cfg, root / "freeseg" / category_set, split, tuple(set_tasks), variants,
                              max_images)
        for name in variants:
            results[name].update(part[name])
    main_row = "+ test-time prompt tuning" if ttpt else "+ CLIP ensemble"
    if dist.is_main():
        print(f"\n{dataset} {split}: {path} ({cfg.inference.protocol} protocol)")
        print(format_table(results))
        if out is not None:
            write_results(Path(out), results[main_row])
    return results
