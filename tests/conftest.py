"""Shared fixtures: a real redis-server (REDIS_URL, else an embedded one) and per-test key prefixes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_shared.settings import Settings


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set (CI may provide one), else a private embedded redis-server."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    """Settings pointing at the test Redis, with short leases so liveness tests run fast."""
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        lease_s=2.0,
        heartbeat_interval_s=0.5,
        max_deliveries=3,
        result_ttl_s=3600,
    )
