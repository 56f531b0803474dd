"""The tiny toy world that the bad-input, malicious-checkpoint and nothing-is-lost tests run the
commands in (issue 24), and the record of what the commands printed.

Each command runs in the test's process through `freeseg.errors.run_cli`, exactly as `python
SCRIPT ARGS` runs it, inside a folder holding a tiny toy world (12 images of 64 px), a tiny CLIP
written without training, prompt / all-task checkpoints of 2 iterations and malicious files.
With FREESEG_RELIABILITY_TABLE=PATH set, the lines the recorded cases printed are written to
PATH as the Markdown tables of docs/reliability.md. Test modules import the fixtures `world`,
`in_world` and `reliability_table` from here.
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
T, E, D, P, K, B = "train", "evaluate", "demo", "prepare_data", "converter", "bench"
ALL = ["--checkpoint", "alltask/checkpoint.pt"]
PROMPT_STAGE = TOY + ["--stage", "prompt", "--set", *FAST]
ALLTASK_STAGE = TOY + ["--stage", "alltask", "--init", "prompt/checkpoint.pt", "--set", *ALLTASK]


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


@pytest.fixture(scope="session")
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
def in_world(world, reliability_table, monkeypatch):
    monkeypatch.chdir(world)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("FREESEG_DEBUG", raising=False)
    return world


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


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


@pytest.fixture(scope="session")
def reliability_table():
    """Write the cases' lines as the Markdown tables of docs/reliability.md once every test that
    recorded one has run, if FREESEG_RELIABILITY_TABLE names a file."""
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

