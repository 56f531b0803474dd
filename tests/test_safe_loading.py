"""Reading weight files never runs code from them (freeseg/serialization.py, issue 24).

- TorchScript archives (OpenAI's CLIP format): the state dict read without TorchScript equals
  `torch.jit.load(...).state_dict()`, name for name and bit for bit, for archives traced from
  our tiny CLIP (both image towers) and for a scripted module with half-precision parameters,
  buffers, a plain tensor attribute and nested modules; an archive whose data.pkl calls a
  Python function is refused and the function never runs.
- detectron2 `.pkl` weights: NumPy arrays in plain containers are read (protocols 2 and 4,
  OrderedDict, NumPy scalars); anything else is refused unless files are trusted.
- torch.save files: our checkpoints load with weights_only=True; those written before the
  NumPy generator state was stored as a tensor still load and still restore the generator.
"""

import collections
import os
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from freeseg import engine, serialization
from freeseg.clip import CLIP
from freeseg.errors import CheckpointError
from freeseg.serialization import load_torch_file, read_numpy_pickle, read_torchscript_state_dict, trust_files

# Tracing and saving TorchScript (how OpenAI's archives are made) warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning",
                                        "ignore::DeprecationWarning")

TINY = dict(embed_dim=32, image_resolution=32, vision_width=64, context_length=16, vocab_size=600,
            transformer_width=64, transformer_heads=1, transformer_layers=1)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _untrusted():
    trust_files(False)
    yield
    trust_files(False)


def _assert_same_state(ours: dict, reference: dict) -> None:
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


# ---------------------------------------------------------------- TorchScript archives


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_traced_clip_archive_reads_as_jit_load_does(tmp_path, tower):
    torch.manual_seed(0)
    model = CLIP(**TINY, vision_layers=1 if tower == "vit" else (1, 1, 1, 1),
                 vision_patch_size=8 if tower == "vit" else None).eval()
    tokens = torch.randint(0, 598, (2, 16))
    tokens[:, 5] = 599
    path = tmp_path / "clip.pt"
    torch.jit.save(torch.jit.trace(model, (torch.randn(2, 3, 32, 32), tokens)), str(path))
    _assert_same_state(read_torchscript_state_dict(path), dict(torch.jit.load(str(path)).state_dict()))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(4, 4)
        self.ln_1 = nn.LayerNorm(4)
        self.register_buffer("position_ids", torch.arange(4.0))
        self.attn_mask = torch.ones(2, 2)  # a plain attribute (OpenAI's blocks hold their mask so): no state
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.proj = nn.Linear(4, 4, bias=False)  # an absent bias

    def forward(self, x):
        return self.proj(self.ln_1(self.c_fc(x)) * self.scale + self.position_ids + self.attn_mask.sum())


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.resblocks = nn.Sequential(_Block(), _Block())
        self.token_embedding = nn.Embedding(5, 4)
        self.text_projection = nn.Parameter(torch.randn(4, 3).half())  # OpenAI's archives are fp16

    def forward(self, x):
        return self.resblocks(x)


def test_scripted_archive_reads_as_jit_load_does(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_Model()), str(path))
    ours = read_torchscript_state_dict(path)
    _assert_same_state(ours, dict(torch.jit.load(str(path)).state_dict()))
    assert ours["text_projection"].dtype == torch.float16 and "resblocks.0.attn_mask" not in ours


def test_torchscript_archive_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil(marker), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: its data.pkl names the Python object posix.system"):
        read_torchscript_state_dict(path)
    assert not marker.exists()


def test_truncated_torchscript_archive_is_named(tmp_path):
    torch.manual_seed(0)
    full = tmp_path / "full.pt"
    torch.jit.save(torch.jit.script(_Model()), str(full))
    cut = tmp_path / "cut.pt"
    data = full.read_bytes()
    with zipfile.ZipFile(full) as z:  # keep the directory, damage a storage's bytes
        info = z.getinfo("full/data/0")
    cut.write_bytes(data[:info.header_offset + 10] + data[info.header_offset + 10 + 8:])
    with pytest.raises(CheckpointError, match="cut.pt"):
        read_torchscript_state_dict(cut)


# ---------------------------------------------------------------- detectron2 pickles


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_pickle_reads_arrays_scalars_and_containers(tmp_path, protocol):
    weights = collections.OrderedDict([("res2.0.conv1.weight", np.arange(6, dtype=np.float32).reshape(2, 3)),
                                       ("res2.0.conv1.norm.bias", np.zeros(2, dtype=np.float64))])
    data = {"model": weights, "__author__": "Detectron", "matching_heuristics": True, "scale": np.float32(0.5)}
    path = tmp_path / "R-test.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    read = read_numpy_pickle(path)
    assert list(read["model"]) == list(weights) and read["__author__"] == "Detectron"
    for key, value in weights.items():
        assert read["model"][key].dtype == value.dtype and np.array_equal(read["model"][key], value)
    assert read["scale"] == np.float32(0.5)


def test_numpy_pickle_refuses_anything_else_unless_trusted(tmp_path):
    from fractions import Fraction

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"w": _Evil(marker)}}))
    with pytest.raises(CheckpointError, match=r"evil.pkl: refused: .*posix.system.*--trust-checkpoint"):
        read_numpy_pickle(evil)
    assert not marker.exists()
    odd = tmp_path / "odd.pkl"
    odd.write_bytes(pickle.dumps({"model": {"w": Fraction(1, 3)}}))
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        read_numpy_pickle(odd)
    trust_files(True)
    assert read_numpy_pickle(odd)["model"]["w"] == Fraction(1, 3)


def test_truncated_numpy_pickle_is_named(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.ones(100)}})[:50])
    with pytest.raises(CheckpointError, match="cut.pkl is unreadable"):
        read_numpy_pickle(path)


# ---------------------------------------------------------------- torch.save files


def test_torch_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"model": {}, "x": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint .*evil.pt: refused: .*posix.system"):
        load_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_rng_state_is_plain_and_restores_every_generator(tmp_path):
    engine.seed_everything(3)
    np.random.rand(5)  # move NumPy's position inside its key
    engine.save_checkpoint(tmp_path / "c.pt", model={}, rng=engine.rng_state())
    want = (torch.rand(3), np.random.rand(3), np.random.randn(2), random.random())
    state = torch.load(tmp_path / "c.pt", weights_only=True)["rng"]  # no safe globals needed
    engine.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), np.random.randn(2), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and np.array_equal(want[2], got[2])
    assert want[3] == got[3]


def test_checkpoint_written_before_the_plain_rng_state_still_loads_and_resumes(tmp_path):
    """Checkpoints of earlier versions pickled NumPy's state tuple (an ndarray inside): they load
    with only NumPy's array reconstructor allowed, and restore the generator."""
    engine.seed_everything(5)
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"model": {"w": torch.ones(1)}, "rng": legacy, "iteration": 3}, tmp_path / "old.pt")
    want = np.random.rand(4)
    ckpt = engine.load_checkpoint(tmp_path / "old.pt")
    engine.set_rng_state(ckpt["rng"])
    assert np.array_equal(np.random.rand(4), want)


def test_trust_allows_a_full_unpickle(tmp_path):
    from fractions import Fraction

    torch.save({"model": {}, "note": Fraction(2, 3)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        engine.load_checkpoint(tmp_path / "c.pt")
    trust_files(True)
    assert engine.load_checkpoint(tmp_path / "c.pt")["note"] == Fraction(2, 3)


def test_torchscript_given_as_a_checkpoint_is_named(tmp_path):
    torch.jit.save(torch.jit.script(_Model()), str(tmp_path / "s.pt"))
    assert serialization.is_torchscript(tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="s.pt is a TorchScript archive"):
        engine.load_checkpoint(tmp_path / "s.pt")
