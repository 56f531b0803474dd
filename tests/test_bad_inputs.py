"""Bad inputs, given as a hostile but fair user gives them (issue 24): every command answers with
ONE line on stderr that names the file, field, class or key, a non-zero status and no traceback,
before it has done any work that the error makes useless, and without losing a file.

`CASES` is the table of docs/reliability.md: (command, arguments, exit status, words the line
must hold). Each case runs in this process through `freeseg.errors.run_cli`, exactly as
`python SCRIPT ARGS` runs it, inside a folder holding a tiny toy world (12 images of 64 px), a
tiny CLIP written without training and prompt / all-task checkpoints of 2 iterations. With
FREESEG_RELIABILITY_TABLE=PATH set, the lines the cases printed are written to PATH as the
Markdown table of docs/reliability.md.

The malicious-pickle test gives a checkpoint whose unpickling would create a file to every
command that reads one; the file must never appear, and the message must name the checkpoint.
"""

import importlib
import io
import json
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from freeseg import config as C  # noqa: E402
from freeseg import engine, presets  # noqa: E402
from freeseg.errors import run_cli  # noqa: E402

PROGS = {"train": "train.py", "evaluate": "evaluate.py", "demo": "demo.py", "prepare_data": "prepare_data.py",
         "converter": "python -m freeseg.modeling.checkpoint_official", "bench": "python -m freeseg.bench",
         "diagnose": "python -m freeseg.evaluation.diagnose"}
MODULES = {"train": "train", "evaluate": "evaluate", "demo": "demo", "prepare_data": "prepare_data",
           "converter": "freeseg.modeling.checkpoint_official", "bench": "freeseg.bench",
           "diagnose": "freeseg.evaluation.diagnose"}

TOY = ["--dataset", "toy", "--data-root", "data", "--clip", "clip/checkpoint.pt"]
FAST = ["train.seed=0", "train.log_every=1", "data.num_workers=0", "train.warmup_iters=0", "train.batch_size=4",
        "train.iterations=2", "train.checkpoint_every=100"]
ALLTASK = FAST + ["data.image_size=64", "model.decoder.num_queries=5", "model.backbone.freeze_at=0"]
PROMPT_RUN = TOY + ["--stage", "prompt", "--output-dir", "prompt", "--set", *FAST]
ALLTASK_RUN = TOY + ["--stage", "alltask", "--init", "prompt/checkpoint.pt", "--output-dir", "alltask", "--set", *ALLTASK]
MARKER = "PWNED"  # the file a malicious checkpoint would create


def run(command: str, args: list[str], capsys) -> tuple[int, str]:
    """Run a command in this process, as its `python ...` line does: (status, stderr)."""
    main = importlib.import_module(MODULES[command]).main
    capsys.readouterr()
    status = run_cli(main, args, prog=PROGS[command])
    return status, capsys.readouterr().err


# ---------------------------------------------------------------- the tiny world


class _Evil:
    """Unpickling this creates the file MARKER: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, (f"touch {os.path.abspath(MARKER)}",))


def _tiny_clip(path: Path) -> None:
    """A toy CLIP as `train.py --stage clip` writes it (untrained: only its format matters here)."""
    from freeseg import clip
    from freeseg.toy_pretraining import toy_caption_corpus

    cfg = presets.get_preset("toy_clip")
    c = cfg.model.clip
    merges = clip.learn_bpe(toy_caption_corpus(), c.bpe_merges)
    torch.manual_seed(0)
    model = clip.CLIP(embed_dim=c.embed_dim, image_resolution=c.image_resolution, vision_layers=tuple(c.vision_layers),
                      vision_width=c.vision_width, vision_patch_size=None, context_length=c.context_length,
                      vocab_size=clip.Tokenizer(merges=merges).vocab_size, transformer_width=c.text_width,
                      transformer_heads=c.text_heads, transformer_layers=c.text_layers)
    engine.save_checkpoint(path, model=model.state_dict(), merges=merges, iteration=cfg.train.iterations,
                           config=C.to_dict(cfg))


def _evil_torchscript(path: Path) -> None:
    """A zip laid out as a TorchScript archive whose data.pkl calls os.system."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil(), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/version", "3\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from freeseg.data.prepare_coco import prepare_toy

    root = tmp_path_factory.mktemp("world")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        prepare_toy("data", workers=1, num_train=12, num_val=4, per_class=4, size=64)
        _tiny_clip(root / "clip" / "checkpoint.pt")
        for args in (PROMPT_RUN, ALLTASK_RUN):
            assert run_cli(importlib.import_module("train").main, args) == 0
        # A ground-truth map of the wrong size, replaced after preparation.
        shutil.copytree("data", "data_bad")
        record = json.loads(Path("data_bad/freeseg/toy/val.json").read_text())[0]
        Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(Path("data_bad") / record["sem_seg_file"])
        # A prompt checkpoint of another model size (class_ctx 4 -> 3).
        small = torch.load("prompt/checkpoint.pt", weights_only=True)
        small["model"]["prefix_prompt"] = small["model"]["prefix_prompt"][:3]
        torch.save(small, "prompt_small.pt")
        # A run folder whose metrics log is damaged in the middle (not a torn last line).
        os.makedirs("damaged")
        shutil.copy("prompt/checkpoint.pt", "damaged/checkpoint.pt")
        Path("damaged/metrics.jsonl").write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "lo\n{"iter": 3}\n')
        # The alltask checkpoint in a prompt run folder: a checkpoint of the wrong stage to resume.
        os.makedirs("wrong_stage")
        shutil.copy("alltask/checkpoint.pt", "wrong_stage/checkpoint.pt")
        for name, content in (("notes.txt", b"hello\n"), ("truncated.pth", Path("prompt/checkpoint.pt").read_bytes()[:999])):
            Path(name).write_bytes(content)
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save("photo.png")
        Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32), mode="F").save("hdr.tif")
        torch.save({"model": {"w": torch.zeros(2)}, "config": {"train": {"stage": "alltask"}}, "iteration": 1,
                    "payload": _Evil()}, "evil.pt")
        with open("evil.pkl", "wb") as f:
            pickle.dump({"model": {"res2.0.conv1.weight": _Evil()}}, f, protocol=2)
        _evil_torchscript(root / "evil_script.pt")
        os.makedirs("evil_run")
        shutil.copy("evil.pt", "evil_run/checkpoint.pt")
        os.makedirs("results_dir")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def in_world(world, monkeypatch):
    monkeypatch.chdir(world)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("FREESEG_DEBUG", raising=False)
    return world


# ---------------------------------------------------------------- the table

T, E, D, P, K, B = "train", "evaluate", "demo", "prepare_data", "converter", "bench"
ALL = ["--checkpoint", "alltask/checkpoint.pt"]
PROMPT_STAGE = TOY + ["--stage", "prompt", "--set", *FAST]
ALLTASK_STAGE = TOY + ["--stage", "alltask", "--init", "prompt/checkpoint.pt", "--set", *ALLTASK]

# (case id, command, arguments, exit status, words the one line must hold)
CASES = [
    # --- overrides: parsed, typed and range-checked before any stage starts
    ("lr-nan", T, PROMPT_STAGE + ["train.lr=nan", "--output-dir", "o1"], 2, "train.lr=nan: must be a finite number > 0"),
    ("lr-inf", T, PROMPT_STAGE + ["train.lr=inf", "--output-dir", "o1"], 2, "train.lr=inf: must be a finite number > 0"),
    ("lr-text", T, PROMPT_STAGE + ["train.lr=fast", "--output-dir", "o1"], 2, "bad value for train.lr"),
    ("iterations-negative", T, PROMPT_STAGE + ["train.iterations=-5", "--output-dir", "o1"], 2,
     "train.iterations=-5: must be an integer >= 1"),
    ("batch-zero", T, PROMPT_STAGE + ["train.batch_size=0", "--output-dir", "o1"], 2, "train.batch_size=0: must be"),
    ("checkpoint-every-zero", T, PROMPT_STAGE + ["train.checkpoint_every=0", "--output-dir", "o1"], 2,
     "train.checkpoint_every=0: must be an integer >= 1"),
    ("log-every-zero", T, PROMPT_STAGE + ["train.log_every=0", "--output-dir", "o1"], 2, "train.log_every=0"),
    ("ensemble-weight", T, PROMPT_STAGE + ["inference.clip_weight_unseen=1.5", "--output-dir", "o1"], 2,
     "inference.clip_weight_unseen=1.5: must be a finite number >= 0 and <= 1"),
    ("optimizer-unknown", T, PROMPT_STAGE + ["train.optimizer=lamb", "--output-dir", "o1"], 2,
     "train.optimizer=lamb: must be one of adamw, sgd"),
    ("seed-negative", T, PROMPT_STAGE + ["train.seed=-1", "--output-dir", "o1"], 2, "train.seed=-1"),
    ("scale-range", T, PROMPT_STAGE + ["data.min_scale=2", "data.max_scale=1", "--output-dir", "o1"], 2,
     "data.max_scale=1.0: must be >= data.min_scale"),
    ("heads-divide", T, PROMPT_STAGE + ["model.decoder.num_heads=3", "--output-dir", "o1"], 2,
     "model.decoder.hidden_dim=64: must be divisible by model.decoder.num_heads (3)"),
    ("key-typo-other-stage", T, PROMPT_STAGE + ["alltask:train.iterationz=5", "--output-dir", "o1"], 2,
     "alltask stage: unknown config key 'train.iterationz'"),
    ("stage-prefix-unknown", T, PROMPT_STAGE + ["alltsk:train.lr=1", "--output-dir", "o1"], 2,
     "unknown stage 'alltsk'"),
    ("key-not-key-value", T, PROMPT_STAGE + ["train.lr", "--output-dir", "o1"], 2, "is not of the form key=value"),
    ("section-as-key", T, PROMPT_STAGE + ["model.decoder=5", "--output-dir", "o1"], 2, "'model.decoder' is a section"),
    ("preset-unknown", T, PROMPT_STAGE + ["--preset", "cityscapes", "--output-dir", "o1"], 2,
     "unknown preset 'cityscapes'"),
    # --- stages, run folders and checkpoints
    ("stage-clip-on-coco", T, ["--dataset", "coco", "--stage", "clip"], 2, "--stage clip trains the toy world's tiny CLIP"),
    ("stage-missing-on-coco", T, ["--dataset", "coco"], 2, "--stage is required for real datasets"),
    ("init-without-alltask", T, PROMPT_STAGE + ["--init", "prompt/checkpoint.pt", "--output-dir", "o1"], 2,
     "--init gives the all-task stage its prompts"),
    ("run-folder-has-checkpoint", T, PROMPT_STAGE + ["--output-dir", "prompt"], 2,
     "prompt already holds a checkpoint (prompt/checkpoint.pt): --resume continues it, --overwrite"),
    ("resume-nothing", T, PROMPT_STAGE + ["--output-dir", "fresh", "--resume"], 2,
     "--resume: fresh/checkpoint.pt does not exist"),
    ("resume-and-overwrite", T, PROMPT_STAGE + ["--output-dir", "prompt", "--resume", "--overwrite"], 2,
     "--resume continues the run directory's checkpoint, --overwrite replaces it: give one"),
    ("output-dir-is-file", T, PROMPT_STAGE + ["--output-dir", "notes.txt"], 2, "--output-dir notes.txt is a file"),
    ("output-dir-unwritable", T, PROMPT_STAGE + ["--output-dir", "/proc/freeseg-run"], 2,
     "/proc is not a writable directory"),
    ("init-is-output", T, ALLTASK_STAGE + ["--output-dir", "prompt", "--overwrite"], 2,
     "--init prompt/checkpoint.pt is a file this stage writes in prompt"),
    ("init-missing", T, TOY + ["--stage", "alltask", "--init", "nope.pt", "--output-dir", "o1", "--set", *ALLTASK], 2,
     "--init checkpoint nope.pt does not exist"),
    ("init-wrong-stage", T, TOY + ["--stage", "alltask", "--init", "alltask/checkpoint.pt", "--output-dir", "o1",
                                   "--set", *ALLTASK], 2,
     "--init checkpoint alltask/checkpoint.pt is a checkpoint of the 'alltask' stage, not of the 'prompt' stage"),
    ("init-wrong-size", T, TOY + ["--stage", "alltask", "--init", "prompt_small.pt", "--output-dir", "o1",
                                  "--set", *ALLTASK], 2, "--init checkpoint prompt_small.pt does not fit this model's prompts"),
    ("resume-wrong-stage", T, PROMPT_STAGE + ["--output-dir", "wrong_stage", "--resume"], 2,
     "checkpoint to resume wrong_stage/checkpoint.pt is a checkpoint of the 'alltask' stage, not of the 'prompt' stage"),
    ("resume-wrong-size", T, ALLTASK_STAGE + ["model.decoder.num_queries=7", "--output-dir", "alltask", "--resume"], 2,
     "checkpoint to resume alltask/checkpoint.pt does not fit this model"),
    ("resume-other-optimizer", T, PROMPT_STAGE + ["train.optimizer=adamw", "--output-dir", "prompt", "--resume"], 2,
     "train.optimizer 'sgd' -> 'adamw' cannot change in a resumed run"),
    ("resume-damaged-metrics", T, PROMPT_STAGE + ["--output-dir", "damaged", "--resume"], 2,
     "damaged/metrics.jsonl, line 2: not a JSON record"),
    ("clip-missing", T, ["--dataset", "toy", "--data-root", "data", "--clip", "nope.pt", "--stage", "prompt",
                         "--output-dir", "o1", "--set", *FAST], 2, "no CLIP checkpoint at nope.pt (--clip"),
    ("clip-is-alltask", T, ["--dataset", "toy", "--data-root", "data", "--clip", "alltask/checkpoint.pt", "--stage",
                            "prompt", "--output-dir", "o1", "--set", *FAST], 2,
     "CLIP checkpoint alltask/checkpoint.pt is a checkpoint of the 'alltask' stage, not a CLIP"),
    ("clip-truncated", T, ["--dataset", "toy", "--data-root", "data", "--clip", "truncated.pth", "--stage", "prompt",
                           "--output-dir", "o1", "--set", *FAST], 2, "CLIP checkpoint truncated.pth is unreadable"),
    ("backbone-weights-missing", T, TOY + ["--stage", "alltask", "--output-dir", "o1", "--set",
                                           *ALLTASK, "model.backbone.weights=nope.pth"], 2,
     "backbone weights nope.pth do not exist (model.backbone.weights)"),
    ("data-not-prepared", T, ["--dataset", "toy", "--data-root", "nowhere", "--clip", "clip/checkpoint.pt", "--stage",
                              "prompt", "--output-dir", "o1", "--set", *FAST], 2,
     "missing prepared dataset meta (run prepare_data.py): nowhere/freeseg/toy/meta.json"),
    ("loss-not-finite", T, PROMPT_STAGE + ["train.lr=1e30", "train.iterations=6", "--output-dir", "o2"], 2,
     "the loss is not finite (loss=nan); training stopped and no checkpoint was saved in o2"),
    ("weights-diverge", T, ALLTASK_STAGE + ["train.lr=1e30", "train.iterations=6", "--output-dir", "o2"], 2,
     "not finite"),
    # --- evaluate.py
    ("eval-checkpoint-missing", E, ["--checkpoint", "nope.pt"], 2, "checkpoint nope.pt not found"),
    ("eval-checkpoint-text", E, ["--checkpoint", "notes.txt"], 2, "checkpoint notes.txt is unreadable"),
    ("eval-checkpoint-prompt", E, ["--checkpoint", "prompt/checkpoint.pt"], 2,
     "checkpoint prompt/checkpoint.pt is from the 'prompt' stage, not a FreeSeg model"),
    ("eval-out-is-checkpoint", E, ALL + ["--out", "alltask/checkpoint.pt"], 2, "unknown extension .pt; use .json"),
    ("eval-out-is-directory", E, ALL + ["--out", "results_dir"], 2, "--out results_dir is a directory"),
    ("eval-out-no-extension", E, ALL + ["--out", "results"], 2, "--out results: unknown extension (none); use .json"),
    ("eval-out-under-a-file", E, ALL + ["--out", "notes.txt/results.json"], 2,
     "--out notes.txt/results.json: notes.txt is a file, not a folder"),
    ("eval-out-unwritable", E, ALL + ["--out", "/proc/results.json"], 2, "folder /proc is not writable"),
    ("eval-out-in-data", E, ALL + ["--out", "data/freeseg/toy/val.json"], 2,
     "--out data/freeseg/toy/val.json is inside the prepared data data/freeseg"),
    ("eval-max-images-zero", E, ALL + ["--max-images", "0"], 2, "--max-images 0: must be at least 1"),
    ("eval-set-weight", E, ALL + ["--set", "inference.clip_weight_seen=2"], 2,
     "inference.clip_weight_seen=2.0: must be a finite number >= 0 and <= 1"),
    ("eval-set-training-key", E, ALL + ["--set", "train.lr=1"], 2,
     "evaluation override 'train.lr=1': only inference.*, fast.*, data.test_short_side, data.num_workers and the "
     "inference extensions (extensions.clip_*, unclaimed_min_area) can change after training"),
    ("eval-set-fast-share", E, ALL + ["--set", "fast.share_iou=2"], 2,
     "fast.share_iou=2.0: must be a finite number >= 0 and <= 1"),
    ("eval-set-old-fast-key", E, ALL + ["--set", "inference.fast_share_iou=0.8"], 2,
     "config key 'inference.fast_share_iou' is now 'fast.share_iou'"),
    ("eval-split-missing", E, ALL + ["--split", "nope"], 2, "missing prepared nope split"),
    ("eval-gt-wrong-size", E, ALL + ["--data-root", "data_bad", "--tasks", "semantic"], 2,
     "semantic map is 12x10 (WxH) but its image"),
    # --- demo.py
    ("demo-out-is-image", D, ALL + ["--image", "photo.png", "--classes", "cat", "--task", "semantic", "--out", "photo.png"],
     2, "--out photo.png is also an input of this command (photo.png)"),
    ("demo-out-no-extension", D, ALL + ["--image", "photo.png", "--classes", "cat", "--task", "semantic", "--out", "demo"],
     2, "--out demo: unknown extension (none)"),
    ("demo-out-json", D, ALL + ["--out", "segments.json"], 2, "--out segments.json: unknown extension .json"),
    ("demo-out-directory", D, ALL + ["--out", "results_dir"], 2, "--out results_dir is a directory"),
    ("demo-image-missing", D, ALL + ["--image", "nope.jpg", "--classes", "cat"], 2, "missing image file: nope.jpg"),
    ("demo-image-not-image", D, ALL + ["--image", "notes.txt", "--classes", "cat"], 2, "notes.txt: cannot decode image"),
    ("demo-image-float-range", D, ALL + ["--image", "hdr.tif", "--classes", "cat"], 2,
     "hdr.tif: float image with values outside 0-1 and 0-255"),
    ("demo-classes-duplicates", D, ALL + ["--image", "photo.png", "--classes", "red star, Red Star, red  star"], 2,
     "'red star' / 'Red Star' / 'red  star' (all read as 'red star')"),
    ("demo-classes-empty", D, ALL + ["--image", "photo.png", "--classes", " , "], 2, "--classes is empty"),
    ("demo-classes-missing", D, ALL + ["--image", "photo.png"], 2, "--classes is required with --image"),
    ("demo-checkpoint-clip", D, ["--checkpoint", "clip/checkpoint.pt"], 2,
     "checkpoint clip/checkpoint.pt is from the 'clip' stage, not a FreeSeg model"),
    # --- prepare_data.py
    ("prepare-num-train-zero", P, ["--dataset", "toy", "--data-root", "gen", "--num-train", "0"], 2,
     "--num-train 0: must be at least 1"),
    ("prepare-image-size", P, ["--dataset", "toy", "--data-root", "gen", "--image-size", "8"], 2,
     "--image-size 8: must be at least 48"),
    ("prepare-workers-zero", P, ["--dataset", "toy", "--data-root", "gen", "--workers", "0"], 2, "--workers 0"),
    ("prepare-segments-zero", P, ["--dataset", "toy", "--data-root", "gen", "--segments-per-class", "0"], 2,
     "--segments-per-class 0: must be at least 1"),
    ("prepare-root-is-file", P, ["--dataset", "toy", "--data-root", "notes.txt"], 2, "--data-root notes.txt is a file"),
    ("prepare-coco-missing", P, ["--dataset", "coco", "--data-root", "gen"], 2, "gen/coco"),
    # --- the official-checkpoint converter
    ("convert-missing", K, ["nope.pth", "out.pt"], 2, "official checkpoint nope.pth does not exist"),
    ("convert-png", K, ["photo.png", "out.pt"], 2, "official checkpoint photo.png is unreadable"),
    ("convert-truncated", K, ["truncated.pth", "out.pt"], 2, "official checkpoint truncated.pth is unreadable"),
    ("convert-out-is-source", K, ["truncated.pth", "truncated.pth"], 2,
     "converted checkpoint truncated.pth is also an input of this command"),
    ("convert-out-extension", K, ["truncated.pth", "out.json"], 2, "unknown extension .json; use .pt or .pth"),
    ("convert-preset-unknown", K, ["truncated.pth", "out.pt", "--preset", "nope"], 2, "unknown preset 'nope'"),
    ("convert-preset-prompt", K, ["truncated.pth", "out.pt", "--preset", "coco_prompt"], 2,
     "needs an all-task preset"),
    ("convert-not-official", K, ["prompt/checkpoint.pt", "out.pt"], 2, "not an official FreeSeg model"),
    # --- benchmarks
    ("bench-repeat-zero", B, ["msda", "--repeat", "0"], 2, "--repeat 0: must be at least 1"),
    ("bench-device", B, ["step", "--device", "tpu"], 2, "--device tpu: must be cpu or cuda"),
    ("bench-infer-repeat-zero", B, ["infer", "--repeat", "0"], 2, "--repeat 0: must be at least 1"),
    ("bench-infer-threads-zero", B, ["infer", "--threads", "0"], 2, "--threads 0: must be at least 1"),
    ("bench-infer-device", B, ["infer", "--device", "tpu"], 2, "--device tpu: must be cpu or cuda"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it(in_world, capsys, case):
    name, command, args, status, words = case
    before = _files(in_world)
    got, err = run(command, args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    _record(name, command, args, got, lines)
    assert got == status, err
    assert len(lines) == 1 and lines[0].startswith(f"{PROGS[command]}: error: "), err
    assert words in lines[0], lines[0]
    assert "Traceback" not in err
    after = _files(in_world)
    # Nothing written, nothing lost: the same files with the same contents (a diverged run keeps its log).
    assert after == before or name in ("loss-not-finite", "weights-diverge"), set(after.items()) ^ set(before.items())


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_debug_shows_the_traceback(in_world, capsys, monkeypatch):
    from freeseg.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lr=nan"):
        run(T, PROMPT_STAGE + ["train.lr=nan", "--output-dir", "o1", "--debug"], capsys)
    monkeypatch.setenv("FREESEG_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.lr=nan"):
        run(T, PROMPT_STAGE + ["train.lr=nan", "--output-dir", "o1"], capsys)


def test_a_bug_keeps_its_traceback(in_world, capsys, monkeypatch):
    """Only user errors are one line: anything else is a bug and must surface as itself."""
    import train

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(train, "check_overrides", broken)
    with pytest.raises(ValueError, match="a bug"):
        run(T, PROMPT_STAGE + ["--output-dir", "o1"], capsys)


# ---------------------------------------------------------------- malicious checkpoints

EVIL = [  # every command that reads a file it is given, given one that would run code
    ("demo --checkpoint", D, ["--checkpoint", "evil.pt"], "checkpoint evil.pt"),
    ("evaluate --checkpoint", E, ["--checkpoint", "evil.pt"], "checkpoint evil.pt"),
    ("diagnose --checkpoint", "diagnose", ["--checkpoint", "evil.pt"], "checkpoint evil.pt"),
    ("train --clip (torch file)", T, ["--dataset", "toy", "--data-root", "data", "--clip", "evil.pt", "--stage", "prompt",
                                      "--output-dir", "o1", "--set", *FAST], "CLIP checkpoint evil.pt"),
    ("train --clip (TorchScript archive)", T, ["--dataset", "toy", "--data-root", "data", "--clip", "evil_script.pt",
                                               "--stage", "prompt", "--output-dir", "o1", "--set", *FAST],
     "TorchScript archive evil_script.pt"),
    ("train --init", T, TOY + ["--stage", "alltask", "--init", "evil.pt", "--output-dir", "o1", "--set", *ALLTASK],
     "--init checkpoint evil.pt"),
    ("train --resume", T, TOY + ["--stage", "alltask", "--output-dir", "evil_run", "--resume", "--set", *ALLTASK],
     "checkpoint to resume evil_run/checkpoint.pt"),
    ("train backbone weights (.pkl)", T, TOY + ["--stage", "alltask", "--output-dir", "o1", "--set", *ALLTASK,
                                                "model.backbone.weights=evil.pkl"], "backbone weights evil.pkl"),
    ("train backbone weights (.pth)", T, TOY + ["--stage", "alltask", "--output-dir", "o1", "--set", *ALLTASK,
                                                "model.backbone.weights=evil.pt"], "backbone weights evil.pt"),
    ("converter (.pth)", K, ["evil.pt", "out.pt"], "official checkpoint evil.pt"),
    ("converter (.pkl)", K, ["evil.pkl", "out.pt"], "official checkpoint evil.pkl"),
]


@pytest.mark.parametrize("case", EVIL, ids=[c[0] for c in EVIL])
def test_malicious_checkpoint_never_runs(in_world, capsys, case):
    name, command, args, words = case
    got, err = run(command, args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    _record(f"malicious: {name}", command, args, got, lines, table="malicious")
    assert not (in_world / MARKER).exists(), "the checkpoint's code ran"
    assert got == 2 and len(lines) == 1, err
    assert words in lines[0] and "refused" in lines[0], lines[0]
    assert "Traceback" not in err


def test_the_malicious_checkpoint_does_run_when_unpickled(in_world):
    """The test's checkpoint is really malicious: a plain full unpickle creates the file."""
    try:
        with open("evil.pkl", "rb") as f:
            pickle.Unpickler(f).load()
        assert (in_world / MARKER).exists()
    finally:
        (in_world / MARKER).unlink(missing_ok=True)


def test_trust_checkpoint_unpickles_fully(in_world, capsys, tmp_path):
    """--trust-checkpoint is the way past a refusal for a file the user trusts: a checkpoint that
    also holds a Python object (here a Fraction) is refused without it and read with it."""
    from fractions import Fraction

    ckpt = torch.load("alltask/checkpoint.pt", weights_only=True)
    ckpt["note"] = Fraction(1, 3)
    torch.save(ckpt, tmp_path / "with_object.pt")
    got, err = run(E, ["--checkpoint", str(tmp_path / "with_object.pt"), "--max-images", "1", "--tasks", "semantic"],
                   capsys)
    assert got == 2 and "fractions.Fraction" in err and "--trust-checkpoint" in err
    got, err = run(E, ["--checkpoint", str(tmp_path / "with_object.pt"), "--max-images", "1", "--tasks", "semantic",
                       "--trust-checkpoint"], capsys)
    assert got == 0, err


# ---------------------------------------------------------------- nothing is lost, resumes are honest


def test_every_checkpoint_we_write_loads_with_weights_only(in_world):
    for path in ("clip/checkpoint.pt", "prompt/checkpoint.pt", "alltask/checkpoint.pt"):
        ckpt = torch.load(path, weights_only=True)  # no safe globals added
        assert ckpt["model"] and ckpt["config"]["train"]["stage"] == path.split("/")[0]


def test_files_get_the_users_umask(in_world):
    assert (os.stat("alltask/checkpoint.pt").st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_applies_a_changed_learning_rate_to_the_optimizer(in_world, capsys, tmp_path):
    shutil.copytree("prompt", tmp_path / "run")
    got, err = run(T, PROMPT_STAGE + ["train.iterations=3", "train.lr=0.05", "--output-dir", str(tmp_path / "run"),
                                      "--resume"], capsys)
    assert got == 0, err
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 3 and ckpt["config"]["train"]["lr"] == 0.05
    # The recorded rate is the rate used: every group restarts from the new base rate.
    assert [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.05]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["iter"] == 3 and metrics[-1]["lr"] == pytest.approx(0.05 * engine.lr_factor(
        2, C.apply_overrides(presets.get_preset("toy_prompt"), FAST + ["train.iterations=3"]).train))


def test_resume_says_what_changed(in_world, capsys, tmp_path):
    shutil.copytree("prompt", tmp_path / "run")
    importlib.import_module("train").main(PROMPT_STAGE + ["train.iterations=3", "train.lr=0.05", "--output-dir",
                                                          str(tmp_path / "run"), "--resume"])
    out = capsys.readouterr().out
    assert "resume: settings changed since the checkpoint" in out
    assert "train.lr 0.02 -> 0.05 (optimizer groups updated)" in out and "train.iterations 2 -> 3" in out


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(in_world, capsys, tmp_path):
    shutil.copytree("prompt", tmp_path / "run")
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"iter": 3, "loss": 0.')  # a run stopped while writing a line
    got, err = run(T, PROMPT_STAGE + ["train.iterations=3", "--output-dir", str(tmp_path / "run"), "--resume"], capsys)
    assert got == 0, err
    assert f"warning: {log}: dropped its last line" in err
    assert [json.loads(line)["iter"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_overwrite_starts_afresh(in_world, capsys, tmp_path):
    shutil.copytree("prompt", tmp_path / "run")
    got, err = run(T, PROMPT_STAGE + ["train.iterations=1", "--output-dir", str(tmp_path / "run"), "--overwrite"],
                   capsys)
    assert got == 0, err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["iteration"] == 1
    assert [json.loads(line)["iter"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_demo_matches_class_names_as_the_tokenizer_reads_them():
    import demo

    names, unseen, is_thing = demo.vocabulary(demo.parse_classes("Wall, red  STAR, +Sky, Blue Circle"), "toy")
    # toy world: wall and blue circle are seen, red star unseen; sky is stuff but marked a thing
    assert names == ["Wall", "red  STAR", "Sky", "Blue Circle"]
    assert unseen.tolist() == [False, True, False, False] and is_thing.tolist() == [False, True, True, True]


# ---------------------------------------------------------------- the table of docs/reliability.md

_RECORDS: dict[str, list] = {"bad": [], "malicious": []}


def _record(name: str, command: str, args: list[str], status: int, lines: list[str], table: str = "bad") -> None:
    here = os.getcwd() + os.sep  # the world's temporary folder, left out of the table
    text = " ".join(_quote(a) for a in args)
    # The overrides every training case shares are written once, above the table.
    text = text.replace(" ".join(ALLTASK), "$ALLTASK").replace(" ".join(FAST), "$FAST")
    _RECORDS[table].append((name, f"{PROGS[command]} {text}", status, lines[-1].replace(here, "") if lines else ""))


def _quote(arg: str) -> str:
    return f'"{arg}"' if (" " in arg or "," in arg) else arg


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    path = os.environ.get("FREESEG_RELIABILITY_TABLE")
    if not path:
        return
    out = io.StringIO()
    for table, title in (("bad", "Bad inputs"), ("malicious", "Malicious checkpoints")):
        out.write(f"## {title}\n\n| # | case | command | exit | the line printed on stderr |\n|---|---|---|---|---|\n")
        for i, (name, command, status, line) in enumerate(_RECORDS[table], 1):
            cells = [str(i), name, f"`{command}`", str(status), line.replace("|", "\\|")]
            out.write("| " + " | ".join(cells) + " |\n")
        out.write("\n")
    Path(path).write_text(out.getvalue())

