"""Settings read from the environment, one typed place for both services.

Each default is written once, on its field; ``Settings.from_env`` reads the variable named in
``ENV`` for each field and falls back to that default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from actgen_shared.keys import Keys


@dataclass(frozen=True)
class Settings:
    """Everything configurable about a deployment.

    ``redis_url`` None means "start an embedded redis-server"; ``model`` None means "build the
    tiny SD-architecture model".
    """

    redis_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    public_docs: bool = False  # /docs, /redoc, /openapi.json without the API key
    key_prefix: str = "actgen:"
    result_ttl_s: int = 7 * 24 * 3600
    lease_s: float = 30.0  # heartbeat expiry: a consumer silent this long is dead
    heartbeat_interval_s: float = 5.0
    pending_rescan_s: float = 30.0  # a replica re-reads its own pending entries this often
    max_deliveries: int = 3
    max_items_per_job: int = 256
    max_job_image_steps: int = 25_600  # items x steps x (height x width / 512^2) of one job
    max_results_bytes: int = 32 * 1024 * 1024  # images in one page of GET /v1/runs/{run}/results
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_side: int = 1024
    max_classifier_bytes: int = 512 * 1024 * 1024
    classifier_ttl_s: int = 3 * 24 * 3600  # unused this long (no queued or running job): deleted
    max_batch: int = 8
    bank_cap: int = 4096  # latents kept per class of a memory bank (oldest out)
    bank_ttl_s: int = 7 * 24 * 3600  # a bank not written this long is deleted
    prompt_cache_size: int = 1024  # prompt embeddings a replica keeps (least recently used out)
    redis_memory_high: float = 0.9  # used_memory / maxmemory at which submit and /readyz say 503
    results_stream_maxlen: int = 1_000_000
    max_wait_s: float = 60.0  # longest long-poll of GET /v1/runs/{run}/results; longer waits are cut to it
    device: str | None = None
    dtype: str | None = None
    replica_id: str | None = None
    echo_step_s: float = 0.0  # `serve --sampler echo` only: seconds per step (chaos runs)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @classmethod
    def from_env(cls) -> "Settings":
        """Read ``REDIS_URL``, ``ACTGEN_MODEL``, ``ACTGEN_API_KEY`` and the ``ACTGEN_*`` knobs."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for name, var in ENV.items():
            raw = os.environ.get(var)
            if raw is None or raw == "":
                continue
            values[name] = _parse(var, raw, defaults[name], _TYPES.get(name))
        return cls(**values)  # type: ignore[arg-type]


# field -> environment variable
ENV: dict[str, str] = {
    "redis_url": "REDIS_URL",
    "model": "ACTGEN_MODEL",
    "api_key": "ACTGEN_API_KEY",
    "public_docs": "ACTGEN_PUBLIC_DOCS",
    "key_prefix": "ACTGEN_KEY_PREFIX",
    "result_ttl_s": "ACTGEN_RESULT_TTL_S",
    "lease_s": "ACTGEN_LEASE_S",
    "heartbeat_interval_s": "ACTGEN_HEARTBEAT_S",
    "pending_rescan_s": "ACTGEN_PENDING_RESCAN_S",
    "max_deliveries": "ACTGEN_MAX_DELIVERIES",
    "max_items_per_job": "ACTGEN_MAX_ITEMS_PER_JOB",
    "max_job_image_steps": "ACTGEN_MAX_JOB_IMAGE_STEPS",
    "max_results_bytes": "ACTGEN_MAX_RESULTS_BYTES",
    "max_body_bytes": "ACTGEN_MAX_BODY_BYTES",
    "max_image_side": "ACTGEN_MAX_IMAGE_SIDE",
    "max_classifier_bytes": "ACTGEN_MAX_CLASSIFIER_BYTES",
    "classifier_ttl_s": "ACTGEN_CLASSIFIER_TTL_S",
    "max_batch": "ACTGEN_MAX_BATCH",
    "bank_cap": "ACTGEN_BANK_CAP",
    "bank_ttl_s": "ACTGEN_BANK_TTL_S",
    "prompt_cache_size": "ACTGEN_PROMPT_CACHE_SIZE",
    "redis_memory_high": "ACTGEN_REDIS_MEMORY_HIGH",
    "max_wait_s": "ACTGEN_MAX_WAIT_S",
    "device": "ACTGEN_DEVICE",
    "dtype": "ACTGEN_DTYPE",
    "replica_id": "ACTGEN_REPLICA_ID",
    "echo_step_s": "ACTGEN_ECHO_STEP_S",
}

_TYPES: dict[str, type] = {
    "public_docs": bool, "result_ttl_s": int, "lease_s": float, "heartbeat_interval_s": float,
    "pending_rescan_s": float, "max_deliveries": int, "max_items_per_job": int,
    "max_job_image_steps": int, "max_results_bytes": int,
    "max_body_bytes": int, "max_image_side": int, "max_classifier_bytes": int,
    "classifier_ttl_s": int, "max_batch": int, "bank_cap": int, "bank_ttl_s": int,
    "prompt_cache_size": int, "redis_memory_high": float, "max_wait_s": float, "echo_step_s": float,
}


def _parse(var: str, raw: str, default: object, kind: type | None) -> object:
    if kind is None:
        return raw
    if kind is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"environment variable {var} must be 0 or 1, got {raw!r}")
    try:
        return kind(raw)
    except ValueError as exc:
        word = "an integer" if kind is int else "a number"
        raise ValueError(f"environment variable {var} must be {word}, got {raw!r}") from exc
