"""Live camera over a WebSocket (`/live`): the client sends frames (JPEG or PNG,
one binary message each) and gets, per frame, the faces with a track id and
smoothed probabilities (model/video's Timeline, the same as POST /videos).

Frames are analysed one at a time, in the order they arrive, through the same
backend (and batches) as /predict. A client sends its next frame only once the
last one is answered, dropping the camera's frames in between, so a slow server
means fewer frames, not a growing delay (the page does this). Time is the
server's clock since the session began, so smoothing follows real time.

Messages to the client, JSON text: `{"frame", "t", "faces": [...], "ms"}` or,
for a frame that could not be analysed, `{"frame", "t", "error", "status"}`
(the status POST /predict would have answered); the session goes on either way.
"""
from __future__ import annotations

import hmac
import time
from typing import Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from service.backend import Backend
from service.errors import RETRY_LATER, JobError, ResultTimeout, client_detail, http_status
from service.images import probe
from service.settings import Settings

POLICY_VIOLATION = 1008   # WebSocket close code: wrong key
UNSUPPORTED_DATA = 1003   # a text message where a frame was expected


def authorised(ws: WebSocket, settings: Settings) -> bool:
    """The key in the X-API-Key header or, as browsers cannot set headers on a
    WebSocket, in the `key` query parameter."""
    expected = settings.api_key.get_secret_value() if settings.api_key else None
    if not expected:
        return True
    given = ws.headers.get("x-api-key") or ws.query_params.get("key") or ""
    return hmac.compare_digest(given.encode(), expected.encode())


async def session(ws: WebSocket, settings: Settings, backend: Backend, smoothing_s: float, max_faces: int) -> None:
    from model.video.analyze import Timeline, VideoOptions
    if not authorised(ws, settings):
        await ws.close(POLICY_VIOLATION, "missing or wrong API key (X-API-Key header or ?key=)")
        return
    await ws.accept()
    timeline = Timeline(VideoOptions(smoothing_s=smoothing_s, max_faces=max_faces))
    start, index = time.monotonic(), 0
    while True:
        try:
            message = await ws.receive()
        except WebSocketDisconnect:
            return
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            await ws.close(UNSUPPORTED_DATA, "send each frame as a binary message (JPEG or PNG)")
            return
        t, t0 = round(time.monotonic() - start, 3), time.perf_counter()
        try:
            _, width, height = probe(data, max_pixels=settings.max_pixels, max_bytes=settings.max_body_bytes,
                                     min_side=settings.min_image_side)
            reply = await backend.analyze(data, aligned=False, max_faces=max_faces, neutral=False,
                                          pixels=width * height, identity=True, keep=False)
        except (JobError, ResultTimeout, *RETRY_LATER) as e:
            await ws.send_json({"frame": index, "t": t, "error": client_detail(e), "status": http_status(e)})
            index += 1
            continue
        faces = reply["faces"]
        descriptors = np.array([f["identity"] for f in faces], np.float32).reshape(-1, 128)
        timeline.add(index, t, [_face(f) for f in faces], descriptors)
        frame = timeline.frames.pop()   # a live session keeps no history but the tracks'
        await ws.send_json({**frame, "ms": round((time.perf_counter() - t0) * 1000, 1)})
        index += 1


def _face(f: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in f.items() if k not in ("identity", "face_id", "neutral_png")}
