"""MLflow and W&B beside TensorBoard: tiny runs with ``tracking.mlflow`` / ``tracking.wandb`` on,
read back offline with each tool's own reader (MLflow's client on the file store, ``wandb leet
inspect`` on the offline run's transaction log) from what the trainer made under its run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from trainer_helpers import REPO, client_fixture, generator_fixture, small_config  # noqa: F401 (fixtures)

from actgen_shared.client import GeneratorClient
from actgen_trainer import cli
from actgen_trainer.config import ConfigError, load_config
from actgen_trainer.loop import Trainer
from actgen_trainer.tracking import (
    EPOCH_METRICS,
    FILE_STORE_ENV,
    MLFLOW_STORE_DIR,
    RUN_ID_TAG,
    WANDB_DIR,
    TrackingUnavailable,
)


def _store(run_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=(run_dir / MLFLOW_STORE_DIR).resolve().as_uri())


def _only_run(store: MlflowClient, actgen_run_id: str) -> Run:
    experiment = store.get_experiment_by_name("actgen")
    assert experiment is not None
    runs = store.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[RUN_ID_TAG] == actgen_run_id
    return runs[0]


def _history(store: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.get_metric_history(run_id, key))


def test_mlflow_gets_epoch_metrics_config_report_and_sample_images(
    tmp_path: Path,
    client: GeneratorClient,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(FILE_STORE_ENV, raising=False)  # the trainer must open its store itself
    cfg = small_config(
        tmp_path,
        "generation.sync=true",
        "train.epochs=2",
        "tracking.mlflow=true",
        "tracking.mlflow_samples=8",
        "generation.api_key=sekrit",
    )
    trainer = Trainer(cfg, client=client, progress=False)
    summary = trainer.run()
    assert summary.images_generated == 2  # one job of 2 after epoch 0, folded at epoch 1

    store = _store(cfg.run_dir)
    run = _only_run(store, trainer.state.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    rid = run.info.run_id

    # per epoch: the same scalars as metrics.jsonl (and TensorBoard), stepped by epoch
    rows = trainer.state.metrics
    for key in ("test_acc", "train_loss", "train_acc", "generated_total", "lr"):
        assert _history(store, rid, key) == [(r["epoch"], pytest.approx(r[key])) for r in rows], key
    assert _history(store, rid, "val_acc") == [(0, pytest.approx(rows[0]["val_acc"]))]  # 1st half
    assert set(run.data.metrics) >= set(EPOCH_METRICS)
    assert run.data.metrics["images_generated"] == 2
    assert run.data.metrics["delivery_asked"] == 2
    assert run.data.metrics["final_test_acc"] == pytest.approx(summary.test_acc)

    # the config: every leaf as a dotted param, and the YAML; the API key never leaves
    params = run.data.params
    assert params["train.epochs"] == "2" and params["generation.sync"] == "true"
    assert params["model.architecture"] == "simple_cnn" and params["tracking.mlflow"] == "true"
    assert params["generation.options.num_inference_steps"] == "2"
    assert params["generation.api_key"] == "<redacted>"
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    config_yaml = (artifacts / "config.yaml").read_text()
    assert "num_inference_steps: 2" in config_yaml and "sekrit" not in config_yaml

    # the run's records and report, and the generated images
    logged = {a.path for a in store.list_artifacts(rid, "run")}
    assert {
        "run/report.html",
        "run/run.json",
        "run/metrics.jsonl",
        "run/jobs.jsonl",
    } <= logged
    everything = [path for path in artifacts.rglob("*") if path.is_file()]
    assert not [path for path in everything if b"sekrit" in path.read_bytes()]
    assert (artifacts / "run" / "report.html").read_text() == summary.report.read_text()
    info = json.loads((artifacts / "run" / "run.json").read_text())
    assert info["run_id"] == trainer.state.run_id
    samples = sorted(a.path for a in store.list_artifacts(rid, "samples"))
    records = trainer.generated.records
    assert len(samples) == len(records) == 2
    for path, record in zip(samples, records, strict=True):
        assert path.endswith(f"-epoch{record.epoch}-{trainer.classes[record.class_id]}.png")
        assert (artifacts / path).read_bytes() == (trainer.generated.root / record.file).read_bytes()


def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "generation.mode=real", "train.epochs=3", "tracking.mlflow=true")
    first = Trainer(cfg, client=None, progress=False, stop_after_epoch=0)
    first.run()
    store = _store(cfg.run_dir)
    assert _only_run(store, first.state.run_id).info.status == "KILLED"  # stopped, resumable

    second = Trainer(cfg, client=None, progress=False, resume=True)
    second.run()
    run = _only_run(store, first.state.run_id)  # the same MLflow run, not a second one
    assert run.info.status == "FINISHED"
    assert [step for step, _ in _history(store, run.info.run_id, "test_acc")] == [0, 1, 2]
    assert run.data.metrics["images_generated"] == 0


def test_an_unreachable_mlflow_server_stops_the_run_at_start_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no minutes of backoff here
    cfg = small_config(
        tmp_path, "generation.mode=real", "tracking.mlflow=true", "tracking.mlflow_uri=http://127.0.0.1:9"
    )  # the discard port: nothing listens
    with pytest.raises(TrackingUnavailable, match=r"tracking.mlflow_uri: .*127\.0\.0\.1:9"):
        Trainer(cfg, client=None, progress=False)
    assert not (cfg.run_dir / "metrics.jsonl").exists()  # no epoch ran


@pytest.mark.parametrize("extra", ["mlflow", "wandb"])
def test_a_missing_tracking_extra_is_a_cli_error_naming_it(
    extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, extra, None)  # what `import mlflow` meets without the extra
    code = cli.main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--no-progress",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "generation.mode=real",
            "--set",
            f"tracking.{extra}=true",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"tracking.{extra}" in err and f"actgen-trainer[{extra}]" in err
    assert not (tmp_path / "demo").exists()  # refused before any work


def _wandb_inspect(run_dir: Path, *flags: str) -> str:
    """``wandb leet inspect --json``: wandb's own reader of an offline run's .wandb log."""
    [offline] = (run_dir / WANDB_DIR).glob("offline-run-*")
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(offline)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wandb_offline_gets_epoch_metrics_config_final_numbers_and_samples(
    tmp_path: Path,
    client: GeneratorClient,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No network, no account: WANDB_MODE=offline, read back from the run files alone."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = small_config(
        tmp_path,
        "generation.sync=true",
        "train.epochs=2",
        "tracking.wandb=true",
        "tracking.wandb_project=own",
        "generation.api_key=sekrit",
    )
    trainer = Trainer(cfg, client=client, progress=False)
    summary = trainer.run()
    assert summary.images_generated == 2

    records = [json.loads(line) for line in _wandb_inspect(cfg.run_dir).splitlines()]
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_id"] == trainer.state.run_id and run["project"] == "own" and run["display_name"] == "t"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    rows = trainer.state.metrics
    for key in ("test_acc", "train_loss", "train_acc", "generated_total", "lr"):
        logged = [(h["_step"], h[key]) for h in history if key in h]
        assert logged == [(r["epoch"], pytest.approx(r[key])) for r in rows], key
    [shown] = [h for h in history if "samples.count" in h]  # the two generated images, named
    assert shown["samples.captions"] == [
        f"{k:02d}-epoch{r.epoch}-{trainer.classes[r.class_id]}"
        for k, r in enumerate(trainer.generated.records)
    ]

    info = json.loads(_wandb_inspect(cfg.run_dir, "--summary"))
    assert info["state"] == "finished"
    assert info["summary"]["final_test_acc"] == pytest.approx(summary.test_acc)
    assert info["summary"]["images_generated"] == 2
    assert info["config"]["train"]["epochs"] == 2 and info["config"]["tracking"]["wandb"] is True
    assert info["config"]["generation"]["api_key"] == "<redacted>"
    written = [p for p in (cfg.run_dir / WANDB_DIR).rglob("*") if p.is_file()]
    assert not [p for p in written if b"sekrit" in p.read_bytes()]  # the API key never leaves
    assert [p for p in written if p.name == "report.html"]  # the run's records, as run files


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("tracking.mlflow_uri=http://127.0.0.1:5000", "tracking.mlflow_uri"),  # mlflow is off
        ("tracking.mlflow_samples=-1", "tracking.mlflow_samples"),
        ("tracking.mlflow_experiment=", "tracking.mlflow_experiment"),
        ("tracking.wandb_mode=offline", "tracking.wandb_mode is set but tracking.wandb is off"),
        ("tracking.wandb_mode=sideways", "tracking.wandb_mode"),
        ("tracking.wandb_project=", "tracking.wandb_project"),
    ],
)
def test_bad_tracking_config_names_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(REPO / "configs" / "demo.yaml", [override])


@pytest.mark.slow
def test_under_ddp_rank_zero_logs_one_run_and_a_bad_server_stops_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun, 2 gloo ranks: one MLflow run with the all-reduced metrics; and an MLflow server
    that cannot be reached ends both ranks at start (none left waiting at a barrier)."""
    from test_ddp import _env, _torchrun

    cfg = small_config(tmp_path, "generation.mode=real", "train.epochs=1", "tracking.mlflow=true")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    unused = "http://127.0.0.1:9"  # real mode: no generator

    bad = subprocess.run(
        _torchrun(config_file, unused, "--set", f"tracking.mlflow_uri={unused}"),
        capture_output=True,
        text=True,
        timeout=180,
        env={**_env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    assert bad.returncode != 0
    assert "tracking.mlflow_uri: cannot open an MLflow run" in bad.stderr
    assert not (cfg.run_dir / "metrics.jsonl").exists()

    done = subprocess.run(
        _torchrun(config_file, unused), capture_output=True, text=True, timeout=180, env=_env()
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    monkeypatch.setenv(FILE_STORE_ENV, "true")  # this process reads the store the ranks wrote
    store = _store(cfg.run_dir)
    run = _only_run(store, json.loads((cfg.run_dir / "run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert _history(store, run.info.run_id, "train_loss") == [
        (r["epoch"], pytest.approx(r["train_loss"])) for r in rows
    ]
