"""Bounded state (docs/architecture.md section 4): classifiers expire unless used and can be deleted, memory
banks are capped per class and expire, the prompt cache is an LRU, and a Redis near its memory
cap makes submit and /readyz answer 503. Real redis-server; the API in-process."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import redis
from service_helpers import CLASSIFIER_META, classifier_weights, job_body, new_run_id
from starlette.testclient import TestClient

from actgen_generator.api import create_app
from actgen_shared import codecs
from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_shared.settings import Settings

AUTH = {"Authorization": "Bearer k"}
TTL = 100


@pytest.fixture
def api(redis_url: str, key_prefix: str) -> Iterator[TestClient]:
    settings = Settings(
        redis_url=redis_url, key_prefix=key_prefix, api_key="k", classifier_ttl_s=TTL, bank_ttl_s=TTL
    )
    with TestClient(create_app(settings, worker=False), headers=AUTH) as client:
        yield client


def _upload(api: TestClient) -> str:
    files = {"weights": ("c.safetensors", classifier_weights(), "application/octet-stream")}
    response = api.post("/v1/classifiers", files=files, data={"metadata": json.dumps(CLASSIFIER_META)})
    assert response.status_code == 200, response.text
    return response.json()["ref"]


def test_classifier_expires_unless_used_and_is_deleted_once_unused(
    api: TestClient, redis_url: str, key_prefix: str
) -> None:
    keys = Settings(key_prefix=key_prefix).keys
    r = redis.Redis.from_url(redis_url)
    try:
        ref = _upload(api)
        hex_ = ref.removeprefix("sha256:")
        assert 0 < r.ttl(keys.classifier(hex_)) <= TTL and 0 < r.ttl(keys.classifier_meta(hex_)) <= TTL
        r.expire(keys.classifier(hex_), 5)
        r.expire(keys.classifier_meta(hex_), 5)
        body = job_body(new_run_id(), mode="actgen", classifier_ref=ref, options={"adv_prob": 0.5})
        job = api.post("/v1/jobs", json=body)
        assert job.status_code == 202, job.text
        assert r.ttl(keys.classifier(hex_)) > 5  # a job uses it: its TTL started again
        job_id = job.json()["job_id"]

        busy = api.delete(f"/v1/classifiers/{ref}")
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"]["message"].startswith("classifier_ref:")
        assert job_id in busy.json()["error"]["message"]
        assert api.get(f"/v1/classifiers/{ref}").status_code == 200

        assert api.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        assert api.delete(f"/v1/classifiers/{ref}").status_code == 204
        assert not r.exists(keys.classifier(hex_), keys.classifier_meta(hex_), keys.classifier_jobs(hex_))
        assert api.get(f"/v1/classifiers/{ref}").status_code == 404
        assert api.delete(f"/v1/classifiers/{ref}").status_code == 404
        refused = api.post("/v1/jobs", json=body)
        assert refused.status_code == 422 and "classifier_ref" in refused.json()["error"]["message"]
    finally:
        r.close()


async def _store_job(settings: Settings, body: dict, items: list, bank_cap: int) -> None:
    """Submit ``body``, take it as one consumer would and store ``items`` (StoredItem) for it."""
    from actgen_shared.consumer import Consumer
    from actgen_shared.queue import JobQueue, connect
    from actgen_shared.schemas import JobRequest

    client = connect(settings.redis_url or "")
    try:
        q = JobQueue(client, settings)
        await q.ensure_group()
        await q.submit(JobRequest.model_validate(body))
        c = Consumer(q, "test-worker")
        [d] = await c.fetch(count=1, block_ms=100)
        assert await c.start(d)
        assert await c.store_items(d, items, bank_cap=bank_cap) == len(items)
    finally:
        await client.aclose()


def _guides(n: int) -> list[dict]:
    guide = codecs.png_to_b64(np.zeros((8, 8, 3), dtype=np.uint8))
    return [{"image": guide, "class_id": 0} for _ in range(n)]


async def _store_bank(settings: Settings, n: int, cap: int) -> None:
    from actgen_shared.consumer import StoredItem

    latent = codecs.latent_encode(np.zeros((4, 2, 2), dtype=np.float32))
    items = [StoredItem(index=k, class_id=0, guide_id=None, png=b"png", latent=latent) for k in range(n)]
    body = {"run_id": "run-bank", "label_set": "digits", "memory_bank_key": "bank-a", "items": _guides(n)}
    await _store_job(settings, body, items, bank_cap=cap)


def test_memory_bank_is_capped_per_class_and_expires(settings: Settings) -> None:
    import asyncio

    settings = settings.model_copy(update={"bank_ttl_s": TTL})
    asyncio.run(_store_bank(settings, n=5, cap=3))
    r = redis.Redis.from_url(settings.redis_url or "")
    try:
        key = settings.keys.bank("bank-a", 0)
        assert r.llen(key) == 3  # oldest out
        assert 0 < r.ttl(key) <= TTL
    finally:
        r.close()


def test_prompt_cache_is_an_lru_with_a_cap(sampler) -> None:  # type: ignore[no-untyped-def]
    from actgen_generator.sampler import GuidedSampler

    capped = GuidedSampler(sampler.model, prompt_cache_size=3)
    names = ["zero", "one", "two", "three", "four", "five"]
    first = {}
    for name in names:
        _, cond, _ = capped._encode_prompts([SimpleNamespace(class_name=name)])
        first[name] = cond[0].clone()
        assert len(capped._prompts) <= 3
    assert list(capped._prompts)[-1] == ("a photo of {}", "five")  # keyed by (template, class)
    _, again, _ = capped._encode_prompts([SimpleNamespace(class_name="zero")])  # evicted: encoded again
    assert np.allclose(again[0].numpy(), first["zero"].numpy())
    _, batch, _ = capped._encode_prompts([SimpleNamespace(class_name=n) for n in names])  # more than the cap
    assert batch.shape[0] == len(names) and len(capped._prompts) <= 3
    # another template, the same class: another prompt, another entry (not the cached one)
    _, other, _ = capped._encode_prompts([SimpleNamespace(class_name="zero")], "the digit {}")
    assert ("the digit {}", "zero") in capped._prompts
    assert not np.allclose(other[0].numpy(), first["zero"].numpy())


def test_redis_near_its_memory_cap_makes_submit_and_readyz_say_503() -> None:
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        try:
            settings = Settings(redis_url=server.url, api_key="k", redis_memory_high=0.9)
            with TestClient(create_app(settings, worker=False), headers=AUTH) as api:
                assert api.get("/readyz").status_code == 200
                used = int(r.info("memory")["used_memory"])
                r.config_set("maxmemory", int(used / 0.95))  # 95 % full
                r.config_set("maxmemory-policy", "noeviction")
                deadline = time.monotonic() + 10
                while (ready := api.get("/readyz")).status_code != 503:
                    assert time.monotonic() < deadline, "readyz never noticed the full Redis"
                    time.sleep(0.2)
                assert "Redis memory is near its cap" in ready.json()["error"]["message"]
                submit = api.post("/v1/jobs", json=job_body(new_run_id()))
                assert submit.status_code == 503 and submit.headers["retry-after"]
                assert "maxmemory" in submit.json()["error"]["message"]
                assert api.get("/healthz").status_code == 200
                r.config_set("maxmemory", 0)
                deadline = time.monotonic() + 10
                while api.get("/readyz").status_code != 200:
                    assert time.monotonic() < deadline, "readyz stayed 503 after the cap was lifted"
                    time.sleep(0.2)
                assert api.post("/v1/jobs", json=job_body(new_run_id())).status_code == 202
        finally:
            r.close()


def test_trainer_deletes_its_previous_classifiers_once_unused() -> None:
    """After each upload the trainer deletes the ones before; one still used by a job (409)
    stays listed and is tried again after the next upload."""
    from actgen_shared.client import GeneratorError
    from actgen_shared.run import ActGenRun
    from actgen_trainer.checkpoint import State

    class Client:
        def __init__(self) -> None:
            self.busy: set[str] = set()
            self.deleted: list[str] = []

        def delete_classifier(self, ref: str) -> bool:
            if ref in self.busy:
                raise GeneratorError(409, "conflict", f"classifier_ref: {ref} is used by 1 job")
            self.deleted.append(ref)
            return True

    client = Client()
    state = State(run_id="r")
    run = SimpleNamespace(ledger=state, client=client, log=logging.getLogger("test"))
    retire = ActGenRun.retire_classifiers  # what the trainer's link calls after each upload
    retire(run, keep="sha256:e0")  # type: ignore[arg-type]
    client.busy = {"sha256:e0"}  # epoch 0's job still runs
    retire(run, keep="sha256:e1")  # type: ignore[arg-type]
    assert state.classifiers == ["sha256:e0", "sha256:e1"] and client.deleted == []
    client.busy = set()
    retire(run, keep="sha256:e2")  # type: ignore[arg-type]
    assert client.deleted == ["sha256:e0", "sha256:e1"] and state.classifiers == ["sha256:e2"]
    retire(run)  # type: ignore[arg-type]  # the run is over
    assert state.classifiers == [] and client.deleted[-1] == "sha256:e2"


def test_the_work_of_one_job_and_bank_sample_are_capped(redis_url: str, key_prefix: str) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=key_prefix, max_job_image_steps=100, bank_cap=64)
    with TestClient(create_app(settings, worker=False)) as api:
        ok = api.post("/v1/jobs", json=job_body(new_run_id(), steps=10))  # 2 x 10 x 64x64: tiny
        assert ok.status_code == 202, ok.text
        big = api.post(
            "/v1/jobs", json=job_body(new_run_id(), steps=10, options={"height": 2048, "width": 2048})
        )
        assert big.status_code == 422
        message = big.json()["error"]["message"]
        assert message.startswith("options:") and "ACTGEN_MAX_JOB_IMAGE_STEPS" in message
        greedy = api.post("/v1/jobs", json=job_body(new_run_id(), options={"bank_sample": 65}))
        assert greedy.status_code == 422
        assert greedy.json()["error"]["message"].startswith("options.bank_sample: 65")


async def _store_results(settings: Settings, run_id: str, n: int, png_bytes: int) -> None:
    from actgen_shared.consumer import StoredItem

    items = [
        StoredItem(index=k, class_id=0, guide_id=None, png=bytes([k]) * png_bytes, latent=None)
        for k in range(n)
    ]
    await _store_job(settings, {"run_id": run_id, "label_set": "digits", "items": _guides(n)}, items, 1)


def test_a_results_page_is_capped_in_bytes_and_the_cursor_loses_nothing(
    redis_url: str, key_prefix: str
) -> None:
    import asyncio

    settings = Settings(redis_url=redis_url, key_prefix=key_prefix, max_results_bytes=25_000)
    run_id = new_run_id()
    asyncio.run(_store_results(settings, run_id, n=7, png_bytes=10_000))
    seen, pages, cursor = [], 0, "0-0"
    with TestClient(create_app(settings, worker=False)) as api:
        while True:
            page = api.get(f"/v1/runs/{run_id}/results", params={"after": cursor, "limit": 1000}).json()
            if not page["items"]:
                break
            assert len(page["items"]) <= 2  # 2 x 10 kB fit in 25 kB, a third does not
            seen += [item["index"] for item in page["items"]]
            cursor, pages = page["next"], pages + 1
    assert seen == list(range(7)) and pages == 4
