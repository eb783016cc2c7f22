"""The generator's REST API (DESIGN.md section 3): FastAPI app factory, one router per resource.

The app holds one Redis client and one :class:`JobQueue`; unless built with ``worker=False``
(an API-only replica) it also loads the pipeline in the background and runs the worker loop
as a task of its event loop. Everything a job carries is validated here, before it is
queued, so nothing invalid reaches a GPU; every refusal is a 4xx with the body
``{"error": {"code", "message"}}`` whose message names the field at fault.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actgen_generator.classifiers import ClassifierCache, ClassifierError, ClassifierInUse, ClassifierStore
from actgen_generator.events import log_event
from actgen_generator.metrics import Metrics
from actgen_generator.echo import EchoSampler
from actgen_generator.worker import Worker
from actgen_shared import __version__, codecs
from actgen_shared.queue import (
    REDIS_DOWN,
    Heartbeat,
    JobQueue,
    ReplicaIdInUse,
    connect,
    new_token,
    validate_cursor,
)
from actgen_shared.schemas import (
    BANK_KEY_PATTERN,
    CLASSIFIER_REF_PATTERN,
    RUN_ID_PATTERN,
    ClassifierMeta,
    ClassifierRef,
    ErrorBody,
    GenerationOptions,
    Info,
    JobAccepted,
    JobRequest,
    JobState,
    MemoryBankInfo,
    ResultItem,
    ResultsPage,
)
from actgen_shared.settings import Settings

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
MAX_RESULTS_LIMIT = 1000
WORK_UNIT_PIXELS = 512 * 512  # a job's work is counted in image-steps at SD 2.1's native size
MAX_WAIT_S = 60.0
REDIS_TIMEOUT_MARGIN_S = 10.0
MAX_STREAM_PART = 2**64 - 1
RANDOM_SEED_BITS = 32  # seed + item index stays far below MAX_SEED
CLASSIFIER_FORM_SLACK = 1 << 20
INLINE_DECODE_CHARS = 64 * 1024  # base64 guides up to this are decoded on the event loop  # multipart framing and metadata around the weights
SAMPLERS = ("guided", "echo")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    500: "internal_error",
    503: "unavailable",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 413, 422)
}


class ApiError(StarletteHTTPException):
    """An HTTP error with our own code; the message names the field at fault."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code or _STATUS_CODES.get(status, "error")


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    body = ErrorBody.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# --- the service's state ----------------------------------------------------------------------


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
    redis: Any = None
    queue: JobQueue | None = None
    classifiers: ClassifierStore | None = None
    model_id: str = "(not loaded)"
    native_size: int = 512
    ready: bool = False
    fatal: str | None = None
    worker: Worker | None = None
    heartbeat: Heartbeat | None = None
    worker_task: asyncio.Task | None = None
    startup_task: asyncio.Task | None = None
    on_fatal: Callable[[], None] | None = None  # the CLI stops the server: a replica that cannot load exits


def resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    import torch

    dev = torch.device(resolve_device(device))
    tag = f"gpu{dev.index or 0}" if dev.type == "cuda" else dev.type
    return f"{host}-{tag}-{suffix}"


async def _start_worker(svc: Service) -> None:
    """Load the pipeline (in a thread), then start the worker loop; failures are fatal."""
    settings = svc.settings
    try:
        if svc.sampler_kind == "echo":
            sampler: Any = EchoSampler(step_seconds=settings.echo_step_s)
            svc.model_id, svc.device, svc.dtype = "echo (no model)", "cpu", "float32"
            svc.native_size = sampler.native_size
        else:
            from actgen_generator.pipeline import load_pipeline
            from actgen_generator.sampler import GuidedSampler

            loaded = await asyncio.to_thread(load_pipeline, svc.model, svc.device, svc.dtype)
            sampler = GuidedSampler(loaded, prompt_cache_size=settings.prompt_cache_size)
            svc.model_id, svc.device = loaded.model_id, str(loaded.device)
            svc.dtype = str(loaded.dtype).removeprefix("torch.")
            svc.native_size = int(loaded.native_size)

        assert svc.queue is not None and svc.classifiers is not None
        cache = ClassifierCache(svc.classifiers, svc.device or "cpu")
        svc.worker = Worker(
            svc.queue, svc.replica_id, sampler, settings, svc.metrics, classifiers=cache,
            heartbeat=svc.heartbeat,
        )
        svc.worker_task = asyncio.create_task(svc.worker.run())
        svc.ready = True
        log_event("replica.ready", None, replica=svc.replica_id, model=svc.model_id, device=svc.device)
    except Exception as exc:
        svc.fatal = f"could not load the model: {type(exc).__name__}: {exc}"
        log_event("replica.fatal", None, replica=svc.replica_id, error=svc.fatal)
        if svc.on_fatal is not None:
            svc.on_fatal()


def redis_client(url: str) -> aioredis.Redis:
    """The queue's kind of client, with a socket timeout longer than the longest long-poll
    (redis-py's default of 5 s would cut a blocking XREAD of /v1/runs/{run}/results short)."""
    return connect(url, socket_timeout=MAX_WAIT_S + REDIS_TIMEOUT_MARGIN_S)


def _lifespan(svc: Service):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not svc.settings.redis_url:
            raise RuntimeError("Settings.redis_url is not set (the CLI starts an embedded Redis)")
        svc.redis = redis_client(svc.settings.redis_url)
        svc.queue = JobQueue(svc.redis, svc.settings)
        await svc.queue.ensure_group()
        svc.classifiers = ClassifierStore(
            svc.redis, svc.settings.keys, svc.settings.max_classifier_bytes, svc.settings.classifier_ttl_s
        )
        if svc.run_worker:
            await asyncio.to_thread(claim_replica_id, svc)
            svc.startup_task = asyncio.create_task(_start_worker(svc))
        else:
            svc.ready = True
        try:
            yield
        finally:
            await stop_worker(svc)
            await svc.redis.aclose()

    return lifespan


def claim_replica_id(svc: Service) -> None:
    """Take the replica's consumer name before anything else (blocking): a name that a live
    replica holds (its heartbeat has not expired) raises ReplicaIdInUse, and this one does not
    start. The CLI calls it before the server starts; the lifespan when nobody did."""
    if svc.heartbeat is not None or not svc.run_worker:
        return
    assert svc.settings.redis_url
    heartbeat = Heartbeat(
        svc.settings.redis_url, svc.settings, svc.replica_id, new_token(svc.replica_id),
        on_conflict=lambda message: _lost_replica_id(svc, message),
    )
    try:
        heartbeat.claim()
    except Exception as exc:
        heartbeat.stop()
        if isinstance(exc, ReplicaIdInUse):
            svc.fatal = str(exc)
            log_event("replica.refused", None, replica=svc.replica_id, error=svc.fatal)
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


# --- dependencies -----------------------------------------------------------------------------


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
_bearer = HTTPBearer(auto_error=False, description="ACTGEN_API_KEY, when the service sets one")


async def require_api_key(
    svc: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Bearer-token auth when ``ACTGEN_API_KEY`` is set; /healthz and /readyz stay open."""
    expected = svc.settings.api_key
    if not expected:
        return
    if credentials is None:
        raise ApiError(401, "Authorization: a 'Bearer <ACTGEN_API_KEY>' header is required")
    given = credentials.credentials.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, expected.encode("utf-8")):
        raise ApiError(401, "Authorization: the bearer token is not the service's API key")


def get_queue(svc: ServiceDep) -> JobQueue:
    if svc.queue is None:
        raise ApiError(503, "the service is starting: no Redis connection yet")
    return svc.queue


QueueDep = Annotated[JobQueue, Depends(get_queue)]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id from POST /v1/jobs")]
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]
BankKey = Annotated[str, Path(pattern=BANK_KEY_PATTERN)]
authed = [Depends(require_api_key)]


# --- routers ----------------------------------------------------------------------------------

health = APIRouter(tags=["health"])


@health.get("/healthz", summary="200 while the process lives")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get(
    "/readyz", summary="200 once the pipeline is loaded and Redis answers",
    responses={503: {"model": ErrorBody}},
)
async def readyz(svc: ServiceDep) -> Response:
    if svc.fatal:
        return error_response(503, "unavailable", svc.fatal)
    if not svc.ready:
        return error_response(503, "unavailable", "the pipeline is still loading")
    try:
        await svc.redis.ping()
        full = await svc.queue.memory_pressure() if svc.queue is not None else None
    except Exception as exc:
        return error_response(503, "unavailable", f"Redis does not answer: {exc}")
    if full:
        return error_response(503, "unavailable", full)
    return JSONResponse({"status": "ready", "replica_id": svc.replica_id})


service_info = APIRouter(tags=["service"], dependencies=authed, responses={401: {"model": ErrorBody}})


@service_info.get("/v1/info", response_model=Info)
async def info(svc: ServiceDep) -> Info:
    return Info(
        model=svc.model_id, device=svc.device or "none", dtype=svc.dtype or "none",
        replica_id=svc.replica_id, version=__version__, max_batch=svc.settings.max_batch,
        native_size=svc.native_size, defaults=GenerationOptions(),
    )


@service_info.get(
    "/metrics", summary="Prometheus text format",
    response_class=Response, responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(svc: ServiceDep) -> Response:
    await svc.metrics.refresh(svc.queue, svc.device if svc.ready else None)
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)


classifiers = APIRouter(prefix="/v1/classifiers", tags=["classifiers"], dependencies=authed,
                        responses=ERROR_RESPONSES)


@classifiers.post("", response_model=ClassifierRef, summary="upload a classifier (safetensors only)")
async def upload_classifier(
    svc: ServiceDep,
    weights: Annotated[UploadFile, File(description="safetensors bytes of the state dict")],
    metadata: Annotated[str, Form(description="JSON of ClassifierMeta")],
) -> ClassifierRef:
    """Content-addressed (``sha256:<hex>``) and idempotent; weights are checked against the
    architecture before they are stored. Pickles and torch zip checkpoints are refused."""
    assert svc.classifiers is not None
    try:
        meta = ClassifierMeta.model_validate_json(metadata)
    except ValidationError as exc:
        raise ApiError(422, "; ".join(_format_errors(exc.errors(), root="metadata"))) from None
    await _refuse_when_full(svc)
    data = await weights.read(svc.settings.max_classifier_bytes + 1)
    if len(data) > svc.settings.max_classifier_bytes:
        raise ApiError(413, f"weights: more than {svc.settings.max_classifier_bytes} bytes")
    try:
        ref = await svc.classifiers.put(data, meta)
    except ClassifierError as exc:
        raise ApiError(422, str(exc)) from None
    log_event("classifier.stored", None, ref=ref.ref, architecture=meta.architecture)
    return ref


@classifiers.delete("/{ref}", status_code=204, response_class=Response,
                    responses={409: {"model": ErrorBody}}, summary="delete an uploaded classifier")
async def delete_classifier(
    svc: ServiceDep, queue: QueueDep, ref: Annotated[str, Path(pattern=CLASSIFIER_REF_PATTERN)]
) -> Response:
    """Refused (409) while a queued or running job uses it; the trainer deletes its previous
    epoch's classifier once that epoch's job has finished. Unused ones also expire
    (ACTGEN_CLASSIFIER_TTL_S)."""
    assert svc.classifiers is not None
    try:
        deleted = await svc.classifiers.delete(ref, queue.keys.job)
    except ClassifierInUse as exc:
        shown = ", ".join(exc.job_ids[:5]) + (" ..." if len(exc.job_ids) > 5 else "")
        raise ApiError(
            409, f"classifier_ref: {ref} is used by {len(exc.job_ids)} queued or running "
            f"job(s) ({shown}); delete it once they have finished",
        ) from None
    if not deleted:
        raise ApiError(404, f"classifier_ref {ref} is not known to this service")
    log_event("classifier.deleted", None, ref=ref, replica=svc.replica_id)
    return Response(status_code=204)


@classifiers.get("/{ref}", response_model=ClassifierRef)
async def get_classifier(
    svc: ServiceDep, ref: Annotated[str, Path(pattern=CLASSIFIER_REF_PATTERN)]
) -> ClassifierRef:
    assert svc.classifiers is not None
    meta = await svc.classifiers.meta(ref)
    if meta is None:
        raise ApiError(404, f"classifier_ref {ref} is not known to this service")
    return ClassifierRef(ref=ref, architecture=meta.architecture, num_classes=meta.num_classes)


jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=authed, responses=ERROR_RESPONSES)


async def validate_job(svc: Service, job: JobRequest) -> JobRequest:
    """Everything the schema cannot check alone; returns the job with its seed fixed."""
    settings = svc.settings
    if len(job.items) > settings.max_items_per_job:
        raise ApiError(
            422, f"items: {len(job.items)} items, more than the cap of {settings.max_items_per_job} "
            "per job (ACTGEN_MAX_ITEMS_PER_JOB)",
        )

    opts = job.options
    pixels = (opts.height or svc.native_size) * (opts.width or svc.native_size)
    work = len(job.items) * opts.num_inference_steps * pixels / WORK_UNIT_PIXELS
    if work > settings.max_job_image_steps:
        raise ApiError(
            422, f"options: {len(job.items)} items x options.num_inference_steps "
            f"{opts.num_inference_steps} x {opts.height or svc.native_size}x"
            f"{opts.width or svc.native_size} px is {work:.0f} image-steps at 512x512, more than "
            f"the cap of {settings.max_job_image_steps} per job (ACTGEN_MAX_JOB_IMAGE_STEPS): "
            "split it into smaller jobs",
        )
    if opts.bank_sample > settings.bank_cap:
        raise ApiError(
            422, f"options.bank_sample: {opts.bank_sample} is more than a memory bank keeps per "
            f"class ({settings.bank_cap}, ACTGEN_BANK_CAP)",
        )

    def decode_all() -> None:
        for k, item in enumerate(job.items):
            try:
                codecs.image_from_b64(item.image, max_side=settings.max_image_side)
            except codecs.DecodeError as exc:
                raise ApiError(422, f"items[{k}].image: {exc}") from None

    if sum(len(item.image) for item in job.items) > INLINE_DECODE_CHARS:
        await asyncio.to_thread(decode_all)  # keep the event loop serving meanwhile
    else:
        decode_all()  # small guides: cheaper than a thread hop
    if job.classifier_ref is not None:
        assert svc.classifiers is not None
        meta = await svc.classifiers.meta(job.classifier_ref)
        if meta is None:
            raise ApiError(
                422, f"classifier_ref: {job.classifier_ref} is not known; upload it with "
                "POST /v1/classifiers first",
            )
        n_classes = len(job.resolved_class_names())
        if meta.num_classes != n_classes:
            raise ApiError(
                422, f"classifier_ref: the classifier has {meta.num_classes} classes, the job "
                f"names {n_classes}",
            )
    if job.options.seed is None:  # fixed now, so a redelivered job makes the same images
        seed = random.SystemRandom().getrandbits(RANDOM_SEED_BITS)
        job = job.model_copy(update={"options": job.options.model_copy(update={"seed": seed})})
    return job


@jobs.post("", status_code=202, response_model=JobAccepted, summary="submit a job")
async def submit_job(job: JobRequest, svc: ServiceDep, queue: QueueDep) -> JobAccepted:
    await _refuse_when_full(svc)
    job = await validate_job(svc, job)
    try:
        job_id, duplicate = await queue.submit(job)
    except LookupError as exc:  # its classifier was deleted between validation and submit
        raise ApiError(422, str(exc)) from None
    log_event(
        "job.duplicate" if duplicate else "job.queued", job_id, replica=svc.replica_id,
        run_id=job.run_id, epoch=job.epoch, items=len(job.items), mode=job.options.mode.value,
    )
    return JobAccepted(job_id=job_id, status_url=f"/v1/jobs/{job_id}", duplicate=duplicate)


async def _refuse_when_full(svc: Service) -> None:
    """503 while Redis is near its memory cap (it runs with noeviction: a write would fail)."""
    full = await svc.queue.memory_pressure() if svc.queue is not None else None
    if full:
        raise ApiError(503, full, headers={"Retry-After": "30"})


async def _state(queue: JobQueue, job_id: str) -> JobState:
    state = await queue.state(job_id)
    if state is None:
        raise ApiError(404, f"job_id: no job {job_id} (unknown or expired)")
    return state


@jobs.get("/{job_id}", response_model=JobState)
async def get_job(job_id: JobId, queue: QueueDep) -> JobState:
    return await _state(queue, job_id)


@jobs.delete("/{job_id}", response_model=JobState, summary="cancel a queued or running job")
async def cancel_job(job_id: JobId, queue: QueueDep, svc: ServiceDep) -> JobState:
    if await queue.cancel(job_id) is None:
        raise ApiError(404, f"job_id: no job {job_id} (unknown or expired)")
    log_event("job.cancel_requested", job_id, replica=svc.replica_id)
    return await _state(queue, job_id)


@jobs.get(
    "/{job_id}/images/{index}.png", response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_image(
    job_id: JobId, index: Annotated[int, Path(ge=0, le=1_000_000)], queue: QueueDep
) -> Response:
    data = await queue.image(job_id, index)
    if data is None:
        await _state(queue, job_id)
        raise ApiError(404, f"index: image {index} of job {job_id} is not there (yet)")
    return Response(data, media_type="image/png")


@jobs.get(
    "/{job_id}/latents", response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
    summary="final latents so far: safetensors with 'latents' (N,C,h,w) float16 and 'indices'",
)
async def get_latents(job_id: JobId, queue: QueueDep) -> Response:
    request = await queue.request(job_id)
    if request is None:
        raise ApiError(404, f"job_id: no job {job_id} (unknown or expired)")
    blobs = await asyncio.gather(*(queue.latent(job_id, k) for k in range(len(request.items))))
    found = [(k, blob) for k, blob in enumerate(blobs) if blob is not None]
    if not found:
        why = "asked for none (options.return_latents false)" if not request.options.return_latents \
            else "has none yet"
        raise ApiError(404, f"job_id: job {job_id} {why}")

    def encode() -> bytes:
        latents = np.stack([codecs.latent_decode(blob) for _, blob in found]).astype(np.float16)
        indices = np.array([k for k, _ in found], dtype=np.int64)
        return codecs.tensors_encode({"latents": latents, "indices": indices})

    return Response(
        await asyncio.to_thread(encode), media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-latents.safetensors"'},
    )


runs = APIRouter(prefix="/v1/runs", tags=["results"], dependencies=authed, responses=ERROR_RESPONSES)


def _check_cursor(after: str) -> str:
    try:
        validate_cursor(after)
        if any(int(part) > MAX_STREAM_PART for part in after.split("-")):
            raise ValueError(f"cursor {after!r} is out of range for a stream id")
    except ValueError as exc:
        raise ApiError(422, f"after: {exc}") from None
    return after


@runs.get("/{run_id}/results", response_model=ResultsPage)
async def run_results(
    run_id: RunId,
    queue: QueueDep,
    svc: ServiceDep,
    after: Annotated[str, Query(max_length=41, description="cursor: the last `next` you got")] = "0-0",
    limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_LIMIT)] = 100,
    wait: Annotated[float, Query(ge=0.0, le=MAX_WAIT_S, description="long-poll seconds")] = 0.0,
) -> ResultsPage:
    """Finished items of a run after the cursor, oldest first; waits up to ``wait`` seconds
    (at most the replica's ACTGEN_MAX_WAIT_S) for the first one. Keep ``next`` (e.g. in a
    checkpoint) to resume without repeats."""
    wait = min(wait, svc.settings.max_wait_s)  # the page may come back empty: ask again
    entries, next_cursor = await queue.read_results(run_id, _check_cursor(after), limit, wait)
    images = await asyncio.gather(*(queue.get_bytes(e.get("image_key", "")) for e in entries))
    items: list[ResultItem] = []
    size = 0
    for e, image in zip(entries, images):
        if image is not None:  # expired blobs are skipped; the cursor still moves past them
            size += len(image)
            if items and size > svc.settings.max_results_bytes:  # page full: the rest come next
                next_cursor = items[-1].id
                break
            items.append(ResultItem(
                id=e["id"], job_id=e["job_id"], index=int(e["index"]), epoch=int(e.get("epoch") or 0),
                class_id=int(e["class_id"]), guide_id=e.get("guide_id") or None,
                image=codecs.b64encode(image), latent_key=e.get("latent_key") or None,
            ))
        next_cursor = e["id"]
    return ResultsPage(items=items, next=next_cursor)


banks = APIRouter(prefix="/v1/memory-banks", tags=["memory banks"], dependencies=authed,
                  responses=ERROR_RESPONSES)


@banks.get("/{key}", response_model=MemoryBankInfo)
async def get_bank(key: BankKey, queue: QueueDep) -> MemoryBankInfo:
    return MemoryBankInfo(key=key, counts=await queue.bank_counts(key))


@banks.delete("/{key}", status_code=204, response_class=Response)
async def clear_bank(key: BankKey, queue: QueueDep, svc: ServiceDep) -> Response:
    deleted = await queue.clear_bank(key)
    log_event("bank.cleared", None, replica=svc.replica_id, key=key, latents=deleted)
    return Response(status_code=204)


# --- errors and limits ------------------------------------------------------------------------


def _format_loc(loc: tuple | list, root: str | None = None) -> str:
    parts = list(loc)
    source = None
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        source = parts.pop(0)
    text = root or ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or source or "request"


def _format_errors(errors: list[dict[str, Any]], root: str | None = None) -> list[str]:
    out = []
    for err in errors[:10]:
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        out.append(f"{_format_loc(err.get('loc', ()), root)}: {msg}")
    if len(errors) > 10:
        out.append(f"... and {len(errors) - 10} more")
    return out


OPEN_PATHS = frozenset({"/healthz", "/readyz"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _bearer_ok(headers: list[tuple[bytes, bytes]], expected: str) -> str | None:
    """None when the headers carry ``Authorization: Bearer <expected>``, else why not."""
    value = next((v for k, v in headers if k == b"authorization"), None)
    if value is None:
        return "Authorization: a 'Bearer <ACTGEN_API_KEY>' header is required"
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return "Authorization: a 'Bearer <ACTGEN_API_KEY>' header is required"
    if not hmac.compare_digest(token.strip(), expected.encode("utf-8")):
        return "Authorization: the bearer token is not the service's API key"
    return None


class ApiKeyAuth:
    """Bearer-token check before anything of the request is read (ASGI, outermost).

    With ``ACTGEN_API_KEY`` set, every route but /healthz and /readyz needs the token, the docs
    (/docs, /redoc, /openapi.json) too unless ``ACTGEN_PUBLIC_DOCS=1``. A refusal is a 401 sent
    without reading the body (FastAPI would parse a JSON body before a dependency runs), and the
    connection is closed rather than drained.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def is_open(self, path: str) -> bool:
        return path in OPEN_PATHS or (self.settings.public_docs and path in DOCS_PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        expected = self.settings.api_key
        if scope["type"] != "http" or not expected or self.is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        why = _bearer_ok(scope.get("headers", []), expected)
        if why is None:
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "unauthorized", why, headers={"WWW-Authenticate": "Bearer", "Connection": "close"}
        )
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    """A receive() for a response sent without reading the request: the client is gone."""
    return {"type": "http.disconnect"}


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body: more than {limit} bytes (ACTGEN_MAX_BODY_BYTES)")


class BodySizeLimit:
    """Refuse bodies over the cap with 413: by Content-Length at once, else while streaming."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        if path.startswith("/v1/classifiers"):
            return self.settings.max_classifier_bytes + CLASSIFIER_FORM_SLACK
        return self.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await error_response(400, "bad_request", "Content-Length is not a number")(
                        scope, receive, send)
                    return
                if length > limit:
                    await error_response(413, "payload_too_large", str(BodyTooLarge(limit).detail))(
                        scope, receive, send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", "; ".join(_format_errors(list(exc.errors()))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, "error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return error_response(exc.status_code, code, message, headers=headers or None)

    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log_event("http.redis_unavailable", None, path=request.url.path, error=str(exc))
        return error_response(503, "unavailable", f"Redis does not answer ({exc}); retry shortly",
                              headers={"Retry-After": "1"})

    for error in REDIS_DOWN:
        app.add_exception_handler(error, _redis_down)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log_event("http.error", None, path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


# --- the app ----------------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None,
    *,
    worker: bool = True,
    sampler: str = "guided",
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> FastAPI:
    """A generator replica. ``worker=False``: API only; ``sampler='echo'``: no model (benchmarks)."""
    settings = settings or Settings.from_env()
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    model = model or settings.model
    device = device or settings.device
    if worker and sampler == "guided":
        device = resolve_device(device)
    svc = Service(
        settings=settings, run_worker=worker, sampler_kind=sampler, model=model, device=device,
        dtype=dtype or settings.dtype,
        replica_id=settings.replica_id or default_replica_id(device, worker),
    )
    app = FastAPI(
        title="ActGen generator",
        version=__version__,
        summary="Stable Diffusion with attentive image guidance and gradient guidance, as a service",
        lifespan=_lifespan(svc),
    )
    app.state.service = svc
    app.add_middleware(BodySizeLimit, settings=settings)
    app.add_middleware(ApiKeyAuth, settings=settings)  # added last: runs first, before any read
    _install_error_handlers(app)
    for router in (health, service_info, classifiers, jobs, runs, banks):
        app.include_router(router)
    return app


__all__ = ["ApiError", "Service", "claim_replica_id", "create_app", "stop_worker"]
