"""Bad inputs, given as a hostile but fair user gives them (issue 24): every command answers with
ONE line on stderr that names the file, field, class or key, a non-zero status and no traceback,
before it has done any work that the error makes useless, and without losing a file.

`CASES` is the table of docs/reliability.md: (command, arguments, exit status, words the line
must hold). The commands run in the tiny world of tests/bad_input_world.py.
"""

import pytest

from bad_input_world import (ALL, ALLTASK, ALLTASK_STAGE, FAST, PROGS, PROMPT_STAGE, TOY, B, D, E, K, P, T,  # noqa: F401
                             _files, _record, in_world, reliability_table, run, world)

# ---------------------------------------------------------------- the table


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
