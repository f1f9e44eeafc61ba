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

`BatchLoop` is that loop, once: a source, a batch function, a policy and a sink.
`InProcessBatcher` runs it over an asyncio queue with one future per item
(`ipdfer serve` without Redis); the Redis worker runs it over the stream
(service/worker.py).
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


class BatchLoop(Generic[T, R]):
    """One batch loop: take a batch from `source` (`next_batch` under `policy`),
    `prepare` it (drop what needs no answer, turn items into the batch function's
    inputs), run `fn` in `executor` (never on the event loop, never concurrently
    with itself), costly items alone after the rest (`split_by_cost`), and give
    each call's items and results to `sink` as soon as that call is done.

    `share(taken)`: the most items this loop should hold (`fair_share`);
    `held`: the items in its hands now (what other loops count as outstanding);
    `on_batch(size, seconds)`: a metrics hook; `abandon(items)`: called with a
    call's items when the loop is cancelled while it runs (shutdown)."""

    def __init__(self, source: BatchSource, fn: Callable[[list[T]], Sequence[R | BaseException]],
                 policy: BatchPolicy, sink: Callable[[list[Any], list[R | BaseException]], Awaitable[None]], *,
                 executor: concurrent.futures.Executor, prepare: Callable[[list[Any]], Awaitable[tuple[list, list[T]]]]
                 | None = None, arrival: Callable[[Any], float] | None = None,
                 share: Callable[[int], Awaitable[int]] | None = None, idle_timeout: float | None = None,
                 on_batch: Callable[[int, float], Any] | None = None,
                 abandon: Callable[[list[Any]], None] | None = None) -> None:
        self.source, self.fn, self.policy, self.sink = source, fn, policy, sink
        self.executor, self.prepare, self.arrival, self.share = executor, prepare, arrival, share
        self.idle_timeout, self.on_batch, self.abandon = idle_timeout, on_batch, abandon
        self.held = 0
        self._last_size = 0   # the batching rule waits for company only under load (next_batch's busy)

    async def run_once(self, batch: list | None = None) -> int:
        """One batch: `batch` when given (e.g. jobs reclaimed from dead workers),
        else the next from the source. Returns its size (0: nothing came)."""
        if batch is None:
            batch = await next_batch(self.source, self.policy, idle_timeout=self.idle_timeout,
                                     arrival=self.arrival, busy=self._last_size > 1, share=self.share)
            if batch:
                self._last_size = len(batch)
        if not batch:
            return 0
        items, inputs = await self.prepare(batch) if self.prepare else (batch, batch)
        self.held = len(items)
        try:
            for part in split_by_cost(self.policy, inputs):
                await self._call([items[i] for i in part], [inputs[i] for i in part])
        finally:
            self.held = 0
        return len(batch)

    async def _call(self, items: list, inputs: list[T]) -> None:
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, call_batch, self.fn, inputs)
        except asyncio.CancelledError:
            if self.abandon:
                self.abandon(items)
            raise
        if self.on_batch:
            self.on_batch(len(inputs), time.perf_counter() - t0)
        await self.sink(items, results)


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
        self._loops: list[BatchLoop] = []

    def start(self, fns: Sequence[Callable[[list[T]], Sequence[R | BaseException]]]) -> None:
        """Start one batch loop per function (call from the event loop)."""
        loop = asyncio.get_running_loop()
        for i, fn in enumerate(fns):
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batch-{i}")
            self._pools.append(pool)
            batch_loop: BatchLoop[T, R] = BatchLoop(
                QueueSource(self.queue), fn, self.policy, self._answer, executor=pool, prepare=self._live,
                arrival=lambda p: p.arrived, share=self._share, on_batch=self.on_batch, abandon=self._abandon)
            self._loops.append(batch_loop)
            self._tasks.append(loop.create_task(self._run(batch_loop), name=f"batch-loop-{i}"))

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
        outstanding = self.queue.qsize() + taken + sum(loop.held for loop in self._loops)
        return fair_share(outstanding, len(self._loops), self.policy.max_batch_size)

    @staticmethod
    async def _live(batch: list[_Pending[T]]) -> tuple[list[_Pending[T]], list[T]]:
        live = [p for p in batch if not p.future.done()]  # client gone (timeout, disconnect)
        return live, [p.item for p in live]

    @staticmethod
    async def _answer(batch: list[_Pending[T]], results: list[R | BaseException]) -> None:
        for p, r in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)

    @staticmethod
    def _abandon(batch: list[_Pending[T]]) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(RuntimeError("service shutting down"))

    @staticmethod
    async def _run(batch_loop: BatchLoop) -> None:
        while True:
            await batch_loop.run_once()

    async def stop(self) -> None:
        """Cancel the loops (a batch in its thread finishes), fail what still waits."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks, self._loops = [], []
        while not self.queue.empty():
            p = self.queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(RuntimeError("service shutting down"))
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools = []
