"""TensorBoard curves that survive preemption (needs torch and tensorboard):

    from ckpt_sdk.integrations.tensorboard import SummaryWriter
    step = maybe_resume(state, ckpt)
    writer = SummaryWriter(resumed_step=step)   # on rank 0; log_dir defaults to $CKPT_DIR/tensorboard

Opening it drops, from the event files already in `log_dir`, every event a killed attempt logged past the resumed
step (the files are rewritten atomically, so any reader sees each step once and in order), and passes TensorBoard's
own `purge_step` so its reader drops anything logged past the step later still.
"""

from __future__ import annotations

import os
from typing import Any

from torch.utils.tensorboard import SummaryWriter as _TorchSummaryWriter

from .._monitoring import truncate_event_files

__all__ = ["SummaryWriter", "default_log_dir", "truncate_event_files"]

LOG_SUBDIR = "tensorboard"


def default_log_dir() -> str:
    """`$CKPT_DIR/tensorboard`: on the job's shared volume, next to the checkpoints (./checkpoints/tensorboard
    outside a TrainingJob)."""
    return os.path.join(os.environ.get("CKPT_DIR") or "checkpoints", LOG_SUBDIR)


class SummaryWriter(_TorchSummaryWriter):
    """`torch.utils.tensorboard.SummaryWriter` that continues a resumed run's curves: events past `resumed_step`
    are dropped before it writes (see the module's docstring)."""

    def __init__(self, log_dir: str | None = None, *, resumed_step: int, **kwargs: Any) -> None:
        if resumed_step < 0:
            raise ValueError(f"resumed_step must be >= 0, got {resumed_step}")
        directory = log_dir if log_dir is not None else default_log_dir()
        os.makedirs(directory, exist_ok=True)
        self.dropped_events = truncate_event_files(directory, resumed_step)
        kwargs.setdefault("purge_step", resumed_step + 1)
        super().__init__(directory, **kwargs)
