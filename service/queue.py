"""The one module that knows the Redis keys (everything under `settings.queue_prefix`).

    {p}:jobs            stream of jobs: fields `meta` (JSON) and `image` (raw bytes; never
                        pickle). Consumer group `workers`. Entries are XDEL'd when acked,
                        so XLEN = jobs waiting + in flight, the number backpressure bounds.
    {p}:dead            dead-letter stream: meta + reason + delivery count (not the image),
                        capped at `dead_letter_maxlen`.
    {p}:answered:{job}  "answered once" marker (SET NX), expires with the result.
    {p}:result:{job}    list holding the job's one JSON reply; the API BLPOPs it.
    {p}:error:{job}     last failure reason of a job that raised (for the dead letter).
    {p}:workers         sorted set: worker name -> last heartbeat (Redis server time, ms).
    {p}:worker:{name}   that worker's info (JSON, model name/version/sha256/device), with TTL.
    {p}:face:{face_id}  a face's FaceState bytes for GET /neutralize, with TTL.
    {p}:faces           sorted set: face_id -> when stored (server ms); at most
                        `face_store_max` faces and `face_store_max_bytes` of them are kept,
                        the oldest dropped first.
    {p}:face_sizes      hash: face_id -> bytes of its state; {p}:face_bytes their sum.
    {p}:video:{id}      a video's status and, once done, its result (JSON), with TTL.

Delivery: XREADGROUP (`>`) for new jobs; XAUTOCLAIM takes over jobs idle longer than
the visibility timeout (their worker died or gave them back after an error). A job
delivered more than `max_attempts` times goes to the dead-letter stream and its client
gets a 500 with the reason. Answer + XACK + XDEL run in one Lua script, and the answer
is pushed only if the SET NX marker was absent, so a reclaimed job that its first
worker also finishes is answered once. Times that several processes compare
(heartbeats) are Redis server time, so clocks of different hosts do not matter.

Long module: every key and every Lua script (each one atomic step of the protocol)
stay in one place, so the protocol can be read and changed as a whole.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from service.errors import NoWorkers, QueueFull, ResultTimeout
from service.jobs import error_reply

log = logging.getLogger(__name__)

GROUP = "workers"


@dataclass
class QueuedJob:
    id: str                  # job id (uuid hex), names the result key
    entry: str               # stream entry id
    meta: dict[str, Any]     # JSON metadata (op, options, enqueue time, deadline)
    image: bytes             # raw request bytes ("" for render jobs)
    deliveries: int = 1      # how many times the group handed it out
    received: float = field(default_factory=time.monotonic)  # arrival at this worker


_ENQUEUE = """
-- KEYS: stream, workers zset. ARGV: maxlen, heartbeat ttl ms, meta, image
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[2]), '+inf') == 0 then
  return {'noworkers', '0'}
end
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {'full', tostring(n)} end
return {'ok', redis.call('XADD', KEYS[1], '*', 'meta', ARGV[3], 'image', ARGV[4])}
"""

_BACKLOG = """
-- KEYS: stream, workers zset. ARGV: heartbeat ttl ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('XLEN', KEYS[1]), redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[1]), '+inf')}
"""

_ANSWER = """
-- KEYS: answered marker, result list, stream. ARGV: group, entry id, reply, ttl s
local first = redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[4])
if first then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
end
if first then return 1 else return 0 end
"""

_DEAD_LETTER = """
-- KEYS: stream, dead stream, answered marker, result list
-- ARGV: group, entry id, reply, ttl s, dead maxlen, meta, reason, deliveries
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
           'meta', ARGV[6], 'reason', ARGV[7], 'deliveries', ARGV[8], 'entry', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[4]) then
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
return 1
"""

_HEARTBEAT = """
-- KEYS: workers zset, worker info. ARGV: name, info json, ttl ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 10 * tonumber(ARGV[3]))
return now
"""


_STORE_FACES = """
-- KEYS: faces zset (id -> stored ms), sizes hash (id -> bytes), total bytes counter.
-- ARGV: key prefix, ttl s, max faces, max bytes, then face_id, state pairs.
local function drop(id)
  redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], id) or '0'))
  redis.call('HDEL', KEYS[2], id)
  redis.call('DEL', ARGV[1] .. id)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i = 5, #ARGV, 2 do
  redis.call('SET', ARGV[1] .. ARGV[i], ARGV[i + 1], 'EX', ttl)
  redis.call('ZADD', KEYS[1], now, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], #ARGV[i + 1])
  redis.call('INCRBY', KEYS[3], #ARGV[i + 1])
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl * 1000)) do
  drop(id)  -- expired on their own: forget their bytes
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl * 1000)
local dropped = 0
while redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[3])
      or tonumber(redis.call('GET', KEYS[3]) or '0') > tonumber(ARGV[4]) do
  local popped = redis.call('ZPOPMIN', KEYS[1], 1)  -- the oldest
  if #popped == 0 then break end
  drop(popped[1])
  dropped = dropped + 1
end
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ttl * 1000) end
return dropped
"""


def connect(url: str, *, socket_timeout: float | None) -> aioredis.Redis:
    """A client that fails fast when Redis is down: a short connect timeout and one
    immediate retry (which replaces a pooled connection that a Redis restart closed)."""
    return aioredis.Redis.from_url(
        url, decode_responses=False, socket_connect_timeout=1.0, socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 1), health_check_interval=0,
    )


def _s(b: bytes | str) -> str:
    return b.decode() if isinstance(b, bytes) else b


class RedisQueue:
    """Producer (API) and consumer (worker) operations on the job stream.

    `client` is used for quick commands; `blocking` (no socket timeout) for BLPOP and
    blocking XREADGROUP. Both fail fast when Redis is unreachable."""

    def __init__(self, url: str, *, prefix: str = "ipdfer", maxlen: int = 256,
                 result_ttl_s: int = 60, face_ttl_s: int = 600, visibility_timeout_s: float = 30.0,
                 max_attempts: int = 3, dead_letter_maxlen: int = 10_000,
                 heartbeat_ttl_s: float = 6.0, face_store_max: int = 10_000,
                 face_store_max_bytes: int = 200 << 20) -> None:
        self.client = connect(url, socket_timeout=2.0)
        self.blocking = connect(url, socket_timeout=None)
        self.prefix = prefix
        self.maxlen = maxlen
        self.result_ttl_s = result_ttl_s
        self.face_ttl_s = face_ttl_s
        self.face_store_max = face_store_max
        self.face_store_max_bytes = face_store_max_bytes
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_attempts = max_attempts
        self.dead_letter_maxlen = dead_letter_maxlen
        self.heartbeat_ttl_ms = int(heartbeat_ttl_s * 1000)
        self.stream = f"{prefix}:jobs"
        self.dead = f"{prefix}:dead"
        self.workers = f"{prefix}:workers"
        self._enqueue = self.client.register_script(_ENQUEUE)
        self._answer = self.client.register_script(_ANSWER)
        self._dead_letter = self.client.register_script(_DEAD_LETTER)
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._backlog = self.client.register_script(_BACKLOG)
        self._store_faces = self.client.register_script(_STORE_FACES)
        self._claim_cursor = "0-0"

    @classmethod
    def from_settings(cls, s) -> "RedisQueue":
        return cls(s.redis_url, prefix=s.queue_prefix, maxlen=s.queue_maxlen, result_ttl_s=s.result_ttl_s,
                   face_ttl_s=s.face_ttl_s, visibility_timeout_s=s.visibility_timeout_s,
                   max_attempts=s.max_attempts, dead_letter_maxlen=s.dead_letter_maxlen,
                   heartbeat_ttl_s=s.heartbeat_ttl_s, face_store_max=s.face_cache_max,
                   face_store_max_bytes=s.face_cache_max_bytes)

    def _key(self, kind: str, ident: str) -> str:
        return f"{self.prefix}:{kind}:{ident}"

    async def close(self) -> None:
        await self.client.aclose()
        await self.blocking.aclose()

    # --- producer (API) -------------------------------------------------------------

    async def enqueue(self, meta: dict[str, Any], image: bytes = b"") -> str:
        """Add a job; returns its id. Raises QueueFull / NoWorkers at once, or a
        redis ConnectionError when Redis is down."""
        job_id = uuid.uuid4().hex
        meta = {**meta, "id": job_id, "enqueued": time.time()}
        status, value = await self._enqueue(
            keys=[self.stream, self.workers],
            args=[self.maxlen, self.heartbeat_ttl_ms, json.dumps(meta), image])
        status = _s(status)
        if status == "full":
            raise QueueFull(f"queue full ({_s(value)} jobs waiting or in flight)")
        if status == "noworkers":
            raise NoWorkers("no worker is ready")
        return job_id

    async def wait_result(self, job_id: str, timeout: float) -> dict[str, Any]:
        """The job's reply (JSON object). Raises ResultTimeout."""
        got = await self.blocking.blpop([self._key("result", job_id)], timeout=max(timeout, 0.01))
        if got is None:
            raise ResultTimeout(f"no result within {timeout:g} s")
        return json.loads(got[1])

    async def submit(self, meta: dict[str, Any], image: bytes, timeout: float) -> dict[str, Any]:
        meta = {**meta, "deadline": time.time() + timeout}
        job_id = await self.enqueue(meta, image)
        return await self.wait_result(job_id, timeout)

    async def put_video(self, video_id: str, record: dict[str, Any], ttl_s: int) -> None:
        await self.client.set(self._key("video", video_id), json.dumps(record), ex=ttl_s)

    async def get_video(self, video_id: str) -> dict[str, Any] | None:
        raw = await self.client.get(self._key("video", video_id))
        return None if raw is None else json.loads(raw)

    async def face_exists(self, face_id: str) -> bool:
        return bool(await self.client.exists(self._key("face", face_id)))

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def depth(self) -> int:
        """Jobs waiting or in flight."""
        return int(await self.client.xlen(self.stream))

    async def backlog(self) -> tuple[int, int]:
        """(jobs waiting or in flight, live workers), read at one instant (one round trip)."""
        jobs, workers = await self._backlog(keys=[self.stream, self.workers], args=[self.heartbeat_ttl_ms])
        return int(jobs), int(workers)

    async def dead_count(self) -> int:
        return int(await self.client.xlen(self.dead))

    async def live_workers(self) -> list[dict[str, Any]]:
        """Info of the workers with a heartbeat within the last heartbeat TTL."""
        secs, micros = await self.client.time()
        now_ms = secs * 1000 + micros // 1000
        names = await self.client.zrangebyscore(self.workers, now_ms - self.heartbeat_ttl_ms, "+inf")
        if not names:
            return []
        infos = await self.client.mget([self._key("worker", _s(n)) for n in names])
        return [json.loads(i) for i in infos if i is not None]

    # --- consumer (worker) ------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _jobs(self, entries, deliveries: dict[str, int] | None = None) -> list[QueuedJob]:
        jobs = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            entry = _s(entry_id)
            meta = json.loads(fields[b"meta"])
            jobs.append(QueuedJob(id=meta["id"], entry=entry, meta=meta, image=fields.get(b"image", b""),
                            deliveries=(deliveries or {}).get(entry, 1)))
        return jobs

    async def read(self, consumer: str, limit: int, timeout: float | None) -> list[QueuedJob]:
        """Up to `limit` new jobs, waiting up to `timeout` s for the first (0: do not
        wait; None: 1 s, so a caller looping on this notices shutdown)."""
        block = None if timeout == 0 else max(1, int((1.0 if timeout is None else timeout) * 1000))
        for attempt in range(2):
            try:
                got = await self.blocking.xreadgroup(GROUP, consumer, {self.stream: ">"},
                                                     count=limit, block=block)
                break
            except ResponseError as e:
                if "NOGROUP" not in str(e) or attempt:
                    raise
                await self.ensure_group()  # Redis restarted empty
        if not got:
            return []
        # redis-py returns a list [[stream, entries]] (RESP2) or a dict (RESP3)
        entries = got[0][1] if isinstance(got, list) else next(iter(got.values()))[0]
        return self._jobs(entries)

    async def reclaim(self, consumer: str, limit: int) -> list[QueuedJob]:
        """Take over jobs idle past the visibility timeout. Jobs already delivered
        `max_attempts` times are dead-lettered (their client gets a 500) instead."""
        try:
            res = await self.client.xautoclaim(self.stream, GROUP, consumer, self.visibility_ms,
                                               start_id=self._claim_cursor, count=limit)
        except ResponseError as e:
            if "NOGROUP" in str(e):
                await self.ensure_group()
                return []
            raise
        self._claim_cursor = _s(res[0])
        entries = [e for e in res[1] if e[1]]
        if not entries:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self.stream, GROUP, min=entry_id, max=entry_id, count=1)
        deliveries = {}
        for rows in await pipe.execute():
            for r in rows:
                deliveries[_s(r["message_id"])] = int(r["times_delivered"])
        jobs, out = self._jobs(entries, deliveries), []
        for job in jobs:
            if job.deliveries > self.max_attempts:
                reason = await self.client.get(self._key("error", job.id))
                reason = _s(reason) if reason else "worker died or timed out while processing it"
                await self.dead_letter(job, f"failed {job.deliveries - 1} times; last error: {reason}")
            else:
                log.warning("reclaimed job %s (delivery %d)", job.id, job.deliveries)
                out.append(job)
        return out

    async def dead_letter(self, job: QueuedJob, reason: str) -> bool:
        reply = json.dumps(error_reply("dead_letter", f"job dead-lettered: {reason}"))
        done = await self._dead_letter(
            keys=[self.stream, self.dead, self._key("answered", job.id), self._key("result", job.id)],
            args=[GROUP, job.entry, reply, self.result_ttl_s, self.dead_letter_maxlen,
                  json.dumps({**job.meta, "image_bytes": len(job.image)}), reason, job.deliveries])
        if done:
            log.error("dead-lettered job %s: %s", job.id, reason)
        return bool(done)

    async def complete(self, job: QueuedJob, reply: dict[str, Any], faces: dict[str, bytes] | None = None) -> bool:
        """Store face states, answer (once) and ack. Returns False if the job had
        already been answered (a reclaimed duplicate)."""
        if faces:
            await self.store_faces(faces)
        try:
            first = await self._answer(
                keys=[self._key("answered", job.id), self._key("result", job.id), self.stream],
                args=[GROUP, job.entry, json.dumps(reply), self.result_ttl_s])
        except ResponseError as e:
            if "NOGROUP" not in str(e):  # Redis restarted under us: the answer was pushed
                raise
            first = 1
        if not first:
            log.warning("job %s was already answered (reclaimed twice); acked only", job.id)
        return bool(first)

    async def fail(self, job: QueuedJob, consumer: str, reason: str) -> None:
        """Give a job back after an error: remember why, and make it idle past the
        visibility timeout so the next XAUTOCLAIM (any worker) retries it now."""
        await self.client.set(self._key("error", job.id), reason, ex=self.result_ttl_s)
        await self.client.xclaim(self.stream, GROUP, consumer, 0, [job.entry],
                                 idle=self.visibility_ms + 1000, justid=True)

    async def store_faces(self, faces: dict[str, bytes]) -> int:
        """Keep face states for GET /neutralize (TTL `face_ttl_s`); beyond
        `face_store_max` faces or `face_store_max_bytes` the oldest are dropped.
        Returns how many were dropped."""
        args: list = [self._key("face", ""), self.face_ttl_s, self.face_store_max, self.face_store_max_bytes]
        for face_id, state in faces.items():
            args += [face_id, state]
        keys = [f"{self.prefix}:faces", f"{self.prefix}:face_sizes", f"{self.prefix}:face_bytes"]
        return int(await self._store_faces(keys=keys, args=args))

    async def load_faces(self, face_ids: list[str]) -> dict[str, bytes]:
        if not face_ids:
            return {}
        states = await self.client.mget([self._key("face", f) for f in face_ids])
        return {f: s for f, s in zip(face_ids, states) if s is not None}

    async def heartbeat(self, name: str, info: dict[str, Any]) -> None:
        await self._heartbeat(keys=[self.workers, self._key("worker", name)],
                              args=[name, json.dumps(info), self.heartbeat_ttl_ms])

    async def remove_worker(self, name: str) -> None:
        await self.client.zrem(self.workers, name)
        await self.client.delete(self._key("worker", name))

    async def pending(self, consumer: str | None = None) -> int:
        """Jobs delivered and not yet acked (of one consumer, or all)."""
        try:
            if consumer is None:
                return int((await self.client.xpending(self.stream, GROUP))["pending"])
            rows = await self.client.xpending_range(self.stream, GROUP, min="-", max="+", count=10_000,
                                                    consumername=consumer)
            return len(rows)
        except ResponseError as e:
            if "NOGROUP" in str(e):
                return 0
            raise
