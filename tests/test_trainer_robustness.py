"""A run rides out a slow generator, a stopped generator, a timed-out --sync wait and the item cap.

Real parts only: a real redis-server and real generator replicas (random-weight tiny model) on
loopback. The module's replica caps jobs at 3 items (ACTGEN_MAX_ITEMS_PER_JOB) so an epoch of 5
is split; a second replica on a fixed port is stopped and started again under a running trainer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import key_prefix_for
from trainer_helpers import small_config

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_trainer.loop import Trainer

ITEM_CAP = 3
SLOW_STEPS = 100  # about 15 s per 2-item job on the tiny model: far slower than a 0.5 s epoch


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    with key_prefix_for(redis_url) as p:
        yield p


@pytest.fixture(scope="module")
def generator(redis_url: str, prefix: str) -> Iterator[GeneratorProcess]:
    env = {
        "ACTGEN_KEY_PREFIX": prefix,
        "ACTGEN_MAX_ITEMS_PER_JOB": str(ITEM_CAP),
        "OMP_NUM_THREADS": "1",
    }  # the trainer runs beside it on the shared cores
    with GeneratorProcess(redis_url=redis_url, env=env) as proc:
        yield proc


@pytest.fixture
def client(generator: GeneratorProcess) -> Iterator[GeneratorClient]:
    with GeneratorClient(generator.url, timeout_s=60) as c:
        yield c


def _wait_final(client: GeneratorClient, job_ids: list[str], timeout_s: float = 60) -> dict[str, str]:
    """Poll until every job is final (the run cancels what it leaves behind)."""
    deadline = time.monotonic() + timeout_s
    out: dict[str, str] = {}
    for job_id in job_ids:
        state = client.wait(job_id, timeout_s=max(1.0, deadline - time.monotonic()))
        out[job_id] = state.status.value
    return out


def test_slow_generator_keeps_max_inflight_ends_on_time_and_counts_every_image(
    tmp_path: Path, client: GeneratorClient, one_torch_thread: None
) -> None:
    final_wait = 2.0
    cfg = small_config(
        tmp_path,
        "generation.max_inflight=1",
        f"generation.final_wait_s={final_wait}",
        f"generation.options.num_inference_steps={SLOW_STEPS}",
    )
    trainer = Trainer(cfg, client=client, progress=False)
    started = time.monotonic()
    summary = trainer.run()
    wall = time.monotonic() - started
    rows = trainer.state.metrics
    jobs = trainer.state.jobs

    # never more than max_inflight jobs out; the epochs that would exceed it posted nothing
    assert all(r["pending_jobs"] <= 1 for r in rows)
    skipped = sum(r.get("skipped_backpressure", 0) for r in rows)
    assert skipped >= 1
    assert len(jobs) + skipped == cfg.generation_epochs == 2
    # the wait for the jobs still out (one epoch after mid-training) is bounded
    assert cfg.final_wait_epoch == 3 and "seconds_final_wait" not in rows[2]
    assert rows[3]["seconds_final_wait"] <= final_wait + 3.0
    assert wall < sum(r["seconds_train"] + r["seconds_eval"] for r in rows) + final_wait + 30
    # every image asked for is counted once: on time, late or never
    d = summary.delivery
    assert d["asked"] == 2 * len(jobs) == d["on_time"] + d["late"] + d["never"]
    assert d["on_time"] + d["late"] == len(trainer.generated)
    assert d["skipped_backpressure"] == skipped
    assert f"asked {d['asked']}" in summary.line()
    page = summary.report.read_text()
    assert "images asked for" in page and "never arrived" in page
    # what was still out at the end was cancelled, so the generator is free again
    statuses = _wait_final(client, [j["job_id"] for j in jobs])
    assert set(statuses.values()) <= {"done", "cancelled"}


def test_sync_wait_that_times_out_skips_the_job_and_the_run_goes_on(
    tmp_path: Path, client: GeneratorClient, one_torch_thread: None
) -> None:
    cfg = small_config(
        tmp_path,
        "generation.sync=true",
        "generation.wait_timeout_s=0.5",
        "generation.final_wait_s=0.5",
        f"generation.options.num_inference_steps={SLOW_STEPS}",
    )
    trainer = Trainer(cfg, client=client, progress=False)
    summary = trainer.run()
    rows = trainer.state.metrics
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["wait_timeouts"] for r in rows[:2]] == [1, 1]
    assert summary.delivery["wait_timeouts"] == 2
    statuses = _wait_final(client, [j["job_id"] for j in trainer.state.jobs])
    assert set(statuses.values()) <= {"done", "cancelled"}


def test_an_epoch_above_the_item_cap_is_split_into_several_jobs(
    tmp_path: Path, client: GeneratorClient
) -> None:
    cfg = small_config(tmp_path, "train.epochs=2", "generation.sync=true", "generation.images_per_epoch=5")
    trainer = Trainer(cfg, client=client, progress=False)
    assert trainer._item_cap == ITEM_CAP  # /v1/info says the cap: jobs are split before posting
    trainer._item_cap = None  # as with a generator that does not say it: learnt from the 422
    summary = trainer.run()
    jobs = trainer.state.jobs
    assert [j["items"] for j in jobs] == [3, 2] and {j["epoch"] for j in jobs} == {0}
    assert trainer._item_cap == ITEM_CAP  # learnt from the 422, which names the cap
    assert summary.delivery == {
        "asked": 5,
        "on_time": 5,
        "late": 0,
        "never": 0,
        "skipped_backpressure": 0,
        "wait_timeouts": 0,
    }
    assert sorted(r.job_id for r in trainer.generated.records) == sorted(
        [jobs[0]["job_id"]] * 3 + [jobs[1]["job_id"]] * 2
    )


class _Seen(logging.Handler):
    """Sets an event when the trainer logs a message containing ``needle``."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.WARNING)
        self.needle = needle
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


def _run_across_a_restart(trainer: Trainer, replica: GeneratorProcess, needle: str) -> None:
    """Stop the replica, run the trainer, start the replica again once the trainer retries."""
    seen = _Seen(needle)
    logger = logging.getLogger("actgen_trainer")
    logger.addHandler(seen)
    replica.terminate()
    restarted: list[BaseException] = []

    def restart() -> None:
        try:
            assert seen.event.wait(timeout=120), f"the trainer never logged {needle!r}"
            replica.start()
        except BaseException as exc:  # surfaced in the test thread
            restarted.append(exc)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        trainer.run()
    finally:
        logger.removeHandler(seen)
        thread.join(timeout=180)
    assert not restarted, restarted
    assert seen.event.is_set()


def test_submit_and_classifier_upload_ride_out_a_stopped_generator(
    tmp_path: Path, redis_url: str, prefix: str, one_torch_thread: None
) -> None:
    retries = [
        "generation.sync=true",
        "generation.retries=200",
        "generation.retry_backoff_s=0.1",
        "generation.retry_backoff_max_s=0.5",
    ]
    replica = GeneratorProcess(redis_url=redis_url, env={"ACTGEN_KEY_PREFIX": prefix, "OMP_NUM_THREADS": "1"})
    replica.start()
    try:
        with GeneratorClient(replica.url, timeout_s=60) as client:
            cfg = small_config(tmp_path, *retries)
            # epoch 0 (adv_prob 0, no classifier): the submit is what meets the stopped replica
            first = Trainer(cfg, client=client, progress=False, stop_after_epoch=0)
            _run_across_a_restart(first, replica, "submit failed")
            assert [j["epoch"] for j in first.state.jobs] == [0]
            assert "post_error" not in first.state.metrics[0]
            # epoch 1 (adv_prob 0.125): the classifier upload meets it first
            second = Trainer(cfg, client=client, progress=False, resume=True)
            _run_across_a_restart(second, replica, "classifier upload failed")
            jobs = second.state.jobs
            assert [j["epoch"] for j in jobs] == [0, 1] and jobs[1]["classifier_ref"]
            assert all("post_error" not in r for r in second.state.metrics)
            assert len(second.generated) == 4  # nothing lost to the restarts
    finally:
        replica.stop()
