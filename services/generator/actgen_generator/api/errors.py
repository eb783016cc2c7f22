"""The API's errors: every refusal is ``{"error": {"code", "message"}}`` naming the field at fault."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from actgen_generator.events import log_event
from actgen_shared.queue import REDIS_DOWN
from actgen_shared.schemas import ErrorBody

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 413, 422)
}
MAX_LISTED_ERRORS = 10  # validation errors named in one message


class ApiError(StarletteHTTPException):
    """An HTTP error with our own code; the message names the field at fault."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code or STATUS_CODES.get(status, "error")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error body every refusal has."""
    body = ErrorBody.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _format_loc(loc: Sequence[int | str], root: str | None = None) -> str:
    parts = list(loc)
    source = None
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        source = str(parts.pop(0))
    text = root or ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or source or "request"


def format_errors(errors: Sequence[Any], root: str | None = None) -> list[str]:
    """Pydantic's errors as ``field.path: message`` lines (the first ten, then a count)."""
    out = []
    for err in errors[:MAX_LISTED_ERRORS]:
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        out.append(f"{_format_loc(err.get('loc', ()), root)}: {msg}")
    if len(errors) > MAX_LISTED_ERRORS:
        out.append(f"... and {len(errors) - MAX_LISTED_ERRORS} more")
    return out


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", "; ".join(format_errors(list(exc.errors()))))


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    headers = dict(exc.headers or {})
    if exc.status_code == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return error_response(exc.status_code, code, message, headers=headers or None)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log_event("http.redis_unavailable", None, path=request.url.path, error=str(exc))
    return error_response(
        503, "unavailable", f"Redis does not answer ({exc}); retry shortly", headers={"Retry-After": "1"}
    )


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log_event("http.error", None, path=request.url.path, error=f"{type(exc).__name__}: {exc}")
    return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    """422 naming the field, our codes on HTTP errors, 503 while Redis is down, 500 otherwise."""
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(StarletteHTTPException)(_http)
    for error in REDIS_DOWN:
        app.exception_handler(error)(_redis_down)
    app.exception_handler(Exception)(_crash)


__all__ = ["ERROR_RESPONSES", "ApiError", "error_response", "format_errors", "install_error_handlers"]
