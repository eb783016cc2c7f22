"""The Redis Streams job queue against a real redis-server (docs/architecture.md section 4).

Liveness tests use the fixture's short lease (2 s). Waits are bounded loops (a guard that
fails the test if the queue never gets there), never assertions on how long something took.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TypeVar

import numpy as np
import pytest

from actgen_shared import codecs
from actgen_shared.consumer import Consumer, Delivery, Started, StoredItem
from actgen_shared.queue import JobQueue, ReplicaIdInUse, connect
from actgen_shared.schemas import ItemResult, JobRequest, JobResult, JobStatus, Mode
from actgen_shared.settings import Settings

pytestmark = pytest.mark.anyio

T = TypeVar("T")
GUARD_S = 30.0  # upper bound for anything that waits on a lease to expire


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[JobQueue]:
    client = connect(settings.redis_url or "")
    q = JobQueue(client, settings)
    await q.ensure_group()
    yield q
    await client.aclose()


def _guide_b64() -> str:
    return codecs.png_to_b64(np.full((8, 8, 3), 127, dtype=np.uint8))


def make_request(
    run_id: str = "run-1", n_items: int = 2, bank: str | None = None, idem: str | None = None, epoch: int = 0
) -> JobRequest:
    guide = _guide_b64()
    return JobRequest(
        run_id=run_id,
        epoch=epoch,
        label_set="cifar10",
        items=[{"image": guide, "class_id": k % 10, "guide_id": f"g{k}"} for k in range(n_items)],
        memory_bank_key=bank,
        idempotency_key=idem,
    )


def make_items(delivery: Delivery, tag: int = 0) -> list[StoredItem]:
    """Fake sampler output: a PNG and a float16 latent per item, distinguishable by ``tag``."""
    items = []
    for k, item in enumerate(delivery.request.items):
        png = codecs.png_encode(np.full((4, 4, 3), (tag * 40 + k) % 256, dtype=np.uint8))
        latent = codecs.latent_encode(np.full((4, 2, 2), tag + k / 10, dtype=np.float32))
        items.append(
            StoredItem(index=k, class_id=item.class_id, guide_id=item.guide_id, png=png, latent=latent)
        )
    return items


def make_result(delivery: Delivery, replica: str) -> JobResult:
    req = delivery.request
    return JobResult(
        items=[
            ItemResult(
                index=k,
                class_id=it.class_id,
                class_name=req.resolved_class_names()[it.class_id],
                guide_id=it.guide_id,
                seed=k,
                mode=Mode.actgen,
                image_guidance_strength=12.5,
                width=8,
                height=8,
            )
            for k, it in enumerate(req.items)
        ],
        options=req.options,
        replica=replica,
    )


async def run_to_done(consumer: Consumer, delivery: Delivery, tag: int = 0) -> bool:
    assert await consumer.start(delivery)
    await consumer.store_items(delivery, make_items(delivery, tag), bank_cap=100)
    return await consumer.complete(delivery, make_result(delivery, consumer.name))


async def until(probe: Callable[[], Awaitable[T]], what: str, guard_s: float = GUARD_S) -> T:
    """Call ``probe`` until it returns something truthy; fail the test after ``guard_s``."""
    deadline = time.monotonic() + guard_s
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


async def results_len(queue: JobQueue, run_id: str) -> int:
    return int(await queue.redis.xlen(queue.keys.run_results(run_id)))


# --- liveness -----------------------------------------------------------------------------------


async def test_dead_consumer_job_is_reclaimed_and_finished_by_another(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request())
    a, b = Consumer(queue, "host-a"), Consumer(queue, "host-b")
    [got] = await a.fetch(count=1, block_ms=100)
    assert got.job_id == job_id and got.deliveries == 1
    assert await a.start(got)
    # a dies here: no heartbeat, no ack. b gets the job once a's lease has expired.
    [again] = await until(lambda: b.fetch(count=1, block_ms=100), "reclaim by host-b")
    assert again.job_id == job_id and again.deliveries == 2
    assert await run_to_done(b, again)
    state = await queue.state(job_id)
    assert state is not None
    assert state.status is JobStatus.done and state.replica == "host-b" and state.deliveries == 2
    assert await results_len(queue, "run-1") == 2
    assert (await queue.redis.xpending(queue.keys.jobs_stream, queue.group))["pending"] == 0


async def test_live_consumer_long_job_is_never_reclaimed(queue: JobQueue, settings: Settings) -> None:
    job_id, _ = await queue.submit(make_request())
    a, b = Consumer(queue, "host-a"), Consumer(queue, "host-b")
    [got] = await a.fetch(count=1, block_ms=100)
    assert await a.start(got)

    async def beat() -> None:  # what the worker's heartbeat task does while the GPU is busy
        while True:
            await a.heartbeat()
            await asyncio.sleep(settings.heartbeat_interval_s)

    beating = asyncio.create_task(beat())
    stolen: list[Delivery] = []
    try:
        end = time.monotonic() + 3 * settings.lease_s
        while time.monotonic() < end:
            stolen += await b.fetch(count=1, block_ms=200)
    finally:
        beating.cancel()
    assert stolen == []
    assert await a.complete(got, make_result(got, "host-a"))
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.done and state.deliveries == 1


async def test_reclaim_is_decided_by_heartbeat_not_idle_time(queue: JobQueue, settings: Settings) -> None:
    """An entry idle for several leases stays with its consumer while that consumer's heartbeat
    key lives (taskiq's bug was reclaiming on idle time alone)."""
    job_id, _ = await queue.submit(make_request())
    a, b = Consumer(queue, "host-a"), Consumer(queue, "host-a-twin")
    [got] = await a.fetch(count=1, block_ms=100)
    hb = queue.keys.heartbeat("host-a")
    stolen: list[Delivery] = []
    end = time.monotonic() + 3 * settings.lease_s
    while time.monotonic() < end:
        await queue.redis.set(hb, "host-a", px=int(settings.lease_s * 1000))  # alive, entry not touched
        stolen += await b.fetch(count=1, block_ms=200)
    assert stolen == []
    pending = await queue.redis.xpending_range(queue.keys.jobs_stream, queue.group, "-", "+", 10)
    assert [(p["consumer"], p["message_id"]) for p in pending] == [(b"host-a", got.entry_id.encode())]
    assert pending[0]["time_since_delivered"] >= settings.lease_s * 1000  # idle past a lease
    await queue.redis.delete(hb)  # now a dies
    [again] = await until(lambda: b.fetch(count=1, block_ms=100), "reclaim once the heartbeat is gone")
    assert again.job_id == job_id


async def test_job_that_keeps_dying_goes_to_dead_letter_and_is_failed(
    queue: JobQueue, settings: Settings
) -> None:
    job_id, _ = await queue.submit(make_request())
    for k in range(settings.max_deliveries):
        consumer = Consumer(queue, f"doomed-{k}")
        [got] = await until(partial(consumer.fetch, count=1, block_ms=100), f"delivery {k + 1}")
        assert got.deliveries == k + 1
        assert await consumer.start(got)  # ... and the consumer dies mid-job
    reaper = Consumer(queue, "reaper")

    async def failed() -> bool:
        assert await reaper.fetch(count=1, block_ms=100) == []  # never handed out a 4th time
        state = await queue.state(job_id)
        return state is not None and state.status is JobStatus.failed

    await until(failed, "the job to be dead-lettered")
    [dead] = await queue.dead_letters()
    assert dead["job_id"] == job_id and dead["deliveries"] == str(settings.max_deliveries)
    assert "max_deliveries 3" in dead["reason"]
    assert "doomed-2 stopped heartbeating" in dead["reason"]
    state = await queue.state(job_id)
    assert state is not None and state.error == dead["reason"]
    assert (await queue.counts_by_status())["failed"] == 1
    assert (await queue.redis.xpending(queue.keys.jobs_stream, queue.group))["pending"] == 0


async def test_restarted_consumer_rereads_its_own_pending_entries_first(queue: JobQueue) -> None:
    first, _ = await queue.submit(make_request())
    [got] = await Consumer(queue, "host-gpu0").fetch(count=1, block_ms=100)
    await queue.submit(make_request())
    # the process dies and its lease runs out; it restarts under the same configured name
    await queue.redis.delete(queue.keys.heartbeat("host-gpu0"))
    [again] = await Consumer(queue, "host-gpu0").fetch(count=1, block_ms=100)
    assert again.job_id == first and again.entry_id == got.entry_id


async def test_a_second_process_under_a_live_name_is_refused(queue: JobQueue) -> None:
    """Two processes must never share a consumer name: the second one's heartbeat is refused
    while the first one's lives, and the first one's is never overwritten."""
    a, twin = Consumer(queue, "host-gpu0"), Consumer(queue, "host-gpu0")
    assert a.token != twin.token
    await a.heartbeat()
    with pytest.raises(ReplicaIdInUse, match="host-gpu0"):
        await twin.heartbeat()
    with pytest.raises(ReplicaIdInUse):
        await twin.fetch(count=1, block_ms=0)
    assert await queue.redis.get(queue.keys.heartbeat("host-gpu0")) == a.token.encode()


# --- exactly-once effects -----------------------------------------------------------------------


async def test_two_consumers_finishing_one_job_leave_one_result(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request(n_items=3, bank="bank-1"))
    a, b = Consumer(queue, "host-a"), Consumer(queue, "host-b")
    [da] = await a.fetch(count=1, block_ms=100)
    assert await a.start(da)
    # a stalls past its lease (presumed dead) but is still working; b takes the job over
    [db] = await until(lambda: b.fetch(count=1, block_ms=100), "reclaim by host-b")
    assert await b.start(db)
    stored = await asyncio.gather(
        a.store_items(da, make_items(da, tag=1), bank_cap=100),
        b.store_items(db, make_items(db, tag=2), bank_cap=100),
    )
    finished = await asyncio.gather(
        a.complete(da, make_result(da, "host-a")), b.complete(db, make_result(db, "host-b"))
    )
    assert sorted(stored) == [0, 3]
    assert sorted(finished) == [False, True]
    assert await results_len(queue, "run-1") == 3
    entries, _ = await queue.read_results("run-1")
    assert sorted(int(e["index"]) for e in entries) == [0, 1, 2]
    assert await queue.bank_counts("bank-1") == {0: 1, 1: 1, 2: 1}
    winner = 1 if stored[0] == 3 else 2
    assert await queue.image(job_id, 1) == make_items(da, tag=winner)[1].png
    assert {int(i) for i in await queue.redis.hkeys(queue.keys.job_done_items(job_id))} == {0, 1, 2}
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.done
    assert (await queue.counts_by_status())["done"] == 1


async def test_store_is_idempotent_per_item_and_resumes(queue: JobQueue) -> None:
    await queue.submit(make_request(n_items=3))
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100)
    assert await c.start(d)
    items = make_items(d)
    assert await c.store_items(d, items[:2], bank_cap=10) == 2
    started = await c.start(d)  # the same delivery again: what a worker resumes after
    assert started is not None and started.done == {0, 1}
    assert await c.store_items(d, items, bank_cap=10) == 1  # only item 2 is new
    assert await results_len(queue, "run-1") == 3


async def test_fetch_that_starts_is_one_step_and_a_retried_one_counts_once(queue: JobQueue) -> None:
    """``fetch(start=True)`` (the worker's way) admits and starts each job in one Lua step. The
    same step run again for the same delivery (its reply was lost) starts nothing twice, and
    says which items are stored by then; a job whose cancel flag is up is not started."""
    job_id, _ = await queue.submit(make_request(n_items=2))
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100, start=True)
    assert d.deliveries == 1 and d.started is not None and d.started.done == frozenset()
    state = await queue.state(job_id)
    assert state is not None and (state.status, state.replica, state.deliveries) == (
        JobStatus.running,
        "host-a",
        1,
    )
    assert await c.store_items(d, make_items(d)[:1], bank_cap=10) == 1
    again = await c._admit(d.entry_id, job_id, "", True)  # the retry of a step whose reply was lost
    assert again is not None and again.deliveries == 1 and again.started == Started(frozenset({0}))
    counts = await queue.counts_by_status()
    assert (counts["queued"], counts["running"]) == (0, 1)
    state = await queue.state(job_id)
    assert state is not None and state.deliveries == 1

    # at its last allowed delivery too: the retry is that delivery, not one past the cap
    last = JobQueue(queue.redis, queue.settings.model_copy(update={"max_deliveries": 1}))
    last_id, _ = await last.submit(make_request(run_id="run-last"))
    c_last = Consumer(last, "host-c")
    [dl] = await c_last.fetch(count=1, block_ms=100, start=True)
    assert dl.job_id == last_id and dl.deliveries == 1
    retried = await c_last._admit(dl.entry_id, last_id, "", True)
    assert retried is not None and retried.deliveries == 1
    state = await last.state(last_id)
    assert state is not None and state.status is JobStatus.running  # not dead-lettered

    cancelled_id, _ = await queue.submit(make_request(run_id="run-2"))
    b = Consumer(queue, "host-b")
    [taken] = await b.fetch(count=1, block_ms=100)  # admitted, not started: still queued
    assert taken.started is None and await queue.cancel(cancelled_id) is JobStatus.cancelled
    await queue.submit(make_request(run_id="run-3"))
    [other] = await b.fetch(count=1, block_ms=100, start=True)
    assert other.request.run_id == "run-3"  # the cancelled job was skipped, not started


async def test_store_and_complete_keeps_the_guarantees_of_store_then_complete(queue: JobQueue) -> None:
    """The worker stores a job's last items and completes it in one step: items are stored once
    whoever stores them, only the entry's owner finishes the job, a final job gets nothing."""
    job_id, _ = await queue.submit(make_request(n_items=3, bank="bank-1"))
    a, b = Consumer(queue, "host-a"), Consumer(queue, "host-b")
    [da] = await a.fetch(count=1, block_ms=100, start=True)
    # a stalls past its lease (presumed dead) but is still working; b takes the job over
    [db] = await until(lambda: b.fetch(count=1, block_ms=100, start=True), "reclaim by host-b")
    assert db.deliveries == 2 and db.started is not None
    stored_a, finished_a = await a.store_and_complete(
        da, make_items(da, tag=1), 100, make_result(da, "host-a")
    )
    assert (stored_a, finished_a) == (3, False)  # stored (once), but the job is b's to finish
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.running
    stored_b, finished_b = await b.store_and_complete(
        db, make_items(db, tag=2), 100, make_result(db, "host-b")
    )
    assert (stored_b, finished_b) == (0, True)
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.done and state.result is not None
    assert state.result.replica == "host-b" and state.finished_at is not None
    assert await results_len(queue, "run-1") == 3 and await queue.bank_counts("bank-1") == {0: 1, 1: 1, 2: 1}
    assert await queue.image(job_id, 1) == make_items(da, tag=1)[1].png
    assert (await queue.counts_by_status())["done"] == 1
    assert (await queue.redis.xpending(queue.keys.jobs_stream, queue.group))["pending"] == 0  # b acked it

    cancelled_id, _ = await queue.submit(make_request(run_id="run-2"))
    [dc] = await a.fetch(count=1, block_ms=100, start=True)
    assert await queue.cancel(cancelled_id) is JobStatus.running
    await a.mark_cancelled(dc)
    assert await a.store_and_complete(dc, make_items(dc), 10, make_result(dc, "host-a")) == (0, False)
    assert await results_len(queue, "run-2") == 0
    state = await queue.state(cancelled_id)
    assert state is not None and state.status is JobStatus.cancelled and state.result is None


# --- results stream -----------------------------------------------------------------------------


async def test_reader_restarting_from_saved_cursor_sees_every_result_once(
    queue: JobQueue, settings: Settings
) -> None:
    worker = Consumer(queue, "host-a")
    expected: set[tuple[str, int]] = set()

    async def produce(n_items: int, epoch: int) -> None:
        await queue.submit(make_request(n_items=n_items, epoch=epoch))
        [d] = await worker.fetch(count=1, block_ms=100)
        assert await run_to_done(worker, d)
        expected.update((d.job_id, k) for k in range(n_items))

    seen: list[tuple[str, int]] = []
    cursor = "0-0"  # what the trainer keeps in its checkpoint
    await produce(5, epoch=0)
    for round_ in range(4):
        # each round is a fresh reader process: new connection, only the saved cursor survives
        client = connect(settings.redis_url or "")
        reader = JobQueue(client, settings)
        entries, cursor = await reader.read_results("run-1", after=cursor, limit=2)
        seen += [(e["job_id"], int(e["index"])) for e in entries]
        await client.aclose()
        if round_ == 1:
            await produce(3, epoch=1)
    while True:
        entries, cursor = await queue.read_results("run-1", after=cursor, limit=2)
        if not entries:
            break
        seen += [(e["job_id"], int(e["index"])) for e in entries]
    assert len(seen) == len(set(seen)) == 8
    assert set(seen) == expected
    entries, last = await queue.read_results("run-1", after=cursor)
    assert entries == [] and last == cursor


async def test_results_entry_fields(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request(n_items=1, epoch=4))
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100)
    assert await run_to_done(c, d)
    [entry], nxt = await queue.read_results("run-1")
    assert nxt == entry["id"]
    assert entry["job_id"] == job_id and entry["index"] == "0" and entry["class_id"] == "0"
    assert entry["guide_id"] == "g0" and entry["epoch"] == "4"
    assert await queue.get_bytes(entry["image_key"]) == make_items(d)[0].png
    latent = await queue.get_bytes(entry["latent_key"])
    assert latent is not None and codecs.latent_decode(latent).dtype == np.float16
    assert await queue.get_bytes("elsewhere:secret") is None
    many = await queue.get_many([entry["image_key"], "elsewhere:secret", "", entry["latent_key"]])
    assert many == [make_items(d)[0].png, None, None, latent]
    assert await queue.get_many([]) == []
    with pytest.raises(ValueError, match="cursor"):
        await queue.read_results("run-1", after="not-an-id")


async def test_long_poll_returns_when_an_entry_arrives(queue: JobQueue) -> None:
    await queue.submit(make_request(n_items=1))
    empty, cursor = await queue.read_results("run-1", after="0-0", wait_s=0.2)
    assert empty == [] and cursor == "0-0"
    poll = asyncio.create_task(queue.read_results("run-1", after="0-0", wait_s=60))
    await asyncio.sleep(0.3)
    assert not poll.done()  # nothing there yet: the reader is waiting, not returning empty
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100)
    assert await run_to_done(c, d)
    entries, cursor = await asyncio.wait_for(poll, timeout=GUARD_S)
    assert [e["job_id"] for e in entries] == [d.job_id]
    assert cursor == entries[0]["id"]


# --- submit, status, TTL ------------------------------------------------------------------------


async def test_idempotent_enqueue_returns_first_job_id(queue: JobQueue) -> None:
    first, dup = await queue.submit(make_request(idem="epoch-3-rank-0"))
    again, dup2 = await queue.submit(make_request(n_items=5, idem="epoch-3-rank-0"))
    assert (dup, dup2) == (False, True)
    assert again == first
    assert await queue.queue_depth() == 1
    assert await queue.redis.xlen(queue.keys.jobs_stream) == 1
    request = await queue.request(first)
    assert request is not None and len(request.items) == 2  # the first body is kept
    other, dup3 = await queue.submit(make_request(idem="epoch-4-rank-0"))
    assert other != first and not dup3
    assert (await queue.counts_by_status())["queued"] == 2


async def test_results_and_finished_job_get_ttl(queue: JobQueue, settings: Settings) -> None:
    job_id, _ = await queue.submit(make_request(n_items=2, bank="bank-ttl"))
    k = queue.keys
    assert await queue.redis.ttl(k.job(job_id)) == -1  # a queued job never expires
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100)
    assert await run_to_done(c, d)
    for key in (
        k.job(job_id),
        k.job_done_items(job_id),
        k.run_results("run-1"),
        k.job_image(job_id, 0),
        k.job_image(job_id, 1),
        k.job_latent(job_id, 0),
        k.job_latent(job_id, 1),
    ):
        ttl = await queue.redis.ttl(key)
        assert 0 < ttl <= settings.result_ttl_s, key


async def test_state_reports_progress_and_result(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request())
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.queued and state.run_id == "run-1"
    assert await queue.state("no-such-job") is None
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100)
    assert await c.start(d)
    for step in range(1, 4):
        await c.progress(job_id, step, 40)
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.running
    assert (state.progress.step, state.progress.total, state.replica) == (3, 40, "host-a")
    events = await queue.progress_events(job_id)
    assert [e["step"] for e in events] == ["1", "2", "3"]
    assert [e["step"] for e in await queue.progress_events(job_id, after=events[0]["id"])] == ["2", "3"]
    assert await c.complete(d, make_result(d, "host-a"))
    state = await queue.state(job_id)
    assert state is not None and state.result is not None and len(state.result.items) == 2
    assert state.finished_at is not None and state.started_at is not None


async def test_fail_marks_failed_with_error(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request())
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100)
    assert await c.start(d)
    await c.fail(d, "CUDA out of memory")
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.failed and state.error == "CUDA out of memory"
    assert not await c.complete(d, make_result(d, "host-a"))  # final stays final
    counts = await queue.counts_by_status()
    assert (counts["running"], counts["failed"], counts["done"]) == (0, 1, 0)


# --- cancel and release -------------------------------------------------------------------------


async def test_cancel_queued_job_is_final_at_once(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request())
    assert await queue.cancel(job_id) is JobStatus.cancelled
    assert await Consumer(queue, "host-a").fetch(count=1, block_ms=100) == []  # acked, skipped
    counts = await queue.counts_by_status()
    assert (counts["queued"], counts["cancelled"]) == (0, 1)
    assert await queue.cancel(job_id) is JobStatus.cancelled
    assert await queue.cancel("no-such-job") is None
    assert await queue.redis.xlen(queue.keys.jobs_stream) == 0


async def test_cancel_running_job_sets_flag_worker_stops(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request())
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100)
    assert await c.start(d)
    assert not await queue.is_cancel_requested(job_id)
    assert await queue.cancel(job_id) is JobStatus.running
    assert await queue.is_cancel_requested(job_id)
    await c.mark_cancelled(d)  # the worker saw the flag between two steps
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.cancelled
    assert await c.store_items(d, make_items(d), bank_cap=10) == 0  # nothing stored after cancel
    done_id, _ = await queue.submit(make_request())
    [d2] = await c.fetch(count=1, block_ms=100)
    assert await run_to_done(c, d2)
    assert await queue.cancel(done_id) is JobStatus.done


async def test_cancel_of_running_job_reaches_a_consumer_that_takes_it_over(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request())
    a, b = Consumer(queue, "host-a"), Consumer(queue, "host-b")
    [d] = await a.fetch(count=1, block_ms=100)
    assert await a.start(d)
    assert await queue.cancel(job_id) is JobStatus.running
    [again] = await until(lambda: b.fetch(count=1, block_ms=100), "reclaim by host-b")
    assert not await b.start(again)
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.cancelled


async def test_release_puts_job_back_for_another_consumer(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request())
    a, b = Consumer(queue, "host-a"), Consumer(queue, "host-b")
    [d] = await a.fetch(count=1, block_ms=100)
    assert await a.start(d)
    await a.release(d)  # graceful shutdown
    await a.stop()
    assert not await queue.redis.exists(queue.keys.heartbeat("host-a"))
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.queued and state.deliveries == 0
    assert await queue.queue_depth() == 1
    [again] = await b.fetch(count=1, block_ms=100)  # at once, no lease to wait for
    assert again.job_id == job_id and again.deliveries == 1
    await a.release(d)  # a stale release from the old owner changes nothing
    assert await run_to_done(b, again)
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.done and state.replica == "host-b"


async def test_releasing_a_reclaimed_job_unstarted_keeps_its_delivery_count(queue: JobQueue) -> None:
    job_id, _ = await queue.submit(make_request())
    a, b, c = Consumer(queue, "host-a"), Consumer(queue, "host-b"), Consumer(queue, "host-c")
    [d] = await a.fetch(count=1, block_ms=100)
    assert await a.start(d)  # a dies after starting: that delivery counts
    [taken] = await until(lambda: b.fetch(count=1, block_ms=100), "reclaim by host-b")
    await b.release(taken)  # b shuts down before starting it
    state = await queue.state(job_id)
    assert state is not None and state.status is JobStatus.queued and state.deliveries == 1
    [again] = await c.fetch(count=1, block_ms=100)
    assert again.deliveries == 2


# --- memory banks -------------------------------------------------------------------------------


async def test_memory_bank_cap_sample_and_clear(queue: JobQueue) -> None:
    for k in range(6):
        await queue.push_bank("bank-x", 3, codecs.latent_encode(np.full((2, 2), k, dtype=np.float32)), cap=4)
    await queue.push_bank("bank-x", 7, codecs.latent_encode(np.zeros((2, 2), dtype=np.float32)), cap=4)
    await queue.push_bank("bank-x2", 1, b"other bank", cap=4)
    assert await queue.bank_counts("bank-x") == {3: 4, 7: 1}
    sample = await queue.bank_sample("bank-x", 3, 2, random.Random(0))
    values = {float(codecs.latent_decode(s)[0, 0]) for s in sample}
    assert len(values) == 2 and values <= {2.0, 3.0, 4.0, 5.0}  # newest 4 kept
    assert len(await queue.bank_sample("bank-x", 3, 100, random.Random(0))) == 4
    assert await queue.bank_sample("bank-x", 9, 5, random.Random(0)) == []
    assert await queue.clear_bank("bank-x") == 5
    assert await queue.bank_counts("bank-x") == {}
    assert await queue.bank_counts("bank-x2") == {1: 1}


def test_queue_refuses_a_decoding_client(settings: Settings) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        JobQueue(client, settings)


async def test_starting_one_delivery_twice_counts_it_once(queue: JobQueue) -> None:
    """A start whose reply was lost and is sent again (redis-py retries after a dropped
    connection), or a re-read of our own pending entry, is the same delivery; a new process
    under the same name starting it is a new one."""
    job_id, _ = await queue.submit(make_request())
    c = Consumer(queue, "host-a")
    [d] = await c.fetch(count=1, block_ms=100)
    assert await c.start(d) and await c.start(d)
    state = await queue.state(job_id)
    assert state is not None and state.deliveries == 1
    await queue.redis.delete(queue.keys.heartbeat("host-a"))  # the process died; its lease ended
    restarted = Consumer(queue, "host-a")
    [again] = await restarted.fetch(count=1, block_ms=100)
    assert await restarted.start(again)
    state = await queue.state(job_id)
    assert state is not None and state.deliveries == 2


def test_every_script_binds_its_keys_and_arguments_to_named_locals_at_its_top() -> None:
    """KEYS[n] / ARGV[n] only in ``local name = ...`` lines before the script's first step, so
    a reader never meets a positional index in the logic (the per-item slices of store.lua
    are taken with unpack, by named counts)."""
    import dataclasses
    import itertools
    import re
    from importlib import resources

    from actgen_shared.scripts import PRELUDE, Scripts, lua

    folder = resources.files("actgen_shared").joinpath("lua")
    names = sorted(p.name.removesuffix(".lua") for p in folder.iterdir() if p.name.endswith(".lua"))
    assert set(names) - {PRELUDE} == {f.name for f in dataclasses.fields(Scripts)}
    named = r"local \w+ = (tonumber\()?(KEYS|ARGV)\[\d+\]\)?( == '1')?"
    for name in names:
        if name == PRELUDE:
            continue
        source = lua(name).split("\n")
        lines = [line for line in source if line.strip() and not line.lstrip().startswith("--")]
        body = lines[next(i for i, line in enumerate(lines) if "KEYS[" in line or "ARGV[" in line) :]
        header = list(itertools.takewhile(lambda line: re.fullmatch(named, line) is not None, body))
        assert header, name
        rest = "\n".join(body[len(header) :])
        assert not re.search(r"(KEYS|ARGV)\[", rest), f"{name}.lua indexes KEYS/ARGV past its header"
