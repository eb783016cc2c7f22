"""Tenants (docs/architecture.md, "Tenants"): keys map to a tenant and a role; another tenant's
job, run, memory bank and classifier are 404s; an idempotency key is the tenant's own and binds
its body; a read-only key only reads; each tenant's jobs in flight and bytes held are capped.

A real echo replica (uvicorn on loopback) on the real Redis; the quota tests run the real app
in-process (TestClient runs its lifespan) with small caps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from service_helpers import (
    CLASSIFIER_META,
    classifier_weights,
    guide_b64,
    job_body,
    key_prefix_for,
    new_run_id,
    replica,
    wait_until,
)

from actgen_generator.api import create_app
from actgen_generator.api.tenants import KeysError, Principal, key_hash, parse_keys
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.settings import Settings

pytestmark = pytest.mark.slow
WAIT_S = 60.0
KEY_A, KEY_B, KEY_READ, KEY_LEGACY = "key-of-team-a", "key-of-team-b", "read-key-of-team-a", "the-one-key"
KEYS = f"{key_hash(KEY_A)} team-a write\n{key_hash(KEY_B)} team-b\n{key_hash(KEY_READ)} team-a read  # monitoring\n"


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratorProcess]:
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text(KEYS)
    env = {"ACTGEN_API_KEYS": str(keys_file), "ACTGEN_API_KEY": KEY_LEGACY}
    with key_prefix_for(redis_url) as prefix:
        with replica(redis_url, prefix, None, env=env, extra_args=["--sampler", "echo"]) as proc:
            yield proc


def _client(server: GeneratorProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _done(client: httpx.Client, job_id: str) -> dict:
    def final() -> dict | None:
        state = client.get(f"/v1/jobs/{job_id}").json()
        return state if state["status"] in ("done", "failed", "cancelled") else None

    state = wait_until(final, f"job {job_id} to finish", WAIT_S)
    assert state["status"] == "done", state
    return state


def test_another_tenants_ids_are_404_and_its_idempotency_key_is_not_shared(server: GeneratorProcess) -> None:
    run = new_run_id()
    with _client(server, KEY_A) as a, _client(server, KEY_B) as b:
        ref = a.post(
            "/v1/classifiers",
            files={"weights": ("w.safetensors", classifier_weights())},
            data={"metadata": json.dumps(CLASSIFIER_META)},
        )
        assert ref.status_code == 200, ref.text
        ref_a = ref.json()["ref"]
        body_a = job_body(
            run, n_items=2, mode="actgen", memory_bank_key=run, idempotency_key=f"{run}:epoch0:rank0"
        )
        posted = a.post("/v1/jobs", json=body_a)
        assert posted.status_code == 202 and not posted.json()["duplicate"], posted.text
        job_a = posted.json()["job_id"]
        assert job_a.startswith("team-a.")
        _done(a, job_a)
        assert a.get(f"/v1/memory-banks/{run}").json()["counts"] == {"0": 1, "1": 1}

        # B sees none of it, on GET and DELETE alike
        for method, path in [
            ("GET", f"/v1/jobs/{job_a}"),
            ("DELETE", f"/v1/jobs/{job_a}"),
            ("GET", f"/v1/jobs/{job_a}/images/0.png"),
            ("GET", f"/v1/jobs/{job_a}/latents"),
            ("GET", f"/v1/runs/{run}/results"),
            ("GET", f"/v1/memory-banks/{run}"),
            ("DELETE", f"/v1/memory-banks/{run}"),
            ("GET", f"/v1/classifiers/{ref_a}"),
            ("DELETE", f"/v1/classifiers/{ref_a}"),
        ]:
            response = b.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
        assert a.get(f"/v1/memory-banks/{run}").json()["counts"] == {"0": 1, "1": 1}  # B deleted nothing
        assert a.get(f"/v1/classifiers/{ref_a}").status_code == 200

        # B posts the same run id with A's idempotency key first-come: a job of B's own
        body_b = job_body(run, n_items=3, idempotency_key=f"{run}:epoch0:rank0")
        for item in body_b["items"]:
            item["class_id"] = 7
        posted_b = b.post("/v1/jobs", json=body_b)
        assert posted_b.status_code == 202 and not posted_b.json()["duplicate"], posted_b.text
        job_b = posted_b.json()["job_id"]
        assert job_b != job_a and job_b.startswith("team-b.")
        _done(b, job_b)

        # A's results hold only A's job, B's only B's
        results_a = a.get(f"/v1/runs/{run}/results").json()["items"]
        results_b = b.get(f"/v1/runs/{run}/results").json()["items"]
        assert {r["job_id"] for r in results_a} == {job_a} and len(results_a) == 2
        assert {r["job_id"] for r in results_b} == {job_b} and {r["class_id"] for r in results_b} == {7}

        # A's own key again: the same body is its first job, a changed body a 422
        again = a.post("/v1/jobs", json=body_a)
        assert again.status_code == 202 and again.json()["duplicate"] is True
        assert again.json()["job_id"] == job_a
        changed = dict(body_a, items=[dict(body_a["items"][0], image=guide_b64(99))])
        conflict = a.post("/v1/jobs", json=changed)
        assert conflict.status_code == 422, conflict.text
        assert "idempotency_key" in conflict.json()["error"]["message"]

        # A deletes its own bank (204, then found empty) and classifier
        assert a.delete(f"/v1/memory-banks/{run}").status_code == 204
        assert a.get(f"/v1/memory-banks/{run}").json()["counts"] == {}
        assert a.delete(f"/v1/classifiers/{ref_a}").status_code == 204


def test_a_read_only_key_reads_and_never_writes(server: GeneratorProcess) -> None:
    with _client(server, KEY_READ) as reader, _client(server, KEY_A) as a:
        assert reader.get("/metrics").status_code == 200
        assert reader.get("/v1/info").status_code == 200
        refused = reader.post("/v1/jobs", json=job_body(new_run_id()))
        assert refused.status_code == 403 and "role is read" in refused.json()["error"]["message"]
        job_id = a.post("/v1/jobs", json=job_body(new_run_id())).json()["job_id"]
        assert reader.get(f"/v1/jobs/{job_id}").status_code == 200  # the same tenant's job
        assert reader.delete(f"/v1/jobs/{job_id}").status_code == 403


def test_the_single_api_key_is_the_default_tenant(server: GeneratorProcess) -> None:
    with _client(server, KEY_LEGACY) as legacy, _client(server, KEY_A) as a:
        run = new_run_id()
        job_id = legacy.post("/v1/jobs", json=job_body(run)).json()["job_id"]
        assert "." not in job_id  # the default tenant's ids and keys are those of earlier versions
        _done(legacy, job_id)
        assert len(legacy.get(f"/v1/runs/{run}/results").json()["items"]) == 2
        assert a.get(f"/v1/jobs/{job_id}").status_code == 404
    with httpx.Client(base_url=server.url) as anon:
        assert anon.get("/v1/info").status_code == 401


def test_keys_entries_are_checked_and_a_bad_file_stops_the_replica(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert parse_keys(f"{key_hash('k')} t1 read; {key_hash('j')} t2") == {
        bytes.fromhex(key_hash("k")[7:]): Principal("t1", "read"),
        bytes.fromhex(key_hash("j")[7:]): Principal("t2", "write"),
    }
    for bad, words in [
        ("plain-key team-a", "entry 1"),
        (f"{key_hash('k')} Team.A", "tenant 'Team.A'"),
        (f"{key_hash('k')} team-a admin", "role 'admin'"),
    ]:
        with pytest.raises(KeysError, match=words):
            parse_keys(bad)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{key_hash('k')} team-a superuser\n")
    done = subprocess.run(
        [sys.executable, "-m", "actgen_generator", "serve", "--sampler", "echo", "--port", "1"],
        env={**os.environ, "ACTGEN_API_KEYS": str(keys_file), "REDIS_URL": "redis://127.0.0.1:1/0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "role 'superuser'" in done.stderr


@pytest.fixture
def capped(redis_url: str, key_prefix: str) -> Iterator[TestClient]:
    settings = Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        api_keys=f"{key_hash(KEY_A)} team-a; {key_hash(KEY_B)} team-b",
        tenant_max_jobs=2,
        tenant_max_bytes=200_000,
    )
    with TestClient(create_app(settings, worker=False)) as client:
        yield client


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_tenant_is_capped_in_jobs_in_flight_and_bytes_held(capped: TestClient) -> None:
    run = new_run_id()
    first = capped.post("/v1/jobs", json=job_body(run), headers=_as(KEY_A))
    assert first.status_code == 202
    assert capped.post("/v1/jobs", json=job_body(run), headers=_as(KEY_A)).status_code == 202
    third = capped.post("/v1/jobs", json=job_body(run), headers=_as(KEY_A))
    assert third.status_code == 429 and "ACTGEN_TENANT_MAX_JOBS" in third.json()["error"]["message"]
    assert third.headers["Retry-After"]
    assert capped.post("/v1/jobs", json=job_body(run), headers=_as(KEY_B)).status_code == 202  # B's own cap
    # a finished (here: cancelled) job gives its place back
    assert capped.delete(f"/v1/jobs/{first.json()['job_id']}", headers=_as(KEY_A)).status_code == 200
    assert capped.post("/v1/jobs", json=job_body(run), headers=_as(KEY_A)).status_code == 202

    big = job_body(new_run_id(), n_items=1)
    big["items"][0]["image"] = guide_b64(size=400)  # noise: its PNG is ~ 500 KB of base64
    refused = capped.post("/v1/jobs", json=big, headers=_as(KEY_B))
    assert refused.status_code == 429 and "ACTGEN_TENANT_MAX_BYTES" in refused.json()["error"]["message"]
