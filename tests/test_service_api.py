"""The HTTP API in in-process mode with the real model (weights/), driven through
httpx's ASGI transport; plus backpressure/timeouts with a fake batch function."""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model.labels import EXPRESSIONS
from service.backend import InProcessBackend
from service.jobs import Outcome
from service.schemas import PredictOut
from service.server import create_app
from service.settings import Settings
from tests.data_samples import astronaut_jpegs

# --- images ------------------------------------------------------------------------


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def astronaut() -> np.ndarray:
    from skimage import data
    return data.astronaut()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header declaring width x height, with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def jpeg_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A real small JPEG whose SOF0 header claims width x height."""
    data = bytearray(encode(np.full((32, 32, 3), 128, np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64


def malformed_corpus() -> list[tuple[str, bytes, str | None]]:
    """(name, body, content type): inputs that must each get a 4xx with a message."""
    rng = np.random.default_rng(0)
    jpg, png = encode(astronaut(), "JPEG"), encode(astronaut(), "PNG")
    gif = encode(np.zeros((32, 32, 3), np.uint8), "GIF")
    corpus = [
        ("empty", b"", "image/jpeg"),
        ("empty-no-type", b"", None),
        ("truncated-jpeg", jpg[: len(jpg) // 2], "image/jpeg"),
        ("truncated-png", png[: len(png) // 3], "image/png"),
        ("jpeg-header-only", jpg[:300], "image/jpeg"),
        ("gif", gif, "image/gif"),
        ("text-as-image", b"hello, this is not an image", "image/png"),
        ("pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF", "application/pdf"),
        ("json-body", b'{"image": "base64..."}', "application/json"),
        ("1x1-png", encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "image/png"),
        ("1x1-jpeg", encode(np.zeros((1, 1, 3), np.uint8), "JPEG"), "image/jpeg"),
        ("png-20000x20000-bomb", png_header_bomb(), "image/png"),
        ("jpeg-20000x20000-bomb", jpeg_header_bomb(), "image/jpeg"),
        ("bmp-20000x20000-bomb", bmp_header_bomb(), "image/bmp"),
        ("png-8000x8000-bomb", png_header_bomb(8000, 8000), "application/octet-stream"),
    ]
    headers = {"jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "png": b"\x89PNG\r\n\x1a\n",
               "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 ", "bmp": b"BM", "tiff-le": b"II*\x00",
               "tiff-be": b"MM\x00*", "gif": b"GIF89a"}
    for name, magic in headers.items():
        for size in (16, 4096):
            corpus.append((f"random-{name}-{size}", magic + rng.bytes(size), "application/octet-stream"))
    return corpus


# --- running the app ---------------------------------------------------------------


def settings(**kw) -> Settings:
    return Settings(**{"redis_url": None, "max_batch_size": 8, "max_wait_ms": 5, **kw})


@asynccontextmanager
async def app_client(s: Settings, pipelines: list):
    app = create_app(s, backend=InProcessBackend(s, pipelines=pipelines))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client


def run(coro):
    return asyncio.run(coro)


def assert_valid_prediction(body: dict, width: int, height: int) -> None:
    PredictOut.model_validate(body)  # the documented response schema
    assert body["image"] == {"width": width, "height": height}
    assert body["model"]["sha256"] and body["model"]["name"]
    for key in ("queue_ms", "decode_ms", "detect_ms", "align_ms", "encode_ms", "render_ms", "model_ms", "total_ms"):
        assert body["timings"][key] >= 0
    for face in body["faces"]:
        probs = face["expression"]["probabilities"]
        assert list(probs) == list(EXPRESSIONS)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
        assert face["expression"]["label"] == max(probs, key=probs.get)
        assert face["expression"]["confidence"] == pytest.approx(max(probs.values()))
        assert set(face["pose"]) == {"yaw", "pitch", "roll"}
        assert all(np.isfinite(v) for v in face["pose"].values())
        if face["box"] is not None:
            x1, y1, x2, y2 = face["box"]
            assert x1 < x2 and y1 < y2  # may reach past the border, but must overlap the image
            assert x1 < width and x2 > 0 and y1 < height and y2 > 0
            assert len(face["landmarks"]) == 5 and 0 < face["score"] <= 1


# --- tests -------------------------------------------------------------------------


def test_predict_round_trip_on_real_photos(service_pipeline):
    photos = astronaut_jpegs(3)   # 224 x 224, as muxspace's photos are; one of them greyscale
    img = astronaut()

    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            r = await c.post("/predict", files={"file": ("astronaut.jpg", encode(img, "JPEG"), "image/jpeg")},
                             headers={"X-Request-ID": "req-123"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["request_id"] == "req-123" == r.headers["x-request-id"]
            assert_valid_prediction(body, 512, 512)
            assert len(body["faces"]) == 1 and body["faces"][0]["score"] > 0.9
            assert body["faces"][0]["neutral_png"] is None
            # raw bodies, several at once (batched together), PNG too
            bodies = [*photos, encode(img, "PNG")]
            rs = await asyncio.gather(*[c.post("/predict", content=b, headers={"content-type": "image/jpeg"})
                                        for b in bodies])
            for r in rs:
                assert r.status_code == 200, r.text
                w, h = (512, 512) if r is rs[-1] else (224, 224)
                assert_valid_prediction(r.json(), w, h)
                assert len(r.json()["faces"]) >= 1
            assert max(r.json()["batch_size"] for r in rs) > 1
            # what `curl --data-binary @face.jpg` sends: the bytes decide, not the header
            r = await c.post("/predict", content=bodies[0],
                             headers={"content-type": "application/x-www-form-urlencoded"})
            assert r.status_code == 200 and r.json()["faces"]
    run(go())


def test_neutral_renders_are_decodable_pngs(service_pipeline):
    jpg = encode(astronaut(), "JPEG")

    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            r = await c.post("/predict?neutral=true&max_faces=1", content=jpg)
            assert r.status_code == 200, r.text
            face = r.json()["faces"][0]
            inline = Image.open(io.BytesIO(base64.b64decode(face["neutral_png"])))
            # renders big enough to look at (the editing renderer edits a 128 px crop)
            assert inline.format == "PNG" and min(inline.size) >= 112

            r = await c.get("/neutralize", params={"face_id": face["face_id"]})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            neutral = Image.open(io.BytesIO(r.content))
            neutral.load()
            assert neutral.size == inline.size
            r = await c.get("/neutralize", params={"face_id": face["face_id"], "kind": "residue"})
            assert r.status_code == 200
            residue = Image.open(io.BytesIO(r.content))
            residue.load()
            assert residue.mode == "RGB"  # a heatmap

            r = await c.post("/neutralize", files={"file": ("a.jpg", jpg, "image/jpeg")})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            Image.open(io.BytesIO(r.content)).load()
            assert len(r.headers["x-face-id"]) == 32

            r = await c.get("/neutralize", params={"face_id": "0" * 32})
            assert r.status_code == 404 and "expired" in r.json()["detail"]
            r = await c.get("/neutralize", params={"face_id": "../etc/passwd"})
            assert r.status_code == 422 and r.json()["detail"]
            r = await c.get("/neutralize", params={"face_id": face["face_id"], "kind": "angry"})
            assert r.status_code == 422
            # no face: a clear 422, not an empty PNG
            r = await c.post("/neutralize", content=encode(np.full((64, 64, 3), 200, np.uint8), "PNG"))
            assert r.status_code == 422 and "no face" in r.json()["detail"]
    run(go())


def test_aligned_input_is_located_on_the_crop_and_its_detection_timed(service_pipeline):
    """aligned=true: MTCNN runs on the crop (to align it as training crops were) and
    its time is reported as detect_ms; the reply has no box, landmarks or score."""
    crop = np.ascontiguousarray(astronaut()[40:200, 145:305])  # the face, roughly centred

    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            r = await c.post("/predict?aligned=true", content=encode(crop, "PNG"))
            assert r.status_code == 200, r.text
            body = r.json()
            assert_valid_prediction(body, 160, 160)
            (face,) = body["faces"]
            assert face["box"] is None and face["landmarks"] is None and face["score"] is None
            assert body["timings"]["detect_ms"] > 0
    run(go())


def crowd(tile: int = 160, rows: int = 4, cols: int = 5) -> np.ndarray:
    """One photo of rows x cols copies of the astronaut's face."""
    face = np.ascontiguousarray(astronaut()[30:30 + tile, 145:145 + tile])
    return np.vstack([np.hstack([face] * cols)] * rows)


def test_faces_per_image_are_capped_and_the_reply_counts_the_rest(service_pipeline):
    from service.pipeline import Pipeline
    capped = Pipeline(service_pipeline.analyzer, max_pixels=40_000_000, max_bytes=20 << 20, max_faces=3,
                      worker="test")
    jpg = encode(crowd(), "JPEG", quality=95)

    async def go():
        async with app_client(settings(), [capped]) as c:
            r = await c.post("/predict?neutral=true", content=jpg)
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["faces"]) == 3 and all(f["neutral_png"] for f in body["faces"])
            assert body["faces_skipped"] >= 10, body["faces_skipped"]  # 20 faces in the photo
            detected = len(body["faces"]) + body["faces_skipped"]
            r = await c.post("/predict?max_faces=2", content=jpg)   # a request may ask for fewer ...
            assert len(r.json()["faces"]) == 2 and r.json()["faces_skipped"] == detected - 2
            r = await c.post("/predict?max_faces=10", content=jpg)  # ... not for more than the server's cap
            assert len(r.json()["faces"]) == 3
    run(go())


def test_bad_options_are_422_with_a_message(service_pipeline):
    jpg = encode(astronaut(), "JPEG")

    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            for query in ("max_faces=0", "max_faces=many", "neutral=perhaps", "aligned=2", "unknown=1"):
                r = await c.post(f"/predict?{query}", content=jpg)
                assert r.status_code == 422, query
                assert isinstance(r.json()["detail"], str) and r.json()["detail"], query
    run(go())


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_inputs_get_4xx_and_the_service_stays_up(service_pipeline):
    corpus = malformed_corpus()

    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            seen = {}
            for name, body, ctype in corpus:
                headers = {"content-type": ctype} if ctype else {}
                r = await c.post("/predict", content=body, headers=headers)
                seen[name] = r.status_code
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
                detail = r.json()["detail"]
                assert isinstance(detail, str) and len(detail) > 5, name
            assert seen["png-20000x20000-bomb"] == seen["jpeg-20000x20000-bomb"] == 413
            assert seen["bmp-20000x20000-bomb"] == seen["png-8000x8000-bomb"] == 413
            assert seen["gif"] == seen["pdf"] == seen["json-body"] == 415
            assert seen["1x1-png"] == seen["1x1-jpeg"] == 422
            assert seen["empty"] == seen["truncated-jpeg"] == seen["truncated-png"] == 400
            r = await c.post("/predict", content=encode(astronaut(), "JPEG"))
            assert r.status_code == 200 and len(r.json()["faces"]) == 1
            assert (await c.get("/readyz")).status_code == 200
    run(go())


def test_body_limit_is_enforced_while_reading(service_pipeline):
    big = encode(astronaut(), "PNG")  # ~500 KB

    async def chunks():
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    async def go():
        async with app_client(settings(max_body_bytes=100_000), [service_pipeline]) as c:
            r = await c.post("/predict", content=big)  # Content-Length says too much
            assert r.status_code == 413 and "limit" in r.json()["detail"]
            r = await c.post("/predict", content=chunks())  # chunked: no length, counted while reading
            assert r.status_code == 413
            r = await c.post("/predict", files={"file": ("big.png", big, "image/png")})
            assert r.status_code == 413
            form = (b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nb\r\n--XyZ--\r\n")
            r = await c.post("/predict", content=form, headers={"content-type": "multipart/form-data; boundary=XyZ"})
            assert r.status_code == 400 and "field 'file'" in r.json()["detail"]
            r = await c.post("/predict", content=b"--XyZ\r\nbroken", headers={
                "content-type": "multipart/form-data; boundary=XyZ"})
            assert r.status_code == 400
    run(go())


def test_api_key_when_configured(service_pipeline):
    jpg = encode(astronaut(), "JPEG")

    async def go():
        async with app_client(settings(api_key="s3cret"), [service_pipeline]) as c:
            assert (await c.post("/predict", content=jpg)).status_code == 401
            assert (await c.post("/predict", content=jpg, headers={"X-API-Key": "nope"})).status_code == 401
            assert (await c.post("/predict", content=jpg, headers={"X-API-Key": "s3cret"})).status_code == 200
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/metrics")).status_code == 200   # open unless asked otherwise
        key = {"X-API-Key": "s3cret"}
        async with app_client(settings(api_key="s3cret", protect_operations=True), [service_pipeline]) as c:
            for path in ("/readyz", "/metrics", "/docs", "/openapi.json"):
                r = await c.get(path)
                assert r.status_code == 401 and r.json()["detail"], path
                assert (await c.get(path, headers=key)).status_code in (200, 503), path
            assert (await c.get("/healthz")).status_code == 200 and (await c.get("/")).status_code == 200
    run(go())


def test_health_ready_metrics_and_docs(service_pipeline):
    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            ready = (await c.get("/readyz")).json()
            assert ready["ready"] is True and ready["mode"] == "inprocess"
            assert ready["workers"][0]["sha256"]
            await c.post("/predict", content=encode(astronaut(), "JPEG"))
            await c.post("/predict", content=b"")
            text = (await c.get("/metrics")).text
            for name in ("ipdfer_http_requests_total", "ipdfer_http_request_duration_seconds_bucket",
                         "ipdfer_queue_depth", "ipdfer_batch_size_bucket", "ipdfer_model_seconds_bucket",
                         "ipdfer_faces_per_image_bucket", "ipdfer_dead_lettered_total"):
                assert name in text, name
            assert 'route="/predict",status="400"' in text
            spec = (await c.get("/openapi.json")).json()
            assert {"/predict", "/neutralize", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
            assert (await c.get("/docs")).status_code == 200
    run(go())


def test_probe_and_decoder_are_one_module():
    """The API edge probes with the decoder's own module (model.images): one format
    list, one set of limits; the edge only maps its typed errors to statuses."""
    import io as _io

    from PIL import Image as _Image

    from model import images as decoder
    from service import images as edge
    from service.errors import JobError
    assert edge.probe_header is decoder.probe
    from service.errors import http_status
    from service.jobs import image_error_kind
    for fmt, status in (("GIF", 415), ("PNG", None)):
        buf = _io.BytesIO()
        _Image.new("RGB", (32, 32)).save(buf, format=fmt)
        if status:
            with pytest.raises(JobError) as info:
                edge.probe(buf.getvalue(), max_pixels=10_000, max_bytes=1 << 20)
            assert info.value.kind == "unsupported_image" and http_status(info.value) == status
        else:
            assert edge.probe(buf.getvalue(), max_pixels=10_000, max_bytes=1 << 20) == ("PNG", 32, 32)
    for err, status in ((decoder.ImageTooLargeError("x"), 413), (decoder.ImageTooSmallError("x"), 422),
                        (decoder.ImageDecodeError("x"), 400)):
        assert http_status(JobError(image_error_kind(err), "x")) == status
    assert image_error_kind(ValueError("x")) is None


# --- backpressure and timeouts, with a fake batch function ----------------------------


class BlockingFake:
    """A 'model' that holds every batch until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.info = {"name": "fake", "version": "0", "sha256": "0" * 64, "device": "cpu"}
        self.worker = "fake"

    def __call__(self, jobs):
        self.started.set()
        self.release.wait(30)
        return [Outcome({"faces": [], "image": {"width": 1, "height": 1}, "model": self.info,
                         "worker": "fake", "batch_size": len(jobs),
                         "timings": {"queue_ms": 0, "model_ms": 0}}) for _ in jobs]


def test_queue_full_answers_503_at_once_with_retry_after():
    fake = BlockingFake()
    jpg = encode(astronaut(), "JPEG")

    async def go():
        s = settings(queue_maxlen=2, max_batch_size=1, max_wait_ms=0, retry_after_s=3)
        async with app_client(s, [fake]) as c:
            backend = c._transport.app.state.backend
            first = asyncio.ensure_future(c.post("/predict", content=jpg))
            while not fake.started.is_set():  # the loop holds the first job; the queue is empty
                await asyncio.sleep(0.01)
            waiting = [asyncio.ensure_future(c.post("/predict", content=jpg)) for _ in range(2)]
            while backend.batcher.depth() < 2:
                await asyncio.sleep(0.01)
            t0 = asyncio.get_running_loop().time()
            r = await c.post("/predict", content=jpg)
            assert asyncio.get_running_loop().time() - t0 < 0.5
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert "busy" in r.json()["detail"]
            fake.release.set()
            assert all(x.status_code == 200 for x in await asyncio.gather(first, *waiting))
    run(go())


def test_result_not_in_time_is_504():
    fake = BlockingFake()

    async def go():
        async with app_client(settings(request_timeout_s=0.3, visibility_timeout_s=0.2), [fake]) as c:
            r = await c.post("/predict", content=encode(astronaut(), "JPEG"))
            assert r.status_code == 504 and "timed out" in r.json()["detail"]
            fake.release.set()
    run(go())


def test_not_ready_until_the_model_loads(tmp_path):
    async def go():
        s = settings(weights_dir=tmp_path / "missing")
        app = create_app(s)  # loads from a folder with no weights: fails in the background
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                for _ in range(200):
                    r = await c.get("/readyz")
                    if "failed" in r.json()["detail"]:
                        break
                    await asyncio.sleep(0.05)
                assert r.status_code == 503 and r.headers["retry-after"]
                assert (await c.get("/healthz")).status_code == 200
                r = await c.post("/predict", content=encode(astronaut(), "JPEG"))
                assert r.status_code == 503 and "loading the model failed" in r.json()["detail"]
    run(go())


def test_metric_labels_stay_bounded_for_junk_paths_and_methods(service_pipeline):
    """Random paths (404) and invented methods must not become metric labels:
    /metrics would grow per request."""
    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            before = len((await c.get("/metrics")).text)
            for i in range(40):
                await c.post(f"/x{i:04d}zz")
                await c.get(f"/nope/{i:04d}zz")
                await c.request(f"BREW{i}", "/healthz")
            text = (await c.get("/metrics")).text
            assert "zz" not in text and "BREW" not in text
            assert 'route="unmatched",status="404"' in text and 'method="other"' in text
            # growth is a few label sets, not 120 of them
            assert len(text) - before < 30_000
    run(go())


def test_a_visibility_timeout_that_outlasts_the_request_timeout_is_refused():
    # reclaim after the client gave up turns every job of a crashed worker into a 504
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(redis_url=None, visibility_timeout_s=30, request_timeout_s=30)
    assert Settings(redis_url=None).visibility_timeout_s < Settings(redis_url=None).request_timeout_s


def test_wrong_methods_on_api_paths_are_405_with_the_full_allow_list(service_pipeline):
    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            r = await c.get("/predict")
            assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["detail"]
            r = await c.options("/neutralize")  # GET /neutralize and POST /neutralize are two routes
            assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
            assert (await c.post("/x-unknown")).status_code == 404
            r = await c.get("/")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert (await c.get("/style.css")).status_code == 200
            assert (await c.get("/screenshot.png")).status_code == 404  # only the page's own files
    run(go())


def post_scope(headers: list[tuple[bytes, bytes]]) -> dict:
    """The ASGI scope a server hands the app for POST /predict (for tests that
    drive the body's arrival themselves)."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


def test_a_client_that_drops_mid_upload_is_not_a_server_error(service_pipeline, caplog):
    """The ASGI server tells the app `http.disconnect` while the body is being read."""
    app = create_app(settings(), backend=InProcessBackend(settings(), pipelines=[service_pipeline]))
    sent: list[dict] = []

    async def go():
        messages = iter([{"type": "http.request", "body": b"\xff\xd8\xff" + b"\0" * 1000, "more_body": True},
                         {"type": "http.disconnect"}])

        async def receive():
            return next(messages, {"type": "http.disconnect"})

        async def send(message):
            sent.append(message)

        await app(post_scope([(b"content-type", b"image/jpeg"), (b"content-length", b"100000")]), receive, send)

    caplog.set_level("INFO")
    run(go())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    assert status == 499
    assert not [r for r in caplog.records if r.exc_info], "a disconnect must not log a traceback"
    assert any("disconnected" in r.getMessage() for r in caplog.records)


def test_a_body_that_never_finishes_is_408_after_the_body_timeout(service_pipeline):
    s = settings(body_timeout_s=0.3)
    app = create_app(s, backend=InProcessBackend(s, pipelines=[service_pipeline]))
    sent: list[dict] = []

    async def go():
        first = [{"type": "http.request", "body": b"\xff\xd8\xff" + b"\0" * 100, "more_body": True}]

        async def receive():
            if first:
                return first.pop()
            await asyncio.sleep(3600)   # the rest never comes

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(post_scope([(b"content-type", b"image/jpeg")]), receive, send), 10)

    run(go())
    assert next(m["status"] for m in sent if m["type"] == "http.response.start") == 408


def test_a_large_upload_is_decoded_smaller_and_answered_in_its_own_pixels(service_pipeline):
    """A photo over decode_max_side is decoded smaller (memory), yet its boxes and
    landmarks are those of the full-size photo, in the full-size photo's pixels."""
    from service.jobs import Job
    from service.pipeline import Pipeline
    big = np.array(Image.fromarray(astronaut()).resize((2048, 2048), Image.BICUBIC))
    data = encode(big, "JPEG", quality=95)
    capped = Pipeline(service_pipeline.analyzer, max_pixels=40_000_000, max_bytes=32 << 20,
                      decode_max_side=1024)
    full = Pipeline(service_pipeline.analyzer, max_pixels=40_000_000, max_bytes=32 << 20,
                    decode_max_side=None)
    small_reply, full_reply = (p([Job(image=data)])[0].reply for p in (capped, full))
    assert "error" not in small_reply and "error" not in full_reply
    assert small_reply["image"] == full_reply["image"] == {"width": 2048, "height": 2048}
    (a,), (b,) = small_reply["faces"], full_reply["faces"]
    eye_distance = np.linalg.norm(np.subtract(*b["landmarks"][:2]))
    assert eye_distance > 100  # the face is large: in 2048 px coordinates, not 1024
    assert np.abs(np.subtract(a["landmarks"], b["landmarks"])).max() < 0.05 * eye_distance
    assert np.abs(np.subtract(a["box"], b["box"])).max() < 0.1 * eye_distance


DECODE_PEAK = """
import resource, sys
from PIL import Image
import io
buf = io.BytesIO(); Image.new("RGBA", (6000, 6000)).save(buf, format="PNG"); data = buf.getvalue()
from service.jobs import Job
from service.pipeline import Pipeline
from model.serving.analyzer import Analysis, ImageResult
class NoFaces:  # decoding alone is measured: the analyzer finds nothing
    info = {}
    def analyze(self, requests):
        return Analysis([ImageResult() for _ in requests], {})
pipe = Pipeline(NoFaces(), max_pixels=40_000_000, max_bytes=32 << 20, decode_max_side=2560)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reply = pipe([Job(image=data)])[0].reply
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(reply.get("error", "ok"), reply["image"]["width"], peak // 1024)
"""


def test_a_pixel_bomb_within_the_limits_decodes_in_bounded_memory():
    """A 155 KB all-zero 6000x6000 RGBA PNG (36 MP, under the 40 MP limit) used to
    cost ~800 MB of peak memory to decode (full-size RGBA, composite, RGB copies)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", DECODE_PEAK], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    outcome, width, peak_mb = out.stdout.split()
    width, peak_mb = int(width), int(peak_mb)
    assert (outcome, width) == ("ok", 6000)
    assert peak_mb < 400, f"decoding raised peak memory by {peak_mb} MB"


def test_settings_from_command_line_options_override_only_what_was_given(monkeypatch):
    import argparse
    monkeypatch.setenv("IPDFER_MAX_WAIT_MS", "7")
    args = argparse.Namespace(port=9001, redis_url=None, batch_size=4)
    s = Settings.from_args(args, ("port", "redis_url"), max_batch_size="batch_size")
    assert (s.port, s.redis_url, s.max_batch_size, s.max_wait_ms) == (9001, None, 4, 7.0)


def test_neutralize_renders_the_largest_face_alone(service_pipeline):
    """POST /neutralize's job asks for the largest face (largest=True): the engine
    aligns and renders that one face, not every face of the photo."""
    from service.jobs import Job
    face = Image.fromarray(astronaut()).crop((120, 0, 340, 260))          # the head, 220 x 260
    canvas = Image.new("RGB", (900, 600), (90, 90, 90))
    canvas.paste(face.resize((110, 130)), (40, 60))                       # small
    canvas.paste(face.resize((330, 390)), (450, 120))                     # large
    data = encode(np.asarray(canvas), "PNG")
    every = service_pipeline([Job(image=data, neutral=True)])[0].reply
    one = service_pipeline([Job(image=data, neutral=True, largest=True, max_faces=1)])[0].reply
    assert len(every["faces"]) == 2 and all(f["neutral_png"] for f in every["faces"])
    assert len(one["faces"]) == 1 and one["faces"][0]["neutral_png"]
    area = lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])  # noqa: E731
    assert one["faces"][0]["box"] == max(every["faces"], key=area)["box"]
    assert one["faces_skipped"] == 1


def test_a_batch_answers_each_image_in_order_and_a_broken_one_fails_alone(service_pipeline):
    photos = astronaut_jpegs(3)
    broken = photos[0][: len(photos[0]) // 2]
    parts = [("files", ("a.jpg", photos[0], "image/jpeg")), ("files", ("broken.jpg", broken, "image/jpeg")),
             ("files", ("b.jpg", photos[1], "image/jpeg")), ("files", ("blank.png", encode(
                 np.full((64, 64, 3), 200, np.uint8), "PNG"), "image/png")),
             ("files", ("bomb.png", png_header_bomb(), "image/png")), ("files", ("c.jpg", photos[2], "image/jpeg"))]

    async def go():
        async with app_client(settings(), [service_pipeline]) as c:
            r = await c.post("/predict/batch", files=parts, headers={"X-Request-ID": "b-1"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["images"] == 6 and body["succeeded"] == 4
            items = body["results"]
            assert [i["index"] for i in items] == list(range(6))
            assert [i["filename"] for i in items] == [name for _, (name, _, _) in parts]
            assert [i["status"] for i in items] == [200, 400, 200, 200, 413, 200]
            assert "truncated" in items[1]["detail"] or "decode" in items[1]["detail"]
            assert items[1]["result"] is None and items[4]["result"] is None
            assert items[3]["result"]["faces"] == []   # no face is a result, as with /predict
            # each image's result is what POST /predict answers for it alone
            for k, data in ((0, photos[0]), (2, photos[1]), (5, photos[2])):
                assert_valid_prediction(items[k]["result"], 224, 224)
                assert items[k]["result"]["request_id"] == f"b-1/{k}"
                single = (await c.post("/predict", content=data, headers={"content-type": "image/jpeg"})).json()
                got = [f["expression"]["probabilities"] for f in items[k]["result"]["faces"]]
                want = [f["expression"]["probabilities"] for f in single["faces"]]
                assert len(got) == len(want) >= 1
                for g, w in zip(got, want):
                    assert max(abs(g[c] - w[c]) for c in g) < 1e-3
            assert max(i["result"]["batch_size"] for i in items if i["result"]) > 1   # batched together
    run(go())


def test_a_batch_over_its_limits_or_of_the_wrong_type_is_refused(service_pipeline):
    photo = astronaut_jpegs(1)[0]

    async def go():
        async with app_client(settings(batch_max_images=2, batch_max_bytes=4096 + 3 * len(photo)),
                              [service_pipeline]) as c:
            r = await c.post("/predict/batch", files=[("files", (f"{i}.jpg", photo, "image/jpeg")) for i in range(3)])
            assert r.status_code == 413 and "at most 2" in r.json()["detail"]
            big = [("files", ("a.jpg", photo, "image/jpeg")),
                   ("files", ("pad.bin", b"\0" * (4 * len(photo)), "application/octet-stream"))]
            r = await c.post("/predict/batch", files=big)
            assert r.status_code == 413 and "batch limit" in r.json()["detail"], r.text
            r = await c.post("/predict/batch", content=photo, headers={"content-type": "image/jpeg"})
            assert r.status_code == 415 and "multipart" in r.json()["detail"]
            r = await c.post("/predict/batch", data={"note": "no files"}, files=[])
            assert r.status_code in (400, 415), r.text
            r = await c.post("/predict/batch", files=[("files", ("x.jpg", photo, "image/jpeg"))])
            assert r.status_code == 200 and r.json()["succeeded"] == 1
    run(go())
