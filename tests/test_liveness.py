"""Liveness of a worker on a real redis-server, in-process (docs/architecture.md section 4).

* The heartbeat is beaten from a thread of its own: a worker whose event loop is blocked for
  longer than the lease keeps its job, and the job is computed once.
* No delivery a live worker forgets: a lost reply of the admit-and-start step, or an XREADGROUP
  reply that never reached it, and the job is still done by that worker, in bounded time.

Each worker runs in a thread with its own event loop (as a replica process would), so one can
be stalled while the other keeps fetching. Waits poll with a deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from service_helpers import wait_until

from actgen_generator import worker as worker_module
from actgen_generator.echo import EchoSampler
from actgen_generator.metrics import Metrics
from actgen_generator.worker import Worker
from actgen_shared import codecs
from actgen_shared.queue import Heartbeat, JobQueue, connect, new_token
from actgen_shared.schemas import JobRequest, JobState, JobStatus
from actgen_shared.settings import Settings

T = TypeVar("T")
GUARD_S = 60.0


def _request(run_id: str, n_items: int = 2) -> JobRequest:
    guide = codecs.png_to_b64(np.full((8, 8, 3), 127, dtype=np.uint8))
    return JobRequest.model_validate(
        {
            "run_id": run_id,
            "label_set": "digits",
            "items": [{"image": guide, "class_id": k % 10} for k in range(n_items)],
            "options": {
                "mode": "random",
                "num_inference_steps": 3,
                "grad_steps": 0,
                "height": 64,
                "width": 64,
                "seed": 1,
            },
        }
    )


def _on_queue(settings: Settings, fn: Callable[[JobQueue], Awaitable[T]]) -> T:
    async def main() -> T:
        client = connect(settings.redis_url or "")
        try:
            return await fn(JobQueue(client, settings))
        finally:
            await client.aclose()

    return asyncio.run(main())


def _state(settings: Settings, job_id: str) -> JobState:
    state = _on_queue(settings, lambda q: q.state(job_id))
    assert state is not None
    return state


def _wait(predicate: Callable[[], Any], what: str, timeout_s: float = GUARD_S) -> Any:
    return wait_until(predicate, what, timeout_s)


class SlowEcho(EchoSampler):
    """EchoSampler that takes ``seconds`` per batch (counts its calls)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.items = 0

    def __call__(self, items, options, classifier=None, on_step=None):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)
        self.items += len(items)
        return super().__call__(items, options, classifier=classifier, on_step=on_step)


class WorkerThread:
    """A worker with its own event loop in a thread; ``threaded_heartbeat`` False beats from the loop."""

    def __init__(self, settings: Settings, name: str, sampler: Any, threaded_heartbeat: bool = True) -> None:
        self.settings, self.name, self.sampler = settings, name, sampler
        self.threaded_heartbeat = threaded_heartbeat
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.started_jobs = 0

    async def _main(self) -> None:
        client = connect(self.settings.redis_url or "")
        queue = JobQueue(client, self.settings)
        await queue.ensure_group()
        heartbeat = None
        if self.threaded_heartbeat:
            heartbeat = Heartbeat(
                self.settings.redis_url or "", self.settings, self.name, new_token(self.name)
            )
            heartbeat.claim()
        self.worker = Worker(queue, self.name, self.sampler, self.settings, Metrics(), heartbeat=heartbeat)
        self.loop = asyncio.get_running_loop()
        self._ready.set()
        try:
            await self.worker.run()
        finally:
            await client.aclose()

    def start(self) -> WorkerThread:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def stall(self, seconds: float) -> None:
        """Block this worker's event loop (as a long synchronous call on it would)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.request_stop()
        self._thread.join(timeout=30)


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"lease_s": 1.5, "heartbeat_interval_s": 0.3, "pending_rescan_s": 1.0})


def _stalled_loop_run(settings: Settings, threaded: bool) -> JobState:
    """Worker a takes a job, its event loop stalls for 3 leases, worker b keeps fetching."""
    a = WorkerThread(settings, "stall-a", SlowEcho(1.0), threaded_heartbeat=threaded).start()
    try:
        job_id, _ = _on_queue(settings, lambda q: q.submit(_request("run-stall")))
        _wait(lambda: _state(settings, job_id).status is JobStatus.running, "a to start the job")
        b = WorkerThread(settings, "stall-b", EchoSampler()).start()
        try:
            a.stall(3 * settings.lease_s)
            state = _wait(lambda: (s := _state(settings, job_id)).status is JobStatus.done and s, "done")
        finally:
            b.stop()
    finally:
        a.stop()
    results = _on_queue(settings, lambda q: q.redis.xlen(q.keys.run_results("run-stall")))
    assert results == 2  # each item once in the run's results, however often it was computed
    return state


def test_a_stalled_event_loop_keeps_its_lease_and_its_job(fast: Settings) -> None:
    state = _stalled_loop_run(fast, threaded=True)
    assert state.replica == "stall-a" and state.deliveries == 1
    assert state.result is not None and state.result.replica == "stall-a"


def test_a_heartbeat_on_the_event_loop_would_lapse_in_the_same_stall(fast: Settings) -> None:
    """The same run with the heartbeat beaten from the loop (the old design): b reclaims the job
    and it is computed twice. Shows the test above would catch a regression."""
    state = _stalled_loop_run(fast, threaded=False)
    assert state.deliveries == 2 and state.replica == "stall-b"


def test_a_lost_reply_of_the_admit_and_start_step_counts_the_delivery_once(fast: Settings) -> None:
    """The worker admits and starts a job in one Lua step; here that step runs in Redis but its
    reply is lost (the connection drops). The entry stays with the consumer, the step runs again
    at the next fetch, and finds the delivery started already: it is counted once, not twice."""
    w = WorkerThread(fast, "flaky-start", EchoSampler())
    failures = []
    w.start()
    assert w.worker is not None
    consumer = w.worker.consumer
    real_admit = consumer._admit

    async def lossy_admit(entry_id, job_id, note, start):  # type: ignore[no-untyped-def]
        delivery = await real_admit(entry_id, job_id, note, start)
        if not failures:
            failures.append((job_id, start, delivery is not None and delivery.started is not None))
            raise RedisConnectionError("injected: connection lost before the reply of admit")
        return delivery

    consumer._admit = lossy_admit  # type: ignore[method-assign]
    try:
        job_id, _ = _on_queue(fast, lambda q: q.submit(_request("run-flaky")))
        began = time.monotonic()
        state = _wait(lambda: (s := _state(fast, job_id)).status is JobStatus.done and s, "done", 20)
        took = time.monotonic() - began
    finally:
        w.stop()
    assert failures == [(job_id, True, True)]  # it had started the job when the reply was lost
    assert state.replica == "flaky-start" and state.deliveries == 1
    assert took < 10, f"done {took:.1f}s after submit"


def test_admit_step_failing_keeps_the_entry_for_the_next_fetch(fast: Settings) -> None:
    """The Redis error hits the queue's own admit step (right after XREADGROUP returned)."""
    w = WorkerThread(fast, "flaky-admit", EchoSampler())
    failures = []
    w.start()
    assert w.worker is not None
    consumer = w.worker.consumer
    real_admit = consumer._admit

    async def flaky_admit(entry_id, job_id, note, start):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(job_id)
            raise RedisConnectionError("injected: connection lost after XREADGROUP")
        return await real_admit(entry_id, job_id, note, start)

    consumer._admit = flaky_admit  # type: ignore[method-assign]
    try:
        job_id, _ = _on_queue(fast, lambda q: q.submit(_request("run-flaky-admit")))
        state = _wait(lambda: (s := _state(fast, job_id)).status is JobStatus.done and s, "done", 20)
    finally:
        w.stop()
    assert failures == [job_id] and state.deliveries == 1 and state.replica == "flaky-admit"


def test_a_delivery_whose_reply_was_lost_is_found_by_the_periodic_rescan(fast: Settings) -> None:
    """XREADGROUP handed the entry to our name but the reply never reached us (redis-py retries a
    command after a dropped connection, and the retry finds nothing new): only re-reading our
    own pending list, while we live, finds it."""
    w = WorkerThread(fast, "lost-reply", EchoSampler()).start()
    assert w.worker is not None
    redis_client = w.worker.queue.redis
    real_read = redis_client.xreadgroup
    swallowed: list[object] = []

    async def lossy_read(group, consumer, streams, *args, **kwargs):  # type: ignore[no-untyped-def]
        reply = await real_read(group, consumer, streams, *args, **kwargs)
        if reply and not swallowed and list(streams.values()) == [">"]:
            swallowed.append(reply)
            return []  # delivered by Redis, lost on the way back
        return reply

    redis_client.xreadgroup = lossy_read  # type: ignore[method-assign]
    try:
        job_id, _ = _on_queue(fast, lambda q: q.submit(_request("run-lost-reply")))
        _wait(lambda: swallowed, "the reply to be lost")
        began = time.monotonic()
        state = _wait(lambda: (s := _state(fast, job_id)).status is JobStatus.done and s, "done", 20)
        took = time.monotonic() - began
    finally:
        w.stop()
    assert state.replica == "lost-reply" and state.deliveries == 1
    assert took < 2 * fast.pending_rescan_s + 2, f"found after {took:.1f}s"


class PoisonEcho(EchoSampler):
    """Fails any batch holding an item of class 7 (a bad input, a sampler bug); counts batches."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def __call__(self, items, options, classifier=None, on_step=None):  # type: ignore[no-untyped-def]
        self.batches.append(len(items))
        if any(item.class_id == 7 for item in items):
            raise ValueError("poisoned item of class 7")
        return super().__call__(items, options, classifier=classifier, on_step=on_step)


class SmallMemoryEcho(EchoSampler):
    """Runs out of memory on batches of more than two items, like a GPU at its limit."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def __call__(self, items, options, classifier=None, on_step=None):  # type: ignore[no-untyped-def]
        self.batches.append(len(items))
        if len(items) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().__call__(items, options, classifier=classifier, on_step=on_step)


def _request_classes(run_id: str, classes: list[int]) -> JobRequest:
    request = _request(run_id, n_items=len(classes))
    for item, class_id in zip(request.items, classes, strict=True):
        item.class_id = class_id
    return request


def test_a_failing_job_fails_alone_not_its_batch(fast: Settings) -> None:
    """Three compatible jobs share one batch; one of them holds a bad item. The batch fails, the
    jobs run again one by one, and only the bad one is failed."""
    jobs = {
        name: _on_queue(fast, lambda q, c=classes: q.submit(_request_classes("run-poison", c)))[0]
        for name, classes in {"a": [0, 1], "bad": [7], "c": [2, 3]}.items()
    }
    sampler = PoisonEcho()
    w = WorkerThread(fast, "poison", sampler).start()  # started after the submits: one batch
    try:
        final = {
            name: _wait(
                lambda j=job_id: (s := _state(fast, j)).status in (JobStatus.done, JobStatus.failed) and s,
                f"job {name} to end",
            )
            for name, job_id in jobs.items()
        }
    finally:
        w.stop()
    assert sampler.batches[0] == 5  # all three together first
    assert final["a"].status is JobStatus.done and final["c"].status is JobStatus.done
    assert final["bad"].status is JobStatus.failed and "poisoned item" in (final["bad"].error or "")
    assert all(s.deliveries == 1 for s in final.values())


def test_out_of_memory_halves_the_batch_and_fails_nothing(fast: Settings) -> None:
    job_ids = [_on_queue(fast, lambda q: q.submit(_request("run-oom", n_items=3)))[0] for _ in range(2)]
    sampler = SmallMemoryEcho()
    w = WorkerThread(fast, "oom", sampler).start()
    try:
        states = [
            _wait(lambda j=j: (s := _state(fast, j)).status is JobStatus.done and s, "done") for j in job_ids
        ]
        assert w.worker is not None and w.worker.batch_limit <= 2
    finally:
        w.stop()
    assert sampler.batches[0] == 6 and max(sampler.batches[1:]) <= 3 and sampler.batches[-1] <= 2
    assert all(s.deliveries == 1 for s in states)


class TransientAllocFailure(EchoSampler):
    """cuBLAS cannot allocate its workspace once, in the first batch of more than four items (as
    a GPU near its limit says it); every batch after runs."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def __call__(self, items, options, classifier=None, on_step=None):  # type: ignore[no-untyped-def]
        self.batches.append(len(items))
        if len(items) > 4 and len(self.batches) == 1:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return super().__call__(items, options, classifier=classifier, on_step=on_step)


def test_a_cublas_allocation_failure_halves_the_batch_and_it_grows_back(fast: Settings) -> None:
    """An allocation failure worded by cuBLAS is an out-of-memory error, not a failed job: the
    batch halves, and after a run of full batches at the halved size it doubles back to max_batch."""
    assert fast.max_batch == 8 and worker_module.REGROW_AFTER_BATCHES == 4
    job_ids = [_on_queue(fast, lambda q: q.submit(_request("run-regrow", n_items=8)))[0] for _ in range(4)]
    sampler = TransientAllocFailure()
    w = WorkerThread(fast, "regrow", sampler).start()  # started after the submits: jobs in order
    try:
        states = [_wait(lambda j=j: (s := _state(fast, j)).status.is_final and s, "final") for j in job_ids]
        assert all(s.status is JobStatus.done for s in states), [s.error for s in states]
        assert w.worker is not None and w.worker.batch_limit == 8
    finally:
        w.stop()
    assert sampler.batches == [8, 4, 4, 4, 4, 8, 8]  # failed at 8, four full batches of 4, back at 8
    assert all(s.deliveries == 1 and s.error is None for s in states)


def _pending_per_consumer(settings: Settings) -> dict[str, int]:
    async def read(q: JobQueue) -> dict[str, int]:
        summary = await q.redis.xpending(q.keys.jobs_stream, q.group)
        return {
            str(c["name"], "utf-8") if isinstance(c["name"], bytes) else c["name"]: int(c["pending"])
            for c in summary.get("consumers") or []
        }

    return _on_queue(settings, read)


def test_a_replica_takes_one_batch_of_jobs_not_what_idle_replicas_could_run(fast: Settings) -> None:
    """fetch counts jobs and a batch counts items: with jobs of a whole batch each, a replica
    holds one job while it runs it, and a second replica takes the next one meanwhile (it used
    to take max_batch jobs at once, leaving the others idle with jobs waiting)."""
    settings = fast.model_copy(update={"max_batch": 4})
    job_ids = [
        _on_queue(settings, lambda q, k=k: q.submit(_request(f"run-fair-{k}", n_items=4)))[0]
        for k in range(4)
    ]
    a = WorkerThread(settings, "fair-a", SlowEcho(8.0)).start()
    b: WorkerThread | None = None
    try:
        _wait(lambda: _state(settings, job_ids[0]).status is JobStatus.running, "a to start the first job")
        assert _pending_per_consumer(settings) == {"fair-a": 1}  # a sleeps in its batch: it fetches no more
        b = WorkerThread(settings, "fair-b", SlowEcho(8.0)).start()
        _wait(lambda: _pending_per_consumer(settings).get("fair-b") == 1, "b to take the second job")
        assert _pending_per_consumer(settings) == {"fair-a": 1, "fair-b": 1}
        assert [_state(settings, j).status for j in job_ids[2:]] == [JobStatus.queued] * 2
    finally:
        a.stop()
        if b is not None:
            b.stop()


class ThreadRecordingEcho(EchoSampler):
    """An inline echo that records which thread ran each of its batches."""

    def __init__(self) -> None:
        super().__init__(inline=True)
        self.threads: list[threading.Thread] = []

    def __call__(self, items, options, classifier=None, on_step=None):  # type: ignore[no-untyped-def]
        self.threads.append(threading.current_thread())
        return super().__call__(items, options, classifier=classifier, on_step=on_step)


def test_an_inline_sampler_runs_small_batches_on_the_loop_and_big_ones_in_a_thread(fast: Settings) -> None:
    """A sampler without a model (``inline``) computes a batch of a few small images on the
    worker's event loop, cheaper than a thread hop; a batch of big images still goes to a thread,
    and so does every batch of a sampler that does not say it is inline (its subclasses too)."""
    small = _request("run-inline-small", n_items=1)
    big = _request("run-inline-big", n_items=1)
    big.options.output_size = 512  # 768 KiB of RGB to encode: too much for the event loop
    sampler = ThreadRecordingEcho()
    w = WorkerThread(fast, "inline", sampler).start()
    try:
        for request in (small, big):
            job_id, _ = _on_queue(fast, lambda q, r=request: q.submit(r))
            _wait(lambda j=job_id: _state(fast, j).status is JobStatus.done, "done")
    finally:
        w.stop()
    assert [t is w._thread for t in sampler.threads] == [True, False]
    assert not SlowEcho(0.0).inline and not EchoSampler(inline=True, step_seconds=0.01).inline
