"""Structured job-event logs: one JSON line per event, always with ``job_id`` when there is one.

``{"ts": ..., "event": "job.done", "job_id": "...", "replica": "...", ...}`` on the
``actgen.jobs`` logger, so a log shipper can follow a job across replicas by its id.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "actgen.jobs"
logger = logging.getLogger(LOGGER_NAME)


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def configure(level: int = logging.INFO) -> None:
    """Send job events to stderr as bare JSON lines (idempotent)."""
    if any(getattr(h, "_actgen", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    handler._actgen = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def log_event(event: str, job_id: str | None = None, level: int = logging.INFO, **fields: Any) -> None:
    """Log one job event as a JSON line."""
    if not logger.isEnabledFor(level):
        return
    record = {"ts": round(time.time(), 3), "event": event, "job_id": job_id, **fields}
    logger.log(level, json.dumps(record, default=str))
