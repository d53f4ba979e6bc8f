"""The TrainingJob state machine as a pure function: observed state in, desired status and actions out."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from . import reasons as R
from .builders import JobRef, ResumeSource, build_pod, failure_backoff, mean_time_between_preemptions, pod_name
from .classify import NodeInfo, PodState, Verdict, classify
from .errors import InvalidSpecError
from .models import Condition, LastCheckpoint, Outcome, Phase, TrainingJobSpec, TrainingJobStatus

RESTART_REASONS = {"Preempted": R.RESTART_PREEMPTED, "Failed": R.RESTART_FAILED, "Suspended": R.RESTART_RESUMED}
ADMISSION_RETRY_CAP_SECONDS = 60.0
SAFETY_RESYNC_SECONDS = 600.0  # a re-plan from memory (no API request) in case an event was missed


@dataclass(frozen=True)
class Settings:
    backoff_base_seconds: float = 10.0
    backoff_cap_seconds: float = 300.0
    problem_retry_seconds: float = 10.0
    node_lost_seconds: float = 300.0  # a node NotReady for this long is lost (its pod is force-deleted)


@dataclass
class Observed:
    """Everything the planner needs, fetched by the handler."""

    job: JobRef
    generation: int | None
    spec: TrainingJobSpec
    status: TrainingJobStatus
    pod: dict[str, Any] | None  # the pod of attempt `status.attempt`, if it exists
    node: NodeInfo | None = None  # the node that pod is bound to
    problem: InvalidSpecError | None = None  # why a pod cannot be created now (missing claim, source job, ...)
    resume: ResumeSource | None = None
    deleting: bool = False  # the TrainingJob has a deletionTimestamp: never start another attempt


@dataclass
class Plan:
    status: TrainingJobStatus
    create: dict[str, Any] | None = None
    delete: tuple[str, int] | None = None  # pod name, grace seconds (0 = force)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)
    counters: list[tuple[str, str]] = field(default_factory=list)  # (metric, label: reason)
    resubmit_latency: float | None = None
    requeue: float | None = SAFETY_RESYNC_SECONDS


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def set_condition(conditions: list[Condition], type_: str, status: bool, reason: str, message: str,
                  now: dt.datetime) -> list[Condition]:
    """Replace one condition by type, keeping lastTransitionTime when its status did not change."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == value else iso(now)
    new = Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=since)
    return [c for c in conditions if c.type != type_] + [new]


class _Status:
    """A mutable working copy of the status."""

    def __init__(self, status: TrainingJobStatus, now: dt.datetime) -> None:
        self.data: dict[str, Any] = dict(status)
        self.now = now

    def __getattr__(self, name: str) -> Any:
        return self.__dict__["data"][name]

    def set(self, **values: Any) -> None:
        self.data.update(values)

    def cond(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        self.data["conditions"] = set_condition(self.data["conditions"], type_, status, reason, message, self.now)

    def build(self) -> TrainingJobStatus:
        return TrainingJobStatus(**self.data)


def _pod_alive(pod: dict[str, Any] | None) -> bool:
    """The pod exists, has not ended and nobody is deleting it."""
    if pod is None:
        return False
    ended = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    return not ended and (pod.get("metadata") or {}).get("deletionTimestamp") is None


def plan(o: Observed, now: dt.datetime, settings: Settings = Settings()) -> Plan:
    st = _Status(o.status, now)
    p = Plan(status=o.status)
    st.set(observed_generation=o.generation)
    if o.deleting:  # foreground or background deletion: the garbage collector removes the pods
        p.requeue = None
        p.status = st.build()
        return p
    if st.phase.finished:
        if _pod_alive(o.pod):  # e.g. a sidecar that keeps the finished pod (and its GPU) running
            p.delete = (o.pod["metadata"]["name"], o.spec.preemption.grace_period_seconds)  # type: ignore[index]
        p.requeue = None
        p.status = st.build()
        return p
    if st.start_time is None:
        st.set(start_time=iso(now))
    n = st.attempt
    name = pod_name(o.job.name, n)
    outcome = st.last_outcome if st.last_outcome is not None and st.last_outcome.attempt == n else None
    pod = o.pod

    if outcome is None:
        if pod is None and st.active_pod != name:
            _start_attempt(o, st, p, n, R.RESTART_NONE if n == 0 else _restart_reason(st))
            p.status = st.build()
            return p
        if pod is None:
            verdict = Verdict(PodState.PREEMPTED, R.POD_DELETED, f"pod {name} disappeared before it finished")
        else:
            container = o.spec.template["spec"]["containers"][o.spec.trainer_index()]["name"]
            lost = o.node is not None and o.node.lost(now, settings.node_lost_seconds)
            verdict = classify(pod, container, lost)
        if verdict.state == PodState.NODE_LOST:
            # the only path that starts the next attempt while the old pod may still run (a partitioned node):
            # the SDK's fence, claimed by the new attempt at start, refuses the old one's commits
            p.delete = (name, 0)
            p.events.append(("Warning", R.NODE_LOST, f"{verdict.message}; force-deleting pod {name}"))
            verdict = Verdict(PodState.PREEMPTED, R.NODE_LOST, verdict.message)
        if not verdict.state.ended:
            _observe_live(o, st, p, verdict, pod, settings)
            p.status = st.build()
            return p
        outcome = _record(o, st, p, verdict, n, settings)

    # attempt n has ended and was recorded once
    if pod is not None and p.delete is None:
        terminal = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        deleting = (pod.get("metadata") or {}).get("deletionTimestamp") is not None
        if not terminal:  # never two attempts at once: stop the rest of the pod (sidecars) and wait until gone
            if not deleting:
                p.delete = (name, o.spec.preemption.grace_period_seconds)
            p.requeue = None if st.phase.finished else 2.0
            p.status = st.build()
            return p
        if outcome.result == "Preempted" and not deleting:
            p.delete = (name, 0)  # a finished preempted pod holds nothing worth keeping; failed ones keep logs
    if st.phase.finished:
        p.requeue = None
        p.status = st.build()
        return p
    if o.spec.suspend:
        _suspended(st, p)
        p.status = st.build()
        return p
    if outcome.result in ("Failed", "Preempted") and outcome.retry_after and parse_iso(outcome.retry_after) > now:
        wait = (parse_iso(outcome.retry_after) - now).total_seconds()
        reason = R.APPLICATION_FAILURE if outcome.result == "Failed" else outcome.reason
        st.cond(R.COND_BACKOFF, True, reason, f"resubmitting in {wait:.0f}s")
        p.requeue = wait
        p.status = st.build()
        return p
    reason = RESTART_REASONS[outcome.result]
    if _start_attempt(o, st, p, n + 1, reason):
        p.counters.append(("resubmissions", reason))
        p.resubmit_latency = max(0.0, (now - parse_iso(outcome.finished_at)).total_seconds())
    p.status = st.build()
    return p


def _restart_reason(st: _Status) -> str:
    last = st.last_outcome
    return RESTART_REASONS.get(last.result, R.RESTART_NONE) if last is not None else R.RESTART_NONE


def _start_attempt(o: Observed, st: _Status, p: Plan, attempt: int, reason: str) -> bool:
    """Create the pod of `attempt` unless the job is suspended or the spec cannot be acted on."""
    if o.spec.suspend:
        _suspended(st, p)
        return False
    if o.problem is not None:
        st.cond(R.COND_READY, False, o.problem.reason, o.problem.message)
        st.set(message=o.problem.message)
        p.events.append(("Warning", o.problem.reason, o.problem.message))
        retry = o.problem.retry_after_seconds
        p.requeue = retry if retry is not None else (
            p.requeue if p.requeue and p.requeue < SAFETY_RESYNC_SECONDS else 10.0)
        return False
    running = (st.now - parse_iso(st.start_time)).total_seconds() if st.start_time else 0.0
    mtbp = mean_time_between_preemptions(running, st.preemptions)
    p.create = build_pod(o.job, o.spec, attempt, reason, o.resume, mtbp, st.now)
    name = p.create["metadata"]["name"]
    st.cond(R.COND_READY, True, R.SPEC_VALID, "storage and template resolved")
    st.cond(R.COND_BACKOFF, False, R.RESUBMITTED, "")
    if st.phase == Phase.SUSPENDED:
        st.cond(R.COND_SUSPENDED, False, R.RESUMED_BY_USER, "resumed")
    if st.phase not in (Phase.PREEMPTED,) or reason != R.RESTART_PREEMPTED:
        st.set(phase=Phase.PENDING)
    st.set(attempt=attempt, active_pod=name, message=None,
           attempt_start_step=st.last_checkpoint.step if st.last_checkpoint is not None else None)
    verb = "Created" if reason == R.RESTART_NONE else f"Resubmitted ({reason})"
    p.events.append(("Normal", R.RESUBMITTED if reason != R.RESTART_NONE else R.PODS_STARTING,
                     f"{verb} pod {name} for attempt {attempt}"))
    return True


def _suspended(st: _Status, p: Plan) -> None:
    if st.phase != Phase.SUSPENDED:
        p.events.append(("Normal", R.SUSPENDED_BY_USER, "job suspended; its checkpoints are kept"))
    st.set(phase=Phase.SUSPENDED)
    st.cond(R.COND_SUSPENDED, True, R.SUSPENDED_BY_USER, "spec.suspend is true")
    st.cond(R.COND_RUNNING, False, R.SUSPENDED_BY_USER, "")
    p.requeue = None


def _observe_live(o: Observed, st: _Status, p: Plan, verdict: Verdict, pod: dict[str, Any] | None,
                  settings: Settings) -> None:
    assert pod is not None
    name = pod["metadata"]["name"]
    deleting = (pod.get("metadata") or {}).get("deletionTimestamp") is not None
    if o.spec.suspend:
        if not deleting:
            p.delete = (name, o.spec.preemption.grace_period_seconds)
            p.events.append(("Normal", R.SUSPENDED_BY_USER,
                             f"suspending: SIGTERM to pod {name}, {o.spec.preemption.grace_period_seconds}s to "
                             "checkpoint"))
        st.set(phase=Phase.SUSPENDED)
        st.cond(R.COND_SUSPENDED, True, R.SUSPENDED_BY_USER, "waiting for the trainer to checkpoint and exit")
        return
    lost_at = o.node.lost_at(settings.node_lost_seconds) if o.node is not None else None
    if lost_at is not None:  # NotReady, not lost yet: the pod may well be running; wait, and say so
        assert o.node is not None
        message = (f"node {o.node.name} has not been Ready since {iso(o.node.not_ready_since or st.now)}; pod "
                   f"{name} counts as lost at {iso(lost_at)} unless the node recovers")
        if _condition_reason(st, R.COND_RUNNING) != R.NODE_UNREACHABLE:
            p.events.append(("Warning", R.NODE_UNREACHABLE, message))
        st.cond(R.COND_RUNNING, False, R.NODE_UNREACHABLE, message)
        p.requeue = max(0.5, min(30.0, (lost_at - st.now).total_seconds() + 0.5))
        return
    if verdict.state == PodState.RUNNING:
        if st.phase != Phase.RUNNING or _condition_reason(st, R.COND_RUNNING) != R.POD_RUNNING:
            p.events.append(("Normal", R.POD_RUNNING, f"pod {name} is running (attempt {st.attempt})"))
        st.set(phase=Phase.RUNNING)
        st.cond(R.COND_RUNNING, True, R.POD_RUNNING, f"pod {name} is running")
        st.cond(R.COND_PREEMPTED, False, R.POD_RUNNING, "")
    elif verdict.state == PodState.PENDING:
        if st.phase == Phase.RUNNING:
            st.set(phase=Phase.PENDING)
        if verdict.reason != R.PODS_STARTING:  # Unschedulable, ImagePullBackOff, CreateContainerConfigError...
            if _condition_reason(st, R.COND_RUNNING) != verdict.reason:
                p.events.append(("Warning", verdict.reason, f"pod {name} cannot start: {verdict.message}"))
            st.cond(R.COND_RUNNING, False, verdict.reason, verdict.message[:1000])


def _condition_reason(st: _Status, type_: str) -> str | None:
    return next((c.reason for c in st.conditions if c.type == type_), None)


def _record(o: Observed, st: _Status, p: Plan, v: Verdict, n: int, settings: Settings) -> Outcome:
    """Count how attempt n ended (exactly once) and set the phase."""
    if v.checkpoint_step is not None:
        st.set(last_checkpoint=LastCheckpoint(step=v.checkpoint_step, time=v.checkpoint_time or iso(st.now)))
    result = {PodState.SUCCEEDED: "Succeeded", PodState.PREEMPTED: "Preempted", PodState.FAILED: "Failed"}[v.state]
    if result == "Preempted" and o.spec.suspend:
        result = "Suspended"
    retry_after = None
    ckpt = f" (last checkpoint: step {v.checkpoint_step})" if v.checkpoint_step is not None else ""
    st.cond(R.COND_RUNNING, False, v.reason, v.message)
    if result == "Succeeded":
        st.set(phase=Phase.SUCCEEDED, completion_time=iso(st.now), message=None)
        st.cond(R.COND_COMPLETE, True, R.COMPLETED, f"attempt {n} finished{ckpt}")
        p.events.append(("Normal", R.COMPLETED, f"training finished on attempt {n}{ckpt}"))
    elif result == "Suspended":
        st.set(phase=Phase.SUSPENDED)
        p.events.append(("Normal", R.SUSPENDED_BY_USER, f"attempt {n} stopped for suspend{ckpt}"))
    elif result == "Preempted":
        preemptions = st.preemptions + 1
        st.set(preemptions=preemptions, phase=Phase.PREEMPTED)
        st.cond(R.COND_PREEMPTED, True, v.reason, v.message)
        p.counters.append(("preemptions", v.reason))
        p.events.append(("Warning", v.reason, f"attempt {n} preempted: {v.message}{ckpt}"))
        limit = o.spec.preemption.max_preemptions
        if limit is not None and preemptions > limit:
            _fail(st, p, R.PREEMPTION_LIMIT_EXCEEDED, f"{preemptions} preemptions exceed maxPreemptions={limit}")
    else:
        failures = st.failures + 1
        st.set(failures=failures)
        p.counters.append(("failures", v.reason))
        p.events.append(("Warning", R.APPLICATION_FAILURE, f"attempt {n} failed: {v.message}"))
        if failures > o.spec.backoff_limit:
            _fail(st, p, R.BACKOFF_LIMIT_EXCEEDED,
                  f"{failures} application failures exceed backoffLimit={o.spec.backoff_limit}; last: {v.message}")
        else:
            wait = failure_backoff(failures, settings.backoff_base_seconds, settings.backoff_cap_seconds)
            retry_after = iso(st.now + dt.timedelta(seconds=wait))
            st.set(phase=Phase.PENDING)
    if result in ("Preempted", "Failed"):
        _count_progress(o, st, p, v, n)
    if v.reason == R.ADMISSION_REJECTED and not st.phase.finished:
        # the node refused the pod before it ran (a device plugin restarting): retry soon, not in a tight loop
        # that would spend the whole progress budget in a second
        wait = min(ADMISSION_RETRY_CAP_SECONDS, 2.0 ** max(1, st.attempts_without_progress))
        retry_after = iso(st.now + dt.timedelta(seconds=wait))
    outcome = Outcome(attempt=n, result=result, reason=v.reason, message=v.message[:1000], exit_code=v.exit_code,
                      finished_at=iso(st.now), retry_after=retry_after)
    st.set(last_outcome=outcome)
    return outcome


def _count_progress(o: Observed, st: _Status, p: Plan, v: Verdict, n: int) -> None:
    """The progress budget: consecutive attempts that ended without committing a new checkpoint."""
    start = st.attempt_start_step
    progressed = v.checkpoint_step is not None and (start is None or v.checkpoint_step > start)
    stalled = 0 if progressed else st.attempts_without_progress + 1
    st.set(attempts_without_progress=stalled)
    limit = o.spec.preemption.max_attempts_without_progress
    if stalled >= limit and not st.phase.finished:
        _fail(st, p, R.NO_PROGRESS, f"{stalled} consecutive attempts (the last: attempt {n}, {v.reason}) committed no "
                                    f"new checkpoint (maxAttemptsWithoutProgress={limit})")


def _fail(st: _Status, p: Plan, reason: str, message: str) -> None:
    st.set(phase=Phase.FAILED, completion_time=iso(st.now), message=message)
    st.cond(R.COND_FAILED, True, reason, message)
    p.events.append(("Warning", reason, message))
