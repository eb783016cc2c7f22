"""``actgen-generator serve --device auto`` (as serve.py documents it) starts and gets ready, and
/v1/info tells a client the per-job caps it must split its work by."""

from __future__ import annotations

import pytest
from service_helpers import key_prefix_for, replica

from actgen_shared.client import GeneratorClient

pytestmark = pytest.mark.slow


def test_serve_with_device_auto_is_ready_and_reports_the_job_caps(redis_url: str) -> None:
    env = {"ACTGEN_MAX_ITEMS_PER_JOB": "7", "ACTGEN_MAX_JOB_IMAGE_STEPS": "1234"}
    with key_prefix_for(redis_url) as prefix:
        # no replica id: the default one names the device, which "auto" must resolve first
        with replica(redis_url, prefix, None, env=env, extra_args=["--device", "auto"]) as proc:
            with GeneratorClient(proc.url) as client:  # the process answered /readyz 200 to start
                info = client.info()
    assert info.device in ("cpu", "cuda:0")
    assert "-auto-" not in info.replica_id and ("-cpu-" in info.replica_id or "-gpu0-" in info.replica_id)
    assert (info.max_items_per_job, info.max_job_image_steps) == (7, 1234)
