"""The batch function every mode runs: a list of jobs in, one reply per job out.
Pure compute (no Redis, no HTTP): the Redis worker, the in-process batcher and
`ipdfer predict` all call `Pipeline.__call__`.

Per job:
  analyze  raw image bytes -> decode (model.images.load_image, typed errors) ->
           one batched `Analyzer.analyze` over the whole batch -> faces + face ids
           (+ identity descriptors for the jobs that ask: video frames)
  render   a stored FaceState -> one batched `Analyzer.render` per kind -> PNG

A bad input becomes an error reply for that job only (service/jobs.py: an error
kind and the decoder's message). An unexpected exception is returned in the
job's slot instead: the caller retries it (Redis worker, then dead letter) or
answers 500 (in process).
"""
from __future__ import annotations

import base64
import logging
import time
import uuid
from typing import Any

from service.jobs import OP_ANALYZE, OP_RENDER, RENDER_KINDS, Job, Outcome, error_reply, image_error_kind
from service.memory import HeapTrimmer

log = logging.getLogger(__name__)


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
        from model.serving.analyzer import Analyzer

        if threads or settings.torch_threads:
            torch.set_num_threads(threads or settings.torch_threads)
        t0 = time.perf_counter()
        analyzer = Analyzer.load(settings.weights_dir, min_face_size=settings.min_face_size, **settings.plan_options())
        analyzer.warmup()
        log.info("model %s loaded and warmed up in %.1f s; serving plan: %s",
                 analyzer.info.get("sha256", "")[:12], time.perf_counter() - t0, analyzer.plan)
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
                out[i] = Outcome(error_reply("bad_job", f"unknown operation {j.op!r}"))
        if analyze:
            self._analyze(jobs, analyze, out, started)
        for kind in RENDER_KINDS:
            idx = [i for i, j in enumerate(jobs) if j.op == OP_RENDER and j.kind == kind]
            if idx:
                self._render(jobs, idx, kind, out, started)
        for i, j in enumerate(jobs):
            if out[i] is None:  # render of an unknown kind
                out[i] = Outcome(error_reply("bad_job", f"unknown render kind {j.kind!r}; use neutral or residue"))
        self.heap.maybe_trim()
        return out  # type: ignore[return-value]

    def _timings(self, job: Job, started: float, **extra: float) -> dict[str, float]:
        queue_ms = max(0.0, (started - job.enqueued) * 1000) if job.enqueued else 0.0
        return {"queue_ms": round(queue_ms, 2), **{k: round(v, 2) for k, v in extra.items()}}

    def _analyze(self, jobs: list[Job], idx: list[int], out: list, started: float) -> None:
        from model.images import check_min_side, load_image_scaled
        from model.serving.analyzer import ImageRequest

        requests, ok, decode_ms, scales, sizes = [], [], {}, {}, {}
        for i in idx:
            t0 = time.perf_counter()
            try:
                img, scales[i] = load_image_scaled(jobs[i].image, max_pixels=self.max_pixels,
                                                   max_bytes=self.max_bytes, max_side=self.decode_max_side)
                # the upload's own size, not the decoded one (large uploads are decoded smaller)
                sizes[i] = round(img.shape[1] / scales[i][0]), round(img.shape[0] / scales[i][1])
                check_min_side(*sizes[i], self.min_side)
            except Exception as e:  # noqa: BLE001 - typed image errors are answers
                kind = image_error_kind(e)
                out[i] = Outcome(error_reply(kind, str(e))) if kind else e
                continue
            decode_ms[i] = (time.perf_counter() - t0) * 1000
            requests.append(ImageRequest(img, aligned=jobs[i].aligned, largest=jobs[i].largest,
                                         max_faces=min(jobs[i].max_faces or self.max_faces, self.max_faces),
                                         neutral=jobs[i].neutral))
            ok.append(i)
        if not ok:
            return
        analysis = self.analyzer.analyze(requests)
        # the batch's time per stage: detect_ms, align_ms, encode_ms, render_ms
        stages = {f"{k[:-2]}_ms": v * 1000 for k, v in analysis.timings.items()}
        if len(analysis.images) != len(ok):
            raise RuntimeError(f"analyze returned {len(analysis.images)} results for {len(ok)} images")
        # identity descriptors (video tracks) in one pass over the faces of the jobs that ask
        wanted = [pred.state for i, res in zip(ok, analysis.images) if res.error is None and jobs[i].identity
                  for pred in res.faces]
        descriptors = iter(self.analyzer.identities(wanted).tolist() if wanted else [])
        for i, res in zip(ok, analysis.images):
            if res.error is not None:
                kind = image_error_kind(res.error)
                out[i] = Outcome(error_reply(kind, str(res.error))) if kind else res.error
                continue
            faces, states = [], {}
            for pred in res.faces:
                face = to_original_pixels(pred.to_dict(), *scales[i])  # box, landmarks, score, expression, pose
                face_id = uuid.uuid4().hex
                if jobs[i].keep:
                    states[face_id] = pred.state.to_bytes()
                face["face_id"] = face_id
                if jobs[i].identity:
                    face["identity"] = [round(v, 5) for v in next(descriptors)]
                face["neutral_png"] = (base64.b64encode(pred.neutral_png).decode()
                                       if pred.neutral_png is not None else None)
                faces.append(face)
            out[i] = Outcome({
                "faces": faces, "faces_skipped": max(0, res.detected - len(faces)),
                "image": {"width": sizes[i][0], "height": sizes[i][1]},
                "model": self.info, "worker": self.worker, "batch_size": len(ok),
                "timings": self._timings(jobs[i], started, decode_ms=decode_ms[i], **stages,
                                         model_ms=stages.get("encode_ms", 0.0) + stages.get("render_ms", 0.0)),
            }, states)

    def _render(self, jobs: list[Job], idx: list[int], kind: str, out: list, started: float) -> None:
        from model.serving.face_state import FaceState

        states, ok = [], []
        for i in idx:
            if jobs[i].state is None:
                out[i] = Outcome(error_reply("unknown_face", "unknown or expired face_id"))
                continue
            try:
                states.append(FaceState.from_bytes(jobs[i].state))
                ok.append(i)
            except Exception as e:  # noqa: BLE001
                out[i] = Outcome(error_reply("unknown_face", f"stored face is unreadable: {e}"))
        if not ok:
            return
        t0 = time.perf_counter()
        pngs = self.analyzer.render(states, kind)
        model_ms = (time.perf_counter() - t0) * 1000
        if len(pngs) != len(ok):
            raise RuntimeError(f"render returned {len(pngs)} images for {len(ok)} faces")
        for i, png in zip(ok, pngs):
            out[i] = Outcome({"png": base64.b64encode(png).decode(), "kind": kind,
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
