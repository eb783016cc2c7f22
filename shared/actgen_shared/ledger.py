"""A run's ledger of jobs (docs/architecture.md 10): what was posted, what is still out, what was
lost, and the per-epoch tally the run logs and keeps as ``history``.

The ledger is plain data, identical on every rank, and all a checkpoint needs to resume the link
(the trainer's checkpoint State extends it). A job is *pending* while some of its images have
not arrived; it leaves the pending set when they all have, when the generator says it ended
(done, failed, cancelled), or when the generator no longer knows it (404: a replica restarted
without its Redis, or the job expired), which counts it as *lost*: the run goes on without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from actgen_shared.schemas import START_CURSOR
from actgen_shared.seeds import derive_seed

# an image is late when it first trains later than the epoch after the one after its post
# (as actgen_trainer.report.delivery_counts: on time = first trained on by epoch e + 2)
ON_TIME_EPOCHS = 2


@dataclass
class RunLedger:
    """A run's bookkeeping, identical on every rank, all a checkpoint needs to resume the link."""

    run_id: str
    cursor: str = START_CURSOR  # results folded up to here (a stream id)
    # job -> epoch / items / folded / rank: jobs whose items have not all arrived
    pending: dict[str, dict[str, int]] = field(default_factory=dict)
    # every job posted, in order; a lost one carries "lost" (why) and "lost_items"
    jobs: list[dict[str, Any]] = field(default_factory=list)
    classifiers: list[str] = field(default_factory=list)  # uploaded refs not yet deleted
    arrived: int = 0  # images taken in, all epochs
    late: int = 0  # of those, first trained on after epoch (posted) + ON_TIME_EPOCHS
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (EpochTally)


@dataclass(frozen=True)
class Arrival:
    """One generated image that arrived, with its provenance."""

    stream_id: str  # the results-stream id: unique, so nothing is taken twice
    job_id: str
    index: int  # the item's index within its job
    epoch: int  # the epoch whose hard samples guided it
    class_id: int
    guide_id: str | None
    first_epoch: int | None  # the first epoch to train on it (refresh's ``epoch``)
    image: np.ndarray = field(repr=False)  # H x W x 3 uint8


class ImageSink(Protocol):
    """Where arrived images go: the default is an in-memory :class:`~actgen_shared.arrived.ArrivedImages`;
    the trainer's writes them to its run folder."""

    def __contains__(self, stream_id: object) -> bool: ...

    def add(self, arrival: Arrival) -> bool:
        """Keep it; False when this stream id is already kept."""
        ...


@dataclass
class Submission:
    """What one :meth:`ActGenRun.submit` did."""

    jobs: list[tuple[str, int]]  # this rank's (job id, items)
    posted: int  # items posted by all ranks together
    classifier_ref: str | None = None
    skipped: bool = False  # this rank had max_inflight jobs out: it posted nothing
    folded: int = 0  # images taken in before deciding to skip (see max_inflight)
    error: str | None = None  # why this rank posted nothing though it had items (generator away)
    adv_prob: float = 0.0  # the adversarial chance the jobs ran with (the schedule's, or the options')
    capped: int = 0  # hard samples left out by the budget (images_per_epoch / budget)


def stream_key(stream_id: str) -> tuple[int, int]:
    """A Redis stream id as a sortable pair."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def idempotency_key(run_id: str, epoch: int, rank: int) -> str:
    """One job per (run, epoch, rank): a resumed loop that re-posts gets the same job."""
    return f"{run_id}:epoch{epoch}:rank{rank}"


def job_seed(seed: int, epoch: int, rank: int) -> int:
    """The noise seed of one job: a hash of (run seed, epoch, rank), so no two jobs share one."""
    return derive_seed(seed, epoch, rank)


def record_jobs(
    ledger: RunLedger, per_rank: list[list[tuple[str, int]]], epoch: int, ref: str | None, now: float
) -> None:
    """Enter the jobs every rank posted for ``epoch`` (a re-post after a resume is the same job)."""
    known = {j["job_id"] for j in ledger.jobs}
    for r, rank_jobs in enumerate(per_rank):
        for job_id, count in rank_jobs:
            if job_id in known:
                continue
            ledger.pending[job_id] = {"epoch": epoch, "items": count, "folded": 0, "rank": r}
            ledger.jobs.append(
                {
                    "job_id": job_id,
                    "epoch": epoch,
                    "items": count,
                    "rank": r,
                    "classifier_ref": ref,
                    "posted_at": now,
                }
            )


def record_arrival(ledger: RunLedger, job_id: str, job_epoch: int, first_epoch: int | None) -> None:
    """One image taken in: the job's count, and the run's arrived and late tallies."""
    ledger.arrived += 1
    if first_epoch is not None and first_epoch > job_epoch + ON_TIME_EPOCHS:
        ledger.late += 1
    job = ledger.pending.get(job_id)
    if job is not None:
        job["folded"] += 1
        if job["folded"] >= job["items"]:
            del ledger.pending[job_id]


def lose(ledger: RunLedger, job_id: str, why: str, log: logging.Logger | None) -> None:
    """Count a pending job as lost (the generator no longer has it), logging it once with its ids."""
    job = ledger.pending.pop(job_id, None)
    if job is None:
        return
    missing = job["items"] - job["folded"]
    for entry in ledger.jobs:
        if entry["job_id"] == job_id:
            entry["lost"], entry["lost_items"] = why, missing
    if log is not None:
        log.warning(
            "job %s of run %s (epoch %d, rank %d) is lost: %s; %d of its %d images never arrived, "
            "the run goes on without them",
            job_id,
            ledger.run_id,
            job["epoch"],
            job.get("rank", 0),
            why,
            missing,
            job["items"],
        )


def lost_items(ledger: RunLedger) -> int:
    """Images of lost jobs that never arrived, all epochs."""
    return sum(int(j.get("lost_items", 0)) for j in ledger.jobs if j.get("lost"))


class EpochTally:
    """The per-epoch line and ``history`` row: what was posted, arrived, late, lost, still out.

    A row covers one epoch as the loop saw it: from the run's first call naming the epoch (its
    refresh) to the first call naming the next one, so it includes that epoch's submit. Each row:
    ``epoch``; ``posted``, ``arrived``, ``late``, ``lost``: images in that span; ``in_flight``:
    images still out at its end; ``arrived_total``: every image taken in so far.
    """

    def __init__(self, ledger: RunLedger, log: logging.Logger, main: bool) -> None:
        self.ledger, self.log, self.main = ledger, log, main
        self.open: int | None = None
        self._start = self._totals()

    def _totals(self) -> dict[str, int]:
        s = self.ledger
        return {
            "posted": sum(int(j["items"]) for j in s.jobs),
            "arrived": s.arrived,
            "late": s.late,
            "lost": lost_items(s),
        }

    def at(self, epoch: int | None) -> None:
        """A call names ``epoch``: close the row of the epoch before when it is a new one."""
        if epoch is None or epoch == self.open:
            return
        self.close()
        self.open = epoch

    def close(self) -> None:
        """End the open epoch's row: log its line (rank 0) and keep it in ``history``."""
        if self.open is None:
            return
        now = self._totals()
        row: dict[str, Any] = {"epoch": self.open}
        row.update({k: now[k] - self._start[k] for k in now})
        row["in_flight"] = sum(j["items"] - j["folded"] for j in self.ledger.pending.values())
        row["arrived_total"] = now["arrived"]
        self._start, self.open = now, None
        self.ledger.history.append(row)
        if self.main:
            self.log.info(
                "epoch %d: posted %d, arrived %d (%d late), lost %d, in flight %d; %d generated images in all",
                row["epoch"],
                row["posted"],
                row["arrived"],
                row["late"],
                row["lost"],
                row["in_flight"],
                row["arrived_total"],
            )
