"""One router module per resource, each with its ``router``; ``ROUTERS`` in the order the app mounts them."""

from __future__ import annotations

from fastapi import APIRouter

from actgen_generator.api.routes import banks, classifiers, health, info, jobs, metrics, runs

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    info.router,
    metrics.router,
    classifiers.router,
    jobs.router,
    runs.router,
    banks.router,
)

__all__ = ["ROUTERS"]
