"""`python -m freeseg.ablations`: the verdict rule, the ETA's rates, reuse, and the command end to end.

The integration test runs the whole command on a 16-image toy world with a few iterations per
stage and 2 seeds: first killed in the middle of its first all-task run, then under torchrun
(which must continue that run from its checkpoint and write a table with every row), then
again (which must retrain and re-score nothing), then `--report-only` on edited results (the
table must come from the stored results).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from freeseg import ablation_report as R
from freeseg import ablations as A
from freeseg import config as C
from freeseg.presets import get_preset

REPO = Path(__file__).resolve().parents[1]

# t(0.975, 2 degrees of freedom) = 4.3027, from a table of Student's t distribution.
T_975_2 = 4.3027


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    d, half = R.difference({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0}, paired=True)
    assert d == pytest.approx(2.0)  # differences 1, 2, 3: sd 1, se 1/sqrt(3)
    assert half == pytest.approx(T_975_2 / 3 ** 0.5, rel=1e-4)
    assert R.difference({0: 1.0}, {0: 0.0}, paired=True) is None  # one seed: no spread


def test_welch_difference_of_two_sets_of_models():
    # Equal variances and sizes: se = sqrt(2 s^2 / n), Welch's df = 2 (n - 1) = 4.
    d, half = R.difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 5.0, 1: 6.0, 2: 7.0}, paired=False)
    assert d == pytest.approx(-4.0)
    assert half == pytest.approx(2.7764 * (2 / 3) ** 0.5, rel=1e-4)  # t(0.975, 4) = 2.7764
    assert R.difference({0: 1.0, 1: 2.0}, {0: 5.0}, paired=False) is None


def test_verdict_rule():
    assert R.verdict(4.0, 2.5, equivalence=False) == "agrees"
    assert R.verdict(2.0, 2.5, equivalence=False) == "cannot tell"
    assert R.verdict(-4.0, 2.5, equivalence=False) == "disagrees"
    # Claim 1 (parity): at most MARGIN = 1 point worse counts as "as good as".
    assert R.verdict(-0.5, 0.3, equivalence=True) == "agrees"
    assert R.verdict(3.0, 2.0, equivalence=True) == "agrees"
    assert R.verdict(-0.5, 1.0, equivalence=True) == "cannot tell"
    assert R.verdict(-2.0, 0.5, equivalence=True) == "disagrees"


def test_eta_uses_measured_rates_per_variant_then_per_kind(tmp_path):
    path = tmp_path / "timings.jsonl"
    records = [("alltask", "full", 300.0, 1500), ("alltask", "template", 150.0, 1500), ("eval", "full", 90.0, 1800)]
    path.write_text("".join(json.dumps({"kind": k, "variant": v, "seconds": s, "units": u}) + "\n"
                            for k, v, s, u in records))
    rates = A.measured_rates(path)

    def step(kind, variant, units):
        return A.Step("x", kind, units, lambda: None, variant)

    assert A.estimate(step("alltask", "full", 750), rates) == pytest.approx(150.0)
    assert A.estimate(step("alltask", "no_interaction", 1500), rates) == pytest.approx(225.0)  # both variants
    assert A.estimate(step("eval", "template", 600), rates) == pytest.approx(30.0)
    assert A.estimate(step("prompt", "", 300), rates) == pytest.approx(300 * A.DEFAULT_RATES["prompt"])


def test_a_stored_run_of_another_recipe_is_named_not_reused(tmp_path):
    cfg = get_preset("toy")
    cfg.model.clip.name = "runs/toy/clip/checkpoint.pt"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "iteration": 1500, "config": C.to_dict(cfg)}, ckpt)
    moved = get_preset("toy")
    moved.model.clip.name = "/elsewhere/runs/toy/clip/checkpoint.pt"  # a copied run directory is the same run
    A.check_same_recipe(ckpt, moved)
    other = get_preset("toy")
    other.train.iterations = 20
    with pytest.raises(SystemExit, match=r"train.iterations is 1500 there, 20 now"):
        A.check_same_recipe(ckpt, other)


def test_variants_change_what_their_name_says():
    import train
    from freeseg import toy_pipeline

    targs = A.argparse.Namespace(dataset="toy", preset=None, overrides=[], data_root=None, clip=None)
    full = C.to_dict(A.variant_config(train, targs, Path("runs/toy"), A.BY_NAME["full"], 0))
    pipeline = toy_pipeline.toy_config(train.resolve_config(targs, "alltask"), Path("runs/toy"), "alltask")
    assert full == C.to_dict(pipeline)  # the toy pipeline's stage
    assert pipeline.model.clip.name == str(Path("runs/toy/clip/checkpoint.pt"))
    changed = {
        "semantic_only": {"train.tasks": ("semantic",)},
        "instance_only": {"train.tasks": ("instance",)},
        "panoptic_only": {"train.tasks": ("panoptic",)},
        "no_task_prompt": {"model.prompt.use_task_prompt": False, "model.prompt.task_ctx": 0},
        "template": {"model.prompt.learned": False},
        "no_interaction": {"model.interaction.enabled": False},
    }
    for name, want in changed.items():
        cfg = C.to_dict(A.variant_config(train, targs, Path("runs/toy"), A.BY_NAME[name], 2))
        flat, base = _flatten(cfg), _flatten(full)
        assert {k for k in flat if flat[k] != base[k]} == set(want) | {"train.seed"}, name
        assert all(flat[k] == v for k, v in want.items()) and flat["train.seed"] == 2
    prompt = C.to_dict(A.own_prompt_config(train, targs, Path("runs/toy")))
    base = _flatten(C.to_dict(toy_pipeline.toy_config(train.resolve_config(targs, "prompt"), Path("runs/toy"), "prompt")))
    assert {k for k, v in _flatten(prompt).items() if v != base[k]} == {"model.prompt.use_task_prompt",
                                                                          "model.prompt.task_ctx"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# ---------------------------------------------------------------- end to end

SMALL = ["clip:train.iterations=2", "clip:train.batch_size=8", "backbone:train.iterations=2",
         "backbone:train.batch_size=8", "prompt:train.iterations=3", "prompt:train.batch_size=4",
         "alltask:train.iterations=4", "alltask:train.batch_size=4", "alltask:data.image_size=64",
         "train.checkpoint_every=2", "train.log_every=1"]
KILL_AT = 3  # the first all-task run dies right after logging iteration 3, one past its checkpoint at 2

# The command unchanged, except that it SIGKILLs itself once the first all-task run (full,
# seed 0) has logged iteration KILL_AT: a crash at a fixed point.
KILLED = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from freeseg import ablations, engine

log = engine.Logger.log
def log_then_die(self, it, metrics):
    log(self, it, metrics)
    if it + 1 == {KILL_AT} and self.path.parent.parts[-2:] == ("full", "seed0"):
        os.kill(os.getpid(), signal.SIGKILL)
engine.Logger.log = log_then_die
ablations.main(sys.argv[1:])
"""


def _run(cmd: list[str], cwd: Path, expect_rc: int = 0) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO)  # `-m freeseg.ablations` runs this checkout's package, not an installed one
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == expect_rc, (
        f"{' '.join(cmd)}: {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def _row(table: str, label: str) -> list[str]:
    """The cells of the first table row of `label`: label, paper's direction, n, then the metrics."""
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} | "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _stored(run: Path) -> dict[str, int]:
    files = [p for p in (run / "ablations").rglob("*") if p.name in ("checkpoint.pt", "results.json")]
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in files}


@pytest.mark.integration
def test_command_end_to_end_resumes_reuses_and_reports_from_stored_results(tmp_path):
    from freeseg.data.prepare_coco import prepare_toy

    prepare_toy(str(tmp_path / "data"), workers=1, num_train=12, num_val=4, per_class=4, size=64)
    args = ["--seeds", "0", "1", "--data-root", "data", "--output-dir", "run", "--max-images", "2",
            "--report", "ablations.md", "--set", *SMALL]
    run = tmp_path / "run"

    _run([sys.executable, "-c", KILLED, *args], tmp_path, expect_rc=-signal.SIGKILL)
    assert torch.load(run / "ablations" / "full" / "seed0" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    assert not (tmp_path / "ablations.md").exists()

    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "freeseg.ablations", *args], tmp_path)
    assert "[toy] clip" not in out and "clip stage" not in out  # the shared stages are reused
    assert f"resumed from {Path('run/ablations/full/seed0/checkpoint.pt')} at iteration 2" in out
    assert "about" in out and "left" in out and "elapsed" in out  # progress with an ETA
    invocations = [json.loads(line) for line in (run / "ablations" / "invocations.jsonl").read_text().splitlines()]
    assert invocations[-1]["world_size"] == 2 and invocations[-1]["steps"] > 0
    table = (tmp_path / "ablations.md").read_text()
    for key, _ in R.ROWS:  # every row, from both seeds
        assert _row(table, R.row_label(key))[2] == "2", key
    assert len(_stored(run)) == 2 * len(A.VARIANTS) * 2 + 1  # a checkpoint and results per run, one prompt stage
    for v in A.VARIANTS:
        stored = json.loads((run / "ablations" / v.name / "seed1" / "results.json").read_text())
        assert set(stored["rows"]) == set(v.rows)
        assert {task for row in stored["rows"].values() for task in row} == set(v.tasks)

    before = _stored(run)
    out = _run([sys.executable, "-m", "freeseg.ablations", *args], tmp_path)
    assert "[ablations 1/" not in out and "prompts initialised" not in out  # nothing to train or score
    assert _stored(run) == before
    assert (tmp_path / "ablations.md").read_text() == table

    path = run / "ablations" / "no_interaction" / "seed0" / "results.json"
    stored = json.loads(path.read_text())
    stored["rows"][A.MAIN_ROW]["semantic"]["mIoU_unseen"] = 50.0
    path.write_text(json.dumps(stored))
    path = run / "ablations" / "no_interaction" / "seed1" / "results.json"
    stored = json.loads(path.read_text())
    stored["rows"][A.MAIN_ROW]["semantic"]["mIoU_unseen"] = 60.0
    path.write_text(json.dumps(stored))
    before = _stored(run)
    _run([sys.executable, "-m", "freeseg.ablations", "--report-only", "--output-dir", "run", "--seeds", "0", "1",
          "--report", "edited.md"], tmp_path)
    edited = (tmp_path / "edited.md").read_text()
    assert _row(edited, "no semantic context interaction")[5] == "55.0 ± 7.1"  # mean and sample sd of 50 and 60
    assert _stored(run) == before  # trains and scores nothing
