"""No serving of noise (issue 28): `serve` without a model serves the trained digits model shipped in
the generator package (a wheel carries every file of models/tiny-digits), says which model it is
and what it is for, and a run naming classes the model was not trained on is refused.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import job_body, key_prefix_for, new_run_id

from actgen_generator import model_source
from actgen_generator.model_source import ModelSourceError, describe_model, serve_model
from actgen_shared.client import GeneratorClient
from actgen_shared.labels import DIGITS
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.run import ActGenRun

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "tiny-digits"


@pytest.fixture(scope="module")
def default_replica(redis_url: str) -> Iterator[GeneratorProcess]:
    with key_prefix_for(redis_url) as prefix:
        proc = GeneratorProcess(redis_url=redis_url, model="", env={"ACTGEN_KEY_PREFIX": prefix})
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("ACTGEN_MODEL", raising=False)  # serve's own default, as `make serve` runs it
            proc.start()
        try:
            yield proc
        finally:
            proc.stop()


def test_serve_without_a_model_serves_the_trained_digits_model_and_says_so(
    default_replica: GeneratorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "--model" not in default_replica.command()
    started = default_replica.log_tail()
    assert (
        "model tiny-digits-v1: a tiny SD-architecture model trained on scikit-learn's 8x8 digits" in started
    )
    with GeneratorClient(default_replica.url) as client:
        info = client.info()
    assert Path(info.model).resolve() == MODEL.resolve()
    assert info.model_classes == list(DIGITS)
    assert info.model_description is not None and "it draws digits only" in info.model_description
    monkeypatch.delenv("ACTGEN_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"trained on the classes zero, one.*not on '0', '1'"):
        ActGenRun(classes=[str(k) for k in range(10)], url=default_replica.url)
    with ActGenRun(label_set="digits", url=default_replica.url) as run:  # its own names: accepted
        assert run.class_names == list(DIGITS)


def test_a_job_naming_classes_the_model_does_not_declare_is_a_422(default_replica: GeneratorProcess) -> None:
    """The server refuses too (curl, another client): the digits model draws zero..nine only."""
    with httpx.Client(base_url=default_replica.url, timeout=30) as http:
        other = job_body(new_run_id(), n_items=2)
        other.pop("label_set")
        other["class_names"] = [str(k) for k in range(10)]
        refused = http.post("/v1/jobs", json=other)
        assert refused.status_code == 422, refused.text
        message = refused.json()["error"]["message"]
        assert message.startswith("class_names: '0', '1' are not classes of the model") and "zero" in message
        accepted = http.post("/v1/jobs", json=job_body(new_run_id(), n_items=2))  # label_set digits
        assert accepted.status_code == 202, accepted.text


def test_the_packaged_model_is_the_repositorys_and_a_missing_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert model_source.packaged_model().resolve() == MODEL.resolve()
    assert serve_model("tiny") == "tiny" and describe_model("tiny").classes is None
    assert "draws noise" in describe_model("tiny").purpose
    monkeypatch.setattr(model_source, "packaged_model", lambda: tmp_path / "absent")
    with pytest.raises(
        ModelSourceError, match="packaged digits model is missing.*tiny for the random-weight"
    ):
        serve_model(None)


def test_a_wheel_of_the_generator_carries_every_file_of_the_digits_model(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
        + [str(REPO / "services" / "generator")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("actgen_generator-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    folder = sorted(p.relative_to(MODEL).as_posix() for p in MODEL.rglob("*") if p.is_file())
    assert folder and all(f"actgen_generator/tiny_digits/{f}" in names for f in folder)
