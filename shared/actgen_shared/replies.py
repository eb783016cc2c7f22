"""Decoding the queue's Redis replies (bytes, RESP2 and RESP3 shapes) into plain strings."""

from __future__ import annotations

from typing import Any


def as_str(value: bytes | str | None) -> str | None:
    """A reply field as text (None stays None)."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_entries(response: Any) -> list[tuple[str, dict[str, str]]]:
    """XREAD/XREADGROUP reply (one stream) -> [(id, fields)], fields None-safe."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3 shapes
        streams = list(response.values())
    else:
        streams = [item[1] for item in response]
    out: list[tuple[str, dict[str, str]]] = []
    for entries in streams:
        if entries and isinstance(entries[0], list):  # RESP3 legacy wraps once more
            entries = entries[0]
        for entry_id, fields in entries:
            if entry_id is None:
                continue
            out.append(
                (
                    as_str(entry_id) or "",
                    {as_str(k) or "": as_str(v) or "" for k, v in (fields or {}).items()},
                )
            )
    return out
