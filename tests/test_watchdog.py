"""GPU faults that cannot hang or mislabel (docs/architecture.md, "Faults").

* A step that never returns (tests/hung_replica.py: a real replica whose echo sampler blocks for
  good in its step loop): the watchdog ends the batch past its limit, /readyz says 503, the jobs
  go back to the queue (as device losses, not deliveries), the process exits, and another replica
  finishes each job exactly once.
* A cuDNN execution failure raised from inside the real tiny model's step loop ends the replica
  as a lost device does, without failing the job or using up its deliveries.
* Device losses are bounded on their own (ACTGEN_MAX_DEVICE_LOSSES): a job that every device
  fails under ends in the dead letters, and a flapping device does not spend max_deliveries.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from service_helpers import job_body, key_prefix_for, new_run_id, replica, wait_until

from actgen_generator.api import Service, create_app
from actgen_shared.consumer import Consumer
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.queue import JobQueue, connect
from actgen_shared.schemas import JobRequest, JobStatus
from actgen_shared.settings import Settings

pytestmark = pytest.mark.slow
WAIT_S = 90.0
HUNG_SCRIPT = Path(__file__).with_name("hung_replica.py")


class HungReplica(GeneratorProcess):
    """A replica process started from tests/hung_replica.py instead of the package's CLI."""

    def command(self) -> list[str]:
        return [sys.executable, str(HUNG_SCRIPT), *super().command()[3:]]


def test_a_hung_step_ends_the_replica_and_another_finishes_its_jobs_once(redis_url: str) -> None:
    with key_prefix_for(redis_url) as prefix:
        env = {
            "ACTGEN_KEY_PREFIX": prefix,
            "ACTGEN_REPLICA_ID": "hangs",
            "ACTGEN_ECHO_STEP_S": "0.05",  # steps in a thread, as the model's are
            "ACTGEN_WATCHDOG_STEP_S": "0.5",  # 3 steps + 2 guided: a limit of 1 + 5 x 0.5 = 3.5 s
            "ACTGEN_WATCHDOG_GRACE_S": "1",
            "ACTGEN_FATAL_EXIT_DELAY_S": "3",
            "ACTGEN_MAX_BATCH": "8",
        }
        hung = HungReplica(redis_url=redis_url, env=env, extra_args=["--sampler", "echo"]).start()
        try:
            run = new_run_id()
            with httpx.Client(base_url=hung.url, timeout=10) as client:
                job_ids = [
                    client.post("/v1/jobs", json=job_body(run, seed=k)).json()["job_id"] for k in range(2)
                ]

                def out_of_ready() -> str | None:
                    try:
                        ready = client.get("/readyz")
                    except httpx.HTTPError:
                        return None
                    return ready.text if ready.status_code == 503 else None

                why = wait_until(out_of_ready, "the hung replica's /readyz to say 503", WAIT_S)
            assert "watchdog" in why
            assert hung.process is not None
            code = hung.process.wait(timeout=WAIT_S)  # it exits, though its batch thread is stuck
            assert code == 1, hung.log_tail()
        finally:
            hung.stop()
        direct = redis.Redis.from_url(redis_url)
        try:
            losses = []
            for job_id in job_ids:  # back on the queue, no delivery spent on a device's fault
                job = {k.decode(): v.decode() for k, v in direct.hgetall(f"{prefix}job:{job_id}").items()}
                assert (job["status"], job["deliveries"]) == ("queued", "0"), job
                losses.append(job.get("device_losses"))
            # the hung batch's jobs count a device loss; a job that only waited there (posted after
            # the batch began) was released without one
            assert "1" in losses and set(losses) <= {"1", None}, losses
            with replica(redis_url, prefix, "finishes", extra_args=["--sampler", "echo"]) as other:
                with httpx.Client(base_url=other.url, timeout=10) as client:
                    for job_id in job_ids:
                        state = wait_until(
                            lambda j=job_id: (
                                (s := client.get(f"/v1/jobs/{j}").json())["status"] == "done" and s
                            ),
                            f"job {job_id} to be finished by the other replica",
                            WAIT_S,
                        )
                        assert state["replica"] == "finishes" and state["deliveries"] == 1
                    items = client.get(f"/v1/runs/{run}/results").json()["items"]
            stored = sorted((item["job_id"], item["index"]) for item in items)
            assert stored == sorted((j, k) for j in job_ids for k in range(2))  # each item exactly once
        finally:
            direct.close()


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[TestClient]:
    with key_prefix_for(redis_url) as prefix:
        settings = Settings(
            redis_url=redis_url,
            key_prefix=prefix,
            lease_s=2.0,
            heartbeat_interval_s=0.5,
            fatal_exit_delay_s=0,
        )
        with TestClient(create_app(settings, worker=True, device="cpu")) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, "the replica to be ready", WAIT_S)
            yield client


def test_a_cudnn_execution_failure_inside_the_step_loop_is_a_device_error(api: TestClient) -> None:
    svc: Service = api.app.state.service  # type: ignore[attr-defined]
    assert svc.worker is not None and svc.worker_task is not None
    fatal = threading.Event()
    svc.on_fatal = fatal.set
    unet = svc.worker.sampler.unet  # type: ignore[attr-defined]
    real_forward = unet.forward
    calls = [0]

    def fails_on_the_second_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] > 2:  # the first step ran (two UNet calls: guided and unguided)
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
        return real_forward(*args, **kwargs)

    unet.forward = fails_on_the_second_step
    job_id = api.post("/v1/jobs", json=job_body(new_run_id(), n_items=1, mode="random", steps=4)).json()[
        "job_id"
    ]
    wait_until(fatal.is_set, "the replica to end", WAIT_S)
    assert calls[0] > 2  # it did fail from inside the loop, after a step
    state = api.get(f"/v1/jobs/{job_id}").json()
    assert (state["status"], state["error"], state["deliveries"]) == ("queued", None, 0), state
    ready = api.get("/readyz")
    assert ready.status_code == 503 and "CUDNN_STATUS_EXECUTION_FAILED" in ready.json()["error"]["message"]
    wait_until(svc.worker_task.done, "the worker to stop", WAIT_S)


def test_device_losses_are_bounded_apart_from_deliveries(settings: Settings) -> None:
    async def scenario() -> None:
        client = connect(settings.redis_url or "")
        queue = JobQueue(client, settings)
        await queue.ensure_group()
        try:
            request = JobRequest(
                run_id="run-dev",
                label_set="digits",
                items=[{"image": job_body("r", n_items=1)["items"][0]["image"], "class_id": 1}],
            )
            job_id, _ = await queue.submit(request)
            for loss in range(settings.max_device_losses):  # more than max_deliveries would allow
                consumer = Consumer(queue, f"gpu-{loss}")
                [delivery] = await consumer.fetch(1, 1000, start=True)
                await consumer.device_lost(delivery, "device lost: CUDNN_STATUS_INTERNAL_ERROR")
                state = await queue.state(job_id)
                assert state is not None and state.status is JobStatus.queued and state.deliveries == 0
            last = Consumer(queue, "gpu-last")
            assert await last.fetch(1, 1000, start=True) == []  # dead-lettered, not run again
            state = await queue.state(job_id)
            assert state is not None and state.status is JobStatus.failed
            assert state.error is not None and "lost its device 3 times (max_device_losses 3)" in state.error
        finally:
            await client.aclose()

    assert settings.max_device_losses == 3 and settings.max_deliveries == 3
    asyncio.run(scenario())
