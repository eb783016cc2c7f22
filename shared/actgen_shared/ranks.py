"""This process's place among the ranks of a DDP job, as the client API needs it.

:class:`~actgen_shared.run.ActGenRun` calls these collectives (every rank, same order): rank 0
uploads the classifier and decides how far the results stream is read, and every rank learns
every rank's jobs. One process (no torch.distributed) is the plain path: each is then a no-op.
torch is imported only when it is already loaded: no process group can exist without it.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol


def share(total: int, parts: int, part: int) -> int:
    """Part ``part`` of ``total`` split into ``parts`` near-equal shares, the remainder to the low
    parts: how a run's image count is split over its ranks (and a budget over its epochs)."""
    return total // parts + (1 if part < total % parts else 0)


class Ranks(Protocol):
    """What the client API needs of a DDP job (``actgen_trainer.distributed.Dist`` is one)."""

    rank: int
    world: int

    @property
    def main(self) -> bool: ...

    def broadcast(self, obj: Any) -> Any: ...

    def gather(self, obj: Any) -> list[Any]: ...


class OneProcess:
    """No DDP: rank 0 of 1."""

    rank = 0
    world = 1

    @property
    def main(self) -> bool:
        return True

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


class TorchRanks:
    """The default process group of torch.distributed (gloo or NCCL: objects go through pickle of
    our own plain containers, never bytes from the network)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out


def current_ranks() -> Ranks:
    """The DDP job this process is part of (torch.distributed initialised), else one process."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return TorchRanks()
    return OneProcess()
