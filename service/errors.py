"""Failures the service distinguishes, and the one place they become HTTP
statuses and messages (`http_status`, `client_detail`; service/server.py's
handlers and POST /predict/batch's entries answer with them).

A job's failure travels as an error kind (service/jobs.py) and is raised here as
`JobError(kind, detail)`; the others are the queue's and the transport's."""
from __future__ import annotations

from service.jobs import ERROR_KINDS


class QueueFull(Exception):
    """Too many jobs waiting or in flight: 503 with Retry-After, at once."""


class NoWorkers(Exception):
    """No worker (or no loaded model) is ready: 503 with Retry-After."""


class ResultTimeout(Exception):
    """A job's result did not arrive in time: 504."""


class Unavailable(Exception):
    """A dependency (Redis) cannot be reached: 503 with Retry-After, at once."""


class JobError(Exception):
    """A job that failed for a reason the client is told: its error kind
    (service/jobs.py ERROR_KINDS) and a message."""

    def __init__(self, kind: str, detail: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(detail)
        self.kind, self.detail = kind, detail


JOB_ERROR_STATUS = {
    "bad_image": 400, "unsupported_image": 415, "image_too_large": 413, "image_too_small": 422,
    "no_face": 422, "unknown_face": 404, "bad_job": 422, "expired": 504, "dead_letter": 500, "failed": 500,
}
assert set(JOB_ERROR_STATUS) == set(ERROR_KINDS)

RETRY_LATER = (QueueFull, NoWorkers, Unavailable)   # 503 with Retry-After

# model.video.decode.VideoError kinds, found in a video's header at upload
VIDEO_ERROR_STATUS = {"bad_video": 400, "unsupported_video": 415, "video_too_large": 413}


def client_detail(exc: Exception) -> str:
    """The message a client is answered with for `exc` (the `detail` of the error body)."""
    if isinstance(exc, JobError):
        return exc.detail
    if isinstance(exc, QueueFull):
        return f"server busy: {exc}; retry later"
    if isinstance(exc, NoWorkers):
        return f"not ready: {exc}; retry later"
    if isinstance(exc, ResultTimeout):
        return f"timed out waiting for the result: {exc}"
    return str(exc)


def http_status(exc: Exception) -> int:
    """The HTTP status that answers `exc` (500 for anything unforeseen)."""
    if isinstance(exc, JobError):
        return JOB_ERROR_STATUS[exc.kind]
    if isinstance(exc, RETRY_LATER):
        return 503
    if isinstance(exc, ResultTimeout):
        return 504
    return 500
