"""A run survives its server (issue 28): a replica restarted mid-run with its embedded Redis forgets
the run's jobs and results; the run counts the jobs it had out as lost (one warning naming them),
trains on what arrived, and goes on; a resumed run and the trainer do the same through the same
code; ``drain`` keeps to its timeout whether the jobs are slow or the generator is down.

Every replica here starts its own embedded Redis (no REDIS_URL), as `actgen-generator serve` does
by default, on a fixed port so the restarted one answers at the same URL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from trainer_helpers import small_config

from actgen_shared.client import GeneratorClient
from actgen_shared.labels import DIGITS
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import free_port
from actgen_shared.run import ActGenRun

FAST = {"mode": "aig", "num_inference_steps": 2, "height": 64, "width": 64, "bank_sample": 8}
SLOW = {**FAST, "num_inference_steps": 400}  # tens of seconds on the tiny model: still out when asked


class Replica:
    """One replica with its own embedded Redis, restartable on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: GeneratorProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = GeneratorProcess(port=self.port, redis_url=None, env={"OMP_NUM_THREADS": "1"}).start()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.stop()  # its embedded Redis goes with it

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def replica(monkeypatch: pytest.MonkeyPatch) -> Iterator[Replica]:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("ACTGEN_API_KEY", raising=False)
    r = Replica()
    r.start()
    yield r
    if r.proc is not None:
        r.proc.stop()


def _lost_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " is lost: " in r.getMessage()]


def test_a_replica_restarted_mid_run_loses_its_jobs_and_the_run_goes_on(
    replica: Replica, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actgen_shared.run")
    guides = torch.rand(2, 3, 16, 16)
    with ActGenRun(classes=DIGITS, url=replica.url, options=FAST, seed=1, epochs=4, backoff_s=0.1) as run:
        run.refresh(0)
        first = run.submit(guides, [1, 2], epoch=0)
        run.wait(first.jobs)
        assert run.refresh(1) == 2
        slow = run.submit(guides, [3, 4], epoch=1, options=SLOW)
        ((slow_job, _),) = slow.jobs
        checkpoint = run.state_dict()  # the loop's checkpoint of epoch 1

        replica.restart()  # the embedded Redis, its jobs and results: gone

        assert run.refresh(2) == 0  # no 404 raised: the job is lost, and said so
        assert run.ledger.pending == {}
        lines = _lost_lines(caplog)
        assert len(lines) == 1 and slow_job in lines[0] and run.run_id in lines[0]
        assert "epoch 1" in lines[0] and "2 of its 2 images never arrived" in lines[0]
        # the run goes on: a new job on the new replica, and its images arrive
        third = run.submit(guides, [5, 6], epoch=2)
        assert third.posted == 2 and third.error is None
        assert run.drain(timeout_s=60, epoch=3) == 2
        assert [a.class_id for a in run.dataset.items] == [1, 2, 5, 6]  # trains on what arrived
        assert run.wait([slow_job]) == 0  # a wait on the lost job does not raise either
        run.refresh(3)
        assert len(_lost_lines(caplog)) == 1  # logged once
    rows = {row["epoch"]: row for row in run.history}
    assert rows[1]["posted"] == 2 and rows[2]["lost"] == 2 and rows[2]["posted"] == 2
    assert rows[3]["arrived"] == 2 and sum(r["arrived"] for r in run.history) == 4
    assert [j.get("lost_items", 0) for j in run.ledger.jobs] == [0, 2, 0]

    # resumed from the checkpoint taken before the restart: its images are gone from the stream,
    # its job is gone from the queue; it says so and goes on
    caplog.clear()
    with ActGenRun(classes=DIGITS, url=replica.url, options=FAST, seed=1, epochs=4) as resumed:
        resumed.load_state_dict(checkpoint)
        assert resumed.dataset is not None and len(resumed.dataset) == 0
        assert any("no longer holds 2 generated images" in r.getMessage() for r in caplog.records)
        resumed.refresh(2)
        assert resumed.ledger.pending == {} and len(_lost_lines(caplog)) == 1
        # epoch 2 was posted (other samples) after the checkpoint: that job stands, nothing is posted
        again = resumed.submit(guides, [7, 8], epoch=2)
        assert again.posted == 0 and again.error is not None and "idempotency_key" in again.error
        assert resumed.submit(guides, [7, 8], epoch=3).posted == 2  # the next epoch posts as usual


def test_drain_keeps_to_its_timeout_with_slow_jobs_and_with_the_generator_down(replica: Replica) -> None:
    with ActGenRun(classes=DIGITS, url=replica.url, options=SLOW, backoff_s=0.2) as run:
        run.submit(torch.rand(2, 3, 16, 16), [0, 1], epoch=0)
        started = time.monotonic()
        run.drain(timeout_s=5)
        assert time.monotonic() - started < 6.0 and run.ledger.pending  # still out, not waited for
        replica.kill()
        started = time.monotonic()
        run.drain(timeout_s=5)
        assert time.monotonic() - started < 6.0
        replica.proc = None


def test_the_trainer_resumed_after_a_restart_counts_its_jobs_lost_and_finishes(
    replica: Replica, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from actgen_trainer.loop import Trainer

    caplog.set_level(logging.INFO)
    slow = ("generation.options.num_inference_steps=400", "generation.mode=aig", "generation.final_wait_s=1")
    with GeneratorClient(replica.url, timeout_s=30) as client:
        first = Trainer(small_config(tmp_path, *slow), client=client, progress=False, stop_after_epoch=0)
        first.run()
        assert len(first.state.pending) == 1
        (job_id,) = first.state.pending
    replica.restart()
    with GeneratorClient(replica.url, timeout_s=30) as client:
        resumed = Trainer(small_config(tmp_path, *slow), client=client, progress=False, resume=True)
        summary = resumed.run()
    assert summary.epochs == 4 and resumed.state.epoch == 4
    lost = [j for j in resumed.state.jobs if j.get("lost")]
    assert [j["job_id"] for j in lost] == [job_id]
    assert len([m for m in _lost_lines(caplog) if job_id in m]) == 1
