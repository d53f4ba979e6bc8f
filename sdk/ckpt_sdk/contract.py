"""The contract between the in-pod SDK and the operator, written once: both packages import it.

Environment variable names, the checkpoint-request annotation, exit codes and the termination message. Standard
library only: the SDK must import without any third-party package.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from dataclasses import dataclass, fields
from enum import Enum
from typing import Final

# -- environment the operator gives the trainer container ---------------------------------------------------------
ENV_DIR: Final = "CKPT_DIR"  # this job's checkpoint directory on the shared volume
ENV_RESUME_FROM: Final = "CKPT_RESUME_FROM"  # a checkpoint directory to warm-start from
ENV_JOB_NAME: Final = "CKPT_JOB_NAME"
ENV_NAMESPACE: Final = "CKPT_NAMESPACE"
ENV_JOB_UID: Final = "CKPT_JOB_UID"  # the TrainingJob's uid: one incarnation of the name (fencing)
ENV_JOB_CREATED: Final = "CKPT_JOB_CREATED"  # its creationTimestamp: orders incarnations (fencing)
ENV_ATTEMPT: Final = "CKPT_ATTEMPT"  # 0 for the first pod, +1 for every resubmission
ENV_RESTART_REASON: Final = "CKPT_RESTART_REASON"
ENV_GRACE_PERIOD_SECONDS: Final = "CKPT_GRACE_PERIOD_SECONDS"
ENV_KEEP: Final = "CKPT_KEEP"
ENV_INTERVAL_SECONDS: Final = "CKPT_INTERVAL_SECONDS"
ENV_MTBP_SECONDS: Final = "CKPT_MTBP_SECONDS"  # the job's observed mean time between preemptions
ENV_DEADLINE: Final = "CKPT_DEADLINE"  # RFC 3339: the end of a time-limited slot (activeDeadlineSeconds)
ENV_ANNOTATIONS_FILE: Final = "CKPT_ANNOTATIONS_FILE"  # the pod's annotations (downward API)
ENV_TERMINATION_LOG: Final = "CKPT_TERMINATION_LOG"  # where the termination message goes (default: in a pod only)

# multi-node gangs, as Kubeflow's PyTorchJob and torchrun (Kubeflow Trainer) name them
ENV_WORLD_SIZE: Final = "WORLD_SIZE"
ENV_RANK: Final = "RANK"
ENV_MASTER_ADDR: Final = "MASTER_ADDR"
ENV_MASTER_PORT: Final = "MASTER_PORT"
ENV_PET_NNODES: Final = "PET_NNODES"
ENV_PET_NODE_RANK: Final = "PET_NODE_RANK"
ENV_PET_MASTER_ADDR: Final = "PET_MASTER_ADDR"
ENV_PET_MASTER_PORT: Final = "PET_MASTER_PORT"

# -- the pod annotation of an interruption notice, and where the SDK reads it -----------------------------------
ANNOTATION_CHECKPOINT_REQUESTED: Final = "ckpt.dev/checkpoint-requested"  # value: the RFC 3339 deadline
PODINFO_MOUNT: Final = "/etc/ckpt-podinfo"
ANNOTATIONS_FILE: Final = f"{PODINFO_MOUNT}/annotations"

# -- exit codes and the termination message ---------------------------------------------------------------------
EXIT_FINISHED: Final = 0
EXIT_PREEMPTED: Final = 143  # 128 + SIGTERM, after a durable checkpoint: a preemption, never a failure
POD_TERMINATION_LOG: Final = "/dev/termination-log"


class RestartReason(str, Enum):
    """CKPT_RESTART_REASON: why this attempt exists."""

    NONE = "none"
    PREEMPTED = "preempted"
    FAILED = "failed"
    RESUMED = "resumed"  # after a suspend, or `kubectl ckpt resume` of a finished job
    RESIZED = "resized"  # an elastic gang restarted at another size (capacity came back)


class ExitReason(str, Enum):
    """The termination message's `reason`: why the trainer wrote it."""

    EXIT = "exit"  # the process ended on its own (finished, or crashed: see `error`)
    CHECKPOINT = "checkpoint"  # a checkpoint was committed (the message is rewritten after every save)
    PREEMPTED = "preempted"  # SIGTERM: checkpointed, exiting 143
    DEADLINE = "deadline"  # a time-limited slot ends: checkpointed ahead of it, exiting 143
    ERROR = "error"  # an uncaught exception is ending the process


def format_time(when: float) -> str:
    """A Unix time as RFC 3339 in UTC, whole seconds (as Kubernetes writes times)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def parse_time(text: str) -> float | None:
    """An RFC 3339 time as a Unix time; None if it is not one."""
    try:
        return dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _step_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _seconds_or_none(value: object) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


_JSON_KEYS = {"save_seconds": "saveSeconds", "checkpoint_requested": "checkpointRequested", "world_size": "worldSize",
              "total_steps": "totalSteps", "step_seconds": "stepSeconds", "stall_seconds": "stallSeconds",
              "resume_seconds": "resumeSeconds"}


@dataclass(frozen=True)
class TerminationMessage:
    """What the SDK writes to the termination log and the operator reads back from the container's status.

    `step` is the last durable checkpoint (the contract's one required field); `reached` the furthest step trained."""

    step: int | None
    reason: str = ExitReason.EXIT.value
    attempt: int | None = None
    save_seconds: float | None = None  # how long the last save took
    time: str | None = None  # RFC 3339: when checkpoint `step` was written
    reached: int | None = None
    resumed: int | None = None  # the step this process resumed from (0: it started from scratch)
    error: str | None = None  # the uncaught exception that ended the process
    checkpoint_requested: str | None = None  # the deadline of the interruption notice answered last
    warning: str | None = None  # a save was tried with less time left than it needs
    world_size: int | None = None  # how many ranks wrote checkpoint `step`
    # the attempt's pace, for progress, ETA and goodput
    total_steps: int | None = None  # the run's length in steps, if the trainer said
    step_seconds: float | None = None  # mean time of a training step (time inside maybe_save excluded)
    stall_seconds: float | None = None  # time training waited on checkpoint saves (maybe_save, save)
    resume_seconds: float | None = None  # time the resume took (loading the checkpoint)

    def to_json(self) -> str:
        """One JSON object; unset optional fields are left out (`step` is always there, null if none)."""
        data: dict[str, object] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None or field.name == "step":
                data[_JSON_KEYS.get(field.name, field.name)] = value
        return json.dumps(data)

    @classmethod
    def parse(cls, text: str | None) -> TerminationMessage | None:
        """The SDK's message from a container's termination message; None if it is not one (a log tail)."""
        try:
            data = json.loads(text or "")
        except ValueError:
            return None
        if not isinstance(data, dict) or "step" not in data:
            return None
        return cls(step=_step_or_none(data.get("step")), reason=_text_or_none(data.get("reason")) or "",
                   attempt=_step_or_none(data.get("attempt")), save_seconds=_seconds_or_none(data.get("saveSeconds")),
                   time=_text_or_none(data.get("time")), reached=_step_or_none(data.get("reached")),
                   resumed=_step_or_none(data.get("resumed")),
                   error=_text_or_none(data.get("error")),
                   checkpoint_requested=_text_or_none(data.get("checkpointRequested")),
                   warning=_text_or_none(data.get("warning")), world_size=_step_or_none(data.get("worldSize")),
                   total_steps=_step_or_none(data.get("totalSteps")),
                   step_seconds=_seconds_or_none(data.get("stepSeconds")),
                   stall_seconds=_seconds_or_none(data.get("stallSeconds")),
                   resume_seconds=_seconds_or_none(data.get("resumeSeconds")))

    def write(self, path: str) -> None:
        """Replace the file's content without a moment where it is empty (pad, then trim): a reader never sees an
        empty message. Raises OSError."""
        data = self.to_json().encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            old = os.fstat(fd).st_size
            os.pwrite(fd, data + b" " * max(0, old - len(data)), 0)  # JSON readers ignore trailing spaces
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


__all__ = [
    "ANNOTATIONS_FILE", "ANNOTATION_CHECKPOINT_REQUESTED", "ENV_ANNOTATIONS_FILE", "ENV_ATTEMPT", "ENV_DEADLINE",
    "ENV_DIR", "ENV_GRACE_PERIOD_SECONDS", "ENV_INTERVAL_SECONDS", "ENV_JOB_CREATED", "ENV_JOB_NAME", "ENV_JOB_UID",
    "ENV_KEEP", "ENV_MASTER_ADDR", "ENV_MASTER_PORT", "ENV_MTBP_SECONDS", "ENV_NAMESPACE", "ENV_PET_MASTER_ADDR",
    "ENV_PET_MASTER_PORT", "ENV_PET_NNODES", "ENV_PET_NODE_RANK", "ENV_RANK", "ENV_RESTART_REASON",
    "ENV_RESUME_FROM", "ENV_TERMINATION_LOG", "ENV_WORLD_SIZE", "EXIT_FINISHED", "EXIT_PREEMPTED",
    "PODINFO_MOUNT", "POD_TERMINATION_LOG", "ExitReason", "RestartReason", "TerminationMessage", "format_time",
    "parse_time",
]
