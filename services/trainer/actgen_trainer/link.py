"""The trainer's link to the generator: post hard samples, fold finished images in, drop ended
jobs, record their timings, retire classifiers.

Generation is auxiliary: network trouble or a 5xx (``client.is_retryable``) is logged and
training goes on; the results cursor and the stream ids in the generated set's index fold
every finished image exactly once, and per-epoch idempotency keys make a re-posted job the
same job.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from actgen_shared.client import GeneratorError, is_retryable
from actgen_shared.codecs import b64encode, image_from_b64
from actgen_shared.schemas import (
    START_CURSOR,
    ClassifierMeta,
    ClassifierRef,
    GenerationOptions,
    JobAccepted,
    JobItem,
    JobRequest,
    JobState,
    JobStatus,
    Mode,
    ResultsPage,
)
from actgen_shared.seeds import derive_seed
from actgen_trainer.checkpoint import JOBS_NAME, State, _write_jsonl
from actgen_trainer.config import AdvSchedule, Config, Guidance
from actgen_trainer.data import DataError, GeneratedSet, ImageSource, guide_png
from actgen_trainer.distributed import Dist
from actgen_trainer.models import classifier_payload

log = logging.getLogger("actgen_trainer")
T = TypeVar("T")

RESULTS_PAGE = 100


class GeneratorAPI(Protocol):
    """The part of ``actgen_shared.client.GeneratorClient`` the loop uses."""

    def info(self) -> Any: ...

    def upload_classifier(self, weights: bytes, meta: ClassifierMeta) -> ClassifierRef: ...

    def submit(self, request: JobRequest) -> JobAccepted: ...

    def status(self, job_id: str) -> JobState: ...

    def wait(self, job_id: str, timeout_s: float) -> JobState: ...

    def cancel(self, job_id: str) -> JobState: ...

    def results(
        self, run_id: str, after: str = START_CURSOR, limit: int = RESULTS_PAGE, wait_s: float = 0
    ) -> ResultsPage: ...


_CAP_RE = re.compile(r"cap of (\d+)")


def _item_cap_from(exc: Exception) -> int | None:
    """The per-job item cap a 422 names ("... more than the cap of 256 per job"), else None."""
    if isinstance(exc, GeneratorError) and exc.status == 422 and exc.message.startswith("items"):
        found = _CAP_RE.search(exc.message)
        return int(found.group(1)) if found else None
    return None


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class GeneratorUnavailable(RuntimeError):
    """The generator did not answer at start; the message names the URL to check."""


def job_seed(seed: int, epoch: int, rank: int) -> int:
    """The noise seed of one job: a hash of (run seed, epoch, rank), so no two jobs share one."""
    return derive_seed(seed, epoch, rank)


def job_options(cfg: Config, epoch: int) -> dict[str, Any]:
    """The options the loop owns for the job of ``epoch``: mode, guidance and its schedule.

    ``GenerationConfig.schedule`` (``adv_schedule``, else the preset's) ``paper``: adv_prob =
    0.5 e / E. ``authors``: a share r = max(1 - e / (0.5 E - 1),
    0) / 2 of the items is drawn as plain SD and adv_prob = 0.5 - r (the released train.py).
    ``guidance`` picks Table 4's rows: contrastive only (adv_prob 0), adversarial only (no bank
    sample), both, or none (``aig`` mode).
    """
    gen, epochs = cfg.generation, cfg.train.epochs
    mode = cfg.generation.mode.generator_mode
    if mode is None:
        raise ValueError("generation.mode=real posts no jobs")
    if mode is not Mode.actgen:
        return {"mode": mode.value, "adv_prob": 0.0}
    if gen.guidance is Guidance.aig:
        return {"mode": Mode.aig.value, "adv_prob": 0.0}
    out: dict[str, Any] = {"mode": mode.value}
    if gen.schedule is AdvSchedule.authors:
        ramp = 0.5 * epochs - 1
        plain = max(1.0 - epoch / ramp, 0.0) * 0.5 if ramp > 0 else 0.0
        out.update(plain_prob=plain, adv_prob=0.5 - plain)
    else:
        out["adv_prob"] = 0.5 * epoch / epochs
    if gen.guidance is Guidance.contrastive:
        out["adv_prob"] = 0.0
    elif gen.guidance is Guidance.adversarial:
        out["bank_sample"] = 0
    return out


def idempotency_key(run_id: str, epoch: int, rank: int) -> str:
    """One job per (run, epoch, rank): a resumed trainer that re-posts gets the same job."""
    return f"{run_id}:epoch{epoch}:rank{rank}"


class GeneratorLink:
    """The Trainer's calls to the generator. A mixin of :class:`~actgen_trainer.loop.Trainer`,
    whose attributes it reads; the methods marked collective are called by every rank."""

    cfg: Config
    client: GeneratorAPI | None
    dist: Dist
    state: State
    generated: GeneratedSet
    run_dir: Path
    model: torch.nn.Module
    num_classes: int
    classes: list[str]
    train_source: ImageSource
    _item_cap: int | None
    _fold_failed: bool

    def _refetch(self, records: list[dict[str, Any]], state: State) -> None:
        """Rebuild this rank's generated set from the results stream up to the cursor."""
        assert self.client is not None
        wanted = {r["id"]: r for r in records}
        self.generated.restore([])
        after = START_CURSOR
        while True:
            page = self._retry(
                partial(self.client.results, state.run_id, after=after, limit=RESULTS_PAGE), "read results"
            )
            for item in page.items:
                if _stream_key(item.id) > _stream_key(state.cursor):
                    break
                if item.id in wanted:
                    self._add_item(item, wanted[item.id]["folded_before_epoch"])
            after = page.next
            if len(page.items) < RESULTS_PAGE or _stream_key(after) >= _stream_key(state.cursor):
                break
        if [r.id for r in self.generated.records] != [r["id"] for r in records]:
            raise DataError(
                f"rank {self.dist.rank}: the results stream no longer holds every "
                "generated image of the checkpoint (expired?)"
            )

    def _retry(self, call: Callable[[], T], what: str) -> T:
        """``call()`` retried with exponential backoff on 5xx and connection errors."""
        gen = self.cfg.generation
        delay = gen.retry_backoff_s
        for attempt in range(gen.retries + 1):
            try:
                return call()
            except Exception as exc:
                if not is_retryable(exc) or attempt == gen.retries:
                    raise
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1fs", what, exc, attempt + 1, gen.retries, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, gen.retry_backoff_max_s)
        raise AssertionError("unreachable")

    def _inflight(self, rank: int) -> int:
        return sum(1 for job in self.state.pending.values() if job.get("rank", 0) == rank)

    def _wait_sync(self, jobs: list[tuple[str, int]]) -> int:
        """``--sync``: wait for this rank's jobs; one that times out is skipped, not fatal."""
        assert self.client is not None
        timeouts = 0
        for job_id, _ in jobs:
            try:
                final = self.client.wait(job_id, timeout_s=self.cfg.generation.wait_timeout_s)
            except TimeoutError as exc:
                log.warning(
                    "%s: training goes on without waiting for it (its images fold in if they arrive)", exc
                )
                timeouts += 1
                continue
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                log.warning("waiting for job %s failed (%s); training goes on", job_id, exc)
                continue
            if final.status is not JobStatus.done:
                log.warning("job %s ended %s: %s", job_id, final.status.value, final.error)
        return timeouts

    def _classifier_for(self, epoch: int, n_items: int) -> str | None | bool:
        """Rank 0 uploads the current classifier once per epoch when some rank's job needs it.

        Collective. Returns the ref, None when no job needs one, False when the upload failed.
        """
        cfg = self.cfg
        options = {**job_options(cfg, epoch)}
        needed = options["mode"] == Mode.actgen.value and options.get("adv_prob", 0.0) > 0
        wanted = any(self.dist.gather(n_items > 0)) if needed else False
        if not wanted:
            return None
        ref: str | bool = False
        if self.dist.main:
            client = self.client
            assert client is not None
            weights, meta = classifier_payload(self.model, cfg, self.num_classes)
            try:
                ref = self._retry(lambda: client.upload_classifier(weights, meta).ref, "classifier upload")
                self._retire_classifiers(keep=ref)  # earlier epochs' checkpoints: not needed
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                log.warning("epoch %d: classifier upload failed (%s); no job this epoch", epoch, exc)
        return self.dist.broadcast(ref)

    def _known_job(self, job_id: str) -> bool:
        return any(j["job_id"] == job_id for j in self.state.jobs)

    def _post(
        self,
        epoch: int,
        val_idx: np.ndarray,
        chosen: np.ndarray,
        probs: np.ndarray,
        targets: np.ndarray,
        classifier_ref: str | None,
    ) -> list[tuple[str, int]]:
        """Post this rank's hard samples as one job, or several of at most the item cap."""
        assert self.client is not None
        cfg, gen = self.cfg, self.cfg.generation
        guides = self.run_dir / "guides"
        guides.mkdir(exist_ok=True)
        items = []
        for pos in chosen:
            index = int(val_idx[pos])
            guide_id = f"train-{index}"
            png = guide_png(self.train_source.image(index))
            (guides / f"{guide_id}.png").write_bytes(png)
            items.append(
                JobItem(
                    image=b64encode(png),
                    class_id=int(targets[pos]),
                    guide_id=guide_id,
                    confidence=float(np.clip(probs[pos, targets[pos]], 0.0, 1.0)),
                )
            )
        seed = job_seed(cfg.seed, epoch, self.dist.rank)
        options = GenerationOptions.model_validate(
            {**gen.options, **gen.section_options, **job_options(cfg, epoch), "seed": seed}
        )
        names: dict[str, Any] = (
            {"label_set": gen.label_set} if gen.label_set else {"class_names": self.classes}
        )
        key = idempotency_key(self.state.run_id, epoch, self.dist.rank)
        while True:
            cap = self._item_cap or len(items)
            parts = [items[k : k + cap] for k in range(0, len(items), cap)]
            posted: list[tuple[str, int]] = []
            try:
                for k, part in enumerate(parts):
                    request = JobRequest(
                        run_id=self.state.run_id,
                        epoch=epoch,
                        items=part,
                        classifier_ref=classifier_ref,
                        memory_bank_key=self.state.run_id,
                        options=options.model_copy(update={"seed": derive_seed(seed, k)} if k else {}),
                        idempotency_key=key if len(parts) == 1 else f"{key}:part{k}",
                        **names,
                    )
                    accepted = self._retry(partial(self.client.submit, request), "submit")
                    posted.append((accepted.job_id, len(part)))
                    log.info(
                        "epoch %d: posted %d hard samples as job %s%s",
                        epoch,
                        len(part),
                        accepted.job_id,
                        " (already posted)" if accepted.duplicate else "",
                    )
                return posted
            except GeneratorError as exc:
                learnt = _item_cap_from(exc)
                if learnt is None or learnt >= cap:
                    raise
                log.info(
                    "the generator takes at most %d items per job: splitting %d items", learnt, len(items)
                )
                self._item_cap = learnt

    def _end_of_run(self) -> None:
        """The run is over: none of its classifiers is needed, nor (once no job of it is left
        to run) its memory bank. What cannot be deleted now expires on the generator."""
        self._retire_classifiers()
        clear = getattr(self.client, "clear_memory_bank", None)
        if clear is not None and not self.state.pending:
            try:
                clear(self.state.run_id)
            except Exception as exc:
                log.info("memory bank %s left to expire: %s", self.state.run_id, exc)

    def _retire_classifiers(self, keep: str | None = None) -> None:
        """Delete the classifiers this run uploaded before (one per generation epoch, ~94 MB each
        for a CIFAR ResNet-50) except ``keep``. The generator refuses (409) while a job still
        uses one: it stays listed and is tried again after the next upload (or expires)."""
        s = self.state
        if keep is not None and keep not in s.classifiers:
            s.classifiers.append(keep)
        delete = getattr(self.client, "delete_classifier", None)
        if delete is None:
            return
        for ref in [r for r in s.classifiers if r != keep]:
            try:
                delete(ref)
            except Exception as exc:  # in use (409) or unreachable: later
                log.info("classifier %s kept for now: %s", ref, exc)
                continue
            s.classifiers.remove(ref)

    # --- folding ---------------------------------------------------------------------------
    def _fold(self, epoch: int, wait_s: float = 0.0) -> int:
        """Fold the finished items after the cursor; ``epoch`` is the first to train on them.

        Collective. Rank 0 reads first and says how far (a stream id); every rank then folds
        exactly the items up to there, in stream order, into its own folder.
        """
        before = len(self.generated)
        target: str | None = None
        if self.dist.main:
            try:
                self._fold_pages(epoch, until=None, wait_s=wait_s)
                self._fold_failed = False
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                log.warning("epoch %d: could not read results (%s); they fold in later", epoch, exc)
                self._fold_failed = True
            target = self.state.cursor
        target = self.dist.broadcast(target)
        if not self.dist.main:
            self._retry(lambda: self._fold_pages(epoch, until=target), "read results")
        dropped: list[str] = []
        if self.dist.main:
            try:
                dropped = self._ended_jobs()
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                log.warning("could not check pending jobs (%s)", exc)
        for job_id in self.dist.broadcast(dropped):
            self.state.pending.pop(job_id, None)
        return len(self.generated) - before

    def _fold_pages(self, epoch: int, until: str | None, wait_s: float = 0.0) -> None:
        """Page through the results after the cursor (up to ``until``, inclusive, if given)."""
        s = self.state
        assert self.client is not None
        while until is None or _stream_key(s.cursor) < _stream_key(until):
            page = self.client.results(s.run_id, after=s.cursor, limit=RESULTS_PAGE, wait_s=wait_s)
            wait_s = 0.0
            for item in page.items:
                if until is not None and _stream_key(item.id) > _stream_key(until):
                    s.cursor = until
                    return
                self._add_item(item, epoch)
                s.cursor = item.id
            s.cursor = page.next if until is None else s.cursor
            if len(page.items) < RESULTS_PAGE:
                if until is not None and _stream_key(s.cursor) < _stream_key(until):
                    raise DataError(f"results of run {s.run_id} end before {until} (expired?)")
                break

    def _add_item(self, item: Any, epoch: int) -> None:
        s = self.state
        record = self.generated.add(
            stream_id=item.id,
            job_id=item.job_id,
            index=item.index,
            epoch=item.epoch,
            class_id=item.class_id,
            guide_id=item.guide_id,
            image=image_from_b64(item.image),
            folded_before_epoch=epoch,
        )
        if record is None:
            return
        job = s.pending.get(item.job_id)
        if job is not None:
            job["folded"] += 1
            if job["folded"] >= job["items"]:
                del s.pending[item.job_id]

    def _ended_jobs(self) -> list[str]:
        """Pending jobs that have ended (rank 0 asks): they are no longer out.

        A failed or cancelled job will never deliver; a done job's items are all in the
        results stream already (result and ack are one step), so they fold in regardless.
        """
        assert self.client is not None
        out = []
        for job_id in list(self.state.pending):
            state = self.client.status(job_id)
            if state.status in (JobStatus.failed, JobStatus.cancelled):
                log.warning("job %s %s: %s", job_id, state.status.value, state.error)
                out.append(job_id)
            elif state.status is JobStatus.done:
                out.append(job_id)
        return out

    def _final_wait(self, epoch: int) -> int:
        """After the last post (``Config.final_wait_epoch``): wait up to ``final_wait_s`` for the
        jobs still out. Collective."""
        budget = self.cfg.generation.final_wait_s
        deadline = time.monotonic() + budget
        folded = 0
        while True:
            left = deadline - time.monotonic() if self.dist.main else 0.0
            done = self.dist.broadcast(not self.state.pending or left <= 0)
            if done:
                break
            folded += self._fold(epoch, wait_s=min(max(left, 0.0), 2.0))
            if self.dist.main and self._fold_failed:  # the generator is away: do not spin
                time.sleep(min(self.cfg.generation.retry_backoff_s, max(left, 0.0)))
        if self.state.pending:
            log.warning(
                "after waiting %.0fs, %d jobs (%d images) are still out; their images fold in if they arrive",
                budget,
                len(self.state.pending),
                sum(j["items"] - j["folded"] for j in self.state.pending.values()),
            )
        return folded

    # --- the end ---------------------------------------------------------------------------
    def _cancel_leftovers(self) -> None:
        """The run is over: jobs still out would only keep a GPU busy for nothing."""
        if not self.dist.main or self.client is None:
            return
        for job_id in list(self.state.pending):
            try:
                self.client.cancel(job_id)
                log.info("cancelled job %s: the run ended before it finished", job_id)
            except Exception as exc:  # finished meanwhile, or the generator is gone
                log.info("job %s not cancelled: %s", job_id, exc)

    def _record_jobs(self) -> None:
        """Each job's timing from the generator (for the report's throughput), in jobs.jsonl."""
        if not self.dist.main or self.client is None:
            return
        rows = []
        for job in self.state.jobs:
            try:
                st = self.client.status(job["job_id"])
            except Exception as exc:  # the report can live without one job's timing
                log.warning("no status for job %s: %s", job["job_id"], exc)
                rows.append(dict(job))
                continue
            rows.append(
                {
                    **job,
                    "status": st.status.value,
                    "created_at": st.created_at,
                    "started_at": st.started_at,
                    "finished_at": st.finished_at,
                    "replica": st.replica,
                }
            )
        _write_jsonl(self.run_dir / JOBS_NAME, rows)
