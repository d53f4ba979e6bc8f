"""Who else is saving: the ranks of a multi-node job, and how they agree (torch.distributed, or files).

With `torch.distributed` initialized, agreement uses its collectives on the main thread; otherwise `WORLD_SIZE` and
`RANK` say how many ranks there are and they meet through marker files in the shared checkpoint directory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import CheckpointConfigError, CheckpointError

log = logging.getLogger("ckpt_sdk")

POLL_FIRST_SECONDS = 0.005
POLL_MAX_SECONDS = 0.02  # a stat of a marker file: cheap, and every poll interval is added to a sharded save


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
        dist = _torch_distributed()
        if dist is not None:
            return cls(int(dist.get_rank()), int(dist.get_world_size()), True)
        raw_size, raw_rank = os.environ.get("WORLD_SIZE", "").strip(), os.environ.get("RANK", "").strip()
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

        dist = _torch_distributed()
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


    def leave(self) -> None:
        """Before this process exits on purpose (preempted, slot over): every rank meets once more, then the process
        group is torn down, so no rank exits while a peer still uses the connections, and no rank exits with a live
        group (torch's exit-time teardown then aborts: "terminate called without an active exception", exit -6)."""
        dist = _torch_distributed()
        if dist is None:
            return
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as exc:  # a peer already gone: exiting is all that is left to do
            log.debug("ckpt: leaving the process group: %s", exc)


def _torch_distributed() -> Any:
    """torch.distributed if this process imported torch and initialized a process group, else None."""
    if "torch" not in sys.modules:
        return None
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` (a file another rank writes) until it holds; CheckpointError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = POLL_FIRST_SECONDS
    while not condition():
        if time.monotonic() >= deadline:
            raise CheckpointError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(pause)
        pause = min(POLL_MAX_SECONDS, pause * 2)
