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
        self._tasks: dict[asyncio.Task, Path] = {}   # running or queued videos and their uploads
        self._waiting = 0                             # slots taken: uploading, queued or running

    def reserve(self) -> tuple[str, Path]:
        """A slot (503 when every one is taken) and a file for an upload, before its
        body is read: concurrent uploads cannot fill the disk past the slots. Give it
        back with `release` if the upload fails; `start` keeps it until the video ends."""
        import tempfile
        if self._waiting >= self.settings.video_max_waiting + self.settings.video_max_active:
            raise QueueFull(f"{self._waiting} videos are uploading, waiting or running")
        self._waiting += 1
        folder = self.folder or Path(tempfile.gettempdir()) / "ipdfer-videos"
        folder.mkdir(parents=True, exist_ok=True)
        video_id = uuid.uuid4().hex
        return video_id, folder / f"{video_id}.video"

    def release(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._waiting -= 1

    async def start(self, video_id: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Check the header (raises model.video.decode.VideoError), record the video as
        queued and start its task, which deletes the upload and frees the slot when it
        ends. On an error here the slot is freed and the upload deleted."""
        from model.video.decode import VideoError, read_info
        try:
            info = await asyncio.to_thread(read_info, path, self.limits)
            samples = info.expected_samples(1.0 / options["fps"])
            rows = (samples or 0) * min(options["max_faces"], self.settings.max_faces)
            if rows > self.settings.video_max_rows:
                raise VideoError("video_too_large", f"{samples} sampled frames x {options['max_faces']} faces could "
                                 f"make {rows:,} result rows; the limit is {self.settings.video_max_rows:,}: lower "
                                 "fps or max_faces, or send a shorter video")
            now = time.time()
            record = {"video_id": video_id, "status": "queued", "created": now, "updated": now, "options": options,
                      "progress": {"frames_done": 0, "frames_expected": samples},
                      "video": info.__dict__, "error": None, "result": None}
            await self.backend.put_video(video_id, record)
        except BaseException:   # refused, or the store is down: nothing of the upload stays
            self.release(path)
            raise
        task = asyncio.get_running_loop().create_task(self._run(record, path))
        self._tasks[task] = path
        task.add_done_callback(lambda t: self._tasks.pop(t, None))
        return record

    async def stop(self) -> None:
        tasks = dict(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for path in tasks.values():   # a task cancelled before its first step never ran its cleanup
            path.unlink(missing_ok=True)

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
            self.release(path)

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
        from model.video.decode import VideoError, sample
        o = record["options"]
        options = VideoOptions(fps=o["fps"], smoothing_s=o["smoothing"],
                               max_faces=min(o["max_faces"], self.settings.max_faces))
        timeline, stats = Timeline(options), {}
        frames = sample(path, 1.0 / options.fps, self.limits, stats)
        longest = self.settings.decode_max_side

        def next_frame() -> tuple[int, float, bytes, int, float] | None:
            """The next sampled frame as PNG, shrunk to decode_max_side as a worker would
            (the PNG then stays within the job's byte limit), and the scale applied."""
            f = next(frames, None)
            if f is None:
                return None
            rgb, scale = _shrink(f.rgb, longest)
            return f.index, f.t, _png(rgb), rgb.shape[0] * rgb.shape[1], scale

        in_flight: deque[tuple[int, float, bytes, float, asyncio.Task]] = deque()
        best: dict[int, tuple[float, int, bytes, list[float], int]] = {}   # track -> quality, frame, crop, box, pixels
        last_save = time.monotonic()

        async def take_oldest() -> None:
            nonlocal last_save
            index, t, png, scale, task = in_flight.popleft()
            try:
                reply, error = await task, None
            except JobError as e:   # this frame only (e.g. it does not decode)
                reply, error = {"faces": []}, e.detail
            faces = reply["faces"]
            if scale != 1.0:   # back to the video's pixels
                faces = [{**f, "box": [round(v / scale, 2) for v in f["box"]]} for f in faces]
            timeline.add_served(index, t, faces, error)
            if o.get("neutral"):
                for row in timeline.frames[-1]["faces"]:
                    quality = _quality(row)
                    if row["track"] not in best or quality > best[row["track"]][0]:
                        crop, box, pixels = await asyncio.to_thread(_face_crop, png, [v * scale for v in row["box"]])
                        best[row["track"]] = (quality, index, crop, box, pixels)
            if time.monotonic() - last_save > PROGRESS_EVERY_S:
                last_save = time.monotonic()
                await self._save(record, progress={**record["progress"], "frames_done": len(timeline.frames)})

        try:
            while (item := await asyncio.to_thread(next_frame)) is not None:
                index, t, png, pixels, scale = item
                job = asyncio.ensure_future(self._frame(png, pixels, options.max_faces))
                in_flight.append((index, t, png, scale, job))
                while len(in_flight) >= self.settings.video_frames_in_flight or (in_flight and in_flight[0][4].done()):
                    await take_oldest()
            while in_flight:
                await take_oldest()
        finally:
            for *_, task in in_flight:
                task.cancel()
            try:
                await asyncio.to_thread(frames.close)
            except (ValueError, RuntimeError):   # cancelled while a frame was being decoded: it closes itself
                pass
        if timeline.frames and all("error" in f for f in timeline.frames):
            raise VideoError("bad_video", f"no sampled frame could be analysed: {timeline.frames[0]['error']}")
        stats.pop("info", None)
        result = timeline.result(record["video"], {**stats, "options": options.__dict__}).to_dict()
        for track in result["tracks"]:
            if track["track"] in best:
                _, index, crop, box, pixels = best[track["track"]]
                track["neutral_frame"] = index
                track["neutral_png"] = await self._neutral(crop, box, pixels, options.max_faces)
        return result

    async def _neutral(self, crop: bytes, box: list[float], pixels: int, max_faces: int) -> str | None:
        """The neutral render (base64 PNG) of the face at `box` of a crop around it:
        the crop analysed again with renders, and the face that overlaps the box most."""
        reply = await self._frame(crop, pixels, max_faces, neutral=True)
        faces = [f for f in reply["faces"] if f.get("neutral_png")]
        if not faces:
            return None
        return max(faces, key=lambda f: _iou(f["box"], box))["neutral_png"]


def _shrink(rgb: np.ndarray, longest: int) -> tuple[np.ndarray, float]:
    import cv2
    scale = min(1.0, longest / max(rgb.shape[:2]))
    if scale == 1.0:
        return rgb, 1.0
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


def _face_crop(png: bytes, box: list[float]) -> tuple[bytes, list[float], int]:
    """A square around the box (twice its size: the detector needs context), as PNG,
    with the box in the crop's pixels and the crop's pixel count. Kept per track for
    the neutral render instead of the whole frame."""
    import cv2
    frame = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    x1, y1, x2, y2 = box
    side = 2 * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    crop = frame[top:int(min(frame.shape[0], cy + side / 2)), left:int(min(frame.shape[1], cx + side / 2))]
    ok, buf = cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return buf.tobytes(), [x1 - left, y1 - top, x2 - left, y2 - top], crop.shape[0] * crop.shape[1]


def _quality(row: dict[str, Any]) -> float:
    """Which frame of a track to render neutral: the surest detection of the most frontal face."""
    return row["score"] - (abs(row["pose"]["yaw"]) + abs(row["pose"]["pitch"])) / 90.0


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0
