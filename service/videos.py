"""Videos over HTTP: POST /videos stores the upload and answers 202 with an id;
a coordinator task in the API process decodes it (model/video/decode.py, in a
thread), sends each sampled frame as an ordinary analyze job (with identity
descriptors) through the backend, so frames ride the same batches and workers as
/predict, and feeds the replies, in order, to the same `Timeline` as `ipdfer
video` (tracks, smoothing). Status, progress and the result live in the backend
(in process: memory; Redis mode: a key with TTL, readable by any API replica).

Frames travel as lossless PNG (fast compression), so a frame's faces are what
`ipdfer video` finds on it. At most `video_max_active` videos run at once, each
with at most `video_frames_in_flight` frames queued; more videos wait (status
queued) up to `video_max_waiting`, then POST answers 503. A video whose API
process stops mid-way is lost (its status stays running until it expires).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from service.backend import Backend
from service.errors import RETRY_LATER, JobError, QueueFull, ResultTimeout, client_detail
from service.settings import Settings

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5      # status writes while running, at most this often
RETRY_FOR_S = 30.0          # a frame refused as "busy" is retried this long before the video fails


def _png(rgb: np.ndarray) -> bytes:
    import cv2
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding of a frame failed")
    return buf.tobytes()


class VideoJobs:
    """The videos of one API process: uploads waiting or running, and their tasks."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        from model.video.decode import VideoLimits
        self.settings, self.backend = settings, backend
        self.limits = VideoLimits(max_duration_s=settings.video_max_duration_s, max_side=settings.video_max_side)
        self.folder = Path(settings.video_dir) if settings.video_dir else None
        self._slots = asyncio.Semaphore(settings.video_max_active)
        self._tasks: set[asyncio.Task] = set()
        self._waiting = 0

    def upload_path(self) -> tuple[str, Path]:
        import tempfile
        folder = self.folder or Path(tempfile.gettempdir()) / "ipdfer-videos"
        folder.mkdir(parents=True, exist_ok=True)
        video_id = uuid.uuid4().hex
        return video_id, folder / f"{video_id}.video"

    def busy(self) -> bool:
        return self._waiting >= self.settings.video_max_waiting + self.settings.video_max_active

    async def start(self, video_id: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Check the header (raises model.video.decode.VideoError), record the video as
        queued and start its task. The upload at `path` is deleted when the task ends."""
        from model.video.decode import read_info
        if self.busy():
            path.unlink(missing_ok=True)
            raise QueueFull(f"{self._waiting} videos are waiting or running")
        try:
            info = await asyncio.to_thread(read_info, path, self.limits)
            now = time.time()
            record = {"video_id": video_id, "status": "queued", "created": now, "updated": now, "options": options,
                      "progress": {"frames_done": 0, "frames_expected": info.expected_samples(1.0 / options["fps"])},
                      "video": info.__dict__, "error": None, "result": None}
            await self.backend.put_video(video_id, record)
        except BaseException:   # refused, or the store is down: nothing of the upload stays
            path.unlink(missing_ok=True)
            raise
        self._waiting += 1
        task = asyncio.get_running_loop().create_task(self._run(record, path))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _save(self, record: dict[str, Any], **changes: Any) -> None:
        record.update(changes, updated=time.time())
        await self.backend.put_video(record["video_id"], record)

    async def _run(self, record: dict[str, Any], path: Path) -> None:
        from model.video.decode import VideoError
        try:
            async with self._slots:
                await self._save(record, status="running")
                result = await self._analyze(record, path)
                await self._save(record, status="done", result=result,
                                 progress={**record["progress"], "frames_done": len(result["frames"])})
        except VideoError as e:
            await self._save_failure(record, e.kind, e.detail)
        except (JobError, ResultTimeout, *RETRY_LATER) as e:
            await self._save_failure(record, "unavailable", client_detail(e))
        except asyncio.CancelledError:
            await self._save_failure(record, "failed", "the service stopped while the video was analysed")
            raise
        except Exception as e:  # noqa: BLE001 - one video's failure must not reach the others
            log.exception("video %s failed", record["video_id"])
            await self._save_failure(record, "failed", f"internal error: {type(e).__name__}")
        finally:
            self._waiting -= 1
            path.unlink(missing_ok=True)

    async def _save_failure(self, record: dict[str, Any], kind: str, detail: str) -> None:
        try:
            await self._save(record, status="failed", error={"kind": kind, "detail": detail})
        except Exception:  # noqa: BLE001 - the store itself is down: nothing more to tell
            log.exception("could not record the failure of video %s", record["video_id"])

    async def _frame(self, png: bytes, pixels: int, max_faces: int, neutral: bool = False) -> dict[str, Any]:
        """One frame as an analyze job; "busy" answers are retried for a while."""
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                return await self.backend.analyze(png, aligned=False, max_faces=max_faces, neutral=neutral,
                                                  pixels=pixels, identity=not neutral, keep=False)
            except RETRY_LATER:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _analyze(self, record: dict[str, Any], path: Path) -> dict[str, Any]:
        from model.video.analyze import Timeline, VideoOptions
        from model.video.decode import sample
        o = record["options"]
        options = VideoOptions(fps=o["fps"], smoothing_s=o["smoothing"],
                               max_faces=min(o["max_faces"], self.settings.max_faces))
        timeline, stats = Timeline(options), {}
        frames = sample(path, 1.0 / options.fps, self.limits, stats)

        def next_frame() -> tuple[int, float, bytes, int] | None:
            f = next(frames, None)
            return None if f is None else (f.index, f.t, _png(f.rgb), f.rgb.shape[0] * f.rgb.shape[1])

        in_flight: deque[tuple[int, float, bytes, asyncio.Task]] = deque()
        best: dict[int, tuple[float, int, bytes, list[float]]] = {}   # track -> (quality, frame, png, box)
        last_save = time.monotonic()

        async def take_oldest() -> None:
            nonlocal last_save
            index, t, png, task = in_flight.popleft()
            try:
                reply, error = await task, None
            except JobError as e:   # this frame only (e.g. it does not decode)
                reply, error = {"faces": []}, e.detail
            faces = reply["faces"]
            descriptors = np.array([f["identity"] for f in faces], np.float32).reshape(-1, 128)
            timeline.add(index, t, [{k: v for k, v in f.items() if k not in ("identity", "face_id", "neutral_png")}
                                    for f in faces], descriptors, error)
            if o.get("neutral"):
                for row in timeline.frames[-1]["faces"]:
                    quality = _quality(row)
                    if row["track"] not in best or quality > best[row["track"]][0]:
                        best[row["track"]] = (quality, index, png, row["box"])
            if time.monotonic() - last_save > PROGRESS_EVERY_S:
                last_save = time.monotonic()
                await self._save(record, progress={**record["progress"], "frames_done": len(timeline.frames)})

        try:
            while (item := await asyncio.to_thread(next_frame)) is not None:
                index, t, png, pixels = item
                in_flight.append((index, t, png, asyncio.ensure_future(self._frame(png, pixels, options.max_faces))))
                while len(in_flight) >= self.settings.video_frames_in_flight or (in_flight and in_flight[0][3].done()):
                    await take_oldest()
            while in_flight:
                await take_oldest()
        finally:
            for *_, task in in_flight:
                task.cancel()
            await asyncio.to_thread(frames.close)
        stats.pop("info", None)
        result = timeline.result(record["video"], {**stats, "options": options.__dict__}).to_dict()
        for track in result["tracks"]:
            if track["track"] in best:
                _, index, png, box = best[track["track"]]
                track["neutral_frame"] = index
                track["neutral_png"] = await self._neutral(png, box, options.max_faces)
        return result

    async def _neutral(self, png: bytes, box: list[float], max_faces: int) -> str | None:
        """The neutral render (base64 PNG) of the face at `box` in a frame: the frame
        again, with renders, and the face that overlaps the box most."""
        reply = await self._frame(png, 0, max_faces, neutral=True)
        faces = [f for f in reply["faces"] if f.get("neutral_png")]
        if not faces:
            return None
        return max(faces, key=lambda f: _iou(f["box"], box))["neutral_png"]


def _quality(row: dict[str, Any]) -> float:
    """Which frame of a track to render neutral: the surest detection of the most frontal face."""
    return row["score"] - (abs(row["pose"]["yaw"]) + abs(row["pose"]["pitch"])) / 90.0


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0
