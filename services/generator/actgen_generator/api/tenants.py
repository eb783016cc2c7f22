"""Who a request is: API keys mapped to a tenant and a role (docs/architecture.md, "Tenants").

``ACTGEN_API_KEYS`` names a file, or holds the entries themselves: one entry per line (or
separated by ``;``), ``sha256:<hex of the key> <tenant> <role>``, ``#`` starting a comment. Only
hashes are configured, so the file can be read by anyone who deploys it without giving a key
away. Roles: ``write`` (everything of its tenant) and ``read`` (GET and HEAD only: /metrics,
/v1/info, its tenant's jobs and results). ``ACTGEN_API_KEY`` (one key) is the ``default`` tenant
with ``write``; with neither set the service is open and every request is the ``default`` tenant.

The tenant scopes every name a client chooses (actgen_shared.keys): another tenant's job,
run, memory bank or classifier is a 404, as if it did not exist.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from actgen_shared.keys import DEFAULT_TENANT, TENANT_PATTERN
from actgen_shared.settings import Settings

ROLES = ("write", "read")
READ_METHODS = frozenset({"GET", "HEAD"})
_ENTRY = re.compile(r"^sha256:([0-9a-f]{64})\s+(\S+)(?:\s+(\S+))?$")
_TENANT = re.compile(TENANT_PATTERN)


@dataclass(frozen=True)
class Principal:
    """The tenant a request acts for and what it may do."""

    tenant: str = DEFAULT_TENANT
    role: str = "write"

    def may(self, method: str) -> bool:
        return self.role == "write" or method.upper() in READ_METHODS


OPEN = Principal()  # no key configured: the default tenant, full access


class KeysError(ValueError):
    """ACTGEN_API_KEYS does not parse; the message names the entry."""


def key_hash(key: str | bytes) -> str:
    """What ACTGEN_API_KEYS holds for a key: ``sha256:<hex>`` of its UTF-8 bytes."""
    raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def parse_keys(text: str, source: str = "ACTGEN_API_KEYS") -> dict[bytes, Principal]:
    """Entries -> {sha256 digest: principal}; KeysError naming the entry at fault."""
    found: dict[bytes, Principal] = {}
    for number, raw in enumerate(re.split(r"[\n;]", text), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _ENTRY.match(line)
        if match is None:
            raise KeysError(f"{source}: entry {number} is not 'sha256:<64 hex> <tenant> [role]': {line!r}")
        digest, tenant, role = match.group(1), match.group(2), match.group(3) or "write"
        if not _TENANT.match(tenant):
            raise KeysError(f"{source}: entry {number}: tenant {tenant!r} must match {TENANT_PATTERN}")
        if role not in ROLES:
            raise KeysError(f"{source}: entry {number}: role {role!r} is not one of {', '.join(ROLES)}")
        found[bytes.fromhex(digest)] = Principal(tenant, role)
    return found


def load_keys(settings: Settings) -> dict[bytes, Principal]:
    """Every configured key's digest -> principal (empty: the service is open)."""
    keys: dict[bytes, Principal] = {}
    if settings.api_keys:
        value = settings.api_keys.strip()
        path = Path(value).expanduser() if "\n" not in value and ";" not in value else None
        if path is not None and not value.startswith("sha256:"):
            try:
                text = path.read_text("utf-8")
            except OSError as exc:
                raise KeysError(f"ACTGEN_API_KEYS: cannot read the file {value}: {exc}") from None
            keys.update(parse_keys(text, f"ACTGEN_API_KEYS file {value}"))
        else:
            keys.update(parse_keys(value))
        if not keys:
            raise KeysError("ACTGEN_API_KEYS: no entry (leave it unset for an open service)")
    if settings.api_key:
        keys[hashlib.sha256(settings.api_key.encode("utf-8")).digest()] = Principal()
    return keys


def principal_of(keys: dict[bytes, Principal], token: bytes) -> Principal | None:
    """The principal of a bearer token, None for an unknown one (compared by digest)."""
    return keys.get(hashlib.sha256(token).digest())


__all__ = ["OPEN", "Principal", "KeysError", "key_hash", "load_keys", "parse_keys", "principal_of"]
