"""``ACTGEN_DURABLE_ACK=1``: a 202 (and a stored result) only once Redis has fsynced it.

Without it a 202 means "in Redis's memory, and in its append-only file within about a second"
(``appendfsync everysec``): a host crash or power loss can lose the last second of accepted jobs
and stored results (docs/architecture.md, "Durability"). With it, each acknowledged write is
followed on the same connection by ``WAITAOF 1 0 <timeout>`` (Redis >= 7.2, Valkey >= 8, with
``appendonly yes``): the API answers 202, and the worker counts a result as stored, only after the
local append-only file holds the write on disk (:meth:`actgen_shared.queue.JobQueue.durably`).

A replica started with it probes its Redis first and refuses to start, with one line naming
the reason, on a server without ``WAITAOF`` or without an append-only file.
"""

from __future__ import annotations

import redis as sync_redis
from redis.exceptions import RedisError, ResponseError

from actgen_shared.settings import Settings

PROBE_TIMEOUT_S = 5.0


class DurableAckUnavailable(RuntimeError):
    """ACTGEN_DURABLE_ACK=1 on a Redis that cannot give it; the message is the one line to print."""


def probe_durable_ack(settings: Settings) -> str:
    """Check the server can fsync on demand (``WAITAOF 1 0``); returns its name and version.

    Raises DurableAckUnavailable naming the server and its answer otherwise."""
    url = settings.redis_url or ""
    client = sync_redis.Redis.from_url(
        url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S, decode_responses=True
    )
    try:
        server = client.info("server")
        name = "valkey" if "valkey_version" in server else "redis"
        version = f"{name} {server.get('valkey_version') or server.get('redis_version', '?')}"
        try:
            local, _ = client.execute_command("WAITAOF", 1, 0, int(PROBE_TIMEOUT_S * 1000))
        except ResponseError as exc:
            raise DurableAckUnavailable(
                f"ACTGEN_DURABLE_ACK=1 needs WAITAOF (Redis >= 7.2 or Valkey >= 8, with appendonly yes); "
                f"the server ({version}) answered: {exc}"
            ) from None
        if int(local) < 1:
            raise DurableAckUnavailable(
                f"ACTGEN_DURABLE_ACK=1: the server ({version}) did not fsync its append-only file "
                f"within {PROBE_TIMEOUT_S:g} s (WAITAOF 1 0 answered {local} local fsyncs)"
            )
        return version
    except RedisError as exc:
        raise DurableAckUnavailable(f"ACTGEN_DURABLE_ACK=1: cannot probe Redis for WAITAOF: {exc}") from None
    finally:
        client.close()


__all__ = ["DurableAckUnavailable", "probe_durable_ack"]
