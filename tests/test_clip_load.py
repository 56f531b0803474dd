"""`freeseg.clip.load`: every accepted checkpoint kind gives the same model; bad files give clear errors;
preprocessing matches CLIP's normalisation. A tiny CLIP of our own stands in for OpenAI's files
(parity with OpenAI's code on real shapes is in test_clip_model.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from freeseg.clip import CLIP, CLIP_MEAN, CLIP_STD, load
from freeseg.errors import CheckpointError

# Tracing and saving TorchScript (how OpenAI's archives are made) warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning",
                                        "ignore:pkg_resources is deprecated:UserWarning")

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
            context_length=16, vocab_size=600, transformer_width=64, transformer_heads=1, transformer_layers=1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CLIP(**TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(0, 598, (3, 16))
    tokens[:, 9] = 599
    return model, images, tokens


def outputs(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens), model(images, tokens)[0]


@pytest.mark.parametrize("kind", ["plain", "state_dict", "model", "torchscript"])
def test_checkpoint_kinds(tiny, tmp_path, kind):
    model, images, tokens = tiny
    path = tmp_path / f"{kind}.pt"
    if kind == "torchscript":
        torch.jit.save(torch.jit.trace(model, (images, tokens)), str(path))
    else:
        state = model.state_dict()
        torch.save(state if kind == "plain" else {kind: state, "iteration": 7}, path)
    loaded, preprocess = load(str(path), device="cpu")
    assert loaded.input_resolution == 32 and not loaded.training
    for ours, expected in zip(outputs(loaded, images, tokens), outputs(model, images, tokens)):
        assert torch.equal(ours, expected)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt.*ViT-B/16"):
        load(tmp_path / "absent.pt")


@pytest.mark.parametrize("kind", ["torchscript", "plain"])
def test_truncated_archive(tiny, tmp_path, kind):
    model, images, tokens = tiny
    full = tmp_path / "full.pt"
    if kind == "torchscript":
        torch.jit.save(torch.jit.trace(model, (images, tokens)), str(full))
    else:
        torch.save(model.state_dict(), full)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*(unreadable|truncated)"):
        load(truncated)


def test_corrupt_file(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="noise.pt.*unreadable"):
        load(path)


def test_wrong_kind_of_checkpoint(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}
    torch.save(resnet, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"resnet.pt is not a CLIP checkpoint: missing keys .*token_embedding.weight"
                                         r".*visual.proj or visual.attnpool.positional_embedding.*conv1.weight"):
        load(tmp_path / "resnet.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="tensor.pt: expected a state dict, found a Tensor"):
        load(tmp_path / "tensor.pt")


def test_preprocess(tiny, tmp_path):
    model, _, _ = tiny
    torch.save(model.state_dict(), tmp_path / "m.pt")
    _, preprocess = load(tmp_path / "m.pt")
    # A grey (L mode) 60x40 image: converted to RGB, shorter side resized to 32, center-cropped.
    x = preprocess(Image.new("L", (60, 40), color=128))
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, expected[:, None, None].expand(3, 32, 32), atol=1e-6)
    # The crop is centered: a bright 20-pixel band in the middle of a 96x32 image is what remains.
    image = np.zeros((32, 96, 3), dtype=np.uint8)
    image[:, 38:58] = 255
    x = preprocess(Image.fromarray(image))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, :, 8:24], ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None, None],
                          atol=1e-2)
    assert x[:, :, :4].max() < x[:, :, 8:24].min()
