"""Who else is saving: the ranks of a multi-node job (torch.distributed's group, else WORLD_SIZE and RANK), and the
few torch.distributed collectives the coordinators use (see _coordinate)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from . import contract as C
from ._errors import CheckpointConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's rank among `world_size` ranks; `torch` when torch.distributed carries the agreement."""

    rank: int = 0
    world_size: int = 1
    torch: bool = False

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def coordinator(self) -> bool:
        """Rank 0 commits sharded checkpoints, prunes, and writes the termination message."""
        return self.rank == 0

    @classmethod
    def detect(cls) -> Ranks:
        """torch.distributed's group when it is initialized (torch is never imported for this), else the
        WORLD_SIZE/RANK environment, else a single rank."""
        dist = torch_distributed()
        if dist is not None:
            return cls(int(dist.get_rank()), int(dist.get_world_size()), True)
        raw_size, raw_rank = os.environ.get(C.ENV_WORLD_SIZE, "").strip(), os.environ.get(C.ENV_RANK, "").strip()
        if not raw_size:
            return cls()
        try:
            size, rank = int(raw_size), int(raw_rank or "0")
        except ValueError:
            raise CheckpointConfigError(f"WORLD_SIZE={raw_size!r} RANK={raw_rank!r} are not integers") from None
        if size < 1 or not 0 <= rank < size:
            raise CheckpointConfigError(f"RANK={rank} is not within WORLD_SIZE={size}")
        return cls(rank, size)

    # -- torch.distributed -------------------------------------------------------------------------
    def reduce_max(self, values: list[int]) -> list[int]:
        """Element-wise maximum over every rank (a collective: every rank must call it at the same point)."""
        if not (self.torch and self.sharded):
            return list(values)
        import torch

        dist = torch_distributed()
        assert dist is not None
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [int(v) for v in tensor.tolist()]

    def all_true(self, ok: bool) -> bool:
        """True on every rank only if `ok` was True on every rank (a barrier that carries a verdict)."""
        return self.reduce_max([0 if ok else 1])[0] == 0

    def from_coordinator(self, ok: bool) -> bool:
        """Rank 0's `ok`, on every rank (collective)."""
        return self.reduce_max([1 if ok and self.coordinator else 0])[0] == 1


def torch_distributed() -> Any:
    """torch.distributed if this process imported torch and initialized a process group, else None."""
    if "torch" not in sys.modules:
        return None
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None
