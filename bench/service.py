"""What the service adds over calling the sampler in-process (issue 4, `make bench`).

* ``service_overhead_ratio``: wall time of a job through REST + Redis + worker (submit until
  every result is readable from the run's results stream) divided by the same sampler call
  in-process; tiny model, CPU. Target: at most 1.05.

The replica runs as a real uvicorn process on loopback against a private redis-server. The
service's own cost per job (a replica whose sampler does nothing) is bench/noop.py.
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
from actgen_shared.schemas import GenerationOptions, JobRequest

ITEMS = 4
STEPS = 10
REPEATS = 5
SIZE = 64


def _guide(seed: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)


def _request(run_id: str, n_items: int, steps: int, seed: int) -> JobRequest:
    from actgen_shared import codecs

    return JobRequest(
        run_id=run_id,
        label_set="digits",
        items=[{"image": codecs.png_to_b64(_guide(k)), "class_id": k % 10} for k in range(n_items)],
        options=GenerationOptions(
            mode="aig", num_inference_steps=steps, grad_steps=0, height=SIZE, width=SIZE, seed=seed
        ),
    )


def _through_service(client: GeneratorClient, request: JobRequest) -> float:
    """Seconds from submit until all of the job's results are readable."""
    start = time.perf_counter()
    client.submit(request)
    got, cursor = 0, "0-0"
    while got < len(request.items):
        page = client.results(request.run_id, after=cursor, wait_s=30)
        got += len(page.items)
        cursor = page.next
    return time.perf_counter() - start


def _in_process_sampler() -> Any:
    """The same sampler call the worker makes, in this process; returns a timed callable."""
    from actgen_generator.pipeline import load_pipeline
    from actgen_generator.sampler import GuidedSampler, SampleItem

    sampler = GuidedSampler(load_pipeline(None, "cpu"))
    request = _request("inproc", ITEMS, STEPS, seed=1)
    names = request.resolved_class_names()
    items = [
        SampleItem(guide=_guide(k), class_id=k % 10, class_name=names[k % 10], seed=1 + k)
        for k in range(ITEMS)
    ]

    def timed() -> float:
        start = time.perf_counter()
        sampler(items, request.options, on_step=lambda step, total: True)
        return time.perf_counter() - start

    return timed


def run() -> dict[str, Any]:
    """The overhead ratio; returns a flat dict for bench/run.py's report."""
    results: dict[str, Any] = {}
    with EmbeddedRedis() as redis_server:
        env = {
            "ACTGEN_KEY_PREFIX": f"bench:{uuid.uuid4().hex[:8]}:",
            "ACTGEN_MAX_BATCH": str(ITEMS),
            "ACTGEN_DEVICE": "cpu",
        }
        # In-process first, with no replica alive: a replica idling beside the timed process (or
        # the bench process beside a replica) costs the other CPU time on a small machine, which
        # interleaving the two showed as a 2-3x "overhead" that was not the service's.
        in_process = _in_process_sampler()
        in_process()  # warm-up
        in_process_times = [in_process() for _ in range(REPEATS)]
        with (
            GeneratorProcess(
                redis_url=redis_server.url, env={**env, "ACTGEN_REPLICA_ID": "bench-guided"}
            ) as server,
            GeneratorClient(server.url) as client,
        ):
            _through_service(client, _request(f"warm-{uuid.uuid4().hex[:6]}", ITEMS, STEPS, 1))
            service_times = [
                _through_service(client, _request(f"svc-{uuid.uuid4().hex[:6]}", ITEMS, STEPS, 1))
                for _ in range(REPEATS)
            ]
        service = statistics.median(service_times)
        in_process_s = statistics.median(in_process_times)
        results.update(
            service_job_s=round(service, 4),
            in_process_job_s=round(in_process_s, 4),
            service_overhead_ratio=round(service / in_process_s, 4),
            service_overhead_target=1.03,
            service_job_items=ITEMS,
            service_job_steps=STEPS,
        )
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
