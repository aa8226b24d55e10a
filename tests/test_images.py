"""Tests for melanoma_dist.data.images."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from melanoma_dist.data.images import BadImageError, dhash, prepare_image, shades_of_gray, to_rgb


def _save(im: Image.Image, path, fmt=None, **kw):
    im.save(path, format=fmt, **kw)
    return path


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _palette_with_transparency() -> Image.Image:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # index 0 blue (transparent), 1 red
    im.paste(1, (0, 0, 8, 16))
    im.info["transparency"] = 0
    return im


def _rgba_half_transparent() -> Image.Image:
    im = Image.new("RGBA", (16, 16), (0, 255, 0, 0))  # green but fully transparent
    im.paste((255, 0, 0, 255), (0, 0, 8, 16))
    return im


# (name, image builder, file format, expected RGB of the left half, of the right half)
CONVERT_CASES = [
    ("gray_L", lambda: Image.new("L", (16, 16), 128), "PNG", (128, 128, 128), (128, 128, 128)),
    ("gray_alpha_LA", lambda: Image.new("LA", (16, 16), (200, 0)), "PNG", (0, 0, 0), (0, 0, 0)),
    ("rgba", _rgba_half_transparent, "PNG", (255, 0, 0), (0, 0, 0)),
    ("palette_transparency", _palette_with_transparency, "PNG", (255, 0, 0), (0, 0, 0)),
    ("palette_opaque", lambda: Image.new("RGB", (16, 16), (0, 0, 255)).convert("P"), "PNG", (0, 0, 255), (0, 0, 255)),
    ("cmyk", lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", (255, 0, 0), (255, 0, 0)),
    ("bilevel_1", lambda: Image.new("1", (16, 16), 1), "PNG", (255, 255, 255), (255, 255, 255)),
]


@pytest.mark.parametrize("name,build,fmt,left,right", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_modes_convert_to_expected_rgb(tmp_path, name, build, fmt, left, right):
    path = _save(build(), tmp_path / f"{name}.{fmt.lower()}", fmt)
    img = prepare_image(path, size=16, encoding="png")
    px = _decode(img.data)
    assert px.shape == (16, 16, 3)
    tol = 8 if fmt == "JPEG" else 0
    assert np.abs(px[8, 2] - left).max() <= tol
    assert np.abs(px[8, 13] - right).max() <= tol


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_bit_depth_is_stretched_not_clipped(mode):
    a = np.tile(np.linspace(1000, 3000, 16), (16, 1))
    raw = a.astype({"I;16": "<u2", "I;16B": ">u2", "I": "=i4", "F": "=f4"}[mode]).tobytes()
    im = Image.frombytes(mode, (16, 16), raw)
    assert im.mode == mode
    px = np.asarray(to_rgb(im))
    assert px[0, 0].tolist() == [0, 0, 0] and px[0, -1].tolist() == [255, 255, 255]
    assert 100 < px[0, 8, 0] < 160  # mid-grey, not white


def test_16bit_png_file(tmp_path):
    a = np.tile(np.linspace(0, 4095, 32).astype(np.uint16), (32, 1))  # 12-bit data in 16 bits
    path = _save(Image.frombytes("I;16", (32, 32), a.astype("<u2").tobytes()), tmp_path / "g16.png")
    px = _decode(prepare_image(path, size=32, encoding="png").data)
    assert px[:, 0].max() == 0 and px[:, -1].min() == 255


def test_constant_high_depth_image_is_black():
    assert np.asarray(to_rgb(Image.new("F", (8, 8), 5.0))).max() == 0


def test_crop_and_pad(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue left quarter: cropped away by a centre crop
    path = _save(im, tmp_path / "wide.png")
    crop = _decode(prepare_image(path, size=20, resize="crop", encoding="png").data)
    assert (crop == [255, 0, 0]).all()
    pad = _decode(prepare_image(path, size=20, resize="pad", encoding="png").data)
    assert pad[0, 10].tolist() == [0, 0, 0]  # black band above
    assert pad[10, 1].tolist() == [0, 0, 255] and pad[10, 15].tolist() == [255, 0, 0]


def test_real_jpeg_hashes_and_determinism(real_jpeg, tmp_path):
    a = prepare_image(real_jpeg, size=64)
    b = prepare_image(real_jpeg, size=64)
    assert a == b
    assert a.data[:2] == b"\xff\xd8" and (a.width, a.height) == (200, 150)
    assert Image.open(io.BytesIO(a.data)).size == (64, 64)
    assert len(a.pixel_sha256) == 64 and len(a.phash) == 16
    # Re-encoded copy: same phash neighbourhood, different pixel hash.
    recompressed = _save(Image.open(real_jpeg), tmp_path / "copy.jpg", "JPEG", quality=70)
    c = prepare_image(recompressed, size=64)
    assert c.pixel_sha256 != a.pixel_sha256
    assert bin(int(c.phash, 16) ^ int(a.phash, 16)).count("1") <= 4
    png = prepare_image(real_jpeg, size=64, encoding="png")
    assert png.data[:4] == b"\x89PNG" and png.pixel_sha256 == a.pixel_sha256


def test_dhash_bits():
    gradient = Image.fromarray(np.tile(np.arange(255, -1, -28, dtype=np.uint8), (8, 1)))  # bright to dark
    assert dhash(gradient) == "ffffffffffffffff"
    assert dhash(gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) == "0000000000000000"


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(im, tmp_path / "rot.jpg", "JPEG", exif=exif)
    img = prepare_image(path, size=16)
    assert (img.width, img.height) == (20, 40)


def _truncated(tmp_path, real_jpeg):
    data = real_jpeg.read_bytes()
    return _write(tmp_path / "truncated.jpg", data[: len(data) // 2])


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# (name, file builder, text the reason must contain)
BAD_CASES = [
    ("zero_bytes", lambda d, j: _write(d / "zero.jpg", b""), "empty file (0 bytes)"),
    ("text_as_jpg", lambda d, j: _write(d / "text.jpg", b"not an image\n"), "not an image"),
    ("truncated_jpeg", _truncated, "corrupt or truncated image"),
    ("tiny", lambda d, j: _save(Image.new("RGB", (7, 30)), d / "tiny.png"), "7x30 px, smaller than 8 px"),
    ("missing", lambda d, j: d / "gone.jpg", "cannot read file"),
]


@pytest.mark.parametrize("name,build,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs_raise_bad_image_error(tmp_path, real_jpeg, name, build, reason):
    path = build(tmp_path, real_jpeg)
    with pytest.raises(BadImageError, match=re.escape(reason)) as e:
        prepare_image(path, size=16)
    assert reason in e.value.reason


@pytest.mark.parametrize("pixels", [100 * 100 + 1, 3 * 100 * 100])  # warning range and error range
def test_decompression_bomb(tmp_path, monkeypatch, pixels):
    path = _save(Image.new("RGB", (pixels // 100 + 1, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(BadImageError, match="decompression bomb"):
        prepare_image(path, size=16)


def test_shades_of_gray_removes_a_colour_cast_deterministically(real_jpeg, tmp_path):
    grey = Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8)[:, None, None], (1, 25, 3)))
    np.testing.assert_array_equal(np.asarray(shades_of_gray(grey)), np.asarray(grey))  # no cast: unchanged
    lesion = np.asarray(Image.open(real_jpeg).convert("RGB")).astype(float)
    cast = Image.fromarray(np.clip(lesion * [1.0, 0.8, 0.6], 0, 255).astype(np.uint8))  # a warm camera
    balanced = np.asarray(shades_of_gray(cast)).astype(float)
    ratio = lambda a: a.reshape(-1, 3).mean(0) / a.reshape(-1, 3).mean()  # noqa: E731
    assert np.ptp(ratio(balanced)) < 0.5 * np.ptp(ratio(np.asarray(cast).astype(float)))
    a = prepare_image(real_jpeg, 32, color_constancy="shades_of_gray")
    b = prepare_image(real_jpeg, 32, color_constancy="shades_of_gray")
    assert a.data == b.data != prepare_image(real_jpeg, 32).data
    assert a.pixel_sha256 == prepare_image(real_jpeg, 32).pixel_sha256  # hashes are of the original
    with pytest.raises(ValueError, match="color_constancy must be"):
        prepare_image(real_jpeg, 32, color_constancy="grey_world")
