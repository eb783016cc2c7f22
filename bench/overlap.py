"""What ``ACTGEN_OVERLAP_ENCODE`` saves (issue 26, `make bench BENCH_ARGS="--only overlap"`).

Two real replicas (uvicorn, the worker, the random-weight tiny model, CPU) on one private
redis-server, each on its own key prefix, one with the encode stage off and one with it on; the same
job (plain SD at ``SIZE`` px, ``ITEMS // BATCH`` batches) goes to each in turn, in rotating order,
``ROUNDS`` times (sized to take a few minutes on a 2-core CPU). The figure is the
median of the per-round ratios of the whole job's wall time (submit until every result is readable),
on / off, with the medians of both. An idle replica beside the timed one only waits on Redis.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from typing import Any

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis

ITEMS = 8
BATCH = 2
STEPS = 2
SIZE = 256
ROUNDS = 3


def _body(run_id: str) -> dict[str, Any]:
    import numpy as np

    from actgen_shared import codecs

    rng = np.random.default_rng(0)
    guides = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(ITEMS)]
    return {
        "run_id": run_id,
        "label_set": "digits",
        "items": [{"image": codecs.png_to_b64(g), "class_id": k % 10} for k, g in enumerate(guides)],
        "options": {"mode": "random", "num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "seed": 1},
    }


def _job_seconds(client: GeneratorClient) -> float:
    """Seconds from submit until all of the job's results are readable from its run's stream."""
    run_id = f"overlap-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    client.submit(_body(run_id))
    got, cursor = 0, "0-0"
    while got < ITEMS:
        page = client.results(run_id, after=cursor, wait_s=30)
        got += len(page.items)
        cursor = page.next
    return time.perf_counter() - start


def run(rounds: int = ROUNDS) -> dict[str, Any]:
    """Job seconds with the stage off and on, and the median per-round ratio on / off."""
    times: dict[str, list[float]] = {"off": [], "on": []}
    ratios = []
    with EmbeddedRedis() as redis_server:
        replicas = {
            name: GeneratorProcess(
                redis_url=redis_server.url,
                env={
                    "ACTGEN_KEY_PREFIX": f"bench:{uuid.uuid4().hex[:8]}:",
                    "ACTGEN_MAX_BATCH": str(BATCH),
                    "ACTGEN_DEVICE": "cpu",
                    "ACTGEN_OVERLAP_ENCODE": "1" if name == "on" else "0",
                },
            )
            for name in ("off", "on")
        }
        with replicas["off"] as off, replicas["on"] as on:
            clients = {"off": GeneratorClient(off.url), "on": GeneratorClient(on.url)}
            try:
                for client in clients.values():
                    _job_seconds(client)  # warm-up: first calls, allocator
                for r in range(rounds):
                    order = ("off", "on") if r % 2 == 0 else ("on", "off")
                    got = {name: _job_seconds(clients[name]) for name in order}
                    for name, seconds in got.items():
                        times[name].append(seconds)
                    ratios.append(got["on"] / got["off"])
            finally:
                for client in clients.values():
                    client.close()
    off_s, on_s = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "job_items": ITEMS,
        "batch": BATCH,
        "steps": STEPS,
        "size_px": SIZE,
        "rounds": rounds,
        "off_job_s": round(off_s, 3),
        "on_job_s": round(on_s, 3),
        "off_job_s_range": [round(min(times["off"]), 3), round(max(times["off"]), 3)],
        "on_job_s_range": [round(min(times["on"]), 3), round(max(times["on"]), 3)],
        "on_over_off_ratio": round(statistics.median(ratios), 4),
        "saved_s_per_batch": round((off_s - on_s) / (ITEMS // BATCH - 1), 4),
    }


def table(r: dict[str, Any]) -> str:
    return (
        f"overlap encode ({r['job_items']} items at {r['size_px']} px, batch {r['batch']}, "
        f"{r['steps']} steps, {r['rounds']} rounds): off {r['off_job_s']} s, on {r['on_job_s']} s, "
        f"on/off {r['on_over_off_ratio']} (median of per-round ratios), "
        f"{r['saved_s_per_batch']} s saved per overlapped batch"
    )


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
