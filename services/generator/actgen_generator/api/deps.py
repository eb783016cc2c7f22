"""The routes' dependencies: the replica's service, auth, the queue and the classifier store."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from actgen_generator.api.errors import ApiError
from actgen_generator.api.lifecycle import Service
from actgen_generator.api.middleware import MISSING_TOKEN, WRONG_TOKEN
from actgen_generator.classifiers import ClassifierStore
from actgen_shared.queue import JobQueue
from actgen_shared.schemas import BANK_KEY_PATTERN, CLASSIFIER_REF_PATTERN, RUN_ID_PATTERN

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
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
_bearer = HTTPBearer(auto_error=False, description="ACTGEN_API_KEY, when the service sets one")


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Bearer-token auth when ``ACTGEN_API_KEY`` is set (in OpenAPI; ApiKeyAuth enforces it first)."""
    expected = service_of(request).settings.api_key
    if not expected:
        return
    if credentials is None:
        raise ApiError(401, MISSING_TOKEN)
    given = credentials.credentials.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, expected.encode("utf-8")):
        raise ApiError(401, WRONG_TOKEN)


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


QueueDep = Annotated[JobQueue, Depends(get_queue)]
ClassifiersDep = Annotated[ClassifierStore, Depends(get_classifiers)]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id from POST /v1/jobs")]
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]
BankKey = Annotated[str, Path(pattern=BANK_KEY_PATTERN)]
ClassifierRefPath = Annotated[str, Path(pattern=CLASSIFIER_REF_PATTERN)]
AUTHED = [Depends(require_api_key)]


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
    "QueueDep",
    "RunId",
    "ServiceDep",
    "get_classifiers",
    "get_queue",
    "get_service",
    "refuse_when_full",
    "require_api_key",
    "service_of",
]
