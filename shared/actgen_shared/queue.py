"""The job queue on Redis Streams (docs/architecture.md section 4), used by the API and the workers.

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

The producer's side (:class:`JobQueue`: submit, inspect, cancel, results, memory banks) is
here; the worker's side (:class:`~actgen_shared.consumer.Consumer`) is in ``consumer.py``, the
heartbeat in ``heartbeat.py``, and each atomic step in ``lua/*.lua`` (``scripts.py`` loads them).

The Redis client must return bytes (``decode_responses=False``, the default): images and
latents are binary. ``connect`` makes a suitable client.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# the consumer's liveness, re-exported: the API starts a replica with the queue
from actgen_shared.heartbeat import Heartbeat, ReplicaIdInUse, new_token
from actgen_shared.keys import CONSUMER_GROUP, DEFAULT_TENANT, Keys, new_job_id
from actgen_shared.replies import as_str, stream_entries
from actgen_shared.schemas import START_CURSOR, JobRequest, JobResult, JobState, JobStatus, Progress
from actgen_shared.scripts import Scripts
from actgen_shared.settings import Settings

PROGRESS_MAXLEN = 100  # progress events kept per job: enough for a client to catch up
DEAD_LETTER_MAXLEN = 100_000
_STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")


# What Redis raises while it is down or restarting: callers wait it out instead of failing jobs.
REDIS_DOWN: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)


def connect(
    url: str,
    socket_timeout: float | None = None,
    max_connections: int | None = None,
    pool_timeout_s: float = 10.0,
) -> aioredis.Redis:
    """An asyncio Redis client fit for the queue (bytes replies, RESP2).

    ``socket_timeout`` must exceed the longest blocking read the caller makes (a long-poll of
    :meth:`JobQueue.read_results`): redis-py's default would cut it short. ``max_connections``
    sizes the pool explicitly: a request that finds every connection busy waits up to
    ``pool_timeout_s`` for one (a blocking pool) instead of failing with "Too many connections".
    ``rediss://user:password@host`` (TLS, an ACL user) works as redis-py reads it.
    """
    extra: dict[str, Any] = {} if socket_timeout is None else {"socket_timeout": socket_timeout}
    if max_connections is not None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            decode_responses=False,
            health_check_interval=30,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            **extra,
        )
        return aioredis.Redis(connection_pool=pool)
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30, **extra)


class NotDurable(RuntimeError):
    """ACTGEN_DURABLE_ACK=1 and the append-only file did not hold a write on disk in time."""


class SubmitRefused(Exception):
    """A submit the queue refused; ``status`` is the HTTP status the API answers with."""

    status = 422


class IdempotencyConflict(SubmitRefused):
    """The idempotency key names an earlier job whose body was different."""


class QuotaExceeded(SubmitRefused):
    """The tenant holds its cap of jobs in flight or of request bytes (the message names it)."""

    status = 429


def body_hash(request: JobRequest) -> str:
    """sha256 of a request's canonical JSON, as sent (before the service fixes its seed)."""
    return hashlib.sha256(request.model_dump_json().encode("utf-8")).hexdigest()


def validate_cursor(cursor: str) -> str:
    """A results cursor is a stream id (``0-0``, ``1712345678901-3``); ValueError otherwise."""
    if not _STREAM_ID.match(cursor):
        raise ValueError(f"cursor {cursor!r} is not a stream id like '0-0' or '1712345678901-3'")
    return cursor


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
        self.scripts = Scripts.register(redis)  # public: the Consumer runs them too
        self._memory_checked = -1e9
        self._memory_note: str | None = None
        self.durable_acks = 0  # writes WAITAOF confirmed on disk (ACTGEN_DURABLE_ACK=1)

    # --- durability --------------------------------------------------------------------------
    async def durably(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """Run a script; with ``settings.durable_ack``, follow it on the same connection with
        ``WAITAOF 1 0`` and return only once Redis has fsynced it (NotDurable after
        ``durable_ack_timeout_s``). Counts ``durable_acks`` (the fsyncs confirmed)."""
        if not self.settings.durable_ack:
            return await script(keys=keys, args=args)
        timeout_ms = max(1, int(self.settings.durable_ack_timeout_s * 1000))
        async with self.redis.pipeline(transaction=False) as pipe:  # one connection for both
            await script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAITAOF", 1, 0, timeout_ms)
            reply, (local, _) = await pipe.execute()
        if int(local) < 1:
            raise NotDurable(
                f"Redis did not fsync the write within {self.settings.durable_ack_timeout_s:g} s "
                "(ACTGEN_DURABLE_ACK_TIMEOUT_S)"
            )
        self.durable_acks += 1
        return reply

    # --- jobs --------------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        """Create the jobs stream and its consumer group (from the start: no entry is skipped)."""
        try:
            await self.redis.xgroup_create(self.keys.jobs_stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(
        self,
        request: JobRequest,
        job_id: str | None = None,
        tenant: str = DEFAULT_TENANT,
        request_hash: str = "",
    ) -> tuple[str, bool]:
        """Queue a job of ``tenant`` in one atomic step; returns (job id, duplicate).

        With ``request.idempotency_key`` set, a resubmit returns the first job's id and
        ``duplicate=True`` (for ``result_ttl_s``) when its ``request_hash`` (:func:`body_hash`)
        is the first one's; another body raises IdempotencyConflict. Keys are the tenant's own:
        another tenant's key, run or classifier is never seen. A ``classifier_ref`` must name a
        stored classifier (LookupError otherwise, e.g. deleted meanwhile); the job is recorded as
        one of its users and its TTL starts again. QuotaExceeded when the tenant holds
        ``tenant_max_jobs`` jobs in flight or ``tenant_max_bytes`` of request bodies.
        """
        k = self.keys.for_tenant(tenant)
        job_id = job_id or new_job_id(tenant)
        idem = k.idempotency(request.idempotency_key) if request.idempotency_key else ""
        clf = ["", "", ""]
        if request.classifier_ref:
            hex_ = request.classifier_ref.removeprefix("sha256:")
            clf = [k.classifier(hex_), k.classifier_meta(hex_), k.classifier_jobs(hex_)]
        bank = k.bank_index(request.memory_bank_key) if request.memory_bank_key else ""
        body = request.model_dump_json()
        settings = self.settings
        first, outcome = await self.durably(
            self.scripts.submit,
            keys=[
                idem,
                k.job(job_id),
                k.jobs_stream,
                k.jobs_by_status,
                *clf,
                k.usage,
                k.run(request.run_id),
                bank,
                k.run_tenants(request.run_id),
            ],
            args=[
                job_id,
                body,
                request.run_id,
                request.epoch,
                repr(time.time()),
                len(request.items),
                settings.result_ttl_s,
                settings.classifier_ttl_s,
                request_hash,
                settings.tenant_max_jobs,
                settings.tenant_max_bytes,
                settings.bank_ttl_s,
                1 if request.options.return_latents else 0,
                k.tenant,
            ],
        )
        outcome = int(outcome)
        if outcome == 2:
            raise LookupError(f"classifier_ref: {request.classifier_ref} is not known (deleted or expired)")
        if outcome == 3:
            raise IdempotencyConflict(
                f"idempotency_key: {request.idempotency_key!r} was used for job {as_str(first)} with "
                "another body; a retry must send the same body (or use a new key)"
            )
        if outcome == 4:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {settings.tenant_max_jobs} jobs queued or running, its cap "
                "(ACTGEN_TENANT_MAX_JOBS): wait for some to finish"
            )
        if outcome == 5:
            raise QuotaExceeded(
                f"tenant {tenant!r}: this job's {len(body)} bytes would take its queued and running "
                f"jobs over {settings.tenant_max_bytes} bytes, its cap (ACTGEN_TENANT_MAX_BYTES)"
            )
        return as_str(first) or job_id, bool(outcome)

    async def usage(self, tenant: str = DEFAULT_TENANT) -> tuple[int, int]:
        """(jobs queued or running, bytes of their request bodies) of a tenant."""
        raw = await self.redis.hmget(self.keys.for_tenant(tenant).usage, ["jobs", "bytes"])
        return int(raw[0] or 0), int(raw[1] or 0)

    async def memory_pressure(self, redis: aioredis.Redis | None = None) -> str | None:
        """Why Redis is too full to take more work (used_memory at or over ``redis_memory_high``
        of maxmemory), or None. Cached for a second: submit asks on every request. ``redis``:
        the client to ask on (/readyz uses its own)."""
        now = time.monotonic()
        if now - self._memory_checked < 1.0:
            return self._memory_note
        info = await (redis or self.redis).info("memory")
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
            "status",
            "run_id",
            "epoch",
            "progress_step",
            "progress_total",
            "error",
            "result",
            "created_at",
            "started_at",
            "finished_at",
            "replica",
            "deliveries",
        )
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip
            pipe.hmget(self.keys.job(job_id), fields)
            pipe.exists(self.keys.cancel(job_id))
            raw, cancel_flag = await pipe.execute()
        values = dict(zip(fields, (as_str(v) for v in raw), strict=True))
        if values["status"] is None:
            return None

        def num(name: str, kind: type = float) -> Any:
            raw = values[name]
            return kind(raw) if raw not in (None, "") else None

        raw_result = values["result"]
        status = JobStatus(values["status"])
        result = JobResult.model_validate_json(raw_result) if raw_result else None
        progress = Progress(step=num("progress_step", int) or 0, total=num("progress_total", int) or 0)
        if status is JobStatus.done:  # the last step posts no progress: a done job did all its steps
            total = result.options.num_inference_steps if result is not None else progress.total
            progress = Progress(step=total, total=total)
        return JobState(
            job_id=job_id,
            run_id=values["run_id"] or "",
            epoch=num("epoch", int) or 0,
            status=status,
            progress=progress,
            error=values["error"],
            result=result,
            created_at=num("created_at"),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            replica=values["replica"],
            deliveries=num("deliveries", int) or 0,
            cancel_requested=bool(cancel_flag) and not status.is_final,
        )

    async def request(self, job_id: str) -> JobRequest | None:
        """The job's request while it is queued or running (a final job's body is dropped)."""
        raw = await self.redis.hget(self.keys.job(job_id), "request")
        return JobRequest.model_validate_json(raw) if raw else None

    async def latents_wanted(self, job_id: str) -> tuple[int, bool] | None:
        """(items, whether latents were asked for) of a job; None for an unknown job."""
        status, n_items, wanted = await self.redis.hmget(
            self.keys.job(job_id), ["status", "n_items", "return_latents"]
        )
        if status is None:
            return None
        return int(n_items or 0), (as_str(wanted) or "1") == "1"

    async def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel: a queued job at once; a running one by flag (the worker stops between steps).

        Returns the status after the call (None for an unknown job); a final job is unchanged.
        """
        k = self.keys
        status = await self.scripts.cancel(
            keys=[
                k.job(job_id),
                k.jobs_by_status,
                k.cancel(job_id),
                k.job_done_items(job_id),
                k.job_progress(job_id),
            ],
            args=[repr(time.time()), self.settings.result_ttl_s],
        )
        return JobStatus(as_str(status)) if status else None

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
            counts[as_str(name) or ""] = max(0, int(value))
        return counts

    async def progress_events(
        self, job_id: str, after: str = START_CURSOR, limit: int = 100
    ) -> list[dict[str, str]]:
        """Progress events after a stream id, each with its ``id`` (for a reconnecting client)."""
        validate_cursor(after)
        reply = await self.redis.xread({self.keys.job_progress(job_id): after}, count=limit)
        return [{"id": entry_id, **fields} for entry_id, fields in stream_entries(reply)]

    async def dead_letters(self, limit: int = 100) -> list[dict[str, str]]:
        """Newest entries of the dead-letter stream (job_id, reason, deliveries, replica, at)."""
        reply = await self.redis.xrevrange(self.keys.dead_letter_stream, count=limit)
        return [
            {
                "id": as_str(entry_id) or "",
                **{as_str(k) or "": as_str(v) or "" for k, v in (fields or {}).items()},
            }
            for entry_id, fields in reply or []
        ]

    # --- results -----------------------------------------------------------------------------
    async def run_of_another(self, run_id: str, tenant: str = DEFAULT_TENANT) -> bool:
        """Whether the run id is another tenant's only: this tenant never submitted to it (and
        has no results of it) while another did (within the result TTL)."""
        k = self.keys.for_tenant(tenant)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(k.run(run_id), k.run_results(run_id))
            pipe.scard(k.run_tenants(run_id))
            ours, users = await pipe.execute()
        return not int(ours) and int(users) > 0

    async def read_results(
        self,
        run_id: str,
        after: str = START_CURSOR,
        limit: int = 100,
        wait_s: float = 0.0,
        tenant: str = DEFAULT_TENANT,
        redis: aioredis.Redis | None = None,
    ) -> tuple[list[dict[str, str]], str]:
        """Results of a run strictly after the cursor, oldest first, and the next cursor.

        When none are there and ``wait_s > 0``, wait up to that long for one (long-poll).
        Each dict: ``id`` plus job_id, index, class_id, guide_id, epoch, image_key, latent_key
        (all strings; ``guide_id`` and ``latent_key`` are "" when absent). ValueError for a
        cursor that is not a stream id. ``redis``: the client to block on (the API keeps its
        long-polls on a pool of their own, so they never starve its other requests).
        """
        validate_cursor(after)
        limit = max(1, int(limit))
        block = max(1, int(wait_s * 1000)) if wait_s > 0 else None
        key = self.keys.for_tenant(tenant).run_results(run_id)
        reply = await (redis or self.redis).xread({key: after}, count=limit, block=block)
        items = [{"id": entry_id, **fields} for entry_id, fields in stream_entries(reply)]
        return items, (items[-1]["id"] if items else after)

    async def image(self, job_id: str, index: int) -> bytes | None:
        return cast(bytes | None, await self.redis.get(self.keys.job_image(job_id, index)))

    async def latent(self, job_id: str, index: int) -> bytes | None:
        return cast(bytes | None, await self.redis.get(self.keys.job_latent(job_id, index)))

    async def get_bytes(self, key: str) -> bytes | None:
        """A blob named by a results entry (image_key / latent_key); None outside this prefix."""
        (blob,) = await self.get_many([key])
        return blob

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """:meth:`get_bytes` of each key, in one round trip (MGET) for a whole results page; None
        for a key outside this prefix (a results entry names only this deployment's blobs)."""
        ours = [key for key in keys if key and key.startswith(self.keys.prefix)]
        found = (
            dict(zip(ours, cast(list[bytes | None], await self.redis.mget(ours)), strict=True))
            if ours
            else {}
        )
        return [found.get(key) for key in keys]

    # --- memory banks ------------------------------------------------------------------------
    async def bank_known(self, bank_key: str, tenant: str = DEFAULT_TENANT) -> bool:
        """Whether the tenant's jobs named this bank (its index exists; a cleared bank keeps it)."""
        return bool(await self.redis.exists(self.keys.for_tenant(tenant).bank_index(bank_key)))

    async def _bank_keys(self, bank_key: str, tenant: str) -> list[tuple[int, str]]:
        """(class id, list key) of each class in the bank, from its index (no keyspace scan)."""
        k = self.keys.for_tenant(tenant)
        fields = cast(list[bytes], await self.redis.hkeys(k.bank_index(bank_key)))
        ids = sorted(int(f) for f in (as_str(f) or "" for f in fields) if f.isdigit())
        return [(class_id, k.bank(bank_key, class_id)) for class_id in ids]

    async def bank_counts(self, bank_key: str, tenant: str = DEFAULT_TENANT) -> dict[int, int]:
        """class id -> latents in the bank."""
        found = await self._bank_keys(bank_key, tenant)
        if not found:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, key in found:
                pipe.llen(key)
            lengths = await pipe.execute()
        return {class_id: int(n) for (class_id, _), n in zip(found, lengths, strict=True) if int(n) > 0}

    async def bank_sample(
        self, bank_key: str, class_id: int, n: int, rng: random.Random, tenant: str = DEFAULT_TENANT
    ) -> list[bytes]:
        """Up to n latents of a class, drawn without replacement (all of them when fewer)."""
        key = self.keys.for_tenant(tenant).bank(bank_key, class_id)
        size = int(await self.redis.llen(key))
        if n <= 0 or size == 0:
            return []
        if n >= size:
            return [bytes(x) for x in cast(list[bytes], await self.redis.lrange(key, 0, -1))]
        picks = sorted(rng.sample(range(size), n))
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in picks:
                pipe.lindex(key, i)
            values = await pipe.execute()
        return [bytes(v) for v in values if v is not None]

    async def push_bank(
        self,
        bank_key: str,
        class_id: int,
        latent: bytes,
        cap: int | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        """Add one latent to a class's bank, newest first, capped (and the class to its index)."""
        k = self.keys.for_tenant(tenant)
        key, index = k.bank(bank_key, class_id), k.bank_index(bank_key)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, latent)
            pipe.ltrim(key, 0, (cap or self.settings.bank_cap) - 1)
            pipe.expire(key, self.settings.bank_ttl_s)
            pipe.hset(index, str(class_id), "1")
            pipe.expire(index, self.settings.bank_ttl_s)
            await pipe.execute()

    async def clear_bank(self, bank_key: str, tenant: str = DEFAULT_TENANT) -> int:
        """Delete a memory bank's latents; returns how many it held. Its index stays (empty, with
        its TTL), so the tenant's GET still finds the bank, with no classes."""
        counts = await self.bank_counts(bank_key, tenant)
        found = await self._bank_keys(bank_key, tenant)
        if found:
            index = self.keys.for_tenant(tenant).bank_index(bank_key)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(*(key for _, key in found))
                pipe.hdel(index, *(str(class_id) for class_id, _ in found))
                pipe.hset(index, "_", "1")
                pipe.expire(index, self.settings.bank_ttl_s)
                await pipe.execute()
        return sum(counts.values())


__all__ = [
    "DEAD_LETTER_MAXLEN",
    "IdempotencyConflict",
    "NotDurable",
    "QuotaExceeded",
    "SubmitRefused",
    "body_hash",
    "PROGRESS_MAXLEN",
    "REDIS_DOWN",
    "Heartbeat",
    "JobQueue",
    "ReplicaIdInUse",
    "connect",
    "new_token",
    "validate_cursor",
]
