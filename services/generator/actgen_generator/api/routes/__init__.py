"""One router module per resource, each with its ``router``; ``ROUTERS`` in the order the app mounts them.

The hot paths first (POST /v1/jobs, GET /v1/runs/{run}/results): FastAPI matches a request
against the routes in this order, and each route it tries costs work on every request (about a
tenth of a no-op job's API calls with them last).
"""

from __future__ import annotations

from fastapi import APIRouter

from actgen_generator.api.routes import banks, classifiers, health, info, jobs, metrics, runs

ROUTERS: tuple[APIRouter, ...] = (
    jobs.router,
    runs.router,
    health.router,
    info.router,
    metrics.router,
    classifiers.router,
    banks.router,
)

__all__ = ["ROUTERS"]
