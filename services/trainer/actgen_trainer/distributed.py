"""This process's place in a torchrun job (DDP): its device, its rank, and the collectives.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; one process (no torchrun) is the plain path and
every collective here is then a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from actgen_shared.seeds import derive_seed

log = logging.getLogger("actgen_trainer")


@dataclass
class Dist:
    """This process's place in a torchrun job; every method is a no-op for one process.

    Every collective here must be called by all ranks in the same order.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over the ranks (metrics of sharded evaluation and training)."""
        if self.world == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return [float(v) for v in tensor.cpu()]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DDP's wrapper (the model itself for one process)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def local_rank() -> int | None:
    """This process's GPU slot under torchrun (LOCAL_RANK with WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for(name: str, rank: int | None) -> torch.device:
    """The device for ``train.device`` on the rank whose GPU slot is ``rank`` (None: one process).

    ``auto``: a GPU when there is one, else the CPU. A CUDA device under torchrun is always the
    rank's own GPU, even when the name carries an index (``cuda:0`` would put every rank on the
    same GPU, and NCCL refuses that); one process keeps the index it was given.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if rank is not None:
        if device.index is not None and device.index != rank:
            log.warning(
                "train.device=%s under torchrun: rank with LOCAL_RANK=%d uses cuda:%d", name, rank, rank
            )
        return torch.device("cuda", rank)
    return device if device.index is not None else torch.device("cuda", 0)


def setup_dist(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process is the plain path.

    On CUDA the process binds to its own GPU before the process group starts (NCCL's object
    collectives run on the current device, cuda:0 for every rank otherwise); gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(), device=device)


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run seed (a one-process run is rank 0); others get a hash of it."""
    return seed if rank == 0 else derive_seed(seed, rank) % 2**31


__all__ = ["Dist", "device_for", "local_rank", "rank_seed", "setup_dist", "unwrap"]
