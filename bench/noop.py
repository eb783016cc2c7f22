"""The service's own cost per job (issue 12, part 1), on a replica whose sampler does nothing.

* ``noop_latency_ms``: one client, one-item jobs one after another: median and p99 of submit
  until the result is readable from the run's results stream, and where that time goes (from the
  job's own timestamps: HTTP until queued, queued until a worker started it, started until
  stored and finished, finished until the client holds the result).
* ``redis_cycle_ms``: the floor, one Redis Streams job cycle from the same client process with
  nothing else (XADD a job, XREADGROUP it, XADD its result, XREAD the result).
* ``noop_throughput``: jobs/s and latency p50/p99 with 1, 8 and 32 concurrent clients (asyncio,
  each submitting a job and long-polling its result, again and again), and the CPU milliseconds
  per job of the replica and of the clients.

One replica runs as a real uvicorn process (``serve --sampler echo``) on loopback against a
private redis-server. Targets: median <= 3 ms, p99 <= 10 ms, >= 300 jobs/s.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from typing import Any

import redis

from actgen_shared import codecs
from actgen_shared.client import AsyncGeneratorClient, GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_shared.schemas import START_CURSOR, GenerationOptions, JobRequest

LATENCY_JOBS = 300
WARMUP_JOBS = 30
CLIENTS = (1, 8, 32)
LOAD_SECONDS = 6.0
TARGET_MEDIAN_MS, TARGET_P99_MS, TARGET_JOBS_S = 3.0, 10.0, 300.0


def _job(run_id: str, seed: int) -> JobRequest:
    guide = codecs.png_to_b64(
        __import__("numpy").random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype="uint8")
    )
    return JobRequest(
        run_id=run_id,
        label_set="digits",
        items=[{"image": guide, "class_id": seed % 10}],
        options=GenerationOptions(
            mode="aig", num_inference_steps=1, grad_steps=0, height=64, width=64, seed=seed
        ),
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(url: str, redis_url: str, prefix: str) -> dict[str, Any]:
    """Sequential one-item jobs: submit until readable, with the job's own timestamps."""
    rows = []
    store = redis.Redis.from_url(redis_url)
    with GeneratorClient(url) as client:
        for j in range(WARMUP_JOBS + LATENCY_JOBS):
            request = _job(f"lat-{uuid.uuid4().hex[:8]}", j)
            t0 = time.time()
            accepted = client.submit(request)
            page = client.results(request.run_id, after=START_CURSOR, wait_s=30)
            t1 = time.time()
            if len(page.items) != 1:
                raise RuntimeError(f"job {accepted.job_id}: no result within 30 s")
            if j >= WARMUP_JOBS:
                job = {
                    k.decode(): v.decode() for k, v in store.hgetall(f"{prefix}job:{accepted.job_id}").items()
                }
                rows.append(
                    (t0, t1, float(job["created_at"]), float(job["started_at"]), float(job["finished_at"]))
                )
    totals = [1000 * (t1 - t0) for t0, t1, *_ in rows]

    def median_ms(index: int, start: int) -> float:
        return round(statistics.median(1000 * (r[index] - r[start]) for r in rows), 3)

    return {
        "median": round(statistics.median(totals), 3),
        "p99": round(_percentile(totals, 0.99), 3),
        "jobs": len(rows),
        "split_median_ms": {  # wall clock of one machine: the parts need not add up to the median
            "http_until_queued": median_ms(2, 0),
            "queued_until_started": median_ms(3, 2),
            "started_until_finished": median_ms(4, 3),
            "finished_until_read": median_ms(1, 4),
        },
        "target_median": TARGET_MEDIAN_MS,
        "target_p99": TARGET_P99_MS,
    }


def redis_cycle(redis_url: str) -> dict[str, float]:
    """The floor: one job's Streams cycle on the same Redis, from one process, nothing else."""
    r = redis.Redis.from_url(redis_url)
    jobs, results = f"floor:{uuid.uuid4().hex[:8]}:jobs", f"floor:{uuid.uuid4().hex[:8]}:results"
    r.xgroup_create(jobs, "g", id="0", mkstream=True)
    times = []
    for j in range(WARMUP_JOBS + LATENCY_JOBS):
        t0 = time.perf_counter()
        r.xadd(jobs, {"job_id": str(j)})
        (_, entries), *_ = r.xreadgroup("g", "c", {jobs: ">"}, count=1, block=1000)
        r.xack(jobs, "g", entries[0][0])
        r.xadd(results, {"job_id": str(j), "image": b"x" * 256})
        r.xread({results: "0-0"}, count=1)
        if j >= WARMUP_JOBS:
            times.append(1000 * (time.perf_counter() - t0))
    r.delete(jobs, results)
    return {"median": round(statistics.median(times), 3), "p99": round(_percentile(times, 0.99), 3)}


async def _client_loop(url: str, cid: int, deadline: float, latencies: list[float]) -> None:
    async with AsyncGeneratorClient(url, timeout_s=60) as client:
        body = json.loads(_job("x", cid).model_dump_json())
        j = 0
        while time.perf_counter() < deadline:
            body["run_id"] = f"load-{cid}-{j}-{uuid.uuid4().hex[:4]}"
            body["options"]["seed"] = j
            j += 1
            t0 = time.perf_counter()
            await client.submit(body)
            got, cursor = 0, START_CURSOR
            while not got:
                page = await client.results(body["run_id"], after=cursor, wait_s=30)
                got, cursor = len(page.items), page.next
            latencies.append(1000 * (time.perf_counter() - t0))


def throughput(url: str, replica_pid: int, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []

    async def load() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(_client_loop(url, k, deadline, latencies) for k in range(clients)))

    cpu0, replica0, t0 = time.process_time(), _cpu_seconds(replica_pid), time.perf_counter()
    asyncio.run(load())
    elapsed = time.perf_counter() - t0
    jobs = max(1, len(latencies))
    return {
        "clients": clients,
        "jobs_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(_percentile(latencies, 0.99), 2),
        "replica_cpu_ms_per_job": round(1000 * (_cpu_seconds(replica_pid) - replica0) / jobs, 3),
        "client_cpu_ms_per_job": round(1000 * (time.process_time() - cpu0) / jobs, 3),
    }


def run(seconds: float = LOAD_SECONDS) -> dict[str, Any]:
    """All three figures on one echo replica; returns a dict for bench/run.py's report."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    with EmbeddedRedis() as redis_server:
        env = {"ACTGEN_KEY_PREFIX": prefix, "ACTGEN_DEVICE": "cpu", "ACTGEN_REPLICA_ID": "bench-noop"}
        floor = redis_cycle(redis_server.url)
        with GeneratorProcess(
            redis_url=redis_server.url, env=env, extra_args=["--sampler", "echo"]
        ) as server:
            assert server.process is not None
            lat = latency(server.url, redis_server.url, prefix)
            throughput(server.url, server.process.pid, 4, 1.0)  # warm-up
            table = [throughput(server.url, server.process.pid, n, seconds) for n in CLIENTS]
    return {
        "noop_latency_ms": lat,
        "redis_cycle_ms": floor,
        "noop_throughput": table,
        "noop_throughput_target_jobs_s": TARGET_JOBS_S,
    }


def table(r: dict[str, Any]) -> str:
    lat, floor = r["noop_latency_ms"], r["redis_cycle_ms"]
    split = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in lat["split_median_ms"].items())
    lines = [
        f"no-op job through one echo replica: median {lat['median']:.2f} ms, p99 {lat['p99']:.2f} ms "
        f"(targets <= {lat['target_median']:g} / <= {lat['target_p99']:g}); one Redis Streams cycle "
        f"{floor['median']:.2f} ms",
        f"  where it goes (medians, ms): {split}",
        f"  {'clients':>8}{'jobs/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'replica CPU ms/job':>20}{'client CPU ms/job':>19}",
    ]
    lines += [
        f"  {t['clients']:>8}{t['jobs_s']:>9.1f}{t['p50_ms']:>9.2f}{t['p99_ms']:>9.2f}"
        f"{t['replica_cpu_ms_per_job']:>20.2f}{t['client_cpu_ms_per_job']:>19.2f}"
        for t in r["noop_throughput"]
    ]
    lines.append(f"  target >= {r['noop_throughput_target_jobs_s']:g} jobs/s")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
