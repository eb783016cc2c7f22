"""Replica scaling on one Redis (issue 12, part 4): throughput with 1, 2, 4 and 8 replicas.

Each replica is a real ``actgen-generator serve --sampler echo`` process whose batch takes a
fixed time (``ACTGEN_ECHO_STEP_S`` per step, one step per job: a stand-in for a GPU-bound
replica, no model, no CPU while it "computes"); one more process, API only (``--no-worker``),
takes the submissions. With the N workers idle and ready, ``JOBS_PER_REPLICA * N`` jobs of
``ITEMS`` items (one full batch each) are submitted by concurrent clients; the figures come from
the jobs' own ``started_at``/``finished_at``/``replica``:

* ``items_per_s``: items / (last finish - first start); ``scaling`` = that / (N * one replica's).
  Target: >= 0.9 N.
* ``busy_fraction``: per replica, the time its batches took (jobs x ``BATCH_S``) over the whole
  run (first start to last finish), while the backlog was non-empty for all but the last batch;
  the minimum over replicas is the "no replica idle while jobs wait" figure (1.0 = never idle;
  ``backlog_s``: how long jobs were still waiting after the last submission).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_shared.schemas import GenerationOptions, JobRequest, JobState

REPLICAS = (1, 2, 4, 8)
BATCH_S = 0.5  # one batch's fixed duration
ITEMS = 8  # items per job = ACTGEN_MAX_BATCH: one job, one batch
JOBS_PER_REPLICA = 10
SUBMITTERS = 4
TARGET_SCALING = 0.9


def _request(run_id: str, seed: int) -> JobRequest:
    import numpy as np

    from actgen_shared import codecs

    guide = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return JobRequest(
        run_id=run_id,
        label_set="digits",
        items=[{"image": codecs.png_to_b64(guide), "class_id": k % 10} for k in range(ITEMS)],
        options=GenerationOptions(mode="random", num_inference_steps=1, grad_steps=0, seed=seed),
    )


def _busy(states: list[JobState], start: float, end: float) -> dict[str, float]:
    """Per replica: its batches' fixed time (jobs x BATCH_S) over [start, end], the whole run.

    A job's ``started_at`` is when the replica took it, which may be before its batch runs (a
    replica takes the next job while one runs), so the busy time is counted from the fixed batch
    duration instead: 1.0 means the replica slept in batches the whole time, never idle.
    """
    span = max(end - start, 1e-9)
    replicas = sorted({s.replica for s in states if s.replica})
    return {r: sum(1 for s in states if s.replica == r) * BATCH_S / span for r in replicas}


def measure(n: int, redis_url: str, gateway: GeneratorClient, env: dict[str, str]) -> dict[str, Any]:
    """Start ``n`` echo replicas, run ``JOBS_PER_REPLICA * n`` jobs through them, stop them."""
    replicas = [
        GeneratorProcess(
            redis_url=redis_url,
            extra_args=["--sampler", "echo"],
            env={**env, "ACTGEN_REPLICA_ID": f"scale{n}-{k}"},
        )
        for k in range(n)
    ]
    starters = [threading.Thread(target=r.start) for r in replicas]
    try:
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        if not all(r.alive() for r in replicas):
            raise RuntimeError("a replica did not start:\n" + "\n".join(r.log_tail(800) for r in replicas))
        run_id = f"scale-{n}-{uuid.uuid4().hex[:6]}"
        jobs = JOBS_PER_REPLICA * n
        requests = [_request(run_id, seed) for seed in range(jobs)]
        first_submit = time.time()
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            accepted = list(pool.map(gateway.submit, requests))
        all_submitted = time.time()
        states = [gateway.wait(a.job_id, timeout_s=120 + jobs * BATCH_S, poll_s=0.2) for a in accepted]
    finally:
        for r in replicas:
            r.stop()
    if any(s.status.value != "done" for s in states):
        raise RuntimeError(f"not every job finished: {[s.status.value for s in states]}")
    first_start = min(s.started_at or 0.0 for s in states)
    last_finish = max(s.finished_at or 0.0 for s in states)
    last_start = max(s.started_at or 0.0 for s in states)
    busy = _busy(states, first_start, last_finish)
    per_replica_jobs = {r: sum(1 for s in states if s.replica == r) for r in sorted(busy)}
    return {
        "replicas": n,
        "jobs": jobs,
        "items": jobs * ITEMS,
        "items_per_s": jobs * ITEMS / (last_finish - first_start),
        "submit_s": all_submitted - first_submit,
        "backlog_s": max(0.0, last_start - all_submitted),
        "busy_fraction": busy,
        "busy_fraction_min": min(busy.values()) if busy else 0.0,
        "jobs_per_replica": per_replica_jobs,
        "job_s_median": statistics.median((s.finished_at or 0.0) - (s.started_at or 0.0) for s in states),
    }


def run(replicas: tuple[int, ...] = REPLICAS) -> dict[str, Any]:
    """The ``scaling`` section: one row per replica count, and each row's scaling vs one replica."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    env = {
        "ACTGEN_KEY_PREFIX": prefix,
        "ACTGEN_MAX_BATCH": str(ITEMS),
        "ACTGEN_ECHO_STEP_S": str(BATCH_S),
        "ACTGEN_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    rows: list[dict[str, Any]] = []
    with (
        EmbeddedRedis() as redis_server,
        GeneratorProcess(
            redis_url=redis_server.url,
            extra_args=["--no-worker", "--sampler", "echo"],
            env={**env, "ACTGEN_REPLICA_ID": "scale-gateway"},
        ) as gateway_process,
        GeneratorClient(gateway_process.url, timeout_s=60) as gateway,
    ):
        for n in replicas:
            rows.append(measure(n, redis_server.url, gateway, env))
    base = rows[0]["items_per_s"] / rows[0]["replicas"]
    for row in rows:
        row["scaling"] = row["items_per_s"] / base  # in replicas' worth: ideal = N
        row["scaling_over_n"] = row["scaling"] / row["replicas"]
    return {
        "batch_s": BATCH_S,
        "items_per_job": ITEMS,
        "jobs_per_replica": JOBS_PER_REPLICA,
        "submitters": SUBMITTERS,
        "ideal_items_per_s_per_replica": ITEMS / BATCH_S,
        "target_scaling_over_n": TARGET_SCALING,
        "rows": rows,
    }


def table(r: dict[str, Any]) -> str:
    """Printable lines of :func:`run`'s result."""
    lines = [
        f"scaling: echo replicas, {r['batch_s']} s per batch of {r['items_per_job']}, "
        f"{r['jobs_per_replica']} jobs per replica, one Redis (ideal {r['ideal_items_per_s_per_replica']:.0f} "
        f"items/s per replica)",
        f"  {'N':>3}{'items/s':>10}{'scaling':>9}{'/N':>7}{'min busy':>10}{'backlog s':>11}",
    ]
    for row in r["rows"]:
        lines.append(
            f"  {row['replicas']:>3}{row['items_per_s']:>10.1f}{row['scaling']:>9.2f}"
            f"{row['scaling_over_n']:>7.2f}{row['busy_fraction_min']:>10.2f}{row['backlog_s']:>11.2f}"
        )
    lines.append(f"  target scaling/N >= {r['target_scaling_over_n']}, busy fraction while jobs wait ~1.0")
    return "\n".join(lines)


if __name__ == "__main__":
    result = run()
    print(table(result))
    print(json.dumps(result, indent=2))
