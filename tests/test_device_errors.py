"""What a replica does with the errors a GPU raises (docs/architecture.md 5): an allocation failure
is worth a smaller batch, a lost device ends the replica with its jobs handed back, and a
non-finite eq. 11 gradient is counted (in the item's record and /metrics), never hidden.

One replica in-process (TestClient runs its lifespan: Redis, the tiny model, the worker), on the
real Redis; the errors are injected into its real sampler."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from service_helpers import job_body, key_prefix_for, new_run_id, wait_until

from actgen_generator.api import Service, create_app
from actgen_generator.batch import device_lost, out_of_memory
from actgen_shared.schemas import JobState, JobStatus
from actgen_shared.settings import Settings

pytestmark = pytest.mark.slow
WAIT_S = 60.0


@pytest.mark.parametrize(
    ("error", "oom", "lost"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True, False),
        (RuntimeError("CUDA error: out of memory"), True, False),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
            True,
            False,
        ),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True, False),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), True, False),
        (torch.OutOfMemoryError("CUDA out of memory."), True, False),
        (MemoryError(), True, False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False, True),
        (RuntimeError("CUDA error: device-side assert triggered"), False, True),
        (RuntimeError("CUDA error: unspecified launch failure"), False, True),
        (torch.AcceleratorError("an accelerator failed"), False, True),
        (ValueError("items[0].guide must be a uint8 HxWx3 array"), False, False),
    ],
)
def test_what_a_batch_error_means(error: BaseException, oom: bool, lost: bool) -> None:
    assert (out_of_memory(error), device_lost(error)) == (oom, lost)


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[TestClient]:
    with key_prefix_for(redis_url) as prefix:
        settings = Settings(
            redis_url=redis_url, key_prefix=prefix, lease_s=2.0, heartbeat_interval_s=0.5, max_batch=4
        )
        with TestClient(create_app(settings, worker=True, device="cpu")) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, "the replica to be ready", WAIT_S)
            yield client


def _service(api: TestClient) -> Service:
    return api.app.state.service  # type: ignore[attr-defined]


def _state(api: TestClient, job_id: str) -> JobState:
    return JobState.model_validate_json(api.get(f"/v1/jobs/{job_id}").content)


def _metric(text: str, outcome: str) -> float:
    match = re.search(rf'^actgen_grad_item_steps_total\{{outcome="{outcome}"\}} (\S+)$', text, re.M)
    assert match, f"no actgen_grad_item_steps_total for {outcome}"
    return float(match.group(1))


def test_a_nonfinite_gradient_is_in_the_items_record_and_the_metrics(api: TestClient) -> None:
    """Two same-class items of one job repel each other (eq. 9); item 0's loss is poisoned."""
    svc = _service(api)
    assert svc.worker is not None
    sampler = svc.worker.sampler
    real_loss = sampler.guidance_loss  # type: ignore[attr-defined]

    def poisoned(x0, targets):  # type: ignore[no-untyped-def]
        loss = real_loss(x0, targets)
        poison = torch.zeros_like(loss.total)
        poison[0] = float("nan")
        return dataclasses.replace(loss, total=loss.total + poison * x0.flatten(1).sum(1))

    sampler.guidance_loss = poisoned  # type: ignore[attr-defined]
    try:
        body = job_body(new_run_id(), n_items=2, mode="actgen", options={"contrastive_margin": 400.0})
        for item in body["items"]:
            item["class_id"] = 0
        job_id = api.post("/v1/jobs", json=body).json()["job_id"]
        state = wait_until(lambda: (s := _state(api, job_id)).status.is_final and s, "the job", WAIT_S)
    finally:
        del sampler.guidance_loss  # type: ignore[attr-defined]
    assert state.status is JobStatus.done and state.result is not None
    records = state.result.items
    assert [len(r.grad_records) for r in records] == [2, 2]
    assert [(r.zero_grad_steps, r.nonfinite_grad_steps) for r in records] == [(0, 2), (0, 0)]
    text = api.get("/metrics").text
    assert (_metric(text, "moved"), _metric(text, "zero"), _metric(text, "nonfinite")) == (2.0, 0.0, 2.0)


def test_a_lost_device_ends_the_replica_and_hands_its_job_back(api: TestClient) -> None:
    """The UNet raises what CUDA says after an illegal memory access: the job is not failed but put
    back on the queue (as a device loss: its delivery does not count), /readyz says why the
    replica is out, and it stops."""
    svc = _service(api)
    assert svc.worker is not None and svc.worker_task is not None
    fatal = threading.Event()
    svc.on_fatal = fatal.set  # the CLI stops the server here; the process then exits

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    svc.worker.sampler.unet.forward = broken  # type: ignore[attr-defined]
    job_id = api.post("/v1/jobs", json=job_body(new_run_id(), n_items=2, mode="random")).json()["job_id"]
    wait_until(lambda: fatal.is_set() or _state(api, job_id).status.is_final, "the replica to react", WAIT_S)
    state = _state(api, job_id)
    assert fatal.is_set(), f"the replica did not end: {state}"
    assert state.status is JobStatus.queued and state.error is None and state.deliveries == 0
    direct = redis.Redis.from_url(svc.settings.redis_url or "")
    try:  # counted apart, against ACTGEN_MAX_DEVICE_LOSSES
        assert direct.hget(svc.settings.keys.job(job_id), "device_losses") == b"1"
    finally:
        direct.close()
    ready = api.get("/readyz")
    assert ready.status_code == 503 and "illegal memory access" in ready.json()["error"]["message"]
    wait_until(svc.worker_task.done, "the worker to stop", WAIT_S)
    assert _state(api, job_id).status is JobStatus.queued  # left for the other replicas
