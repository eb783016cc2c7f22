"""Replicas that die: two replicas on one Redis, one SIGKILLed mid-batch; and a graceful SIGTERM.

Every job must end ``done`` exactly once: one stored result per item, no duplicate entries in
the run's results stream, whatever was recomputed after the reclaim.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from service_helpers import job_body, key_prefix_for, new_run_id, replica, wait_until

from actgen_shared.client import GeneratorClient
from actgen_shared.keys import CONSUMER_GROUP
from actgen_shared.launcher import GeneratorProcess, GeneratorStartError
from actgen_shared.schemas import JobStatus
from actgen_shared.settings import Settings

pytestmark = pytest.mark.slow
LEASE = {"ACTGEN_LEASE_S": "2", "ACTGEN_HEARTBEAT_S": "0.5", "ACTGEN_MAX_BATCH": "4"}
N_JOBS, N_ITEMS = 20, 1
WAIT_S = 240.0


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    with key_prefix_for(redis_url) as p:
        yield p


def _start_all(*procs: GeneratorProcess) -> None:
    with ThreadPoolExecutor(len(procs)) as pool:
        for future in [pool.submit(p.start) for p in procs]:
            future.result()


def _wait_until(predicate, what: str, timeout_s: float = WAIT_S, every_s: float = 0.05):  # type: ignore[no-untyped-def]
    return wait_until(predicate, what, timeout_s, every_s)


def _replica_id(proc: GeneratorProcess) -> str:
    with GeneratorClient(proc.url) as client:
        return client.info().replica_id


def test_sigkill_mid_batch_every_job_done_exactly_once(redis_url: str, prefix: str) -> None:
    """Two replicas on one host with no ACTGEN_REPLICA_ID: distinct names, so a SIGKILLed one's
    jobs are reclaimed by the other (with one shared name the twin kept the dead one's lease)."""
    victim = replica(redis_url, prefix, None, env=LEASE)
    survivor = replica(redis_url, prefix, None, env=LEASE)
    try:
        _start_all(victim, survivor)
        victim_id, survivor_id = _replica_id(victim), _replica_id(survivor)
        assert victim_id != survivor_id
        run = new_run_id()
        with GeneratorClient(survivor.url) as client:
            job_ids = [
                client.submit(job_body(run, n_items=N_ITEMS, mode="random", steps=3, seed=100 + j)).job_id
                for j in range(N_JOBS)
            ]

            def victim_mid_batch() -> bool:
                states = [client.status(j) for j in job_ids]
                return any(
                    s.replica == victim_id and s.status is JobStatus.running and s.progress.step >= 1
                    for s in states
                )

            _wait_until(victim_mid_batch, "the victim to be mid-batch", every_s=0.01)
            # frozen first, so no job it holds can finish between listing them and the kill
            assert victim.process is not None
            victim.process.send_signal(signal.SIGSTOP)
            held = [
                j
                for j in job_ids
                if (s := client.status(j)).replica == victim_id and s.status is JobStatus.running
            ]
            victim.kill()
            states = {j: client.wait(j, timeout_s=WAIT_S) for j in job_ids}
            page = client.results(run, limit=1000)
    finally:
        victim.kill()
        survivor.stop()
        victim.stop()

    assert held, "the victim held no running job when it was killed"
    assert {s.status for s in states.values()} == {JobStatus.done}
    for job_id in held:  # the victim's jobs were reclaimed and finished by the survivor
        assert states[job_id].deliveries >= 2
        assert states[job_id].result is not None and states[job_id].result.replica == survivor_id
    for state in states.values():
        assert state.result is not None and [r.index for r in state.result.items] == list(range(N_ITEMS))
    # exactly once: one results-stream entry per (job, item), none twice
    seen = Counter((item.job_id, item.index) for item in page.items)
    assert set(seen) == {(j, k) for j in job_ids for k in range(N_ITEMS)}
    assert max(seen.values()) == 1
    keys = Settings(key_prefix=prefix).keys
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.xlen(keys.run_results(run)) == N_JOBS * N_ITEMS
        assert int(r.hget(keys.jobs_by_status, "done") or 0) == N_JOBS
        assert r.xpending(keys.jobs_stream, CONSUMER_GROUP)["pending"] == 0
    finally:
        r.close()


def test_a_configured_replica_id_in_use_is_refused(redis_url: str, prefix: str) -> None:
    first = replica(redis_url, prefix, "rep-taken", env=LEASE).start()
    try:
        twin = replica(redis_url, prefix, "rep-taken", env=LEASE)
        with pytest.raises(GeneratorStartError) as refused:
            twin.start()
        twin.stop()
        assert "replica id 'rep-taken' is in use" in str(refused.value)
        assert "ACTGEN_REPLICA_ID" in str(refused.value)
        assert twin.process is not None and twin.process.returncode == 1
        assert first.alive()
    finally:
        first.stop()
    # stopped gracefully: the name is free at once
    again = replica(redis_url, prefix, "rep-taken", env=LEASE).start()
    again.stop()


def test_sigstop_past_the_lease_job_is_reclaimed_and_finished_once(redis_url: str, prefix: str) -> None:
    """A paused replica (SIGSTOP past its lease) loses its job to the other one, which finishes
    it; once resumed (SIGCONT) the paused one drops the job instead of finishing it again."""
    a = replica(redis_url, prefix, None, env=LEASE)
    b = replica(redis_url, prefix, None, env=LEASE)
    try:
        _start_all(a, b)
        procs = {_replica_id(a): a, _replica_id(b): b}
        run = new_run_id()
        with GeneratorClient(a.url) as client:
            job_id = client.submit(
                job_body(run, n_items=2, mode="random", steps=60, options={"grad_steps": 0})
            ).job_id
            first = _wait_until(
                lambda: (
                    (s := client.status(job_id)).status is JobStatus.running and s.progress.step >= 1 and s
                ),
                "the job to run",
            )
        paused = procs[first.replica]
        other_id = next(name for name in procs if name != first.replica)
        with GeneratorClient(procs[other_id].url) as client:  # the paused one answers nothing
            assert paused.process is not None
            paused.process.send_signal(signal.SIGSTOP)
            try:
                _wait_until(lambda: client.status(job_id).replica == other_id, "the reclaim", timeout_s=60)
            finally:
                paused.process.send_signal(signal.SIGCONT)
            state = client.wait(job_id, timeout_s=WAIT_S)
            page = client.results(run, limit=100)
        _wait_until(
            lambda: "job.lost" in paused.log_tail(20000), "the resumed replica to drop the job", timeout_s=60
        )
        assert paused.alive()
        with httpx.Client() as http:
            assert http.get(f"{paused.url}/readyz").status_code == 200
    finally:
        a.stop()
        b.stop()
    assert state.status is JobStatus.done and state.deliveries == 2
    assert state.result is not None and state.result.replica == other_id
    assert sorted((item.job_id, item.index) for item in page.items) == [(job_id, 0), (job_id, 1)]
    keys = Settings(key_prefix=prefix).keys
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.xlen(keys.run_results(run)) == 2
        assert r.xpending(keys.jobs_stream, CONSUMER_GROUP)["pending"] == 0
    finally:
        r.close()


def test_sigterm_releases_the_running_job_at_once(redis_url: str, prefix: str) -> None:
    env = {**LEASE, "ACTGEN_LEASE_S": "60"}  # a release, not a lease expiry, must free the job
    first = replica(redis_url, prefix, "rep-graceful", env=env).start()
    try:
        with GeneratorClient(first.url) as client:
            job_id = client.submit(
                job_body(new_run_id(), n_items=2, steps=500, options={"grad_steps": 0})
            ).job_id
            _wait_until(lambda: client.status(job_id).progress.step >= 1, "the job to run")
        assert first.terminate(timeout_s=60) == 0
    finally:
        first.stop()
    keys = Settings(key_prefix=prefix).keys
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.hget(keys.job(job_id), "status") == b"queued"
        assert r.xpending(keys.jobs_stream, CONSUMER_GROUP)["pending"] == 0
        assert not r.exists(keys.heartbeat("rep-graceful"))
    finally:
        r.close()
    # another replica takes it up at once (its lease is 60 s: no reclaim could explain it)
    second = replica(redis_url, prefix, "rep-other", env=env).start()
    try:
        with GeneratorClient(second.url) as client:
            state = _wait_until(
                lambda: (s := client.status(job_id)).status is JobStatus.running and s,
                "a restart",
                timeout_s=30,
            )
            assert state.replica == "rep-other" and state.deliveries == 1
            assert client.cancel(job_id).status in (JobStatus.running, JobStatus.cancelled)
            assert client.wait(job_id, timeout_s=WAIT_S).status is JobStatus.cancelled
    finally:
        second.stop()
