"""Settings read from the environment, one typed place for both services."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from actgen_shared.keys import Keys


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    """Everything configurable about a deployment.

    ``redis_url`` None means "start an embedded redis-server"; ``model`` None means "build the
    tiny SD-architecture model".
    """

    redis_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    key_prefix: str = "actgen:"
    result_ttl_s: int = 7 * 24 * 3600
    lease_s: float = 30.0  # heartbeat expiry: a consumer silent this long is dead
    heartbeat_interval_s: float = 5.0
    max_deliveries: int = 3
    max_items_per_job: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_side: int = 1024
    max_classifier_bytes: int = 512 * 1024 * 1024
    max_batch: int = 8
    bank_cap: int = 4096
    results_stream_maxlen: int = 1_000_000
    max_wait_s: float = 60.0  # longest long-poll of GET /v1/runs/{run}/results; longer waits are cut to it
    device: str | None = None
    dtype: str | None = None
    replica_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @classmethod
    def from_env(cls) -> "Settings":
        """Read ``REDIS_URL``, ``ACTGEN_MODEL``, ``ACTGEN_API_KEY`` and the ``ACTGEN_*`` knobs."""
        env = os.environ
        return cls(
            redis_url=env.get("REDIS_URL") or None,
            model=env.get("ACTGEN_MODEL") or None,
            api_key=env.get("ACTGEN_API_KEY") or None,
            key_prefix=env.get("ACTGEN_KEY_PREFIX", "actgen:"),
            result_ttl_s=_env_int("ACTGEN_RESULT_TTL_S", 7 * 24 * 3600),
            lease_s=_env_float("ACTGEN_LEASE_S", 30.0),
            heartbeat_interval_s=_env_float("ACTGEN_HEARTBEAT_S", 5.0),
            max_deliveries=_env_int("ACTGEN_MAX_DELIVERIES", 3),
            max_items_per_job=_env_int("ACTGEN_MAX_ITEMS_PER_JOB", 256),
            max_body_bytes=_env_int("ACTGEN_MAX_BODY_BYTES", 64 * 1024 * 1024),
            max_image_side=_env_int("ACTGEN_MAX_IMAGE_SIDE", 1024),
            max_classifier_bytes=_env_int("ACTGEN_MAX_CLASSIFIER_BYTES", 512 * 1024 * 1024),
            max_batch=_env_int("ACTGEN_MAX_BATCH", 8),
            bank_cap=_env_int("ACTGEN_BANK_CAP", 4096),
            max_wait_s=_env_float("ACTGEN_MAX_WAIT_S", 60.0),
            device=env.get("ACTGEN_DEVICE") or None,
            dtype=env.get("ACTGEN_DTYPE") or None,
            replica_id=env.get("ACTGEN_REPLICA_ID") or None,
        )
