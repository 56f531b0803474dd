"""Load a CLIP checkpoint into our model: `load(name_or_path) -> (model, preprocess)`.

Accepted inputs:
- an OpenAI TorchScript archive (the `.pt` files OpenAI publishes are TorchScript): its tensors
  are read by `freeseg.serialization.read_torchscript_state_dict`, which neither runs the
  archive's TorchScript nor unpickles anything but tensors and inert records of its modules;
  we build our own module from them;
- a plain state dict written by `torch.save`, or a dict holding it under "state_dict" or "model";
- a known model name ("ViT-B/16", ...), downloaded and checked by `freeseg.weights`.

The two file kinds are told apart by their zip entries (a TorchScript archive holds
`constants.pkl` and `code/`), not by trying one loader and falling back on any error, so a
corrupt file is reported as corrupt rather than as "the other kind". Neither kind is ever
fully unpickled: a file that would need it is refused (freeseg/serialization.py).

Differences from OpenAI's `clip.load`: no `jit=True` path, and the model is always float32.
"""

from pathlib import Path
from typing import Callable

import torch
from torchvision import transforms

from freeseg import weights
from freeseg.clip.model import CLIP, CLIP_MEAN, CLIP_STD, build_model, missing_clip_keys
from freeseg.errors import CheckpointError, MissingFileError
from freeseg.serialization import is_torchscript, load_torch_file, read_torchscript_state_dict


def _read_state_dict(path: Path) -> dict:
    """The tensors of a TorchScript archive or of a `torch.save` file, on the CPU."""
    if is_torchscript(path):
        return read_torchscript_state_dict(path)
    obj = load_torch_file(path, "CLIP checkpoint")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
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
            raise MissingFileError(f"no CLIP checkpoint at {path} (known model names: {list(weights.CLIP_MODELS)})")
    state_dict = _read_state_dict(path)
    missing = missing_clip_keys(state_dict)
    if missing:
        found = list(state_dict)[:5]
        raise CheckpointError(f"{path} is not a CLIP checkpoint: missing keys {missing} (its first keys: {found})")
    model = build_model(state_dict).to(device)
    return model, preprocess_transform(model.input_resolution)
