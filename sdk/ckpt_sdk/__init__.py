"""ckpt_sdk: preemption-safe checkpoints for training loops.

    from ckpt_sdk import Checkpointer, maybe_resume
    step = maybe_resume(state, ckpt)      # newest complete checkpoint, or 0
    ckpt.maybe_save(step, state)          # when due; on SIGTERM: save, then exit 143
"""

from ._checkpointer import (
    PREEMPTED_EXIT_CODE,
    Checkpointer,
    Stateful,
    __version__,
    default_checkpointer,
    maybe_resume,
)
from ._errors import (
    CheckpointConfigError,
    CheckpointError,
    CorruptCheckpointError,
    FencedError,
    IncompatibleCheckpointError,
    UnsupportedStateError,
)
from ._monitoring import MetricsLog
from ._rng import RNGState
from ._store import CheckpointInfo

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CheckpointConfigError",
    "CheckpointError",
    "CheckpointInfo",
    "Checkpointer",
    "CorruptCheckpointError",
    "FencedError",
    "IncompatibleCheckpointError",
    "MetricsLog",
    "RNGState",
    "Stateful",
    "UnsupportedStateError",
    "__version__",
    "default_checkpointer",
    "maybe_resume",
]
