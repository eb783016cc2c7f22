"""Cheap requests stay cheap (docs/architecture.md, "Cheap requests"): long-polls are bounded and
on connections of their own, a classifier upload is checked on the meta device before memory is
spent, and a job's body is dropped from Redis when it ends.

A real echo replica (uvicorn on loopback) on the real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from service_helpers import guide_b64, job_body, key_prefix_for, new_run_id, replica, wait_until

from actgen_shared.launcher import GeneratorProcess

pytestmark = pytest.mark.slow
WAIT_S = 120.0
MAX_LONG_POLLS = 32
POLLS = 150
POLL_WAIT_S = 10


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    with key_prefix_for(redis_url) as prefix:
        yield prefix


@pytest.fixture(scope="module")
def server(redis_url: str, prefix: str) -> Iterator[GeneratorProcess]:
    env = {"ACTGEN_MAX_LONG_POLLS": str(MAX_LONG_POLLS)}
    with replica(redis_url, prefix, None, env=env, extra_args=["--sampler", "echo"]) as proc:
        yield proc


def _finish(client: httpx.Client, job_id: str) -> None:
    def final() -> bool:
        return client.get(f"/v1/jobs/{job_id}").json()["status"] in ("done", "failed", "cancelled")

    wait_until(final, f"job {job_id} to finish", WAIT_S)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "done"


def test_many_long_polls_leave_submit_and_readyz_alone(server: GeneratorProcess) -> None:
    run = new_run_id()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        job_id = client.post("/v1/jobs", json=job_body(run)).json()["job_id"]
        _finish(client, job_id)
        cursor = client.get(f"/v1/runs/{run}/results").json()["next"]  # the end: polls will wait

    async def scenario() -> tuple[list[httpx.Response], float, int]:
        limits = httpx.Limits(max_connections=POLLS + 10, max_keepalive_connections=POLLS + 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            polls = [
                asyncio.create_task(
                    http.get(f"/v1/runs/{run}/results", params={"after": cursor, "wait": POLL_WAIT_S})
                )
                for _ in range(POLLS)
            ]
            deadline = time.monotonic() + POLL_WAIT_S - 2
            while sum(t.done() for t in polls) < POLLS - MAX_LONG_POLLS and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the refused ones are answered at once, the others wait
            metrics = (await http.get("/metrics")).text
            waiting = int(
                float(
                    next(
                        line.split()[1]
                        for line in metrics.splitlines()
                        if line.startswith("actgen_long_polls ")
                    )
                )
            )
            started = time.monotonic()
            posted = await http.post("/v1/jobs", json=job_body(new_run_id()))
            took = time.monotonic() - started
            assert posted.status_code == 202, posted.text
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            return list(await asyncio.gather(*polls)), took, waiting

    responses, took, waiting = asyncio.run(scenario())
    assert took < 1.0, f"POST /v1/jobs took {took:.2f} s during {POLLS} long-polls"
    assert waiting == MAX_LONG_POLLS
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) == MAX_LONG_POLLS  # they waited, and ended empty
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.headers["Retry-After"] == "1" and "ACTGEN_MAX_LONG_POLLS" in r.text for r in refused)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_tiny_upload_naming_a_large_model_is_refused_at_once(server: GeneratorProcess) -> None:
    import torch
    from safetensors.torch import save

    weights = save({"w": torch.zeros(1)})  # a real safetensors file, of a single float
    assert len(weights) < 100
    meta = {"architecture": "timm/vit_large_patch16_224", "num_classes": 10, "input_size": 224}
    assert server.pid is not None
    before = _rss_mb(server.pid)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        started = time.monotonic()
        response = client.post(
            "/v1/classifiers",
            files={"weights": ("w.safetensors", weights)},
            data={"metadata": json.dumps(meta)},
        )
        took = time.monotonic() - started
    grew = _rss_mb(server.pid) - before
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "metadata.architecture" in message and "ACTGEN_MAX_CLASSIFIER_PARAMS" in message
    assert took < 1.0, f"{took:.2f} s"
    assert grew < 50, f"RSS grew {grew:.0f} MB"


def test_a_header_that_does_not_match_the_architecture_is_refused_before_loading(
    server: GeneratorProcess,
) -> None:
    import torch
    from safetensors.torch import save

    weights = save({"0.0.weight": torch.zeros(32, 3, 3, 3), "extra": torch.zeros(2)})
    meta = {"architecture": "simple_cnn", "num_classes": 10, "input_size": 32}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(
            "/v1/classifiers",
            files={"weights": ("w.safetensors", weights)},
            data={"metadata": json.dumps(meta)},
        )
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message.startswith("weights:") and "missing" in message and "unexpected 1 (extra)" in message


def test_a_big_body_is_dropped_from_redis_when_its_job_ends(
    server: GeneratorProcess, redis_url: str, prefix: str
) -> None:
    body = job_body(new_run_id(), n_items=1)
    big = guide_b64(seed=3, size=1024)  # a noisy 1024 px guide: ~3 MB of base64
    body["items"] = [{"image": big, "class_id": k % 10} for k in range(60 * 2**20 // len(big))]
    raw = json.dumps(body).encode()
    assert 55 * 2**20 < len(raw) < 64 * 2**20
    with httpx.Client(base_url=server.url, timeout=120) as client:
        posted = client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert posted.status_code == 202, posted.text[:500]
        job_id = posted.json()["job_id"]
        _finish(client, job_id)
    r = redis.Redis.from_url(redis_url)
    try:
        size = r.memory_usage(f"{prefix}job:{job_id}")
        assert r.hget(f"{prefix}job:{job_id}", "request") is None
    finally:
        r.close()
    assert size is not None and size < 2**20, f"{size} bytes"


def test_the_server_answers_503_past_its_concurrency_limit(redis_url: str, key_prefix: str) -> None:
    """uvicorn's limit_concurrency (ACTGEN_LIMIT_CONCURRENCY): a few long-polls wait; of many more
    arriving while they do, those past the limit are refused with 503 at once instead of waiting.
    (uvicorn counts open connections, the asking one included: at most limit - 1 wait.)"""
    limit = 8
    env = {"ACTGEN_LIMIT_CONCURRENCY": str(limit)}
    # a prefix of its own: the module's echo replica would otherwise run this job and end the polls
    with replica(
        redis_url, key_prefix, None, env=env, extra_args=["--sampler", "echo", "--no-worker"]
    ) as proc:
        run = new_run_id()
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            assert client.post("/v1/jobs", json=job_body(run)).status_code == 202  # the run is known

        async def timed(http: httpx.AsyncClient) -> tuple[int, float]:
            started = time.monotonic()
            response = await http.get(f"/v1/runs/{run}/results", params={"wait": 5})
            return response.status_code, time.monotonic() - started

        async def scenario() -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
            limits = httpx.Limits(max_connections=4 * limit)
            async with httpx.AsyncClient(base_url=proc.url, timeout=30, limits=limits) as http:
                first = [asyncio.create_task(timed(http)) for _ in range(limit // 2)]
                await asyncio.sleep(1.0)  # these are waiting (they end after 5 s)
                rest = await asyncio.gather(*(timed(http) for _ in range(2 * limit)))
                return list(await asyncio.gather(*first)), list(rest)

        first, rest = asyncio.run(scenario())
    assert all(status == 200 and took > 4 for status, took in first), first
    waited = [took for status, took in rest if status == 200]
    refused = [took for status, took in rest if status == 503]
    assert len(waited) + len(refused) == len(rest), rest
    assert len(first) + len(waited) <= limit - 1 and all(took > 4 for took in waited), rest
    assert len(refused) >= len(rest) - (limit - 1 - len(first)) and all(took < 2 for took in refused), rest
