"""``actgen-generator serve --device auto`` (as serve.py documents it) starts and gets ready, and
/v1/info tells a client the per-job caps it must split its work by and what its sampler runs with.
A real model that ``auto`` puts on the CPU says so, with why CUDA is unusable."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from service_helpers import key_prefix_for, replica

from actgen_generator import devices
from actgen_generator.api.lifecycle import Service, load_sampler, warn_if_cpu_fallback
from actgen_generator.events import LOGGER_NAME
from actgen_generator.pipeline import ensure_tiny_model
from actgen_shared.client import GeneratorClient
from actgen_shared.settings import Settings

pytestmark = pytest.mark.slow


def test_serve_with_device_auto_is_ready_and_reports_the_job_caps(redis_url: str) -> None:
    env = {
        "ACTGEN_MAX_ITEMS_PER_JOB": "7",
        "ACTGEN_MAX_JOB_IMAGE_STEPS": "1234",
        "ACTGEN_ADV_DECODE": "classifier",
        "ACTGEN_GRAD_CHECKPOINTING": "on",
    }
    with key_prefix_for(redis_url) as prefix:
        # no replica id: the default one names the device, which "auto" must resolve first
        with replica(redis_url, prefix, None, env=env, extra_args=["--device", "auto"]) as proc:
            with GeneratorClient(proc.url) as client:  # the process answered /readyz 200 to start
                info = client.info()
    assert info.device == ("cuda:0" if torch.cuda.is_available() else "cpu")  # an index, never bare "cuda"
    assert "-auto-" not in info.replica_id and ("-cpu-" in info.replica_id or "-gpu0-" in info.replica_id)
    assert (info.max_items_per_job, info.max_job_image_steps) == (7, 1234)
    assert (info.adv_decode, info.grad_checkpointing) == ("classifier", "on")  # as the sampler has them


@pytest.fixture
def events() -> Iterator[list[dict]]:
    """The job-event log lines emitted meanwhile, parsed."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(record.getMessage()))

    logger = logging.getLogger(LOGGER_NAME)
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder that is not the tiny model (the tiny weights without its marker file)."""
    folder = tmp_path_factory.mktemp("real") / "model"
    shutil.copytree(ensure_tiny_model(), folder)
    (folder / "actgen_tiny.json").unlink()
    return folder


def test_a_real_model_that_auto_puts_on_the_cpu_says_so_and_why(
    real_model: Path, events: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a host without usable CUDA
    settings = Settings(adv_decode="classifier", grad_checkpointing="off")
    svc = Service(settings=settings, model=str(real_model), device="auto", replica_id="r1")
    sampler, model_id, device, dtype = load_sampler(svc)  # what a replica's startup runs
    (event,) = [e for e in events if e["event"] == "replica.cpu_fallback"]
    assert (device, dtype, event["model"], event["dtype"]) == ("cpu", "float32", str(real_model), "float32")
    message = event["message"]
    assert str(real_model) in message and "CPU" in message and "float32" in message
    reason = devices.cuda_unusable_reason()
    assert reason and reason in message and event["reason"] == reason
    assert (sampler.adv_decode, sampler.grad_checkpointing) == ("classifier", "off")  # type: ignore[attr-defined]

    # the reason tells the three cases apart
    gpu_node = tmp_path / "nvidia0"
    gpu_node.touch()
    monkeypatch.setattr(devices, "NVIDIA_DEVICE", gpu_node)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert "driver is likely too old for this torch's CUDA 12.4" in (devices.cuda_unusable_reason() or "")
    monkeypatch.setattr(devices, "NVIDIA_DEVICE", tmp_path / "absent")
    assert "no NVIDIA GPU or driver found" in (devices.cuda_unusable_reason() or "")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "built without CUDA" in (devices.cuda_unusable_reason() or "")

    # the tiny model, or a device asked for by name, is no surprise: nothing to say
    for model, device_asked in ((None, "auto"), (str(ensure_tiny_model()), None), (str(real_model), "cpu")):
        quiet = Service(settings=settings, model=model, device=device_asked, replica_id="r2")
        assert warn_if_cpu_fallback(quiet) is None
