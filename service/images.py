"""Image checks at the API edge: `model.images` (torch-free) does the work.

`probe` parses the header only (format, declared size), so a decompression bomb
is refused before anything is queued and never reaches Redis or a worker; the
worker decodes with the same module (`load_image`), the same formats and limits.
"""
from __future__ import annotations

from model.images import ImageError
from model.images import probe as probe_header
from service.errors import JobError
from service.jobs import image_error_kind


def probe(data: bytes, *, max_pixels: int, max_bytes: int, min_side: int = 16) -> tuple[str, int, int]:
    """(format, width, height) of an acceptable image, else JobError with its kind:
    bad_image (empty, not an image, corrupt header), unsupported_image,
    image_too_large (pixels or bytes), image_too_small (below min_side)."""
    try:
        return probe_header(data, max_pixels=max_pixels, max_bytes=max_bytes, min_side=min_side)
    except ImageError as e:
        raise JobError(image_error_kind(e), str(e)) from e
