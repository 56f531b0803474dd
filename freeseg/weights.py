"""Download helper for the published files FreeSeg needs: OpenAI's CLIP checkpoints and BPE vocabulary.

Each known file has its official address and SHA-256. A download goes to a temporary file in the
cache folder and is renamed into place only once its checksum matches, so an interrupted or
corrupted download never looks like a cached file. A cached file is checked again on every use
(as OpenAI's `clip.load` does): hashing ViT-B/16's 335 MB takes about a second.

Cache folder: `$FREESEG_CACHE`, else `~/.cache/freeseg`.
"""

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_OPENAI = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class KnownFile:
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _openai_model(sha256: str, filename: str) -> KnownFile:
    # OpenAI's model addresses embed the file's SHA-256 as the last folder (clip/clip.py, _MODELS).
    return KnownFile(f"{_OPENAI}/{sha256}/{filename}", sha256)


KNOWN_FILES: dict[str, KnownFile] = {
    "RN50": _openai_model("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": _openai_model("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": _openai_model("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "ViT-B/32": _openai_model("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": _openai_model("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": _openai_model("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    # The BPE merges of OpenAI's tokenizer, from the openai/CLIP repository; checksum computed
    # from the identical copy that the clip-anytorch package ships.
    "bpe_simple_vocab_16e6": KnownFile(
        "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz",
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"),
}
CLIP_MODELS = tuple(name for name in KNOWN_FILES if KNOWN_FILES[name].filename.endswith(".pt"))


class DownloadError(RuntimeError):
    """A download that could not be made or whose checksum did not match."""


def cache_dir() -> Path:
    return Path(os.environ.get("FREESEG_CACHE") or Path.home() / ".cache" / "freeseg")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(filename: str, done: int, total: int | None) -> None:
    mb = done / 2 ** 20
    text = f"{100 * done / total:5.1f}% of {total / 2 ** 20:.1f} MB" if total else f"{mb:.1f} MB"
    sys.stderr.write(f"\rdownloading {filename}: {text}")
    sys.stderr.flush()


def _fetch(url: str, tmp: Path, target: Path, progress: bool, timeout: float) -> None:
    """Stream `url` into the temporary file `tmp` (which the caller removes on failure)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            done = 0
            while chunk := response.read(1 << 16):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    _progress(target.name, done, total)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"could not download {url}: {e}. If this machine is offline, fetch the file "
                            f"elsewhere and copy it to {target}") from e
    finally:
        if progress:
            sys.stderr.write("\n")


def download(name_or_url: str, sha256: str | None = None, cache: str | Path | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Path of the verified local copy of a known file (a name of `KNOWN_FILES`) or of a URL,
    downloaded into the cache folder if it is not there yet.

    A URL needs its `sha256`; a known name brings its own. Raises `DownloadError` when the
    address cannot be reached (naming it) or when the checksum differs (expected vs got; the
    bad file is deleted).
    """
    if name_or_url in KNOWN_FILES:
        known = KNOWN_FILES[name_or_url]
        url, sha256 = known.url, sha256 or known.sha256
    elif "://" in name_or_url:
        url = name_or_url
        if not sha256:
            raise ValueError(f"download of {url} needs its sha256")
    else:
        raise ValueError(f"unknown file {name_or_url!r}: give a URL or one of {sorted(KNOWN_FILES)}")
    folder = Path(cache) if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / url.rsplit("/", 1)[-1]
    if target.is_file():
        if sha256_of(target) == sha256:
            return target
        sys.stderr.write(f"{target} does not match its SHA-256; downloading it again\n")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _fetch(url, tmp, target, progress, timeout)
        got = sha256_of(tmp)
        if got != sha256:
            raise DownloadError(f"SHA-256 mismatch for {url}: expected {sha256}, got {got}; the file was deleted")
        os.replace(tmp, target)  # atomic: the cache never holds an unverified file
    finally:
        tmp.unlink(missing_ok=True)
    return target
