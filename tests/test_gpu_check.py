"""``make gpu-check`` on this CPU (bench/gpu_check.py, profile cpu: the tiny model at its own size).

The same script a GPU host runs with SD 2.1's architecture: every section must pass here, with
its figures, so what fails on a GPU is the GPU's, not the script's. Then a rerun of one section
into the same report, past its time limit: recorded as timed out, the others kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow


def _run(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--profile", "cpu", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("gpu-check") / "report.json"
    done = _run(out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, json.loads(out.read_text())


def test_every_section_passes_on_the_cpu_with_its_figures(report: tuple[Path, dict[str, Any]]) -> None:
    _, data = report
    sections = data["sections"]
    assert data["profile"] == "cpu" and list(sections) == list(gpu_check.SECTIONS)
    assert data["passed"] == list(gpu_check.SECTIONS) and data["failed"] == []
    for name, entry in sections.items():
        assert entry["status"] == "passed" and entry["seconds"] > 0 and entry["figures"], name

    versions = sections["versions"]["figures"]
    assert versions["transformers_sees_torch"] and versions["diffusers"] != "missing"
    assert versions["redis_server"]
    saved = sections["save_reload"]["figures"]
    assert saved["files"] and all(".fp16.safetensors" in f for f in saved["files"])
    assert saved["weights_compared"] > 100 and saved["loaded_dtype"] == "float32"

    modes = sections["modes"]["figures"]["float32"]
    assert set(modes) == set(gpu_check.MODES)
    assert all(m["latents_finite"] and m["seconds_per_image"] > 0 for m in modes.values())
    actgen = modes["actgen"]
    assert actgen["grad_steps_recorded"] == [2, 2] and all(actgen["adversarial"])
    assert actgen["losses_finite"] and actgen["latent_change_vs_aig"] > 0

    ckpt = sections["grad_checkpointing"]["figures"]
    assert ckpt["off"]["peak_memory_mb"] > 0 and ckpt["on"]["seconds_per_image"] > 0
    # checkpointing re-runs the forward: the same gradient, so the same images
    assert ckpt["latent_max_diff_on_vs_off"] < 1e-4

    batching = sections["batching"]["figures"]
    assert batching["latent_relative_diff"] <= batching["tolerance"] and batching["speedup"] > 0

    oom = sections["oom"]["figures"]  # the worker halved its batch until the job fit
    assert oom["batches_tried"][:3] == [8, 4, 2] and oom["batch_limit_after"] <= 2
    assert oom["job_status"] == "done" and oom["items_done"] == 8

    serve = sections["serve"]["figures"]
    assert serve["job_status"] == "done" and serve["replica_device"] == "cpu"
    assert serve["items"] == 4 and serve["image_shape"] == [32, 32, 3] and all(serve["adversarial"])

    trainer = sections["trainer"]["figures"]["bf16"]
    assert trainer["autocast"] == "bf16" and not trainer["grad_scaler"]
    assert trainer["persistent_workers"] and trainer["train_size"] > 0

    bench = sections["sd21gpu"]["figures"]["float32"]
    cell = bench["variants"]["full"]["cells"]["actgen_b2"]
    assert cell["seconds_per_image"] > 0 and cell["rounds"] == 2 and cell["parts_add_up"]
    assert bench["variants"]["full"]["ratio"]["b2"]["flop_floor"] > 1.0
    assert gpu_check.SECTIONS[0] == "sd21gpu"  # performance first: nothing ran before it


def test_one_section_rerun_past_its_limit_is_recorded_and_the_rest_kept(
    report: tuple[Path, dict[str, Any]],
) -> None:
    out, before = report
    done = _run(out, "--sections", "sd21gpu", "--bench-timeout-s", "1")
    assert done.returncode == 124, done.stdout[-3000:] + done.stderr[-3000:]
    after = json.loads(out.read_text())
    bench = after["sections"]["sd21gpu"]
    assert bench["status"] == "failed" and "timed out after 1 s" in bench["error"]
    assert after["failed"] == ["sd21gpu"]
    assert {k: v for k, v in after["sections"].items() if k != "sd21gpu"} == {
        k: v for k, v in before["sections"].items() if k != "sd21gpu"
    }


def test_a_failing_section_is_recorded_with_its_figures_and_the_next_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(ctx: gpu_check.Context, figures: dict[str, Any]) -> None:
        figures["measured"] = 1.5
        gpu_check.check(False, "the figure is wrong")

    def fine(ctx: gpu_check.Context, figures: dict[str, Any]) -> None:
        figures["measured"] = 2.0

    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "versions", broken)
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "save_reload", fine)
    out = tmp_path / "report.json"
    profile = gpu_check.PROFILES["cpu"]
    ctx = gpu_check.Context(profile, tmp_path, gpu_check.Report(out, profile, merge=False))
    for name in ("versions", "save_reload"):
        gpu_check.run_section(ctx, name)
    data = json.loads(out.read_text())
    failed = data["sections"]["versions"]
    assert failed["status"] == "failed" and failed["error"] == "SectionFailed: the figure is wrong"
    assert failed["figures"] == {"measured": 1.5} and "Traceback" in failed["traceback"]
    assert data["sections"]["save_reload"]["status"] == "passed"
    assert data["passed"] == ["save_reload"] and data["failed"] == ["versions"]


def test_unknown_sections_are_named() -> None:
    assert gpu_check.chosen_sections("serve, versions") == ["versions", "serve"]  # the check's order
    with pytest.raises(SystemExit, match="'gpu'"):
        gpu_check.chosen_sections("versions,gpu")
