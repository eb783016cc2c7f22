"""The trainer's own checkpoint, written after every epoch, atomically (tmp file + rename).

It holds everything needed to continue bit-for-bit: model, optimizer, scheduler, AMP scaler,
RNG states (python, numpy, torch, CUDA), the generated set's index, the results cursor and the
jobs still pending. It is our own file, written by torch.save and read back with
``weights_only=True``: only tensors and plain containers, so loading runs no pickled code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
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
