"""Where the API sends its jobs. Two implementations, one interface:

  InProcessBackend  no REDIS_URL: the model is loaded in the API process and the
                    batching loop (service/batching.py) runs on an asyncio queue;
  RedisBackend      REDIS_URL set: jobs go to the Redis stream (service/queue.py),
                    separate `ipdfer worker` processes answer them.

Both return the job's reply (service/jobs.py) or raise one of service.errors:
JobError (the reply's error kind and message), QueueFull / NoWorkers /
Unavailable or ResultTimeout. service/errors.py maps them to HTTP statuses.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol

from service.batching import BatchPolicy, InProcessBatcher
from service.errors import JobError, NoWorkers, ResultTimeout, Unavailable
from service.jobs import OP_ANALYZE, OP_RENDER, Job, Outcome, job_cost
from service.settings import Settings

log = logging.getLogger(__name__)


class Backend(Protocol):
    mode: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def analyze(self, image: bytes, *, aligned: bool, max_faces: int | None, neutral: bool,
                      largest: bool = False, pixels: int | None = None, identity: bool = False,
                      keep: bool = True) -> dict[str, Any]: ...
    async def render(self, face_id: str, kind: str) -> dict[str, Any]: ...
    async def put_video(self, video_id: str, record: dict[str, Any]) -> None: ...
    async def get_video(self, video_id: str) -> dict[str, Any] | None: ...
    async def readiness(self) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, int | None]: ...


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if "error" in reply:
        raise JobError(reply["error"], str(reply.get("detail", "job failed")))
    return reply


class MemoryFaceStore:
    """Face states for GET /neutralize in in-process mode: TTL + size bound. Expired
    states are dropped as new ones come (the TTL is one for all, so insertion order is
    expiry order): memory follows the recent request rate, not the cap alone."""

    def __init__(self, ttl_s: float, max_items: int, max_bytes: int = 200 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_items, self.max_bytes, self.clock = ttl_s, max_items, max_bytes, clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def _drop_oldest(self) -> None:
        self.bytes -= len(self._items.popitem(last=False)[1][1])

    def put_many(self, states: dict[str, bytes]) -> None:
        now = self.clock()
        while self._items and next(iter(self._items.values()))[0] < now:
            self._drop_oldest()
        expires = now + self.ttl_s
        for face_id, state in states.items():
            old = self._items.pop(face_id, None)
            self.bytes += len(state) - (len(old[1]) if old else 0)
            self._items[face_id] = (expires, state)
        while self._items and (len(self._items) > self.max_items or self.bytes > self.max_bytes):
            self._drop_oldest()

    def get(self, face_id: str) -> bytes | None:
        item = self._items.get(face_id)
        if item is None:
            return None
        if item[0] < self.clock():
            del self._items[face_id]
            self.bytes -= len(item[1])
            return None
        return item[1]

    def __len__(self) -> int:
        return len(self._items)


class MemoryVideoRecords:
    """Video statuses and results in in-process mode, each kept `ttl_s` after its last change."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.clock = ttl_s, clock
        self._items: dict[str, tuple[float, dict[str, Any]]] = {}

    def put(self, video_id: str, record: dict[str, Any]) -> None:
        now = self.clock()
        for key in [k for k, (expires, _) in self._items.items() if expires < now]:
            del self._items[key]
        self._items[video_id] = (now + self.ttl_s, record)

    def get(self, video_id: str) -> dict[str, Any] | None:
        item = self._items.get(video_id)
        return item[1] if item and item[0] >= self.clock() else None


class InProcessBackend:
    mode = "inprocess"

    def __init__(self, settings: Settings, *, pipelines: list[Callable[[list[Job]], list]] | None = None,
                 on_batch: Callable[[int, float], Any] | None = None) -> None:
        self.settings = settings
        self.faces = MemoryFaceStore(settings.face_ttl_s, settings.face_cache_max, settings.face_cache_max_bytes)
        self.videos = MemoryVideoRecords(settings.video_ttl_s)
        self.batcher: InProcessBatcher[Job, Outcome] = InProcessBatcher(
            BatchPolicy(settings.max_batch_size, settings.max_wait_s, cost=job_cost,
                        alone_above=settings.batch_alone_pixels),
            maxsize=settings.queue_maxlen, on_batch=on_batch)
        self.pipelines = pipelines  # injected (tests) or loaded at start
        self.info: list[dict[str, Any]] = []
        self.load_error: str | None = None
        self._loading: asyncio.Task | None = None

    async def start(self) -> None:
        if self.pipelines is not None:
            self._run(self.pipelines)
        else:  # load in the background: /healthz answers at once, /readyz when loaded
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        from service.pipeline import Pipeline

        def load_all() -> list:
            import torch
            device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
            loops, threads = self.settings.inprocess_plan(cuda=device.startswith("cuda"))
            log.info("in-process: %d batch loop(s), torch threads %s each", loops, threads or "default")
            return [Pipeline.load(self.settings, worker=f"inprocess-{i}", threads=threads) for i in range(loops)]
        try:
            pipes = await asyncio.to_thread(load_all)
        except Exception as e:  # noqa: BLE001 - reported by /readyz and every request
            log.exception("loading the model failed")
            self.load_error = f"loading the model failed: {e}"
            return
        self._run(pipes)

    def _run(self, pipes: list) -> None:
        self.pipelines = pipes
        self.info = [dict(getattr(p, "info", {}), worker=getattr(p, "worker", "inprocess")) for p in pipes]
        self.batcher.start(pipes)

    async def stop(self) -> None:
        if self._loading and not self._loading.done():
            self._loading.cancel()
        await self.batcher.stop()

    async def _call(self, job: Job) -> dict[str, Any]:
        if not self.batcher.running:
            raise NoWorkers(self.load_error or "the model is still loading")
        fut = self.batcher.submit(job)  # QueueFull at once when full
        try:
            outcome: Outcome = await asyncio.wait_for(fut, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ResultTimeout(f"no result within {self.settings.request_timeout_s:g} s") from None
        except Exception as e:  # noqa: BLE001 - an unexpected model error of this job
            log.exception("job failed")
            raise JobError("failed", f"processing failed: {type(e).__name__}: {e}") from e
        self.faces.put_many(outcome.faces)
        return _check(outcome.reply)

    async def analyze(self, image: bytes, *, aligned: bool, max_faces: int | None, neutral: bool,
                      largest: bool = False, pixels: int | None = None, identity: bool = False,
                      keep: bool = True) -> dict[str, Any]:
        return await self._call(Job(op=OP_ANALYZE, image=image, aligned=aligned, max_faces=max_faces,
                                    largest=largest, neutral=neutral, enqueued=time.time(), pixels=pixels,
                                    identity=identity, keep=keep))

    async def render(self, face_id: str, kind: str) -> dict[str, Any]:
        state = self.faces.get(face_id)
        if state is None:
            raise JobError("unknown_face", "unknown or expired face_id")
        return await self._call(Job(op=OP_RENDER, state=state, kind=kind, enqueued=time.time()))

    async def put_video(self, video_id: str, record: dict[str, Any]) -> None:
        self.videos.put(video_id, record)

    async def get_video(self, video_id: str) -> dict[str, Any] | None:
        return self.videos.get(video_id)

    async def readiness(self) -> dict[str, Any]:
        ready = self.batcher.running
        detail = "model loaded" if ready else (self.load_error or "the model is still loading")
        return {"ready": ready, "mode": self.mode, "detail": detail, "workers": self.info if ready else [],
                "queue_depth": self.batcher.depth()}

    async def stats(self) -> dict[str, int | None]:
        return {"queue_depth": self.batcher.depth(), "dead_letters": None,
                "workers": len(self.info) if self.batcher.running else 0,
                "face_states": len(self.faces), "face_state_bytes": self.faces.bytes}


class RedisBackend:
    mode = "redis"

    def __init__(self, settings: Settings) -> None:
        from service.queue import RedisQueue
        self.settings = settings
        self.queue = RedisQueue.from_settings(settings)

    async def start(self) -> None:
        pass  # nothing to prepare: enqueue creates the stream, workers the group

    async def stop(self) -> None:
        await self.queue.close()

    async def _submit(self, meta: dict[str, Any], image: bytes = b"") -> dict[str, Any]:
        from redis.exceptions import RedisError
        try:
            reply = await self.queue.submit(meta, image, self.settings.request_timeout_s)
        except RedisError as e:
            raise Unavailable(f"the job queue (Redis) is unavailable: {e}") from e
        return _check(reply)

    async def analyze(self, image: bytes, *, aligned: bool, max_faces: int | None, neutral: bool,
                      largest: bool = False, pixels: int | None = None, identity: bool = False,
                      keep: bool = True) -> dict[str, Any]:
        return await self._submit({"op": OP_ANALYZE, "aligned": aligned, "max_faces": max_faces,
                                   "largest": largest, "neutral": neutral, "pixels": pixels,
                                   "identity": identity, "keep": keep}, image)

    async def render(self, face_id: str, kind: str) -> dict[str, Any]:
        from redis.exceptions import RedisError
        try:
            known = await self.queue.face_exists(face_id)
        except RedisError as e:
            raise Unavailable(f"the job queue (Redis) is unavailable: {e}") from e
        if not known:
            raise JobError("unknown_face", "unknown or expired face_id")
        return await self._submit({"op": OP_RENDER, "face_id": face_id, "kind": kind})

    async def put_video(self, video_id: str, record: dict[str, Any]) -> None:
        from redis.exceptions import RedisError
        try:
            await self.queue.put_video(video_id, record, self.settings.video_ttl_s)
        except RedisError as e:
            raise Unavailable(f"the job queue (Redis) is unavailable: {e}") from e

    async def get_video(self, video_id: str) -> dict[str, Any] | None:
        from redis.exceptions import RedisError
        try:
            return await self.queue.get_video(video_id)
        except RedisError as e:
            raise Unavailable(f"the job queue (Redis) is unavailable: {e}") from e

    async def readiness(self) -> dict[str, Any]:
        from redis.exceptions import RedisError
        base = {"ready": False, "mode": self.mode, "workers": [], "queue_depth": None}
        try:
            await self.queue.ping()
            workers = await self.queue.live_workers()
            depth = await self.queue.depth()
        except RedisError as e:
            return {**base, "detail": f"Redis unreachable: {e}"}
        if not workers:
            return {**base, "queue_depth": depth, "detail": "Redis reachable, but no worker heartbeat"}
        return {"ready": True, "mode": self.mode, "workers": workers, "queue_depth": depth,
                "detail": f"{len(workers)} worker(s) with weights loaded"}

    async def stats(self) -> dict[str, int | None]:
        from redis.exceptions import RedisError
        try:
            return {"queue_depth": await self.queue.depth(), "dead_letters": await self.queue.dead_count(),
                    "workers": len(await self.queue.live_workers())}
        except RedisError:
            return {"queue_depth": None, "dead_letters": None, "workers": 0}


def make_backend(settings: Settings, **kwargs: Any) -> Backend:
    return RedisBackend(settings) if settings.redis_url else InProcessBackend(settings, **kwargs)
