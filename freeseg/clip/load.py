"""Load a CLIP checkpoint into our model: `load(name_or_path) -> (model, preprocess)`.

Accepted inputs:
- an OpenAI TorchScript archive (the `.pt` files OpenAI publishes are TorchScript; we only take
  their `state_dict()` and build our own module, so no TorchScript code runs);
- a plain state dict written by `torch.save`, or a dict holding it under "state_dict" or "model";
- a known model name ("ViT-B/16", ...), downloaded and checked by `freeseg.weights`.

The two file kinds are told apart by their zip entries (a TorchScript archive holds
`constants.pkl` and `code/`), not by trying one loader and falling back on any error, so a
corrupt file is reported as corrupt rather than as "the other kind".

Differences from OpenAI's `clip.load`: no `jit=True` path, and the model is always float32.
"""

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torchvision import transforms

from freeseg import weights
from freeseg.clip.model import CLIP, CLIP_MEAN, CLIP_STD, build_model, missing_clip_keys


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read_state_dict(path: Path) -> dict:
    """The tensors of a TorchScript archive or of a `torch.save` file, on the CPU."""
    try:
        if zipfile.is_zipfile(path) and _is_torchscript(path):
            with warnings.catch_warnings():
                # torch deprecates TorchScript, but OpenAI publishes its weights in that format.
                warnings.filterwarnings("ignore", category=FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        # weights_only: a checkpoint is data; never run code from a downloaded pickle.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise RuntimeError(f"{path}: cannot read this checkpoint; is the file truncated or corrupt? ({e})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    return obj


def _to_rgb(image):
    # A named function rather than a lambda keeps the transform picklable for DataLoader workers.
    return image.convert("RGB")


def preprocess_transform(resolution: int) -> Callable:
    """PIL image -> CLIP-normalised float tensor (3, R, R): resize the shorter side to R (bicubic),
    center crop, scale to 0-1, normalise with CLIP's mean/std (OpenAI, clip/clip.py, `_transform`)."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        _to_rgb,
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def load(name_or_path: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, Callable]:
    """A float32 CLIP in eval mode on `device`, and the matching image preprocessing."""
    if str(name_or_path) in weights.CLIP_MODELS:
        path = weights.download(str(name_or_path))
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no CLIP checkpoint at {path} (known model names: {list(weights.CLIP_MODELS)})")
    state_dict = _read_state_dict(path)
    missing = missing_clip_keys(state_dict)
    if missing:
        found = list(state_dict)[:5]
        raise ValueError(f"{path} is not a CLIP checkpoint: missing keys {missing} (its first keys: {found})")
    model = build_model(state_dict).to(device)
    return model, preprocess_transform(model.input_resolution)
