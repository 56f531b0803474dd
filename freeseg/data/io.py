"""Small file helpers shared by the commands and the data code.

- `atomic_write` / `save_png_atomic` / `save_image_atomic` / `save_json_atomic`: write to a
  temporary file in the same folder, then `os.replace` it into place, so an interrupted command
  never leaves a half-written output behind (a file either exists complete or not at all;
  re-running then skips the finished ones). Files get the permissions the user's umask gives.
- `check_output_file`: an output path checked before any work (folder, extension, inputs).
- `read_rgb_image` / `read_image`: photographs as the user sees them (EXIF orientation applied,
  16-bit and float images converted to 8 bits, transparency on white) / label maps.
- `parallel_map(fn, items, workers, desc)`: a process pool with a one-line progress bar on
  stderr, results in input order.
- `rgb_to_id` / `id_to_rgb` / `mask_bbox`: COCO's panoptic id encoding and box format.
- `DataError`: the one exception the data code raises for missing or malformed inputs; its
  message names the file and what was expected (a `UserError`: commands print it as one line).

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
from PIL import Image, ImageOps

from freeseg.errors import UserError


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


class DataError(UserError, ValueError):
    """A dataset file is missing or malformed; the message names the file and the expectation."""


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; on success rename it to `path`.

    On an exception (SIGINT and SIGTERM included, see freeseg/errors.py) the temporary file is
    removed and `path` is left untouched. The file gets the mode a plain `open` would give it:
    mkstemp creates it readable by its owner only (0600), whatever the umask.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image atomically, in the format its extension names (check_output_file checks it)."""
    path = os.fspath(path)
    with atomic_write(path) as f:
        image.save(f, format=Image.registered_extensions()[os.path.splitext(path)[1].lower()])


def save_json_atomic(obj: Any, path: str) -> None:
    # json.dumps uses the C encoder; json.dump to a file falls back to the slow Python one.
    text = json.dumps(obj)
    with atomic_write(path, "w") as f:
        f.write(text)


def read_text_file(path: str, what: str = "text file") -> str:
    """Read a UTF-8 text file, turning a missing or undecodable file into a DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"missing {what}: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_json(path: str, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or unparsable file into a DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"missing {what}: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def _to_8_bits(img: Image.Image, path: str) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image as 8 bits, the way a viewer shows it:
    integers over the full 16-bit range 0-65535 (PIL's own conversion clips them at 255),
    floats in 0-1 or 0-255. Anything else is refused rather than guessed."""
    a = np.asarray(img, dtype=np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{path}: float image with NaN or infinite values; save it as 8-bit RGB")
    if img.mode == "F":
        if a.min(initial=0) < 0 or a.max(initial=0) > 255:
            raise DataError(f"{path}: float image with values outside 0-1 and 0-255 (min {a.min():g}, "
                            f"max {a.max():g}); save it as 8-bit RGB")
        a = a * 255 if a.max(initial=0) <= 1 else a
    elif a.min(initial=0) < 0 or a.max(initial=0) > 65535:
        raise DataError(f"{path}: {img.mode} image with values outside 0-65535; save it as 8-bit RGB")
    else:
        a = a / 257.0  # 65535 -> 255
    return Image.fromarray(np.round(a).astype(np.uint8), mode="L")


def _as_rgb(img: Image.Image, path: str) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8_bits(img, path)
    if img.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):  # transparency composited on white
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise DataError(f"{path}: cannot convert a {img.mode} image to RGB ({err})") from None


def _decode(path: str, convert) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"missing image file: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not later
            # Turned as its EXIF orientation says, as viewers show it (and detectron2 reads it).
            return np.asarray(convert(ImageOps.exif_transpose(img)))
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports a broken PNG chunk as SyntaxError and an absurd header as a "bomb".
        raise DataError(f"{path}: cannot decode image ({err})") from None


def read_image(path: str, mode: str | None = None) -> np.ndarray:
    """Decode a label map (or any image whose stored values matter) to a numpy array, EXIF
    orientation applied, optionally converted to the PIL `mode`. Photographs: `read_rgb_image`.

    A missing or undecodable file raises a DataError naming it.
    """
    return _decode(path, lambda img: img if mode is None or img.mode == mode else img.convert(mode))


def read_rgb_image(path: str) -> np.ndarray:
    """A photograph as the user sees it: (H, W, 3) uint8 RGB from any file PIL reads, EXIF
    orientation applied, grayscale replicated, palette mapped, transparency composited on
    white, 16-bit and float images scaled to 8 bits. What cannot be converted faithfully (a
    float image outside 0-255, say) is a DataError naming the file, as is an unreadable file.
    The array is writable, so `torch.from_numpy` can take it as it is."""
    rgb = _decode(path, lambda img: _as_rgb(img, path))
    return rgb if rgb.flags.writeable else rgb.copy()


def check_output_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...],
                      inputs: tuple = ()) -> str:
    """Check, before any work, that `path` can be written as `what`: not a directory, an
    extension of `suffixes`, in a folder that exists or can be created (atomic_write creates
    it) and is writable, and not one of the `inputs` (an output never replaces a file the
    command reads). Returns the path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a directory; give a file name ending in {' or '.join(suffixes)}")
    ext = os.path.splitext(path)[1]
    if ext.lower() not in suffixes:
        raise UserError(f"{what} {path}: unknown extension {ext or '(none)'}; use {' or '.join(suffixes)}")
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise UserError(f"{what} {path} is also an input of this command ({source}); writing it would "
                            "destroy the input: choose another path")
    folder = os.path.dirname(path) or "."
    while not os.path.exists(folder):  # the nearest folder that exists: the rest will be created
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise UserError(f"{what} {path}: {folder} is a file, not a folder")
    if not writable_dir(folder):
        raise UserError(f"{what} {path}: folder {folder} is not writable")
    return path


def writable_dir(folder: str | os.PathLike) -> bool:
    """Whether a file can be created in `folder`, found by creating one (os.access answers yes
    to root even on a read-only file system)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


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
