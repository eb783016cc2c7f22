"""The routes' dependencies: the replica's service, who is asking (tenant, role), the queue and
the classifier store."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from actgen_generator.api.errors import ApiError
from actgen_generator.api.lifecycle import Service
from actgen_generator.api.middleware import MISSING_TOKEN, principal_in
from actgen_generator.api.tenants import Principal
from actgen_generator.classifiers import ClassifierStore
from actgen_shared.keys import tenant_of_job
from actgen_shared.queue import JobQueue
from actgen_shared.schemas import BANK_KEY_PATTERN, CLASSIFIER_REF_PATTERN, RUN_ID_PATTERN

JOB_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"  # '{tenant}.{hex}', or '{hex}' for the default tenant
STARTING = "the service is starting: no Redis connection yet"


def service_of(request: Request) -> Service:
    """The replica's service (a plain function: the dependencies below read it from the request
    rather than depending on ``get_service``, each level of dependencies costing FastAPI work on
    every request)."""
    service: Service = request.app.state.service
    return service


async def get_service(request: Request) -> Service:
    # dependencies are ``async def``: FastAPI runs a plain ``def`` one in a thread, a hop per request
    return service_of(request)


ServiceDep = Annotated[Service, Depends(get_service)]
_bearer = HTTPBearer(
    auto_error=False, description="an API key (ACTGEN_API_KEY / ACTGEN_API_KEYS), when the service sets any"
)


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Who asks: the tenant and role ApiKeyAuth found for the bearer token (it refused the
    request already when there was none to find). In OpenAPI as bearer auth."""
    principal = principal_in(request.scope)
    if principal is None:  # ApiKeyAuth did not run: never serve such a request
        raise ApiError(401, MISSING_TOKEN)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_queue(request: Request) -> JobQueue:
    queue = service_of(request).queue
    if queue is None:
        raise ApiError(503, STARTING)
    return queue


async def get_classifiers(request: Request) -> ClassifierStore:
    classifiers = service_of(request).classifiers
    if classifiers is None:
        raise ApiError(503, STARTING)
    return classifiers


def not_found(job_id: str) -> ApiError:
    return ApiError(404, f"job_id: no job {job_id} (unknown or expired)")


async def own_job_id(
    job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id from POST /v1/jobs")],
    principal: PrincipalDep,
) -> str:
    """A job id of the asking tenant; another tenant's is a 404, as an unknown one is."""
    if tenant_of_job(job_id) != principal.tenant:
        raise not_found(job_id)
    return job_id


QueueDep = Annotated[JobQueue, Depends(get_queue)]
ClassifiersDep = Annotated[ClassifierStore, Depends(get_classifiers)]
JobId = Annotated[str, Depends(own_job_id)]
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]
BankKey = Annotated[str, Path(pattern=BANK_KEY_PATTERN)]
ClassifierRefPath = Annotated[str, Path(pattern=CLASSIFIER_REF_PATTERN)]
AUTHED = [Depends(get_principal)]


async def refuse_when_full(queue: JobQueue) -> None:
    """503 while Redis is near its memory cap (it runs with noeviction: a write would fail)."""
    full = await queue.memory_pressure()
    if full:
        raise ApiError(503, full, headers={"Retry-After": "30"})


__all__ = [
    "AUTHED",
    "BankKey",
    "ClassifierRefPath",
    "ClassifiersDep",
    "JobId",
    "PrincipalDep",
    "QueueDep",
    "RunId",
    "ServiceDep",
    "get_classifiers",
    "get_principal",
    "not_found",
    "own_job_id",
    "get_queue",
    "get_service",
    "refuse_when_full",
    "service_of",
]
