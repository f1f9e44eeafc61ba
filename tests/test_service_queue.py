"""service/queue.py and the worker loop against a real redis-server (started by the
suite), with a fake batch function instead of the model: fast and deterministic."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.errors import NoWorkers, QueueFull
from service.jobs import Job, Outcome
from service.queue import GROUP, RedisQueue
from service.settings import Settings
from service.batching import next_batch
from service.worker import RedisSource, Worker


def settings_for(redis_server, **kw) -> Settings:
    base = dict(redis_url=redis_server.url, queue_prefix=f"t{uuid.uuid4().hex[:8]}", max_batch_size=4,
                max_wait_ms=20, visibility_timeout_s=0.5, max_attempts=2, heartbeat_interval_s=0.2,
                request_timeout_s=10, result_ttl_s=30)
    return Settings(**{**base, **kw})


def echo(jobs: list[Job]) -> list[Outcome | Exception]:
    """Fake model: answers the image length; b"poison" raises in its slot only."""
    return [RuntimeError("poisoned input") if j.image == b"poison" else
            Outcome({"size": len(j.image), "batch": len(jobs)}) for j in jobs]


async def started_worker(s: Settings, process=echo, name: str = "w1") -> tuple[Worker, asyncio.Task]:
    worker = Worker(s, RedisQueue.from_settings(s), process, name=name, info={"name": "fake"})
    task = asyncio.get_running_loop().create_task(worker.run())
    producer = RedisQueue.from_settings(s)
    for _ in range(100):  # wait for its first heartbeat
        if await producer.live_workers():
            break
        await asyncio.sleep(0.02)
    await producer.close()
    return worker, task


async def stop_worker(worker: Worker, task: asyncio.Task) -> None:
    worker.stop.set()
    await asyncio.wait_for(task, 10)
    await worker.queue.close()


def test_round_trip_batches_and_answers_each_job(redis_server):
    s = settings_for(redis_server)

    async def go():
        worker, task = await started_worker(s)
        q = RedisQueue.from_settings(s)
        replies = await asyncio.gather(*[q.submit({"op": "analyze"}, b"x" * n, 10) for n in range(1, 9)])
        assert [r["size"] for r in replies] == list(range(1, 9))
        assert max(r["batch"] for r in replies) > 1  # concurrent jobs were batched
        assert await q.depth() == 0 and await q.pending() == 0  # acked and deleted
        workers = await q.live_workers()
        assert workers[0]["worker"] == "w1" and workers[0]["name"] == "fake"
        await stop_worker(worker, task)
        assert await q.live_workers() == []  # a stopping worker removes its heartbeat
        await q.close()

    asyncio.run(go())


def test_a_worker_reads_only_its_share_of_the_stream(redis_server):
    """Two live workers, ten jobs queued: the first worker to look takes five and
    leaves five for the other (service/batching.py, fair_share)."""
    s = settings_for(redis_server, max_batch_size=16, max_wait_ms=0)

    async def go():
        q = RedisQueue.from_settings(s)
        await q.ensure_group()
        for name in ("w1", "w2"):
            await q.heartbeat(name, {"name": "fake"})
        for n in range(10):
            await q.enqueue({"op": "analyze", "id": f"j{n}"}, b"x")
        assert await q.backlog() == (10, 2)
        worker = Worker(s, q, echo, name="w1", info={"name": "fake"})
        jobs = await next_batch(RedisSource(q, "w1"), worker.policy, idle_timeout=1.0, share=worker._share)
        assert len(jobs) == 5
        assert await q.pending("w1") == 5 and await q.depth() == 10   # five in hand, five still queued
        await q.close()

    asyncio.run(go())


def test_queue_full_and_no_worker_are_refused_at_once(redis_server):
    s = settings_for(redis_server, queue_maxlen=2)

    async def go():
        q = RedisQueue.from_settings(s)
        t0 = time.monotonic()
        with pytest.raises(NoWorkers):
            await q.enqueue({"op": "analyze"}, b"a")
        await q.heartbeat("ghost", {"name": "fake"})  # "alive" but never reads
        await q.enqueue({"op": "analyze"}, b"a")
        await q.enqueue({"op": "analyze"}, b"b")
        with pytest.raises(QueueFull):
            await q.enqueue({"op": "analyze"}, b"c")
        assert time.monotonic() - t0 < 1.0
        assert await q.depth() == 2
        await q.close()

    asyncio.run(go())


def test_a_job_is_answered_once_even_if_completed_twice(redis_server):
    s = settings_for(redis_server)

    async def go():
        q = RedisQueue.from_settings(s)
        await q.ensure_group()
        await q.heartbeat("w", {})
        job_id = await q.enqueue({"op": "analyze"}, b"img")
        (job,) = await q.read("w", 1, 0)
        assert job.id == job_id and job.image == b"img" and job.meta["op"] == "analyze"
        assert await q.complete(job, {"n": 1}) is True
        assert await q.complete(job, {"n": 2}) is False
        assert await q.wait_result(job_id, 1) == {"n": 1}
        assert await q.client.llen(q._key("result", job_id)) == 0  # no second answer waiting
        await q.close()

    asyncio.run(go())


def test_jobs_of_a_dead_consumer_are_reclaimed_after_the_visibility_timeout(redis_server):
    s = settings_for(redis_server, visibility_timeout_s=0.3)

    async def go():
        q = RedisQueue.from_settings(s)
        await q.ensure_group()
        await q.heartbeat("dead", {})
        ids = [await q.enqueue({"op": "analyze"}, b"x" * n) for n in (1, 2, 3)]
        taken = await q.read("dead", 10, 0)  # read, then "crash": never acked
        assert len(taken) == 3 and await q.pending("dead") == 3
        worker, task = await started_worker(s, name="alive")
        replies = [await q.wait_result(i, 5) for i in ids]
        assert [r["size"] for r in replies] == [1, 2, 3]
        assert await q.pending() == 0 and await q.dead_count() == 0
        await stop_worker(worker, task)
        await q.close()

    asyncio.run(go())


def test_a_job_failing_max_attempts_times_is_dead_lettered_with_its_reason(redis_server):
    s = settings_for(redis_server, max_attempts=2, visibility_timeout_s=5.0)

    async def go():
        worker, task = await started_worker(s)
        q = RedisQueue.from_settings(s)
        t0 = time.monotonic()
        bad, good = await asyncio.gather(q.submit({"op": "analyze"}, b"poison", 10),
                                         q.submit({"op": "analyze"}, b"fine", 10))
        # a raised job is retried at once (not after the 5 s visibility timeout)
        assert time.monotonic() - t0 < 4.0
        assert good == {"size": 4, "batch": good["batch"]}
        assert bad["error"] == "dead_letter"
        assert "dead-lettered" in bad["detail"] and "RuntimeError: poisoned input" in bad["detail"]
        assert await q.dead_count() == 1
        (entry,) = await q.client.xrange(q.dead)
        fields = entry[1]
        assert int(fields[b"deliveries"]) == 3 and json.loads(fields[b"meta"])["image_bytes"] == 6
        assert await q.depth() == 0 and await q.pending() == 0
        await stop_worker(worker, task)
        await q.close()

    asyncio.run(go())


def test_expired_jobs_are_not_processed(redis_server):
    s = settings_for(redis_server)
    calls = []

    def spy(jobs):
        calls.append(len(jobs))
        return echo(jobs)

    async def go():
        q = RedisQueue.from_settings(s)
        await q.heartbeat("x", {})
        job_id = await q.enqueue({"op": "analyze", "deadline": time.time() - 1}, b"late")
        worker, task = await started_worker(s, spy)
        assert (await q.wait_result(job_id, 5))["error"] == "expired"
        await stop_worker(worker, task)
        await q.close()

    asyncio.run(go())
    assert calls == []


def test_graceful_shutdown_finishes_the_batch_in_hand(redis_server):
    s = settings_for(redis_server, max_batch_size=8)

    def slow(jobs):
        time.sleep(0.5)
        return echo(jobs)

    async def go():
        worker, task = await started_worker(s, slow)
        q = RedisQueue.from_settings(s)
        pending = [asyncio.ensure_future(q.submit({"op": "analyze"}, b"x", 10)) for _ in range(3)]
        while await q.pending("w1") == 0:  # the worker has read some and is processing them
            await asyncio.sleep(0.01)
        worker.stop.set()  # what SIGTERM does
        await asyncio.wait_for(task, 10)   # it stops after finishing the batch in hand ...
        assert await q.pending("w1") == 0
        # ... and what it had not read yet stays queued for the next worker: nothing lost
        worker2, task2 = await started_worker(s, slow, name="w2")
        replies = await asyncio.gather(*pending)
        assert all("error" not in r for r in replies)
        assert await q.pending() == 0
        worker2.stop.set()
        await asyncio.wait_for(task2, 10)
        for w in (worker, worker2):
            await w.queue.close()
        await q.close()

    asyncio.run(go())


def test_redis_restart_fails_fast_then_recovers(redis_server):
    s = settings_for(redis_server)

    async def go():
        worker, task = await started_worker(s)
        q = RedisQueue.from_settings(s)
        assert "error" not in await q.submit({"op": "analyze"}, b"before", 5)
        redis_server.stop()
        try:
            t0 = time.monotonic()
            with pytest.raises(RedisConnectionError):
                await q.submit({"op": "analyze"}, b"down", 5)
            assert time.monotonic() - t0 < 1.5
            await asyncio.sleep(0.5)  # the worker is backing off meanwhile
        finally:
            redis_server.start()  # empty again: no stream, no group
        for _ in range(100):  # the worker heartbeats again
            try:
                if await q.live_workers():
                    break
            except RedisConnectionError:
                pass
            await asyncio.sleep(0.05)
        reply = await q.submit({"op": "analyze"}, b"after", 10)
        assert "error" not in reply and reply["size"] == 5
        groups = await q.client.xinfo_groups(q.stream)
        assert [g["name"] for g in groups] == [GROUP.encode()]
        await stop_worker(worker, task)
        await q.close()

    asyncio.run(go())


def test_face_states_in_redis_are_capped_oldest_first(redis_server):
    s = settings_for(redis_server, face_cache_max=5)

    async def go():
        q = RedisQueue.from_settings(s)
        try:
            first = {f"a{i}": b"x" * 100 for i in range(4)}
            assert await q.store_faces(first) == 0
            dropped = await q.store_faces({f"b{i}": b"y" * 100 for i in range(3)})
            assert dropped == 2
            kept = await q.load_faces([*first, "b0", "b1", "b2"])
            assert sorted(kept) == ["a2", "a3", "b0", "b1", "b2"]   # the two oldest went
            keys = [k async for k in q.client.scan_iter(f"{s.queue_prefix}:face:*")]
            assert len(keys) == 5 and await q.client.zcard(f"{s.queue_prefix}:faces") == 5
            assert 0 < await q.client.ttl(f"{s.queue_prefix}:face:b2") <= s.face_ttl_s
        finally:
            await q.close()
    asyncio.run(go())


def test_face_states_in_redis_are_capped_in_bytes_too(redis_server):
    s = settings_for(redis_server, face_cache_max=1000, face_cache_max_mb=10_000 / (1 << 20))

    async def go():
        q = RedisQueue.from_settings(s)
        try:
            assert await q.store_faces({f"a{i}": b"x" * 3000 for i in range(3)}) == 0
            assert int(await q.client.get(f"{s.queue_prefix}:face_bytes")) == 9000
            assert await q.store_faces({"b": b"y" * 5000}) == 2     # 14,000 bytes: the two oldest go
            kept = await q.load_faces(["a0", "a1", "a2", "b"])
            assert sorted(kept) == ["a2", "b"]
            assert int(await q.client.get(f"{s.queue_prefix}:face_bytes")) == 8000
            assert await q.client.hlen(f"{s.queue_prefix}:face_sizes") == 2
        finally:
            await q.close()
    asyncio.run(go())
