"""The deployed shape, for real: `ipdfer serve` (Redis mode) and two `ipdfer worker`
processes with the real model, over the suite's own redis-server. Covers the
round trip, load sharing, a worker SIGKILLed mid-batch, malformed inputs reaching
the workers, queue full, and Redis going away and coming back."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.queue import RedisQueue
from service.server import create_app
from service.settings import Settings
from tests.conftest import free_port, terminate
from tests.data_samples import astronaut_jpegs
from tests.test_service_api import assert_valid_prediction, astronaut, encode, malformed_corpus

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ("w1", "w2")


class Cluster:
    def __init__(self, redis_server, tmp: Path) -> None:
        self.redis_server = redis_server
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "REDIS_URL": redis_server.url, "IPDFER_QUEUE_PREFIX": f"c{uuid.uuid4().hex[:8]}",
                    "IPDFER_MAX_BATCH_SIZE": "4", "IPDFER_MAX_WAIT_MS": "20",
                    "IPDFER_VISIBILITY_TIMEOUT_S": "5", "IPDFER_HEARTBEAT_INTERVAL_S": "0.5",
                    "IPDFER_REQUEST_TIMEOUT_S": "90", "IPDFER_MAX_ATTEMPTS": "3", "IPDFER_TORCH_THREADS": "1",
                    "IPDFER_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}

    def settings(self) -> Settings:
        return Settings(redis_url=self.redis_server.url, queue_prefix=self.env["IPDFER_QUEUE_PREFIX"])

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start(self) -> None:
        self.spawn("api", "serve", "--host", "127.0.0.1", "--port", str(self.port))
        for w in WORKERS:
            self.spawn(w, "worker", "--name", w)
        self.wait_ready(len(WORKERS), timeout=180)

    def wait_ready(self, workers: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                assert p.poll() is None, f"{name} exited:\n{self.log(name)[-3000:]}"
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                body = r.json()
                if r.status_code == 200 and len(body["workers"]) >= workers:
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready after {timeout} s: {body}")

    def stop(self) -> None:
        for p in self.procs.values():  # signal all first: they shut down in parallel
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            terminate(p)


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory):
    c = Cluster(redis_server, tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def run(coro):
    return asyncio.run(coro)


async def post_many(url: str, bodies: list[bytes], query: str = "") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*[client.post(f"/predict{query}", content=b) for b in bodies])


def test_round_trip_and_neutralize_through_redis(cluster):
    photos = astronaut_jpegs(2)   # 224 x 224, as muxspace's photos are

    async def go():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as c:
            r = await c.post("/predict?neutral=true", files={"file": ("a.jpg", encode(astronaut(), "JPEG"),
                                                                       "image/jpeg")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert_valid_prediction(body, 512, 512)
            assert body["worker"] in WORKERS and len(body["faces"]) == 1
            face = body["faces"][0]
            assert face["neutral_png"]
            for kind in ("neutral", "residue"):
                r = await c.get("/neutralize", params={"face_id": face["face_id"], "kind": kind})
                assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
                Image.open(__import__("io").BytesIO(r.content)).load()
            r = await c.get("/neutralize", params={"face_id": "f" * 32})
            assert r.status_code == 404
            r = await c.post("/neutralize", content=photos[0], headers={"content-type": "image/jpeg"})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            for jpg in photos:
                r = await c.post("/predict", content=jpg)
                assert r.status_code == 200
                assert_valid_prediction(r.json(), 224, 224)
            ready = (await c.get("/readyz")).json()
            assert ready["mode"] == "redis" and {w["worker"] for w in ready["workers"]} == set(WORKERS)
            metrics = (await c.get("/metrics")).text
            assert "ipdfer_workers_ready 2.0" in metrics and "ipdfer_dead_letter_jobs 0.0" in metrics
    run(go())


def test_two_workers_share_the_load(cluster):
    bodies = astronaut_jpegs(16)
    rs = run(post_many(cluster.url, bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    served = [r.json()["worker"] for r in rs]
    assert set(served) == set(WORKERS), served
    assert max(r.json()["batch_size"] for r in rs) > 1


def test_a_batch_fans_out_to_both_workers_and_a_broken_image_fails_alone(cluster):
    photos = astronaut_jpegs(16)
    parts = [("files", (f"{i}.jpg", jpg, "image/jpeg")) for i, jpg in enumerate(photos)]
    parts.insert(5, ("files", ("broken.jpg", photos[0][:len(photos[0]) // 2], "image/jpeg")))
    r = httpx.post(f"{cluster.url}/predict/batch", files=parts, timeout=120)
    assert r.status_code == 200, r.text
    items = r.json()["results"]
    assert [i["status"] for i in items] == [200] * 5 + [400] + [200] * 11
    assert "truncated" in items[5]["detail"]   # decoded, and refused, by a worker
    assert {i["result"]["worker"] for i in items if i["result"]} == set(WORKERS)
    assert all(cluster.procs[w].poll() is None for w in WORKERS)


def test_a_video_through_redis_is_analysed_by_the_workers_and_readable_from_another_api(cluster):
    """POST /videos on the API: its frames become jobs the workers answer; the
    status lives in Redis, so a second API process (here: an app over the same
    prefix) reads it too."""
    from tests.test_video import encode_clip, moving_face
    clip = encode_clip(moving_face(50))
    r = httpx.post(f"{cluster.url}/videos?fps=5", content=clip, headers={"content-type": "video/mp4"}, timeout=60)
    assert r.status_code == 202, r.text
    deadline, body = time.monotonic() + 180, {}
    while time.monotonic() < deadline:
        body = httpx.get(cluster.url + r.headers["location"], timeout=10).json()
        if body["status"] in ("done", "failed"):
            break
        time.sleep(0.3)
    assert body["status"] == "done", body
    assert len(body["result"]["frames"]) == 10 and [t["track"] for t in body["result"]["tracks"]] == [1]

    async def other_api():
        app = create_app(cluster.settings())
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.get(r.headers["location"], params={"format": "csv"})
    csv = run(other_api())
    assert csv.status_code == 200 and len(csv.text.splitlines()) == 11
    assert all(cluster.procs[w].poll() is None for w in WORKERS)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_inputs_get_4xx_and_workers_stay_up(cluster):
    async def go():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as c:
            for name, body, ctype in malformed_corpus():
                r = await c.post("/predict", content=body, headers={"content-type": ctype} if ctype else {})
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
                assert len(r.json()["detail"]) > 5, name
                if name.startswith("truncated"):  # passes the header check: decoded by a worker
                    assert r.status_code == 400 and "truncated" in r.json()["detail"]
            r = await c.post("/predict", content=encode(astronaut(), "JPEG"))
            assert r.status_code == 200
    run(go())
    assert all(cluster.procs[w].poll() is None for w in WORKERS)
    assert "Traceback" not in cluster.log("w1") + cluster.log("w2")


def test_worker_sigkilled_mid_batch_loses_no_job(cluster):
    bodies = astronaut_jpegs(12)

    async def go():
        q = RedisQueue.from_settings(cluster.settings())
        requests = asyncio.ensure_future(post_many(cluster.url, bodies))
        killed_with = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not requests.done():
            killed_with = await q.pending("w1")
            if killed_with:
                cluster.procs["w1"].send_signal(signal.SIGKILL)  # mid-batch: read, not acked
                break
            await asyncio.sleep(0.005)
        rs = await requests
        await asyncio.sleep(0.5)
        leftovers = [k async for k in q.client.scan_iter(match=q._key("result", "*"))]
        state = (await q.depth(), await q.pending(), await q.dead_count(), leftovers)
        await q.close()
        return killed_with, rs, state

    killed_with, rs, (depth, pending, dead, leftovers) = run(go())
    assert killed_with > 0, "w1 never held a job"
    assert cluster.procs.pop("w1").wait(10) == -signal.SIGKILL
    assert [r.status_code for r in rs] == [200] * len(bodies), [r.text for r in rs if r.status_code != 200]
    assert len({r.json()["request_id"] for r in rs}) == len(bodies)
    assert depth == 0 and pending == 0 and dead == 0  # every job acked, none dead-lettered
    assert leftovers == []  # no second answer waiting anywhere
    assert "reclaimed job" in cluster.log("w2")
    assert (cluster.log("w2").count("reclaimed job")) >= killed_with


def test_queue_full_and_no_worker_answer_503_at_once(redis_server):
    prefix = f"q{uuid.uuid4().hex[:8]}"
    s = Settings(redis_url=redis_server.url, queue_prefix=prefix, queue_maxlen=2, request_timeout_s=5, visibility_timeout_s=2,
                 retry_after_s=2)
    jpg = encode(astronaut(), "JPEG")

    async def go():
        app = create_app(s)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                t0 = time.monotonic()
                r = await c.post("/predict", content=jpg)
                assert r.status_code == 503 and r.headers["retry-after"] == "2"
                assert "no worker" in r.json()["detail"]
                assert (await c.get("/readyz")).status_code == 503
                q = RedisQueue.from_settings(s)
                await q.heartbeat("stuck", {"name": "fake"})  # alive, never reads
                stuck = [asyncio.ensure_future(c.post("/predict", content=jpg)) for _ in range(2)]
                while await q.depth() < 2:
                    await asyncio.sleep(0.01)
                t0 = time.monotonic()
                r = await c.post("/predict", content=jpg)
                assert time.monotonic() - t0 < 0.5
                assert r.status_code == 503 and r.headers["retry-after"] == "2"
                assert "queue full" in r.json()["detail"]
                # nobody answers the two stuck ones: 504 once the request timeout passes
                assert [x.status_code for x in await asyncio.gather(*stuck)] == [504, 504]
                await q.close()
    run(go())


def test_redis_stopped_answers_503_fast_and_recovers(cluster, redis_server):
    jpg = encode(astronaut(), "JPEG")
    redis_server.stop()
    try:
        t0 = time.monotonic()
        r = httpx.post(f"{cluster.url}/predict", content=jpg, timeout=30)
        elapsed = time.monotonic() - t0
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert "Redis" in r.json()["detail"] and elapsed < 2.0, elapsed
        r = httpx.get(f"{cluster.url}/readyz", timeout=30)
        assert r.status_code == 503 and "Redis" in r.json()["detail"]
        time.sleep(1.0)  # workers back off meanwhile, and stay up
        assert cluster.procs["w2"].poll() is None and cluster.procs["api"].poll() is None
    finally:
        redis_server.start()
    cluster.wait_ready(1, timeout=30)
    r = httpx.post(f"{cluster.url}/predict", content=jpg, timeout=60)
    assert r.status_code == 200 and len(r.json()["faces"]) == 1


def test_slow_clients_cannot_hold_connections(redis_server, tmp_path):
    """`ipdfer serve` closes a connection whose request headers are not complete
    within header_timeout_s (uvicorn alone keeps it open for ever), while a client
    that sends its request in time is answered on the same kind of connection."""
    import socket
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "IPDFER_QUEUE_PREFIX": f"s{uuid.uuid4().hex[:8]}",
           "IPDFER_HEADER_TIMEOUT_S": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "api.log", "ab")
    api = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                            "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert api.poll() is None, (tmp_path / "api.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the API did not start"
                time.sleep(0.2)

        def first_reply(payload: bytes, wait_s: float) -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
                t0 = time.monotonic()
                sock.sendall(payload)
                try:
                    data = sock.recv(4096)
                except socket.timeout:
                    data = b"<still open>"
                return data, time.monotonic() - t0

        silent, t_silent = first_reply(b"", 6)
        partial, t_partial = first_reply(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow:", 6)
        assert silent == b"" and t_silent < 4, (silent, t_silent)          # closed, nothing said
        assert partial.startswith(b"HTTP/1.1 408") and t_partial < 4, (partial, t_partial)
        whole, _ = first_reply(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 6)
        assert whole.startswith(b"HTTP/1.1 200"), whole
    finally:
        api.send_signal(signal.SIGTERM)
        terminate(api)
