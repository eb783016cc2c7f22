"""A replica's life: what it holds (:class:`Service`), its name, loading the model, the worker.

The lifespan opens Redis and the queue; unless the replica is API-only it claims its consumer
name, then loads the sampler in a thread and starts the worker loop as a task of the event loop.

Redis connections are pooled apart, each pool sized explicitly, so no kind of request can take
another's (docs/architecture.md, "Cheap requests"): the API's requests (``ACTGEN_REDIS_POOL_SIZE``,
a blocking pool: a request waits for a connection rather than failing), the long-polls of
GET /v1/runs/{run}/results (``ACTGEN_MAX_LONG_POLLS``), /readyz (two), the worker (its own), and
the heartbeat (a thread with its own connection). With ``ACTGEN_DURABLE_ACK=1`` the server is
probed for ``WAITAOF`` first (durability.py), and a replica whose Redis lacks it does not start.
A replica that cannot load, or whose name another process takes, is fatal: /readyz says why and
the CLI stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import FastAPI

from actgen_generator.classifiers import ClassifierCache, ClassifierStore, preload_architectures
from actgen_generator.contract import SAMPLERS, Sampler
from actgen_generator.durability import probe_durable_ack
from actgen_generator.events import log_event
from actgen_generator.metrics import Metrics
from actgen_generator.model_source import describe_model
from actgen_generator.worker import Worker
from actgen_shared.presets import resolve_options
from actgen_shared.queue import Heartbeat, JobQueue, ReplicaIdInUse, connect, new_token
from actgen_shared.schemas import GenerationOptions, ResolvedOptions
from actgen_shared.settings import Settings

MAX_WAIT_S = 60.0  # longest long-poll a request may ask for (ACTGEN_MAX_WAIT_S may cut it shorter)
REDIS_TIMEOUT_MARGIN_S = 10.0
HEALTH_CONNECTIONS = 2  # /readyz's own pool: it answers while every other connection is busy
WORKER_CONNECTIONS = 16  # the worker's own pool (it stores a batch's jobs at once)
HEALTH_TIMEOUT_S = 2.0


@dataclass
class Service:
    """What one replica holds: Redis, the queue, caches, and (when enabled) the worker."""

    settings: Settings
    run_worker: bool = True
    sampler_kind: str = "guided"
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    replica_id: str = ""
    metrics: Metrics = field(default_factory=Metrics)
    redis: aioredis.Redis | None = None  # these from the lifespan on
    queue: JobQueue | None = None
    classifiers: ClassifierStore | None = None
    poll_redis: aioredis.Redis | None = None  # long-polls of GET /v1/runs/{run}/results only
    health_redis: aioredis.Redis | None = None  # /readyz only
    worker_redis: aioredis.Redis | None = None  # the worker only
    durable: str | None = None  # ACTGEN_DURABLE_ACK=1: the server that answered the WAITAOF probe
    long_polls: int = 0  # long-polls waiting now (at most settings.max_long_polls)
    model_id: str = "(not loaded)"
    model_classes: tuple[str, ...] | None = None  # the classes the model declares it was trained on
    native_size: int = 512
    resolved_defaults: ResolvedOptions | None = None  # the loaded model's (None: API-only, or loading)
    ready: bool = False
    fatal: str | None = None
    worker: Worker | None = None
    heartbeat: Heartbeat | None = None
    worker_task: asyncio.Task[None] | None = None
    startup_task: asyncio.Task[None] | None = None
    on_fatal: Callable[[], None] | None = None  # the CLI stops the server: a replica that cannot load exits


def default_replica_id(device: str | None, run_worker: bool) -> str:
    """``{hostname}-{device}-{pid}-{random}``: no two processes share it, on one host or many.

    Two replicas under one consumer name would share one heartbeat, so neither's jobs could be
    reclaimed when it dies. A replica that restarts under a new name leaves its old entries to
    be reclaimed once the old lease ends; set ACTGEN_REPLICA_ID for a name that survives restarts.
    """
    host = socket.gethostname()
    suffix = f"{os.getpid()}-{secrets.token_hex(3)}"
    if not run_worker:
        return f"{host}-api-{suffix}"
    from actgen_generator.devices import device_tag, resolve_device  # torch: worker replicas only

    return f"{host}-{device_tag(resolve_device(device))}-{suffix}"


def load_sampler(svc: Service) -> tuple[Sampler, str, str, str]:
    """The replica's sampler and (model id, device, dtype) it reports; blocking (run in a thread)."""
    if svc.sampler_kind == "echo":
        from actgen_generator.echo import EchoSampler  # imported here: torch, off the event loop

        echo = EchoSampler(step_seconds=svc.settings.echo_step_s, inline=True)
        preload_architectures()
        return echo, "echo (no model)", "cpu", "float32"
    from actgen_generator.pipeline import load_pipeline  # diffusers: seconds to import
    from actgen_generator.sampler import GuidedSampler

    warn_if_cpu_fallback(svc)
    loaded = load_pipeline(svc.model, svc.device, svc.dtype, revision=svc.settings.model_revision)
    sampler = GuidedSampler(
        loaded,
        prompt_cache_size=svc.settings.prompt_cache_size,
        adv_decode=svc.settings.adv_decode,
        grad_checkpointing=svc.settings.grad_checkpointing,
    )
    preload_architectures()
    if svc.settings.compile != "off" or svc.settings.channels_last:  # compiled and warmed before ready
        from actgen_generator.compile import compile_and_warm

        compile_and_warm(sampler, svc.settings.compile, svc.settings.channels_last, svc.settings.max_batch)
    return sampler, loaded.model_id, str(loaded.device), str(loaded.dtype).removeprefix("torch.")


def _names_a_tiny_model(model: str | None) -> bool:
    """The tiny model (built, or a folder of one: it carries actgen_tiny.json): fine on a CPU."""
    return not model or (Path(model).expanduser() / "actgen_tiny.json").is_file()


def warn_if_cpu_fallback(svc: Service) -> str | None:
    """Say loudly (one log event on stderr) when ``--device auto`` puts a real model on the CPU:
    the model, its dtype there, and why CUDA is unusable. Returns the message, None when all is as asked."""
    from actgen_generator.devices import AUTO, cuda_unusable_reason, resolve_device
    from actgen_generator.pipeline import resolve_dtype

    if (svc.device is not None and svc.device not in AUTO) or _names_a_tiny_model(svc.model):
        return None
    device = resolve_device(svc.device)
    if device.type != "cpu":
        return None
    dtype = str(resolve_dtype(svc.dtype, device)).removeprefix("torch.")
    reason = cuda_unusable_reason()
    message = (
        f"model {svc.model} runs on the CPU in {dtype} (device auto): CUDA is unusable: {reason}; "
        "an image takes minutes. Fix CUDA, or set ACTGEN_DEVICE=cpu to say the CPU is meant."
    )
    log_event(
        "replica.cpu_fallback",
        None,
        level=logging.WARNING,
        replica=svc.replica_id,
        model=svc.model,
        dtype=dtype,
        reason=reason,
        message=message,
    )
    return message


async def start_worker(svc: Service, queue: JobQueue, classifiers: ClassifierStore) -> None:
    """Load the sampler (in a thread), then start the worker loop; failures are fatal."""
    try:
        sampler, svc.model_id, device, svc.dtype = await asyncio.to_thread(load_sampler, svc)
        svc.device, svc.native_size = device, sampler.native_size
        if svc.sampler_kind == "guided":  # a job naming other classes is refused (routes/jobs.py)
            svc.model_classes = describe_model(svc.model, svc.settings.model_revision).classes
        svc.resolved_defaults = resolve_options(GenerationOptions(), sampler.model_defaults)
        svc.worker = Worker(
            JobQueue(svc.worker_redis, svc.settings) if svc.worker_redis is not None else queue,
            svc.replica_id,
            sampler,
            svc.settings,
            svc.metrics,
            classifiers=ClassifierCache(classifiers, device),
            heartbeat=svc.heartbeat,
            on_fatal=lambda reason: _worker_fatal(svc, reason),
        )
        svc.worker_task = asyncio.create_task(svc.worker.run())
        svc.ready = True
        log_event("replica.ready", None, replica=svc.replica_id, model=svc.model_id, device=svc.device)
    except Exception as exc:  # anything that stops the model loading stops the replica, with its reason
        svc.fatal = f"could not load the model: {type(exc).__name__}: {exc}"
        log_event("replica.fatal", None, replica=svc.replica_id, error=svc.fatal)
        if svc.on_fatal is not None:
            svc.on_fatal()


def _worker_fatal(svc: Service, reason: str) -> None:
    """The worker cannot go on (its device is lost, or a batch hung): out of ready at once, with
    the reason, and the process ends ``fatal_exit_delay_s`` later (its jobs are back on the queue
    already), so a load balancer sees /readyz say 503 before the port closes. Called on the loop."""
    svc.fatal = reason
    svc.ready = False
    log_event("replica.fatal", None, replica=svc.replica_id, error=reason)
    if svc.on_fatal is not None:
        on_fatal = svc.on_fatal
        asyncio.get_running_loop().call_later(svc.settings.fatal_exit_delay_s, lambda: on_fatal())


def redis_client(url: str, max_connections: int | None = None) -> aioredis.Redis:
    """The queue's kind of client, with a socket timeout longer than the longest long-poll
    (redis-py's default of 5 s would cut a blocking XREAD of /v1/runs/{run}/results short)."""
    return connect(url, socket_timeout=MAX_WAIT_S + REDIS_TIMEOUT_MARGIN_S, max_connections=max_connections)


def open_clients(svc: Service, url: str) -> aioredis.Redis:
    """The replica's Redis pools (see the module's docstring); returns the API's own."""
    settings = svc.settings
    svc.redis = redis_client(url, settings.redis_pool_size)
    svc.poll_redis = redis_client(url, settings.max_long_polls)
    svc.health_redis = connect(
        url,
        socket_timeout=HEALTH_TIMEOUT_S,
        max_connections=HEALTH_CONNECTIONS,
        pool_timeout_s=HEALTH_TIMEOUT_S,
    )
    if svc.run_worker:
        svc.worker_redis = redis_client(url, WORKER_CONNECTIONS)
    return svc.redis


async def close_clients(svc: Service) -> None:
    for client in (svc.redis, svc.poll_redis, svc.health_redis, svc.worker_redis):
        if client is not None:
            await client.aclose()


def lifespan(svc: Service) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: Redis and the queue, then the name and the worker (unless API-only)."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        if not svc.settings.redis_url:
            raise RuntimeError("Settings.redis_url is not set (the CLI starts an embedded Redis)")
        if svc.settings.durable_ack and svc.durable is None:
            svc.durable = await asyncio.to_thread(probe_durable_ack, svc.settings)  # DurableAckUnavailable
        client = open_clients(svc, svc.settings.redis_url)
        svc.queue = queue = JobQueue(client, svc.settings)
        await queue.ensure_group()
        svc.classifiers = classifiers = ClassifierStore(
            client,
            svc.settings.keys,
            svc.settings.max_classifier_bytes,
            svc.settings.classifier_ttl_s,
            max_params=svc.settings.max_classifier_params,
        )
        if svc.run_worker:
            await asyncio.to_thread(claim_replica_id, svc)
            svc.startup_task = asyncio.create_task(start_worker(svc, queue, classifiers))
        else:
            svc.ready = True
        try:
            yield
        finally:
            await stop_worker(svc)
            await close_clients(svc)

    return run


def claim_replica_id(svc: Service) -> None:
    """Take the replica's consumer name before anything else (blocking): a name that a live
    replica holds (its heartbeat has not expired) raises ReplicaIdInUse, and this one does not
    start. The CLI calls it before the server starts; the lifespan when nobody did."""
    if svc.heartbeat is not None or not svc.run_worker:
        return
    if not svc.settings.redis_url:
        raise RuntimeError("Settings.redis_url is not set (the CLI starts an embedded Redis)")
    heartbeat = Heartbeat(
        svc.settings.redis_url,
        svc.settings,
        svc.replica_id,
        new_token(svc.replica_id),
        on_conflict=lambda message: _lost_replica_id(svc, message),
    )
    try:
        heartbeat.claim()
    except ReplicaIdInUse as exc:
        heartbeat.stop()
        svc.fatal = str(exc)
        log_event("replica.refused", None, replica=svc.replica_id, error=svc.fatal)
        raise
    except BaseException:
        heartbeat.stop()
        raise
    svc.heartbeat = heartbeat.start()  # keeps the name while the model loads


def _lost_replica_id(svc: Service, message: str) -> None:
    """Another process took our name while we were paused past the lease: it owns our pending
    work now, so this one stops (called from the heartbeat thread)."""
    svc.fatal = message
    log_event("replica.name_taken", None, replica=svc.replica_id, error=message)
    if svc.worker is not None:
        svc.worker.abandon()
    if svc.on_fatal is not None:
        svc.on_fatal()


async def stop_worker(svc: Service) -> None:
    """Stop the worker: interrupt the batch, release unfinished jobs, drop the heartbeat."""
    if svc.startup_task is not None and not svc.startup_task.done():
        svc.startup_task.cancel()
    if svc.worker is not None:
        svc.worker.request_stop()
    if svc.worker_task is not None:
        await asyncio.gather(svc.worker_task, return_exceptions=True)
    elif svc.heartbeat is not None:  # claimed, but the worker never ran: give the name back
        await asyncio.to_thread(svc.heartbeat.stop, True)
    svc.ready = False


__all__ = [
    "MAX_WAIT_S",
    "SAMPLERS",
    "Service",
    "claim_replica_id",
    "default_replica_id",
    "lifespan",
    "stop_worker",
]
