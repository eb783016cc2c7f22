"""Settings read from the environment, one typed place for both services.

Each field is written once, with its default; its environment variable is ``ACTGEN_`` plus the
field's name in capitals unless the field names another (``REDIS_URL``, ``ACTGEN_HEARTBEAT_S``).
``ENV`` lists them all. An empty variable counts as unset.

Where the model comes from is read by huggingface_hub, not here, and nothing here overrides it:
``HF_TOKEN`` (a gated or private repository), ``HF_HOME`` (the cache, ``$HF_HOME/hub``),
``HF_HUB_OFFLINE=1`` (load from the cache only, never the network), ``HF_ENDPOINT`` (a Hub mirror);
docs/operations.md says how they combine with ``ACTGEN_MODEL`` and ``ACTGEN_MODEL_REVISION``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from actgen_shared.keys import Keys

ENV_PREFIX = "ACTGEN_"


class SettingsError(ValueError):
    """A variable of the environment holds a value its setting refuses; the message names the variable."""


class Settings(BaseSettings):
    """Everything configurable about a deployment (immutable).

    ``redis_url`` None means "start an embedded redis-server"; ``model`` None means "build the
    tiny SD-architecture model", otherwise it names a hub id, a diffusers folder or a checkpoint
    file (actgen_generator.model_source). ``model_revision`` None means the pinned commit for the
    default SD 2.1 mirror and the default branch for any other hub id. ``Settings()`` reads the
    environment like :meth:`from_env`, whose errors name the variable at fault.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, validate_by_name=True, extra="ignore"
    )

    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    model: str | None = None
    model_revision: str | None = None  # hub ids only: branch, tag or commit
    # eq. 10's surrogate decoder for SD 1/2 (madebyollin/taesd): None is model_fetch.TAESD_REVISION, pinned
    taesd_revision: str | None = None
    api_key: str | None = None  # one key: the ``default`` tenant, full access
    # keys of several tenants: a file, or the entries themselves ("sha256:<hex of the key> <tenant>
    # <role>" separated by newlines or ';'; role write or read), docs/operations.md
    api_keys: str | None = None
    public_docs: bool = False  # /docs, /redoc, /openapi.json without the API key
    key_prefix: str = "actgen:"
    result_ttl_s: int = 7 * 24 * 3600
    lease_s: float = 30.0  # heartbeat expiry: a consumer silent this long is dead
    heartbeat_interval_s: float = Field(default=5.0, validation_alias="ACTGEN_HEARTBEAT_S")
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
    results_stream_maxlen: int = 1_000_000  # entries kept per run's results stream
    max_wait_s: float = 60.0  # longest long-poll of GET /v1/runs/{run}/results; longer waits are cut to it
    max_long_polls: int = Field(default=64, ge=1)  # waiting long-polls per replica; past it: at once, or 429
    redis_pool_size: int = Field(
        default=64, ge=4
    )  # the API's Redis connections (long-polls, worker: own pools)
    limit_concurrency: int = Field(default=1024, ge=8)  # uvicorn: connections + tasks, then 503
    tenant_max_jobs: int = Field(default=10_000, ge=1)  # a tenant's jobs queued or running
    tenant_max_bytes: int = Field(default=2 * 1024**3, ge=1)  # the request bodies of those jobs
    max_classifier_params: int = Field(
        default=200_000_000, ge=1
    )  # an upload's architecture, counted on the meta device
    durable_ack: bool = False  # 202 and stored results only after WAITAOF 1 0 (Redis >= 7.2, appendonly yes)
    durable_ack_timeout_s: float = Field(default=5.0, gt=0)
    max_device_losses: int = Field(default=3, ge=1)  # a job's deliveries that ended in a lost device
    watchdog_step_s: float = Field(default=60.0, ge=0)  # a batch may take (steps x this) + grace; 0: off
    watchdog_grace_s: float = Field(default=120.0, ge=0)
    fatal_exit_delay_s: float = Field(
        default=2.0, ge=0
    )  # /readyz says 503 this long before a failed replica exits
    device: str | None = None
    dtype: str | None = None
    replica_id: str | None = None
    echo_step_s: float = 0.0  # `serve --sampler echo` only: seconds per step (chaos runs)
    # eq. 11's backward re-runs the UNet forward to save graph memory: auto = only when the
    # device's free memory is short for the batch (never on the CPU)
    grad_checkpointing: Literal["auto", "on", "off"] = "auto"
    adv_decode: Literal["full", "classifier"] = "full"  # eq. 10's decode: full size or the classifier's
    # issue 26: torch.compile of the UNet and decoders (max-autotune: with CUDA graphs on a GPU),
    # warmed at every batch size of the OOM ladder before /readyz; channels-last memory for them
    compile: Literal["off", "default", "max-autotune"] = "off"
    channels_last: bool = False
    # issue 26: a sampled batch's PNGs and latents are encoded and stored while the next batch samples
    # (one batch at most in that stage; worker.py, docs/architecture.md 4.5); false: in the batch's thread
    overlap_encode: bool = True

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @classmethod
    def from_env(cls) -> Settings:
        """The settings of this process's environment; a bad value raises SettingsError naming its variable."""
        try:
            return cls()
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else "?"
                var = ENV.get(name, name)  # loc is the alias when the field has one
                problems.append(f"environment variable {var}: {err['msg']}, got {err.get('input')!r}")
            raise SettingsError("; ".join(problems)) from None


def _env_var(name: str) -> str:
    alias = Settings.model_fields[name].validation_alias
    return alias if isinstance(alias, str) else ENV_PREFIX + name.upper()


# field -> environment variable (derived from the fields above, for docs and error messages)
ENV: dict[str, str] = {name: _env_var(name) for name in Settings.model_fields}


class ClientSettings(BaseSettings):
    """What a client of the generator reads from the environment (actgen_shared.run, the trainer):
    ACTGEN_GENERATOR_URL, ACTGEN_API_KEY (the service's bearer token), ACTGEN_LOG_HTTP (httpx's
    per-request INFO lines, off by default: they break progress bars)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="ignore"
    )

    generator_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None  # one key: the ``default`` tenant, full access
    # keys of several tenants: a file, or the entries themselves ("sha256:<hex of the key> <tenant>
    # <role>" separated by newlines or ';'; role write or read), docs/operations.md
    api_keys: str | None = None
    log_http: bool = False
