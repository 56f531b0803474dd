"""Tests of the user-facing input handling in `demo.py`: image files of every mode, class lists.

A user hands the demo whatever image they have (grayscale scans, RGBA screenshots, palette GIFs,
16-bit PNGs, float TIFFs, phone photos with an EXIF orientation) and a typed vocabulary; both
must become a clean (H, W, 3) uint8 image, as a viewer shows it, and a list of distinct names,
or stop with a UserError (one line from the command) that names the file or the problem.
"""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freeseg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
demo = importlib.import_module("demo")


def _check_rgb(image: np.ndarray, h: int, w: int) -> None:
    assert image.shape == (h, w, 3) and image.dtype == np.uint8


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    image = demo.read_image(str(tmp_path / "gray.png"))
    _check_rgb(image, 4, 6)
    for c in range(3):
        assert np.array_equal(image[..., c], gray)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept as is
    rgba[0, 1] = (10, 20, 30, 0)  # fully transparent: white, whatever its stored colour
    rgba[0, 2] = (0, 0, 0, 128)  # half transparent black over white: about 127
    rgba[1] = (200, 100, 0, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image = demo.read_image(str(tmp_path / "rgba.png"))
    _check_rgb(image, 2, 3)
    assert image[0, 0].tolist() == [10, 20, 30]
    assert image[0, 1].tolist() == [255, 255, 255]
    assert np.all(np.abs(image[0, 2].astype(int) - 127) <= 1)
    assert np.all(image[1] == [200, 100, 0])


def test_palette_image_maps_indices_to_colours(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(indices, mode="P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (3 * 253))
    img.save(tmp_path / "palette.png")
    image = demo.read_image(str(tmp_path / "palette.png"))
    _check_rgb(image, 2, 2)
    assert image[0, 0].tolist() == [255, 0, 0]
    assert image[0, 1].tolist() == [0, 255, 0] and image[1, 1].tolist() == [0, 255, 0]
    assert image[1, 0].tolist() == [0, 0, 255]


def test_palette_transparency_becomes_white(tmp_path):
    img = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    img.putpalette([0, 0, 0, 40, 50, 60] + [0] * (3 * 254))
    img.info["transparency"] = 0  # index 0 is see-through
    img.save(tmp_path / "transparent.png", transparency=0)
    image = demo.read_image(str(tmp_path / "transparent.png"))
    assert image[0, 0].tolist() == [255, 255, 255] and image[0, 1].tolist() == [40, 50, 60]


def test_16_bit_png_is_scaled_over_the_full_16_bit_range(tmp_path):
    # As a viewer shows it: 0 -> 0, 65535 -> 255, v -> v / 257 (PIL's own conversion clips at 255).
    deep = np.array([[0, 1000, 33768], [65535, 17384, 50152]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")  # PIL reads it back as 16-bit
    image = demo.read_image(str(tmp_path / "deep.png"))
    _check_rgb(image, 2, 3)
    assert np.array_equal(image[..., 0], np.round(deep / 257).astype(np.uint8))
    assert np.array_equal(image[..., 1], image[..., 0]) and np.array_equal(image[..., 2], image[..., 0])


def test_constant_16_bit_image_keeps_its_level(tmp_path):
    Image.fromarray(np.full((3, 3), 4112, dtype=np.uint16)).save(tmp_path / "flat.png")
    image = demo.read_image(str(tmp_path / "flat.png"))
    assert np.all(image == 16)  # 4112 / 257


def test_float_tiff_in_0_1_is_scaled_to_0_255(tmp_path):
    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "float.tif")
    image = demo.read_image(str(tmp_path / "float.tif"))
    assert image[..., 0].tolist() == [[0, 64], [128, 255]]  # not the black image PIL's own convert gives


@pytest.mark.parametrize("values", [[[-1.0, 0.5]], [[0.0, 300.0]], [[float("nan"), 1.0]]])
def test_float_image_that_cannot_be_read_faithfully_is_refused(tmp_path, values):
    Image.fromarray(np.array(values, dtype=np.float32), mode="F").save(tmp_path / "odd.tif")
    with pytest.raises(UserError, match="odd.tif"):
        demo.read_image(str(tmp_path / "odd.tif"))


def test_exif_orientation_is_applied(tmp_path):
    # A 2x3 landscape picture stored with orientation 6 ("rotate 90 degrees clockwise to view"),
    # as phones save portrait photos: shown and read as 3x2, its top-left pixel at the top right.
    stored = np.zeros((2, 3, 3), dtype=np.uint8)
    stored[0, 0] = (255, 0, 0)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif, quality=100, subsampling=0)
    image = demo.read_image(str(tmp_path / "phone.jpg"))
    assert image.shape == (3, 2, 3)
    assert image[0, 1, 0] > 200 and image[0, 1, 1] < 60 and image[0, 0, 0] < 60


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_image_exits_naming_the_file(tmp_path, content):
    path = tmp_path / "photo.png"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(UserError, match="photo.png"):
        demo.read_image(str(path))


def test_missing_image_exits_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.jpg"):
        demo.read_image(str(tmp_path / "missing.jpg"))


def _png_with_wrong_idat_length(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path, format="PNG")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"IDAT") - 4  # the chunk's 4-byte big-endian length precedes its type
    raw[at:at + 4] = (27).to_bytes(4, "big")  # shorter than the real data: the CRC lands mid-stream
    path.write_bytes(bytes(raw))


def _bmp_with_absurd_width(path: Path) -> None:
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path, format="BMP")
    raw = bytearray(path.read_bytes())
    raw[21] = 0xFF  # the high byte of the header's width field: a 4-billion-pixel-wide image
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("corrupt", [_png_with_wrong_idat_length, _bmp_with_absurd_width])
def test_corrupt_headers_exit_naming_the_file(tmp_path, corrupt):
    path = tmp_path / "broken.img"
    corrupt(path)
    with pytest.raises(UserError, match="broken.img"):
        demo.read_image(str(path))


# ---------------------------------------------------------------- --classes


def test_parse_classes_strips_spaces():
    assert demo.parse_classes("cat, dog ,grass") == ["cat", "dog", "grass"]
    assert demo.parse_classes("traffic light,, +person ,") == ["traffic light", "+person"]


@pytest.mark.parametrize("text", ["", "   ", ",", " , ,"])
def test_parse_classes_rejects_an_empty_vocabulary(text):
    with pytest.raises(UserError, match="--classes is empty"):
        demo.parse_classes(text)


def test_parse_classes_rejects_duplicates():
    with pytest.raises(UserError, match="duplicates.*dog"):
        demo.parse_classes("cat, dog, dog ")


def test_parse_classes_reads_names_as_the_tokenizer_does():
    # CLIP's tokenizer lower-cases and collapses spaces: these are one class typed three times.
    with pytest.raises(UserError, match=r"'red star' / 'Red Star' / 'red  star' \(all read as 'red star'\)"):
        demo.parse_classes("red star, Red Star, red  star, blue circle")
    assert demo.parse_classes("Red Star, blue circle") == ["Red Star", "blue circle"]


@pytest.mark.parametrize("text", ["+car, car", "cat, +"])
def test_parse_classes_rejects_names_that_collide_after_the_thing_marker(text):
    with pytest.raises(UserError):
        demo.parse_classes(text)
