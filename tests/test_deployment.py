"""The compose topology as plain processes on loopback (issue 6): Redis with AOF, two generator
replicas and the trainer's demo config. Redis is restarted mid-run; the run still completes and
no job is lost: every posted job ends done, and every generated item is folded in exactly once.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import redis

from actgen_shared.client import GeneratorClient
from actgen_shared.keys import Keys
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_trainer.config import load_config
from actgen_trainer.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
IMAGES_PER_EPOCH = 3


def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_redis_restart_mid_run_loses_no_job(tmp_path: Path) -> None:
    prefix = f"deploy:{uuid.uuid4().hex[:8]}:"
    keys = Keys(prefix)
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True).start()
    env = {
        "ACTGEN_KEY_PREFIX": prefix,
        "ACTGEN_LEASE_S": "3",
        "ACTGEN_HEARTBEAT_S": "0.5",
        "ACTGEN_MAX_BATCH": "2",
    }
    try:
        with (
            GeneratorProcess(redis_url=server.url, env={**env, "ACTGEN_REPLICA_ID": "gen-a"}) as gen_a,
            GeneratorProcess(redis_url=server.url, env={**env, "ACTGEN_REPLICA_ID": "gen-b"}),
            GeneratorClient(gen_a.url, timeout_s=60) as client,
        ):
            cfg = load_config(
                REPO / "configs" / "demo.yaml",
                [
                    f"output_dir={tmp_path}",
                    "run_name=deploy",
                    f"train.epochs={EPOCHS}",
                    "data.train_subset=200",
                    "data.val_size=50",
                    "data.test_subset=100",
                    "data.image_size=16",
                    "train.batch_size=50",
                    f"generation.images_per_epoch={IMAGES_PER_EPOCH}",
                    "generation.sync=true",
                    "generation.options.num_inference_steps=6",
                    "generation.options.grad_steps=1",
                    "generation.options.output_size=null",
                    "generation.options.bank_sample=16",
                ],
            )
            trainer = Trainer(cfg, client=client, progress=False)
            outcome: dict[str, object] = {}

            def train() -> None:
                try:
                    outcome["summary"] = trainer.run()
                except BaseException as exc:  # surfaced by the assertion below
                    outcome["error"] = exc

            thread = threading.Thread(target=train, daemon=True)
            thread.start()
            # restart Redis while the first job is in flight (queued or being generated)
            probe = redis.Redis.from_url(server.url)
            _wait_for(
                lambda: probe.exists(keys.jobs_stream) and probe.xlen(keys.jobs_stream) > 0,
                120,
                "the trainer's first job",
            )
            probe.close()
            server.stop()  # SIGTERM: Redis writes its AOF and exits, as `docker compose restart redis`
            time.sleep(1.0)
            server.start()
            thread.join(timeout=420)
            assert not thread.is_alive(), "the trainer did not finish after the Redis restart"
            assert "error" not in outcome, f"the run failed: {outcome.get('error')!r}"

            jobs = trainer.state.jobs
            assert [j["epoch"] for j in jobs] == list(range(EPOCHS // 2))
            for job in jobs:
                assert client.status(job["job_id"]).status.value == "done"
            # one results-stream entry per item, and each folded in exactly once
            probe = redis.Redis.from_url(server.url)
            entries = probe.xrange(keys.run_results(trainer.state.run_id))
            probe.close()
            expected = IMAGES_PER_EPOCH * len(jobs)
            assert len(entries) == expected
            ids = [record.id for record in trainer.generated.records]
            assert len(ids) == len(set(ids)) == expected
    finally:
        server.cleanup()


def test_api_answers_503_while_redis_is_down_and_recovers(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True).start()
    try:
        with (
            GeneratorProcess(
                redis_url=server.url,
                extra_args=["--no-worker"],
                env={"ACTGEN_KEY_PREFIX": f"deploy:{uuid.uuid4().hex[:8]}:"},
            ) as gen,
            GeneratorClient(gen.url, timeout_s=30) as client,
        ):
            server.stop()
            response = httpx.get(f"{gen.url}/v1/jobs/no-such-job", timeout=30)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "unavailable"
            assert "Redis" in response.json()["error"]["message"]
            assert httpx.get(f"{gen.url}/healthz", timeout=10).status_code == 200
            assert httpx.get(f"{gen.url}/readyz", timeout=10).status_code == 503
            server.start()
            _wait_for(
                lambda: httpx.get(f"{gen.url}/readyz", timeout=10).status_code == 200,
                30,
                "readiness after the restart",
            )
            assert httpx.get(f"{gen.url}/v1/jobs/no-such-job", timeout=30).status_code == 404
            assert client.info().replica_id
    finally:
        server.cleanup()
