"""The paper's ablations in the miniature world: every variant, several seeds, one table.

    python -m freeseg.ablations --dataset toy --seeds 0 1 2
    torchrun --standalone --nproc_per_node=2 -m freeseg.ablations --dataset toy --seeds 0 1 2
    python -m freeseg.ablations --report-only      # rebuild docs/ablations.md from the runs on disk

FreeSeg's paper claims that (1) one model trained for all three tasks is as good as three
task-specific models, (2) adaptive task and class prompts beat fixed templates, (3) semantic
context interaction helps, (4) the CLIP ensemble carries open-vocabulary transfer to unseen
classes and (5) test-time prompt tuning helps unseen classes. Each variant of `VARIANTS`
changes one thing of the toy preset; its all-task stage is trained once per seed
(`train.seed`) and evaluated on toy val. Every variant starts from the toy pipeline's tiny
CLIP, backbone and prompts (`runs/toy/{clip,backbone,prompt}`, trained first if missing, by
the same code as `train.py --dataset toy`); the variant without task prompts learns its own
prompts, once, with the pipeline's prompt settings. The evaluation rows of the full model (mask
classifier only, + CLIP ensemble, + test-time prompt tuning) come from its own checkpoints.
`freeseg.ablation_report` turns the stored results into docs/ablations.md.

Layout under the run directory (default runs/toy):
    ablations/<variant>/seed<k>/   checkpoint.pt, metrics.jsonl, results.json (every row scored)
    ablations/no_task_prompt/prompt/checkpoint.pt      that variant's prompt stage
    ablations/timings.jsonl        seconds and units of every step run (the ETA's rates)
    ablations/invocations.jsonl    wall time of every invocation

Rerunning the command reuses what is finished: a checkpoint with every iteration is not
retrained, a results.json that holds the run's rows is not re-scored, and a run killed
mid-way continues from its last checkpoint (`train.checkpoint_every`). A stored run whose
config differs from the one asked for (other iterations, say) stops the command with the
difference named, so results of two recipes are never mixed in one table.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

from freeseg import config as C
from freeseg import distributed as dist
from freeseg import engine, toy_pipeline

FULL_ROWS = ("mask classifier only", "+ CLIP ensemble", "+ test-time prompt tuning")
MAIN_ROW = "+ CLIP ensemble"  # the toy pipeline's results.json: test-time prompt tuning is off in its preset


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # directory under ablations/
    label: str  # row of the table
    overrides: tuple[str, ...] = ()  # all-task config changes against the toy preset
    prompt: str = "shared"  # "shared": the pipeline's prompt stage; "own": its own; "none": not learned
    tasks: tuple[str, ...] = ("semantic", "instance", "panoptic")  # what it is evaluated on
    rows: tuple[str, ...] = (MAIN_ROW,)  # evaluation rows (runner.ablation_variants)


NO_TASK_PROMPT = ("model.prompt.use_task_prompt=false", "model.prompt.task_ctx=0")
VARIANTS = (
    Variant("full", "full FreeSeg", rows=FULL_ROWS),
    # Claim 1: a task-specific model is trained on its task alone and scored on it alone.
    Variant("semantic_only", "semantic only", ("train.tasks=semantic",), tasks=("semantic",)),
    Variant("instance_only", "instance only", ("train.tasks=instance",), tasks=("instance",)),
    Variant("panoptic_only", "panoptic only", ("train.tasks=panoptic",), tasks=("panoptic",)),
    # Claim 2: the class prompt alone, learned without task words and vectors; fixed templates.
    Variant("no_task_prompt", "no task prompt (class prompts only)", NO_TASK_PROMPT, prompt="own"),
    Variant("template", 'fixed template "a photo of a {}."', ("model.prompt.learned=false",), prompt="none"),
    # Claim 3.
    Variant("no_interaction", "no semantic context interaction", ("model.interaction.enabled=false",)),
)
BY_NAME = {v.name: v for v in VARIANTS}
# Seconds per unit until this machine has measured its own (timings.jsonl): the toy pipeline's
# speeds under two ranks on the 2-core machine (README): CLIP 12.3 steps/s, backbone 33.6,
# prompts 23.7, all-task 7.64; its evaluation of 3 rows x 3 tasks x 200 images took about 92 s
# (docs/toy_experiments.md).
DEFAULT_RATES = {"clip": 1 / 12.3, "backbone": 1 / 33.6, "prompt": 1 / 23.7, "alltask": 1 / 7.64,
                 "eval": 92 / (3 * 3 * 200)}
PATH_KEYS = (("data", "root"), ("model", "clip", "name"), ("model", "backbone", "weights"))


@dataclasses.dataclass
class Step:
    """Work still to do: `units` iterations to train, or images x tasks x rows to score."""
    name: str
    kind: str  # a key of DEFAULT_RATES
    units: int
    run: Callable[[], None]
    variant: str = ""


# ---------------------------------------------------------------- configs and reuse


def iteration_of(ckpt: Path) -> int:
    """Iterations a stage's checkpoint holds (0 if there is none)."""
    return engine.load_checkpoint(ckpt)["iteration"] if ckpt.exists() else 0


def check_same_recipe(ckpt: Path, cfg: C.Config) -> int:
    """Stop if the stored run at `ckpt` was made with another config than `cfg` (paths aside:
    a run directory may be copied elsewhere). -> the iterations it holds (0 if none)."""
    if not ckpt.exists():
        return 0
    ckpt_data = engine.load_checkpoint(ckpt)
    stored = C.to_dict(C.from_dict(ckpt_data["config"]))  # fields added since it was written: defaults
    wanted = C.to_dict(cfg)
    for keys in PATH_KEYS:
        for d in (stored, wanted):
            node = d
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = None
    diff = _first_difference(stored, wanted)
    if diff:
        raise SystemExit(f"{ckpt}: made with another config ({diff}); delete {ckpt.parent} or use another "
                         "--output-dir")
    return ckpt_data["iteration"]


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for key in a:
        if isinstance(a[key], dict):
            found = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if found:
                return found
        elif a[key] != b[key]:
            return f"{prefix}{key} is {a[key]!r} there, {b[key]!r} now"
    return ""


def stage_config(train, targs, run: Path, stage: str) -> C.Config:
    """The toy pipeline's config of `stage` (train.py's presets and overrides, the run's CLIP and backbone)."""
    return toy_pipeline.toy_config(train.resolve_config(targs, stage), run, stage)


def variant_config(train, targs, run: Path, variant: Variant, seed: int) -> C.Config:
    cfg = stage_config(train, targs, run, "alltask")
    C.apply_overrides(cfg, list(variant.overrides))
    cfg.train.seed = seed
    return cfg


def own_prompt_config(train, targs, run: Path) -> C.Config:
    cfg = stage_config(train, targs, run, "prompt")
    C.apply_overrides(cfg, list(NO_TASK_PROMPT))
    return cfg


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def evaluated(out_dir: Path, variant: Variant, iteration: int, max_images: int | None) -> bool:
    """Whether results.json holds this checkpoint's rows, scored on the same images."""
    stored = load_json(out_dir / "results.json")
    return (stored is not None and stored["iteration"] == iteration and stored["max_images"] == max_images
            and set(variant.rows) <= set(stored["rows"]))


# ---------------------------------------------------------------- the plan


def plan(args, train, targs, run: Path, root: Path) -> list[Step]:
    """Every step still to do, in order: the shared stages, the own prompt stage, then seed by
    seed (a partial run leaves whole seeds behind) each variant's training and evaluation."""
    steps = []
    for stage in ("clip", "backbone", "prompt"):  # reused as toy_pipeline.toy_stage reuses them
        cfg = stage_config(train, targs, run, stage)
        done = iteration_of(run / stage / "checkpoint.pt")
        if done < cfg.train.iterations:
            steps.append(Step(f"{stage} stage", stage, cfg.train.iterations - done,
                              lambda c=cfg, s=stage: toy_pipeline.toy_stage(c, run, s, train.run_stage)))
    variants = [BY_NAME[name] for name in args.variants]
    prompt_dir = run / "ablations" / "no_task_prompt" / "prompt"
    if any(v.prompt == "own" for v in variants):
        cfg = own_prompt_config(train, targs, run)
        done = check_same_recipe(prompt_dir / "checkpoint.pt", cfg)
        if done < cfg.train.iterations:
            steps.append(Step("prompt stage without task prompts", "prompt", cfg.train.iterations - done,
                              lambda c=cfg: toy_pipeline.train_toy_stage(c, "prompt", prompt_dir, train.run_stage)))
    records = load_json(root / "freeseg" / "toy" / "val.json")
    if records is None:
        raise SystemExit(f"{root / 'freeseg' / 'toy' / 'val.json'} is missing: prepare_data.py --dataset toy "
                         f"--data-root {root}")
    val_images = min(len(records), args.max_images or len(records))
    for seed in args.seeds:
        for v in variants:
            cfg = variant_config(train, targs, run, v, seed)
            out = run / "ablations" / v.name / f"seed{seed}"
            done = check_same_recipe(out / "checkpoint.pt", cfg)
            init = {"shared": run / "prompt" / "checkpoint.pt", "own": prompt_dir / "checkpoint.pt"}.get(v.prompt)
            if done < cfg.train.iterations:
                steps.append(Step(f"train {v.name} seed {seed}", "alltask", cfg.train.iterations - done,
                                  lambda c=cfg, o=out, i=init: toy_pipeline.train_toy_stage(
                                      c, "alltask", o, train.run_stage, str(i) if i else None), v.name))
            if done < cfg.train.iterations or not evaluated(out, v, cfg.train.iterations, args.max_images):
                steps.append(Step(f"evaluate {v.name} seed {seed}", "eval", val_images * len(v.tasks) * len(v.rows),
                                  lambda v=v, o=out, c=cfg: evaluate_run(args, root, v, o, c), v.name))
    return steps


def evaluate_run(args, root: Path, variant: Variant, out_dir: Path, cfg: C.Config) -> None:
    """Score a run's checkpoint and store its rows with what the report states beside them."""
    from freeseg.evaluation.runner import evaluate_checkpoint

    device = dist.init_distributed()[3]
    rows = evaluate_checkpoint(out_dir / "checkpoint.pt", data_root=str(root), tasks=variant.tasks,
                               ablation=variant.rows == FULL_ROWS, max_images=args.max_images, device=str(device))
    if dist.is_main():
        strict = {name: {task: {k: None if math.isnan(x) else x for k, x in metrics.items()}  # NaN -> null
                         for task, metrics in rows[name].items()} for name in variant.rows}
        dist.atomic_write_json({"variant": variant.name, "seed": cfg.train.seed, "iteration": cfg.train.iterations,
                                "max_images": args.max_images, "tasks": list(variant.tasks),
                                "overrides": list(args.overrides), "rows": strict}, out_dir / "results.json")


# ---------------------------------------------------------------- progress


def measured_rates(path: Path) -> dict:
    """{(kind, variant): seconds per unit, (kind, ""): over every variant} from timings.jsonl."""
    sums: dict[tuple[str, str], list[float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for key in ((rec["kind"], rec["variant"]), (rec["kind"], "")):
                total = sums.setdefault(key, [0.0, 0.0])
                total[0] += rec["seconds"]
                total[1] += rec["units"]
    return {key: s / u for key, (s, u) in sums.items() if u > 0}


def estimate(step: Step, rates: dict) -> float:
    rate = rates.get((step.kind, step.variant)) or rates.get((step.kind, "")) or DEFAULT_RATES[step.kind]
    return step.units * rate


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_steps(steps: list[Step], timings: Path) -> None:
    """Run every step, printing before each how many are done, the time so far and an estimate
    of the rest from the rates measured so far (this invocation's and the stored ones)."""
    start = time.perf_counter()
    for i, step in enumerate(steps):
        rates = measured_rates(timings)
        left = sum(estimate(s, rates) for s in steps[i:])
        dist.print0(f"[ablations {i + 1}/{len(steps)}] {step.name} ({step.units} units) | "
                    f"{i} done, elapsed {clock(time.perf_counter() - start)}, about {clock(left)} left")
        t0 = time.perf_counter()
        step.run()
        dist.barrier()  # rank 0 has written what every rank reads next
        seconds = time.perf_counter() - t0
        if dist.is_main():
            timings.parent.mkdir(parents=True, exist_ok=True)
            with open(timings, "a") as f:
                f.write(json.dumps({"kind": step.kind, "variant": step.variant, "name": step.name,
                                    "seconds": round(seconds, 2), "units": step.units,
                                    "world_size": dist.get_world_size()}) + "\n")
        dist.print0(f"[ablations {i + 1}/{len(steps)}] {step.name}: {clock(seconds)}")


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m freeseg.ablations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="toy", choices=["toy"], help="the miniature world (the only one so far)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="all-task seeds (train.seed)")
    p.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], choices=[v.name for v in VARIANTS])
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, as train.py's (STAGE:KEY=VALUE for one stage)")
    p.add_argument("--data-root", default=None, help="datasets root (default: $FREESEG_DATASETS or ./datasets)")
    p.add_argument("--output-dir", default="runs/toy", help="the toy pipeline's run directory (default runs/toy)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate on the first N val images only")
    p.add_argument("--report", default="docs/ablations.md", help="where the table is written")
    p.add_argument("--report-only", action="store_true", help="train nothing: rebuild the table from stored results")
    return p.parse_args(argv)


def train_module():
    """train.py, which holds the stages' loops; it sits beside the freeseg package."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "train.py").is_file():
        raise SystemExit(f"freeseg.ablations needs train.py beside the freeseg package ({repo}): run it from a clone")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    import train

    return train


def main(argv=None) -> None:
    from freeseg.ablation_report import write_report

    args = parse_args(argv)
    run = Path(args.output_dir)
    if args.report_only:
        if os.environ.get("RANK", "0") == "0":  # under torchrun too, without a process group
            write_report(run, Path(args.report), args.seeds)
        return
    train = train_module()
    engine.keep_freed_memory()
    started = time.time()
    targs = argparse.Namespace(dataset="toy", preset=None, overrides=args.overrides, data_root=args.data_root,
                               clip=None)  # what train.resolve_config reads
    root = train.data_root(args.data_root)
    dist.init_distributed()
    if dist.is_main() and not (root / "freeseg" / "toy" / "meta.json").exists():
        from freeseg.data.prepare_coco import prepare_toy

        prepare_toy(str(root), force=False, workers=2)  # the pipeline's toy world; an existing one is used as is
    dist.barrier()
    try:
        steps = plan(args, train, targs, run, root)
    except (ValueError, KeyError) as err:  # a bad --set: one line, no traceback
        raise SystemExit(f"freeseg.ablations: {err.args[0]}") from None
    run_steps(steps, run / "ablations" / "timings.jsonl")
    if dist.is_main():
        (run / "ablations").mkdir(parents=True, exist_ok=True)
        with open(run / "ablations" / "invocations.jsonl", "a") as f:
            f.write(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
                                "wall_s": round(time.time() - started, 1), "steps": len(steps),
                                "world_size": dist.get_world_size(), "seeds": args.seeds}) + "\n")
        write_report(run, Path(args.report), args.seeds)
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    main()
