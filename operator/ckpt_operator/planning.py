"""The planner's vocabulary: what one pass observes, the plan it returns, the pods of an attempt, and the working
status (a mutable copy of the job's status, typed). Pure: no API access anywhere in the planner."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from . import reasons as R
from .builders import JobRef, ResumeSource, member_names, pod_name
from .classify import NodeInfo
from .errors import InvalidSpecError
from .kueue import WorkloadView
from .models import Condition, TrainingJobSpec, TrainingJobStatus

SAFETY_RESYNC_SECONDS = 600.0  # a re-plan from memory (no API request) in case an event was missed

Pod = dict[str, Any]  # a pod as the watch delivers it (trimmed, see cache.trim_pod)


@dataclass(frozen=True)
class Settings:
    backoff_base_seconds: float = 10.0
    backoff_cap_seconds: float = 300.0
    problem_retry_seconds: float = 10.0
    node_lost_seconds: float = 300.0  # a node NotReady for this long is lost (its pod is force-deleted)
    # an attempt whose pods are not all running this long after they could (unschedulable, or bound and not
    # starting) ends: a gang must not hold its other ranks' nodes, a lone pod its node, while nothing trains
    gang_start_timeout_seconds: float = 300.0
    # node taints that announce the node's end -> seconds of notice (see reasons.DEFAULT_NOTICE_TAINTS)
    notice_taints: Mapping[str, float] = field(default_factory=lambda: dict(R.DEFAULT_NOTICE_TAINTS))
    # after asking for a checkpoint, how long the trainer gets before the migration's SIGTERM (bounded by the deadline)
    notice_checkpoint_seconds: float = 30.0


@dataclass
class Observed:
    """Everything the planner needs, from the watches (see actuator.observe)."""

    job: JobRef
    generation: int | None
    spec: TrainingJobSpec
    status: TrainingJobStatus
    pods: list[Pod]  # the job's pods: those of attempt `status.attempt` (every rank of a gang), and any strays
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)  # the nodes those pods are bound to, by name
    problem: InvalidSpecError | None = None  # why a pod cannot be created now (missing claim, source job, ...)
    resume: ResumeSource | None = None
    deleting: bool = False  # the TrainingJob has a deletionTimestamp: never start another attempt
    annotations: Mapping[str, str] = field(default_factory=dict)  # the job's ckpt.dev/ annotations (plugin requests)
    labels: Mapping[str, str] = field(default_factory=dict)  # the job's kueue.x-k8s.io/ labels
    queue: str | None = None  # its Kueue LocalQueue (label kueue.x-k8s.io/queue-name), when Kueue is on
    workload: WorkloadView | None = None  # its Kueue Workload, once it exists
    flavors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # ResourceFlavor specs by name
    capacity: int | None = None  # an elastic gang: the ranks the nodes fit now (elastic_policy.rank_slots)


@dataclass
class WorkloadPlan:
    """What to do to the job's Kueue Workload in this pass (see kueue_policy)."""

    create: bool = False
    active: bool | None = None  # set spec.active (it follows spec.suspend)
    status_patch: dict[str, Any] | None = None  # one merge patch of its status (release, PodsReady, Finished)
    annotations: dict[str, str] = field(default_factory=dict)  # the last checkpoint, for whoever picks victims
    release_finalizer: bool = False
    replace: bool = False  # a Finished Workload of a job that runs again (`kubectl ckpt resume`): delete it


@dataclass
class Actions:
    """What a pass does besides writing the status: create, delete, annotate, release, report."""

    creates: list[Pod] = field(default_factory=list)  # the pods of a new attempt, by rank
    service: dict[str, Any] | None = None  # a gang's headless Service, made to exist before its pods
    deletes: list[tuple[str, int]] = field(default_factory=list)  # pod name, grace seconds (0 = force)
    annotations: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # pod name, annotations to set
    releases: list[str] = field(default_factory=list)  # pods whose finalizer may go (their outcome is recorded)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)
    counters: list[tuple[str, str]] = field(default_factory=list)  # (metric, label: reason)
    goodput_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds by kind, newly accounted
    resubmit_latency: float | None = None
    requeue: float | None = SAFETY_RESYNC_SECONDS  # seconds until the next pass (None: only when something changes)
    workload: WorkloadPlan = field(default_factory=WorkloadPlan)

    @property
    def create(self) -> Pod | None:
        """The first pod to create (the only one of a single-pod job)."""
        return self.creates[0] if self.creates else None

    @property
    def delete(self) -> tuple[str, int] | None:
        """The first pod to delete."""
        return self.deletes[0] if self.deletes else None

    def sigterm(self, names: Iterable[str], grace: int) -> None:
        """Delete these pods gracefully (SIGTERM, `grace` seconds to checkpoint), once each."""
        planned = {name for name, _ in self.deletes}
        self.deletes += [(name, grace) for name in names if name not in planned]

    def force_delete(self, name: str) -> None:
        """Delete a pod at once (its node is gone: nothing would run the grace period)."""
        self.deletes = [(other, grace) for other, grace in self.deletes if other != name] + [(name, 0)]

    def wake_in(self, seconds: float) -> None:
        """Plan again within `seconds` at the latest (the earliest of every wake-up asked for wins)."""
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def idle(self) -> None:
        """Nothing to wait for: plan again only when something changes (finished, suspended, deleting)."""
        self.requeue = None

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def count(self, metric: str, label: str) -> None:
        self.counters.append((metric, label))


@dataclass
class Plan(Actions):
    """What one pass decided: the status to write and the actions to take, in that order (see actuator)."""

    status: TrainingJobStatus = field(kw_only=True)

    def actions(self) -> Actions:
        """The actions alone, without the status models (what a pass keeps while its status write waits)."""
        return Actions(**{spec.name: getattr(self, spec.name) for spec in fields(Actions)})


@dataclass(frozen=True)
class Member:
    """One rank of the current attempt: its pod name, and the pod if it exists."""

    rank: int
    name: str
    pod: Pod | None


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    """A timestamp as the API server and `iso` write it (`2026-01-01T00:00:00Z`), UTC; ValueError on any other form.
    `fromisoformat` for that one form: `strptime` was a sixth of a pass that changes nothing."""
    if len(text) != 20 or (text[4], text[7], text[10], text[13], text[16], text[19]) != ("-", "-", "T", ":", ":", "Z"):
        raise ValueError(f"time data {text!r} does not match format '%Y-%m-%dT%H:%M:%SZ'")
    return dt.datetime.fromisoformat(text)


def recorded_size(spec: TrainingJobSpec, status: TrainingJobStatus) -> int:
    """The current attempt's number of ranks: as recorded when it started (an elastic gang's size, or a fixed one
    the spec has changed since), else the spec's."""
    return status.world_size or spec.worker_range()[1]


def attempt_names(o: Observed, attempt: int) -> list[str]:
    """The pod names of `attempt` (the current one, or one recorded in status.attempts). A started attempt keeps the
    names it started with, whatever the spec says since (its `workers` may change: the next attempt takes it)."""
    st = o.status
    if attempt == st.attempt and st.active_pod in (pod_name(o.job.name, attempt), pod_name(o.job.name, attempt, 0)):
        ranked = st.active_pod != pod_name(o.job.name, attempt)
        return member_names(o.job.name, attempt, (st.world_size or len(st.workers) or 1) if ranked else 1, ranked)
    size = recorded_size(o.spec, o.status)
    if attempt != o.status.attempt:
        row = next((r for r in o.status.attempts if r.attempt == attempt), None)
        size = row.workers if row is not None and row.workers else size
    return member_names(o.job.name, attempt, size, o.spec.ranked or size > 1)


def members(o: Observed, attempt: int) -> list[Member]:
    """The ranks of `attempt` with their pods (matched by name: the pods of other attempts are not members)."""
    by_name = {p["metadata"]["name"]: p for p in o.pods}
    names = attempt_names(o, attempt)
    return [Member(rank, name, by_name.get(name)) for rank, name in enumerate(names)]


def pod_alive(pod: Pod | None) -> bool:
    """The pod exists, has not ended and nobody is deleting it."""
    return pod is not None and not terminal(pod) and not deleting(pod)


def held(pod: Mapping[str, Any]) -> bool:
    """The pod carries the operator's finalizer: its end is not recorded yet (an undone create is released)."""
    return R.POD_FINALIZER in ((pod.get("metadata") or {}).get("finalizers") or [])


def settled(pod: Pod, job: str, status: Mapping[str, Any]) -> bool:
    """Nothing is left to plan about `pod`: it ended, no longer holds the finalizer, and `status` (the job's)
    recorded how its attempt ended. What still happens to it (its deletion) is no news for its job."""
    if held(pod) or not terminal(pod):
        return False
    attempt, recorded = attempt_of(pod, job), (status.get("lastOutcome") or {}).get("attempt")
    return attempt >= 0 and (attempt < int(status.get("attempt") or 0) or
                             (isinstance(recorded, int) and attempt <= recorded))


def undone(pod: Pod | None) -> bool:
    """A create that was undone (a quota refused another rank): deleted and already released, so it is no
    member's outcome to record; the next attempt waits until it is gone."""
    return pod is not None and deleting(pod) and not held(pod)


def terminal(pod: Pod) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def deleting(pod: Pod) -> bool:
    return (pod.get("metadata") or {}).get("deletionTimestamp") is not None


def node_name(pod: Pod | None) -> str:
    """The node a pod is bound to ("" if none)."""
    return str(((pod or {}).get("spec") or {}).get("nodeName") or "")


def attempt_of(pod: Pod, job: str) -> int:
    """The attempt a pod belongs to: its label, else its name (`<job>-<attempt>[-<rank>]`); -1 if neither says."""
    label = ((pod.get("metadata") or {}).get("labels") or {}).get(R.LABEL_ATTEMPT)
    if label is not None:
        return int(label) if str(label).isdigit() else -1
    match = re.fullmatch(rf"{re.escape(job)}-(\d+)(-\d+)?", str(pod["metadata"]["name"]))
    return int(match.group(1)) if match else -1


def condition_reason(st: TrainingJobStatus, type_: str) -> str | None:
    return next((c.reason for c in st.conditions if c.type == type_), None)


def set_condition(st: TrainingJobStatus, type_: str, status: bool, reason: str, message: str,
                  now: dt.datetime) -> None:
    """Replace one condition by type, keeping lastTransitionTime when its status did not change (and the list
    untouched when nothing changed)."""
    value = "True" if status else "False"
    old = next((c for c in st.conditions if c.type == type_), None)
    if old is not None and (old.status, old.reason, old.message) == (value, reason, message):
        return
    since = old.last_transition_time if old is not None and old.status == value else iso(now)
    new = Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=since,
                    observed_generation=old.observed_generation if old is not None else None)
    st.conditions = [c for c in st.conditions if c.type != type_] + [new]


@dataclass
class Cycle:
    """One planning pass over one job: what was observed, the working status (a mutable copy), the plan being
    made, the time it is made at, and the operator's settings. Every policy reads and extends the same one."""

    seen: Observed
    status: TrainingJobStatus
    plan: Plan
    now: dt.datetime
    settings: Settings

    @classmethod
    def start(cls, seen: Observed, now: dt.datetime, settings: Settings) -> Cycle:
        status = seen.status.model_copy()  # shallow: nested models are frozen, and lists are replaced, never changed
        status.observed_generation = seen.generation
        return cls(seen, status, Plan(status=seen.status), now, settings)

    @property
    def grace(self) -> int:
        return self.seen.spec.preemption.grace_period_seconds

    def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        set_condition(self.status, type_, status, reason, message, self.now)
