"""Failures the service distinguishes. Raised anywhere in service/; turned into
HTTP answers only at the edge (service/api.py)."""
from __future__ import annotations


class QueueFull(Exception):
    """Too many jobs waiting or in flight: 503 with Retry-After, at once."""


class NoWorkers(Exception):
    """No worker (or no loaded model) is ready: 503 with Retry-After."""


class ResultTimeout(Exception):
    """A job's result did not arrive in time: 504."""


class JobError(Exception):
    """A job that failed with a definite HTTP status (4xx for bad input, 404 for an
    unknown face, 500 for a dead-lettered job)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class DeadLettered(JobError):
    """A job that failed on every delivery and went to the dead-letter stream: 500.
    The queue marks its reply (`"dead_letter": true`); nobody matches message text."""

    def __init__(self, detail: str) -> None:
        super().__init__(500, detail)


class Unavailable(Exception):
    """A dependency (Redis) cannot be reached: 503 with Retry-After, at once."""
