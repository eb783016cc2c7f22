"""/healthz (the process lives) and /readyz (the pipeline is loaded and Redis answers); open."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError

from actgen_generator.api.deps import ServiceDep
from actgen_generator.api.errors import error_response
from actgen_shared.schemas import ErrorBody

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 while the process lives")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="200 once the pipeline is loaded and Redis answers",
    responses={503: {"model": ErrorBody}},
)
async def readyz(svc: ServiceDep) -> Response:
    if svc.fatal:
        return error_response(503, "unavailable", svc.fatal)
    if not svc.ready or svc.redis is None or svc.queue is None:
        return error_response(503, "unavailable", "the pipeline is still loading")
    try:  # on /readyz's own connections: long-polls and a busy API cannot starve it
        await (svc.health_redis or svc.redis).ping()
        full = await svc.queue.memory_pressure(svc.health_redis)
    except RedisError as exc:
        return error_response(503, "unavailable", f"Redis does not answer: {exc}")
    if full:
        return error_response(503, "unavailable", full)
    return JSONResponse({"status": "ready", "replica_id": svc.replica_id})
