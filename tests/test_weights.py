"""The download helper against a local HTTP server on 127.0.0.1 (never the internet)."""

import functools
import hashlib
import http.server
import importlib.util
import socket
import threading
from pathlib import Path

import pytest
import torch

from freeseg import weights
from freeseg.clip import CLIP, load


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        _QuietHandler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    """(served folder, base URL, list of requested paths) of a server running in a thread."""
    root = tmp_path / "served"
    root.mkdir()
    _QuietHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", _QuietHandler.requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_download_and_cache_hit(server, tmp_path, capsys):
    root, base, requests = server
    data = bytes(range(256)) * 1000
    (root / "blob.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    path = weights.download(f"{base}/blob.bin", sha, cache=cache)
    assert path == cache / "blob.bin" and path.read_bytes() == data
    assert "downloading blob.bin: 100.0% of 0.2 MB" in capsys.readouterr().err
    assert weights.download(f"{base}/blob.bin", sha, cache=cache, progress=False) == path
    assert requests == ["/blob.bin"]  # the second call was served from the cache
    path.write_bytes(b"damaged")  # a damaged cached file is fetched again
    assert weights.download(f"{base}/blob.bin", sha, cache=cache, progress=False).read_bytes() == data
    assert len(requests) == 2 and not leftovers(cache)


def test_cache_dir_from_environment(server, tmp_path, monkeypatch):
    root, base, _ = server
    (root / "a.txt").write_bytes(b"abc")
    monkeypatch.setenv("FREESEG_CACHE", str(tmp_path / "env-cache"))
    path = weights.download(f"{base}/a.txt", hashlib.sha256(b"abc").hexdigest(), progress=False)
    assert path == tmp_path / "env-cache" / "a.txt"


def test_checksum_mismatch(server, tmp_path):
    root, base, _ = server
    (root / "blob.bin").write_bytes(b"not what was published")
    cache = tmp_path / "cache"
    got = hashlib.sha256(b"not what was published").hexdigest()
    with pytest.raises(weights.DownloadError, match=f"blob.bin: expected {'0' * 64}, got {got}; the file was deleted"):
        weights.download(f"{base}/blob.bin", "0" * 64, cache=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_unreachable_and_missing(server, tmp_path):
    _, base, _ = server
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ViT-B-16.pt"
    with pytest.raises(weights.DownloadError, match=f"could not download {url}.*offline"):
        weights.download(url, "0" * 64, cache=tmp_path / "cache", progress=False)
    with pytest.raises(weights.DownloadError, match=f"could not download {base}/absent.bin.*404"):
        weights.download(f"{base}/absent.bin", "0" * 64, cache=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(ValueError, match="needs its sha256"):
        weights.download(f"{base}/x.bin")
    with pytest.raises(ValueError, match="unknown file 'ViT-H/99'"):
        weights.download("ViT-H/99")


def test_known_files():
    # OpenAI's model addresses embed the SHA-256 of the file.
    for name in weights.CLIP_MODELS:
        known = weights.KNOWN_FILES[name]
        assert known.url.split("/")[-2] == known.sha256 and known.url.startswith("https://openaipublic")
    assert {"ViT-B/16", "ViT-B/32", "ViT-L/14", "RN50", "RN101"} <= set(weights.CLIP_MODELS)
    spec = importlib.util.find_spec("clip")
    assert spec is not None, "clip-anytorch, the test oracle, is missing: pip install -e '.[test]'"
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    assert weights.sha256_of(bpe) == weights.KNOWN_FILES["bpe_simple_vocab_16e6"].sha256


def test_load_by_name(server, tmp_path, monkeypatch):
    """`load("ViT-B/16")` downloads, verifies and builds (here a tiny CLIP served locally)."""
    root, base, requests = server
    torch.manual_seed(0)
    model = CLIP(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=8, vocab_size=520, transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(model.state_dict(), root / "ViT-B-16.pt")
    sha = weights.sha256_of(root / "ViT-B-16.pt")
    monkeypatch.setitem(weights.KNOWN_FILES, "ViT-B/16", weights.KnownFile(f"{base}/ViT-B-16.pt", sha))
    monkeypatch.setenv("FREESEG_CACHE", str(tmp_path / "cache"))
    loaded, _ = load("ViT-B/16")
    assert requests == ["/ViT-B-16.pt"] and (tmp_path / "cache" / "ViT-B-16.pt").is_file()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
