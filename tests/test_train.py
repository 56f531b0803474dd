"""Tests of `train.py` run as a user runs it: `python train.py` and `torchrun` on CPU (gloo).

What they pin (issue 6):
- both stages (prompt, all-task) run under `torchrun --nproc_per_node=2` on CPU;
- 2 processes with 2 images each log the same losses as 1 process with 4 images (the global
  batch is `train.batch_size`, the data order a pure function of (seed, iteration));
- a run SIGKILLed mid-way, or stopped by SIGTERM or SIGINT while it writes a checkpoint, and
  resumed with `--resume` logs the curve of an uninterrupted run and ends with its weights; the
  stopped run leaves no temporary file and says why it stopped in one line;
- the command-line entry points answer `--help`, and bad checkpoints give clear errors.

Every run trains a tiny model on a 12-image toy world for 3-4 iterations. Everything the tests
depend on is set with `--set` (the toy presets are tuned independently). Dropout is switched off
because each rank draws its own dropout masks, which no batch split can reproduce; the toy
backbone uses GroupNorm, so batch statistics do not depend on the split either.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")

COMMON = ["train.seed=0", "train.log_every=1", "data.num_workers=0", "train.warmup_iters=0"]
PROMPT = COMMON + ["train.batch_size=4", "train.iterations=3", "train.checkpoint_every=100"]
ALLTASK = COMMON + [
    "train.batch_size=4", "train.iterations=4", "train.checkpoint_every=2", "train.clip_grad_norm=1.0",
    "data.image_size=64", "model.decoder.num_queries=5", "model.backbone.norm=gn", "model.backbone.freeze_at=0",
    "model.pixel_decoder.dropout=0", "model.decoder.dropout=0", "model.interaction.dropout=0",
]
KILL_AFTER = 3  # the killed run dies right after logging iteration 3, one past its checkpoint at 2

# Runs train.py unchanged, except that the process SIGKILLs itself once the logger has written
# iteration KILL_AFTER: a crash at a fixed point, where killing from outside would race the loop.
KILLED_TRAIN = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from freeseg import engine
import train

log = engine.Logger.log
def log_then_die(self, it, metrics):
    log(self, it, metrics)
    if it + 1 == {KILL_AFTER}:
        os.kill(os.getpid(), signal.SIGKILL)
engine.Logger.log = log_then_die
train.main(sys.argv[1:])
"""

# Runs train.py as its command line does (freeseg.errors.run_cli), except that the process sends
# itself a signal while it writes the checkpoint of iteration STOP_AT, half of it written: the
# moment where a stopped run could leave a temporary or half-written file behind.
STOP_AT = 4
SIGNALLED_TRAIN = f"""
import os, signal, sys
# Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, and Python then
# leaves it ignored, so a suite run in the background would never see the signal.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {str(REPO)!r})
from freeseg import distributed
from freeseg.errors import run_cli
import train

save = distributed.torch.save
def save_then_stop(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("iteration") == {STOP_AT}:
        f.write(b"half a checkpoint")
        os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))
    return save(obj, f, *args, **kwargs)
distributed.torch.save = save_then_stop
sys.exit(run_cli(train.main, sys.argv[1:], prog="train.py"))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, expect_rc: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=600)
    assert result.returncode == expect_rc, (
        f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _train(args: list[str], cwd: Path, nproc: int = 1, script: list[str] | None = None, expect_rc: int = 0,
           env: dict | None = None):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return _run(launcher + (script or [TRAIN]) + args, cwd, expect_rc, env)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_curves(got: list[dict], want: list[dict], keys: list[str], rtol: float, atol: float = 1e-5):
    """Per-iteration equality of the logged values (the logger rounds them to 6 decimals; float32
    sums in another order move a 0.05 focal loss by a few 1e-6 within 4 iterations)."""
    assert [r["iter"] for r in got] == [r["iter"] for r in want]
    for g, w in zip(got, want):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=atol), f"iteration {w['iter']}: {key}"


# ---------------------------------------------------------------- fixtures: one set of runs per module


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A 12-image toy world and a tiny CLIP trained for 2 iterations."""
    from freeseg.data.prepare_coco import prepare_toy

    root = tmp_path_factory.mktemp("train")
    prepare_toy(str(root / "data"), workers=1, num_train=12, num_val=4, per_class=4, size=64)
    _train(["--dataset", "toy", "--stage", "clip", "--data-root", "data", "--output-dir", "clip", "--set",
            "train.iterations=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2"], root)
    return {"root": root, "args": ["--dataset", "toy", "--data-root", "data", "--clip", "clip/checkpoint.pt"]}


@pytest.fixture(scope="module")
def prompt_runs(toy) -> dict:
    """The prompt stage, 3 iterations of global batch 4: in one process, and in two under torchrun."""
    root = toy["root"]
    for name, nproc in (("prompt1", 1), ("prompt2", 2)):
        _train(toy["args"] + ["--stage", "prompt", "--output-dir", name, "--set", *PROMPT], root, nproc)
    return {"one": root / "prompt1", "two": root / "prompt2"}


def _alltask_args(toy, prompt_runs, out: str) -> list[str]:
    return toy["args"] + ["--stage", "alltask", "--init", str(prompt_runs["one"] / "checkpoint.pt"),
                          "--output-dir", out, "--set", *ALLTASK]


@pytest.fixture(scope="module")
def alltask_runs(toy, prompt_runs) -> dict:
    """The all-task stage, 4 iterations of global batch 4, in one and in two processes."""
    root = toy["root"]
    for name, nproc in (("alltask1", 1), ("alltask2", 2)):
        _train(_alltask_args(toy, prompt_runs, name), root, nproc)
    return {"one": root / "alltask1", "two": root / "alltask2"}


@pytest.fixture(scope="module")
def killed_and_resumed(toy, prompt_runs) -> dict:
    """The run of `alltask_runs["one"]`, SIGKILLed after logging iteration 3, then resumed."""
    from freeseg import engine

    root = toy["root"]
    args = _alltask_args(toy, prompt_runs, "killed")
    killed = _train(args, root, script=["-c", KILLED_TRAIN], expect_rc=-signal.SIGKILL)
    before = {"metrics": _metrics(root / "killed"),
              "iteration": engine.load_checkpoint(root / "killed" / "checkpoint.pt")["iteration"]}
    resumed = _train(args + ["--resume"], root)
    return {"dir": root / "killed", "before": before, "stdout": killed.stdout + resumed.stdout}


@pytest.fixture(scope="module", params=["SIGTERM", "SIGINT"])
def signalled_and_resumed(request, toy, prompt_runs) -> dict:
    """The run of `alltask_runs["one"]`, stopped by a signal while writing its iteration-4
    checkpoint (its iteration-2 checkpoint written), then resumed."""
    from freeseg import engine

    root, name = toy["root"], request.param
    args = _alltask_args(toy, prompt_runs, f"stopped_{name}")
    status = 143 if name == "SIGTERM" else 130  # 128 + the signal's number, as a shell reports it
    stopped = _train(args, root, script=["-c", SIGNALLED_TRAIN], expect_rc=status, env={"STOP_SIGNAL": name})
    run_dir = root / f"stopped_{name}"
    before = {"files": sorted(p.name for p in run_dir.iterdir()), "metrics": _metrics(run_dir),
              "iteration": engine.load_checkpoint(run_dir / "checkpoint.pt")["iteration"]}
    resumed = _train(args + ["--resume"], root)
    return {"signal": name, "dir": run_dir, "before": before, "stderr": stopped.stderr, "stdout": resumed.stdout}


# ---------------------------------------------------------------- torchrun on CPU


@pytest.mark.integration
def test_torchrun_runs_both_stages_on_cpu(prompt_runs, alltask_runs):
    from freeseg import engine

    for runs, iters in ((prompt_runs, 3), (alltask_runs, 4)):
        assert [r["iter"] for r in _metrics(runs["two"])] == list(range(1, iters + 1))
        ckpt = engine.load_checkpoint(runs["two"] / "checkpoint.pt")
        assert ckpt["iteration"] == iters
        assert ckpt["config"]["train"]["batch_size"] == 4  # the global batch, not the per-rank one


@pytest.mark.integration
def test_clip_stage_contrasts_the_whole_batch_under_torchrun(toy):
    """The tiny CLIP's stage (README command 1 runs it under torchrun): 2 ranks x 4 pairs must
    contrast each image with all 8 captions, as one process does, not with their own 4. The
    ranks draw other images than one process and the image tower's BatchNorm normalises each
    rank's half on its own, so the losses are compared loosely; contrasting only the rank's own
    4 pairs starts near log 4 = 1.39 instead of log 8 = 2.08 (the exact gradient of the
    gathered loss: tests/test_distributed.py)."""
    root = toy["root"]
    _train(["--dataset", "toy", "--stage", "clip", "--data-root", "data", "--output-dir", "clip2", "--set",
            "train.iterations=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2"], root, 2)
    one, two = _metrics(root / "clip"), _metrics(root / "clip2")
    assert [r["iter"] for r in two] == [1, 2]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=0.1), (one[0], two[0])


@pytest.mark.integration
def test_prompt_stage_two_processes_match_one_process(prompt_runs):
    from freeseg import engine

    one, two = _metrics(prompt_runs["one"]), _metrics(prompt_runs["two"])
    _assert_same_curves(two, one, ["loss", "acc", "lr"], rtol=1e-4)
    # Gradients are averaged over ranks, so rank 0's prompts are the single process's prompts.
    p1 = engine.load_checkpoint(prompt_runs["one"] / "checkpoint.pt")["model"]
    p2 = engine.load_checkpoint(prompt_runs["two"] / "checkpoint.pt")["model"]
    for key in p1:
        torch.testing.assert_close(p2[key], p1[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.integration
def test_alltask_first_iteration_mask_losses_match_across_process_counts(alltask_runs):
    # Focal and dice losses are normalised by the all-reduced mask count: same weights, same
    # images -> same values, whatever the split. (Cross-entropy: see the next test.)
    one, two = _metrics(alltask_runs["one"])[:1], _metrics(alltask_runs["two"])[:1]
    _assert_same_curves(two, one, ["loss_focal", "loss_dice", "lr"], rtol=1e-4)


@pytest.mark.integration
def test_alltask_two_processes_match_one_process(alltask_runs):
    one, two = _metrics(alltask_runs["one"]), _metrics(alltask_runs["two"])
    _assert_same_curves(two, one, ["loss", "loss_ce", "loss_focal", "loss_dice", "lr"], rtol=1e-4)


# ---------------------------------------------------------------- kill and resume


@pytest.mark.integration
def test_killed_run_resumes_from_its_checkpoint(killed_and_resumed):
    """Iteration 3 recomputed after the resume equals iteration 3 logged before the kill.

    The resumed run starts from the killed run's own checkpoint, so this holds whatever the
    initial weights: it checks that model, optimiser, schedule and data order are restored.
    """
    before, after = killed_and_resumed["before"], _metrics(killed_and_resumed["dir"])
    assert before["iteration"] == 2
    assert [r["iter"] for r in before["metrics"]] == [1, 2, 3]
    assert "resumed from" in killed_and_resumed["stdout"] and "at iteration 2" in killed_and_resumed["stdout"]
    # The file holds one clean curve: the stale iteration-3 line was dropped, then rewritten.
    assert [r["iter"] for r in after] == [1, 2, 3, 4]
    keys = ["loss", "loss_ce", "loss_focal", "loss_dice", "lr"]
    _assert_same_curves(after[:3], before["metrics"], keys, rtol=1e-5)


@pytest.mark.integration
def test_same_command_twice_gives_the_same_losses(killed_and_resumed, alltask_runs):
    before = killed_and_resumed["before"]["metrics"]
    _assert_same_curves(before, _metrics(alltask_runs["one"])[:KILL_AFTER], ["loss"], rtol=1e-5)


@pytest.mark.integration
def test_killed_and_resumed_run_matches_uninterrupted_run(killed_and_resumed, alltask_runs):
    keys = ["loss", "loss_ce", "loss_focal", "loss_dice", "lr"]
    _assert_same_curves(_metrics(killed_and_resumed["dir"]), _metrics(alltask_runs["one"]), keys, rtol=1e-5)
    _assert_same_weights(killed_and_resumed["dir"], alltask_runs["one"])


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    got = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    want = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert got["iteration"] == want["iteration"]
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key


@pytest.mark.integration
def test_signalled_run_stops_cleanly_and_resumes_to_the_same_weights(signalled_and_resumed, alltask_runs):
    """SIGTERM (kill, torchrun, schedulers) and SIGINT (Ctrl-C) arriving while a checkpoint is
    being written: one line, no temporary file, the previous checkpoint intact; resumed, the
    run ends with the uninterrupted run's curve and weights."""
    run, before = signalled_and_resumed, signalled_and_resumed["before"]
    lines = [line for line in run["stderr"].splitlines() if line.strip()]
    assert lines == [f"train.py: stopped by {run['signal']}{' (Ctrl-C)' if run['signal'] == 'SIGINT' else ''}; "
                     "files being written were removed"], run["stderr"]
    assert before["files"] == ["checkpoint.pt", "metrics.jsonl"]  # no .tmp-* file left behind
    assert before["iteration"] == 2 and [r["iter"] for r in before["metrics"]] == [1, 2, 3, 4]
    assert "resumed from" in run["stdout"] and "at iteration 2" in run["stdout"]
    keys = ["loss", "loss_ce", "loss_focal", "loss_dice", "lr"]
    _assert_same_curves(_metrics(run["dir"]), _metrics(alltask_runs["one"]), keys, rtol=1e-5)
    _assert_same_weights(run["dir"], alltask_runs["one"])


# ---------------------------------------------------------------- entry points and bad checkpoints


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "prepare_data.py", "demo.py"])
def test_scripts_answer_help(script, tmp_path):
    out = _run([sys.executable, str(REPO / script), "--help"], tmp_path).stdout
    assert out.startswith("usage:") and "--" in out


def test_evaluate_names_a_missing_checkpoint(tmp_path):
    result = _run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", "missing.pt"], tmp_path, expect_rc=2)
    assert result.stderr.strip() == "evaluate.py: error: checkpoint missing.pt not found"


@pytest.mark.integration
def test_checkpoint_of_another_model_size_is_a_clear_error(alltask_runs, tmp_path):
    from freeseg.evaluation.runner import load_model

    path = alltask_runs["one"] / "checkpoint.pt"
    model, cfg, _ = load_model(path)
    assert cfg.model.decoder.num_queries == 5 and model.decoder.query_feat.weight.shape[0] == 5
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["config"]["model"]["decoder"]["num_queries"] = 7  # the weights still hold 5 queries
    edited = tmp_path / "edited.pt"
    torch.save(ckpt, edited)
    with pytest.raises(ValueError, match=r"edited\.pt does not fit the model its config describes"):
        load_model(edited)


@pytest.mark.integration
def test_backbone_stage_writes_weights_the_alltask_stage_loads(tmp_path):
    from freeseg.presets import get_preset
    from freeseg.modeling.backbone import build_backbone

    _train(["--dataset", "toy", "--stage", "backbone", "--output-dir", "bb", "--set", "train.iterations=2",
            "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=100"], tmp_path)
    assert [r["iter"] for r in _metrics(tmp_path / "bb")] == [1, 2]
    cfg = get_preset("toy").model.backbone
    cfg.weights = str(tmp_path / "bb" / "resnet.pth")
    loaded = build_backbone(cfg)  # strict: every key of the toy ResNet, nothing else
    state = torch.load(tmp_path / "bb" / "checkpoint.pt", weights_only=True)["model"]
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[f"backbone.{name}"]), name
    result = _train(["--dataset", "coco", "--stage", "backbone"], tmp_path, expect_rc=2)
    assert "ImageNet" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_alltask_refuses_to_freeze_a_random_backbone(tmp_path):
    # The toy preset freezes its backbone, which must come from the backbone stage.
    result = _train(["--dataset", "toy", "--stage", "alltask", "--output-dir", "a"], tmp_path, expect_rc=2)
    assert "model.backbone.weights" in result.stderr and "freeze_at=5" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_alltask_targets_line_up_with_masks_predicted_over_the_padded_input():
    """A 72-px crop is padded to 96 by the model (size divisibility 32), whose mask logits then
    cover 96 x 96 at stride 4: the targets must be padded to 96 too, or the criterion's
    upsampled prediction lands 3/4 of the way to where the object is."""
    import types

    import train
    from freeseg.modeling.freeseg import FreeSeg
    from freeseg.modeling.matcher import upsample_masks

    mask = torch.zeros(1, 72, 72, dtype=torch.bool)
    mask[0, 40:64, 44:68] = True
    sample = {"masks": mask, "labels": torch.tensor([3]), "isthing": torch.tensor([True])}
    padded = FreeSeg.padded_size(types.SimpleNamespace(size_divisibility=32), (72, 72))
    assert padded == (96, 96)
    remap = torch.tensor([-1, -1, -1, 0])  # dataset class 3 is seen class 0
    (target,) = train.alltask_targets([sample], "instance", remap, padded, torch.device("cpu"))
    assert target["labels"].tolist() == [0] and target["masks"].shape == (1, 96, 96)

    # A perfect prediction on the stride-4 grid of the padded input, upsampled as the loss does.
    cover = F.avg_pool2d(F.pad(mask.float(), (0, 24, 0, 24))[None], 4)[0]  # (1, 24, 24)
    pred = upsample_masks(20 * (cover - 0.5), target["masks"].shape[-2:]) > 0

    def iou(a, b):
        return ((a & b).sum() / (a | b).sum()).item()

    assert iou(pred, target["masks"]) > 0.95
    unpadded = upsample_masks(20 * (cover - 0.5), (72, 72)) > 0  # what an unpadded target meets
    assert iou(unpadded, mask) < 0.5


def test_semantic_iterations_learn_from_segments_when_asked():
    """extensions.semantic_targets: "classes" (official) gives two same-class things one mask in
    a semantic iteration, "segments" (the toy preset) one mask each, as the panoptic task does."""
    import train
    from freeseg.config import ExtensionsConfig
    from freeseg.extensions import target_task
    from freeseg.presets import get_preset

    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 2:10, 2:10] = masks[1, 20:30, 20:30] = True  # two things of class 3
    masks[2] = ~(masks[0] | masks[1])  # stuff of class 5 around them
    sem_seg = torch.full((32, 32), 5)
    sem_seg[masks[0] | masks[1]] = 3
    sample = {"sem_seg": sem_seg, "masks": masks, "labels": torch.tensor([3, 3, 5]),
              "isthing": torch.tensor([True, True, False])}
    remap = torch.tensor([-1, -1, -1, 0, -1, 1])  # dataset classes 3 and 5 are seen classes 0 and 1

    def targets(task, semantic_targets):
        (t,) = train.alltask_targets([sample], target_task(task, ExtensionsConfig(semantic_targets=semantic_targets)),
                                     remap, (32, 32), torch.device("cpu"))
        return t

    official = targets("semantic", "classes")
    assert official["labels"].tolist() == [0, 1] and torch.equal(official["masks"][0], masks[0] | masks[1])
    segments = targets("semantic", "segments")
    assert segments["labels"].tolist() == [0, 0, 1] and torch.equal(segments["masks"], masks)
    assert targets("instance", "segments")["labels"].tolist() == [0, 0]  # other tasks unchanged
    with pytest.raises(ValueError, match="extensions.semantic_targets must be"):
        target_task("semantic", ExtensionsConfig(semantic_targets="instances"))
    assert get_preset("coco").extensions.semantic_targets == "classes"
    assert get_preset("toy").extensions.semantic_targets == "segments"


@pytest.mark.parametrize("threads", [1, 2])
def test_toy_batches_are_the_draws_of_their_iterations(threads):
    """toy_batches draws in chunks, in worker processes: batch `it` must still be exactly
    draw(generator (seed, it, rank), batch, size), across chunk boundaries and from a resumed
    start, whatever the number of workers (one per thread)."""
    import numpy as np

    from freeseg.data import toy_world
    from freeseg.presets import get_preset
    from freeseg.toy_pretraining import toy_batches

    cfg = get_preset("toy_backbone")
    cfg.train.iterations, cfg.train.batch_size, cfg.train.seed = 7, 3, 5
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batches = list(toy_batches(toy_world.attribute_batch, cfg, start=2, size=24, chunk=2))
    finally:
        torch.set_num_threads(saved)
    assert len(batches) == 5  # iterations 2..6
    for it, (images, form, colour) in enumerate(batches, start=2):
        want = toy_world.attribute_batch(np.random.default_rng([5, it, 0]), 3, size=24)
        assert images.dtype == torch.uint8 and images.shape == (3, 3, 24, 24)
        for got, expected in zip((images, form, colour), want):
            assert torch.equal(got, torch.from_numpy(expected))
    assert not torch.equal(batches[0][0], batches[1][0])


def test_default_task_draw_is_the_one_the_stages_always_made():
    """train.tasks defaults to the three tasks, and then draw_task is the draw the prompt and
    all-task stages made before the option existed (the toy results stay the same)."""
    import numpy as np

    import train
    from freeseg.config import TrainConfig
    from freeseg.presets import get_preset

    three = ("semantic", "instance", "panoptic")
    assert TrainConfig().tasks == three
    assert all(get_preset(p).train.tasks == three for p in ("toy", "toy_prompt", "coco", "coco_prompt"))
    for seed in (0, 1, 7):
        for it in range(300):
            assert train.draw_task(three, seed, it) == three[np.random.default_rng([seed, it]).integers(3)]


def test_task_subsets_are_drawn_deterministically():
    import train

    assert {train.draw_task(("instance",), s, it) for s in (0, 1) for it in range(100)} == {"instance"}
    pair = ("semantic", "panoptic")
    draws = [train.draw_task(pair, 3, it) for it in range(400)]
    assert draws == [train.draw_task(pair, 3, it) for it in range(400)]  # a function of (seed, iteration)
    assert 150 < draws.count("semantic") < 250  # uniform over the subset
    assert draws != [train.draw_task(pair, 4, it) for it in range(400)]
    for bad in ((), ("semantic", "detection"), ("instance", "instance")):
        with pytest.raises(ValueError, match="train.tasks must name"):
            train.draw_task(bad, 0, 0)
