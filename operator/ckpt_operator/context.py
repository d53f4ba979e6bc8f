"""The operator's shared state, typed: kopf hands it to every handler as `memo`. kopf gives each object's handlers a
shallow copy of the memo; `__copy__` returns the same object, so every handler shares one cache, one worker per job
and one orphan sweep (a copy per object would make thousands of sweeps at 5,000 jobs)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import reasons as R
from .apiclient import Api
from .cache import Cache
from .classify import NodeInfo
from .planning import Settings

if TYPE_CHECKING:
    from .events import EventRecorder
    from .jobwatch import JobInformer
    from .podwatch import PodInformer
    from .worker import JobWorker, Releaser


def settings_from_env() -> Settings:
    return Settings(
        backoff_base_seconds=float(os.environ.get("CKPT_OPERATOR_BACKOFF_BASE_SECONDS", "10")),
        backoff_cap_seconds=float(os.environ.get("CKPT_OPERATOR_BACKOFF_CAP_SECONDS", "300")),
        node_lost_seconds=float(os.environ.get("CKPT_OPERATOR_NODE_LOST_SECONDS", "300")),
        gang_start_timeout_seconds=float(os.environ.get("CKPT_OPERATOR_GANG_START_TIMEOUT_SECONDS", "300")),
        notice_taints=parse_notice_taints(os.environ.get("CKPT_OPERATOR_NOTICE_TAINTS")),
        notice_checkpoint_seconds=float(os.environ.get("CKPT_OPERATOR_NOTICE_CHECKPOINT_SECONDS", "30")),
    )


def parse_notice_taints(text: str | None) -> dict[str, float]:
    """`key=seconds,key2=seconds` (a key alone gets 120 s of notice); unset means the default list, empty none."""
    if text is None:
        return dict(R.DEFAULT_NOTICE_TAINTS)
    taints = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, _, seconds = item.partition("=")
        try:
            taints[key.strip()] = float(seconds) if seconds.strip() else 120.0
        except ValueError:
            raise ValueError(f"CKPT_OPERATOR_NOTICE_TAINTS: {item!r} is not key=seconds") from None
    return taints


@dataclass
class Runtime:
    """What the startup handler makes: the API client, the settings, the finalizer releaser, the Event recorder, the
    pod watch."""

    api: Api
    settings: Settings
    releaser: Releaser
    recorder: EventRecorder
    pods: PodInformer
    jobs: JobInformer


@dataclass
class OperatorContext:
    """Everything the handlers share (see the module docstring)."""

    qps: float = 50.0
    burst: int = 100
    namespaces: list[str] = field(default_factory=list)
    started: Runtime | None = None
    cache: Cache | None = None  # made at startup; kopf's indexes bound by the first kopf handler call
    sweeper: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # the Event recorder's sender, the unready warning
    workers: dict[str, JobWorker] = field(default_factory=dict)  # one per TrainingJob uid
    nodes_seen: dict[str, NodeInfo] = field(default_factory=dict)  # what the planner last read of each node
    releases: set[asyncio.Task[None]] = field(default_factory=set)  # deleted jobs' pods and Workloads being released

    def __copy__(self) -> OperatorContext:
        return self

    @property
    def runtime(self) -> Runtime:
        if self.started is None:
            raise RuntimeError("the operator has not started yet")
        return self.started
