"""POST /videos and GET /videos/{id} in in-process mode with the real model: the
HTTP result is what `ipdfer video` gives on the same clip, broken uploads are
refused with 4xx at upload, and the service keeps answering after them."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from model.labels import EXPRESSIONS
from model.video.analyze import CSV_COLUMNS, VideoOptions, analyze_video
from service.schemas import VideoOut
from tests.test_service_api import app_client, run, settings
from tests.test_video import broken_corpus, close_up_face, encode_clip, moving_face


async def wait_done(client, location: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(location)
        assert r.status_code == 200, r.text
        body = r.json()
        VideoOut.model_validate(body)
        if body["status"] in ("done", "failed"):
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"video not done within {timeout} s: {body}")


def test_a_video_over_http_is_what_ipdfer_video_gives(service_pipeline):
    clip = encode_clip(moving_face(50))
    expected = analyze_video(service_pipeline.analyzer, clip, VideoOptions(fps=5.0, smoothing_s=0.5))

    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            r = await c.post("/videos?fps=5&smoothing=0.5", files={"file": ("clip.mp4", clip, "video/mp4")})
            assert r.status_code == 202, r.text
            first = r.json()
            assert first["status"] in ("queued", "running") and r.headers["location"] == f"/videos/{first['video_id']}"
            assert first["progress"] == {"frames_done": 0, "frames_expected": 10}
            assert first["video"]["width"] == 360 and first["video"]["codec"] == "h264"
            body = await wait_done(c, r.headers["location"])
            csv = await c.get(r.headers["location"], params={"format": "csv"})
            # a raw body works too; neutral renders of each track's best frame on request
            raw = await c.post("/videos?neutral=true", content=clip, headers={"content-type": "video/mp4"})
            raw = await wait_done(c, raw.headers["location"])
            metrics = (await c.get("/metrics")).text
            return body, csv, raw, metrics

    body, csv, raw, metrics = run(go())
    assert body["status"] == "done" and body["error"] is None, body
    assert body["progress"]["frames_done"] == 10
    result = body["result"]
    assert [t["track"] for t in result["tracks"]] == [1] and result["tracks"] == expected.tracks
    assert len(result["frames"]) == len(expected.frames) == 10
    for got, want in zip(result["frames"], expected.frames):
        assert (got["frame"], got["t"]) == (want["frame"], want["t"])
        (g,), (w,) = got["faces"], want["faces"]
        assert g["track"] == w["track"] and g["box"] == w["box"] and g["label"] == w["label"]
        assert max(abs(g["probabilities"][c] - w["probabilities"][c]) for c in EXPRESSIONS) < 1e-4
        assert max(abs(g["smoothed"][c] - w["smoothed"][c]) for c in EXPRESSIONS) < 1e-4
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.splitlines()
    assert lines[0].split(",") == CSV_COLUMNS and len(lines) == 11
    assert raw["status"] == "done" and raw["result"]["frames"] == result["frames"]
    (track,) = raw["result"]["tracks"]
    assert track["neutral_frame"] in [f["frame"] for f in result["frames"]]
    neutral = Image.open(io.BytesIO(base64.b64decode(track["neutral_png"])))
    assert neutral.format == "PNG" and neutral.size == (128, 128)
    assert "neutral_png" not in result["tracks"][0]
    # video frames do not fill the store of faces kept for GET /neutralize
    assert "ipdfer_face_states 0.0" in metrics


def _png(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_broken_or_too_large_videos_are_refused_at_upload_and_the_service_stays_up(service_pipeline, tmp_path):
    clip = encode_clip(moving_face(50))   # 2 s
    s = settings(video_max_duration_s=1.0, video_max_mb=0.5, video_dir=tmp_path, video_max_rows=100)

    async def go():
        async with app_client(s, [service_pipeline]) as c:
            answers = {}
            for name, data in broken_corpus():
                answers[name] = await c.post("/videos", content=data)
            answers["png image"] = await c.post("/videos", content=_png())
            answers["empty"] = await c.post("/videos", content=b"")
            answers["too long"] = await c.post("/videos", content=clip)
            answers["too many bytes"] = await c.post("/videos", content=b"\0" * (600 << 10))
            answers["text body"] = await c.post("/videos", content=b"x", headers={"content-type": "text/plain"})
            answers["multipart without file"] = await c.post("/videos", data={"a": "b"}, files={})
            answers["fps 0"] = await c.post("/videos?fps=0", content=clip)
            answers["too many rows"] = await c.post("/videos?fps=30&max_faces=8", content=encode_clip(moving_face(24)))
            answers["unknown option"] = await c.post("/videos?colour=1", content=clip)
            unknown = await c.get("/videos/" + "0" * 32)
            bad_id = await c.get("/videos/not-an-id")
            short = encode_clip(moving_face(12))   # 0.48 s: within the limit
            ok = await c.post("/videos", content=short)
            return answers, unknown, bad_id, await wait_done(c, ok.headers["location"])

    answers, unknown, bad_id, ok = run(go())
    statuses = {name: r.status_code for name, r in answers.items()}
    for name, r in answers.items():
        assert "detail" in r.json(), name
    assert all(statuses[name] == 400 for name, _ in broken_corpus() if name != "jpeg-as-video"), statuses
    assert statuses["jpeg-as-video"] == 415
    assert statuses["png image"] == 415 and "not a video this service takes" in answers["png image"].json()["detail"]
    assert statuses["empty"] == 400 and statuses["multipart without file"] == 400
    assert statuses["too long"] == 413 and "limit is 1 s" in answers["too long"].json()["detail"]
    assert statuses["too many bytes"] == 413 and statuses["text body"] == 415
    assert statuses["fps 0"] == 422 and statuses["unknown option"] == 422
    assert statuses["too many rows"] == 413 and "result rows" in answers["too many rows"].json()["detail"]
    assert not list(tmp_path.iterdir())   # no refused upload left a file, the analysed one is deleted
    assert unknown.status_code == 404 and bad_id.status_code == 422
    assert ok["status"] == "done" and len(ok["result"]["frames"]) == 3


def test_csv_waits_for_the_result_and_a_full_service_answers_503(service_pipeline, tmp_path):
    clip = encode_clip(moving_face(50))
    s = settings(video_max_active=1, video_max_waiting=0, video_dir=tmp_path)

    async def go():
        async with app_client(s, [service_pipeline]) as c:
            first = await c.post("/videos", content=clip)
            early_csv = await c.get(first.headers["location"], params={"format": "csv"})
            second = await c.post("/videos", content=clip)
            uploads_while_running = sorted(p.name for p in tmp_path.iterdir())
            done = await wait_done(c, first.headers["location"])
            return first, early_csv, second, uploads_while_running, done

    first, early_csv, second, uploads, done = run(go())
    assert first.status_code == 202
    assert early_csv.status_code == 409 and "once the status is done" in early_csv.json()["detail"]
    assert second.status_code == 503 and second.headers["retry-after"]
    assert uploads == [f"{first.json()['video_id']}.video"]          # the refused one left nothing
    assert done["status"] == "done" and not list(tmp_path.iterdir())   # the upload is deleted once analysed


def test_a_video_too_long_for_its_header_fails_while_decoding(service_pipeline):
    """A WebM from a live recorder has no duration in its header: the limit is
    checked while decoding, and the status says why it stopped."""
    import av
    buf = io.BytesIO()
    out = av.open(buf, "w", format="webm", options={"live": "1"})
    stream = out.add_stream("libvpx-vp9", rate=25)
    stream.height, stream.width = 240, 360
    for f in moving_face(50):
        for p in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            out.mux(p)
    for p in stream.encode():
        out.mux(p)
    out.close()
    s = settings(video_max_duration_s=1.0)

    async def go():
        async with app_client(s, [service_pipeline]) as c:
            r = await c.post("/videos", content=buf.getvalue())
            if r.status_code == 413:
                pytest.skip("this FFmpeg writes a duration into live WebM headers")
            return await wait_done(c, r.headers["location"])

    body = run(go())
    assert body["status"] == "failed" and body["error"]["kind"] == "video_too_large", body
    assert body["result"] is None


# --- live camera over a WebSocket ----------------------------------------------------


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_live_frames_get_tracked_smoothed_faces_and_a_bad_frame_fails_alone(service_pipeline):
    from fastapi.testclient import TestClient
    from service.backend import InProcessBackend
    from service.server import create_app
    s = settings(api_key="sesame")
    app = create_app(s, backend=InProcessBackend(s, pipelines=[service_pipeline]))
    frames = moving_face(30)[::5]
    with TestClient(app) as client:
        replies = []
        with client.websocket_connect("/live?smoothing=0.5") as ws:
            ws.send_text(json.dumps({"key": "sesame"}))   # the key in a first message, as the page sends it
            for k, rgb in enumerate(frames):
                ws.send_bytes(_jpeg(rgb) if k != 3 else b"\xff\xd8 not a jpeg")
                replies.append(ws.receive_json())
        closes = {}
        with client.websocket_connect("/live") as ws:     # no key: refused at the first frame
            ws.send_bytes(_jpeg(frames[0]))
            closes["no key"] = ws.receive()
        with client.websocket_connect("/live") as ws:
            ws.send_text(json.dumps({"key": "wrong"}))
            closes["wrong key"] = ws.receive()
        with client.websocket_connect("/live", headers={"X-API-Key": "sesame"}) as ws:
            ws.send_bytes(_jpeg(frames[0]))
            by_header = ws.receive_json()
            ws.send_text("hello")
            closes["text"] = ws.receive()
    assert [r["frame"] for r in replies] == list(range(len(frames)))
    assert replies[3]["status"] == 400 and "error" in replies[3] and "faces" not in replies[3]
    good = [r for k, r in enumerate(replies) if k != 3]
    assert all(len(r["faces"]) == 1 and r["faces"][0]["track"] == 1 for r in good), good
    assert [r["t"] for r in good] == sorted(r["t"] for r in good)
    for r in good:
        face = r["faces"][0]
        assert set(face["smoothed"]) == set(EXPRESSIONS) and face["smoothed_label"] in EXPRESSIONS
        assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert face["box"][0] < face["box"][2] and "identity" not in face
    # a track's first frame has nothing to smooth with: smoothed = raw
    first = good[0]["faces"][0]
    assert first["smoothed"] == pytest.approx(first["probabilities"], abs=1e-4)
    assert len(by_header["faces"]) == 1
    assert {k: (c["type"], c["code"]) for k, c in closes.items()} == {
        "no key": ("websocket.close", 1008), "wrong key": ("websocket.close", 1008), "text": ("websocket.close", 1003)}
    assert "missing API key" in closes["no key"]["reason"]


def test_videos_need_the_api_key_when_one_is_set(service_pipeline):
    clip = encode_clip(moving_face(12))

    async def go():
        async with app_client(settings(api_key="sesame"), [service_pipeline]) as c:
            refused = await c.post("/videos", content=clip)
            ok = await c.post("/videos", content=clip, headers={"X-API-Key": "sesame"})
            status_refused = await c.get(ok.headers["location"])
            return refused, ok, status_refused

    refused, ok, status_refused = run(go())
    assert refused.status_code == 401 and status_refused.status_code == 401 and ok.status_code == 202


def test_a_video_larger_than_the_decode_limit_is_shrunk_and_answered_in_its_own_pixels(service_pipeline):
    """Frames over IPDFER_DECODE_MAX_SIDE are shrunk before they become jobs (a worker
    would shrink them anyway); the boxes come back in the video's pixels."""
    clip = encode_clip(close_up_face(20))   # 480 x 320, a 200 px face close-up
    expected = analyze_video(service_pipeline.analyzer, clip, VideoOptions(fps=5.0))

    async def go():
        async with app_client(settings(decode_max_side=320), [service_pipeline]) as c:
            r = await c.post("/videos?neutral=true", content=clip)
            return await wait_done(c, r.headers["location"])

    body = run(go())
    assert body["status"] == "done", body
    for got, want in zip(body["result"]["frames"], expected.frames):
        (g,), (w,) = got["faces"], want["faces"]
        assert np.abs(np.array(g["box"]) - np.array(w["box"])).max() < 8, (g["box"], w["box"])
    assert body["result"]["tracks"][0]["neutral_png"]
