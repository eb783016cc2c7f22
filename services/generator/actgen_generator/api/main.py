"""``create_app``: one generator replica's FastAPI app, joined from its parts (docs/architecture.md section 3).

Middleware first (the API key and the body cap act before a body is read), then the error
handlers, then one router per resource. The replica's state is a :class:`Service` on
``app.state.service``; its lifespan opens Redis and (unless ``worker=False``) starts the worker.
"""

from __future__ import annotations

from fastapi import FastAPI

from actgen_generator.api.errors import install_error_handlers
from actgen_generator.api.lifecycle import SAMPLERS, Service, default_replica_id, lifespan
from actgen_generator.api.middleware import ApiKeyAuth, BodySizeLimit
from actgen_generator.api.routes import ROUTERS
from actgen_generator.api.tenants import load_keys
from actgen_shared import __version__
from actgen_shared.settings import Settings


def create_app(
    settings: Settings | None = None,
    *,
    worker: bool = True,
    sampler: str = "guided",
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> FastAPI:
    """A generator replica. ``worker=False``: API only; ``sampler='echo'``: no model (benchmarks).

    ``device`` (else ACTGEN_DEVICE) may be None or "auto": the pipeline picks CUDA when present.
    """
    settings = settings or Settings.from_env()
    keys = load_keys(settings)  # KeysError now, naming the entry, not at the first request
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    device = device or settings.device
    svc = Service(
        settings=settings,
        run_worker=worker,
        sampler_kind=sampler,
        model=model or settings.model,
        device=device,
        dtype=dtype or settings.dtype,
        replica_id=settings.replica_id or default_replica_id(device, worker),
    )
    app = FastAPI(
        title="ActGen generator",
        version=__version__,
        summary="Stable Diffusion with attentive image guidance and gradient guidance, as a service",
        lifespan=lifespan(svc),
    )
    app.state.service = svc
    app.add_middleware(BodySizeLimit, settings=settings)
    app.add_middleware(ApiKeyAuth, settings=settings, keys=keys)  # added last: runs first, before any read
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


__all__ = ["create_app"]
