"""`ipdfer worker`: a model worker on the Redis job stream.

  1. load the weights once and warm up (Pipeline.load), only then heartbeat "ready";
  2. loop: take over jobs of dead workers (XAUTOCLAIM), else collect a batch of new
     jobs with the shared batching loop (max batch size, max wait from the oldest);
  3. run the batch in a thread (the event loop keeps heartbeating), answer each job
     once and ack it; a job whose processing raised is given back for a retry
     (dead-lettered by the queue after max_attempts);
  4. SIGTERM / SIGINT: stop reading, finish the batch in hand, leave. Jobs it had
     read but not answered stay pending and are reclaimed by the other workers.

Redis going away is survived: the loop backs off and resumes (re-creating the
consumer group if Redis came back empty).
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import time
from typing import Any, Callable

from redis.exceptions import RedisError

from service.batching import BatchLoop, BatchPolicy, fair_share
from service.metrics import WorkerMetrics
from service.jobs import OP_RENDER, Job, Outcome, error_reply, job_cost
from service.queue import QueuedJob, RedisQueue
from service.settings import Settings, add_options

log = logging.getLogger(__name__)


class RedisSource:
    """BatchSource over the stream (new jobs for this consumer)."""

    def __init__(self, queue: RedisQueue, consumer: str) -> None:
        self.queue, self.consumer = queue, consumer

    async def get(self, limit: int, timeout: float | None) -> list[QueuedJob]:
        return await self.queue.read(self.consumer, limit, timeout)


class Worker:
    def __init__(self, settings: Settings, queue: RedisQueue,
                 process: Callable[[list[Job]], list[Outcome | Exception]], *,
                 name: str, info: dict[str, Any], metrics: WorkerMetrics | None = None) -> None:
        self.settings, self.queue, self.process = settings, queue, process
        self.name = name
        self.info = {**info, "worker": name, "pid": os.getpid(), "max_batch_size": settings.max_batch_size}
        self.metrics = metrics or WorkerMetrics()
        self.policy = BatchPolicy(settings.max_batch_size, settings.max_wait_s, cost=job_cost,
                        alone_above=settings.batch_alone_pixels)
        self.stop = asyncio.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batches = 0

    async def run(self) -> None:
        beat = asyncio.get_running_loop().create_task(self._heartbeat())
        loop: BatchLoop[Job, Outcome] = BatchLoop(
            RedisSource(self.queue, self.name), self.process, self.policy, self._finish_all, executor=self._pool,
            prepare=self._prepare, arrival=lambda j: j.received, share=self._share, idle_timeout=1.0,
            on_batch=self._observe)
        backoff = 0.1
        try:
            while not self.stop.is_set():
                try:  # jobs of dead workers first (XAUTOCLAIM), else new ones
                    reclaimed = await self.queue.reclaim(self.name, self.policy.max_batch_size)
                    await loop.run_once(reclaimed or None)
                    backoff = 0.1
                except RedisError as e:
                    log.warning("Redis error (%s); retrying in %.1f s", e, backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            beat.cancel()
            try:
                await self.queue.remove_worker(self.name)
            except RedisError:
                pass
            self._pool.shutdown(wait=True)
            log.info("worker %s stopped after %d batches", self.name, self.batches)

    async def _share(self, taken: int) -> int:
        """This worker's fair share of the stream's jobs (service/batching.py); the
        jobs it has just read are in the stream already."""
        outstanding, workers = await self.queue.backlog()
        return fair_share(outstanding, workers, self.policy.max_batch_size)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.queue.heartbeat(self.name, self.info)
            except RedisError as e:
                log.debug("heartbeat failed: %s", e)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _prepare(self, jobs: list[QueuedJob]) -> tuple[list[QueuedJob], list[Job]]:
        """Answer expired jobs (504), load the face states the renders need."""
        now, live = time.time(), []
        for job in jobs:
            if job.meta.get("deadline") and job.meta["deadline"] < now:
                await self.queue.complete(job, error_reply("expired", "the job expired in the queue"))
                self.metrics.jobs.labels("expired").inc()
            else:
                live.append(job)
        face_ids = [j.meta["face_id"] for j in live if j.meta.get("op") == OP_RENDER and j.meta.get("face_id")]
        states = await self.queue.load_faces(face_ids)
        return live, [Job.from_meta(j.meta, j.image, states.get(j.meta.get("face_id", ""))) for j in live]

    def _observe(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)
        self.batches += 1

    async def _finish_all(self, jobs: list[QueuedJob], results: list[Outcome | BaseException]) -> None:
        await asyncio.gather(*(self._finish(job, r) for job, r in zip(jobs, results)))

    async def _finish(self, job: QueuedJob, result: Outcome | BaseException) -> None:
        if isinstance(result, BaseException):
            reason = f"{type(result).__name__}: {result}"
            log.error("job %s failed (delivery %d): %s", job.id, job.deliveries, reason)
            await self.queue.fail(job, self.name, reason)
            self.metrics.jobs.labels("failed").inc()
            return
        first = await self.queue.complete(job, result.reply, result.faces)
        self.metrics.jobs.labels("answered" if first else "duplicate").inc()


# --- ipdfer worker ------------------------------------------------------------------


WORKER_OPTIONS = ("redis_url", "worker_name", "max_batch_size", "max_wait_ms", "device", "torch_threads",
                  "metrics_port", "log_level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, WORKER_OPTIONS)


def run(args: argparse.Namespace) -> int:
    from service.pipeline import Pipeline

    settings = Settings.from_args(args, WORKER_OPTIONS)
    settings.configure_logging()
    if not settings.redis_url:
        log.error("ipdfer worker needs a Redis URL (REDIS_URL or --redis-url); without one, "
                  "`ipdfer serve` runs the model in-process")
        return 2
    name = settings.consumer_name()
    pipeline = Pipeline.load(settings, worker=name)  # weights + warmup before any heartbeat
    metrics = WorkerMetrics()
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server
        start_http_server(settings.metrics_port, registry=metrics.registry)

    async def main() -> None:
        queue = RedisQueue.from_settings(settings)
        worker = Worker(settings, queue, pipeline, name=name, info=pipeline.info, metrics=metrics)
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if worker.stop.is_set():
                log.warning("second signal: exiting now")
                os._exit(1)
            log.info("signal %d: finishing the batch in hand, then stopping", signum)
            worker.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        log.info("worker %s ready (%s on %s)", name, pipeline.info.get("sha256", "")[:12],
                 pipeline.info.get("device"))
        try:
            await worker.run()
        finally:
            await queue.close()

    asyncio.run(main())
    return 0
