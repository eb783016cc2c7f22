"""Helpers for the generator-service tests: guide images, job bodies, replicas on loopback."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import redis

from actgen_shared import codecs
from actgen_shared.launcher import GeneratorProcess

SIZE = 64  # the smallest height/width the API accepts (the tiny model's native size is 32)
STEPS = 3


def guide_b64(seed: int = 0, size: int = 32) -> str:
    """A guide image: a coloured square on a noisy background (base64 PNG)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    lo, hi = size // 4, 3 * size // 4
    image[lo:hi, lo:hi] = rng.integers(120, 255, 3, dtype=np.uint8)
    return codecs.png_to_b64(image)


def job_body(
    run_id: str,
    n_items: int = 2,
    mode: str = "aig",
    steps: int = STEPS,
    seed: int | None = 1,
    **extra: Any,
) -> dict[str, Any]:
    options = {
        "mode": mode,
        "num_inference_steps": steps,
        "grad_steps": min(2, steps),
        "height": SIZE,
        "width": SIZE,
        "bank_sample": 8,
        **({"seed": seed} if seed is not None else {}),
        **extra.pop("options", {}),
    }
    body = {
        "run_id": run_id,
        "epoch": 0,
        "label_set": "digits",
        "items": [{"image": guide_b64(k), "class_id": k % 10, "guide_id": f"g{k}"} for k in range(n_items)],
        "options": options,
    }
    body.update(extra)
    return body


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def key_prefix_for(redis_url: str) -> Iterator[str]:
    """A key prefix for one module's servers; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


def replica(
    redis_url: str,
    prefix: str,
    replica_id: str | None,
    env: Mapping[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> GeneratorProcess:
    """A replica process; ``replica_id`` None: the replica's own unique default."""
    ids = {"ACTGEN_REPLICA_ID": replica_id} if replica_id else {}
    return GeneratorProcess(
        redis_url=redis_url,
        env={"ACTGEN_KEY_PREFIX": prefix, **ids, **(env or {})},
        extra_args=extra_args or [],
    )


def classifier_weights(num_classes: int = 10) -> bytes:
    """safetensors bytes of a fresh simple_cnn, as the trainer would upload it."""
    import torch
    from safetensors.torch import save

    from actgen_shared.architectures import build_classifier

    torch.manual_seed(0)
    model = build_classifier("simple_cnn", num_classes)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


CLASSIFIER_META = {
    "architecture": "simple_cnn",
    "num_classes": 10,
    "input_size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float, every_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)
