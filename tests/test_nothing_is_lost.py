"""Nothing is lost and resumes are honest (issue 24): checkpoints load with weights_only, files get
the user's umask, a resume applies and reports changed settings, a torn metrics line is dropped
with a warning, --overwrite starts afresh. The commands run in the tiny world of
tests/bad_input_world.py.
"""

import importlib
import json
import os
import shutil

import pytest
import torch

from bad_input_world import FAST, PROMPT_STAGE, T, in_world, reliability_table, run, world  # noqa: F401
from freeseg import config as C
from freeseg import engine, presets

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
