"""Decoding untrusted image bytes: the one decoder of the project, free of torch.

The API edge (`service/images.py`) probes an upload's header with it before
queueing; the worker, `ipdfer predict`, `ipdfer detect` and data preparation
decode with it. Errors are typed (`ImageError` subclasses, messages safe to show
to users); the service maps each type to an HTTP status at its edge.

    fmt, w, h = probe(upload_bytes, max_pixels=..., min_side=16)   # header only
    image = load_image(upload_bytes)   # RGB uint8 (H, W, 3), EXIF orientation applied
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The smallest face looked for in photos, by the service (IPDFER_MIN_FACE_SIZE) and
# `ipdfer detect`: FER2013's faces, the smallest the model was trained on. 20 (the
# FaceDetector's default, facenet-pytorch's, which data preparation ran with) also
# finds smaller faces at ~1.6x the detection time.
PHOTO_MIN_FACE_SIZE = 40

# Pillow format names we accept. MPO is what Pillow calls many phone JPEGs.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
MAX_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 40_000_000
SEND = "send JPEG, PNG, WebP, BMP or TIFF"
# file names a folder's images are found by (`ipdfer predict DIR`, int8 calibration)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """The images under `folder` (recursive), by name, in sorted order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageError(ValueError):
    """The input is not a usable image. Messages are safe to show to users."""


class ImageDecodeError(ImageError):
    """Empty, truncated, corrupt or not an image at all (HTTP 400)."""


class ImageTooLargeError(ImageError):
    """Over the byte or pixel limit (HTTP 413)."""


class UnsupportedImageType(ImageError):
    """A real image, but not JPEG/PNG/WebP/BMP/TIFF (HTTP 415)."""


class ImageTooSmallError(ImageError):
    """A shorter side than the service accepts (HTTP 422)."""


def _read_bytes(data: bytes | str | Path, max_bytes: int) -> bytes:
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ImageDecodeError(f"cannot read image file {path.name!r}: {e.strerror}") from e
        if size > max_bytes:
            raise ImageTooLargeError(f"image file is {size:,} bytes; the limit is {max_bytes:,}")
        data = path.read_bytes()
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes or a path, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"image is {len(data):,} bytes; the limit is {max_bytes:,}")
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    return data


def _open(data: bytes) -> Image.Image:
    """Parse the header only: format and declared size, no pixel decoding yet."""
    try:
        with warnings.catch_warnings():
            # We enforce our own, lower pixel limit right after opening.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image dimensions are too large: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"the data is not a recognised image ({SEND})") from e
    except Exception as e:  # Pillow plugins raise many types on malformed headers
        raise ImageDecodeError(f"the image header is corrupt: {e}") from e


def _check_header(im: Image.Image, max_pixels: int) -> None:
    if im.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageType(f"unsupported image type {im.format or 'unknown'}; {SEND}")
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}")


def check_min_side(width: int, height: int, min_side: int) -> None:
    if min(width, height) < min_side:
        raise ImageTooSmallError(f"image is {width}x{height} pixels; the smallest accepted side is {min_side}")


def probe(data: bytes, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
          min_side: int = 1) -> tuple[str, int, int]:
    """(format, width, height) from the header alone, no pixel decoded: what the API
    checks before queueing an upload, so a decompression bomb never reaches a worker.
    Raises the same `ImageError`s as `load_image`."""
    with _open(_read_bytes(data, max_bytes)) as im:
        _check_header(im, max_pixels)
        (w, h), fmt = im.size, im.format
    check_min_side(w, h, min_side)
    return fmt, w, h


def load_image(data: bytes | str | Path, max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP/TIFF bytes (or a file) to RGB uint8 (H, W, 3), upright.

    The declared size is checked before any pixel is decoded (decompression bombs),
    EXIF orientation is applied, and every mode ends up as 8-bit RGB: alpha is
    composited on white, 16-bit is scaled by 1/257. Raises an `ImageError` subclass.
    """
    return load_image_scaled(data, max_pixels, max_bytes, max_side=None)[0]


def load_image_scaled(data: bytes | str | Path, max_pixels: int = MAX_PIXELS,
                      max_bytes: int = MAX_BYTES, max_side: int | None = None
                      ) -> tuple[np.ndarray, tuple[float, float]]:
    """`load_image`, decoded at most `max_side` pixels on its longer side.

    Returns (RGB image, (sx, sy)): decoded pixels per original pixel along x and y
    (1.0 when the image already fits). Memory follows max_side, not the upload: a
    JPEG is decoded at 1/2, 1/4 or 1/8 scale inside the codec (draft mode), any
    other format is reduced right after decoding, before the colour conversions
    that copy it. Map a point back with `x_orig = (x + 0.5) / sx - 0.5`.
    """
    im = _open(_read_bytes(data, max_bytes))
    with im:
        _check_header(im, max_pixels)
        w, h = im.size
        try:
            if max_side and max(w, h) > max_side and im.format in ("JPEG", "MPO"):
                k = max_side / max(w, h)
                im.draft(im.mode, (math.ceil(w * k), math.ceil(h * k)))  # codec picks scale >= this
            im.load()  # raises on truncated data while LOAD_TRUNCATED_IMAGES is False
            small = _reduce(im, max_side) if max_side else im
            upright = ImageOps.exif_transpose(small)
            sx, sy = small.size[0] / w, small.size[1] / h
            if upright.size != small.size:  # a 90-degree EXIF turn swaps the axes
                sx, sy = sy, sx
            return _to_rgb(upright), (sx, sy)
        except MemoryError:
            raise
        except Exception as e:  # truncated / corrupt pixel data, whatever the codec says
            raise ImageDecodeError(f"the image data is truncated or corrupt: {e}") from e


# Modes Image.reduce works on; others are converted (at full size) first.
_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "I", "F"})


def _reduce(im: Image.Image, max_side: int) -> Image.Image:
    """Box-filter `im` by the smallest integer factor that fits max_side."""
    factor = math.ceil(max(im.size) / max_side)
    if factor <= 1:
        return im
    if im.mode.startswith("I;16"):
        im = im.convert("I")  # keeps the 16-bit range for _to_rgb's 1/257
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode not in _REDUCIBLE_MODES:
        im = im.convert("RGBA" if im.mode in ("P", "PA") or "transparency" in im.info else "RGB")
    return im.reduce(factor)


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: 65535 -> 255 (scale, never clip the top 99% of the range away).
        grey = np.asarray(im, dtype=np.float64) / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, F, ...
    return np.array(im, dtype=np.uint8)
