"""GET /metrics: the replica's Prometheus metrics (queue depth refreshed on each scrape)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from actgen_generator.api.deps import AUTHED, ServiceDep
from actgen_shared.schemas import ErrorBody

router = APIRouter(tags=["service"], dependencies=AUTHED, responses={401: {"model": ErrorBody}})


@router.get(
    "/metrics",
    summary="Prometheus text format",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(svc: ServiceDep) -> Response:
    worker_queue = svc.worker.queue if svc.worker is not None else None
    await svc.metrics.refresh(svc.queue, svc.device if svc.ready else None, worker_queue, svc.long_polls)
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)
