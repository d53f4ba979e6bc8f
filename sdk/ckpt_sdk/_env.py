"""Reads the CKPT_* environment the operator gives the trainer container."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

from ._errors import CheckpointConfigError

DEFAULT_DIR = "./checkpoints"
DEFAULT_GRACE_SECONDS = 30.0
DEFAULT_MTBP_SECONDS = 4 * 3600.0  # mean time between preemptions assumed for spot capacity
POD_TERMINATION_LOG = "/dev/termination-log"


def _number(name: str, cast: type[float] | type[int], minimum: float) -> float | int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = cast(raw)
    except ValueError:
        raise CheckpointConfigError(f"{name}={raw!r} is not a valid {cast.__name__}") from None
    if value < minimum:
        raise CheckpointConfigError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _timestamp(name: str) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0.0
    try:
        return dt.datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise CheckpointConfigError(f"{name}={raw!r} is not an RFC 3339 time") from None


def in_kubernetes_pod() -> bool:
    """The kubelet sets KUBERNETES_SERVICE_HOST in every container; nothing else does."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


@dataclass(frozen=True)
class Environment:
    """The CKPT_* variables, parsed and validated."""

    directory: str | None
    resume_from: str | None
    job_name: str | None
    namespace: str | None
    job_uid: str
    job_created: float
    attempt: int
    restart_reason: str
    grace_period_seconds: float
    keep: int | None
    interval_seconds: float | None
    mtbp_seconds: float
    termination_log: str | None  # None outside a pod unless CKPT_TERMINATION_LOG names a file
    deadline: float | None  # CKPT_DEADLINE as a Unix time: the end of a time-limited slot
    annotations_file: str | None  # CKPT_ANNOTATIONS_FILE: the pod's annotations (downward API): checkpoint requests

    @classmethod
    def read(cls) -> Environment:
        """Parse the current process environment."""
        env = os.environ
        grace = _number("CKPT_GRACE_PERIOD_SECONDS", float, 0)
        mtbp = _number("CKPT_MTBP_SECONDS", float, 1)
        return cls(
            directory=env.get("CKPT_DIR") or None,
            resume_from=env.get("CKPT_RESUME_FROM") or None,
            job_name=env.get("CKPT_JOB_NAME") or None,
            namespace=env.get("CKPT_NAMESPACE") or None,
            job_uid=env.get("CKPT_JOB_UID", ""),
            job_created=_timestamp("CKPT_JOB_CREATED"),
            attempt=int(_number("CKPT_ATTEMPT", int, 0) or 0),
            restart_reason=env.get("CKPT_RESTART_REASON") or "none",
            grace_period_seconds=DEFAULT_GRACE_SECONDS if grace is None else float(grace),
            keep=_int_or_none(_number("CKPT_KEEP", int, 1)),
            interval_seconds=_float_or_none(_number("CKPT_INTERVAL_SECONDS", float, 0.001)),
            mtbp_seconds=DEFAULT_MTBP_SECONDS if mtbp is None else float(mtbp),
            termination_log=env.get("CKPT_TERMINATION_LOG") or (POD_TERMINATION_LOG if in_kubernetes_pod() else None),
            deadline=_timestamp("CKPT_DEADLINE") or None,
            annotations_file=env.get("CKPT_ANNOTATIONS_FILE") or None,
        )


def _int_or_none(value: float | int | None) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: float | int | None) -> float | None:
    return None if value is None else float(value)
