"""The generator service end to end: a real uvicorn replica, real Redis, the tiny model."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from service_helpers import (
    CLASSIFIER_META,
    SIZE,
    STEPS,
    classifier_weights,
    job_body,
    key_prefix_for,
    new_run_id,
    replica,
)

from actgen_generator.tiny_model import TINY_UNET, TINY_VAE
from actgen_shared.client import AsyncGeneratorClient, GeneratorClient, GeneratorError
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.schemas import JobRequest, JobResult, JobState, JobStatus
from actgen_shared.settings import Settings

pytestmark = pytest.mark.slow
WAIT_S = 120.0
LONG_STEPS = 500  # minutes of work on the tiny model: it is cancelled long before


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[GeneratorProcess]:
    with key_prefix_for(redis_url) as prefix:
        with replica(redis_url, prefix, "api-test", env={"ACTGEN_MAX_BATCH": "4"}) as proc:
            yield proc


@pytest.fixture(scope="module")
def client(server: GeneratorProcess) -> Iterator[GeneratorClient]:
    with GeneratorClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def classifier_ref(client: GeneratorClient) -> str:
    return client.upload_classifier(classifier_weights(), CLASSIFIER_META).ref


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("random", {}),
        ("ig", {}),
        ("aig", {"options": {"output_size": 32}}),
        ("actgen", {"memory_bank_key": "bank-a"}),
        ("actgen", {"memory_bank_key": "bank-a", "options": {"adv_prob": 1.0}, "classifier": True}),
        ("aig", {"options": {"preset": "paper", "prompt": "a picture of {}"}}),
    ],
    ids=["random", "ig", "aig-resized", "actgen", "actgen-adversarial", "aig-paper-prompt"],
)
def test_job_in_each_mode(client: GeneratorClient, classifier_ref: str, mode: str, extra: dict) -> None:
    extra = dict(extra)
    if extra.pop("classifier", False):
        extra["classifier_ref"] = classifier_ref
    n = 2
    accepted = client.submit(job_body(new_run_id(), n_items=n, mode=mode, **extra))
    assert accepted.status_url == f"/v1/jobs/{accepted.job_id}"
    state = client.wait(accepted.job_id, timeout_s=WAIT_S)
    assert state.status is JobStatus.done, state.error
    assert (state.progress.step, state.progress.total) == (STEPS, STEPS)  # done: every step, not 2 of 3
    assert state.result is not None and len(state.result.items) == n
    assert [r.index for r in state.result.items] == list(range(n))
    # each item records what its options left to the preset (the tiny model has no defaults file)
    options = extra.get("options", {})
    for record in state.result.items:
        assert record.resolved is not None and record.resolved.defaults == options.get("preset", "released")
        assert record.resolved.prompt == options.get("prompt", "a photo of {}")
        assert record.resolved.guidance_scale == (15.0 if options.get("preset") == "paper" else 7.5)
    want = extra.get("options", {}).get("output_size") or SIZE
    for k in range(n):
        assert _png_size(client.image(accepted.job_id, k)) == (want, want)
    latents, indices = client.latents(accepted.job_id)
    assert latents.dtype == np.float16 and latents.shape[0] == n and latents.ndim == 4
    assert indices.tolist() == list(range(n))
    assert np.isfinite(latents.astype(np.float32)).all()
    if extra.get("classifier_ref"):
        assert state.result.classifier_ref == classifier_ref
        assert all(r.adversarial for r in state.result.items)
    with pytest.raises(GeneratorError) as err:
        client.image(accepted.job_id, n)
    assert err.value.status == 404


def test_memory_bank_fills_and_clears(client: GeneratorClient) -> None:
    bank = "bank-" + new_run_id()
    state = client.wait(
        client.submit(job_body(new_run_id(), n_items=3, mode="actgen", memory_bank_key=bank)).job_id,
        timeout_s=WAIT_S,
    )
    assert state.status is JobStatus.done
    assert client.memory_bank(bank).counts == {0: 1, 1: 1, 2: 1}
    # a second job samples the bank at its start (contrastive loss has something to push from)
    again = client.wait(
        client.submit(job_body(new_run_id(), n_items=2, mode="actgen", memory_bank_key=bank)).job_id,
        timeout_s=WAIT_S,
    )
    assert again.status is JobStatus.done
    assert client.memory_bank(bank).counts == {0: 2, 1: 2, 2: 1}
    client.clear_memory_bank(bank)
    assert client.memory_bank(bank).counts == {}


def test_same_seed_same_images(client: GeneratorClient) -> None:
    run = new_run_id()
    a = client.wait(client.submit(job_body(run, n_items=2, seed=7)).job_id, timeout_s=WAIT_S)
    b = client.wait(client.submit(job_body(run, n_items=2, seed=7)).job_id, timeout_s=WAIT_S)
    assert a.status is b.status is JobStatus.done
    for k in range(2):
        assert client.image(a.job_id, k) == client.image(b.job_id, k)
    # no seed given: the service fixes one at submit, so the job stays reproducible
    c = client.wait(client.submit(job_body(run, n_items=1, seed=None)).job_id, timeout_s=WAIT_S)
    assert c.result is not None and c.result.options.seed is not None


def test_results_cursor_long_poll_and_resume(client: GeneratorClient) -> None:
    run = new_run_id()
    empty = client.results(run, after="0-0", wait_s=0)
    assert empty.items == [] and empty.next == "0-0"
    # long-poll: the request waits until the first item of a job submitted meanwhile lands
    job_a = client.submit(job_body(run, n_items=2)).job_id
    page = client.results(run, after="0-0", limit=1, wait_s=60)
    assert len(page.items) == 1
    first = page.items[0]
    assert first.job_id == job_a and first.image and first.latent_key
    saved_cursor = page.next
    client.wait(job_a, timeout_s=WAIT_S)
    job_b = client.submit(job_body(run, n_items=3)).job_id
    client.wait(job_b, timeout_s=WAIT_S)
    # resume from the saved cursor (as a restarted trainer would): the rest, no repeats
    seen = [(first.job_id, first.index)]
    cursor = saved_cursor
    while True:
        page = client.results(run, after=cursor, limit=2)
        if not page.items:
            break
        seen += [(item.job_id, item.index) for item in page.items]
        cursor = page.next
    assert len(seen) == len(set(seen)) == 5
    assert sorted(seen) == sorted([(job_a, 0), (job_a, 1)] + [(job_b, k) for k in range(3)])
    image = Image.open(io.BytesIO(__import__("base64").b64decode(first.image)))
    assert image.size == (SIZE, SIZE)
    # the cursor is at the end: nothing more after it, and a short wait times out empty
    assert client.results(run, after=cursor, wait_s=0.2).items == []


def test_cancel_queued_and_running(client: GeneratorClient) -> None:
    run = new_run_id()
    # four long items fill the batch (ACTGEN_MAX_BATCH=4): the next job waits in the queue
    long_job = client.submit(job_body(run, n_items=4, steps=LONG_STEPS, options={"grad_steps": 0})).job_id
    queued_job = client.submit(job_body(run, n_items=1, steps=3)).job_id
    deadline = time.monotonic() + WAIT_S
    while True:
        state = client.status(long_job)
        if state.status is JobStatus.running and state.progress.step >= 1:
            break
        assert not state.status.is_final and time.monotonic() < deadline, f"long job never ran: {state}"
        time.sleep(0.05)
    assert state.progress.total == LONG_STEPS
    assert client.status(queued_job).status is JobStatus.queued
    assert client.cancel(queued_job).status is JobStatus.cancelled  # at once
    # a running job: DELETE waits (here up to a minute) until the worker has stopped it
    response = client._http.delete(f"/v1/jobs/{long_job}", params={"wait": 60})
    final = JobState.model_validate_json(response.content)
    assert response.status_code == 200 and final.status is JobStatus.cancelled and not final.cancel_requested
    assert 0 < final.progress.step < LONG_STEPS
    assert client.results(run).items == []
    # the replica keeps serving after the cancels
    assert (
        client.wait(client.submit(job_body(run, n_items=1)).job_id, timeout_s=WAIT_S).status is JobStatus.done
    )


def test_idempotency_key_returns_the_first_job(client: GeneratorClient) -> None:
    run = new_run_id()
    key = f"idem-{run}"
    first = client.submit(job_body(run, n_items=1, idempotency_key=key))
    again = client.submit(job_body(run, n_items=1, idempotency_key=key))  # a retry: the same body
    assert not first.duplicate and again.duplicate
    assert again.job_id == first.job_id
    with pytest.raises(GeneratorError) as err:  # the key bound to another body (issue 27)
        client.submit(job_body(run, n_items=2, idempotency_key=key))
    assert err.value.status == 422 and "idempotency_key" in err.value.message
    state = client.wait(first.job_id, timeout_s=WAIT_S)
    assert state.result is not None and len(state.result.items) == 1


def test_info_metrics_and_docs(client: GeneratorClient, server: GeneratorProcess) -> None:
    info = client.info()
    native = TINY_UNET["sample_size"] * 2 ** (len(TINY_VAE["block_out_channels"]) - 1)
    assert info.replica_id == "api-test" and info.native_size == native and info.max_batch == 4
    assert "tiny" in info.model and info.device == "cpu"
    # the preset-dependent defaults as this replica's model resolves them: no defaults file, released
    assert info.resolved_defaults is not None and info.resolved_defaults.defaults == "released"
    assert (info.resolved_defaults.guidance_scale, info.resolved_defaults.normalize_mask) == (7.5, False)
    job = client.submit(job_body(new_run_id(), n_items=1, mode="random")).job_id
    assert client.wait(job, timeout_s=WAIT_S).status is JobStatus.done
    text = client._http.get("/metrics").text
    for name in (
        "actgen_queue_depth",
        'actgen_jobs{status="done"}',
        "actgen_items_generated_total",
        "actgen_step_seconds_bucket",
        "actgen_batch_size_bucket",
        "actgen_items_per_second",
    ):
        assert name in text, name
    done = [line for line in text.splitlines() if line.startswith('actgen_jobs{status="done"}')]
    assert float(done[0].split()[-1]) >= 1
    items = [line for line in text.splitlines() if line.startswith("actgen_items_generated_total")]
    assert float(items[0].split()[-1]) >= 1
    assert client._http.get("/docs").status_code == 200
    assert "/v1/jobs" in client._http.get("/openapi.json").json()["paths"]


def test_async_client(server: GeneratorProcess) -> None:
    async def go() -> None:
        async with AsyncGeneratorClient(server.url) as c:
            run = new_run_id()
            accepted = await c.submit(job_body(run, n_items=2, mode="random"))
            state = await c.wait(accepted.job_id, timeout_s=WAIT_S)
            assert state.status is JobStatus.done
            page = await c.results(run)
            assert {i.index for i in page.items} == {0, 1}
            assert (await c.image(accepted.job_id, 1))[:8] == b"\x89PNG\r\n\x1a\n"
            with pytest.raises(GeneratorError) as err:
                await c.status("no-such-job")
            assert err.value.status == 404 and err.value.code == "not_found"

    asyncio.run(go())


def test_memory_bank_is_live_and_per_job(client: GeneratorClient) -> None:
    """A run's first job already contrasts its same-class items with each other; the next job sees
    the first one's latents as soon as they are stored; a job with another bank key sees none."""

    def contrastive_steps(state) -> list[list[float]]:
        return [[r.l_contra for r in item.grad_records] for item in state.result.items]

    def run(bank: str, n_items: int, seed: int):
        body = job_body(
            new_run_id(),
            n_items=n_items,
            mode="actgen",
            seed=seed,
            memory_bank_key=bank,
            options={"contrastive_margin": 1e6},
        )  # every bank entry inside the margin
        for item in body["items"]:
            item["class_id"] = 0
        state = client.wait(client.submit(body).job_id, timeout_s=WAIT_S)
        assert state.status is JobStatus.done, state.error
        return state

    bank = f"live-{new_run_id()}"
    first = run(bank, n_items=2, seed=1)  # empty bank: the two items are each other's entries
    assert all(len(steps) == 2 and min(steps) > 0 for steps in contrastive_steps(first))
    assert client.memory_bank(bank).counts == {0: 2}
    second = run(bank, n_items=1, seed=2)  # alone in its job: only the stored bank can push it
    assert [len(s) for s in contrastive_steps(second)] == [2] and min(contrastive_steps(second)[0]) > 0
    other = run(f"other-{new_run_id()}", n_items=1, seed=2)  # same request, an empty bank of its own
    assert contrastive_steps(other) == [[]]  # no entries: no gradient step at all


def test_cancel_of_a_job_still_running_says_so_and_a_done_job_shows_all_its_steps(settings: Settings) -> None:
    """API only, the job run by hand as a worker would (no model): DELETE of a running job that
    has not stopped within ``wait`` answers 202 with ``cancel_requested``; once done (it finished
    before it saw the flag), it shows every step done and no pending cancel."""
    from starlette.testclient import TestClient

    from actgen_generator.api import create_app
    from actgen_shared.consumer import Consumer
    from actgen_shared.queue import JobQueue, connect

    body = job_body(new_run_id(), n_items=1, steps=10)

    async def worker_side(finish: bool) -> str:
        client = connect(settings.redis_url or "")
        try:
            q = JobQueue(client, settings)
            await q.ensure_group()
            consumer = Consumer(q, "by-hand", token="by-hand-token")  # one consumer, two calls
            if not finish:
                job_id, _ = await q.submit(JobRequest.model_validate(body))
                [delivery] = await consumer.fetch(count=1, block_ms=100, start=True)
                await consumer.progress(job_id, 9, 10)  # the last step posts no progress
                return job_id
            [delivery] = await consumer.fetch(count=1, block_ms=0)  # its own pending entry
            options = delivery.request.options
            await consumer.complete(delivery, JobResult(items=[], options=options))
            return delivery.job_id
        finally:
            await client.aclose()

    with TestClient(create_app(settings, worker=False)) as api:
        job_id = asyncio.run(worker_side(finish=False))
        response = api.delete(f"/v1/jobs/{job_id}", params={"wait": 0.2})
        state = JobState.model_validate(response.json())
        assert response.status_code == 202 and state.status is JobStatus.running and state.cancel_requested
        assert JobState.model_validate(api.get(f"/v1/jobs/{job_id}").json()).cancel_requested
        assert asyncio.run(worker_side(finish=True)) == job_id
        done = JobState.model_validate(api.get(f"/v1/jobs/{job_id}").json())
        assert done.status is JobStatus.done and not done.cancel_requested
        assert (done.progress.step, done.progress.total) == (10, 10)
        again = api.delete(f"/v1/jobs/{job_id}")  # a final job: unchanged, at once
        assert again.status_code == 200 and again.json()["status"] == "done"
        assert api.delete(f"/v1/jobs/{job_id}", params={"wait": -1}).status_code == 422


def test_public_docs_open_the_docs_only(redis_url: str, key_prefix: str) -> None:
    """ACTGEN_PUBLIC_DOCS=1 opens /docs, /redoc and /openapi.json; everything else keeps its 401."""
    from starlette.testclient import TestClient

    from actgen_generator.api import create_app
    from actgen_shared.settings import Settings

    for public in (True, False):
        settings = Settings(redis_url=redis_url, key_prefix=key_prefix, api_key="k", public_docs=public)
        with TestClient(create_app(settings, worker=False)) as anon:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert anon.get(path).status_code == (200 if public else 401), (public, path)
            assert anon.get("/v1/info").status_code == 401
            assert anon.get("/healthz").status_code == 200
            assert anon.get("/v1/info", headers={"Authorization": "Bearer k"}).status_code == 200
