"""The batching loop without Redis or a model: deterministic, with extreme timeouts
(0 and 1000 s) so no assertion depends on the machine's speed."""
from __future__ import annotations

import asyncio
import io
import time

import pytest
from PIL import Image

from service.batching import (
    BatchPolicy, BatchSizeMismatch, InProcessBatcher, QueueSource, call_batch, fair_share, next_batch,
)
from service.errors import QueueFull


class ScriptedSource:
    """Hands out pre-scripted lists, one per get(); records each (limit, timeout)."""

    def __init__(self, script: list[list[int]]) -> None:
        self.script = list(script)
        self.calls: list[tuple[int, float | None]] = []

    async def get(self, limit: int, timeout: float | None) -> list[int]:
        self.calls.append((limit, timeout))
        items = self.script.pop(0) if self.script else []
        assert len(items) <= limit, "source asked for fewer items than scripted"
        return items


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_full_batch_returns_at_once_even_with_a_huge_wait():
    source = ScriptedSource([[1, 2, 3, 4]])
    t0 = time.monotonic()
    batch = run(next_batch(source, BatchPolicy(max_batch_size=4, max_wait_s=1000.0)))
    assert batch == [1, 2, 3, 4]
    assert time.monotonic() - t0 < 1.0
    assert len(source.calls) == 1  # full: no further get, not even the drain


def test_zero_wait_only_drains_without_blocking():
    source = ScriptedSource([[1], [2, 3]])
    batch = run(next_batch(source, BatchPolicy(max_batch_size=8, max_wait_s=0.0)))
    assert batch == [1, 2, 3]
    assert source.calls == [(8, None), (7, 0)]  # first wait, then a non-blocking drain only


def test_deadline_is_measured_from_the_oldest_item():
    clock = FakeClock(100.0)
    arrivals = {1: 99.0, 2: 100.0}  # item 1 arrived 1 s ago
    source = ScriptedSource([[1, 2], [3], []])
    policy = BatchPolicy(max_batch_size=8, max_wait_s=1.5)
    batch = run(next_batch(source, policy, arrival=arrivals.get, clock=clock))
    assert batch == [1, 2, 3]
    # deadline = 99.0 + 1.5 = 100.5: the fill waits 0.5 s, not 1.5 s from "now"
    assert source.calls[1] == (6, pytest.approx(0.5))


def test_an_item_that_already_waited_past_the_deadline_is_not_held_back():
    clock = FakeClock(100.0)
    source = ScriptedSource([[1], [2]])
    batch = run(next_batch(source, BatchPolicy(8, max_wait_s=0.010), arrival=lambda _: 50.0, clock=clock))
    assert batch == [1, 2]
    assert source.calls == [(8, None), (7, 0)]  # straight to the non-blocking drain


def test_fill_stops_when_a_wait_times_out():
    source = ScriptedSource([[1], [], [9]])  # the wait times out, [9] is there for the drain
    batch = run(next_batch(source, BatchPolicy(8, max_wait_s=1000.0)))
    assert batch == [1, 9]
    assert len(source.calls) == 3 and source.calls[2] == (7, 0)  # drained without blocking
    source = ScriptedSource([[1], [], []])
    assert run(next_batch(source, BatchPolicy(8, max_wait_s=1000.0))) == [1]


def test_batch_never_exceeds_the_maximum():
    source = ScriptedSource([[1, 2], [3, 4], [5]])
    batch = run(next_batch(source, BatchPolicy(max_batch_size=5, max_wait_s=1000.0)))
    assert batch == [1, 2, 3, 4, 5]
    assert [limit for limit, _ in source.calls] == [5, 3, 1]


def test_idle_timeout_returns_an_empty_batch():
    source = ScriptedSource([])
    assert run(next_batch(source, BatchPolicy(4, 1000.0), idle_timeout=0.01)) == []
    assert source.calls == [(4, 0.01)]


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchPolicy(max_wait_s=-1)


def test_call_batch_isolates_items_and_checks_the_count():
    def fn(items):
        return [ValueError(f"bad {x}") if x < 0 else x * 10 for x in items]
    out = call_batch(fn, [1, -2, 3])
    assert out[0] == 10 and out[2] == 30 and isinstance(out[1], ValueError)

    out = call_batch(lambda items: items[:-1], [1, 2, 3])
    assert all(isinstance(r, BatchSizeMismatch) for r in out) and len(out) == 3

    def boom(items):
        raise RuntimeError("model exploded")
    out = call_batch(boom, [1, 2])
    assert [str(r) for r in out] == ["model exploded"] * 2


def test_queue_source_zero_timeout_never_blocks():
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        src = QueueSource(q)
        assert await src.get(4, 0) == []
        for i in range(6):
            q.put_nowait(i)
        assert await src.get(4, 0) == [0, 1, 2, 3]
        assert await src.get(4, 1000.0) == [4, 5]
        assert await src.get(4, 0.01) == []
    run(go())


def test_in_process_batcher_batches_isolates_and_bounds():
    seen: list[int] = []

    def fn(items):
        seen.append(len(items))
        return [RuntimeError("odd") if x % 2 else x for x in items]

    async def go():
        b = InProcessBatcher(BatchPolicy(max_batch_size=4, max_wait_s=0.0), maxsize=10)
        futs = [b.submit(i) for i in range(10)]
        with pytest.raises(QueueFull):
            b.submit(99)  # 10 waiting: full, refused at once
        b.start([fn])
        results = await asyncio.gather(*futs, return_exceptions=True)
        await b.stop()
        return results

    results = run(go())
    assert [r for r in results if not isinstance(r, Exception)] == [0, 2, 4, 6, 8]
    assert all(isinstance(results[i], RuntimeError) for i in (1, 3, 5, 7, 9))
    assert sum(seen) == 10 and max(seen) <= 4 and len(seen) == 3  # 4 + 4 + 2


def test_in_process_batcher_skips_jobs_whose_client_gave_up():
    seen: list[list[int]] = []

    def fn(items):
        seen.append(list(items))
        return items

    async def go():
        b = InProcessBatcher(BatchPolicy(max_batch_size=8, max_wait_s=0.0))
        f1, f2 = b.submit(1), b.submit(2)
        f1.cancel()  # e.g. the request timed out before the loop started
        b.start([fn])
        assert await f2 == 2
        await b.stop()

    run(go())
    assert seen == [[2]]


def test_in_process_batcher_two_loops_never_share_a_function():
    active: dict[int, int] = {0: 0, 1: 0}
    overlaps = []

    def make(k):
        def fn(items):
            active[k] += 1
            overlaps.append(active[k])
            time.sleep(0.02)
            active[k] -= 1
            return items
        return fn

    async def go():
        b = InProcessBatcher(BatchPolicy(max_batch_size=2, max_wait_s=0.0))
        b.start([make(0), make(1)])
        out = await asyncio.gather(*[b.submit(i) for i in range(12)])
        await b.stop()
        return out

    assert run(go()) == list(range(12))
    assert max(overlaps) == 1


def test_fair_share_leaves_work_for_the_other_loops():
    assert fair_share(16, loops=2, max_batch_size=16) == 8
    assert fair_share(5, loops=2, max_batch_size=16) == 3
    assert fair_share(1, loops=2, max_batch_size=16) == 1
    assert fair_share(0, loops=3, max_batch_size=16) == 1
    assert fair_share(100, loops=2, max_batch_size=16) == 16
    assert fair_share(3, loops=1, max_batch_size=16) == 16   # a lone loop may wait to fill a batch
    assert fair_share(3, loops=0, max_batch_size=16) == 16   # no live worker seen (heartbeat late)


def test_a_loop_takes_only_its_share_of_what_is_queued():
    asked = []

    async def share(taken):
        asked.append(taken)
        return 4

    source = ScriptedSource([[1], [2, 3, 4]])
    batch = run(next_batch(source, BatchPolicy(max_batch_size=16, max_wait_s=1000.0), share=share))
    assert batch == [1, 2, 3, 4] and asked == [1]
    assert source.calls == [(1, None), (3, 0)]   # one item first, then the share: full, no wait


def test_two_loops_split_a_burst_instead_of_one_taking_it_all():
    sizes: list[int] = []

    def make(k):
        def fn(items):
            sizes.append(len(items))
            time.sleep(0.05)
            return items
        return fn

    async def go():
        b = InProcessBatcher(BatchPolicy(max_batch_size=16, max_wait_s=0.0))
        futs = [b.submit(i) for i in range(16)]   # queued before either loop looks
        b.start([make(0), make(1)])
        out = await asyncio.gather(*futs)
        await b.stop()
        return out

    assert run(go()) == list(range(16))
    assert sizes == [8, 8]   # greedy, the first loop took all 16 and the second ran dry


def test_a_lone_item_on_an_idle_loop_is_not_held_back():
    # no sign of other clients (previous batch alone, one item now): drain only, never wait
    source = ScriptedSource([[1], [2]])
    t0 = time.monotonic()
    batch = run(next_batch(source, BatchPolicy(max_batch_size=8, max_wait_s=1000.0), busy=False))
    assert batch == [1, 2] and time.monotonic() - t0 < 1.0
    assert source.calls == [(8, None), (7, 0)]
    # several items at once are a sign of load: the batch waits to fill, as before
    source = ScriptedSource([[1, 2], [3], []])
    clock = FakeClock()
    batch = run(next_batch(source, BatchPolicy(max_batch_size=8, max_wait_s=1000.0), busy=False, clock=clock))
    assert batch == [1, 2, 3] and source.calls[1] == (6, 1000.0)


def test_an_error_reply_raises_its_kind_and_the_edge_maps_it_to_one_status():
    """A reply's error kind (service/jobs.py) becomes JobError(kind); the only place
    a kind becomes an HTTP status is service/errors.py."""
    import pytest as _pytest

    from service.backend import _check
    from service.errors import JOB_ERROR_STATUS, JobError, NoWorkers, ResultTimeout, http_status
    from service.jobs import ERROR_KINDS, error_reply
    with _pytest.raises(JobError) as info:
        _check(error_reply("dead_letter", "gone after 3 tries"))
    assert info.value.kind == "dead_letter" and http_status(info.value) == 500
    assert _check({"faces": []}) == {"faces": []}
    assert set(JOB_ERROR_STATUS) == set(ERROR_KINDS)
    assert http_status(JobError("image_too_large", "x")) == 413 and http_status(JobError("unknown_face", "x")) == 404
    assert http_status(NoWorkers()) == 503 and http_status(ResultTimeout()) == 504
    with _pytest.raises(ValueError, match="unknown error kind"):
        error_reply("teapot", "no such kind")


def test_the_in_process_face_store_drops_expired_states_as_new_ones_come():
    """Expired face states used to stay in memory until the count cap pushed them out
    (10,000 by default): memory grew with every request for the first 10,000 faces."""
    from service.backend import MemoryFaceStore
    now = [0.0]
    store = MemoryFaceStore(ttl_s=10, max_items=100, clock=lambda: now[0])
    store.put_many({f"a{i}": b"x" * 1000 for i in range(50)})
    now[0] = 5.0
    store.put_many({"b": b"y"})
    assert len(store) == 51 and store.get("a0") == b"x" * 1000
    now[0] = 12.0  # the a's expired at 10, b expires at 15
    store.put_many({"c": b"z"})
    assert len(store) == 2 and store.get("b") == b"y" and store.get("a1") is None
    store.put_many({f"d{i}": b"w" for i in range(150)})  # the count cap still holds
    assert len(store) == 100 and store.get("b") is None and store.get("d149") == b"w"


def test_the_in_process_face_store_is_capped_in_bytes_too():
    from service.backend import MemoryFaceStore
    store = MemoryFaceStore(ttl_s=100, max_items=1000, max_bytes=10_000, clock=lambda: 0.0)
    store.put_many({f"a{i}": b"x" * 3000 for i in range(3)})
    assert len(store) == 3 and store.bytes == 9000
    store.put_many({"b": b"y" * 5000})  # 14,000 bytes: the oldest go until it fits
    assert store.get("a0") is None and store.get("a1") is None and store.get("b") == b"y" * 5000
    assert len(store) == 2 and store.bytes == 8000


def test_a_costly_item_runs_alone_after_its_batch_mates_are_answered():
    """One photo whose detection takes seconds used to hold every job of its batch:
    now the cheap jobs are called (and answered) first, the costly one alone after."""
    calls: list[list[int]] = []
    cheap_done_at_call: list[bool] = []
    futs: dict[int, asyncio.Future] = {}

    def fn(items):
        calls.append(list(items))
        cheap_done_at_call.append(all(futs[x].done() for x in (1, 2, 3)))
        return items

    async def go():
        policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0, cost=lambda x: x, alone_above=100)
        b = InProcessBatcher(policy, maxsize=10)
        futs.update({x: b.submit(x) for x in (1, 500, 2, 3, 900)})
        b.start([fn])
        results = await asyncio.gather(*futs.values())
        await b.stop()
        return results

    assert run(go()) == [1, 500, 2, 3, 900]
    assert calls == [[1, 2, 3], [500], [900]]
    assert cheap_done_at_call == [False, True, True]   # answered before the costly calls ran


def test_job_cost_is_the_pixels_of_a_photo_to_search():
    from service.jobs import OP_RENDER, Job, job_cost
    buf = io.BytesIO()
    Image.new("RGB", (1200, 900)).save(buf, format="JPEG")
    assert job_cost(Job(image=buf.getvalue())) == 1200 * 900
    assert job_cost(Job(image=buf.getvalue(), aligned=True)) == 0      # a face crop: no search
    assert job_cost(Job(op=OP_RENDER, state=b"x")) == 0
    assert job_cost(Job(image=b"not an image")) == 0
    # the API edge's probe travels with the job: the header is not parsed again
    assert job_cost(Job(image=b"not parsed", pixels=640 * 480)) == 640 * 480
    assert Job.from_meta({"op": "analyze", "pixels": 77}, b"").pixels == 77


def test_heap_trimmer_trims_at_most_once_per_interval():
    from service.memory import HeapTrimmer, _glibc_trim
    now, trims = [0.0], []
    t = HeapTrimmer(10.0, trim=lambda pad: trims.append(pad) or 1, clock=lambda: now[0])
    assert not t.maybe_trim()
    now[0] = 10.5
    assert t.maybe_trim() and trims == [0]
    now[0] = 15.0
    assert not t.maybe_trim()
    now[0] = 21.0
    assert t.maybe_trim() and len(trims) == 2
    assert not HeapTrimmer(0.0, trim=lambda pad: trims.append(pad) or 1, clock=lambda: 99.0).maybe_trim()
    assert _glibc_trim() is not None   # this machine's C library has it: the real trim is wired


def test_the_batch_loop_runs_source_prepare_function_and_sink_in_order():
    """The one loop the in-process batcher and the Redis worker both run: prepare
    drops what needs no answer, costly items go alone after the rest, the sink gets
    each call's items as soon as that call is done, a raising slot fails alone."""
    import concurrent.futures

    from service.batching import BatchLoop

    calls, sunk, sizes = [], [], []

    def fn(items):
        calls.append(list(items))
        return [ValueError("bad") if i == 13 else i * 10 for i in items]

    async def prepare(batch):
        kept = [i for i in batch if i != 0]     # 0: its client went away
        return kept, kept

    async def sink(items, results):
        sunk.append((list(items), [r if not isinstance(r, Exception) else "error" for r in results]))

    async def go():
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            loop = BatchLoop(ScriptedSource([[0, 1, 500, 13, 2]]), fn,
                             BatchPolicy(max_batch_size=8, max_wait_s=0.0, cost=lambda i: i, alone_above=100),
                             sink, executor=pool, prepare=prepare, on_batch=lambda n, s: sizes.append(n))
            assert await loop.run_once() == 5
            assert loop.held == 0
            assert await loop.run_once() == 0      # nothing more came
            assert await loop.run_once([7]) == 1   # a batch handed in (reclaimed jobs)

    run(go())
    assert calls == [[1, 13, 2], [500], [7]]
    assert sunk == [([1, 13, 2], [10, "error", 20]), ([500], [5000]), ([7], [70])]
    assert sizes == [3, 1, 1]
