"""The batch function every mode runs: a list of jobs in, one JSON-ready reply per
job out. Pure compute (no Redis, no HTTP): the Redis worker, the in-process
batcher and `ipdfer predict` all call `Pipeline.__call__`.

Per job:
  analyze  raw image bytes -> decode (model.images.load_image, typed errors) ->
           one batched `Analyzer.analyze` over the whole batch -> faces + face ids
  render   a stored FaceState -> one batched `Analyzer.render` per kind -> PNG

A bad input becomes an error *reply* for that job only (status 4xx, the message
from the decoder). An unexpected exception is returned in the job's slot instead:
the caller retries it (Redis worker, then dead letter) or answers 500 (in-process).
"""
from __future__ import annotations

import base64
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.images import image_error_status
from service.memory import HeapTrimmer

log = logging.getLogger(__name__)

OP_ANALYZE = "analyze"
OP_RENDER = "render"
RENDER_KINDS = ("neutral", "residue")


@dataclass
class Job:
    """One unit of work, independent of the transport."""
    op: str = OP_ANALYZE
    image: bytes = b""               # analyze: the raw upload
    aligned: bool = False            # analyze: the image is already a face crop
    max_faces: int | None = None     # analyze: keep the best N detections
    neutral: bool = False            # analyze: include the neutral render (base64 PNG)
    state: bytes | None = None       # render: FaceState bytes (None: unknown/expired)
    kind: str = "neutral"            # render: "neutral" | "residue"
    enqueued: float | None = None    # wall-clock time the client queued it (queue_ms)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], image: bytes, state: bytes | None = None) -> "Job":
        return cls(op=meta.get("op", OP_ANALYZE), image=image, aligned=bool(meta.get("aligned")),
                   max_faces=meta.get("max_faces"), neutral=bool(meta.get("neutral")), state=state,
                   kind=meta.get("kind", "neutral"), enqueued=meta.get("enqueued"))


@dataclass
class Outcome:
    reply: dict[str, Any]                                   # JSON-ready; "status" = HTTP status
    faces: dict[str, bytes] = field(default_factory=dict)   # face_id -> FaceState bytes to keep


def job_cost(job: Job) -> float:
    """Pixels of a photo to search for faces (header only); 0 for face crops, renders
    and unreadable data. The batching loops run costly jobs alone (BatchPolicy)."""
    from model.images import ImageError, probe
    if job.op != OP_ANALYZE or job.aligned:
        return 0.0
    try:
        _, width, height = probe(job.image)
    except ImageError:  # the decoder answers for it, at its header check
        return 0.0
    return float(width * height)


def error_reply(status: int, detail: str) -> dict[str, Any]:
    return {"status": status, "detail": detail}


class Pipeline:
    """Batch function over an Analyzer. Not thread-safe (nor is the Analyzer):
    one batching loop owns one Pipeline."""

    def __init__(self, analyzer: Any, *, max_pixels: int, max_bytes: int, min_side: int = 16,
                 max_faces: int = 16, decode_max_side: int | None = 2560, worker: str = "inprocess",
                 heap_trim_s: float = 0.0) -> None:
        self.analyzer = analyzer
        self.max_faces = max_faces  # server cap per image; a job may ask for fewer
        self.max_pixels = max_pixels
        self.decode_max_side = decode_max_side  # larger uploads are decoded smaller (memory)
        self.heap = HeapTrimmer(heap_trim_s)     # freed inference memory back to the system
        self.max_bytes = max_bytes
        self.min_side = min_side
        self.worker = worker
        self.info = dict(analyzer.info)

    @classmethod
    def load(cls, settings: Any, worker: str = "inprocess", threads: int | None = None) -> "Pipeline":
        """Load weights once, apply thread settings (`threads`, else settings.torch_threads),
        warm up (first request fast)."""
        import torch
        from model.inference import Analyzer

        if threads or settings.torch_threads:
            torch.set_num_threads(threads or settings.torch_threads)
        t0 = time.perf_counter()
        analyzer = Analyzer.load(settings.weights_dir, settings.device, flip_tta=settings.flip_tta,
                                 precision=settings.precision, runtime=settings.runtime,
                                 min_face_size=settings.min_face_size, mirror_margin=settings.mirror_margin)
        analyzer.warmup()
        log.info("model %s loaded and warmed up on %s (encoders: %s %s, MTCNN: %s) in %.1f s",
                 analyzer.info.get("sha256", "")[:12], analyzer.info.get("device"), analyzer.runtime,
                 analyzer.precision, analyzer.info["detector_runtime"], time.perf_counter() - t0)
        return cls(analyzer, max_pixels=settings.max_pixels, max_bytes=settings.max_body_bytes,
                   min_side=settings.min_image_side, max_faces=settings.max_faces,
                   decode_max_side=settings.decode_max_side, worker=worker,
                   heap_trim_s=settings.heap_trim_interval_s)

    def __call__(self, jobs: list[Job]) -> list[Outcome | Exception]:
        started = time.time()
        out: list[Outcome | Exception | None] = [None] * len(jobs)
        analyze = [i for i, j in enumerate(jobs) if j.op == OP_ANALYZE]
        for i, j in enumerate(jobs):
            if j.op not in (OP_ANALYZE, OP_RENDER):
                out[i] = Outcome(error_reply(422, f"unknown operation {j.op!r}"))
        if analyze:
            self._analyze(jobs, analyze, out, started)
        for kind in RENDER_KINDS:
            idx = [i for i, j in enumerate(jobs) if j.op == OP_RENDER and j.kind == kind]
            if idx:
                self._render(jobs, idx, kind, out, started)
        for i, j in enumerate(jobs):
            if out[i] is None:  # render of an unknown kind
                out[i] = Outcome(error_reply(422, f"unknown render kind {j.kind!r}; use neutral or residue"))
        self.heap.maybe_trim()
        return out  # type: ignore[return-value]

    def _timings(self, job: Job, started: float, **extra: float) -> dict[str, float]:
        queue_ms = max(0.0, (started - job.enqueued) * 1000) if job.enqueued else 0.0
        return {"queue_ms": round(queue_ms, 2), **{k: round(v, 2) for k, v in extra.items()}}

    def _analyze(self, jobs: list[Job], idx: list[int], out: list, started: float) -> None:
        from model.images import check_min_side, load_image_scaled

        images, ok, decode_ms, scales, sizes = [], [], {}, {}, {}
        for i in idx:
            t0 = time.perf_counter()
            try:
                img, scales[i] = load_image_scaled(jobs[i].image, max_pixels=self.max_pixels,
                                                   max_bytes=self.max_bytes, max_side=self.decode_max_side)
                # the upload's own size, not the decoded one (large uploads are decoded smaller)
                sizes[i] = round(img.shape[1] / scales[i][0]), round(img.shape[0] / scales[i][1])
                check_min_side(*sizes[i], self.min_side)
            except Exception as e:  # noqa: BLE001 - typed image errors are answers
                status = image_error_status(e)
                out[i] = Outcome(error_reply(status, str(e))) if status else e
                continue
            decode_ms[i] = (time.perf_counter() - t0) * 1000
            images.append(img)
            ok.append(i)
        if not ok:
            return
        results = self.analyzer.analyze(images, aligned=[jobs[i].aligned for i in ok],
                                        max_faces=[min(jobs[i].max_faces or self.max_faces, self.max_faces)
                                                   for i in ok],
                                        neutral=[jobs[i].neutral for i in ok])
        # the batch's time per stage: detect_ms, align_ms, encode_ms, render_ms
        stages = {f"{k[:-2]}_ms": v * 1000 for k, v in getattr(self.analyzer, "last_timings", {}).items()}
        if len(results) != len(ok):
            raise RuntimeError(f"analyze returned {len(results)} results for {len(ok)} images")
        for i, res in zip(ok, results):
            if isinstance(res, Exception):
                status = image_error_status(res)
                out[i] = Outcome(error_reply(status, str(res))) if status else res
                continue
            faces, states = [], {}
            for pred in res:
                face = to_original_pixels(pred.to_dict(), *scales[i])  # box, landmarks, score, expression, pose
                face_id = uuid.uuid4().hex
                states[face_id] = pred.state.to_bytes()
                face["face_id"] = face_id
                face["neutral_png"] = (base64.b64encode(pred.neutral_png).decode()
                                       if pred.neutral_png is not None else None)
                faces.append(face)
            out[i] = Outcome({
                "status": 200, "faces": faces,
                "faces_skipped": max(0, getattr(res, "detected", len(faces)) - len(faces)),
                "image": {"width": sizes[i][0], "height": sizes[i][1]},
                "model": self.info, "worker": self.worker, "batch_size": len(ok),
                "timings": self._timings(jobs[i], started, decode_ms=decode_ms[i], **stages,
                                         model_ms=stages.get("encode_ms", 0.0) + stages.get("render_ms", 0.0)),
            }, states)

    def _render(self, jobs: list[Job], idx: list[int], kind: str, out: list, started: float) -> None:
        from model.inference import FaceState

        states, ok = [], []
        for i in idx:
            if jobs[i].state is None:
                out[i] = Outcome(error_reply(404, "unknown or expired face_id"))
                continue
            try:
                states.append(FaceState.from_bytes(jobs[i].state))
                ok.append(i)
            except Exception as e:  # noqa: BLE001
                out[i] = Outcome(error_reply(404, f"stored face is unreadable: {e}"))
        if not ok:
            return
        t0 = time.perf_counter()
        pngs = self.analyzer.render(states, kind)
        model_ms = (time.perf_counter() - t0) * 1000
        if len(pngs) != len(ok):
            raise RuntimeError(f"render returned {len(pngs)} images for {len(ok)} faces")
        for i, png in zip(ok, pngs):
            out[i] = Outcome({"status": 200, "png": base64.b64encode(png).decode(), "kind": kind,
                              "model": self.info, "worker": self.worker, "batch_size": len(ok),
                              "timings": self._timings(jobs[i], started, model_ms=model_ms)})


def to_original_pixels(face: dict[str, Any], sx: float, sy: float) -> dict[str, Any]:
    """A face's box and landmarks from the decoded image's pixels back to the upload's
    (a large upload is decoded smaller: see model.images.load_image_scaled)."""
    if (sx, sy) == (1.0, 1.0):
        return face
    back = lambda v, s: round((v + 0.5) / s - 0.5, 2)  # noqa: E731 - pixel centres
    if face.get("box"):
        x1, y1, x2, y2 = face["box"]
        face["box"] = [back(x1, sx), back(y1, sy), back(x2, sx), back(y2, sy)]
    if face.get("landmarks"):
        face["landmarks"] = [[back(x, sx), back(y, sy)] for x, y in face["landmarks"]]
    return face


def largest_face(faces: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The face with the largest box (the only one for aligned input)."""
    if not faces:
        return None

    def area(f: dict[str, Any]) -> float:
        b = f.get("box")
        return float(np.prod([b[2] - b[0], b[3] - b[1]])) if b else float("inf")
    return max(faces, key=area)
