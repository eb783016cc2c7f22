"""The job queue on Redis Streams (DESIGN.md section 4), used by the API and the workers.

Layout: the ``jobs`` stream (consumer group ``generators``) carries only job ids; the
``job:{id}`` hash is the source of truth (status, request, progress, result, timestamps).
Every state change is one Lua step that also keeps the ``stats:jobs_by_status`` counters
(``queued`` and ``running`` are current gauges, the final states are running totals).

Delivery guarantee: **at-least-once delivery, exactly-once effects for stored results.**

* A job is delivered to one consumer at a time. A consumer proves it is alive with a
  heartbeat key (``hb:{consumer}``, expiry ``settings.lease_s``) and by refreshing the idle
  time of its own pending entries; only the entries of a consumer whose heartbeat expired are
  reclaimed by another, so a long job on a live consumer is never run twice.
* A consumer that dies mid-job (or is wrongly presumed dead) means the job runs again.
  Storing an item is deduplicated in Lua (``HSETNX`` on the job's done-hash), so each item
  gives one image key, one results-stream entry and one memory-bank entry however often it
  is computed; finishing a job is a compare-and-set on its status, so it finishes once.
* After ``settings.max_deliveries`` starts without finishing, the job goes to ``jobs:dead``
  with its reason and is marked failed.
* Reclaim runs on every ``Consumer.fetch``: a dead consumer's job is picked up about
  ``lease_s`` (plus one fetch wait) after its last heartbeat. A graceful ``release`` hands a
  job back at once without using up a delivery.
* Acked entries are deleted from the jobs stream, so it holds only queued and in-flight work.
* TTL ``settings.result_ttl_s``: image and latent keys when stored, the run's results stream
  and the job's done-hash (refreshed at each store), the job hash and its progress stream when
  the job becomes final. A queued or running job never expires.

The Redis client must return bytes (``decode_responses=False``, the default): images and
latents are binary. ``connect`` makes a suitable client.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actgen_shared.keys import CONSUMER_GROUP, Keys
from actgen_shared.schemas import JobRequest, JobResult, JobState, JobStatus, Progress
from actgen_shared.settings import Settings

PROGRESS_MAXLEN = 100  # progress events kept per job: enough for a client to catch up
DEAD_LETTER_MAXLEN = 100_000
_STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")


# What Redis raises while it is down or restarting: callers wait it out instead of failing jobs.
REDIS_DOWN: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)


def connect(url: str, socket_timeout: float | None = None) -> aioredis.Redis:
    """An asyncio Redis client fit for the queue (bytes replies, RESP2).

    ``socket_timeout`` must exceed the longest blocking read the caller makes (a long-poll of
    :meth:`JobQueue.read_results`): redis-py's default would cut it short.
    """
    extra = {} if socket_timeout is None else {"socket_timeout": socket_timeout}
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30, **extra)


def _s(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_entries(response: object) -> list[tuple[str, dict[str, str]]]:
    """XREAD/XREADGROUP reply (one stream) -> [(id, fields)], fields None-safe."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3 shapes
        streams = list(response.values())
    else:
        streams = [item[1] for item in response]  # type: ignore[index]
    out: list[tuple[str, dict[str, str]]] = []
    for entries in streams:
        if entries and isinstance(entries[0], list):  # RESP3 legacy wraps once more
            entries = entries[0]
        for entry_id, fields in entries:
            if entry_id is None:
                continue
            out.append((_s(entry_id) or "", {_s(k) or "": _s(v) or "" for k, v in (fields or {}).items()}))
    return out


def validate_cursor(cursor: str) -> str:
    """A results cursor is a stream id (``0-0``, ``1712345678901-3``); ValueError otherwise."""
    if not _STREAM_ID.match(cursor):
        raise ValueError(f"cursor {cursor!r} is not a stream id like '0-0' or '1712345678901-3'")
    return cursor


# --- Lua -----------------------------------------------------------------------------------
# Key names are computed in Python (keys.py) and passed in KEYS; the scripts never build keys.

_PRELUDE = """
local function is_final(s) return s == 'done' or s == 'failed' or s == 'cancelled' end
local function set_status(job, stats, old, new)
  redis.call('HSET', job, 'status', new)
  if old then redis.call('HINCRBY', stats, old, -1) end
  redis.call('HINCRBY', stats, new, 1)
end
local function ack(stream, group, entry)
  if entry ~= '' then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  end
end
-- finish: KEYS job, stats, then keys to expire; returns 1 when this call made it final
local function finish(job, stats, status, field, value, now, ttl, expire_keys)
  local old = redis.call('HGET', job, 'status')
  if (not old) or is_final(old) then return 0 end
  set_status(job, stats, old, status)
  redis.call('HSET', job, 'finished_at', now)
  if field ~= '' then redis.call('HSET', job, field, value) end
  for _, k in ipairs(expire_keys) do redis.call('EXPIRE', k, ttl) end
  return 1
end
"""

# KEYS: idem (or ''), job, jobs stream, stats, classifier bytes, meta, jobs set (or '' x3)
# ARGV: job_id, request json, run_id, epoch, created_at, n_items, idem ttl, classifier ttl
# returns {job id, 1 duplicate | 0 new | 2 classifier unknown}
_SUBMIT = """
if KEYS[1] ~= '' then
  local first = redis.call('GET', KEYS[1])
  if first then return {first, 1} end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {ARGV[1], 1} end
if KEYS[5] ~= '' then  -- the job holds its classifier: known now, and its TTL starts again
  if redis.call('EXISTS', KEYS[5]) == 0 or redis.call('EXISTS', KEYS[6]) == 0 then return {ARGV[1], 2} end
  redis.call('SADD', KEYS[7], ARGV[1])
  for i = 5, 7 do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
end
if KEYS[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[7]) end
redis.call('HSET', KEYS[2], 'status', 'queued', 'request', ARGV[2], 'run_id', ARGV[3],
  'epoch', ARGV[4], 'created_at', ARGV[5], 'n_items', ARGV[6], 'deliveries', 0)
redis.call('HINCRBY', KEYS[4], 'queued', 1)
redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1])
return {ARGV[1], 0}
"""

# KEYS: job, stats, cancel flag, done, progress ; ARGV: now, ttl
_CANCEL = (
    _PRELUDE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' then
  finish(KEYS[1], KEYS[2], 'cancelled', '', '', ARGV[1], ARGV[2], {KEYS[1], KEYS[4], KEYS[5]})
  return 'cancelled'
end
if status == 'running' then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
end
return status
"""
)

# Say "alive" under our name, only while the name is ours (its key is absent or holds our token).
# KEYS: hb key, jobs stream ; ARGV: group, consumer, lease ms, token
# returns {-1, holder} when another process holds the name; {1, 0} when the pending list could
# not be read; else {1, 1, entry ids still pending for us...} (their idle time reset)
_HEARTBEAT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[4] then return {-1, holder} end
redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[2], ARGV[1], '-', '+', 10000, ARGV[2])
if not ok then return {1, 0} end
local out = {1, 1}
for _, p in ipairs(pending) do
  redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, p[1], 'JUSTID')
  table.insert(out, p[1])
end
return out
"""

# Graceful stop: drop our heartbeat (if it is still ours) and, with nothing pending, our name
# in the group. KEYS: hb key, jobs stream ; ARGV: group, consumer, token
_STOP = """
if redis.call('GET', KEYS[1]) == ARGV[3] then redis.call('DEL', KEYS[1]) end
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[2], ARGV[1], '-', '+', 1, ARGV[2])
if ok and #pending == 0 then pcall(redis.call, 'XGROUP', 'DELCONSUMER', KEYS[2], ARGV[1], ARGV[2]) end
return 1
"""

# Forget a consumer that is gone: no heartbeat and nothing pending (unique replica ids would
# otherwise pile up in the group). KEYS: hb key, jobs stream ; ARGV: group, consumer
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local pending = redis.call('XPENDING', KEYS[2], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# Take the entries of one consumer, only if its heartbeat has expired.
# KEYS: jobs stream, hb key of that consumer ; ARGV: group, dead consumer, self, min idle ms, count
# returns flat {entry_id, job_id, ...}
_RECLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[5]), ARGV[2])
local out = {}
for _, p in ipairs(pending) do
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], tonumber(ARGV[4]), p[1])
  for _, e in ipairs(claimed) do
    if e and e[2] then
      local job_id = ''
      for i = 1, #e[2], 2 do if e[2][i] == 'job_id' then job_id = e[2][i + 1] end end
      table.insert(out, e[1])
      table.insert(out, job_id)
    elseif e then
      table.insert(out, e[1])
      table.insert(out, '')
    end
  end
end
return out
"""

# Decide what to do with a fetched entry.
# KEYS: job, stats, jobs stream, dead stream, done, progress, cancel
# ARGV: group, entry id, job id, max deliveries, reclaim note, now, ttl, dead-letter maxlen
# returns {'gone'} | {'final'} | {'dead', reason} | {'ok', deliveries, request}
_ADMIT = (
    _PRELUDE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then ack(KEYS[3], ARGV[1], ARGV[2]); return {'gone'} end
if is_final(status) then ack(KEYS[3], ARGV[1], ARGV[2]); return {'final'} end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[5]) end
local d = tonumber(redis.call('HGET', KEYS[1], 'deliveries') or '0')
local cap = tonumber(ARGV[4])
if d >= cap then
  local reason = 'started ' .. d .. ' times without finishing (max_deliveries ' .. cap .. ')'
  local last = redis.call('HGET', KEYS[1], 'last_error')
  if last then reason = reason .. '; last error: ' .. last end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'job_id', ARGV[3], 'reason', reason,
    'deliveries', d, 'replica', redis.call('HGET', KEYS[1], 'replica') or '', 'at', ARGV[6])
  finish(KEYS[1], KEYS[2], 'failed', 'error', reason, ARGV[6], ARGV[7],
    {KEYS[1], KEYS[5], KEYS[6], KEYS[7]})
  ack(KEYS[3], ARGV[1], ARGV[2])
  return {'dead', reason}
end
return {'ok', tostring(d), redis.call('HGET', KEYS[1], 'request')}
"""
)

# KEYS: job, stats, jobs stream, cancel, done, progress ; ARGV: group, entry, consumer, now, ttl, token
# returns 1 started, 0 not (final or cancelled: acked). Starting the same delivery twice in one
# process (a retried call whose reply was lost, a re-read pending entry) counts it once.
_START = (
    _PRELUDE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or is_final(status) then ack(KEYS[3], ARGV[1], ARGV[2]); return 0 end
if redis.call('EXISTS', KEYS[4]) == 1 then
  finish(KEYS[1], KEYS[2], 'cancelled', '', '', ARGV[4], ARGV[5], {KEYS[1], KEYS[4], KEYS[5], KEYS[6]})
  ack(KEYS[3], ARGV[1], ARGV[2])
  return 0
end
local start_id = ARGV[6] .. ' ' .. ARGV[2]
if status == 'running' and redis.call('HGET', KEYS[1], 'start_id') == start_id then return 1 end
if status ~= 'running' then set_status(KEYS[1], KEYS[2], status, 'running') end
redis.call('HSET', KEYS[1], 'started_at', ARGV[4], 'replica', ARGV[3], 'start_id', start_id)
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
return 1
"""
)

# KEYS: job, progress stream ; ARGV: step, total, maxlen, ttl
_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'progress_step', ARGV[1], 'progress_total', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'step', ARGV[1], 'total', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: job, done hash, results stream, then per item: image key, latent key, bank key
# ARGV: ttl, results maxlen, bank cap, push bank (0/1), job id, epoch, n, bank ttl,
#       then per item: index, class_id, guide_id, has latent (0/1), png, latent
_STORE = (
    _PRELUDE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or is_final(status) then return 0 end
local ttl, cap, push = ARGV[1], tonumber(ARGV[3]), ARGV[4] == '1'
local n, stored = tonumber(ARGV[7]), 0
for i = 0, n - 1 do
  local a, k = 9 + i * 6, 4 + i * 3
  local index, class_id, guide_id, has_latent = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3] == '1'
  if redis.call('HSETNX', KEYS[2], index, '') == 1 then
    redis.call('SET', KEYS[k], ARGV[a + 4], 'EX', ttl)
    local latent_key = ''
    if has_latent then
      redis.call('SET', KEYS[k + 1], ARGV[a + 5], 'EX', ttl)
      latent_key = KEYS[k + 1]
      if push then
        redis.call('LPUSH', KEYS[k + 2], ARGV[a + 5])
        redis.call('LTRIM', KEYS[k + 2], 0, cap - 1)
        redis.call('EXPIRE', KEYS[k + 2], ARGV[8])
      end
    end
    local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'job_id', ARGV[5],
      'index', index, 'class_id', class_id, 'guide_id', guide_id, 'epoch', ARGV[6],
      'image_key', KEYS[k], 'latent_key', latent_key)
    redis.call('HSET', KEYS[2], index, id)
    stored = stored + 1
  end
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return stored
"""
)

# KEYS: job, stats, jobs stream, done, progress, cancel
# ARGV: group, entry, status, field, value, now, ttl, consumer
# returns 1 if this call finished the job, 0 if it was final already, -1 if the entry is no longer
# ours (our lease lapsed and another consumer took it: only the owner may finish a job)
_FINISH = (
    _PRELUDE
    + """
if ARGV[2] ~= '' and ARGV[8] ~= '' then
  local mine = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[8])
  if #mine == 0 then return -1 end
end
local n = finish(KEYS[1], KEYS[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
  {KEYS[1], KEYS[4], KEYS[5], KEYS[6]})
ack(KEYS[3], ARGV[1], ARGV[2])
return n
"""
)

# Put a job back at once, only if its entry is still ours (else another consumer owns it now).
# KEYS: job, stats, jobs stream ; ARGV: group, entry, consumer, job id, count delivery (0/1), note
_RELEASE = (
    _PRELUDE
    + """
local mine = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #mine == 0 then return 0 end
ack(KEYS[3], ARGV[1], ARGV[2])
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or is_final(status) then return 0 end
local started_here = status == 'running' and redis.call('HGET', KEYS[1], 'replica') == ARGV[3]
if status ~= 'queued' then set_status(KEYS[1], KEYS[2], status, 'queued') end
if ARGV[5] == '0' and started_here then  -- a graceful hand-back does not use up a delivery
  redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[6]) end
redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[4])
return 1
"""
)


# --- data ----------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One hand-over of a job to a consumer."""

    entry_id: str  # stream entry id in the jobs stream
    job_id: str
    deliveries: int  # how many times this job has been delivered (1 on first)
    request: JobRequest  # parsed from the job hash


@dataclass
class StoredItem:
    """One finished item, as the worker hands it to ``Consumer.store_items``."""

    index: int  # item index inside the job
    class_id: int
    guide_id: str | None
    png: bytes  # generated image
    latent: bytes | None  # float16 safetensors bytes (codecs.latent_encode), also pushed to the bank


class JobQueue:
    """Submit, inspect and cancel jobs; read results and memory banks (the API's side)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        kwargs = redis.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("JobQueue needs a Redis client with decode_responses=False (binary blobs)")
        if str(kwargs.get("protocol", 2)) == "3":
            raise ValueError("JobQueue needs a RESP2 Redis client (protocol=2, the default)")
        self.redis = redis
        self.settings = settings
        self.keys: Keys = settings.keys
        self.group = CONSUMER_GROUP
        self._submit = redis.register_script(_SUBMIT)
        self._cancel = redis.register_script(_CANCEL)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._reclaim = redis.register_script(_RECLAIM)
        self._admit = redis.register_script(_ADMIT)
        self._start = redis.register_script(_START)
        self._progress = redis.register_script(_PROGRESS)
        self._store = redis.register_script(_STORE)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)
        self._stop = redis.register_script(_STOP)
        self._forget = redis.register_script(_FORGET)
        self._memory_checked = -1e9
        self._memory_note: str | None = None

    # --- jobs --------------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        """Create the jobs stream and its consumer group (from the start: no entry is skipped)."""
        try:
            await self.redis.xgroup_create(self.keys.jobs_stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(self, request: JobRequest, job_id: str | None = None) -> tuple[str, bool]:
        """Queue a job in one atomic step; returns (job id, duplicate).

        With ``request.idempotency_key`` set, a resubmit returns the first job's id and
        ``duplicate=True`` (for ``result_ttl_s``), whatever its body. A ``classifier_ref`` must
        name a stored classifier (LookupError otherwise, e.g. deleted meanwhile); the job is
        recorded as one of its users and its TTL starts again.
        """
        job_id = job_id or uuid.uuid4().hex
        k = self.keys
        idem = k.idempotency(request.idempotency_key) if request.idempotency_key else ""
        clf = ["", "", ""]
        if request.classifier_ref:
            hex_ = request.classifier_ref.removeprefix("sha256:")
            clf = [k.classifier(hex_), k.classifier_meta(hex_), k.classifier_jobs(hex_)]
        first, outcome = await self._submit(
            keys=[idem, k.job(job_id), k.jobs_stream, k.jobs_by_status, *clf],
            args=[
                job_id,
                request.model_dump_json(),
                request.run_id,
                request.epoch,
                repr(time.time()),
                len(request.items),
                self.settings.result_ttl_s,
                self.settings.classifier_ttl_s,
            ],
        )
        if int(outcome) == 2:
            raise LookupError(f"classifier_ref: {request.classifier_ref} is not known (deleted or expired)")
        return _s(first) or job_id, bool(int(outcome))

    async def memory_pressure(self) -> str | None:
        """Why Redis is too full to take more work (used_memory at or over ``redis_memory_high``
        of maxmemory), or None. Cached for a second: submit asks on every request."""
        now = time.monotonic()
        if now - self._memory_checked < 1.0:
            return self._memory_note
        info = await self.redis.info("memory")
        used, cap = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        note = None
        if cap > 0 and used >= self.settings.redis_memory_high * cap:
            note = (
                f"Redis memory is near its cap: used_memory {used} bytes of maxmemory {cap} "
                f"({used / cap:.0%}, limit ACTGEN_REDIS_MEMORY_HIGH={self.settings.redis_memory_high:g}); "
                "finished results must expire or be deleted first"
            )
        self._memory_checked, self._memory_note = now, note
        return note

    async def state(self, job_id: str) -> JobState | None:
        """What GET /v1/jobs/{id} shows; None for an unknown (or expired) job."""
        fields = (
            "status", "run_id", "epoch", "progress_step", "progress_total", "error", "result",
            "created_at", "started_at", "finished_at", "replica", "deliveries",
        )
        values = dict(zip(fields, (_s(v) for v in await self.redis.hmget(self.keys.job(job_id), fields))))
        if values["status"] is None:
            return None

        def num(name: str, kind: type = float):  # type: ignore[no-untyped-def]
            raw = values[name]
            return kind(raw) if raw not in (None, "") else None

        result = values["result"]
        return JobState(
            job_id=job_id,
            run_id=values["run_id"] or "",
            epoch=num("epoch", int) or 0,
            status=JobStatus(values["status"]),
            progress=Progress(step=num("progress_step", int) or 0, total=num("progress_total", int) or 0),
            error=values["error"],
            result=JobResult.model_validate_json(result) if result else None,
            created_at=num("created_at"),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            replica=values["replica"],
            deliveries=num("deliveries", int) or 0,
        )

    async def request(self, job_id: str) -> JobRequest | None:
        raw = await self.redis.hget(self.keys.job(job_id), "request")
        return JobRequest.model_validate_json(raw) if raw else None

    async def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel: a queued job at once; a running one by flag (the worker stops between steps).

        Returns the status after the call (None for an unknown job); a final job is unchanged.
        """
        k = self.keys
        status = await self._cancel(
            keys=[k.job(job_id), k.jobs_by_status, k.cancel(job_id), k.job_done_items(job_id),
                  k.job_progress(job_id)],
            args=[repr(time.time()), self.settings.result_ttl_s],
        )
        return JobStatus(_s(status)) if status else None

    async def is_cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.cancel(job_id)))

    async def queue_depth(self) -> int:
        """Jobs queued and not yet started."""
        return max(0, int(await self.redis.hget(self.keys.jobs_by_status, "queued") or 0))

    async def counts_by_status(self) -> dict[str, int]:
        """Every status with its count: queued/running now, final ones since the counters began."""
        raw = await self.redis.hgetall(self.keys.jobs_by_status)
        counts = {s.value: 0 for s in JobStatus}
        for name, value in raw.items():
            counts[_s(name) or ""] = max(0, int(value))
        return counts

    async def progress_events(self, job_id: str, after: str = "0-0", limit: int = 100
                              ) -> list[dict[str, str]]:
        """Progress events after a stream id, each with its ``id`` (for a reconnecting client)."""
        validate_cursor(after)
        reply = await self.redis.xread({self.keys.job_progress(job_id): after}, count=limit)
        return [{"id": entry_id, **fields} for entry_id, fields in _stream_entries(reply)]

    async def dead_letters(self, limit: int = 100) -> list[dict[str, str]]:
        """Newest entries of the dead-letter stream (job_id, reason, deliveries, replica, at)."""
        reply = await self.redis.xrevrange(self.keys.dead_letter_stream, count=limit)
        return [
            {"id": _s(entry_id) or "", **{_s(k) or "": _s(v) or "" for k, v in fields.items()}}
            for entry_id, fields in reply
        ]

    # --- results -----------------------------------------------------------------------------
    async def read_results(
        self, run_id: str, after: str = "0-0", limit: int = 100, wait_s: float = 0.0
    ) -> tuple[list[dict[str, str]], str]:
        """Results of a run strictly after the cursor, oldest first, and the next cursor.

        When none are there and ``wait_s > 0``, wait up to that long for one (long-poll).
        Each dict: ``id`` plus job_id, index, class_id, guide_id, epoch, image_key, latent_key
        (all strings; ``guide_id`` and ``latent_key`` are "" when absent). ValueError for a
        cursor that is not a stream id.
        """
        validate_cursor(after)
        limit = max(1, int(limit))
        block = max(1, int(wait_s * 1000)) if wait_s > 0 else None
        reply = await self.redis.xread({self.keys.run_results(run_id): after}, count=limit, block=block)
        items = [{"id": entry_id, **fields} for entry_id, fields in _stream_entries(reply)]
        return items, (items[-1]["id"] if items else after)

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self.redis.get(self.keys.job_image(job_id, index))

    async def latent(self, job_id: str, index: int) -> bytes | None:
        return await self.redis.get(self.keys.job_latent(job_id, index))

    async def get_bytes(self, key: str) -> bytes | None:
        """A blob named by a results entry (image_key / latent_key); None outside this prefix."""
        if not key or not key.startswith(self.keys.prefix):
            return None
        return await self.redis.get(key)

    # --- memory banks ------------------------------------------------------------------------
    async def _bank_keys(self, bank_key: str) -> list[tuple[int, str]]:
        found = []
        async for raw in self.redis.scan_iter(match=self.keys.bank_pattern(bank_key), count=1000):
            key = _s(raw) or ""
            class_id = self.keys.bank_class_id(bank_key, key)
            if class_id is not None:
                found.append((class_id, key))
        return sorted(found)

    async def bank_counts(self, bank_key: str) -> dict[int, int]:
        """class id -> latents in the bank."""
        found = await self._bank_keys(bank_key)
        if not found:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, key in found:
                pipe.llen(key)
            lengths = await pipe.execute()
        return {class_id: int(n) for (class_id, _), n in zip(found, lengths) if int(n) > 0}

    async def bank_sample(self, bank_key: str, class_id: int, n: int, rng: random.Random) -> list[bytes]:
        """Up to n latents of a class, drawn without replacement (all of them when fewer)."""
        key = self.keys.bank(bank_key, class_id)
        size = int(await self.redis.llen(key))
        if n <= 0 or size == 0:
            return []
        if n >= size:
            return [bytes(x) for x in await self.redis.lrange(key, 0, -1)]
        picks = sorted(rng.sample(range(size), n))
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in picks:
                pipe.lindex(key, i)
            values = await pipe.execute()
        return [bytes(v) for v in values if v is not None]

    async def push_bank(self, bank_key: str, class_id: int, latent: bytes, cap: int | None = None) -> None:
        """Add one latent to a class's bank, newest first, capped."""
        key = self.keys.bank(bank_key, class_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, latent)
            pipe.ltrim(key, 0, (cap or self.settings.bank_cap) - 1)
            pipe.expire(key, self.settings.bank_ttl_s)
            await pipe.execute()

    async def clear_bank(self, bank_key: str) -> int:
        """Delete a memory bank; returns how many latents it held."""
        counts = await self.bank_counts(bank_key)
        found = await self._bank_keys(bank_key)
        if found:
            await self.redis.delete(*(key for _, key in found))
        return sum(counts.values())


class ReplicaIdInUse(RuntimeError):
    """Another live process holds this consumer name (its heartbeat key has another token)."""


def _in_use_message(name: str, holder: str, ttl_ms: int | None, lease_s: float) -> str:
    left = f"{ttl_ms / 1000:.1f} s" if ttl_ms and ttl_ms > 0 else f"up to {lease_s:g} s"
    return (
        f"replica id {name!r} is in use: a live replica ({holder}) holds its heartbeat "
        f"(lease ends in {left}). Give this replica another ACTGEN_REPLICA_ID, or unset it "
        "for a unique default, or wait until the other one has stopped."
    )


def new_token(name: str) -> str:
    """A token unique to one process's use of a consumer name: ``name/host:pid/random``."""
    return f"{name}/{socket.gethostname()}:{os.getpid()}/{uuid.uuid4().hex[:12]}"


class Consumer:
    """One worker's end of the queue, under a consumer name no other live process shares.

    Every entry XREADGROUP (or a reclaim) hands us is tracked in ``unadmitted`` from the moment
    the reply arrives until it is handed to the caller as a :class:`Delivery` (or found final);
    a Redis error in between leaves it there for the next fetch. Our own pending list is also
    re-read every ``settings.pending_rescan_s``, so an entry we were given but never saw (a reply
    lost to a dropped connection) is picked up while we live, not only at the next start.
    """

    def __init__(self, queue: JobQueue, name: str, token: str | None = None) -> None:
        self.queue = queue
        self.name = name
        self.token = token or new_token(name)
        self.unadmitted: dict[str, tuple[str, str]] = {}  # entry id -> (job id, reclaim note)
        self._pending_cursor: str | None = "0"  # re-read our own pending entries from here
        self._next_rescan = time.monotonic() + queue.settings.pending_rescan_s
        self._group_ready = False

    @property
    def _k(self) -> Keys:
        return self.queue.keys

    def _job_keys(self, job_id: str) -> list[str]:
        """The job's own keys that get a TTL when it finishes (after job, stats, stream)."""
        k = self._k
        return [k.job_done_items(job_id), k.job_progress(job_id), k.cancel(job_id)]

    async def heartbeat(self) -> set[str] | None:
        """Say "alive": refresh the heartbeat key and the idle time of our pending entries.

        Returns the entry ids still pending for us (None when they could not be read);
        ReplicaIdInUse when another process holds our name.
        """
        q = self.queue
        reply = await q._heartbeat(
            keys=[self._k.heartbeat(self.name), self._k.jobs_stream],
            args=[q.group, self.name, max(1, int(q.settings.lease_s * 1000)), self.token],
        )
        return _owned(self.name, reply, q.settings.lease_s)

    async def fetch(self, count: int, block_ms: int, tracked: Collection[str] = ()) -> list[Delivery]:
        """Up to ``count`` jobs to run: entries fetched earlier but not yet handed over, our own
        pending ones (at the first call and every ``pending_rescan_s``), then those of dead
        consumers, then new ones (waiting up to ``block_ms``; 0 or less: no wait).

        ``tracked``: entry ids the caller holds already (skipped when our pending list is re-read).
        """
        try:
            return await self._fetch(count, block_ms, tracked)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.queue.ensure_group()  # Redis lost the group (flushed): make it again
            self._pending_cursor = "0"
            self.unadmitted.clear()
            return await self._fetch(count, block_ms, tracked)

    async def _fetch(self, count: int, block_ms: int, tracked: Collection[str]) -> list[Delivery]:
        q, k = self.queue, self._k
        count = max(1, count)
        if not self._group_ready:
            await q.ensure_group()
            self._group_ready = True
        await self.heartbeat()
        now = time.monotonic()
        if now >= self._next_rescan:
            self._next_rescan = now + q.settings.pending_rescan_s
            self._pending_cursor = "0"
            await self._forget_gone_consumers()
        if self._pending_cursor is not None:  # our own unfinished entries first
            await self._read_own(count, tracked)
        if len(self.unadmitted) < count:
            for entry_id, job_id, note in await self._reclaim(count - len(self.unadmitted)):
                self.unadmitted[entry_id] = (job_id, note)
        if not self.unadmitted:
            reply = await q.redis.xreadgroup(
                q.group, self.name, {k.jobs_stream: ">"}, count=count,
                block=block_ms if block_ms > 0 else None,
            )
            for entry_id, fields in _stream_entries(reply):
                self.unadmitted[entry_id] = (fields.get("job_id", ""), "")
        deliveries = []
        for entry_id in list(self.unadmitted)[:count]:
            job_id, note = self.unadmitted[entry_id]
            delivery = await self._admit(entry_id, job_id, note)  # a Redis error: stays unadmitted
            self.unadmitted.pop(entry_id, None)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    async def _read_own(self, count: int, tracked: Collection[str]) -> None:
        """Our pending entries from the cursor, those the caller does not hold, into ``unadmitted``."""
        q, k = self.queue, self._k
        page = max(count, 100)
        while self._pending_cursor is not None and len(self.unadmitted) < count:
            reply = await q.redis.xreadgroup(
                q.group, self.name, {k.jobs_stream: self._pending_cursor}, count=page
            )
            own = _stream_entries(reply)
            for entry_id, fields in own:
                if entry_id not in tracked and entry_id not in self.unadmitted:
                    self.unadmitted[entry_id] = (fields.get("job_id", ""), "")
            self._pending_cursor = own[-1][0] if len(own) >= page else None

    async def _forget_gone_consumers(self) -> None:
        """Drop group members with no heartbeat and nothing pending (stopped or reclaimed)."""
        q, k = self.queue, self._k
        try:
            consumers = await q.redis.xinfo_consumers(k.jobs_stream, q.group)
        except ResponseError:
            return
        for info in consumers:
            other = _s(info.get("name")) or ""
            if other == self.name or int(info.get("pending") or 0) > 0:
                continue
            if int(info.get("idle") or 0) < q.settings.lease_s * 1000:
                continue
            await q._forget(keys=[k.heartbeat(other), k.jobs_stream], args=[q.group, other])

    async def _reclaim(self, count: int) -> list[tuple[str, str, str]]:
        """Entries of consumers whose heartbeat has expired, claimed for us."""
        q, k = self.queue, self._k
        summary = await q.redis.xpending(k.jobs_stream, q.group)
        out: list[tuple[str, str, str]] = []
        min_idle = max(1, int(q.settings.lease_s * 1000 / 2))  # two reclaimers: only one wins
        for consumer in summary.get("consumers") or []:
            other = _s(consumer["name"]) or ""
            if other == self.name or len(out) >= count:
                continue
            flat = await q._reclaim(
                keys=[k.jobs_stream, k.heartbeat(other)],
                args=[q.group, other, self.name, min_idle, count - len(out)],
            )
            note = f"consumer {other} stopped heartbeating (lease {q.settings.lease_s:g}s expired)"
            out += [(_s(flat[i]) or "", _s(flat[i + 1]) or "", note) for i in range(0, len(flat), 2)]
        return out

    async def _admit(self, entry_id: str, job_id: str, note: str) -> Delivery | None:
        q, k = self.queue, self._k
        if not job_id:  # an entry without a job id (foreign or damaged): drop it
            await q.redis.xack(k.jobs_stream, q.group, entry_id)
            return None
        reply = await q._admit(
            keys=[k.job(job_id), k.jobs_by_status, k.jobs_stream, k.dead_letter_stream,
                  *self._job_keys(job_id)],
            args=[q.group, entry_id, job_id, q.settings.max_deliveries, note, repr(time.time()),
                  q.settings.result_ttl_s, DEAD_LETTER_MAXLEN],
        )
        if _s(reply[0]) != "ok":
            return None
        try:
            request = JobRequest.model_validate_json(reply[2])
        except ValueError as exc:  # stored by an incompatible version: fail it, do not loop
            delivery = Delivery(entry_id, job_id, int(reply[1]) + 1, None)  # type: ignore[arg-type]
            await self.fail(delivery, f"stored request no longer validates: {exc}")
            return None
        return Delivery(entry_id=entry_id, job_id=job_id, deliveries=int(reply[1]) + 1, request=request)

    async def start(self, delivery: Delivery) -> bool:
        """Mark the job running on this consumer; False (and acked) if it was cancelled or is final."""
        q, k, job_id = self.queue, self._k, delivery.job_id
        started = await q._start(
            keys=[k.job(job_id), k.jobs_by_status, k.jobs_stream, k.cancel(job_id),
                  k.job_done_items(job_id), k.job_progress(job_id)],
            args=[q.group, delivery.entry_id, self.name, repr(time.time()), q.settings.result_ttl_s,
                  self.token],
        )
        return bool(int(started))

    async def progress(self, job_id: str, step: int, total: int) -> None:
        q = self.queue
        await q._progress(
            keys=[self._k.job(job_id), self._k.job_progress(job_id)],
            args=[step, total, PROGRESS_MAXLEN, q.settings.result_ttl_s],
        )

    async def done_items(self, job_id: str) -> set[int]:
        """Indices of the job's items already stored (a reclaimed job resumes after them)."""
        return {int(i) for i in await self.queue.redis.hkeys(self._k.job_done_items(job_id))}

    async def store_items(self, delivery: Delivery, items: list[StoredItem], bank_cap: int) -> int:
        """Store finished items in one atomic step; returns how many were new.

        Per item, only the first store counts: image and latent keys (with TTL), one entry in
        the run's results stream, and the latent pushed to the class's memory bank when the
        request names one. Nothing is stored for a job that is final or unknown.
        """
        if not items:
            return 0
        q, k, req = self.queue, self._k, delivery.request
        keys = [k.job(delivery.job_id), k.job_done_items(delivery.job_id), k.run_results(req.run_id)]
        args: list[object] = [
            q.settings.result_ttl_s, q.settings.results_stream_maxlen, max(1, bank_cap),
            1 if req.memory_bank_key else 0, delivery.job_id, req.epoch, len(items),
            q.settings.bank_ttl_s,
        ]
        bank = req.memory_bank_key or ""
        for item in items:
            keys += [
                k.job_image(delivery.job_id, item.index),
                k.job_latent(delivery.job_id, item.index),
                k.bank(bank, item.class_id),
            ]
            args += [
                item.index, item.class_id, item.guide_id or "", 0 if item.latent is None else 1,
                item.png, item.latent or b"",
            ]
        return int(await q._store(keys=keys, args=args))

    async def _finish(self, delivery: Delivery, status: JobStatus, field: str, value: str) -> int:
        q, k, job_id = self.queue, self._k, delivery.job_id
        n = await q._finish(
            keys=[k.job(job_id), k.jobs_by_status, k.jobs_stream, *self._job_keys(job_id)],
            args=[q.group, delivery.entry_id, status.value, field, value, repr(time.time()),
                  q.settings.result_ttl_s, self.name],
        )
        return int(n)

    async def complete(self, delivery: Delivery, result: JobResult) -> bool:
        """Mark done with its result and ack, atomically; True if this call finished the job.

        False when it was final already, or when the entry is no longer ours (our lease lapsed
        and another consumer owns the job now: only it may finish the job)."""
        return await self._finish(delivery, JobStatus.done, "result", result.model_dump_json()) == 1

    async def fail(self, delivery: Delivery, error: str) -> bool:
        """Mark failed with the error and ack (a failure is final; use ``retry`` to run it again).

        Does nothing to a job whose entry is no longer ours; True if this call failed the job."""
        return await self._finish(delivery, JobStatus.failed, "error", error) == 1

    async def mark_cancelled(self, delivery: Delivery) -> None:
        await self._finish(delivery, JobStatus.cancelled, "", "")

    async def _put_back(self, delivery: Delivery, counts: bool, note: str) -> bool:
        q, k = self.queue, self._k
        n = await q._release(
            keys=[k.job(delivery.job_id), k.jobs_by_status, k.jobs_stream],
            args=[q.group, delivery.entry_id, self.name, delivery.job_id, 1 if counts else 0, note],
        )
        return bool(int(n))

    async def release(self, delivery: Delivery) -> None:
        """Graceful shutdown: put the job back at once for another consumer.

        Does not use up a delivery, and does nothing if the entry is no longer ours.
        """
        await self._put_back(delivery, counts=False, note="")

    async def retry(self, delivery: Delivery, error: str) -> None:
        """Put the job back after a transient error; the delivery counts toward max_deliveries."""
        await self._put_back(delivery, counts=True, note=error)

    async def stop(self) -> None:
        """Delete our heartbeat key if it is still ours, and our name in the group if nothing is
        pending under it (call after releasing or finishing our work)."""
        q = self.queue
        await q._stop(keys=[self._k.heartbeat(self.name), self._k.jobs_stream],
                      args=[q.group, self.name, self.token])


def _owned(name: str, reply: list, lease_s: float) -> set[str] | None:
    """The heartbeat script's reply -> our pending entry ids (None: unknown); raises on a twin."""
    if int(reply[0]) == -1:
        raise ReplicaIdInUse(_in_use_message(name, _s(reply[1]) or "?", None, lease_s))
    if int(reply[1]) == 0:
        return None
    return {_s(e) or "" for e in reply[2:]}


class Heartbeat:
    """A consumer's heartbeat, beaten from a thread of its own over its own (sync) connection.

    Neither a stalled event loop nor a long GPU batch can let the lease lapse while the process
    lives. Each beat also reads which entries are still pending for us: ``lost(tracked)`` says
    which of the caller's deliveries another consumer has taken (after a pause past the lease,
    say), so the caller stops working on them. When another process holds our name,
    ``on_conflict`` is called (from the thread) with the message.
    """

    def __init__(
        self, url: str, settings: Settings, name: str, token: str,
        on_conflict: Callable[[str], None] | None = None,
    ) -> None:
        import redis as sync_redis

        self.settings = settings
        self.name = name
        self.token = token
        self.on_conflict = on_conflict
        timeout = max(0.5, min(settings.heartbeat_interval_s, settings.lease_s / 3))
        self._redis = sync_redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=False,
        )
        self._script = self._redis.register_script(_HEARTBEAT)
        self._keys = [settings.keys.heartbeat(name), settings.keys.jobs_stream]
        self._lock = threading.Lock()
        self._owned: set[str] | None = None
        self._owned_since = 0.0  # monotonic time at which the last good pending read began
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        self.failures = 0

    def claim(self) -> None:
        """Take the name at start: ReplicaIdInUse when a live heartbeat holds it."""
        lease_ms = max(1, int(self.settings.lease_s * 1000))
        key = self._keys[0]
        if not self._redis.set(key, self.token, nx=True, px=lease_ms):
            holder = self._redis.get(key)
            if holder is not None and _s(holder) != self.token:
                raise ReplicaIdInUse(
                    _in_use_message(self.name, _s(holder) or "?", self._redis.pttl(key), self.settings.lease_s)
                )
            self._redis.set(key, self.token, px=lease_ms)

    def beat(self) -> bool:
        """One beat; False when Redis did not answer or the name is taken."""
        began = time.monotonic()
        try:
            reply = self._script(
                keys=self._keys,
                args=[CONSUMER_GROUP, self.name, max(1, int(self.settings.lease_s * 1000)), self.token],
            )
            owned = _owned(self.name, reply, self.settings.lease_s)
        except ReplicaIdInUse as exc:
            self.failures += 1
            if self.on_conflict is not None:
                self.on_conflict(str(exc))
            return False
        except Exception:
            self.failures += 1
            return False
        with self._lock:
            if owned is not None:
                self._owned, self._owned_since = owned, began
            self.beats += 1
        return True

    def lost(self, tracked: Mapping[str, float]) -> set[str]:
        """Of ``tracked`` (entry id -> monotonic time it was fetched), those no longer ours."""
        with self._lock:
            owned, since = self._owned, self._owned_since
        if owned is None:
            return set()
        return {e for e, fetched in tracked.items() if fetched < since and e not in owned}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.settings.heartbeat_interval_s)

    def start(self) -> "Heartbeat":
        """Start beating (once; later calls do nothing)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = False) -> None:
        """Stop beating; ``release``: also drop the heartbeat key now if it is still ours (a
        replica that never started its worker; a worker's own stop does this after releasing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if release:
            try:
                self._redis.register_script(_STOP)(
                    keys=self._keys, args=[CONSUMER_GROUP, self.name, self.token]
                )
            except Exception:
                pass  # the key expires with the lease anyway
        self._redis.close()


__all__ = [
    "Consumer",
    "Heartbeat",
    "ReplicaIdInUse",
    "Delivery",
    "JobQueue",
    "StoredItem",
    "connect",
    "validate_cursor",
]
