"""Decode, check, hash, square-resize and re-encode one image file; decode stored images for reports.

`prepare_image` is the only image code ingest runs; everything that can be wrong with an
input file (empty, not an image, truncated, a decompression bomb, too small, a broken
symbolic link) is raised as `BadImageError` with a short reason, which ingest records in
the manifest.

Colour conversion to RGB:

- `L`, `1`, `CMYK`, `YCbCr`, `LAB`, `HSV`, `P` without transparency: Pillow's conversion.
- Images with alpha (`RGBA`, `LA`, `PA`, `P` with transparency): composited on black,
  the colour `resize="pad"` pads with, so that transparent and padded areas look alike.
- 16-bit and 32-bit integer or float (`I;16`, `I;16B`, `I`, `F`): stretched linearly
  from the image's own min..max to 0..255 (clipping at 255 would turn most 16-bit
  images white); a constant image becomes black.

Stored encodings (`data.encoding`): `jpeg`, `png`, or `raw`, the uint8 pixels themselves
(HWC RGB, `size * size * 3` bytes, no codec). The hashes are of the original image, so
they do not depend on the encoding.

Example:

```python
img = prepare_image("../shared/data/ham10000/images/ISIC_0024306.jpg", size=128)
img.data[:2], img.phash, (img.width, img.height)  # (b'\\xff\\xd8', '1230787878383909', (200, 150))
```
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from melanoma_dist import storage
from melanoma_dist.paths import is_uri

logger = logging.getLogger(__name__)

MIN_SIDE = 8
"""Images smaller than this on either side are rejected."""

HASH_SIZE = 8
"""dHash grid: 8 rows of 8 left/right comparisons, 64 bits."""

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})

Encoding = Literal["jpeg", "png", "raw"]
LOSSLESS_ENCODINGS = frozenset({"png", "raw"})
"""Encodings that store the resized pixels exactly: datasets in either hold the same images."""
_REINGEST = "ingest the dataset again (`melanoma-dist ingest --config <your config>`)"


class BadImageError(ValueError):
    """The file cannot be used as an image; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PreparedImage:
    """A resized, encoded image and the hashes of its original pixels."""

    data: bytes
    """The encoded (JPEG or PNG) or raw (uint8 HWC) `size`x`size` RGB image."""
    pixel_sha256: str
    """SHA-256 of the RGB pixels at original resolution and their shape: equal only for identical images."""
    phash: str
    """64-bit difference hash (16 hex digits): equal or close for near-duplicate images."""
    width: int
    """Original width (after EXIF orientation)."""
    height: int
    """Original height (after EXIF orientation)."""


def prepare_image(path: str | Path, size: int, resize: Literal["crop", "pad"] = "crop",
                  encoding: Encoding = "jpeg", jpeg_quality: int = 95,
                  color_constancy: Literal["none", "shades_of_gray"] = "none") -> PreparedImage:
    """Decode an image file, hash it, make it a `size`x`size` RGB square and encode it.

    Args:
        path: the image file.
        size: side of the output square in pixels.
        resize: `crop` to the centred square, or `pad` to a square with black. Defaults to `"crop"`.
        encoding: `jpeg`, `png` or `raw` (uint8 pixels, no codec). Defaults to `"jpeg"`.
        jpeg_quality: JPEG quality (1-100). Defaults to `95`.
        color_constancy: `shades_of_gray` white-balances the resized image (see
            `shades_of_gray`); `none` keeps its colours. Defaults to `"none"`.

    Raises:
        BadImageError: the file is empty, not an image, truncated or corrupt, a
            decompression bomb, or smaller than 8 px on a side.
    """
    rgb = load_rgb(path)
    small = square(rgb, size, resize)
    if color_constancy == "shades_of_gray":
        small = shades_of_gray(small)
    elif color_constancy != "none":
        raise ValueError(f"color_constancy must be 'none' or 'shades_of_gray', got {color_constancy!r}")
    return PreparedImage(data=encode(small, encoding, jpeg_quality),
                         pixel_sha256=pixel_sha256(rgb), phash=dhash(rgb),
                         width=rgb.width, height=rgb.height)


def load_rgb(path: str | Path) -> Image.Image:
    """Fully decode an image file, apply its EXIF orientation and convert it to RGB.

    Raises:
        BadImageError: see `prepare_image`.
    """
    try:
        # An object is fetched whole in one request: PIL's many small reads would each be one.
        f = io.BytesIO(storage.read_bytes(path)) if is_uri(path) else open(path, "rb")
    except OSError as e:
        raise BadImageError(broken_link_reason(path) or f"cannot read file: {e.strerror or e}") from None
    try:
        with f:
            if f.seek(0, os.SEEK_END) == 0:
                raise BadImageError("empty file (0 bytes)")
            f.seek(0)
            # A bomb between MAX_IMAGE_PIXELS and twice that only warns; make it an error
            # so that one giant file cannot exhaust a worker's memory.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    im.load()  # force the full decode: a truncated file fails here, not later
                    im = ImageOps.exif_transpose(im)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(f"corrupt or truncated image: {e}") from None
    if min(im.size) < MIN_SIDE:
        raise BadImageError(f"image is {im.width}x{im.height} px, smaller than {MIN_SIDE} px on a side")
    return to_rgb(im)


def broken_link_reason(path: str | Path) -> str | None:
    """Why `path` is a symbolic link that cannot be followed (dangling, or a loop); None otherwise.

    Example:

    ```python
    broken_link_reason("photos/old.jpg")  # 'dangling symbolic link (its target /mnt/gone/old.jpg does not exist)'
    ```
    """
    p = Path(path)
    if not p.is_symlink():
        return None
    try:
        p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"dangling symbolic link (its target {os.readlink(p)} does not exist)"
    return None


def is_file_or_broken_link(path: str | Path) -> bool:
    """A file (or a link to one), or a broken link: what to try to decode, so that a broken link's reason is told."""
    return Path(path).is_file() or broken_link_reason(path) is not None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see the module docstring for the rules).

    Raises:
        BadImageError: the mode cannot be converted.
    """
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    if im.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_stretch_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(f"unsupported image mode {im.mode}: {e}") from None


def _stretch_to_uint8(a: np.ndarray) -> np.ndarray:
    """Linearly map the array's own finite min..max to 0..255 (NaN to 0)."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    out = np.where(finite, (a - lo) * (255.0 / (hi - lo)), 0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def pixel_sha256(rgb: Image.Image) -> str:
    """SHA-256 (hex) of an RGB image's shape and pixels; identical pixels give identical hashes."""
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}x3:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def dhash(im: Image.Image) -> str:
    """64-bit difference hash of an image, as 16 hex digits.

    The grayscale image is shrunk to 9x8 pixels; each of the 8 rows gives 8 bits, one
    per neighbouring pair, set when the left pixel is brighter than the right one. The
    hash survives resizing, recompression and small colour changes, so near-duplicate
    images have hashes a few bits apart (compare with the Hamming distance).
    """
    small = im.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS)
    px = np.asarray(small, dtype=np.int16)
    bits = (px[:, :-1] > px[:, 1:]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{HASH_SIZE * HASH_SIZE // 4}x}"


def square(rgb: Image.Image, size: int, resize: Literal["crop", "pad"] = "crop") -> Image.Image:
    """A `size`x`size` image: centre crop (`crop`) or black padding (`pad`) to a square, then bilinear resize.

    Raises:
        ValueError: `resize` is not `crop` or `pad`.
    """
    w, h = rgb.size
    if resize == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return rgb.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    if resize == "pad":
        side = max(w, h)
        padded = Image.new("RGB", (side, side), (0, 0, 0))
        padded.paste(rgb, ((side - w) // 2, (side - h) // 2))
        return padded.resize((size, size), Image.Resampling.BILINEAR)
    raise ValueError(f"resize must be 'crop' or 'pad', got {resize!r}")


def shades_of_gray(rgb: Image.Image, power: int = 6) -> Image.Image:
    """Shades of Gray colour constancy (Finlayson & Trezzi, 2004), as used for dermoscopy by Barata et al.

    Estimates the illuminant as the Minkowski p-norm mean of each channel and
    divides it out, so that images from cameras and lighting with different colour
    casts look alike. A grey image is unchanged; the result is deterministic.

    Args:
        rgb: An RGB image.
        power: The Minkowski norm p (1 = grey world, infinity = max-RGB). Defaults to `6`.
    """
    a = np.asarray(rgb, dtype=np.float64)
    illuminant = np.power(np.mean(np.power(a, power), axis=(0, 1)), 1.0 / power)
    norm = float(np.sqrt(np.sum(illuminant ** 2)))
    if norm == 0.0:  # an all-black image has no colour cast to remove
        return rgb
    gain = norm / (np.sqrt(3.0) * np.maximum(illuminant, 1e-6))
    return Image.fromarray(np.rint(np.clip(a * gain, 0, 255)).astype(np.uint8))


def encode(rgb: Image.Image, encoding: Encoding = "jpeg", jpeg_quality: int = 95) -> bytes:
    """Encode an RGB image with fixed settings, so that the same pixels give the same bytes.

    JPEG keeps full-resolution colour (4:4:4, no chroma subsampling): lesion colour is
    diagnostic and the images are small. No EXIF or ICC data is written. `raw` is the
    pixels as they are in memory: rows of RGB triplets (HWC, uint8).

    Raises:
        ValueError: `encoding` is not `jpeg`, `png` or `raw`.
    """
    if encoding == "raw":
        return rgb.tobytes()  # mode RGB: height x width x 3 bytes, row-major
    buf = io.BytesIO()
    if encoding == "jpeg":
        rgb.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0, optimize=False, progressive=False)
    elif encoding == "png":
        rgb.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        raise ValueError(f"encoding must be 'jpeg', 'png' or 'raw', got {encoding!r}")
    return buf.getvalue()


def raw_size(image_size: int) -> int:
    """Bytes of one stored `raw` image: image_size x image_size x 3."""
    return image_size * image_size * 3


def raw_length_error(image_size: int, where: str, length: int | None = None) -> str:
    """The message for a stored raw image of the wrong length: `where` it is (a dataset or a shard), its `length`."""
    got = f"is {length} bytes, not" if length is not None else "is not"
    return (f"a stored image in {where or 'the dataset'} {got} {raw_size(image_size)} bytes "
            f"({image_size}x{image_size}x3 uint8, encoding raw): the shards were written with another image "
            f"size or encoding than read with; {_REINGEST}")


def check_raw_length(data: bytes, image_size: int, dataset: str = "") -> None:
    """Check that raw image bytes are one `image_size` square of RGB pixels.

    Raises:
        ValueError: they are not; the message names the dataset and says to ingest it again.
    """
    if len(data) != raw_size(image_size):
        raise ValueError(raw_length_error(image_size, dataset, len(data)))


def decode_stored(data: bytes, encoding: str, image_size: int, dataset: str = "") -> np.ndarray:
    """Stored image bytes as uint8 [image_size, image_size, 3] RGB, with Pillow (reports, audits).

    Training and inference decode with TensorFlow instead (`data.pipeline.decode_image`), whose
    JPEG decoding need not match Pillow's bit for bit; `png` and `raw` give the same pixels in both.

    Args:
        data: One image's bytes from the shards.
        encoding: The dataset's `encoding` (from its manifest).
        image_size: The dataset's `image_size`.
        dataset: Named in errors. Defaults to `""`.

    Raises:
        ValueError: a raw image of the wrong length, or bytes that do not decode to an `image_size` square.
    """
    if encoding == "raw":
        check_raw_length(data, image_size, dataset)
        return np.frombuffer(data, np.uint8).reshape(image_size, image_size, 3)
    try:
        with Image.open(io.BytesIO(data)) as im:
            out = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"a stored image in {dataset or 'the dataset'} does not decode as {encoding}: {e}; "
                         f"{_REINGEST}") from None
    if out.shape != (image_size, image_size, 3):
        raise ValueError(f"a stored image in {dataset or 'the dataset'} is {out.shape[1]}x{out.shape[0]} px, "
                         f"not {image_size}x{image_size}: {_REINGEST}")
    return out
