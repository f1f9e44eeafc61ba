"""Image checks at the API edge: `model.images` (torch-free) does the work, this
module maps its typed errors to HTTP statuses, the only place that does.

`probe` parses the header only (format, declared size), so a decompression bomb
is refused before anything is queued and never reaches Redis or a worker; the
worker decodes with the same module (`load_image`), the same formats and limits.
"""
from __future__ import annotations

from model.images import (ImageDecodeError, ImageError, ImageTooLargeError, ImageTooSmallError,
                          UnsupportedImageType)
from model.images import probe as probe_header
from service.errors import JobError

# Most specific first: every one of them is an ImageError (400).
_STATUS = ((ImageTooLargeError, 413), (UnsupportedImageType, 415), (ImageTooSmallError, 422),
           (ImageDecodeError, 400), (ImageError, 400))


def image_error_status(exc: BaseException) -> int | None:
    """HTTP status of a typed image error (None: not a client error)."""
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), None)


def probe(data: bytes, *, max_pixels: int, max_bytes: int, min_side: int = 16) -> tuple[str, int, int]:
    """(format, width, height) of an acceptable image, else JobError with the
    HTTP status: 400 empty/not an image/corrupt header, 415 unsupported format,
    413 too many pixels (or bytes), 422 smaller than min_side."""
    try:
        return probe_header(data, max_pixels=max_pixels, max_bytes=max_bytes, min_side=min_side)
    except ImageError as e:
        raise JobError(image_error_status(e), str(e)) from e
