"""Malicious checkpoints (issue 24): every command that reads a file it is given refuses one whose
unpickling would create a file; the file never appears, and the one line names the checkpoint.
`--trust-checkpoint` is the way past a refusal for a file the user trusts.
"""

import pickle

import pytest
import torch

from bad_input_world import (ALLTASK, FAST, MARKER, TOY, D, E, K, T, _record, in_world,  # noqa: F401
                             reliability_table, run, world)

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
