"""The miniature world end to end: data -> tiny CLIP -> backbone -> prompts -> all-task ->
evaluation -> demo, each step reusing its output (`python train.py --dataset toy`).

This is orchestration only: the stages' loops are train.py's (the prompt and all-task stages)
and freeseg/toy_pretraining.py's (the tiny CLIP and the backbone). train.py hands its stage
runner in as `run_stage(cfg, stage, out_dir, resume, init)`, so this module never imports the
script; freeseg/ablations.py drives the same functions.
"""

from collections.abc import Callable
from pathlib import Path

from freeseg import config as C
from freeseg import distributed as dist
from freeseg import engine
from freeseg.errors import UserError

STAGES = ("clip", "backbone", "prompt", "alltask")  # the first two only for the toy world
RunStage = Callable[[C.Config, str, Path, bool, str | None], object]


def toy_config(cfg: C.Config, run: Path, stage: str) -> C.Config:
    """A toy stage's resolved config `cfg` (train.resolve_config), reading the tiny CLIP and the
    backbone from the pipeline's run directory `run` (runs/toy). Changes and returns `cfg`."""
    if stage in ("prompt", "alltask"):
        cfg.model.clip.name = str(run / "clip" / "checkpoint.pt")
    if stage == "alltask" and not cfg.model.backbone.weights:
        cfg.model.backbone.weights = str(run / "backbone" / "resnet.pth")
    return cfg


def train_toy_stage(cfg: C.Config, stage: str, out_dir: Path, run_stage: RunStage, init: str | None = None) -> None:
    """Train a toy stage into `out_dir`, continuing from its checkpoint if it has one; every rank calls it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if stage in ("clip", "backbone"):
        # The tiny CLIP and the backbone learn from batches of 64 small images, which one process
        # with every core trains faster than one rank per core; the CLIP's image tower also
        # normalises over the whole batch (BatchNorm), so its batch must not be split
        # (docs/toy_experiments.md, "pre-training stages").
        dist.run_alone(lambda: run_stage(cfg, stage, out_dir, True, None))
    else:
        run_stage(cfg, stage, out_dir, True, init)


def toy_stage(cfg: C.Config, run: Path, stage: str, run_stage: RunStage) -> Path:
    """One stage of the toy pipeline under `run`, with its config from `toy_config`: reused when
    its checkpoint has every iteration, trained (or continued) otherwise. -> its checkpoint."""
    ckpt = run / stage / "checkpoint.pt"
    saved = engine.load_checkpoint(ckpt, stage=stage) if ckpt.exists() else None
    if saved is not None and saved["iteration"] >= cfg.train.iterations:
        changed = C.config_diff(saved.get("config") or {}, C.to_dict(cfg))
        note = "" if not changed else (
            " (trained with other settings than this command's: "
            + ", ".join(f"{k} {old!r}, now {new!r}" for k, old, new in changed)
            + f"; delete {run / stage} to train it with them)")
        dist.print0(f"[toy] {stage}: reusing {ckpt}{note}")
    else:
        dist.print0(f"[toy] {stage}: training -> {ckpt}")
        train_toy_stage(cfg, stage, run / stage, run_stage, init=str(run / "prompt" / "checkpoint.pt"))
    dist.barrier()  # rank 0 writes the checkpoint that every rank reads next
    return ckpt


def toy_world_size(root: Path) -> dict[str, int]:
    """The image counts of the toy world already generated under `root` (same generator version,
    seed and size as `prepare_toy`'s defaults), so that a smaller world made on purpose, as the
    CI-sized test makes one, is used as it is; {} (the defaults: 2,000 + 200) otherwise."""
    from freeseg.data.io import load_json
    from freeseg.data.toy_world import TOY_WORLD_VERSION

    params_file = root / "toy" / "annotations" / "toy_world.json"
    if not params_file.is_file():
        return {}
    params = load_json(str(params_file), "toy world parameters")
    if (params.get("version"), params.get("seed"), params.get("size")) != (TOY_WORLD_VERSION, 0, 96):
        return {}
    return {"num_train": params["num_train"], "num_val": params["num_val"]}


def run_toy(run: Path, root: Path, configs: dict[str, C.Config], run_stage: RunStage) -> None:
    """Data (under `root`) -> tiny CLIP -> backbone -> prompts -> all-task -> evaluation -> demo
    under `run`; each step reuses its output. `configs`: every stage's checked config."""
    from freeseg.data.prepare_coco import prepare_toy
    from freeseg.evaluation.report import write_results
    from freeseg.evaluation.runner import evaluate_checkpoint
    from freeseg.visualize import demo_toy

    if run.exists() and not run.is_dir():
        raise UserError(f"--output-dir {run} is a file, not a directory")
    dist.init_distributed()  # under torchrun: every stage below runs on all ranks, the data is written by rank 0
    if dist.is_main():
        prepare_toy(root, force=False, workers=2, **toy_world_size(root))
    dist.barrier()

    stages = [toy_stage(toy_config(configs[stage], run, stage), run, stage, run_stage) for stage in STAGES]
    rows = evaluate_checkpoint(stages[-1], out=run / "results.json", ablation=True)  # images split over ranks
    if dist.is_main():
        for name, results in rows.items():  # every ablation row, for the README and the CI test
            write_results(run / f"ablation_{name.strip('+ ').replace(' ', '_')}.json", results)
        demo_toy(stages[-1], out=run / "demo.png")
    dist.barrier()
