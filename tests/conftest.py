"""Shared fixtures: a real redis-server (REDIS_URL, else an embedded one) and per-test key prefixes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from service_helpers import key_prefix_for

from actgen_shared.redis_embedded import EmbeddedRedis
from actgen_shared.settings import Settings


@pytest.fixture(scope="session", autouse=True)
def tiny_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The random-weight tiny model is built once per test session into a folder of its own, so
    no test depends on (or writes to) the user's ~/.cache; generator processes inherit it."""
    folder = tmp_path_factory.mktemp("actgen-cache") / "tiny"
    before = os.environ.get("ACTGEN_CACHE_DIR")
    os.environ["ACTGEN_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("ACTGEN_CACHE_DIR", None)
    else:
        os.environ["ACTGEN_CACHE_DIR"] = before


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
    with key_prefix_for(redis_url) as prefix:
        yield prefix


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


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The test machine's cores are shared: one thread is faster than oversubscribed OpenMP."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sampler(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A GuidedSampler on a freshly built random-weight tiny model, loaded like SD 2.1."""
    from actgen_generator.pipeline import load_pipeline
    from actgen_generator.sampler import GuidedSampler
    from actgen_generator.tiny_model import build_tiny_model

    folder = build_tiny_model(Path(tmp_path_factory.mktemp("tiny")) / "model")
    return GuidedSampler(load_pipeline(str(folder), device="cpu"))
