"""Which process this is among a torchrun job, and the few collective operations the method needs.

One process is `World()`: every operation is the identity."""
from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list) -> list:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        n = len(rows)
        return rows[self.rank * n // self.size:(self.rank + 1) * n // self.size]

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def no_sync(self, model):
        """DDP's no_sync when `model` is DDP-wrapped: gradients accumulate locally until the next synced backward."""
        return model.no_sync() if hasattr(model, "no_sync") else nullcontext()
