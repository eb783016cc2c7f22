"""``ACTGEN_OVERLAP_ENCODE`` (issue 26, docs/architecture.md 4.5): a batch's PNGs and latents are encoded
and stored while the next batch samples, with nothing else changed.

* On and off, real replicas (uvicorn, the worker, Redis, the shipped digits model) run the same
  queued jobs (multi-batch jobs of three modes; one reads the live memory bank the others write, so
  its batches wait for the stage) and store the same bytes (PNG, latents) in the same order.
* A replica stopped (SIGTERM) while a batch's encode is in flight (tests/slow_encode_replica.py
  holds it there) stores that batch before it releases its jobs; another replica finishes them:
  every item stored exactly once, none lost.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from service_helpers import job_body, key_prefix_for, new_run_id, replica, wait_until

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.schemas import JobStatus
from actgen_shared.settings import Settings

pytestmark = pytest.mark.slow
WAIT_S = 180.0
BATCH = "2"  # ACTGEN_MAX_BATCH: every job below spans several batches
SLOW_SCRIPT = Path(__file__).with_name("slow_encode_replica.py")


class SlowEncodeReplica(GeneratorProcess):
    """A replica process started from tests/slow_encode_replica.py instead of the package's CLI."""

    def command(self) -> list[str]:
        return [sys.executable, str(SLOW_SCRIPT), *super().command()[3:]]


def _jobs(run: str) -> list[dict[str, Any]]:
    """Three jobs of three kinds, none compatible with another (each batch is one job's). The aig
    job's last batch (its item 2) is of class 0, which the actgen job's first batch reads from the
    bank they share: that batch must wait for the stage to store it."""
    bank = {"memory_bank_key": f"{run}-bank"}
    writes = job_body(run, n_items=3, mode="aig", seed=3, **bank)
    writes["items"][2]["class_id"] = 0
    return [
        writes,
        # every bank entry within the hinge (rho 1e6): each one moves the embedding
        job_body(
            run,
            n_items=4,
            mode="actgen",
            seed=4,
            options={"adv_prob": 0.0, "contrastive_margin": 1e6},
            **bank,
        ),
        job_body(run, n_items=3, mode="random", seed=5),
    ]


def _run_all(redis_url: str, overlap: str, marks: Path) -> list[tuple[int, int, str, bytes]]:
    """Queue the jobs through an API-only replica, then let one worker replica run them all:
    the results stream in order, as (job position, item index, PNG base64, latent bytes).

    The worker's encodes take 0.5 s more (tests/slow_encode_replica.py): a batch that read the
    bank before the stage stored what it writes there would see less of it, and sample otherwise."""
    with key_prefix_for(redis_url) as prefix:
        run = new_run_id()
        with replica(redis_url, prefix, None, extra_args=["--no-worker"]) as api:
            with GeneratorClient(api.url) as client:
                job_ids = [client.submit(body).job_id for body in _jobs(run)]
        env = {
            "ACTGEN_KEY_PREFIX": prefix,
            "ACTGEN_MAX_BATCH": BATCH,
            "ACTGEN_OVERLAP_ENCODE": overlap,
            "SLOW_ENCODE_DIR": str(marks),
            "SLOW_ENCODE_S": "0.5",
        }
        with SlowEncodeReplica(redis_url=redis_url, env=env) as worker:
            with GeneratorClient(worker.url) as client:
                for job_id in job_ids:
                    assert client.wait(job_id, timeout_s=WAIT_S).status is JobStatus.done
                items = client.results(run, limit=100).items
        direct = redis.Redis.from_url(redis_url)
        try:
            return [
                (job_ids.index(item.job_id), item.index, item.image, direct.get(item.latent_key or "") or b"")
                for item in items
            ]
        finally:
            direct.close()


def test_the_same_bytes_in_the_same_order_with_and_without_the_overlap(
    redis_url: str, tmp_path: Path
) -> None:
    off = _run_all(redis_url, "0", tmp_path)
    assert not any(tmp_path.iterdir())  # off: no encode stage
    on = _run_all(redis_url, "1", tmp_path)
    assert len(list(tmp_path.iterdir())) == 6  # on: every batch (2 + 2 + 2) through the stage
    assert len(off) == 10 and all(latent for *_, latent in off)
    assert [(j, k) for j, k, *_ in on] == [(j, k) for j, k, *_ in off]  # the same order
    for a, b in zip(off, on, strict=True):
        assert a[2] == b[2], f"job {a[0]} item {a[1]}: another PNG"
        assert a[3] == b[3], f"job {a[0]} item {a[1]}: another latent"


def test_a_replica_stopped_while_an_encode_is_in_flight_stores_it_and_loses_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    with key_prefix_for(redis_url) as prefix:
        run = new_run_id()
        env = {
            "ACTGEN_KEY_PREFIX": prefix,
            "ACTGEN_REPLICA_ID": "stops",
            "ACTGEN_MAX_BATCH": BATCH,
            "ACTGEN_OVERLAP_ENCODE": "1",
            "ACTGEN_LEASE_S": "60",  # a release, not a lease expiry, must hand the job back
            "SLOW_ENCODE_DIR": str(marks),
            "SLOW_ENCODE_S": "3",
        }
        first = SlowEncodeReplica(redis_url=redis_url, env=env).start()
        try:
            with GeneratorClient(first.url) as client:
                job_id = client.submit(job_body(run, n_items=6, mode="aig", seed=7)).job_id
            wait_until(lambda: any(marks.iterdir()), "a batch's encode to start", WAIT_S)
            in_flight = {int(k) for k in next(marks.iterdir()).name.split("-")[1:]}
            time.sleep(0.2)  # into the encode's wait
            assert first.terminate(timeout_s=60) == 0, first.log_tail()
        finally:
            first.stop()
        keys = Settings(key_prefix=prefix).keys
        direct = redis.Redis.from_url(redis_url)
        try:
            assert direct.hget(keys.job(job_id), "status") == b"queued"  # handed back, not lost
            done_by_first = {int(k) for k in direct.hkeys(keys.job_done_items(job_id))}
        finally:
            direct.close()
        assert in_flight == {0, 1} and in_flight <= done_by_first  # the batch in the stage was stored
        assert len(done_by_first) < 6
        with replica(redis_url, prefix, "finishes") as second:
            with GeneratorClient(second.url) as client:
                state = client.wait(job_id, timeout_s=WAIT_S)
                assert state.status is JobStatus.done and state.replica == "finishes"
                items = client.results(run, limit=100).items
        assert sorted(item.index for item in items) == list(range(6))  # each item exactly once
