"""Reads the CKPT_* environment the operator gives the trainer container."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._errors import CheckpointConfigError

DEFAULT_DIR = "./checkpoints"
DEFAULT_GRACE_SECONDS = 30.0
DEFAULT_MTBP_SECONDS = 4 * 3600.0  # mean time between preemptions assumed for spot capacity


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


@dataclass(frozen=True)
class Environment:
    """The CKPT_* variables, parsed and validated."""

    directory: str | None
    resume_from: str | None
    job_name: str | None
    namespace: str | None
    attempt: int
    restart_reason: str
    grace_period_seconds: float
    keep: int | None
    interval_seconds: float | None
    mtbp_seconds: float
    termination_log: str

    @classmethod
    def read(cls) -> Environment:
        """Parse the current process environment."""
        env = os.environ
        return cls(
            directory=env.get("CKPT_DIR") or None,
            resume_from=env.get("CKPT_RESUME_FROM") or None,
            job_name=env.get("CKPT_JOB_NAME") or None,
            namespace=env.get("CKPT_NAMESPACE") or None,
            attempt=int(_number("CKPT_ATTEMPT", int, 0) or 0),
            restart_reason=env.get("CKPT_RESTART_REASON") or "none",
            grace_period_seconds=float(_number("CKPT_GRACE_PERIOD_SECONDS", float, 0) or DEFAULT_GRACE_SECONDS),
            keep=_int_or_none(_number("CKPT_KEEP", int, 1)),
            interval_seconds=_float_or_none(_number("CKPT_INTERVAL_SECONDS", float, 0.001)),
            mtbp_seconds=float(_number("CKPT_MTBP_SECONDS", float, 1) or DEFAULT_MTBP_SECONDS),
            termination_log=env.get("CKPT_TERMINATION_LOG") or "/dev/termination-log",
        )


def _int_or_none(value: float | int | None) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: float | int | None) -> float | None:
    return None if value is None else float(value)
