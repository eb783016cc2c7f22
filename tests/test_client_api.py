"""The client API for any training loop (actgen_shared.run), its Lightning callback and examples/.

One real generator replica (random-weight tiny model, real Redis) with an API key and a per-job
cap of 3 items serves the module; the examples run as the user would run them, as subprocesses
that find the generator through ACTGEN_GENERATOR_URL / ACTGEN_API_KEY.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_helpers import key_prefix_for
from trainer_helpers import small_config

from actgen_shared import codecs
from actgen_shared.architectures import build_classifier
from actgen_shared.client import GeneratorClient
from actgen_shared.guides import GuideError, guide_pngs
from actgen_shared.labels import DIGITS
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import free_port
from actgen_shared.run import ActGenRun, GeneratorRefused, GeneratorUnavailable

REPO = Path(__file__).resolve().parents[1]
KEY = "client-key"
ITEM_CAP = 3
FAST = {"num_inference_steps": 2, "grad_steps": 1, "height": 64, "width": 64, "bank_sample": 16}
HALF = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def generator(redis_url: str) -> Iterator[GeneratorProcess]:
    env = {"ACTGEN_API_KEY": KEY, "ACTGEN_MAX_ITEMS_PER_JOB": str(ITEM_CAP), "OMP_NUM_THREADS": "1"}
    with (
        key_prefix_for(redis_url) as prefix,
        GeneratorProcess(redis_url=redis_url, env={"ACTGEN_KEY_PREFIX": prefix, **env}) as proc,
    ):
        yield proc


@pytest.fixture
def env(generator: GeneratorProcess, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The generator's URL and key in the environment, as a user would set them."""
    monkeypatch.setenv("ACTGEN_GENERATOR_URL", generator.url)
    monkeypatch.setenv("ACTGEN_API_KEY", KEY)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --- guides and codecs (no server) ------------------------------------------------------------
def test_guides_undo_the_normalisation_and_name_the_item_that_is_wrong() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    unit = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # N x 3 x 16 x 16 in [0, 1]
    normalised = (unit - 0.5) / 0.5
    for pngs in (
        guide_pngs(normalised, HALF, HALF),  # a normalised batch
        guide_pngs(list(unit)),  # CHW floats in [0, 1]
        guide_pngs(torch.from_numpy(pixels).permute(0, 3, 1, 2)),  # uint8 CHW
        guide_pngs(list(pixels)),  # uint8 HWC arrays
    ):
        assert [codecs.image_decode(p).tolist() for p in pngs] == pixels.tolist()
    with pytest.raises(GuideError, match=r"images\[1\] has values in \[-1\.00, 1\.00\].*normalized=True"):
        guide_pngs([unit[0], normalised[1]])


def test_a_guide_that_is_no_image_says_so_without_pillows_file_repr() -> None:
    with pytest.raises(codecs.DecodeError) as caught:
        codecs.image_decode(b"hello, world")
    assert "12 bytes that are not a PNG, JPEG or WEBP file (they start with b'hello, w')" in str(caught.value)
    truncated = codecs.png_encode(np.zeros((16, 16, 3), dtype=np.uint8))[:40]
    with pytest.raises(codecs.DecodeError) as caught:
        codecs.image_decode(truncated)
    assert "BytesIO" not in str(caught.value) and "not a decodable image" in str(caught.value)


# --- the API against the replica ---------------------------------------------------------------
def test_no_key_a_wrong_key_or_no_generator_is_named_with_its_fix(
    generator: GeneratorProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACTGEN_API_KEY", raising=False)
    with pytest.raises(GeneratorUnavailable, match=r"needs an API key \(401\): set ACTGEN_API_KEY"):
        ActGenRun(classes=DIGITS, url=generator.url)
    with pytest.raises(GeneratorUnavailable, match=r"refused the API key \(401\): set ACTGEN_API_KEY"):
        ActGenRun(classes=DIGITS, url=generator.url, api_key="wrong")
    with pytest.raises(GeneratorUnavailable, match=r"no generator answers at .*actgen-generator serve"):
        ActGenRun(classes=DIGITS, url=f"http://127.0.0.1:{free_port()}")
    # the trainer says the same (it used to blame a missing generator for a missing key)
    from actgen_trainer.loop import Trainer

    with (
        GeneratorClient(generator.url) as keyless,
        pytest.raises(GeneratorUnavailable, match=r"needs an API key"),
    ):
        Trainer(small_config(tmp_path), client=keyless, progress=False)


def test_a_run_posts_tensors_split_to_the_cap_reads_resumes_and_cleans_up(env: dict[str, str]) -> None:
    torch.manual_seed(0)
    model = build_classifier("simple_cnn", len(DIGITS))
    pixels = torch.rand(5, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4])
    adversarial = {"adv_prob": 0.5}
    with ActGenRun(
        classes=DIGITS, architecture="simple_cnn", image_size=16, mean=HALF, std=HALF, options=FAST, seed=7
    ) as run:
        uploads: list[str] = []
        upload = run.client.upload_classifier
        run.client.upload_classifier = lambda *a, **k: uploads.append("x") or upload(*a, **k)  # type: ignore[method-assign]
        assert run.item_cap == ITEM_CAP  # from /v1/info: split before the service refuses
        post = {"epoch": 0, "model": model, "normalized": True, "options": adversarial}
        sub = run.submit((pixels - 0.5) / 0.5, labels, guide_ids=[f"g{k}" for k in range(5)], **post)
        assert [n for _, n in sub.jobs] == [3, 2] and sub.posted == 5 and sub.error is None
        assert sub.classifier_ref is not None and run.ledger.classifiers == [sub.classifier_ref]
        # a resumed loop re-posting epoch 0, the same body (another body under a used key is a 422)
        again = run.submit((pixels - 0.5) / 0.5, labels, guide_ids=[f"g{k}" for k in range(5)], **post)
        assert again.jobs == sub.jobs and len(run.ledger.jobs) == 2  # the same jobs (idempotency keys)
        other = run.submit((pixels - 0.5) / 0.5, labels, **post)  # other samples: the first jobs stand
        assert other.jobs == [] and other.error is not None and "idempotency_key" in other.error
        assert len(run.ledger.jobs) == 2
        assert again.classifier_ref == sub.classifier_ref and uploads == ["x"]  # same weights: no upload
        assert run.inflight() == 2 and run.wait() == 0

        assert run.refresh(epoch=1) == 5 and run.ledger.pending == {}
        arrived = run.dataset
        assert arrived is not None and len(arrived) == 5
        assert sorted((a.class_id, a.guide_id) for a in arrived.items) == [(k, f"g{k}") for k in range(5)]
        assert {a.job_id for a in arrived.items} == {job_id for job_id, _ in sub.jobs}
        assert {(a.epoch, a.first_epoch) for a in arrived.items} == {(0, 1)}
        image, label = arrived[0]
        assert tuple(image.shape) == (3, 16, 16) and 0 <= float(image.min()) <= float(image.max()) <= 1
        assert label == arrived.items[0].class_id
        with GeneratorClient(run.url, api_key=KEY) as plain:
            assert sum(plain.memory_bank(run.run_id).counts.values()) == 5

        # a checkpoint's state continues the run in a new object: the same images, re-read
        resumed = ActGenRun(classes=DIGITS, image_size=16)
        resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
        assert resumed.run_id == run.run_id and resumed.dataset is not None
        assert [a.stream_id for a in resumed.dataset.items] == [a.stream_id for a in arrived.items]
        assert all(torch.equal(resumed.dataset[k][0], arrived[k][0]) for k in range(5))
        assert resumed.refresh(epoch=2) == 0
        resumed.close()

        # a guide that is not an image: the service's 422, explained, naming the item
        with pytest.raises(GeneratorRefused) as refused:
            run.submit([b"hello, world"], [1], epoch=3)
        message = str(refused.value)
        assert message.startswith(f"the generator at {run.url} refused the request (422): items[0].image")
        assert "not a PNG, JPEG or WEBP file" in message and refused.value.status == 422

    with GeneratorClient(run.url, api_key=KEY) as plain:  # the end: classifier and bank deleted
        assert plain.delete_classifier(sub.classifier_ref) is False
        assert plain.memory_bank(run.run_id).counts == {}


def test_a_run_asked_to_cancels_its_unfinished_jobs_when_it_ends(env: dict[str, str]) -> None:
    slow = {**FAST, "num_inference_steps": 200, "mode": "aig"}  # seconds of work on the tiny model
    with ActGenRun(classes=DIGITS, options=slow, cancel_on_exit=True) as run:
        sub = run.submit(torch.rand(1, 3, 16, 16), [7], epoch=0)
        assert run.inflight() == 1
    with GeneratorClient(run.url, api_key=KEY) as plain:
        assert plain.wait(sub.jobs[0][0], timeout_s=60).status.value == "cancelled"


def test_http_request_lines_stay_quiet_unless_asked(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with ActGenRun(classes=DIGITS) as run:
        run.refresh()
    assert [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "httpcore"))] == []
    with ActGenRun(classes=DIGITS, log_http=True) as run:
        run.refresh()
    assert any(r.name == "httpx" and "HTTP Request" in r.getMessage() for r in caplog.records)


# --- the examples, as a user runs them ---------------------------------------------------------
def _example(command: list[str], env: dict[str, str], out: Path) -> dict:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_plain_pytorch_example_trains_on_the_images_that_arrived(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "plain.json"
    counts = _example([sys.executable, "examples/plain_pytorch.py", "--out", str(out)], env, out)
    assert counts["posted"] > 0 and counts["arrived"] == counts["posted"]
    assert counts["final_train_size"] == counts["real"] + counts["arrived"]
    with GeneratorClient(env["ACTGEN_GENERATOR_URL"], api_key=KEY) as plain:
        assert plain.memory_bank(counts["run_id"]).counts == {}  # the context manager cleaned up


def test_lightning_example_adds_the_arrived_images_to_later_epochs(
    env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "lightning.json"
    counts = _example([sys.executable, "examples/lightning_callback.py", "--out", str(out)], env, out)
    sizes = counts["train_sizes"]
    assert len(sizes) == 4 and sizes[0] == counts["real"] and sizes == sorted(sizes)
    assert counts["posted"] > 0 and counts["arrived"] == counts["posted"]
    assert counts["final_train_size"] == counts["real"] + counts["arrived"]


def test_rest_example_uploads_submits_polls_reads_and_cancels(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "rest.json"
    summary = _example(["bash", "examples/rest.sh"], {**env, "PYTHON": sys.executable, "OUT": str(out)}, out)
    assert summary["classifier_ref"].startswith("sha256:") and summary["job_status"] == "done"
    assert summary["results"] == 1 and summary["image_bytes"] > 100
    assert summary["cancelled_status"] == "cancelled" and summary["classifier_delete"] == 204
