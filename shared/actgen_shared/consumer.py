"""The worker's end of the job queue: fetch, admit, start, store, finish, release.

The delivery guarantee it keeps with :class:`~actgen_shared.queue.JobQueue` is stated in
:mod:`actgen_shared.queue`; each step here is one Lua script (``lua/*.lua``) run through the
queue's public handles (``JobQueue.scripts``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass

from redis.exceptions import ResponseError

from actgen_shared.heartbeat import new_token, owned_entries
from actgen_shared.keys import Keys
from actgen_shared.queue import DEAD_LETTER_MAXLEN, PROGRESS_MAXLEN, JobQueue
from actgen_shared.replies import as_str, stream_entries
from actgen_shared.schemas import START_CURSOR, JobRequest, JobResult, JobStatus


@dataclass(frozen=True)
class Started:
    """A job this consumer now runs: the indices of its items already stored (by an earlier
    delivery), which the worker skips."""

    done: frozenset[int]


@dataclass
class Delivery:
    """One hand-over of a job to a consumer."""

    entry_id: str  # stream entry id in the jobs stream
    job_id: str
    deliveries: int  # how many times this job has been delivered (1 on first)
    request: JobRequest  # parsed from the job hash
    started: Started | None = None  # set when ``fetch(start=True)`` started it already


@dataclass
class StoredItem:
    """One finished item, as the worker hands it to ``Consumer.store_items``."""

    index: int  # item index inside the job
    class_id: int
    guide_id: str | None
    png: bytes  # generated image
    latent: bytes | None  # float16 safetensors bytes (codecs.latent_encode), also pushed to the bank


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
        self._pending_cursor: str | None = START_CURSOR  # re-read our own pending entries from here
        self._next_rescan = time.monotonic() + queue.settings.pending_rescan_s
        self._next_beat = 0.0  # fetch beats when this comes (a bare consumer has no heartbeat thread)
        self._next_reclaim = 0.0  # and looks for dead consumers' entries when this comes
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
        reply = await q.scripts.heartbeat(
            keys=[self._k.heartbeat(self.name), self._k.jobs_stream],
            args=[q.group, self.name, max(1, int(q.settings.lease_s * 1000)), self.token],
        )
        return owned_entries(self.name, reply, q.settings.lease_s)

    async def fetch(
        self, count: int, block_ms: int, tracked: Collection[str] = (), start: bool = False
    ) -> list[Delivery]:
        """Up to ``count`` jobs to run: entries fetched earlier but not yet handed over, our own
        pending ones (at the first call and every ``pending_rescan_s``), then those of dead
        consumers, then new ones (waiting up to ``block_ms``; 0 or less: no wait).

        ``tracked``: entry ids the caller holds already (skipped when our pending list is re-read).
        ``start``: start each job here in the same step as deciding to run it (``Delivery.started``
        is set; no :meth:`start` call needed): one round trip per job instead of two.
        """
        try:
            return await self._fetch(count, block_ms, tracked, start)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.queue.ensure_group()  # Redis lost the group (flushed): make it again
            self._pending_cursor = START_CURSOR
            self.unadmitted.clear()
            return await self._fetch(count, block_ms, tracked, start)

    async def _fetch(
        self, count: int, block_ms: int, tracked: Collection[str], start: bool
    ) -> list[Delivery]:
        q, k = self.queue, self._k
        count = max(1, count)
        if not self._group_ready:
            await q.ensure_group()
            self._group_ready = True
        now = time.monotonic()
        if now >= self._next_beat:  # a live replica's heartbeat thread beats too; this covers a bare consumer
            self._next_beat = now + q.settings.heartbeat_interval_s
            await self.heartbeat()
        if now >= self._next_rescan:
            self._next_rescan = now + q.settings.pending_rescan_s
            self._pending_cursor = START_CURSOR
            await self._forget_gone_consumers()
        if self._pending_cursor is not None:  # our own unfinished entries first
            await self._read_own(count, tracked)
        if len(self.unadmitted) < count and now >= self._next_reclaim:
            # a dead consumer's entries become ours only after its lease: no need to look each round
            self._next_reclaim = now + min(q.settings.heartbeat_interval_s, q.settings.lease_s / 4)
            for entry_id, job_id, note in await self._reclaim(count - len(self.unadmitted)):
                self.unadmitted[entry_id] = (job_id, note)
        if not self.unadmitted:
            reply = await q.redis.xreadgroup(
                q.group,
                self.name,
                {k.jobs_stream: ">"},
                count=count,
                block=block_ms if block_ms > 0 else None,
            )
            for entry_id, fields in stream_entries(reply):
                self.unadmitted[entry_id] = (fields.get("job_id", ""), "")
        entries = list(self.unadmitted)[:count]
        admissions = await asyncio.gather(
            *(self._admit(entry_id, *self.unadmitted[entry_id], start) for entry_id in entries),
            return_exceptions=True,
        )
        deliveries: list[Delivery] = []
        for entry_id, admitted in zip(entries, admissions, strict=True):
            if isinstance(admitted, BaseException):
                continue  # a Redis error: stays unadmitted for the next fetch
            self.unadmitted.pop(entry_id, None)
            if admitted is not None:
                deliveries.append(admitted)
        errors = [r for r in admissions if isinstance(r, BaseException)]
        if errors and not deliveries:
            raise errors[0]
        return deliveries

    async def _read_own(self, count: int, tracked: Collection[str]) -> None:
        """Our pending entries from the cursor, those the caller does not hold, into ``unadmitted``."""
        q, k = self.queue, self._k
        page = max(count, 100)
        while self._pending_cursor is not None and len(self.unadmitted) < count:
            reply = await q.redis.xreadgroup(
                q.group, self.name, {k.jobs_stream: self._pending_cursor}, count=page
            )
            own = stream_entries(reply)
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
            other = as_str(info.get("name")) or ""
            if other == self.name or int(info.get("pending") or 0) > 0:
                continue
            if int(info.get("idle") or 0) < q.settings.lease_s * 1000:
                continue
            await q.scripts.forget(keys=[k.heartbeat(other), k.jobs_stream], args=[q.group, other])

    async def _reclaim(self, count: int) -> list[tuple[str, str, str]]:
        """Entries of consumers whose heartbeat has expired, claimed for us."""
        q, k = self.queue, self._k
        summary = await q.redis.xpending(k.jobs_stream, q.group)
        out: list[tuple[str, str, str]] = []
        min_idle = max(1, int(q.settings.lease_s * 1000 / 2))  # two reclaimers: only one wins
        for consumer in summary.get("consumers") or []:
            other = as_str(consumer["name"]) or ""
            if other == self.name or len(out) >= count:
                continue
            flat = await q.scripts.reclaim(
                keys=[k.jobs_stream, k.heartbeat(other)],
                args=[q.group, other, self.name, min_idle, count - len(out)],
            )
            note = f"consumer {other} stopped heartbeating (lease {q.settings.lease_s:g}s expired)"
            out += [(as_str(flat[i]) or "", as_str(flat[i + 1]) or "", note) for i in range(0, len(flat), 2)]
        return out

    async def _admit(self, entry_id: str, job_id: str, note: str, start: bool) -> Delivery | None:
        q, k = self.queue, self._k
        if not job_id:  # an entry without a job id (foreign or damaged): drop it
            await q.redis.xack(k.jobs_stream, q.group, entry_id)
            return None
        reply = await q.scripts.admit(
            keys=[
                k.job(job_id),
                k.jobs_by_status,
                k.jobs_stream,
                k.dead_letter_stream,
                *self._job_keys(job_id),
            ],
            args=[
                q.group,
                entry_id,
                job_id,
                q.settings.max_deliveries,
                note,
                repr(time.time()),
                q.settings.result_ttl_s,
                DEAD_LETTER_MAXLEN,
                self.name if start else "",
                self.token if start else "",
                q.settings.max_device_losses,
            ],
        )
        if as_str(reply[0]) != "ok":
            return None
        deliveries = int(reply[1])
        try:
            request = JobRequest.model_validate_json(reply[2])
        except ValueError as exc:  # stored by an incompatible version: fail it, do not loop
            delivery = Delivery(entry_id, job_id, deliveries, None)  # type: ignore[arg-type]
            await self.fail(delivery, f"stored request no longer validates: {exc}")
            return None
        started = Started(done=frozenset(int(i) for i in reply[3:])) if start else None
        return Delivery(entry_id, job_id, deliveries, request, started)

    async def start(self, delivery: Delivery) -> Started | None:
        """Mark the job running on this consumer, and say which of its items an earlier delivery
        stored; None (and acked) if it was cancelled or is final."""
        q, k, job_id = self.queue, self._k, delivery.job_id
        started = await q.scripts.start(
            keys=[
                k.job(job_id),
                k.jobs_by_status,
                k.jobs_stream,
                k.cancel(job_id),
                k.job_done_items(job_id),
                k.job_progress(job_id),
            ],
            args=[
                q.group,
                delivery.entry_id,
                self.name,
                repr(time.time()),
                q.settings.result_ttl_s,
                self.token,
            ],
        )
        if not isinstance(started, list):
            return None
        return Started(done=frozenset(int(i) for i in started[1:]))

    async def progress(self, job_id: str, step: int, total: int) -> None:
        q = self.queue
        await q.scripts.progress(
            keys=[self._k.job(job_id), self._k.job_progress(job_id)],
            args=[step, total, PROGRESS_MAXLEN, q.settings.result_ttl_s],
        )

    async def store_items(self, delivery: Delivery, items: list[StoredItem], bank_cap: int) -> int:
        """Store finished items in one atomic step; returns how many were new.

        Per item, only the first store counts: image and latent keys (with TTL), one entry in
        the run's results stream, and the latent pushed to the class's memory bank when the
        request names one. Nothing is stored for a job that is final or unknown.
        """
        if not items:
            return 0
        stored, _ = await self._store(delivery, items, bank_cap, None)
        return stored

    async def store_and_complete(
        self, delivery: Delivery, items: list[StoredItem], bank_cap: int, result: JobResult
    ) -> tuple[int, bool]:
        """:meth:`store_items` then :meth:`complete`, in one atomic step (one round trip), for
        the job's last items; returns (how many were new, True if this call finished the job)."""
        stored, finished = await self._store(delivery, items, bank_cap, result)
        return stored, finished == 1

    async def _store(
        self, delivery: Delivery, items: list[StoredItem], bank_cap: int, result: JobResult | None
    ) -> tuple[int, int | None]:
        """store.lua: (items that were new, finish.lua's answer when a result was given)."""
        q, req, job_id = self.queue, delivery.request, delivery.job_id
        k = self._k.for_job(job_id)  # results and bank in the job's tenant
        bank = req.memory_bank_key or ""
        keys = [
            k.job(job_id),
            k.job_done_items(job_id),
            k.run_results(req.run_id),
            k.jobs_by_status,
            k.jobs_stream,
            k.job_progress(job_id),
            k.cancel(job_id),
            k.bank_index(bank),
        ]
        args: list[bytes | str | int | float] = [
            q.settings.result_ttl_s,
            q.settings.results_stream_maxlen,
            max(1, bank_cap),
            1 if req.memory_bank_key else 0,
            job_id,
            req.epoch,
            len(items),
            q.settings.bank_ttl_s,
            q.group,
            delivery.entry_id,
            self.name,
            repr(time.time()),
            "" if result is None else result.model_dump_json(),
        ]
        for item in items:
            keys += [
                k.job_image(job_id, item.index),
                k.job_latent(job_id, item.index),
                k.bank(bank, item.class_id),
            ]
            args += [
                item.index,
                item.class_id,
                item.guide_id or "",
                0 if item.latent is None else 1,
                item.png,
                item.latent or b"",
            ]
        reply = await q.durably(q.scripts.store, keys, args)  # ACTGEN_DURABLE_ACK: fsynced first
        return int(reply[0]), (int(reply[1]) if len(reply) > 1 else None)

    async def _finish(self, delivery: Delivery, status: JobStatus, field: str, value: str) -> int:
        q, k, job_id = self.queue, self._k, delivery.job_id
        n = await q.scripts.finish(
            keys=[k.job(job_id), k.jobs_by_status, k.jobs_stream, *self._job_keys(job_id)],
            args=[
                q.group,
                delivery.entry_id,
                status.value,
                field,
                value,
                repr(time.time()),
                q.settings.result_ttl_s,
                self.name,
            ],
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

    async def _put_back(self, delivery: Delivery, mode: str, note: str) -> bool:
        """release.lua; ``mode`` '1': the delivery counts, '0': it does not, 'device': it does
        not but counts as a device loss (bounded by ``max_device_losses``)."""
        q, k = self.queue, self._k
        n = await q.scripts.release(
            keys=[k.job(delivery.job_id), k.jobs_by_status, k.jobs_stream],
            args=[q.group, delivery.entry_id, self.name, delivery.job_id, mode, note],
        )
        return bool(int(n))

    async def release(self, delivery: Delivery) -> None:
        """Graceful shutdown: put the job back at once for another consumer.

        Does not use up a delivery, and does nothing if the entry is no longer ours.
        """
        await self._put_back(delivery, "0", note="")

    async def retry(self, delivery: Delivery, error: str) -> None:
        """Put the job back after a transient error; the delivery counts toward max_deliveries."""
        await self._put_back(delivery, "1", note=error)

    async def device_lost(self, delivery: Delivery, error: str) -> None:
        """Put the job back after this replica's device failed (or hung) under it: the delivery
        does not count toward max_deliveries (the job did nothing wrong) but toward
        max_deliveries's separate bound for device losses, ``max_device_losses``."""
        await self._put_back(delivery, "device", note=error)

    async def stop(self) -> None:
        """Delete our heartbeat key if it is still ours, and our name in the group if nothing is
        pending under it (call after releasing or finishing our work)."""
        q = self.queue
        await q.scripts.stop(
            keys=[self._k.heartbeat(self.name), self._k.jobs_stream], args=[q.group, self.name, self.token]
        )


__all__ = ["Consumer", "Delivery", "Started", "StoredItem"]
