"""/v1/classifiers: upload (safetensors only), look up and delete the trainer's classifiers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response
from pydantic import ValidationError

from actgen_generator.api.deps import (
    AUTHED,
    ClassifierRefPath,
    ClassifiersDep,
    PrincipalDep,
    QueueDep,
    ServiceDep,
    refuse_when_full,
)
from actgen_generator.api.errors import ERROR_RESPONSES, ApiError, format_errors
from actgen_generator.classifiers import ClassifierError, ClassifierInUse
from actgen_generator.events import log_event
from actgen_shared.schemas import ClassifierMeta, ClassifierRef, ErrorBody

MAX_LISTED_JOBS = 5  # job ids a 409 names

router = APIRouter(
    prefix="/v1/classifiers", tags=["classifiers"], dependencies=AUTHED, responses=ERROR_RESPONSES
)


@router.post("", response_model=ClassifierRef, summary="upload a classifier (safetensors only)")
async def upload_classifier(
    svc: ServiceDep,
    store: ClassifiersDep,
    queue: QueueDep,
    weights: Annotated[UploadFile, File(description="safetensors bytes of the state dict")],
    metadata: Annotated[str, Form(description="JSON of ClassifierMeta")],
    principal: PrincipalDep,
) -> ClassifierRef:
    """Content-addressed (``sha256:<hex>``) and idempotent; weights are checked against the
    architecture before they are stored. Pickles and torch zip checkpoints are refused."""
    try:
        meta = ClassifierMeta.model_validate_json(metadata)
    except ValidationError as exc:
        raise ApiError(422, "; ".join(format_errors(exc.errors(), root="metadata"))) from None
    await refuse_when_full(queue)
    cap = svc.settings.max_classifier_bytes
    data = await weights.read(cap + 1)
    if len(data) > cap:
        raise ApiError(413, f"weights: more than {cap} bytes")
    try:
        ref = await store.put(data, meta, principal.tenant)
    except ClassifierError as exc:
        raise ApiError(422, str(exc)) from None
    log_event("classifier.stored", None, ref=ref.ref, architecture=meta.architecture, tenant=principal.tenant)
    return ref


@router.delete(
    "/{ref}",
    status_code=204,
    response_class=Response,
    responses={409: {"model": ErrorBody}},
    summary="delete an uploaded classifier",
)
async def delete_classifier(
    svc: ServiceDep, store: ClassifiersDep, queue: QueueDep, ref: ClassifierRefPath, principal: PrincipalDep
) -> Response:
    """Refused (409) while a queued or running job uses it; the trainer deletes its previous
    epoch's classifier once that epoch's job has finished. Unused ones also expire
    (ACTGEN_CLASSIFIER_TTL_S)."""
    try:
        deleted = await store.delete(ref, queue.keys.job, principal.tenant)
    except ClassifierInUse as exc:
        shown = ", ".join(exc.job_ids[:MAX_LISTED_JOBS]) + (
            " ..." if len(exc.job_ids) > MAX_LISTED_JOBS else ""
        )
        raise ApiError(
            409,
            f"classifier_ref: {ref} is used by {len(exc.job_ids)} queued or running "
            f"job(s) ({shown}); delete it once they have finished",
        ) from None
    if not deleted:
        raise ApiError(404, f"classifier_ref {ref} is not known to this service")
    log_event("classifier.deleted", None, ref=ref, replica=svc.replica_id)
    return Response(status_code=204)


@router.get("/{ref}", response_model=ClassifierRef)
async def get_classifier(
    store: ClassifiersDep, ref: ClassifierRefPath, principal: PrincipalDep
) -> ClassifierRef:
    meta = await store.meta(ref, principal.tenant)
    if meta is None:
        raise ApiError(404, f"classifier_ref {ref} is not known to this service")
    return ClassifierRef(ref=ref, architecture=meta.architecture, num_classes=meta.num_classes)
