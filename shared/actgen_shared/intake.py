"""Taking in the images that arrived (docs/architecture.md 10): paging through a run's results
stream after its cursor, the end of jobs (done, failed, cancelled, or lost: gone from the
generator), the bounded final wait, and the replay of a checkpoint's images.

A mixin of :class:`~actgen_shared.run.ActGenRun`, whose attributes it reads. A generator that
restarted without its Redis forgets the run's jobs (404) and its results: the jobs count as lost
(logged once, with their ids), the run goes on, and what did arrive stays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from actgen_shared.client import GeneratorClient, GeneratorError, is_retryable
from actgen_shared.codecs import DecodeError, image_from_b64
from actgen_shared.ledger import Arrival, EpochTally, ImageSink, RunLedger, lose, record_arrival, stream_key
from actgen_shared.ranks import Ranks
from actgen_shared.schemas import START_CURSOR, JobStatus, ResultItem

RESULTS_PAGE = 100
# a request made while a deadline runs gets what is left of it, never less than this
MIN_REQUEST_S = 0.25
GONE = "the generator no longer knows it (404: a replica restarted without its Redis, or it expired)"


class ResultsLost(RuntimeError):
    """The results stream no longer holds images a checkpoint names (they expired)."""


def _gone(exc: BaseException) -> bool:
    """A 404 about a job: the generator does not know it (any more)."""
    return isinstance(exc, GeneratorError) and exc.status == 404 and exc.code != "http_error"


class ResultsIntake:
    """Read the results stream into the run's sink, and end the jobs that will deliver no more."""

    client: GeneratorClient
    ranks: Ranks
    ledger: RunLedger
    log: logging.Logger
    sink: ImageSink
    backoff_s: float
    read_failed: bool
    tally: EpochTally
    _taken: int
    _retry: Callable[..., Any]

    @property
    def run_id(self) -> str:
        return self.ledger.run_id

    def refresh(self, epoch: int | None = None, wait_s: float = 0.0, deadline: float | None = None) -> int:
        """Take in the images that arrived (``epoch``: the first epoch to train on them, kept as
        provenance); returns how many. Collective: rank 0 reads first (long-polling up to
        ``wait_s`` for the first one) and says how far; every rank then takes exactly the images
        up to there, in stream order. Jobs that ended stop counting as unfinished; jobs the
        generator no longer knows count as lost. ``deadline`` (time.monotonic()) bounds rank 0's
        requests."""
        self.tally.at(epoch)
        s = self.ledger
        before = self._taken
        target: str | None = None
        if self.ranks.main:
            try:
                self._read(epoch, until=None, wait_s=wait_s, deadline=deadline)
                self.read_failed = False
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                self.log.warning("epoch %s: could not read results (%s); they fold in later", epoch, exc)
                self.read_failed = True
            target = s.cursor
        target = self.ranks.broadcast(target)
        if not self.ranks.main:
            self._retry(lambda: self._read(epoch, until=target), "read results")
        ended: list[tuple[str, str | None]] = []
        if self.ranks.main and not self.read_failed:
            ended = self._ended_jobs(deadline)
        for job_id, lost in self.ranks.broadcast(ended):
            if lost is None:
                s.pending.pop(job_id, None)
            else:
                lose(s, job_id, lost, self.log if self.ranks.main else None)
        return self._taken - before

    def _timeout(self, deadline: float | None, extra: float = 0.0) -> float | None:
        if deadline is None:
            return None
        return max(deadline - time.monotonic(), MIN_REQUEST_S) + extra

    def _read(
        self, epoch: int | None, until: str | None, wait_s: float = 0.0, deadline: float | None = None
    ) -> None:
        """Page through the results after the cursor (up to ``until``, inclusive, if given)."""
        s = self.ledger
        while until is None or stream_key(s.cursor) < stream_key(until):
            after = s.cursor
            page = self.client.results(
                s.run_id,
                after=after,
                limit=RESULTS_PAGE,
                wait_s=wait_s,
                timeout_s=self._timeout(deadline, 0.25),
            )
            wait_s = 0.0
            for item in page.items:
                if until is not None and stream_key(item.id) > stream_key(until):
                    s.cursor = until
                    return
                self._take(item, epoch)
                s.cursor = item.id
            if until is None or stream_key(page.next) <= stream_key(until):
                s.cursor = page.next  # past entries whose images expired, too
            if page.next == after:  # nothing more in the stream
                if until is not None and stream_key(s.cursor) < stream_key(until):
                    raise ResultsLost(f"results of run {s.run_id} end before {until} (expired?)")
                break
            if deadline is not None and time.monotonic() >= deadline:
                break

    def _arrival(self, item: ResultItem, first_epoch: int | None) -> Arrival:
        try:
            image = image_from_b64(item.image)
        except DecodeError as exc:
            raise DecodeError(f"result {item.id} (job {item.job_id}, item {item.index}): {exc}") from None
        return Arrival(
            stream_id=item.id,
            job_id=item.job_id,
            index=item.index,
            epoch=item.epoch,
            class_id=item.class_id,
            guide_id=item.guide_id,
            first_epoch=first_epoch,
            image=image,
        )

    def _take(self, item: ResultItem, epoch: int | None) -> None:
        if item.id in self.sink or not self.sink.add(self._arrival(item, epoch)):
            return
        self._taken += 1
        record_arrival(self.ledger, item.job_id, item.epoch, epoch)

    def _ended_jobs(self, deadline: float | None = None) -> list[tuple[str, str | None]]:
        """Pending jobs that have ended (rank 0 asks), each with None, or why it is lost.

        A failed or cancelled job will never deliver; a done job's items are all in the
        results stream already (result and ack are one step), so they are taken regardless; a
        job the generator answers 404 for is lost. Network trouble stops the sweep (asked again
        at the next refresh), as does the ``deadline``.
        """
        out: list[tuple[str, str | None]] = []
        for job_id in list(self.ledger.pending):
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                state = self.client.status(job_id, timeout_s=self._timeout(deadline))
            except Exception as exc:
                if _gone(exc):
                    out.append((job_id, GONE))
                    continue
                if not is_retryable(exc):
                    raise
                self.log.warning("could not check pending jobs (%s); asked again later", exc)
                break
            if state.status in (JobStatus.failed, JobStatus.cancelled):  # logged once, by lose()
                out.append((job_id, f"it {state.status.value}: {state.error}"))
            elif state.status is JobStatus.done:
                out.append((job_id, None))
        return out

    def drain(self, timeout_s: float, epoch: int | None = None) -> int:
        """Wait up to ``timeout_s`` (and not longer) for the jobs still out, taking their images
        in; returns how many arrived. Jobs the generator lost are counted as lost. Collective."""
        deadline = time.monotonic() + timeout_s
        taken = 0
        while True:
            left = deadline - time.monotonic() if self.ranks.main else 0.0
            if self.ranks.broadcast(not self.ledger.pending or left <= 0):
                break
            # the long poll ends a quarter second before the deadline: its answer has time to come
            taken += self.refresh(epoch, wait_s=min(max(left - 0.25, 0.0), 2.0), deadline=deadline)
            if self.ranks.main and self.read_failed:  # the generator is away: do not spin
                time.sleep(max(min(self.backoff_s, deadline - time.monotonic()), 0.0))
        if self.ledger.pending:
            self.log.warning(
                "after waiting %.0fs, %d jobs (%d images) are still out; their images fold in if they arrive",
                timeout_s,
                len(self.ledger.pending),
                sum(j["items"] - j["folded"] for j in self.ledger.pending.values()),
            )
        return taken

    def replay(self, until: str, wanted: Mapping[str, int | None]) -> None:
        """Take again, from the start of the stream up to ``until``, the images whose stream ids
        ``wanted`` names (id -> first epoch): a checkpoint's images, on a machine without them.
        The run's bookkeeping is not touched. ResultsLost when one is no longer there."""
        after = START_CURSOR
        while stream_key(after) < stream_key(until):
            page = self._retry(
                partial(self.client.results, self.run_id, after=after, limit=RESULTS_PAGE), "read results"
            )
            for item in page.items:
                if stream_key(item.id) > stream_key(until):
                    break
                if item.id in wanted and item.id not in self.sink:
                    self.sink.add(self._arrival(item, wanted[item.id]))
            if page.next == after:
                break
            after = page.next
        missing = [sid for sid in wanted if sid not in self.sink]
        if missing:
            raise ResultsLost(
                f"the results stream of run {self.run_id} no longer holds {len(missing)} generated "
                f"images of the checkpoint (e.g. {missing[0]}; expired?)"
            )
