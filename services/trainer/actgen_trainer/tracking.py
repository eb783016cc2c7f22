"""Experiment tracking beside metrics.jsonl: TensorBoard, MLflow and W&B behind one small interface.

Rank 0 writes; on every other rank ``Tracking`` is a no-op (it still checks that MLflow and
wandb can be imported, so a missing extra stops every rank at start rather than stranding them
at a barrier). Per epoch each writer gets the same scalars (``EPOCH_METRICS``); at the end MLflow
also gets the run's records (report.html, run.json, metrics.jsonl, ... : every JSON / JSONL /
HTML file at the run folder's top level), the final numbers and a few generated images.

MLflow: ``tracking.mlflow_uri`` names a server (``http://...``) or a store; without it, a file
store under ``run_dir/mlruns`` (open it with ``mlflow ui --backend-store-uri run_dir/mlruns``).
A resumed run continues the same MLflow run, found by its ``actgen.run_id`` tag.

W&B: one run per trainer run, its id the trainer's run id (a resumed run continues it), files
under ``run_dir/wandb``. ``tracking.wandb_mode=offline`` (or ``WANDB_MODE=offline``) needs no
network and no account: ``wandb sync run_dir/wandb/offline-run-*`` uploads it later, ``wandb
leet inspect`` reads it locally. Per epoch the same scalars, stepped by epoch; the config
(API key redacted) at start; the final numbers in the summary, the run's records as files and a
few generated images at the end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from actgen_trainer.config import Config, ConfigError
from actgen_trainer.data import GeneratedRecord, GeneratedSet

log = logging.getLogger("actgen_trainer")

EPOCH_METRICS = ("test_acc", "val_acc", "train_loss", "train_acc", "generated_total", "lr")
MLFLOW_EXTRA = "pip install 'actgen-trainer[mlflow]'"
WANDB_EXTRA = "pip install 'actgen-trainer[wandb]'"
WANDB_DIR = "wandb"  # W&B's run files: wandb.init(dir=run_dir) writes run_dir/wandb
MLFLOW_STORE_DIR = "mlruns"  # the local file store, under the run folder
RUN_ID_TAG = "actgen.run_id"
RECORD_SUFFIXES = (".json", ".jsonl", ".html")  # config.yaml goes up redacted, at start
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
REDACTED_KEYS = ("api_key",)  # never sent to a tracking server
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit


class TrackingUnavailable(ConfigError):
    """Tracking is configured but cannot work (extra missing, server unreachable); names the key."""


class Writer(Protocol):
    """One tracking backend: per-epoch scalars, then the end of the run."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def finish(self, final: dict[str, float], generated: GeneratedSet, complete: bool) -> None: ...


class TensorBoardWriter:
    """Scalars per epoch under ``run_dir/tensorboard`` (needs the [tensorboard] extra)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def finish(self, final: dict[str, float], generated: GeneratedSet, complete: bool) -> None:
        self.writer.close()


def _flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A config as dotted ``section.key`` -> text (strings as they are, the rest as JSON)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat_params(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def _redacted(tree: dict[str, Any]) -> dict[str, Any]:
    """The config tree with every ``REDACTED_KEYS`` value that is set replaced."""
    return {
        k: _redacted(v) if isinstance(v, dict) else ("<redacted>" if k in REDACTED_KEYS and v else v)
        for k, v in tree.items()
    }


def _installed(module: str) -> bool:
    """Whether ``import module`` would find it (mlflow: mlflow-skinny or the full mlflow), without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a None entry in sys.modules: import would fail
        return False


def _sample_records(generated: GeneratedSet, count: int) -> list[GeneratedRecord]:
    """Up to ``count`` generated images, evenly spread over the folding order."""
    records = generated.records
    n = min(count, len(records))
    return [records[(i * len(records)) // n] for i in range(n)]


def _sample_name(generated: GeneratedSet, k: int, record: GeneratedRecord) -> str:
    """``07-epoch3-golden_retriever``: what a sample image is, in its name."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", generated.classes[record.class_id])
    return f"{k:02d}-epoch{record.epoch}-{label}"


def _is_file_store(uri: str) -> bool:
    """``file:`` URIs and plain paths: MLflow's file store."""
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith(("databricks", "sqlite")))


class MlflowWriter:
    """One MLflow run per trainer run: params + config.yaml at start, metrics per epoch, and the
    report, the run folder's records, final numbers and sample images at the end."""

    def __init__(self, cfg: Config, run_id: str, resume: bool) -> None:
        tracking = cfg.tracking
        uri = tracking.mlflow_uri or (cfg.run_dir / MLFLOW_STORE_DIR).resolve().as_uri()
        if _is_file_store(uri):
            # mlflow 3 refuses its file store ("maintenance mode") unless this is set, but it is
            # the one store that works offline with neither a server nor the full mlflow
            # (mlflow-skinny has no SQL store). Process-wide; an explicit "false" is respected.
            os.environ.setdefault(FILE_STORE_ENV, "true")
        from mlflow.tracking import MlflowClient

        self.run_dir = cfg.run_dir
        self.samples = tracking.mlflow_samples
        self.client = MlflowClient(tracking_uri=uri)
        try:
            self.run_id, existing = self._open(cfg, run_id, resume)
            if not existing:
                self._log_config(cfg)
        except Exception as exc:
            key = "tracking.mlflow_uri" if tracking.mlflow_uri else "tracking.mlflow"
            raise TrackingUnavailable(f"{key}: cannot open an MLflow run at {uri} ({exc})") from None
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, tracking.mlflow_experiment, uri)

    def _open(self, cfg: Config, run_id: str, resume: bool) -> tuple[str, bool]:
        """(MLflow run id, whether it already existed): a resumed run reopens its own."""
        name = cfg.tracking.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        if resume:
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1
            )
            if found:
                self.client.update_run(found[0].info.run_id, status="RUNNING")
                return found[0].info.run_id, True
        run = self.client.create_run(
            experiment_id,
            run_name=cfg.run_name,
            tags={
                RUN_ID_TAG: run_id,
                "actgen.mode": cfg.generation.mode.value,
                "actgen.dataset": cfg.data.dataset,
                "actgen.architecture": cfg.model.architecture,
            },
        )
        return run.info.run_id, False

    def _log_config(self, cfg: Config) -> None:
        from mlflow.entities import Param

        tree = _redacted(cfg.model_dump(mode="json"))
        params = [Param(k, v) for k, v in _flat_params(tree).items()]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])
        import yaml

        self.client.log_text(self.run_id, yaml.safe_dump(tree, sort_keys=False), "config.yaml")

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])

    def finish(self, final: dict[str, float], generated: GeneratedSet, complete: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in final.items()])
        for path in sorted(self.run_dir.iterdir()):
            if path.is_file() and path.suffix in RECORD_SUFFIXES:
                self.client.log_artifact(self.run_id, str(path), "run")
        samples = _sample_records(generated, self.samples)
        if samples:
            with tempfile.TemporaryDirectory() as tmp:
                for k, record in enumerate(samples):  # named so the artifact view says what it is
                    name = _sample_name(generated, k, record)
                    shutil.copyfile(generated.root / record.file, Path(tmp) / f"{name}.png")
                self.client.log_artifacts(self.run_id, tmp, "samples")
        # a run stopped early (--stop-after-epoch, resumable) is KILLED until --resume reopens it
        self.client.set_terminated(self.run_id, "FINISHED" if complete else "KILLED")


class WandbWriter:
    """One W&B run per trainer run (its id the trainer's run id): config at start, the scalars
    per epoch, then the final numbers, the run's records and sample images."""

    def __init__(self, cfg: Config, run_id: str, resume: bool) -> None:
        import wandb

        tracking = cfg.tracking
        self.run_dir = cfg.run_dir
        self.samples = tracking.wandb_samples
        self.step = 0
        try:
            self.run = wandb.init(
                project=tracking.wandb_project,
                entity=tracking.wandb_entity,
                mode=tracking.wandb_mode,  # None: WANDB_MODE, else online
                dir=str(cfg.run_dir),  # files under run_dir/WANDB_DIR
                id=re.sub(r"[^A-Za-z0-9_-]", "-", run_id),
                name=cfg.run_name,
                resume="allow",  # --resume: the same run goes on
                config=_redacted(cfg.model_dump(mode="json")),
                settings=wandb.Settings(console="off"),  # the trainer's own output stays its own
            )
        except Exception as exc:
            raise TrackingUnavailable(
                f"tracking.wandb: cannot start a W&B run in project {tracking.wandb_project!r} ({exc}); "
                "log in (wandb login, or WANDB_API_KEY) or run offline (tracking.wandb_mode=offline)"
            ) from None
        log.info(
            "W&B: run %s (%s) in project %r", self.run.id, self.run.settings.mode, tracking.wandb_project
        )

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.step = epoch
        self.run.log(metrics, step=epoch)

    def finish(self, final: dict[str, float], generated: GeneratedSet, complete: bool) -> None:
        import wandb

        self.run.summary.update(final)
        for path in sorted(self.run_dir.iterdir()):
            if path.is_file() and path.suffix in RECORD_SUFFIXES:
                self.run.save(str(path), base_path=str(self.run_dir), policy="now")
        images = [
            wandb.Image(str(generated.root / record.file), caption=_sample_name(generated, k, record))
            for k, record in enumerate(_sample_records(generated, self.samples))
        ]
        if images:
            self.run.log({"samples": images}, step=self.step)
        if not complete:  # stopped early (--stop-after-epoch): resumable, as a preempted run is
            self.run.mark_preempting()
        self.run.finish()


class Tracking:
    """Every writer of a run, driven by the loop: ``start``, ``log_epoch`` per epoch, ``finish``.

    Only ``main`` (rank 0) writes. Writing is auxiliary to training: a writer that fails during
    the run is logged and dropped, but one that cannot start stops the run before it trains.
    """

    def __init__(self, cfg: Config, main: bool, broadcast: Callable[[Any], Any] = lambda obj: obj) -> None:
        if cfg.tracking.mlflow and not _installed("mlflow"):
            raise TrackingUnavailable(f"tracking.mlflow is on but MLflow is not installed: {MLFLOW_EXTRA}")
        if cfg.tracking.wandb and not _installed("wandb"):
            raise TrackingUnavailable(f"tracking.wandb is on but wandb is not installed: {WANDB_EXTRA}")
        self.cfg = cfg
        self.main = main
        self.broadcast = broadcast  # rank 0's object on every rank (the loop's _Dist.broadcast)
        self.writers: list[Writer] = []

    def start(self, run_id: str, resume: bool) -> None:
        """Open the writers on rank 0; ``resume`` continues the MLflow and W&B runs of ``run_id``.

        Collective: when rank 0 cannot open its MLflow or W&B run, every rank raises, none is left
        waiting at the first barrier."""
        error: str | None = None
        if self.main:
            try:
                self._open_writers(run_id, resume)
            except TrackingUnavailable as exc:
                error = str(exc)
        error = self.broadcast(error)
        if error is not None:
            raise TrackingUnavailable(error)

    def _open_writers(self, run_id: str, resume: bool) -> None:
        tracking = self.cfg.tracking
        if tracking.tensorboard:
            try:
                self.writers.append(TensorBoardWriter(self.cfg.run_dir / "tensorboard"))
            except ImportError:  # optional extra
                log.info("no TensorBoard logs: pip install 'actgen-trainer[tensorboard]' for them")
        if tracking.mlflow:
            self.writers.append(MlflowWriter(self.cfg, run_id, resume))
        if tracking.wandb:
            self.writers.append(WandbWriter(self.cfg, run_id, resume))

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """The epoch's ``EPOCH_METRICS`` (those with a value) to every writer."""
        metrics = {k: float(row[k]) for k in EPOCH_METRICS if row.get(k) is not None}
        self._each("log_epoch", epoch, metrics)

    def finish(self, final: dict[str, float], generated: GeneratedSet, complete: bool) -> None:
        """The run's end: final numbers, records and sample images; writers closed."""
        self._each("finish", {k: float(v) for k, v in final.items()}, generated, complete)
        self.writers = []

    def _each(self, method: str, *args: Any) -> None:
        for writer in list(self.writers):
            try:
                getattr(writer, method)(*args)
            except Exception as exc:
                log.warning(
                    "%s.%s failed (%s); the run goes on without it", type(writer).__name__, method, exc
                )
                self.writers.remove(writer)
