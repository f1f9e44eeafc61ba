"""The job contract: what a job is and what its reply looks like, the same in
process and over Redis (where both travel as JSON + bytes).

  Job      op "analyze" (an uploaded image) or "render" (a stored face state)
  reply    a JSON-ready dict: the result's fields, or {"error": KIND, "detail": "..."}
           where KIND names a failure (ERROR_KINDS); service/errors.py alone
           turns a kind into an HTTP status.

A job whose processing raised an unexpected exception has no reply: the caller
retries it (Redis worker, then dead letter) or answers 500 (in process).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OP_ANALYZE = "analyze"
OP_RENDER = "render"
RENDER_KINDS = ("neutral", "residue")

# A reply's "error": what went wrong, in words a client can act on.
ERROR_KINDS = (
    "bad_image",          # empty, truncated, undecodable or not an image
    "unsupported_image",  # an image format the decoder does not take
    "image_too_large",    # over the pixel or byte limit
    "image_too_small",    # below the smallest side
    "no_face",            # no face was found where one was needed
    "unknown_face",       # the face_id is unknown or expired
    "bad_job",            # an operation or render kind that does not exist
    "expired",            # the job waited in the queue past its deadline
    "dead_letter",        # the job failed on every delivery
    "failed",             # processing failed (an unexpected error)
)


@dataclass
class Job:
    """One unit of work, independent of the transport."""
    op: str = OP_ANALYZE
    image: bytes = b""               # analyze: the raw upload
    aligned: bool = False            # analyze: the image is already a face crop
    max_faces: int | None = None     # analyze: keep the best N detections
    largest: bool = False            # analyze: keep only the largest face (POST /neutralize)
    neutral: bool = False            # analyze: include the neutral render (base64 PNG)
    identity: bool = False           # analyze: include each face's identity descriptor (video tracks)
    keep: bool = True                # analyze: keep the face states for GET /neutralize (video frames: no)
    state: bytes | None = None       # render: FaceState bytes (None: unknown/expired)
    kind: str = "neutral"            # render: "neutral" | "residue"
    enqueued: float | None = None    # wall-clock time the client queued it (queue_ms)
    pixels: int | None = None        # analyze: width x height, from the API edge's header probe

    @classmethod
    def from_meta(cls, meta: dict[str, Any], image: bytes, state: bytes | None = None) -> Job:
        return cls(op=meta.get("op", OP_ANALYZE), image=image, aligned=bool(meta.get("aligned")),
                   max_faces=meta.get("max_faces"), largest=bool(meta.get("largest")),
                   neutral=bool(meta.get("neutral")), identity=bool(meta.get("identity")),
                   keep=bool(meta.get("keep", True)), state=state,
                   kind=meta.get("kind", "neutral"), enqueued=meta.get("enqueued"), pixels=meta.get("pixels"))


@dataclass
class Outcome:
    reply: dict[str, Any]                                   # JSON-ready: the result, or error_reply
    faces: dict[str, bytes] = field(default_factory=dict)   # face_id -> FaceState bytes to keep


def error_reply(kind: str, detail: str) -> dict[str, Any]:
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return {"error": kind, "detail": detail}


def image_error_kind(exc: BaseException) -> str | None:
    """The error kind of a typed image error (model.images), None for anything else."""
    from model.images import ImageError, ImageTooLargeError, ImageTooSmallError, UnsupportedImageType
    for cls, kind in ((ImageTooLargeError, "image_too_large"), (UnsupportedImageType, "unsupported_image"),
                      (ImageTooSmallError, "image_too_small"), (ImageError, "bad_image")):
        if isinstance(exc, cls):
            return kind
    return None


def job_cost(job: Job) -> float:
    """Pixels of a photo to search for faces (as the API edge probed them, else from
    the header); 0 for face crops, renders and unreadable data. The batching loops
    run costly jobs alone (BatchPolicy)."""
    from model.images import ImageError, probe
    if job.op != OP_ANALYZE or job.aligned:
        return 0.0
    if job.pixels is not None:
        return float(job.pixels)
    try:
        _, width, height = probe(job.image)
    except ImageError:  # the decoder answers for it, at its header check
        return 0.0
    return float(width * height)
