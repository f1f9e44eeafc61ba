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
With IPDFER_API_KEY set, the key comes in the X-API-Key header or as a first text
message `{"key": "..."}` (browsers cannot set WebSocket headers, and a key in the
URL would be written to access logs); else the session closes with 1008.
"""
from __future__ import annotations

import hmac
import json
import time
from fastapi import WebSocket, WebSocketDisconnect

from service.backend import Backend
from service.errors import RETRY_LATER, JobError, ResultTimeout, client_detail, http_status
from service.images import probe
from service.settings import Settings

POLICY_VIOLATION = 1008   # WebSocket close code: missing or wrong key
UNSUPPORTED_DATA = 1003   # a text message that is not the key
FORGET_AFTER_S = 300.0    # a person unseen this long gets a new track id (bounds a session's memory)


def _key_message(text: str) -> str | None:
    """The key of a text message {"key": "..."}; None for any other text."""
    try:
        message = json.loads(text)
    except ValueError:
        return None
    key = message.get("key") if isinstance(message, dict) else None
    return key if isinstance(key, str) else None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def session(ws: WebSocket, settings: Settings, backend: Backend, smoothing_s: float, max_faces: int) -> None:
    from model.video.analyze import Timeline, VideoOptions
    expected = settings.api_key.get_secret_value() if settings.api_key else None
    # The key comes in the X-API-Key header or, as browsers cannot set headers on a
    # WebSocket, in a first text message: never in the URL, which servers log.
    authorised = not expected or _same(ws.headers.get("x-api-key", ""), expected)
    await ws.accept()   # then close with a code and reason a browser can read
    timeline = Timeline(VideoOptions(smoothing_s=smoothing_s, max_faces=max_faces), forget_after_s=FORGET_AFTER_S)
    start, index = time.monotonic(), 0
    while True:
        try:
            message = await ws.receive()
        except WebSocketDisconnect:
            return
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            key = _key_message(message["text"])
            if key is None:
                await ws.close(UNSUPPORTED_DATA, 'send frames as binary messages; the only text message is {"key": "..."}')
                return
            authorised = authorised or (expected is not None and _same(key, expected))
            if not authorised:
                await ws.close(POLICY_VIOLATION, "wrong API key")
                return
            continue
        if not authorised:
            await ws.close(POLICY_VIOLATION, 'missing API key: send it in X-API-Key or as a first text message {"key": "..."}')
            return
        data = message.get("bytes") or b""
        t, t0 = round(time.monotonic() - start, 3), time.perf_counter()
        try:
            _, width, height = probe(data, max_pixels=settings.max_pixels, max_bytes=settings.max_body_bytes,
                                     min_side=settings.min_image_side)
            reply = await backend.analyze(data, aligned=False, max_faces=max_faces, neutral=False,
                                          pixels=width * height, identity=True, keep=False)
            timeline.add_served(index, t, reply["faces"])
            answer = {**timeline.frames.pop(), "ms": round((time.perf_counter() - t0) * 1000, 1)}
        except (JobError, ResultTimeout, *RETRY_LATER) as e:
            answer = {"frame": index, "t": t, "error": client_detail(e), "status": http_status(e)}
        index += 1
        try:
            await ws.send_json(answer)
        except (WebSocketDisconnect, RuntimeError):   # the client left while its frame was analysed
            return
