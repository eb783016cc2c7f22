"""The trainer's run folder and its checkpoint, written after every epoch, atomically (tmp
file + rename); ``Checkpoints`` is the Trainer's part that starts, saves and resumes a run.

The checkpoint holds everything needed to continue bit-for-bit: model, optimizer, scheduler, AMP scaler,
RNG states (python, numpy, torch, CUDA), the generated set's index, the results cursor and the
jobs still pending. It is our own file, written by torch.save and read back with
``weights_only=True``: only tensors and plain containers, so loading runs no pickled code.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actgen_shared.run import RunLedger
from actgen_trainer.config import Config
from actgen_trainer.data import DataError, GeneratedSet
from actgen_trainer.distributed import Dist, unwrap

if TYPE_CHECKING:
    from actgen_trainer.models import LRSchedule

log = logging.getLogger("actgen_trainer")

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
JOBS_NAME = "jobs.jsonl"
RUN_INFO_NAME = "run.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not belong to this run; the message says which."""


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as plain containers and tensors."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus RNG states) to run_dir/checkpoint.pt; a crash leaves the old one."""
    path = Path(run_dir) / CHECKPOINT_NAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT_VERSION, "rng": rng_state(), **payload}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path, run_name: str) -> dict[str, Any]:
    """Read the run's checkpoint; refuses one written by another run or format."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {state.get('format')}, expected {FORMAT_VERSION}")
    if state.get("run_name") != run_name:
        raise CheckpointError(f"{path} belongs to run {state.get('run_name')!r}, not {run_name!r}")
    return state


@dataclass
class State(RunLedger):
    """Everything besides the torch objects that a checkpoint carries (identical on all ranks):
    the client API's ledger (run id, results cursor, pending and posted jobs, classifiers) and
    the loop's own."""

    epoch: int = 0  # next epoch to run
    metrics: list[dict[str, Any]] = field(default_factory=list)
    val_merged: bool = False


class Checkpoints:
    """The Trainer's run folder and checkpoint: a fresh folder, resume, and the per-epoch save.

    A mixin of :class:`~actgen_trainer.loop.Trainer`, whose attributes it reads.
    """

    cfg: Config
    dist: Dist
    run_dir: Path
    generated: GeneratedSet
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    scaler: torch.amp.GradScaler
    state: State

    # the generator link's (actgen_trainer.link): rebuild the generated set from the stream
    _refetch: Callable[[list[dict[str, Any]], State], None]

    def _fresh_run_folder(self) -> None:
        taken = self.dist.broadcast((self.run_dir / CHECKPOINT_NAME).exists())
        if taken:
            raise FileExistsError(
                f"{self.run_dir} already holds a run: pass --resume to continue it, or choose "
                "another run_name / output_dir"
            )
        (self.generated.root / GeneratedSet.INDEX).unlink(missing_ok=True)
        if self.dist.main:
            for name in (METRICS_NAME, JOBS_NAME):
                (self.run_dir / name).unlink(missing_ok=True)

    def _restore(self) -> State:
        """Rank 0 reads the checkpoint and hands it to the others (no shared filesystem)."""
        ckpt: Any = None
        error: str | None = None
        if self.dist.main:
            try:
                ckpt = load_checkpoint(self.run_dir, self.cfg.run_name)
            except CheckpointError as exc:
                error = str(exc)
        error = self.dist.broadcast(error)
        if error is not None:
            raise CheckpointError(error)
        ckpt = self.dist.broadcast(ckpt)
        module = unwrap(self.model)
        module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        ranks = ckpt.get("rng_ranks")
        if ranks is not None and len(ranks) == self.dist.world:
            set_rng_state(ranks[self.dist.rank])
        elif self.dist.main:
            set_rng_state(ckpt["rng"])
        else:  # resumed with another world size: fresh streams for the new ranks
            log.warning("checkpoint has no RNG state for rank %d; seeding it anew", self.dist.rank)
        state = State(
            run_id=ckpt["run_id"],
            epoch=ckpt["epoch"],
            cursor=ckpt["cursor"],
            pending=ckpt["pending"],
            jobs=ckpt["jobs"],
            metrics=ckpt["metrics"],
            val_merged=ckpt["val_merged"],
            classifiers=list(ckpt.get("classifiers", [])),
        )
        try:
            self.generated.restore(ckpt["generated"])
        except DataError:
            if self.dist.main:
                raise
            self._refetch(ckpt["generated"], state)  # another machine: rebuild from the stream
        if self.dist.main:
            _write_jsonl(self.run_dir / METRICS_NAME, state.metrics)
        log.info("resumed %s at epoch %d (cursor %s)", state.run_id, state.epoch, state.cursor)
        return state

    def _checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; every rank's RNG state goes in it."""
        rng_ranks = self.dist.gather(rng_state()) if self.dist.world > 1 else None
        if not self.dist.main:
            return
        module = unwrap(self.model)
        s = self.state
        payload = {
            "run_name": self.cfg.run_name,
            "run_id": s.run_id,
            "epoch": s.epoch,
            "model": module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generated": self.generated.state(),
            "cursor": s.cursor,
            "pending": s.pending,
            "jobs": s.jobs,
            "metrics": s.metrics,
            "val_merged": s.val_merged,
            "classifiers": s.classifiers,
        }
        if rng_ranks is not None:
            payload["rng_ranks"] = rng_ranks
        save_checkpoint(self.run_dir, payload)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
