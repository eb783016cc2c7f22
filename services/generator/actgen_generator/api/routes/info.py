"""GET /v1/info: what this replica runs and the caps a client splits its work by."""

from __future__ import annotations

from fastapi import APIRouter

from actgen_generator.api.deps import AUTHED, ServiceDep
from actgen_generator.model_source import describe_model
from actgen_shared import __version__
from actgen_shared.schemas import ErrorBody, GenerationOptions, Info

router = APIRouter(tags=["service"], dependencies=AUTHED, responses={401: {"model": ErrorBody}})


@router.get("/v1/info", response_model=Info)
async def info(svc: ServiceDep) -> Info:
    settings = svc.settings
    sampler = svc.worker.sampler if svc.worker is not None else None  # what the sampler runs with
    guided = sampler is not None and svc.sampler_kind == "guided"
    card = describe_model(svc.model, settings.model_revision) if guided else None
    return Info(
        model=svc.model_id,
        model_description=card.line() if card is not None else None,
        model_classes=list(card.classes) if card is not None and card.classes else None,
        device=svc.device or "none",
        dtype=svc.dtype or "none",
        replica_id=svc.replica_id,
        version=__version__,
        max_batch=settings.max_batch,
        native_size=svc.native_size,
        defaults=GenerationOptions(),
        resolved_defaults=svc.resolved_defaults,
        max_items_per_job=settings.max_items_per_job,
        max_job_image_steps=settings.max_job_image_steps,
        adv_decode=getattr(sampler, "adv_decode", None),
        grad_checkpointing=getattr(sampler, "grad_checkpointing", None),
    )
