"""The queue's Lua scripts (``lua/*.lua``, package data), read once and registered per client.

Each script binds its KEYS and ARGV to named locals at its top; key names are computed in
Python (keys.py) and passed in KEYS, so no script builds a key. ``prelude.lua`` (the status
steps that keep the counters) is put in front of every script.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

PRELUDE = "prelude"


@cache
def lua(name: str) -> str:
    """The source of ``lua/{name}.lua`` with the prelude in front (read from the package once)."""
    folder = resources.files("actgen_shared").joinpath("lua")
    prelude = folder.joinpath(f"{PRELUDE}.lua").read_text("utf-8")
    return prelude + "\n" + folder.joinpath(f"{name}.lua").read_text("utf-8")


@dataclass(frozen=True)
class Scripts:
    """One handle per script, registered on one asyncio Redis client.

    The producer (:class:`~actgen_shared.queue.JobQueue`) and the worker side
    (:class:`~actgen_shared.consumer.Consumer`) call these; each field is named for its file.
    """

    submit: AsyncScript
    cancel: AsyncScript
    heartbeat: AsyncScript
    reclaim: AsyncScript
    admit: AsyncScript
    start: AsyncScript
    progress: AsyncScript
    store: AsyncScript
    finish: AsyncScript
    release: AsyncScript
    stop: AsyncScript
    forget: AsyncScript

    @classmethod
    def register(cls, redis: aioredis.Redis) -> Scripts:
        """Register every script on ``redis`` (its ``register_script``: EVALSHA, then EVAL)."""
        return cls(**{f.name: redis.register_script(lua(f.name)) for f in fields(cls)})
