"""ASGI middleware that acts before a request's body is read: the API key and the body size cap."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actgen_generator.api.errors import ApiError, error_response
from actgen_generator.api.tenants import OPEN, Principal, load_keys, principal_of
from actgen_shared.settings import Settings

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
CLASSIFIER_FORM_SLACK = 1 << 20  # multipart framing and metadata around a classifier's weights
MISSING_TOKEN = "Authorization: a 'Bearer <ACTGEN_API_KEY>' header is required"
WRONG_TOKEN = "Authorization: the bearer token is not the service's API key (nor one of ACTGEN_API_KEYS)"
READ_ONLY = "Authorization: this key's role is read (GET only); {method} needs a key with role write"
PRINCIPAL = "principal"  # where the request's Principal is kept in scope["state"]


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, None without one."""
    value = next((v for k, v in headers if k == b"authorization"), None)
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def principal_in(scope: Scope) -> Principal | None:
    """The principal ApiKeyAuth found for this request (None: it did not run)."""
    found = scope.get("state", {}).get(PRINCIPAL)
    return found if isinstance(found, Principal) else None


class ApiKeyAuth:
    """Bearer-token check before anything of the request is read (ASGI, outermost).

    With keys configured (ACTGEN_API_KEYS and/or ACTGEN_API_KEY, api/tenants.py), every route but
    /healthz and /readyz needs a known token, the docs (/docs, /redoc, /openapi.json) too unless
    ``ACTGEN_PUBLIC_DOCS=1``; the token's :class:`Principal` (tenant, role) goes into the
    request's state, and a read-only key may only GET. A refusal is a 401 (403 for the role) sent
    without reading the body (FastAPI would parse a JSON body before a dependency runs), and the
    connection is closed rather than drained.
    """

    def __init__(self, app: ASGIApp, settings: Settings, keys: dict[bytes, Principal] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.keys = load_keys(settings) if keys is None else keys  # KeysError for a bad file

    def is_open(self, path: str) -> bool:
        return path in OPEN_PATHS or (self.settings.public_docs and path in DOCS_PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.keys or self.is_open(scope.get("path", "")):
            state[PRINCIPAL] = OPEN if not self.keys else Principal(role="read")
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        principal = None if token is None else principal_of(self.keys, token)
        if principal is not None and principal.may(scope.get("method", "GET")):
            state[PRINCIPAL] = principal
            await self.app(scope, receive, send)
            return
        if principal is not None:
            status, code, why = 403, "forbidden", READ_ONLY.format(method=scope.get("method"))
        else:
            status, code, why = 401, "unauthorized", MISSING_TOKEN if token is None else WRONG_TOKEN
        response = error_response(
            status, code, why, headers={"WWW-Authenticate": "Bearer", "Connection": "close"}
        )
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    """A receive() for a response sent without reading the request: the client is gone."""
    return {"type": "http.disconnect"}


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body: more than {limit} bytes (ACTGEN_MAX_BODY_BYTES)")


class BodySizeLimit:
    """Refuse bodies over the cap with 413: by Content-Length at once, else while streaming."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        if path.startswith("/v1/classifiers"):
            return self.settings.max_classifier_bytes + CLASSIFIER_FORM_SLACK
        return self.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await error_response(400, "bad_request", "Content-Length is not a number")(
                        scope, receive, send
                    )
                    return
                if length > limit:
                    message = str(BodyTooLarge(limit).detail)
                    await error_response(413, "payload_too_large", message)(scope, receive, send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


__all__ = [
    "ApiKeyAuth",
    "BodySizeLimit",
    "BodyTooLarge",
    "MISSING_TOKEN",
    "PRINCIPAL",
    "WRONG_TOKEN",
    "bearer_token",
    "principal_in",
]
