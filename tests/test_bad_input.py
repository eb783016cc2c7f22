"""Bad input gets a 4xx naming the problem; the server keeps serving and nothing is queued.

The replica runs API-only (``--no-worker``), so anything that slipped through validation
would sit in the queue: the queue must stay empty after every refusal. A schemathesis run
against the OpenAPI spec then fuzzes every route and must find no 500.
"""

from __future__ import annotations

import base64
import io
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from service_helpers import CLASSIFIER_META, classifier_weights, job_body, key_prefix_for, replica

from actgen_shared import codecs
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.settings import Settings

pytestmark = pytest.mark.slow
API_KEY = "s3cret-key"
MAX_ITEMS = 8
MAX_SIDE = 256
MAX_BODY = 1_000_000
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    with key_prefix_for(redis_url) as p:
        yield p


@pytest.fixture(scope="module")
def server(redis_url: str, prefix: str) -> Iterator[GeneratorProcess]:
    env = {
        "ACTGEN_API_KEY": API_KEY,
        "ACTGEN_MAX_ITEMS_PER_JOB": str(MAX_ITEMS),
        "ACTGEN_MAX_IMAGE_SIDE": str(MAX_SIDE),
        "ACTGEN_MAX_BODY_BYTES": str(MAX_BODY),
        "ACTGEN_MAX_CLASSIFIER_BYTES": str(20_000_000),
        "ACTGEN_MAX_WAIT_S": "1",  # long-polls of the fuzzer end quickly
    }
    with replica(redis_url, prefix, "bad-input", env=env, extra_args=["--no-worker"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server: GeneratorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def classifier_ref(http: httpx.Client) -> str:
    files = {"weights": ("c.safetensors", classifier_weights(), "application/octet-stream")}
    response = http.post("/v1/classifiers", files=files, data={"metadata": _json(CLASSIFIER_META)})
    assert response.status_code == 200, response.text
    return response.json()["ref"]


@pytest.fixture
def queue_stays_empty(redis_url: str, prefix: str, http: httpx.Client) -> Iterator[None]:
    yield
    keys = Settings(key_prefix=prefix).keys
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.xlen(keys.jobs_stream) == 0, "a refused request left a job in the stream"
        counts = {k.decode(): int(v) for k, v in r.hgetall(keys.jobs_by_status).items()}
        assert sum(counts.values()) == 0, counts
    finally:
        r.close()
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)


def _b64_image(size: int, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def _with(body: dict[str, Any], **options: Any) -> dict[str, Any]:
    body["options"].update(options)
    return body


def _item0(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body["items"][0].update(fields)
    return body


def _torch_zip() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def _wrong_safetensors() -> bytes:
    return codecs.tensors_encode({"fc.weight": np.zeros((2, 2), dtype=np.float32)})


BAD_JOBS: list[tuple[str, Any, str]] = [
    # (id, body builder, words the message must contain)
    ("bad-base64", lambda: _item0(job_body("r"), image="!!!not base64!!!"), "items[0].image"),
    (
        "not-an-image",
        lambda: _item0(job_body("r"), image=base64.b64encode(b"hello, world").decode()),
        "items[0].image: not a decodable image: 12 bytes that are not a PNG, JPEG or WEBP file",
    ),
    ("gif-image", lambda: _item0(job_body("r"), image=_b64_image(8, "GIF")), "GIF"),
    ("huge-image", lambda: _item0(job_body("r"), image=_b64_image(MAX_SIDE + 8)), f"larger than {MAX_SIDE}"),
    ("zero-items", lambda: {**job_body("r"), "items": []}, "items"),
    ("too-many-items", lambda: job_body("r", n_items=MAX_ITEMS + 1), "cap of 8"),
    ("class-out-of-range", lambda: _item0(job_body("r"), class_id=10), "items[0].class_id"),
    ("negative-class", lambda: _item0(job_body("r"), class_id=-1), "items[0].class_id"),
    ("unknown-mode", lambda: _with(job_body("r"), mode="turbo"), "options.mode"),
    ("negative-steps", lambda: _with(job_body("r"), num_inference_steps=-3), "options.num_inference_steps"),
    ("grad-steps-over-steps", lambda: _with(job_body("r", steps=4), grad_steps=9), "grad_steps"),
    ("fewshot-outside-ig", lambda: _with(job_body("r", mode="aig"), fewshot_u=0.5), "options.fewshot_u"),
    ("unknown-grad-norm", lambda: _with(job_body("r"), grad_norm="l1"), "options.grad_norm"),
    (
        "unknown-preset",
        lambda: _with(job_body("r"), preset="authors"),
        "options.preset: Input should be 'released', 'paper' or 'fast'",
    ),
    (
        "prompt-two-placeholders",
        lambda: _with(job_body("r"), prompt="a {} and a {}"),
        "options.prompt: must hold exactly one {}",
    ),
    (
        "prompt-no-placeholder",
        lambda: _with(job_body("r"), prompt="a photo of a cat"),
        "options.prompt: must hold exactly one {}",
    ),
    (
        "prompt-format-field",
        lambda: _with(job_body("r"), prompt="a {0.__class__} {}"),
        "options.prompt: must hold exactly one {}",
    ),
    (
        "prompt-glued-to-a-word",
        lambda: _with(job_body("r"), prompt="a photo of {}s"),
        "options.prompt: the class name must stand",
    ),
    (
        "prompt-too-long",
        lambda: _with(job_body("r"), prompt="a " * 200 + "{}"),
        "options.prompt: String should have at most 300",
    ),
    ("height-not-multiple-of-8", lambda: _with(job_body("r"), height=100), "options.height"),
    ("adv-prob-out-of-range", lambda: _with(job_body("r"), adv_prob=1.5), "options.adv_prob"),
    ("adv-without-classifier", lambda: _with(job_body("r", mode="actgen"), adv_prob=0.5), "classifier_ref"),
    ("unknown-classifier", lambda: job_body("r", classifier_ref="sha256:" + "ab" * 32), "classifier_ref"),
    ("malformed-classifier-ref", lambda: job_body("r", classifier_ref="md5:123"), "classifier_ref"),
    ("bad-run-id", lambda: job_body("bad run id!"), "run_id"),
    ("both-label-sources", lambda: job_body("r", class_names=["cat", "dog"]), "class_names or label_set"),
    ("no-label-source", lambda: {**job_body("r"), "label_set": None}, "class_names or label_set"),
    ("unknown-label-set", lambda: job_body("r", label_set="mnist"), "label_set"),
    ("unknown-field", lambda: job_body("r", colour="blue"), "colour"),
    ("missing-run-id", lambda: {k: v for k, v in job_body("r").items() if k != "run_id"}, "run_id"),
]


@pytest.mark.parametrize("builder, words", [(b, w) for _, b, w in BAD_JOBS], ids=[i for i, _, _ in BAD_JOBS])
def test_bad_job_is_refused(http: httpx.Client, queue_stays_empty: None, builder: Any, words: str) -> None:
    response = http.post("/v1/jobs", json=builder())
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert words in error["message"], error
    assert error["code"]


def test_classifier_with_wrong_class_count(
    http: httpx.Client, classifier_ref: str, queue_stays_empty: None
) -> None:
    body = job_body("r", classifier_ref=classifier_ref, label_set="cifar100")
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert "has 10 classes, the job names 100" in response.json()["error"]["message"]


def test_not_json(http: httpx.Client, queue_stays_empty: None) -> None:
    response = http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "headers, words",
    [
        ({}, "Bearer"),
        ({"Authorization": "Bearer wrong"}, "not the service's API key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
    ],
    ids=["missing", "wrong-key", "basic-auth"],
)
def test_auth(server: GeneratorProcess, queue_stays_empty: None, headers: dict, words: str) -> None:
    with httpx.Client(base_url=server.url, headers=headers) as anon:
        for method, path in [
            ("POST", "/v1/jobs"),
            ("GET", "/v1/info"),
            ("GET", "/metrics"),
            ("GET", "/v1/runs/r/results"),
            ("GET", "/v1/memory-banks/b"),
        ]:
            kwargs = {"json": job_body("r")} if method == "POST" else {}
            response = anon.request(method, path, **kwargs)
            assert response.status_code == 401, (path, response.text)
            assert words in response.json()["error"]["message"]
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/readyz").status_code == 200


def test_auth_comes_before_the_body(server: GeneratorProcess, queue_stays_empty: None) -> None:
    """Without the token, broken JSON is a 401 (not a 422: the body was never parsed)."""
    with httpx.Client(base_url=server.url) as anon:
        response = anon.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_large_body_without_token_is_refused_unread(
    server: GeneratorProcess, queue_stays_empty: None
) -> None:
    """The client announces a body just under the cap and sends 10 bytes of it: the 401 comes
    back anyway, so the server did not wait for (or read) the body."""
    import socket

    declared = MAX_BODY - 1000
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
            + b'{"run_id":'
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            assert chunk, "connection closed without a response"
            reply += chunk
    status_line = reply.split(b"\r\n", 1)[0]
    assert b" 401 " in status_line, reply[:300]
    assert b"connection: close" in reply.lower()


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_are_closed_without_the_token(server: GeneratorProcess, http: httpx.Client, path: str) -> None:
    with httpx.Client(base_url=server.url) as anon:
        assert anon.get(path).status_code == 401
    assert http.get(path).status_code == 200


def test_oversized_body(server: GeneratorProcess, http: httpx.Client, queue_stays_empty: None) -> None:
    big = job_body("r")
    big["items"][0]["guide_id"] = "x" * 200
    big["class_names"], big["label_set"] = ["n" * 150] * 10_000, None
    response = http.post("/v1/jobs", json=big)
    assert response.status_code == 413
    assert "request body" in response.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while streaming
        yield b'{"run_id": "r", "items": ['
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b'{"image": "' + b"A" * 10_000 + b'", "class_id": 0},'
        yield b"]}"

    response = http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "weights, meta, words",
    [
        (pickle.dumps({"fc.weight": [1.0, 2.0]}), CLASSIFIER_META, "weights: this is a pickle"),
        (None, CLASSIFIER_META, "zip"),
        (b"\x00\x01 definitely not tensors", CLASSIFIER_META, "not a safetensors file"),
        ("wrong", CLASSIFIER_META, "weights do not match simple_cnn"),
        ("good", {**CLASSIFIER_META, "architecture": "alexnet"}, "metadata.architecture"),
        (
            "good",
            {**CLASSIFIER_META, "architecture": "timm/alexnet9"},
            "is not a model of timm.list_models()",
        ),
        (
            "good",
            {**CLASSIFIER_META, "architecture": "timm/resnet18"},
            "timm/resnet18 with 10 classes: missing",
        ),
        ("good", {**CLASSIFIER_META, "num_classes": 7}, "weights do not match"),
        ("good", {**CLASSIFIER_META, "std": [0.5, 0.0, 0.5]}, "metadata.std"),
        ("good", "not json at all", "metadata"),
    ],
    ids=[
        "pickle",
        "torch-zip",
        "garbage",
        "wrong-tensors",
        "unknown-arch",
        "unknown-timm",
        "timm-wrong-weights",
        "wrong-classes",
        "zero-std",
        "metadata-not-json",
    ],
)
def test_bad_classifier_upload(
    http: httpx.Client, queue_stays_empty: None, weights: Any, meta: Any, words: str
) -> None:
    data = {None: _torch_zip, "wrong": _wrong_safetensors, "good": classifier_weights}
    payload = data[weights]() if weights is None or isinstance(weights, str) else weights
    files = {"weights": ("c.bin", payload, "application/octet-stream")}
    metadata = meta if isinstance(meta, str) else _json(meta)
    response = http.post("/v1/classifiers", files=files, data={"metadata": metadata})
    assert response.status_code == 422, response.text
    assert words in response.json()["error"]["message"]


def test_safetensors_upload_whose_first_byte_is_0x80_is_accepted(http: httpx.Client) -> None:
    """resnet50 with 1000 classes has a 28 800-byte header: its first byte is 0x80, pickle's
    PROTO opcode. It was refused as "looks like a pickle"; the header decides now."""
    from test_classifiers import weights_with_header_low_byte

    data = weights_with_header_low_byte(0x80)
    files = {"weights": ("c.safetensors", data, "application/octet-stream")}
    response = http.post("/v1/classifiers", files=files, data={"metadata": _json(CLASSIFIER_META)})
    assert response.status_code == 200, response.text
    assert response.json()["ref"].startswith("sha256:")


def test_classifier_upload_is_idempotent(http: httpx.Client, classifier_ref: str) -> None:
    files = {"weights": ("c.safetensors", classifier_weights(), "application/octet-stream")}
    again = http.post("/v1/classifiers", files=files, data={"metadata": _json(CLASSIFIER_META)})
    assert again.status_code == 200 and again.json()["ref"] == classifier_ref
    assert http.get(f"/v1/classifiers/{classifier_ref}").json()["architecture"] == "simple_cnn"


@pytest.mark.parametrize(
    "path, words",
    [
        ("/v1/runs/r/results?after=abc", "after"),
        ("/v1/runs/r/results?after=99999999999999999999-1", "out of range"),
        ("/v1/runs/r/results?limit=0", "limit"),
        ("/v1/runs/r/results?wait=-1", "wait"),
        ("/v1/runs/bad%20run/results", "run_id"),
        ("/v1/jobs/no-such-job", "no job"),
        ("/v1/jobs/bad%20id", "job_id"),
        ("/v1/jobs/abc/images/-1.png", "index"),
        ("/v1/jobs/abc/latents", "no job"),
        ("/v1/memory-banks/bad%20key", "key"),
        ("/v1/nowhere", "no route"),
    ],
    ids=lambda v: v if not v.startswith("/") else None,
)
def test_bad_reads(http: httpx.Client, queue_stays_empty: None, path: str, words: str) -> None:
    response = http.get(path)
    assert 400 <= response.status_code < 500, response.text
    assert words in response.json()["error"]["message"]


def test_a_good_job_is_accepted(http: httpx.Client, redis_url: str, prefix: str) -> None:
    """The same server accepts a valid job (so the refusals above were about the input)."""
    response = http.post("/v1/jobs", json=job_body("r"))
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_schemathesis_finds_no_server_error(server: GeneratorProcess, tmp_path: Path) -> None:
    """Fuzz every route of /openapi.json; any 500 fails the run."""
    cli = Path(sys.executable).with_name("schemathesis")
    command = [
        str(cli) if cli.exists() else "schemathesis",
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "20",
        "--seed",
        "1",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "--no-shrink",
        "--workers",
        "1",
        "--report-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts and int(counts.group(1)) >= 100 and counts.group(1) == counts.group(2), result.stdout[
        -3000:
    ]
