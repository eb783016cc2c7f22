"""A consumer's liveness: its heartbeat key, beaten from a thread, and the name it holds.

Only the entries of a consumer whose heartbeat expired are reclaimed by another
(:mod:`actgen_shared.queue` states the delivery guarantee), so the heartbeat must go on while
the process lives, whatever its event loop is doing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from actgen_shared.keys import CONSUMER_GROUP
from actgen_shared.replies import as_str
from actgen_shared.scripts import lua
from actgen_shared.settings import Settings


class ReplicaIdInUse(RuntimeError):
    """Another live process holds this consumer name (its heartbeat key has another token)."""


def _in_use_message(name: str, holder: str, ttl_ms: int | None, lease_s: float) -> str:
    left = f"{ttl_ms / 1000:.1f} s" if ttl_ms and ttl_ms > 0 else f"up to {lease_s:g} s"
    return (
        f"replica id {name!r} is in use: a live replica ({holder}) holds its heartbeat "
        f"(lease ends in {left}). Give this replica another ACTGEN_REPLICA_ID, or unset it "
        "for a unique default, or wait until the other one has stopped."
    )


def new_token(name: str) -> str:
    """A token unique to one process's use of a consumer name: ``name/host:pid/random``."""
    return f"{name}/{socket.gethostname()}:{os.getpid()}/{uuid.uuid4().hex[:12]}"


def owned_entries(name: str, reply: list[Any], lease_s: float) -> set[str] | None:
    """The heartbeat script's reply -> our pending entry ids (None: unknown); raises on a twin."""
    if int(reply[0]) == -1:
        raise ReplicaIdInUse(_in_use_message(name, as_str(reply[1]) or "?", None, lease_s))
    if int(reply[1]) == 0:
        return None
    return {as_str(e) or "" for e in reply[2:]}


class Heartbeat:
    """A consumer's heartbeat, beaten from a thread of its own over its own (sync) connection.

    Neither a stalled event loop nor a long GPU batch can let the lease lapse while the process
    lives. Each beat also reads which entries are still pending for us: ``lost(tracked)`` says
    which of the caller's deliveries another consumer has taken (after a pause past the lease,
    say), so the caller stops working on them. When another process holds our name,
    ``on_conflict`` is called (from the thread) with the message.
    """

    def __init__(
        self,
        url: str,
        settings: Settings,
        name: str,
        token: str,
        on_conflict: Callable[[str], None] | None = None,
    ) -> None:
        import redis as sync_redis

        self.settings = settings
        self.name = name
        self.token = token
        self.on_conflict = on_conflict
        timeout = max(0.5, min(settings.heartbeat_interval_s, settings.lease_s / 3))
        self._redis = sync_redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=False,
        )
        self._script = self._redis.register_script(lua("heartbeat"))
        self._keys = [settings.keys.heartbeat(name), settings.keys.jobs_stream]
        self._lock = threading.Lock()
        self._owned: set[str] | None = None
        self._owned_since = 0.0  # monotonic time at which the last good pending read began
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        self.failures = 0

    def claim(self) -> None:
        """Take the name at start: ReplicaIdInUse when a live heartbeat holds it."""
        lease_ms = max(1, int(self.settings.lease_s * 1000))
        key = self._keys[0]
        if not self._redis.set(key, self.token, nx=True, px=lease_ms):
            holder = self._redis.get(key)
            if holder is not None and as_str(holder) != self.token:
                raise ReplicaIdInUse(
                    _in_use_message(
                        self.name, as_str(holder) or "?", self._redis.pttl(key), self.settings.lease_s
                    )
                )
            self._redis.set(key, self.token, px=lease_ms)

    def beat(self) -> bool:
        """One beat; False when Redis did not answer or the name is taken."""
        began = time.monotonic()
        try:
            reply = self._script(
                keys=self._keys,
                args=[CONSUMER_GROUP, self.name, max(1, int(self.settings.lease_s * 1000)), self.token],
            )
            owned = owned_entries(self.name, reply, self.settings.lease_s)
        except ReplicaIdInUse as exc:
            self.failures += 1
            if self.on_conflict is not None:
                self.on_conflict(str(exc))
            return False
        except Exception:
            self.failures += 1
            return False
        with self._lock:
            if owned is not None:
                self._owned, self._owned_since = owned, began
            self.beats += 1
        return True

    def lost(self, tracked: Mapping[str, float]) -> set[str]:
        """Of ``tracked`` (entry id -> monotonic time it was fetched), those no longer ours."""
        with self._lock:
            owned, since = self._owned, self._owned_since
        if owned is None:
            return set()
        return {e for e, fetched in tracked.items() if fetched < since and e not in owned}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.settings.heartbeat_interval_s)

    def start(self) -> Heartbeat:
        """Start beating (once; later calls do nothing)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = False) -> None:
        """Stop beating; ``release``: also drop the heartbeat key now if it is still ours (a
        replica that never started its worker; a worker's own stop does this after releasing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if release:
            try:
                self._redis.register_script(lua("stop"))(
                    keys=self._keys, args=[CONSUMER_GROUP, self.name, self.token]
                )
            except Exception:
                pass  # the key expires with the lease anyway
        self._redis.close()


__all__ = ["Heartbeat", "ReplicaIdInUse", "new_token", "owned_entries"]
