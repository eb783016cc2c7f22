"""The worker loop of a replica: Redis stream -> batches -> sampler -> stored results.

It runs as a task in the API's event loop; the sampler call itself runs in a thread
(``asyncio.to_thread``) so the API keeps answering while the model works (a sampler without a
model that says so, ``Sampler.inline``, runs a batch of a few small images on the loop: that is
cheaper than the hop to a thread). The heartbeat runs in a thread of its own with its own Redis
connection (:class:`actgen_shared.queue.Heartbeat`), so neither a stalled event loop nor a long
batch lets the lease lapse.

* Fetch jobs (own pending entries first after a restart and every ``pending_rescan_s``, then
  those of dead consumers, then new ones) and start them in the same step (one Lua call a job),
  skip items already stored by an earlier delivery. A fetched delivery is held in ``admitting``
  until it is active here: a Redis error meanwhile leaves it there to be retried, never forgotten.
* A job another consumer took from us (our lease lapsed: the process was paused, say) is
  dropped at the next step; only the owner of an entry can finish its job.
* Batch pending items of compatible jobs, up to ``settings.max_batch``, into one sampler
  call (batch.py: which items share a batch, and the thread work of one). Each item contrasts
  with its own job's memory bank, read when its batch starts (the bank is live).
* After every step: progress into the job hash and the cancel flag checked (without making
  the sampler wait on Redis); a cancelled job stops at the next step.
* Store each batch's items at once (deduplicated in Redis), complete a job when all its
  items are stored (in the same Lua call as its last items), and keep serving. With
  ``settings.overlap_encode`` a sampled batch's PNGs and latents are encoded (in a thread) and
  stored by a task of its own while the next batch samples: one batch at most in that stage, so
  results are stored in batch order and memory stays bounded; its items stay pending (never
  resampled) until stored, a batch that reads a memory bank the stage writes waits for it (the
  bank is live), and the stage is awaited before a batch's failure is handled and before the jobs
  are released on stop (docs/architecture.md 4.5). A batch that
  raises fails no job at once: its jobs run again one by one, so only a job that fails alone is
  failed (with the message); an out-of-memory error (cuBLAS and cuDNN allocation failures too)
  frees what the batch held and halves the batch size instead, and one at a single item is put
  back on the queue (it counts toward ``max_deliveries``). After a run of full batches the size
  doubles again, up to ``settings.max_batch`` (each new out-of-memory error doubles the run).
* An unrecoverable device error (illegal memory access, device-side assert, any other CUDA
  error, a cuDNN/cuBLAS execution or internal error: faults.py) ends the replica: the batch's
  jobs go back on the queue (not using up a delivery: they count as device losses, bounded by
  ``settings.max_device_losses``), the others are released, ``on_fatal`` takes the replica out
  of ready and the process exits, so other replicas take the jobs. No job is failed for it.
* A watchdog bounds each batch (``watchdog_grace_s + steps x watchdog_step_s``): a batch past it
  (a hung kernel raises nothing) is handled as a lost device; the batch runs in a daemon thread,
  so the stuck thread does not keep the process from exiting. The device is synchronised before
  a batch's results are stored, so an asynchronous CUDA error fails the batch that caused it.
* Heartbeat every ``settings.heartbeat_interval_s``, from its own thread. On stop (SIGTERM) the
  running batch is interrupted at the next step and every unfinished job is released.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future

from redis.exceptions import RedisError

from actgen_generator import memory_bank
from actgen_generator.batch import (
    ActiveJob,
    Bank,
    compute_batch,
    encode_batch,
    free_memory,
    next_batch,
    out_of_memory,
    runs_inline,
    sample_batch,
)
from actgen_generator.classifiers import ClassifierCache
from actgen_generator.contract import Cancelled, SampleOutput, Sampler, StepCallback
from actgen_generator.events import log_event
from actgen_generator.faults import BatchHung, device_error, run_in_daemon_thread, synchronize, watchdog_limit
from actgen_generator.metrics import Metrics
from actgen_shared.consumer import Consumer, Delivery, StoredItem
from actgen_shared.keys import tenant_of_job
from actgen_shared.queue import REDIS_DOWN, Heartbeat, JobQueue
from actgen_shared.schemas import ItemResult, JobResult, Mode
from actgen_shared.seeds import derive_seed
from actgen_shared.settings import Settings

FETCH_BLOCK_MS = 500  # how long an idle worker waits on the stream before looking again
ERROR_BACKOFF_S = 0.5
REGROW_AFTER_BATCHES = 4  # full batches at a halved size before it doubles again (doubled at each OOM)
MAX_REGROW_AFTER = 256


def raise_if_outage(exc: RedisError) -> None:
    """What a Redis error means to the worker, decided here once for every call site.

    Down, restarting or timing out (``REDIS_DOWN``) is an outage: it is re-raised, the loop
    backs off and retries with every job kept (nothing is failed for it). Any other Redis error
    (a refused write, a script error) returns, and the caller treats it as that operation's
    failure (failing the job, or logging what was best effort).
    """
    if is_outage(exc):
        raise exc


def is_outage(exc: BaseException) -> bool:
    """Redis down, restarting or timing out: keep every job and retry after a back-off."""
    return isinstance(exc, REDIS_DOWN)


class Worker:
    """Pulls jobs from the queue and runs them on one sampler."""

    def __init__(
        self,
        queue: JobQueue,
        name: str,
        sampler: Sampler,
        settings: Settings,
        metrics: Metrics,
        classifiers: ClassifierCache | None = None,
        heartbeat: Heartbeat | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.queue = queue
        self.name = name
        self.heartbeat = heartbeat  # None: beaten from the loop (in-process tests only)
        self.consumer = Consumer(queue, name, token=heartbeat.token if heartbeat else None)
        self.sampler = sampler
        self.settings = settings
        self.metrics = metrics
        self.classifiers = classifiers
        self.active: dict[str, ActiveJob] = {}
        self._stop = threading.Event()  # set from a signal handler or the loop; read by the sampler thread
        self._abandoned = False
        self._next_touch = 0.0
        self.on_fatal = on_fatal  # called with the reason when the device is lost (the replica ends)
        self.batch_limit = settings.max_batch  # halved after an out-of-memory error
        self._full_batches = 0  # successful batches at the current, reduced, limit
        self._regrow_after = REGROW_AFTER_BATCHES  # doubled at each out-of-memory error after the first
        self._oom_errors = 0
        self._solo: set[str] = set()  # jobs whose shared batch failed: they run alone now
        self._cancelled: set[str] = set()
        self._lost: set[str] = set()  # job ids another consumer took from us during this batch
        self._fresh: set[str] = set()  # started since the last batch
        self._items_per_job = self.settings.max_batch  # of the last job started (none yet: a whole batch)
        self.admitting: dict[str, Delivery] = {}  # entry id -> fetched, not started yet
        self._fetched_at: dict[str, float] = {}  # entry id -> monotonic time it was handed to us
        self.hung = False  # a batch ran past the watchdog: its thread is stuck, the process must exit
        self._stage: asyncio.Task[None] | None = None  # the sampled batch being encoded and stored
        self._stage_banks: set[tuple[str, str]] = set()  # (tenant, bank key) that batch writes

    # --- lifecycle ------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop: the running batch ends at its next step (thread-safe)."""
        self._stop.set()

    def abandon(self) -> None:
        """Stop without handing anything back: another process took our consumer name, so the
        entries pending under it are its own now (thread-safe)."""
        self._abandoned = True
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """The loop; returns after :meth:`request_stop`, with unfinished jobs released."""
        if self.heartbeat is not None:
            self.heartbeat.start()
            heartbeat = None
        else:
            heartbeat = asyncio.create_task(self._heartbeat())
        log_event("worker.started", replica=self.name)
        try:
            while not self.stopping:
                try:
                    await self._round()
                except RedisError as exc:  # an outage (raise_if_outage) or a refusal: wait, retry
                    event = "worker.redis_down" if isinstance(exc, REDIS_DOWN) else "worker.redis_error"
                    log_event(event, replica=self.name, error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(ERROR_BACKOFF_S)
                except Exception as exc:  # a bug: log it and keep serving the other jobs
                    log_event("worker.error", replica=self.name, error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(ERROR_BACKOFF_S)
        finally:
            self._stop.set()
            await self._drain_stage()  # stored, or its items pending still: released with their jobs
            if heartbeat is not None:
                heartbeat.cancel()
            await self._release_all()
            if self.heartbeat is not None:  # no beat may come after stop.lua dropped the key
                await asyncio.to_thread(self.heartbeat.stop)
            if not self._abandoned:  # the name is ours still: give it back
                try:
                    await self.consumer.stop()
                except RedisError as exc:
                    log_event("worker.stop_failed", replica=self.name, error=str(exc))
            log_event("worker.stopped", replica=self.name)

    async def _round(self) -> None:
        """One turn of the batch loop: drop lost jobs, finish, take more, run one batch."""
        self._drop_lost()
        await self._touch_classifiers()
        await self._complete_finished()
        await self._admit_waiting()
        await self._fill()
        if self.active and not self.stopping:
            batch = next_batch(self.active.values(), self._solo, self.batch_limit)
            if batch:
                await self._run_batch(batch)
            else:  # every pending item is in the encode stage: its store is what comes next
                await self._drain_stage()

    async def _release_all(self) -> None:
        if self._abandoned:
            log_event("worker.abandoned", replica=self.name, jobs=len(self.active) + len(self.admitting))
            self.active.clear()
            self.admitting.clear()
            return
        held = [job.delivery for job in self.active.values()] + list(self.admitting.values())
        for delivery in held:
            try:
                await self.consumer.release(delivery)
                log_event("job.released", delivery.job_id, replica=self.name)
            except RedisError as exc:  # outage or not: the job comes back once our lease ends
                log_event("job.release_failed", delivery.job_id, replica=self.name, error=str(exc))
        self.active.clear()
        self.admitting.clear()

    async def _touch_classifiers(self) -> None:
        """Keep the classifiers of running jobs from expiring (at most once a minute)."""
        now = time.monotonic()
        if self.classifiers is None or now < self._next_touch:
            return
        self._next_touch = now + min(60.0, self.settings.classifier_ttl_s / 4)
        by_tenant: dict[str, set[str]] = {}
        for job in self.active.values():
            if job.request.classifier_ref:
                by_tenant.setdefault(tenant_of_job(job.job_id), set()).add(job.request.classifier_ref)
        for tenant, refs in sorted(by_tenant.items()):
            await self.classifiers.store.touch(*sorted(refs), tenant=tenant)

    def _tracked(self) -> dict[str, float]:
        """Entry id -> time it was handed to us, for every delivery this worker holds."""
        entries = [job.delivery.entry_id for job in self.active.values()] + list(self.admitting)
        return {e: self._fetched_at.get(e, time.monotonic()) for e in entries}

    def _drop_lost(self) -> set[str]:
        """Forget the deliveries another consumer has taken from us (our lease lapsed while this
        process was paused): they are its jobs now. Returns their job ids."""
        if self.heartbeat is None:
            return set()
        lost = self.heartbeat.lost(self._tracked())
        job_ids = set()
        for job in [j for j in self.active.values() if j.delivery.entry_id in lost]:
            self.active.pop(job.job_id, None)
            job_ids.add(job.job_id)
        for entry_id in [e for e in self.admitting if e in lost]:
            job_ids.add(self.admitting.pop(entry_id).job_id)
        for entry_id in lost:
            self._fetched_at.pop(entry_id, None)
        for job_id in job_ids:
            self.metrics.job_events.labels("lost").inc()
            log_event(
                "job.lost",
                job_id,
                replica=self.name,
                reason="another consumer took it after our lease lapsed",
            )
        return job_ids

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.consumer.heartbeat()
            except RedisError as exc:  # beat again next time; the lease outlasts a few misses
                log_event("worker.heartbeat_failed", replica=self.name, error=str(exc))
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    # --- taking jobs ----------------------------------------------------------------------
    async def _fill(self) -> None:
        """Take more jobs until a batch of items is pending here or the stream has none waiting.

        fetch counts jobs, a batch counts items: each fetch takes as many jobs as the last job's
        size says fit (one while it is unknown), so a replica fills one batch from small jobs but
        does not hoard big ones that idle replicas could run.
        """
        block_ms = 0 if self.active else FETCH_BLOCK_MS
        while not self.stopping:
            pending = sum(len(job.to_sample) for job in self.active.values()) + len(self.admitting)
            if pending >= self.settings.max_batch:
                return
            jobs = max(1, (self.settings.max_batch - pending) // self._items_per_job)
            deliveries = await self.consumer.fetch(jobs, block_ms, tracked=self._tracked(), start=True)
            now = time.monotonic()
            for delivery in deliveries:  # held from here until active, whatever fails meanwhile
                self.admitting[delivery.entry_id] = delivery
                self._fetched_at[delivery.entry_id] = now
            await self._admit_waiting()
            if len(deliveries) < jobs:
                return  # nothing more waiting (for now)
            block_ms = 0  # what is there already, no waiting for more

    async def _admit_waiting(self) -> None:
        """Admit the fetched deliveries (their round trips at once, activated in fetch order);
        one that meets a Redis outage stays for the next round, and the outage propagates."""
        if self.stopping or not self.admitting:
            return  # run() releases them
        waiting = list(self.admitting.items())
        outcomes = await asyncio.gather(*(self._admit(d) for _, d in waiting), return_exceptions=True)
        error: BaseException | None = None
        for (entry_id, _), outcome in zip(waiting, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                error = error or outcome  # not started yet: stays in ``admitting``, retried
                continue
            self.admitting.pop(entry_id, None)
            if outcome is not None:
                await self._activate(outcome)
        if error is not None:
            raise error  # run() backs off, then retries

    async def _admit(self, delivery: Delivery) -> ActiveJob | None:
        """Mark one delivery running (unless fetch did) and load what it needs; None when it does
        not run here."""
        job_id, request = delivery.job_id, delivery.request
        started = delivery.started or await self.consumer.start(delivery)
        if started is None:
            log_event("job.skipped", job_id, replica=self.name, reason="cancelled or final")
            self._fetched_at.pop(delivery.entry_id, None)
            return None
        try:
            job = ActiveJob(
                delivery=delivery,
                class_names=request.resolved_class_names(),
                # stored by an earlier delivery: not made again
                pending=[k for k in range(len(request.items)) if k not in started.done],
            )
            if request.needs_classifier:
                if self.classifiers is None:
                    raise RuntimeError("this replica has no classifier cache")
                tenant = tenant_of_job(job_id)
                job.classifier = await self.classifiers.get(request.classifier_ref or "", tenant)
                await self.classifiers.store.touch(request.classifier_ref or "", tenant=tenant)  # TTL again
        except RedisError as exc:
            raise_if_outage(exc)  # an outage: not started yet, stays in ``admitting``, retried
            await self._fail([delivery], f"could not start: {type(exc).__name__}: {exc}")
            return None
        except (ValueError, RuntimeError) as exc:  # the classifier does not load (ClassifierError)
            if device_error(exc):  # not the job's fault: the GPU is gone
                await self._device_lost([delivery], f"{type(exc).__name__}: {exc}")
                return None
            await self._fail([delivery], f"could not start: {type(exc).__name__}: {exc}")
            return None
        return job

    async def _activate(self, job: ActiveJob) -> None:
        request = job.request
        log_event(
            "job.started",
            job.job_id,
            replica=self.name,
            run_id=request.run_id,
            items=len(request.items),
            already_done=len(request.items) - len(job.pending),
            delivery=job.delivery.deliveries,
            mode=request.options.mode.value,
        )
        self.metrics.job_events.labels("started").inc()
        self._items_per_job = max(1, len(request.items))
        self.active[job.job_id] = job
        self._fresh.add(job.job_id)
        if not job.pending:  # everything was stored by an earlier delivery
            await self._complete(job)

    async def _batch_failed(self, jobs: list[ActiveJob], batch_items: int, exc: Exception) -> None:
        """A failing job fails alone: jobs that shared the batch run again one by one; an
        out-of-memory error halves the batch (at one item, the job goes back on the queue); a
        lost device ends the replica with its jobs handed back."""
        message = f"{type(exc).__name__}: {exc}"
        if device_error(exc) or isinstance(exc, BatchHung):
            self.hung = self.hung or isinstance(exc, BatchHung)
            await self._device_lost([job.delivery for job in jobs], message)
            return
        if out_of_memory(exc):
            free_memory(exc)  # what the failed batch held, before a smaller one runs
            self._full_batches = 0
            if self._oom_errors:  # it did not fit again: wait longer before the next try
                self._regrow_after = min(MAX_REGROW_AFTER, self._regrow_after * 2)
            self._oom_errors += 1
            if batch_items > 1:
                self.batch_limit = max(1, min(self.batch_limit, batch_items) // 2)
                log_event(
                    "batch.oom",
                    None,
                    replica=self.name,
                    items=batch_items,
                    batch_limit=self.batch_limit,
                    error=message,
                )
                return  # the jobs stay here with their items pending and rerun smaller
            for job in jobs:
                await self.consumer.retry(job.delivery, f"out of memory at batch size 1: {message}")
                self.active.pop(job.job_id, None)
                self._fetched_at.pop(job.delivery.entry_id, None)
                log_event("job.requeued", job.job_id, replica=self.name, error=message)
            return
        if len(jobs) > 1:
            self._solo.update(job.job_id for job in jobs)
            log_event(
                "batch.failed",
                None,
                replica=self.name,
                jobs=[j.job_id for j in jobs],
                error=message,
                next="each job alone",
            )
            return
        self._solo.discard(jobs[0].job_id)
        await self._fail([job.delivery for job in jobs], message)

    async def _device_lost(self, deliveries: list[Delivery], message: str) -> None:
        """The GPU is unusable for this process: hand the jobs that met it back (as device losses,
        not deliveries: a flapping GPU does not dead-letter healthy jobs, but a job that breaks
        every GPU ends in the dead letters after ``max_device_losses``), stop, let the replica end."""
        reason = f"the device failed and this replica cannot use it again: {message}"
        jobs = [d.job_id for d in deliveries]
        log_event("replica.device_lost", None, replica=self.name, jobs=jobs, error=message)
        for delivery in deliveries:
            try:
                await self.consumer.device_lost(delivery, f"device lost on replica {self.name}: {message}")
                log_event("job.requeued", delivery.job_id, replica=self.name, error=message)
            except RedisError as exc:  # taken by another replica once our lease ends
                log_event("job.release_failed", delivery.job_id, replica=self.name, error=str(exc))
            self.active.pop(delivery.job_id, None)
            self._fetched_at.pop(delivery.entry_id, None)
        self.request_stop()  # run() releases the other jobs
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _batch_succeeded(self, items: int) -> None:
        """After an out-of-memory halving: double the batch size again after a run of full batches."""
        if self.batch_limit >= self.settings.max_batch or items < self.batch_limit:
            return
        self._full_batches += 1
        if self._full_batches >= self._regrow_after:
            self._full_batches = 0
            self.batch_limit = min(self.settings.max_batch, self.batch_limit * 2)
            log_event("batch.regrow", None, replica=self.name, batch_limit=self.batch_limit)

    # --- running a batch ------------------------------------------------------------------
    async def _run_batch(self, batch: list[tuple[ActiveJob, int]]) -> None:
        """Run one batch through the sampler (in a thread) and store what it made: at once, or by
        the encode stage while the next batch samples (``settings.overlap_encode``)."""
        jobs = list({id(job): job for job, _ in batch}.values())
        for job in jobs:  # cancelled while waiting here: do not spend a batch on it
            if job.job_id in self._fresh:
                continue  # just started: start() has looked at the cancel flag already
            if job.encoding:
                continue  # items of it are being stored: the batch's first step sees the flag
            if await self.queue.is_cancel_requested(job.job_id):
                await self._cancel(job)
        self._fresh.clear()
        batch = [(job, k) for job, k in batch if job.job_id in self.active]
        if not batch:
            return
        jobs = [job for job in jobs if job.job_id in self.active]
        if self._stage_banks & {bank for job in jobs if (bank := self._bank_read(job))}:
            await self._drain_stage()  # the bank is live: this batch sees the stored latents
        banks = {job.job_id: await self._read_bank(job, [k for j, k in batch if j is job]) for job in jobs}
        self._cancelled = set()
        self._lost = set()
        on_step = self._step_callback([job.job_id for job in jobs], asyncio.get_running_loop())
        inline = runs_inline(self.sampler, batch)
        overlap = self.settings.overlap_encode and not inline
        run = functools.partial(
            sample_batch if overlap else compute_batch,
            self.sampler,
            batch,
            banks,
            on_step,
            self.settings.max_image_side,
        )

        def work() -> list[SampleOutput] | list[tuple[ItemResult, StoredItem]]:
            done = run()
            synchronize()  # an asynchronous CUDA error lands here, on this batch, before anything is stored
            return done

        options = batch[0][0].request.options
        limit = watchdog_limit(
            options.num_inference_steps + options.grad_steps,
            self.settings.watchdog_step_s,
            self.settings.watchdog_grace_s,
        )
        started = time.perf_counter()
        try:
            # a few small images of a sampler without a model: cheaper here than a thread hop
            if inline:
                done = work()
            else:
                done = await run_in_daemon_thread(work, limit, f"batch-{self.name}")
        except Cancelled:
            await self._drain_stage()
            for job in jobs:
                if job.job_id in self._cancelled and job.job_id in self.active:
                    await self._cancel(job)
            return  # stopping: the jobs are released by run(); others stay pending and rerun
        except Exception as exc:  # whatever the sampler raises fails its job (alone), never the loop
            await self._drain_stage()
            await self._batch_failed(jobs, len(batch), exc)
            return
        elapsed = time.perf_counter() - started
        self._batch_succeeded(len(batch))
        self.metrics.batch_size.observe(len(batch))
        self.metrics.record_items(len(batch))
        log_event(
            "batch.done",
            None,
            replica=self.name,
            items=len(batch),
            jobs=[j.job_id for j in jobs],
            seconds=round(elapsed, 4),
        )
        await self._drain_stage()  # one batch at most in the stage: stored in batch order
        if overlap:
            self._start_stage(batch, done)  # type: ignore[arg-type]  # sample_batch's outputs
            return
        results: list[tuple[ItemResult, StoredItem]] = done  # type: ignore[assignment]  # compute_batch's
        self.metrics.record_grad_steps(record for record, _ in results)
        await self._store(batch, results)

    # --- the encode stage -----------------------------------------------------------------
    def _start_stage(self, batch: list[tuple[ActiveJob, int]], outputs: list[SampleOutput]) -> None:
        """Hand a sampled batch to the encode stage (empty: :meth:`_drain_stage` ran); its items
        stay pending, marked ``encoding`` so that no batch samples them again."""
        for job, index in batch:
            job.encoding.add(index)
        self._stage_banks = {
            (tenant_of_job(job.job_id), job.request.memory_bank_key)
            for job, _ in batch
            if job.request.memory_bank_key
        }
        self._stage = asyncio.create_task(self._encode_and_store(batch, outputs))

    async def _encode_and_store(
        self, batch: list[tuple[ActiveJob, int]], outputs: list[SampleOutput]
    ) -> None:
        """The stage: PNGs and latents encoded in a thread, then stored as :meth:`_store` does. It
        raises nothing: a Redis outage leaves the items pending (sampled again, the lease kept by the
        heartbeat), an encoding error is the batch's failure (its jobs run alone, then fail)."""
        jobs = list({id(job): job for job, _ in batch}.values())
        try:
            try:
                done = await asyncio.to_thread(encode_batch, batch, outputs)
            except Exception as exc:  # the batch's own fault (a bad image array), as if the sampler raised
                await self._batch_failed(jobs, len(batch), exc)
                return
            self.metrics.record_grad_steps(record for record, _ in done)
            await self._store(batch, done, complete_others=False)
        except RedisError as exc:  # the round's next call meets the outage too, and backs off
            log_event("batch.store_failed", None, replica=self.name, error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug: logged; the items are pending still and run again
            log_event("worker.error", None, replica=self.name, error=f"{type(exc).__name__}: {exc}")
        finally:
            for job, index in batch:
                job.encoding.discard(index)

    async def _drain_stage(self) -> None:
        """Wait until the batch in the encode stage is stored (or its items are pending again)."""
        stage, self._stage = self._stage, None
        if stage is not None:
            await asyncio.shield(stage)  # a cancelled caller leaves the store to finish
        self._stage_banks = set()

    def _bank_read(self, job: ActiveJob) -> tuple[str, str] | None:
        """(tenant, bank key) of the memory bank a batch of ``job`` reads when it starts, if any."""
        request, options = job.request, job.request.options
        if not (
            options.mode is Mode.actgen
            and request.memory_bank_key
            and options.bank_sample > 0
            and options.grad_steps > 0
        ):
            return None
        return tenant_of_job(job.job_id), request.memory_bank_key

    async def _read_bank(self, job: ActiveJob, indices: list[int]) -> Bank:
        """The job's memory bank for the classes of this batch's items, read now (docs/architecture.md 5.7).

        Read per batch, not per job, so a latent stored a moment ago (by this job's earlier
        batch or by the run's previous job) already counts: the bank is live.
        """
        request, options = job.request, job.request.options
        if self._bank_read(job) is None or not request.memory_bank_key:
            return {}
        return await memory_bank.sample_banks(
            self.queue,
            request.memory_bank_key,
            {request.items[k].class_id for k in indices},
            options.bank_sample,
            seed=derive_seed(options.seed or 0, min(indices)),
            shape=self.sampler.latent_shape(options),
            tenant=tenant_of_job(job.job_id),
        )

    def _step_callback(self, job_ids: list[str], loop: asyncio.AbstractEventLoop) -> StepCallback:
        """on_step for the sampler thread: records step time, posts progress, reads cancels.

        Progress and the cancel check run on the event loop; the sampler never waits for
        them (a step whose update is still in flight skips its own), and a cancel seen by
        step n stops the batch at step n+1.
        """
        last = [time.perf_counter()]
        inflight: list[Future[None] | None] = [None]

        def on_step(step: int, total: int) -> bool:
            now = time.perf_counter()
            self.metrics.step_seconds.observe(now - last[0])
            last[0] = now
            if self._stop.is_set() or self._cancelled or self._lost:
                return False
            future = inflight[0]
            # the last step posts nothing: the batch is stored and its jobs completed next
            if step < total and (future is None or future.done()):
                inflight[0] = asyncio.run_coroutine_threadsafe(self._after_step(job_ids, step, total), loop)
            return True

        return on_step

    async def _after_step(self, job_ids: list[str], step: int, total: int) -> None:
        self._lost |= self._drop_lost() & set(job_ids)  # taken from us: stop the batch
        try:
            for job_id in job_ids:
                if job_id not in self.active:
                    continue
                await self.consumer.progress(job_id, step, total)
                if await self.queue.is_cancel_requested(job_id):
                    self._cancelled.add(job_id)
        except RedisError as exc:  # progress is best effort, outage or not: the batch goes on
            log_event("job.progress_failed", None, replica=self.name, error=str(exc))

    async def _store(
        self,
        batch: list[tuple[ActiveJob, int]],
        done: list[tuple[ItemResult, StoredItem]],
        complete_others: bool = True,
    ) -> None:
        """Store each job's new items (one atomic step per job, the jobs at once; a job whose
        last items these are is completed in that same step), then (``complete_others``; the
        encode stage leaves it to the loop) complete any other job that has all its items."""
        per_job: dict[str, list[tuple[ItemResult, StoredItem]]] = {}
        for (job, _), result in zip(batch, done, strict=True):
            per_job.setdefault(job.job_id, []).append(result)
        stores = [(active, per_job[job_id]) for job_id in per_job if (active := self.active.get(job_id))]
        outcomes = await asyncio.gather(
            *(self._store_job(job, results) for job, results in stores), return_exceptions=True
        )
        outage: BaseException | None = None
        for (job, results), outcome in zip(stores, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if is_outage(outcome):  # the job stays with its items pending, rerun later
                    outage = outage or outcome
                    continue
                if isinstance(outcome, RedisError):
                    await self._fail([job.delivery], f"storing results: {type(outcome).__name__}: {outcome}")
                    continue
                raise outcome
            for record, stored in results:
                job.records[stored.index] = record
            finished = {stored.index for _, stored in results}
            job.pending = [k for k in job.pending if k not in finished]
            if outcome is not None:  # its last items: completed in the same step
                self._completed(job, outcome)
        if outage is not None:
            raise outage
        if complete_others:
            await self._complete_finished()

    async def _store_job(self, job: ActiveJob, results: list[tuple[ItemResult, StoredItem]]) -> bool | None:
        """Store one job's new items; with its last ones, complete it in the same round trip.
        Returns whether this call finished the job, None when the job has items to come."""
        items = [stored for _, stored in results]
        if not set(job.pending) <= {stored.index for stored in items}:
            await self.consumer.store_items(job.delivery, items, self.settings.bank_cap)
            return None
        records = {**job.records, **{stored.index: record for record, stored in results}}
        _, finished = await self.consumer.store_and_complete(
            job.delivery, items, self.settings.bank_cap, self._result(job, records)
        )
        return finished

    async def _complete_finished(self) -> None:
        """Complete every job whose items are all stored (again after a Redis outage cut it short)."""
        finished = [job for job in self.active.values() if not job.pending]
        outcomes = await asyncio.gather(*(self._complete(job) for job in finished), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the others completed; this one is completed again next round

    # --- finishing ------------------------------------------------------------------------
    def _result(self, job: ActiveJob, records: Mapping[int, ItemResult]) -> JobResult:
        """The job's result: each item's record, redrawn for those an earlier delivery stored."""
        request = job.request
        items = [
            records.get(k) or job.record_of(k, self.sampler.native_size, self.sampler.model_defaults)
            for k in range(len(request.items))
        ]
        return JobResult(
            items=items, options=request.options, classifier_ref=request.classifier_ref, replica=self.name
        )

    async def _complete(self, job: ActiveJob) -> None:
        self._completed(job, await self.consumer.complete(job.delivery, self._result(job, job.records)))

    def _completed(self, job: ActiveJob, finished: bool) -> None:
        """Forget a job that is complete (``finished``: this call made it final)."""
        self.active.pop(job.job_id, None)
        self._solo.discard(job.job_id)
        self._fetched_at.pop(job.delivery.entry_id, None)
        self.metrics.job_events.labels("done").inc()
        log_event(
            "job.done",
            job.job_id,
            replica=self.name,
            items=len(job.request.items),
            finished_here=finished,
            seconds=round(time.monotonic() - job.started, 4),
        )

    async def _cancel(self, job: ActiveJob) -> None:
        await self.consumer.mark_cancelled(job.delivery)
        self.active.pop(job.job_id, None)
        self._solo.discard(job.job_id)
        self._fetched_at.pop(job.delivery.entry_id, None)
        self.metrics.job_events.labels("cancelled").inc()
        log_event("job.cancelled", job.job_id, replica=self.name, left=len(job.pending))

    async def _fail(self, deliveries: list[Delivery], error: str) -> None:
        for delivery in deliveries:
            try:
                await self.consumer.fail(delivery, error)
            except RedisError as exc:
                raise_if_outage(exc)  # not recorded as failed: keep the job, not leased to nobody
                log_event("job.fail_failed", delivery.job_id, replica=self.name, error=str(exc))
            self.active.pop(delivery.job_id, None)
            self._solo.discard(delivery.job_id)
            self._fetched_at.pop(delivery.entry_id, None)
            self.metrics.job_events.labels("failed").inc()
            log_event("job.failed", delivery.job_id, replica=self.name, error=error)


__all__ = ["Worker", "raise_if_outage"]
