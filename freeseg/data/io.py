"""Small file helpers shared by the data preparation scripts.

- `atomic_write` / `save_png_atomic` / `save_json_atomic`: write to a temporary file in the same
  folder, then `os.replace` it into place, so an interrupted `prepare_data.py` never leaves a
  half-written output behind (a file either exists complete or not at all; re-running then
  skips the finished ones).
- `parallel_map(fn, items, workers, desc)`: a process pool with a one-line progress bar on
  stderr, results in input order.
- `rgb_to_id` / `id_to_rgb` / `mask_bbox`: COCO's panoptic id encoding and box format.
- `DataError`: the one exception the data code raises for missing or malformed inputs; its
  message names the file and what was expected.

Not in the official FreeSeg code, whose preparation scripts write files in place.
"""

import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (H, W, 3) uint8 -> (H, W) int64 segment ids: id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> COCO panoptic (H, W, 3) uint8 (the inverse of `rgb_to_id`)."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO box [x, y, w, h] of a non-empty (H, W) boolean mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the expectation."""


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; on success rename it to `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_png_atomic(array: np.ndarray, path: str) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as a lossless PNG, atomically."""
    if array.dtype != np.uint8:
        raise TypeError(f"{path}: PNG data must be uint8, got {array.dtype}")
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")


def save_json_atomic(obj: Any, path: str) -> None:
    # json.dumps uses the C encoder; json.dump to a file falls back to the slow Python one.
    text = json.dumps(obj)
    with atomic_write(path, "w") as f:
        f.write(text)


def load_json(path: str, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or unparsable file into a DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"missing {what}: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def read_image(path: str, mode: str | None = None) -> np.ndarray:
    """Decode an image file to a numpy array (optionally converting the PIL mode).

    A missing or undecodable file raises a DataError naming it.
    """
    if not os.path.isfile(path):
        raise DataError(f"missing image file: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not later
            if mode is not None and img.mode != mode:
                img = img.convert(mode)
            return np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from None


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"missing {what}: expected a directory at {path}")
    return path


class _Progress:
    """A single stderr line `desc: 120/2000 [6%] 3.1s`, redrawn at most ten times a second."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.start = self.last = time.monotonic()
        self.enabled = bool(desc)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            pct = 100 * self.done // max(self.total, 1)
            sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} [{pct}%] {now - self.start:.1f}s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 1, desc: str = "") -> list:
    """`[fn(x) for x in items]` over `workers` processes, in order, with a progress bar.

    `fn` must be picklable (a module-level function or a functools.partial of one). With
    workers <= 1 everything runs in this process, which keeps tracebacks simple. An exception
    in a worker is re-raised here unchanged (a DataError keeps its message).
    """
    items = list(items)
    bar = _Progress(len(items), desc)
    if workers <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(fn(item))
            bar.update()
        return results
    # Small chunks keep the bar moving; "fork" is the cheap default on Linux, "spawn" elsewhere.
    chunk = max(1, min(16, len(items) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        results = []
        for res in pool.imap(fn, items, chunksize=chunk):
            results.append(res)
            bar.update()
    return results
