"""/v1/jobs: submit (validated before it is queued), state, cancel, images and latents of a job."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from actgen_generator.api.deps import (
    AUTHED,
    ClassifiersDep,
    JobId,
    PrincipalDep,
    QueueDep,
    ServiceDep,
    not_found,
    refuse_when_full,
)
from actgen_generator.api.errors import ERROR_RESPONSES, ApiError
from actgen_generator.api.lifecycle import MAX_WAIT_S, Service
from actgen_generator.classifiers import ClassifierStore
from actgen_generator.events import log_event
from actgen_shared import codecs
from actgen_shared.keys import DEFAULT_TENANT
from actgen_shared.queue import IdempotencyConflict, JobQueue, NotDurable, SubmitRefused, body_hash
from actgen_shared.schemas import IDEMPOTENCY_CONFLICT, JobAccepted, JobRequest, JobState

WORK_UNIT_PIXELS = 512 * 512  # a job's work is counted in image-steps at SD 2.1's native size
RANDOM_SEED_BITS = 32  # seed + item index stays far below MAX_SEED
INLINE_DECODE_CHARS = 64 * 1024  # base64 guides up to this are decoded on the event loop
MAX_IMAGE_INDEX = 1_000_000
DURABLE_HEADER = "X-ActGen-Durable"  # set on a 202 when ACTGEN_DURABLE_ACK=1 (WAITAOF confirmed)
CANCEL_WAIT_S = 5.0  # how long DELETE waits for a running job to stop (a step or two on a GPU)
CANCEL_POLL_S = (0.02, 0.25)  # first and longest pause between two looks at the job meanwhile

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=AUTHED, responses=ERROR_RESPONSES)


async def validate_job(
    svc: Service, store: ClassifierStore, job: JobRequest, tenant: str = DEFAULT_TENANT
) -> JobRequest:
    """Everything the schema cannot check alone; returns the job with its seed fixed."""
    settings = svc.settings
    if len(job.items) > settings.max_items_per_job:
        raise ApiError(
            422,
            f"items: {len(job.items)} items, more than the cap of {settings.max_items_per_job} "
            "per job (ACTGEN_MAX_ITEMS_PER_JOB)",
        )

    opts = job.options
    pixels = (opts.height or svc.native_size) * (opts.width or svc.native_size)
    work = len(job.items) * opts.num_inference_steps * pixels / WORK_UNIT_PIXELS
    if work > settings.max_job_image_steps:
        raise ApiError(
            422,
            f"options: {len(job.items)} items x options.num_inference_steps "
            f"{opts.num_inference_steps} x {opts.height or svc.native_size}x"
            f"{opts.width or svc.native_size} px is {work:.0f} image-steps at 512x512, more than "
            f"the cap of {settings.max_job_image_steps} per job (ACTGEN_MAX_JOB_IMAGE_STEPS): "
            "split it into smaller jobs",
        )
    if svc.model_classes:  # a model that declares its classes draws those only: no noise for others
        names = job.resolved_class_names()
        asked = {names[item.class_id] for item in job.items if item.class_id < len(names)}
        unknown = sorted(asked - set(svc.model_classes))
        if unknown:
            raise ApiError(
                422,
                f"class_names: {', '.join(map(repr, unknown[:5]))} are not classes of the model "
                f"{svc.model_id}, which was trained on {', '.join(svc.model_classes)}",
            )
    if opts.bank_sample > settings.bank_cap:
        raise ApiError(
            422,
            f"options.bank_sample: {opts.bank_sample} is more than a memory bank keeps per "
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
        meta = await store.meta(job.classifier_ref, tenant)
        if meta is None:
            raise ApiError(
                422,
                f"classifier_ref: {job.classifier_ref} is not known; upload it with POST /v1/classifiers first",
            )
        n_classes = len(job.resolved_class_names())
        if meta.num_classes != n_classes:
            raise ApiError(
                422,
                f"classifier_ref: the classifier has {meta.num_classes} classes, the job names {n_classes}",
            )
    if job.options.seed is None:  # fixed now, so a redelivered job makes the same images
        seed = random.SystemRandom().getrandbits(RANDOM_SEED_BITS)
        job = job.model_copy(update={"options": job.options.model_copy(update={"seed": seed})})
    return job


@router.post("", status_code=202, response_model=JobAccepted, summary="submit a job")
async def submit_job(
    job: JobRequest,
    svc: ServiceDep,
    queue: QueueDep,
    store: ClassifiersDep,
    principal: PrincipalDep,
    response: Response,
) -> JobAccepted:
    """Queued for the key's tenant. An idempotency key seen before (from this tenant) returns
    its first job when the body is the same, and is a 422 when it is not; past the tenant's
    caps on jobs in flight or bytes held, a 429."""
    await refuse_when_full(queue)
    sent = body_hash(job)  # as sent: the seed is fixed below, and a retry sends it unfixed again
    job = await validate_job(svc, store, job, principal.tenant)
    try:
        job_id, duplicate = await queue.submit(job, tenant=principal.tenant, request_hash=sent)
    except LookupError as exc:  # its classifier was deleted between validation and submit
        raise ApiError(422, str(exc)) from None
    except SubmitRefused as exc:  # idempotency conflict (422), the tenant's quota (429)
        headers = {"Retry-After": "10"} if exc.status == 429 else None
        code = IDEMPOTENCY_CONFLICT if isinstance(exc, IdempotencyConflict) else None
        raise ApiError(exc.status, str(exc), code=code, headers=headers) from None
    except NotDurable as exc:  # queued, not yet on disk: a retry with its idempotency key is safe
        raise ApiError(503, str(exc), headers={"Retry-After": "1"}) from None
    if svc.settings.durable_ack:  # what WAITAOF confirmed, for the client (and the tests) to see
        response.headers[DURABLE_HEADER] = "aof-fsynced"
    log_event(
        "job.duplicate" if duplicate else "job.queued",
        job_id,
        replica=svc.replica_id,
        run_id=job.run_id,
        tenant=principal.tenant,
        epoch=job.epoch,
        items=len(job.items),
        mode=job.options.mode.value,
    )
    return JobAccepted(job_id=job_id, status_url=f"/v1/jobs/{job_id}", duplicate=duplicate)


async def _state(queue: JobQueue, job_id: str) -> JobState:
    state = await queue.state(job_id)
    if state is None:
        raise not_found(job_id)
    return state


@router.get("/{job_id}", response_model=JobState)
async def get_job(job_id: JobId, queue: QueueDep) -> JobState:
    return await _state(queue, job_id)


@router.delete(
    "/{job_id}",
    response_model=JobState,
    summary="cancel a queued or running job",
    responses={202: {"model": JobState, "description": "running: asked to stop, not stopped yet"}},
)
async def cancel_job(
    job_id: JobId,
    queue: QueueDep,
    svc: ServiceDep,
    response: Response,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for a running job to stop")
    ] = CANCEL_WAIT_S,
) -> JobState:
    """A queued job is cancelled at once. A running one stops at its worker's next denoising step:
    the call waits up to ``wait`` seconds for that. 200 with the final state (``cancelled``, or
    ``done``/``failed`` if it ended first); 202 with status ``running`` and ``cancel_requested``
    when it has not stopped yet (GET it again)."""
    if await queue.cancel(job_id) is None:
        raise not_found(job_id)
    log_event("job.cancel_requested", job_id, replica=svc.replica_id)
    state = await _state(queue, job_id)
    deadline = time.monotonic() + min(wait, svc.settings.max_wait_s)
    pause, longest = CANCEL_POLL_S
    while not state.status.is_final and time.monotonic() < deadline:
        await asyncio.sleep(pause)
        pause = min(2 * pause, longest)
        state = await _state(queue, job_id)
    if not state.status.is_final:
        response.status_code = 202
    return state


@router.get(
    "/{job_id}/images/{index}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_image(
    job_id: JobId, index: Annotated[int, Path(ge=0, le=MAX_IMAGE_INDEX)], queue: QueueDep
) -> Response:
    data = await queue.image(job_id, index)
    if data is None:
        await _state(queue, job_id)
        raise ApiError(404, f"index: image {index} of job {job_id} is not there (yet)")
    return Response(data, media_type="image/png")


@router.get(
    "/{job_id}/latents",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
    summary="final latents so far: safetensors with 'latents' (N,C,h,w) float16 and 'indices'",
)
async def get_latents(job_id: JobId, queue: QueueDep) -> Response:
    wanted = await queue.latents_wanted(job_id)  # the request itself is dropped when the job ends
    if wanted is None:
        raise not_found(job_id)
    n_items, return_latents = wanted
    blobs = await asyncio.gather(*(queue.latent(job_id, k) for k in range(n_items)))
    found = [(k, blob) for k, blob in enumerate(blobs) if blob is not None]
    if not found:
        why = "asked for none (options.return_latents false)" if not return_latents else "has none yet"
        raise ApiError(404, f"job_id: job {job_id} {why}")

    def encode() -> bytes:
        latents = np.stack([codecs.latent_decode(blob) for _, blob in found]).astype(np.float16)
        indices = np.array([k for k, _ in found], dtype=np.int64)
        return codecs.tensors_encode({"latents": latents, "indices": indices})

    return Response(
        await asyncio.to_thread(encode),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-latents.safetensors"'},
    )
