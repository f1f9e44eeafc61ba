"""Dynamic batching, independent of where jobs come from (Redis or an asyncio queue).

Shape of the loop (after Ray Serve's batching.py):
  1. wait for a first job (or give up after `idle_timeout`, so callers can check
     for shutdown);
  2. keep collecting until the batch is full or the deadline passes, the deadline
     measured from the OLDEST job's arrival (`time.monotonic()`), so a job never
     waits more than `max_wait_s` for company; but only when there is evidence of
     concurrent load (`busy`: the previous batch had company, or this first get
     found more than one job). A lone job reaching an idle loop runs at once:
     waiting would cost a lone client latency and buy nothing;
     Where several loops share one queue (batch loops in process, workers on
     Redis), a loop takes at most its fair share of the jobs outstanding (queued
     or in any loop's hands): ceil(outstanding / loops), asked once its first job
     is in hand. A loop that took all 16 queued jobs held most of 16 clients in
     one long batch while the other loop ran dry: on 2 CPU cores that cost ~10%
     of the throughput and doubled p99 (benchmarks/load.py);
  3. drain whatever is already there without blocking (never more than the max);
  4. run the batch function; it must return one result per input, and an
     Exception in a slot fails that job only. With a cost function, items that
     cost more than `alone_above` (a photo whose detection takes a second) run
     after the rest of the batch, each in a call of its own, and the cheap items'
     results go out first: one costly job never holds its batch mates.

`next_batch` works on any `BatchSource`; `InProcessBatcher` is the asyncio-queue
source + futures used by `ipdfer serve` without Redis; the Redis worker feeds
`next_batch` from the stream (service/worker.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
import math
from typing import Any, Awaitable, Callable, Generic, Protocol, Sequence, TypeVar

from service.errors import QueueFull

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 16   # most items in one call of the batch function
    max_wait_s: float = 0.010  # longest the oldest item waits for the batch to fill
    cost: Callable[[Any], float] | None = None  # an item's cost (e.g. pixels), for alone_above
    alone_above: float = float("inf")           # items costing more run alone, after the rest

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")


class BatchSource(Protocol[T]):
    async def get(self, limit: int, timeout: float | None) -> list[T]:
        """Up to `limit` (>= 1) items. Waits up to `timeout` seconds for the first
        one (None: indefinitely; 0: do not wait) and returns [] if none came."""


class BatchSizeMismatch(RuntimeError):
    """The batch function returned a different number of results than inputs."""


async def next_batch(
    source: BatchSource[T],
    policy: BatchPolicy,
    *,
    idle_timeout: float | None = None,
    arrival: Callable[[T], float] | None = None,
    clock: Callable[[], float] = time.monotonic,
    busy: bool = True,
    share: Callable[[int], Awaitable[int]] | None = None,
) -> list[T]:
    """One batch of 1..max_batch_size items, or [] if nothing arrived within
    `idle_timeout`. `arrival(item)` gives an item's arrival time on `clock`;
    without it the time the first item was received counts as its arrival.
    busy=False (the caller's previous batch held one item): a single first item
    is not held back for company, only what is already queued joins it.
    share(taken): the most items this loop should hold, asked with the first item
    in hand (`fair_share`); without it, max_batch_size."""
    # 1. first item(s)
    limit = policy.max_batch_size
    batch = await source.get(1 if share else limit, idle_timeout)
    if not batch:
        return []
    if share:
        limit = max(1, min(limit, await share(len(batch))))
        if limit > len(batch):
            batch.extend(await source.get(limit - len(batch), 0))
    if not busy and len(batch) == 1:   # no sign of other clients: drain, do not wait
        if limit > 1:
            batch.extend(await source.get(limit - 1, 0))
        return batch
    oldest = min(arrival(x) for x in batch) if arrival else clock()
    deadline = oldest + policy.max_wait_s
    # 2. fill until full or the oldest item's deadline
    while len(batch) < limit:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        more = await source.get(limit - len(batch), remaining)
        if not more:
            break
        batch.extend(more)
    # 3. drain what is already queued, without waiting
    if len(batch) < limit:
        batch.extend(await source.get(limit - len(batch), 0))
    assert 1 <= len(batch) <= limit, len(batch)
    return batch


def fair_share(outstanding: int, loops: int, max_batch_size: int) -> int:
    """The most jobs one of `loops` loops sharing a queue should hold when
    `outstanding` jobs are queued or in the loops' hands (its own included): an
    equal part, so no loop runs dry while another holds the backlog. A lone loop
    may fill a whole batch (waiting for company is how it amortizes)."""
    if loops <= 1:
        return max_batch_size
    return max(1, min(max_batch_size, math.ceil(outstanding / loops)))


def split_by_cost(policy: BatchPolicy, items: list[T]) -> list[list[int]]:
    """Indices of the calls to make for one batch: the cheap items together first,
    then each item costing more than `policy.alone_above` on its own."""
    if policy.cost is None:
        return [list(range(len(items)))]
    heavy = [i for i, item in enumerate(items) if policy.cost(item) > policy.alone_above]
    light = sorted(set(range(len(items))) - set(heavy))
    return ([light] if light else []) + [[i] for i in heavy]


def call_batch(fn: Callable[[list[T]], Sequence[R | BaseException]], items: list[T]) -> list[R | BaseException]:
    """Run the batch function with per-item isolation: a raise fails every item
    with that exception; an Exception in a slot fails that item only; a wrong
    number of results fails them all with BatchSizeMismatch."""
    try:
        results = list(fn(items))
    except Exception as e:  # noqa: BLE001 - the batch failed as a whole
        log.exception("batch function raised on %d items", len(items))
        return [e] * len(items)
    if len(results) != len(items):
        err = BatchSizeMismatch(f"batch function returned {len(results)} results for {len(items)} inputs")
        log.error("%s", err)
        return [err] * len(items)
    return results


# --- in-process mode ----------------------------------------------------------------

@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class QueueSource(Generic[T]):
    """BatchSource over an asyncio.Queue (items are whatever was put)."""

    def __init__(self, queue: asyncio.Queue) -> None:
        self.queue = queue

    async def get(self, limit: int, timeout: float | None) -> list[T]:
        out: list[T] = []
        if timeout is None or timeout > 0:
            try:
                out.append(await asyncio.wait_for(self.queue.get(), timeout))
            except asyncio.TimeoutError:
                return out
        while len(out) < limit:
            try:
                out.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return out


class InProcessBatcher(Generic[T, R]):
    """asyncio queue + one future per item + one batch loop per batch function.

    Each loop runs its (blocking) batch function in its own thread, so the event
    loop never waits on the model and a function is never called concurrently
    with itself (an Analyzer is not thread-safe: give each loop its own).
    `submit` raises QueueFull at once when `maxsize` items are waiting."""

    def __init__(self, policy: BatchPolicy, *, maxsize: int = 0,
                 on_batch: Callable[[int, float], Any] | None = None) -> None:
        self.policy = policy
        self.queue: asyncio.Queue[_Pending[T]] = asyncio.Queue(maxsize)
        self.on_batch = on_batch  # (batch size, seconds in the batch function): metrics hook
        self._tasks: list[asyncio.Task] = []
        self._pools: list[concurrent.futures.ThreadPoolExecutor] = []
        self._held: list[int] = []   # items in each loop's hands (batch being run)

    def start(self, fns: Sequence[Callable[[list[T]], Sequence[R | BaseException]]]) -> None:
        """Start one batch loop per function (call from the event loop)."""
        loop = asyncio.get_running_loop()
        for i, fn in enumerate(fns):
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batch-{i}")
            self._pools.append(pool)
            self._held.append(0)
            self._tasks.append(loop.create_task(self._run(i, fn, pool), name=f"batch-loop-{i}"))

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, item: T) -> asyncio.Future:
        """Queue one item; returns a future with its result (or exception)."""
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(item, fut))
        except asyncio.QueueFull:
            raise QueueFull(f"queue full ({self.queue.maxsize} jobs waiting)") from None
        return fut

    async def _share(self, taken: int) -> int:
        outstanding = self.queue.qsize() + taken + sum(self._held)
        return fair_share(outstanding, len(self._tasks), self.policy.max_batch_size)

    async def _run(self, index: int, fn: Callable[[list[T]], Sequence[R | BaseException]],
                   pool: concurrent.futures.ThreadPoolExecutor) -> None:
        source: QueueSource[_Pending[T]] = QueueSource(self.queue)
        last_size = 0
        while True:
            batch = await next_batch(source, self.policy, arrival=lambda p: p.arrived, busy=last_size > 1,
                                     share=self._share)
            last_size = len(batch)
            batch = [p for p in batch if not p.future.done()]  # client gone (timeout, disconnect)
            if not batch:
                continue
            self._held[index] = len(batch)
            try:
                for part in split_by_cost(self.policy, [p.item for p in batch]):
                    await self._call(fn, pool, [batch[i] for i in part])
            finally:
                self._held[index] = 0

    async def _call(self, fn: Callable[[list[T]], Sequence[R | BaseException]],
                    pool: concurrent.futures.ThreadPoolExecutor, batch: list[_Pending[T]]) -> None:
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(pool, call_batch, fn,
                                                                       [p.item for p in batch])
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RuntimeError("service shutting down"))
            raise
        if self.on_batch:
            self.on_batch(len(batch), time.perf_counter() - t0)
        for p, r in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)

    async def stop(self) -> None:
        """Cancel the loops (a batch in its thread finishes), fail what still waits."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks, self._held = [], []
        while not self.queue.empty():
            p = self.queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(RuntimeError("service shutting down"))
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools = []
