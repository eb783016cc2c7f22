"""The generator's REST API (docs/architecture.md section 3), laid out as FastAPI's full-stack template does.

``main.create_app`` joins ``errors`` (the error body), ``middleware`` (API key, body cap),
``lifecycle`` (the replica's :class:`Service`, its name, model and worker), ``deps`` and one
router module per resource under ``routes/``. Everything a job carries is validated before it
is queued, so nothing invalid reaches a GPU; every refusal is a 4xx with the body
``{"error": {"code", "message"}}`` whose message names the field at fault.
"""

from __future__ import annotations

from actgen_generator.api.errors import ApiError
from actgen_generator.api.lifecycle import SAMPLERS, Service, claim_replica_id, stop_worker
from actgen_generator.api.main import create_app

__all__ = ["SAMPLERS", "ApiError", "Service", "claim_replica_id", "create_app", "stop_worker"]
