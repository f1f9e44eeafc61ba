"""Header-only checks of an upload at the API edge, before anything is queued.

Only the header is parsed (Pillow's lazy open): format, declared size. A
decompression bomb is refused here without decoding a pixel, so it never reaches
Redis or a worker. The authoritative full decode is model.face.load_image in the
worker; this module stays free of torch so the Redis-mode API process is light.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from service.errors import JobError

# Same set as model.face.SUPPORTED_FORMATS (a test keeps them equal); MPO is what
# Pillow calls many phone JPEGs.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})


def probe(data: bytes, *, max_pixels: int, min_side: int = 16) -> tuple[str, int, int]:
    """(format, width, height) of an acceptable image, else JobError with the
    HTTP status: 400 empty/not an image/corrupt header, 415 unsupported format,
    413 too many pixels, 422 smaller than min_side."""
    if not data:
        raise JobError(400, "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise JobError(413, f"image dimensions are too large: {e}") from e
    except UnidentifiedImageError:
        raise JobError(400, "the data is not a recognised image (send JPEG, PNG, WebP, BMP or TIFF)") from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on bad headers
        raise JobError(400, f"the image header is corrupt: {e}") from e
    with im:
        fmt, (w, h) = im.format, im.size
    if fmt not in SUPPORTED_FORMATS:
        raise JobError(415, f"unsupported image type {fmt or 'unknown'}; send JPEG, PNG, WebP, BMP or TIFF")
    if w * h > max_pixels:
        raise JobError(413, f"image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}")
    if min(w, h) < min_side:
        raise JobError(422, f"image is {w}x{h} pixels; the smallest accepted side is {min_side}")
    return fmt, w, h
