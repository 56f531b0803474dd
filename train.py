"""Train FreeSeg: the tiny CLIP and the backbone (toy world only), the prompt stage and the all-task stage.

    torchrun --standalone --nproc_per_node=2 train.py --dataset toy   # the whole miniature world, end to end
    python train.py --dataset toy                       # the same in one process
    torchrun --nproc_per_node=8 train.py --dataset coco --stage prompt
    torchrun --nproc_per_node=8 train.py --dataset coco --stage alltask --init runs/coco/prompt/checkpoint.pt
    python train.py --dataset toy --stage alltask --set train.iterations=100 --resume

Every override of every stage is checked before the first stage starts; a stage refuses to
start over a run directory's checkpoint unless told to continue it (--resume) or replace it
(--overwrite); an error in what was given is one line naming the file or key (--debug shows
the traceback).

Each stage is one plain loop below: draw a batch, forward, loss, backward, clip, step, LR,
log, checkpoint; `run_stage` runs one of them. Without --stage, `--dataset toy` runs the whole
miniature world (freeseg/toy_pipeline.py), which calls `run_stage` for each stage. The data
order is a pure function of (seed, iteration) (`engine.IterationSampler`), so a resumed run and
an uninterrupted one see the same batches, and N processes with batch b see the same images as
one process with batch N*b. Paper: FreeSeg section 3 (stages), section 4.1 (settings);
defaults in `freeseg/config.py`, presets in `freeseg/presets.py`.
"""

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from freeseg import config as C
from freeseg import distributed as dist
from freeseg import engine, extensions
from freeseg import presets, toy_pipeline, weights
from freeseg.data.io import writable_dir
from freeseg.errors import CheckpointError, ConfigError, ConfigKeyError, MissingFileError, UserError, run_cli
from freeseg.modeling.targets import TASKS
from freeseg.serialization import trust_files
from freeseg.toy_pretraining import train_backbone, train_clip

STAGES = toy_pipeline.STAGES  # clip, backbone, prompt, alltask; the first two only for the toy world


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="toy", choices=["coco", "voc", "ade", "toy"])
    p.add_argument("--stage", choices=list(STAGES),
                   help="one stage; without it, --dataset toy runs every stage, evaluation and the demo")
    p.add_argument("--preset", help="start from this preset instead of the dataset/stage default")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set train.lr=1e-4 model.decoder.num_queries=50; "
                        "STAGE:KEY=VALUE applies to one stage only (alltask:train.iterations=300)")
    p.add_argument("--data-root", default=None, help="datasets root (default: $FREESEG_DATASETS or ./datasets)")
    p.add_argument("--output-dir", default=None, help="run directory (default: runs/<dataset>/<stage>)")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pt (which must exist)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output directory that holds a checkpoint, replacing it")
    p.add_argument("--init", default=None, help="prompt-stage checkpoint whose prompts start the all-task stage")
    p.add_argument("--clip", default=None, help="CLIP to use (OpenAI name or file); sets model.clip.name")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the files this command reads fully even if they hold more than weights: only for "
                        "files you trust, as unpickling can run code hidden in them")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def data_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("FREESEG_DATASETS") or "datasets")


def dataset_stages(dataset: str) -> tuple[str, ...]:
    return STAGES if dataset == "toy" else ("prompt", "alltask")


def resolve_config(args, stage: str, world_size: int = 1) -> C.Config:
    """The config of `stage`: its preset, the overrides for every stage and those for this one
    (STAGE:KEY=VALUE), the command's paths; type- and range-checked (config.validate)."""
    cfg = presets.get_preset(args.preset or presets.preset_for(args.dataset, stage))
    overrides = []
    for item in args.overrides:
        prefix, sep, rest = item.partition(":")
        if not sep or "=" in prefix:
            overrides.append(item)
        elif prefix not in dataset_stages(args.dataset):
            raise ConfigError(f"override {item!r}: unknown stage {prefix!r} (--dataset {args.dataset} has "
                              f"{', '.join(dataset_stages(args.dataset))})")
        elif prefix == stage:
            overrides.append(rest)
    C.apply_overrides(cfg, overrides)
    cfg.data.root = str(data_root(args.data_root))
    cfg.train.stage = stage
    if args.clip:
        cfg.model.clip.name = args.clip
    return C.validate(cfg, world_size)


def check_overrides(args) -> dict[str, C.Config]:
    """Every stage's config, resolved and checked before any stage starts: a typo in an
    override of the last stage (or of a stage this command does not run) fails now, not after
    the earlier stages have trained. The pipeline's CLIP and backbone stages run in one
    process (toy_pipeline.train_toy_stage), so only the other stages split their batch over
    torchrun's processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    configs = {}
    stages = dataset_stages(args.dataset)
    for stage in sorted(stages, key=lambda s: s != args.stage):  # the stage this command runs first
        alone = args.stage is None and stage in ("clip", "backbone")
        try:
            configs[stage] = resolve_config(args, stage, 1 if alone else world)
        except (ConfigError, ConfigKeyError) as err:
            raise ConfigError(err if stage == args.stage else f"{stage} stage: {err}") from None
    return {stage: configs[stage] for stage in stages}


def check_run_dir(out_dir: Path, args, cfg: C.Config) -> None:
    """Before any work: the run directory can be written, its checkpoint is continued only with
    --resume and replaced only with --overwrite, and nothing this stage writes is one of its inputs."""
    ckpt = out_dir / "checkpoint.pt"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output-dir {out_dir} is a file, not a directory")
    existing = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if not existing.is_dir() or not writable_dir(existing):
        raise UserError(f"--output-dir {out_dir}: {existing} is not a writable directory")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run directory's checkpoint, --overwrite replaces it: give one")
    if args.resume and not ckpt.is_file():
        raise MissingFileError(f"--resume: {ckpt} does not exist (run without --resume to start this stage)")
    if ckpt.exists() and not (args.resume or args.overwrite):
        raise UserError(f"{out_dir} already holds a checkpoint ({ckpt}): --resume continues it, --overwrite "
                        "starts afresh and replaces it, or choose another --output-dir")
    outputs = [ckpt, out_dir / "metrics.jsonl", out_dir / "resnet.pth"]
    inputs = {"--init": args.init, "--clip / model.clip.name": cfg.model.clip.name,
              "model.backbone.weights": cfg.model.backbone.weights}
    for flag, path in inputs.items():
        if path and any(Path(path).absolute().resolve() == o.absolute().resolve() for o in outputs):
            raise UserError(f"{flag} {path} is a file this stage writes in {out_dir}: choose another --output-dir")
    if args.init and not Path(args.init).is_file():
        raise MissingFileError(f"--init checkpoint {args.init} does not exist")
    if cfg.model.clip.name not in ("", *weights.CLIP_MODELS) and not Path(cfg.model.clip.name).is_file():
        raise MissingFileError(f"no CLIP checkpoint at {cfg.model.clip.name} (--clip / model.clip.name; known model "
                               f"names: {', '.join(weights.CLIP_MODELS)})")
    if cfg.model.backbone.weights and not Path(cfg.model.backbone.weights).is_file():
        raise MissingFileError(f"backbone weights {cfg.model.backbone.weights} do not exist (model.backbone.weights)")


def prepared_dir(cfg: C.Config) -> Path:
    return Path(cfg.data.root) / "freeseg" / cfg.data.dataset


def seen_vocabulary(prep: Path):
    """Names of the seen classes, and a map from dataset class id to seen-class index."""
    from freeseg.data.datasets import load_meta

    cats = load_meta(prep)["categories"]
    seen_ids = [c["id"] for c in cats if c["seen"]]
    remap = torch.full((max(c["id"] for c in cats) + 1,), -1, dtype=torch.long)
    remap[seen_ids] = torch.arange(len(seen_ids))
    return [cats[i]["name"] for i in seen_ids], remap


def draw_task(tasks: tuple[str, ...], seed: int, it: int) -> str:
    """The task of iteration `it`, drawn uniformly from `tasks` (TrainConfig.tasks) by a
    generator seeded with (seed, it): the same on every rank, and after a resume. With the
    three tasks in their usual order it is the draw the stages always made."""
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"train.tasks must name each of {', '.join(TASKS)} at most once, got {tasks!r}")
    return tasks[np.random.default_rng([seed, it]).integers(len(tasks))]


# ---------------------------------------------------------------- stage 1: prompts


def train_prompt(cfg: C.Config, out_dir: Path, resume: bool) -> Path:
    """Learn the class and task prompts: classify cut-out segments of seen classes with CLIP."""
    from freeseg.clip import normalize_pixels
    from freeseg.data.datasets import SegmentCropDataset
    from freeseg.data.transforms import PromptCrop
    from freeseg.modeling.prompts import build_prompts
    from freeseg.modeling.region_classifier import clip_logit_scale

    draw_task(cfg.train.tasks, cfg.train.seed, 0)  # a bad task list fails before any work
    device = dist.init_distributed()[3]
    engine.seed_everything(cfg.train.seed)  # the same initial weights on every rank and every run
    clip_model, tokenizer = engine.load_clip(cfg.model.clip.name, device)
    clip_model.requires_grad_(False)
    prompts = build_prompts(cfg.model.prompt, clip_model, tokenizer).to(device)
    prep = prepared_dir(cfg)
    names, remap = seen_vocabulary(prep)
    # The crop's box grows by the region classifier's ratio, as in the official code (MASK_EXPAND_RATIO).
    crop = PromptCrop(cfg.data.prompt_crop, clip_model.input_resolution, cfg.inference.mask_expand_ratio)
    # CLIP's own temperature: 100 for OpenAI's CLIP (the official value), ~15 for the toy CLIP.
    scale = clip_logit_scale(clip_model)
    optimizer = engine.build_optimizer(prompts, cfg.train)
    start = engine.start_from(out_dir, resume, {"model": prompts}, optimizer, cfg)
    logger = engine.Logger(out_dir, cfg.train.iterations, start)
    logger.truncate_after(start)
    loader = engine.make_loader(engine.SeededDataset(SegmentCropDataset(prep, cfg.data.train_split), crop), cfg, start)

    for it, batch in enumerate(loader, start):
        engine.set_lr(optimizer, engine.lr_factor(it, cfg.train))
        images = torch.stack([b[0] for b in batch]).to(device)  # (B, 3, R, R) in 0-255
        labels = remap[torch.tensor([b[1] for b in batch])].to(device)  # (B,) seen-class index
        task = draw_task(cfg.train.tasks, cfg.train.seed, it)
        with torch.no_grad():
            image_features = F.normalize(clip_model.encode_image(normalize_pixels(images)), dim=-1)  # (B, E)
        text_features = prompts(names, task)  # (K, E), normalised
        logits = scale * image_features @ text_features.t()  # (B, K)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        engine.average_gradients(prompts)
        if cfg.train.clip_grad_norm > 0:  # official CLIP_GRADIENTS, full-model L2 norm
            torch.nn.utils.clip_grad_norm_(prompts.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        engine.check_finite(it, {"loss": loss}, out_dir / "checkpoint.pt")

        if (it + 1) % cfg.train.log_every == 0 or it + 1 == cfg.train.iterations:
            acc = (logits.argmax(-1) == labels).float().mean()
            logger.log(it, {**engine.mean_over_ranks({"loss": loss, "acc": acc}), "lr": optimizer.param_groups[0]["lr"]})
        if (it + 1) % cfg.train.checkpoint_every == 0 or it + 1 == cfg.train.iterations:
            engine.save_checkpoint(out_dir / "checkpoint.pt", model=prompts.state_dict(),
                                   optimizer=optimizer.state_dict(), iteration=it + 1,
                                   rng=engine.rng_state(), config=C.to_dict(cfg))
    return out_dir / "checkpoint.pt"


# ---------------------------------------------------------------- stage 2: all tasks


def alltask_targets(samples: list[dict], task: str, remap: torch.Tensor, padded_size: tuple[int, int],
                    device: torch.device) -> list[dict]:
    """The drawn task's targets of a batch, labels as seen-class indices. The model pads its
    input to `padded_size` (FreeSeg.padded_size) and predicts masks over that whole area, so the
    target masks are padded alike with background, as Mask2Former pads them to the batch tensor;
    unpadded, a mask upsampled to the target size would be stretched out of place. Each target
    keeps its sample's augmentation seed, from which the losses draw their sampling points."""
    from freeseg.modeling.targets import batch_targets

    return [{"labels": remap[t["labels"]].to(device), "masks": t["masks"].to(device), "seed": s.get("seed")}
            for s, t in zip(samples, batch_targets(samples, task, pad_to=padded_size))]


def train_alltask(cfg: C.Config, out_dir: Path, resume: bool, init: str | None) -> Path:
    """Train the mask proposal network for all three tasks at once, one random task per iteration."""
    from freeseg.data.datasets import SegmentationDataset
    from freeseg.data.transforms import build_transforms
    from freeseg.modeling.criterion import build_criterion
    from freeseg.modeling.freeseg import build_freeseg

    if cfg.model.backbone.freeze_at > 0 and not cfg.model.backbone.weights:
        raise ConfigError(f"model.backbone.freeze_at={cfg.model.backbone.freeze_at} would freeze randomly "
                         "initialised layers: set model.backbone.weights (toy world: runs/toy/backbone/resnet.pth "
                         "from `train.py --dataset toy --stage backbone`)")
    extensions.target_task("semantic", cfg.extensions)  # a bad value fails before any work
    draw_task(cfg.train.tasks, cfg.train.seed, 0)
    device = dist.init_distributed()[3]
    engine.seed_everything(cfg.train.seed)  # the same initial weights on every rank and every run
    clip_model, tokenizer = engine.load_clip(cfg.model.clip.name)
    model = build_freeseg(cfg, clip_model, tokenizer).to(device)
    if init:
        prompts = engine.load_checkpoint(init, stage="prompt", what="--init checkpoint")["model"]
        try:
            model.prompt_learner.load_state_dict(prompts)
        except RuntimeError as err:
            raise CheckpointError(f"--init checkpoint {init} does not fit this model's prompts (another "
                                  f"model.prompt size?): {engine.mismatch(err)}") from None
        dist.print0(f"prompts initialised from {init}")
    model.freeze_prompts()
    prep = prepared_dir(cfg)
    names, remap = seen_vocabulary(prep)
    data = engine.SeededDataset(SegmentationDataset(prep, cfg.data.train_split, base=True),
                                build_transforms(cfg.data, train=True))
    criterion = build_criterion(cfg.loss)
    optimizer = engine.build_optimizer(model, cfg.train)
    start = engine.start_from(out_dir, resume, {"model": model}, optimizer, cfg)
    logger = engine.Logger(out_dir, cfg.train.iterations, start)
    logger.truncate_after(start)
    loader = engine.make_loader(data, cfg, start)
    train_model = engine.wrap_ddp(model, device)
    use_amp = cfg.train.amp and device.type == "cuda"
    text_cache = {}  # prompts and CLIP are frozen here: a task's text features never change

    for it, samples in enumerate(loader, start):
        engine.set_lr(optimizer, engine.lr_factor(it, cfg.train))
        task = draw_task(cfg.train.tasks, cfg.train.seed, it)  # same on every rank
        images = torch.stack([s["image"] for s in samples]).to(device).float()  # (B, 3, H, W) 0-255
        targets = alltask_targets(samples, extensions.target_task(task, cfg.extensions), remap,
                                  model.padded_size(images.shape[-2:]), device)
        if task not in text_cache:
            with torch.no_grad():
                text_cache[task] = model.text_features(names, task)
        # Mask2Former trains in bf16 mixed precision on GPUs; its pixel decoder turns autocast off
        # around the deformable attention and runs it in float32 (pixel_decoder.py does the same).
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext():
            outputs = train_model(images, names, task, text_cache[task])  # the same dict in train and eval
        # Diverged weights predict NaN or inf, which the matcher cannot pair: stop here, as for a
        # non-finite loss (a sum is finite only if every value is).
        engine.check_finite(it, {k: outputs[k].detach().float().sum() for k in ("pred_logits", "pred_masks")},
                            out_dir / "checkpoint.pt", what="the predictions are")
        losses = criterion(outputs, targets)  # unweighted terms, one set per decoder layer
        loss = sum(criterion.weight_dict[k] * v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.clip_grad_norm > 0:  # official CLIP_GRADIENTS: L2 norm over every trainable parameter
            torch.nn.utils.clip_grad_norm_([p for p in train_model.parameters() if p.requires_grad],
                                           cfg.train.clip_grad_norm)
        optimizer.step()
        # A NaN or inf stops every rank here, naming the iteration and the terms, before the
        # weights it produced can be saved.
        engine.check_finite(it, {"loss": loss, **losses}, out_dir / "checkpoint.pt")

        if (it + 1) % cfg.train.log_every == 0 or it + 1 == cfg.train.iterations:
            main_losses = {k: v for k, v in losses.items() if not k[-1].isdigit()}
            logger.log(it, {**engine.mean_over_ranks({"loss": loss.detach(), **main_losses}),
                            "lr": optimizer.param_groups[0]["lr"]})
        evaluate_now = cfg.train.eval_every > 0 and (it + 1) % cfg.train.eval_every == 0
        if (it + 1) % cfg.train.checkpoint_every == 0 or it + 1 == cfg.train.iterations or evaluate_now:
            engine.save_checkpoint(out_dir / "checkpoint.pt", model=model.state_dict(),
                                   optimizer=optimizer.state_dict(), iteration=it + 1,
                                   rng=engine.rng_state(), config=C.to_dict(cfg),
                                   merges=getattr(tokenizer, "merges", None))
        if evaluate_now:  # every rank takes part: the evaluators are reduced across ranks
            from freeseg.evaluation.runner import evaluate_checkpoint

            dist.barrier()
            evaluate_checkpoint(out_dir / "checkpoint.pt", out=out_dir / f"results_{it + 1}.json",
                                device=str(device))
    return out_dir / "checkpoint.pt"


# ---------------------------------------------------------------- one stage


def run_stage(cfg: C.Config, stage: str, out_dir: Path, resume: bool, init: str | None = None) -> Path:
    """Train `stage` into `out_dir` (the toy pipeline, freeseg/toy_pipeline.py, calls it too)."""
    if stage == "clip":
        return train_clip(cfg, out_dir, resume)
    if stage == "backbone":
        return train_backbone(cfg, out_dir, resume)
    if stage == "prompt":
        return train_prompt(cfg, out_dir, resume)
    return train_alltask(cfg, out_dir, resume, init)


def main(argv=None) -> None:
    args = parse_args(argv)
    trust_files(args.trust_checkpoint)
    if args.stage is None and args.dataset != "toy":
        raise ConfigError("--stage is required for real datasets: prompt, then alltask")
    if args.stage == "clip" and args.dataset != "toy":
        raise ConfigError("--stage clip trains the toy world's tiny CLIP; real datasets use OpenAI's CLIP")
    if args.stage == "backbone" and args.dataset != "toy":
        raise ConfigError("--stage backbone pre-trains the toy world's backbone; real datasets start from "
                          "ImageNet weights (--set model.backbone.weights=R-103.pkl)")
    if args.init and args.stage != "alltask":
        raise ConfigError("--init gives the all-task stage its prompts: use it with --stage alltask")
    configs = check_overrides(args)  # every stage, before any work
    engine.keep_freed_memory()
    if args.stage is None:
        if args.overwrite:
            raise ConfigError("--overwrite applies to one --stage; the pipeline reuses finished stages and continues "
                              "the others: delete a stage's folder to train it again")
        toy_pipeline.run_toy(Path(args.output_dir or "runs/toy"), data_root(args.data_root), configs, run_stage)
        dist.cleanup()
        return
    cfg = configs[args.stage]
    out_dir = Path(args.output_dir or f"runs/{args.dataset}/{args.stage}")
    check_run_dir(out_dir, args, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:  # a run stopped before its first checkpoint must not leave the old one to resume
        for name in ("checkpoint.pt", "metrics.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
    run_stage(cfg, args.stage, out_dir, args.resume, args.init)
    dist.cleanup()


if __name__ == "__main__":
    sys.exit(run_cli(main))
