"""Reads the CKPT_* environment the operator gives the trainer container (names in `contract`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from . import contract as C
from ._errors import CheckpointConfigError

_Number = TypeVar("_Number", int, float)
DEFAULT_DIR = "./checkpoints"
DEFAULT_GRACE_SECONDS = 30.0
DEFAULT_MTBP_SECONDS = 4 * 3600.0  # mean time between preemptions assumed for spot capacity


def in_kubernetes_pod(environ: Mapping[str, str]) -> bool:
    """The kubelet sets KUBERNETES_SERVICE_HOST in every container; nothing else does."""
    return bool(environ.get("KUBERNETES_SERVICE_HOST"))


class _Reader:
    """Typed reads of one environment mapping; a bad value is a CheckpointConfigError naming the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def text(self, name: str) -> str | None:
        return self.environ.get(name, "").strip() or None

    def number(self, name: str, minimum: float) -> float | None:
        return self._parsed(name, float, minimum)

    def integer(self, name: str, minimum: int) -> int | None:
        return self._parsed(name, int, minimum)

    def _parsed(self, name: str, cast: Callable[[str], _Number], minimum: float) -> _Number | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            value = cast(raw)
        except ValueError:
            raise CheckpointConfigError(f"{name}={raw!r} is not a valid {getattr(cast, '__name__', 'number')}") \
                from None
        if value < minimum:
            raise CheckpointConfigError(f"{name}={raw!r} must be >= {minimum}")
        return value

    def time(self, name: str) -> float | None:
        raw = self.text(name)
        if raw is None:
            return None
        when = C.parse_time(raw)
        if when is None:
            raise CheckpointConfigError(f"{name}={raw!r} is not an RFC 3339 time")
        return when


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
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """Parse `environ` (default: this process's environment)."""
        env = _Reader(os.environ if environ is None else environ)
        grace = env.number(C.ENV_GRACE_PERIOD_SECONDS, 0)
        mtbp = env.number(C.ENV_MTBP_SECONDS, 1)
        in_pod = in_kubernetes_pod(env.environ)
        return cls(
            directory=env.text(C.ENV_DIR),
            resume_from=env.text(C.ENV_RESUME_FROM),
            job_name=env.text(C.ENV_JOB_NAME),
            namespace=env.text(C.ENV_NAMESPACE),
            job_uid=env.text(C.ENV_JOB_UID) or "",
            job_created=env.time(C.ENV_JOB_CREATED) or 0.0,
            attempt=env.integer(C.ENV_ATTEMPT, 0) or 0,
            restart_reason=env.text(C.ENV_RESTART_REASON) or C.RestartReason.NONE.value,
            grace_period_seconds=DEFAULT_GRACE_SECONDS if grace is None else grace,
            keep=env.integer(C.ENV_KEEP, 1),
            interval_seconds=env.number(C.ENV_INTERVAL_SECONDS, 0.001),
            mtbp_seconds=DEFAULT_MTBP_SECONDS if mtbp is None else mtbp,
            termination_log=env.text(C.ENV_TERMINATION_LOG) or (C.POD_TERMINATION_LOG if in_pod else None),
            deadline=env.time(C.ENV_DEADLINE),
            annotations_file=env.text(C.ENV_ANNOTATIONS_FILE),
        )
