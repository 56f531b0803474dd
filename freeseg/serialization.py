"""Reading weight files without running code from them.

A pickle can call any Python function while it is read (`os.system` included), and torch
files, TorchScript archives and detectron2's `.pkl` weights are all pickles. So no file is
ever fully unpickled here, unless the user says they trust it (`trust_files(True)`, set by
the commands' `--trust-checkpoint`):

- `load_torch_file`: files written by `torch.save`, ours included, through
  `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only. Our
  checkpoints hold nothing else (engine.rng_state stores NumPy's generator as a tensor);
  NumPy arrays are also accepted, as checkpoints written before that did hold one.
- `read_torchscript_state_dict`: OpenAI's CLIP archives. The module objects in the archive's
  `data.pkl` are rebuilt as inert records (the archive's code is never compiled or run), the
  tensors from the archive's storages, and the state dict is read off the records with the
  parameter and buffer names that the archive's class declarations list.
- `read_numpy_pickle`: detectron2's `.pkl` weights: NumPy arrays in plain containers.

A file that needs anything else is refused with a `CheckpointError` that names the file and
the Python object it would have built, and says how to proceed if the file is trusted.

Not in the official code, which fully unpickles every file it reads (checkpoints, detectron2
weights, and OpenAI's CLIP archives through TorchScript's loader).
"""

import codecs
import collections
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freeseg.errors import CheckpointError, MissingFileError

_trusted = False


def trust_files(enabled: bool) -> None:
    """Allow full unpickling (code in the file runs) for the rest of this process: `--trust-checkpoint`."""
    global _trusted
    _trusted = bool(enabled)


def _refusal(path: Path, what: str, found: str) -> CheckpointError:
    return CheckpointError(
        f"{what} {path}: refused: reading it would build the Python object {found}, which a weights file "
        f"never needs (unpickling a file can run any code in it); if you trust where the file comes from, "
        f"re-run with --trust-checkpoint")


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    return path


# ---------------------------------------------------------------- torch.save files


def _numpy_array_globals() -> list:
    """What unpickling a NumPy array calls: the array reconstructor, ndarray, dtypes."""
    dtype_classes = [type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int32, np.int64, np.uint32,
                                                  np.float16, np.float32, np.float64)]
    return [_MULTIARRAY._reconstruct, np.ndarray, np.dtype, *dtype_classes]


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding `<name>/constants.pkl` (a torch.save zip does not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # not a zip at all, or a broken one: whoever reads it reports it


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """`torch.load` of a file written by `torch.save`, on the CPU, rebuilding only tensors,
    NumPy arrays and plain containers. Raises CheckpointError naming the file when it is
    unreadable, a TorchScript archive, or holds any other object (unless files are trusted)."""
    path = _require_file(path, what)
    if is_torchscript(path):
        raise CheckpointError(f"{what} {path} is a TorchScript archive (an OpenAI CLIP file?), not a torch.save file")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=not _trusted)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise _refusal(path, what, found.group(1)) from None
        raise _unreadable(path, what, None) from None
    except Exception as err:  # whatever a damaged file makes torch.load raise (KeyError, struct.error, ...)
        raise _unreadable(path, what, err) from None


def _unreadable(path: Path, what: str, err: BaseException | None) -> CheckpointError:
    """The file is not a whole torch.save file; torch's own reason is kept when it says something
    (its zip reader's first sentence), not when it is an unpickler's stray key or offset."""
    reason = ""
    if isinstance(err, (RuntimeError, OSError, EOFError)) and str(err).strip():
        reason = f" ({str(err).strip().splitlines()[0].split('. ')[0][:120]})"
    return CheckpointError(f"{what} {path} is unreadable: truncated, damaged or not a torch.save file{reason}")


# ---------------------------------------------------------------- restricted unpickling


class _Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _ScriptObject:
    """An inert stand-in for a TorchScript class instance: it records its attributes."""

    def __init__(self, *args: Any) -> None:
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = dict(state) if isinstance(state, dict) else {}


class _StorageType:
    """Stands for `torch.FloatStorage` & co. in a storage reference: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *unused) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 over a flat tensor standing for the storage."""
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *unused) -> torch.Tensor:
    return data


def _identity(value: Any, *unused) -> Any:
    return value


_MULTIARRAY = (getattr(np, "_core", None) or np.core).multiarray
# NumPy 2 pickles arrays under numpy._core, NumPy 1 (and detectron2's files) under numpy.core.
_NUMPY_GLOBALS = {
    **{(m, name): getattr(_MULTIARRAY, name)
       for m in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell bytes
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_TORCH_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # TorchScript's typed containers: the value itself is what matters here.
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    **{("torch.jit._pickle", f"build_{kind}list"): _identity for kind in ("int", "double", "bool", "tensor")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of `allowed` (and TorchScript classes, as inert records, when
    `script_classes`); any other global stops the reading before anything is called."""

    def __init__(self, file, allowed: dict, storages=None, script_classes: bool = False, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed, self.storages, self.script_classes = allowed, storages, script_classes
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[module, name]
        if self.storages is not None and module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if self.script_classes and (module == "__torch__" or module.startswith("__torch__.")):
            key = f"{module}.{name}"
            if key not in self.classes:  # one record type per TorchScript class, named after it
                self.classes[key] = type(name, (_ScriptObject,), {"qualified_name": key})
            return self.classes[key]
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if self.storages is None or not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise _Refused(f"persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        return self.storages(str(key), storage_type.dtype)


def read_numpy_pickle(path: str | os.PathLike, what: str = "weights file") -> Any:
    """Unpickle a file of NumPy arrays in plain containers (detectron2's `.pkl` weights);
    anything else is refused unless files are trusted."""
    path = _require_file(path, what)
    with open(path, "rb") as f:
        try:
            if _trusted:
                return pickle.Unpickler(f, encoding="latin1").load()
            # latin1: pickles written by Python 2 NumPy (detectron2's ImageNet models)
            return _RestrictedUnpickler(f, _NUMPY_GLOBALS, encoding="latin1").load()
        except _Refused as err:
            raise _refusal(path, what, err.name) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise CheckpointError(f"{what} {path} is unreadable (truncated or not a pickle): {err}") from None


# ---------------------------------------------------------------- TorchScript archives


def _declared_tensors(archive: zipfile.ZipFile, prefix: str) -> dict[str, list[str]]:
    """{qualified class name: its parameter and buffer names}, from the class declarations
    in the archive's `code/` folder (`__parameters__ = ["weight", "bias", ]`, `__buffers__`)."""
    declared = {}
    for name in archive.namelist():
        if not (name.startswith(f"{prefix}/code/") and name.endswith(".py")):
            continue
        module = name[len(f"{prefix}/code/"):-len(".py")].replace("/", ".")
        text = archive.read(name).decode("utf-8", "replace")
        for cls, body in re.findall(r"^class (\w+)\(.*?\):\n((?:[ \t]+.*\n?)*)", text, flags=re.M):
            lists = dict(re.findall(r"^\s+(__parameters__|__buffers__) = \[(.*?)\]", body, flags=re.M))
            if lists:
                declared[f"{module}.{cls}"] = [n for key in ("__parameters__", "__buffers__")
                                               for n in re.findall(r'"([^"]+)"', lists.get(key, ""))]
    return declared


def _collect(obj: _ScriptObject, declared: dict[str, list[str]], prefix: str, out: dict, path: Path) -> None:
    names = declared.get(obj.qualified_name)
    if names is None:
        raise CheckpointError(f"TorchScript archive {path}: class {obj.qualified_name} declares no parameters "
                              "or buffers (an archive layout this reader does not know)")
    for name in names:
        value = obj.attributes.get(name)
        if value is not None:  # an optional parameter left at None (a Linear without bias)
            out[prefix + name] = value
    for name, value in obj.attributes.items():
        if isinstance(value, _ScriptObject):
            _collect(value, declared, f"{prefix}{name}.", out, path)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict TorchScript's own loader would give (`state_dict()` of the loaded module),
    read without TorchScript: same names, same tensors, on the CPU."""
    path = _require_file(path, "TorchScript archive")
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"TorchScript archive {path} has no data.pkl at its top level")
            prefix = pkl[0].split("/")[0]
            order = archive.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in archive.namelist() else "little"
            if order != "little":
                raise CheckpointError(f"TorchScript archive {path}: {order}-endian tensors are not supported")

            def storage(key: str, dtype: torch.dtype) -> torch.Tensor:
                data = bytearray(archive.read(f"{prefix}/data/{key}"))  # a writable copy for frombuffer
                return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)

            unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])), _TORCH_GLOBALS, storage, script_classes=True)
            root = unpickler.load()
            declared = _declared_tensors(archive, prefix)
    except _Refused as err:
        raise CheckpointError(f"TorchScript archive {path}: refused: its data.pkl names the Python object {err.name}, "
                              "which no TorchScript archive holds (a file made to run code when loaded?)") from None
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError,
            RuntimeError, IndexError, AttributeError) as err:  # what a damaged archive makes the reading raise
        raise CheckpointError(f"TorchScript archive {path} is unreadable (truncated or damaged): {err}") from None
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"TorchScript archive {path} holds no module")
    state: dict[str, torch.Tensor] = {}
    _collect(root, declared, "", state, path)
    return state
