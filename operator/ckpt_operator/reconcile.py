"""The TrainingJob state machine as a pure function: observed state in, desired status and actions out."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import reasons as R
from .builders import (
    JobRef,
    ResumeSource,
    build_pods,
    build_service,
    failure_backoff,
    mean_time_between_preemptions,
    member_names,
)
from .classify import NodeInfo, PodState, Verdict, classify, reached_step
from .errors import InvalidSpecError
from .models import (
    AttemptPolicy,
    AttemptRecord,
    Condition,
    FallbackStatus,
    InterruptionStatus,
    LastCheckpoint,
    Outcome,
    OverrideRecord,
    Phase,
    TrainingJobSpec,
    TrainingJobStatus,
    WorkerStatus,
)

RESTART_REASONS = {"Preempted": R.RESTART_PREEMPTED, "Failed": R.RESTART_FAILED, "Suspended": R.RESTART_RESUMED}
ADMISSION_RETRY_CAP_SECONDS = 60.0
SAFETY_RESYNC_SECONDS = 600.0  # a re-plan from memory (no API request) in case an event was missed
ATTEMPT_HISTORY = 100  # attempts kept in status.attempts
MIGRATION_MARGIN_SECONDS = 5.0  # an interruption migration's SIGTERM comes at least grace + this before the deadline


@dataclass(frozen=True)
class Settings:
    backoff_base_seconds: float = 10.0
    backoff_cap_seconds: float = 300.0
    problem_retry_seconds: float = 10.0
    node_lost_seconds: float = 300.0  # a node NotReady for this long is lost (its pod is force-deleted)
    gang_start_timeout_seconds: float = 300.0  # a rank unschedulable this long while others run ends the attempt
    # node taints that announce the node's end -> seconds of notice (see reasons.DEFAULT_NOTICE_TAINTS)
    notice_taints: Mapping[str, float] = field(default_factory=lambda: dict(R.DEFAULT_NOTICE_TAINTS))
    # after asking for a checkpoint, how long the trainer gets before the migration's SIGTERM (bounded by the deadline)
    notice_checkpoint_seconds: float = 30.0


@dataclass
class Observed:
    """Everything the planner needs, from the watches (see handlers.reconcile_once)."""

    job: JobRef
    generation: int | None
    spec: TrainingJobSpec
    status: TrainingJobStatus
    pods: list[dict[str, Any]]  # the existing pods of attempt `status.attempt` (every rank of a gang)
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)  # the nodes those pods are bound to, by name
    problem: InvalidSpecError | None = None  # why a pod cannot be created now (missing claim, source job, ...)
    resume: ResumeSource | None = None
    deleting: bool = False  # the TrainingJob has a deletionTimestamp: never start another attempt
    annotations: Mapping[str, str] = field(default_factory=dict)  # the job's ckpt.dev/ annotations (plugin requests)


@dataclass
class Plan:
    status: TrainingJobStatus
    creates: list[dict[str, Any]] = field(default_factory=list)  # the pods of a new attempt, by rank
    service: dict[str, Any] | None = None  # a gang's headless Service, made to exist before its pods
    deletes: list[tuple[str, int]] = field(default_factory=list)  # pod name, grace seconds (0 = force)
    annotations: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # pod name, annotations to set
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)
    counters: list[tuple[str, str]] = field(default_factory=list)  # (metric, label: reason)
    resubmit_latency: float | None = None
    requeue: float | None = SAFETY_RESYNC_SECONDS

    @property
    def create(self) -> dict[str, Any] | None:
        """The first pod to create (the only one of a single-pod job)."""
        return self.creates[0] if self.creates else None

    @property
    def delete(self) -> tuple[str, int] | None:
        """The first pod to delete."""
        return self.deletes[0] if self.deletes else None


@dataclass(frozen=True)
class Member:
    """One rank of the current attempt: its pod name, and the pod if it exists."""

    rank: int
    name: str
    pod: dict[str, Any] | None


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def set_condition(conditions: list[Condition], type_: str, status: bool, reason: str, message: str,
                  now: dt.datetime) -> list[Condition]:
    """Replace one condition by type, keeping lastTransitionTime when its status did not change (and the list
    untouched when nothing changed)."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    if old is not None and (old.status, old.reason, old.message) == (value, reason, message):
        return conditions
    since = old.last_transition_time if old is not None and old.status == value else iso(now)
    new = Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=since,
                    observed_generation=old.observed_generation if old is not None else None)
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
        self._summarize()
        generation = self.data.get("observed_generation")
        self.data["conditions"] = [c if c.observed_generation == generation else
                                   c.model_copy(update={"observed_generation": generation})
                                   for c in self.data["conditions"]]
        return TrainingJobStatus(**self.data)

    def _summarize(self) -> None:
        """kstatus' conditions from the phase: Reconciling while on its way, Stalled once Failed, Ready once it
        succeeded (as kstatus reads a Job: InProgress, then Current or Failed)."""
        phase: Phase = self.data["phase"]
        conditions = {c.type: c for c in self.data["conditions"]}
        failed = conditions.get(R.COND_FAILED)
        failed = failed if failed is not None and failed.status == "True" else None
        unresolved = conditions.get(R.COND_SPEC_RESOLVED)
        unresolved = unresolved if unresolved is not None and unresolved.status == "False" else None
        on_its_way = phase in (Phase.PENDING, Phase.RUNNING, Phase.PREEMPTED)
        self.cond(R.COND_RECONCILING, on_its_way, phase.value, f"the job is {phase.value.lower()}" if on_its_way
                  else "")
        self.cond(R.COND_STALLED, phase == Phase.FAILED, failed.reason if failed else phase.value,
                  failed.message if failed else "")
        why = failed or unresolved  # the most useful reason why it is not (yet) done
        if phase == Phase.SUCCEEDED:
            self.cond(R.COND_READY, True, R.COMPLETED, "training finished")
        elif phase == Phase.SUSPENDED and getattr(conditions.get(R.COND_SUSPENDED), "reason", "") not in (
                "", R.SUSPENDING):
            # what the spec asks for is reached, no pod left: nothing in progress
            self.cond(R.COND_READY, True, R.SUSPENDED_BY_USER, "suspended; its checkpoints are kept")
        else:
            self.cond(R.COND_READY, False, why.reason if why else phase.value, why.message if why else "")


def _pod_alive(pod: dict[str, Any] | None) -> bool:
    """The pod exists, has not ended and nobody is deleting it."""
    if pod is None:
        return False
    ended = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    return not ended and (pod.get("metadata") or {}).get("deletionTimestamp") is None


def _terminal(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _node_name(pod: dict[str, Any] | None) -> str:
    """The node a pod is bound to ("" if none)."""
    return str(((pod or {}).get("spec") or {}).get("nodeName") or "")


def _deleting(pod: dict[str, Any]) -> bool:
    return (pod.get("metadata") or {}).get("deletionTimestamp") is not None


def members(o: Observed, attempt: int) -> list[Member]:
    """The ranks of `attempt` with their pods (matched by name: the pods of other attempts are not members)."""
    by_name = {p["metadata"]["name"]: p for p in o.pods}
    names = member_names(o.job.name, attempt, o.spec.workers)
    return [Member(rank, name, by_name.get(name)) for rank, name in enumerate(names)]


def plan(o: Observed, now: dt.datetime, settings: Settings = Settings()) -> Plan:
    st = _Status(o.status, now)
    p = Plan(status=o.status)
    st.set(observed_generation=o.generation)
    if o.deleting:  # foreground or background deletion: the garbage collector removes the pods
        p.requeue = None
        p.status = st.build()
        return p
    n = st.attempt
    gang = members(o, n)
    grace = o.spec.preemption.grace_period_seconds
    _record_override(o, st, p)
    resume = o.annotations.get(R.ANNOTATION_RESUME_REQUEST)
    if st.phase.finished and resume and resume != st.resume_request and all(
            m.pod is None or _terminal(m.pod) for m in gang):
        _reopen(o, st, p, resume)
        p.status = st.build()
        return p
    if st.phase.finished:
        # e.g. a sidecar that keeps the finished pod (and its GPU) running
        p.deletes = [(m.name, grace) for m in gang if _pod_alive(m.pod)]
        p.requeue = None
        p.status = st.build()
        return p
    if st.start_time is None:
        st.set(start_time=iso(now))
    _policy_condition(o, st)
    outcome = st.last_outcome if st.last_outcome is not None and st.last_outcome.attempt == n else None

    if outcome is None:
        if all(m.pod is None for m in gang) and st.active_pod != gang[0].name:
            _start_attempt(o, st, p, n, R.RESTART_NONE if n == 0 else _restart_reason(st))
            p.status = st.build()
            return p
        verdicts = [_member_verdict(o, st, p, m, now, settings) for m in gang]
        if len(gang) > 1:
            verdicts = _gang_timeout(o, st, p, gang, verdicts, now, settings)
            _track_workers(st, gang, verdicts)
        if not all(v.state.ended for v in verdicts):
            migrating = _migrating(st)  # our own SIGTERM to every rank: not a gang break, not news of the pods
            cause = None if migrating else _gang_break(st, gang, verdicts)
            if cause is not None and not o.spec.suspend:  # suspend stops every rank itself
                _stop_gang(o, st, p, gang, cause)
            elif migrating:  # until the watch shows every pod deleting (a crash may have come before the delete)
                grace = o.spec.preemption.grace_period_seconds
                p.deletes += [(m.name, grace) for m in gang if _pod_alive(m.pod)]
            else:
                _observe_live(o, st, p, gang, verdicts, settings)
                if not o.spec.suspend:
                    _interruption(o, st, p, gang, now, settings)
            p.status = st.build()
            return p
        outcome = _record(o, st, p, _gang_verdict(st, gang, verdicts), n, settings)

    # attempt n has ended and was recorded once
    stopping = {name for name, _ in p.deletes}
    waiting = False
    for m in gang:
        if m.pod is None or m.name in stopping:
            continue
        if not _terminal(m.pod):  # never two attempts at once: stop the rest of the pod (sidecars), wait until gone
            if not _deleting(m.pod):
                p.deletes.append((m.name, grace))
            waiting = True
        elif outcome.result == "Preempted" and not _deleting(m.pod):
            p.deletes.append((m.name, 0))  # a finished preempted pod holds nothing worth keeping; failed ones keep logs
    if waiting:
        p.requeue = None if st.phase.finished else 2.0
        p.status = st.build()
        return p
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


_ENDED_STATES = {PodState.SUCCEEDED: "Succeeded", PodState.PREEMPTED: "Preempted", PodState.FAILED: "Failed"}
_STATE_OF = {**_ENDED_STATES, PodState.PENDING: "Pending", PodState.RUNNING: "Running",
             PodState.TERMINATING: "Terminating"}


def _worker(st: _Status, member: Member) -> WorkerStatus | None:
    """The recorded state of this rank's pod in this attempt, if any."""
    return next((w for w in st.workers if w.rank == member.rank and w.pod == member.name), None)


def _stopped(st: _Status, member: Member) -> bool:
    """The operator stopped this rank because another one ended first."""
    known = _worker(st, member)
    return known is not None and known.stopped


def _member_verdict(o: Observed, st: _Status, p: Plan, m: Member, now: dt.datetime, settings: Settings) -> Verdict:
    """How one rank stands. A rank recorded as ended stays ended (its pod may since be gone); a rank whose node
    is lost is force-deleted here."""
    known = _worker(st, m)
    if known is not None and known.state in _ENDED_STATES.values():
        state = next(k for k, v in _ENDED_STATES.items() if v == known.state)
        return Verdict(state, known.reason or "", known.message or "", known.exit_code, known.checkpoint_step)
    if m.pod is None:
        return Verdict(PodState.PREEMPTED, R.POD_DELETED, f"pod {m.name} disappeared before it finished")
    container = o.spec.trainer()["name"]
    node = o.nodes.get(_node_name(m.pod))
    verdict = classify(m.pod, container, node is not None and node.lost(now, settings.node_lost_seconds))
    lost_at = node.lost_at(settings.node_lost_seconds) if node is not None else None
    if lost_at is not None and not verdict.state.ended:  # nothing else wakes the job when the node turns lost
        p.requeue = max(0.5, min(p.requeue or SAFETY_RESYNC_SECONDS, (lost_at - now).total_seconds() + 0.5))
    if verdict.reason == R.POD_DELETED and _migrating(st) and st.interruption is not None:
        notice = st.interruption
        verdict = Verdict(verdict.state, R.INTERRUPTION_NOTICE,
                          f"moved off node {notice.node} after its interruption notice (taint {notice.taint}, "
                          f"deadline {notice.deadline})", verdict.exit_code, verdict.checkpoint_step,
                          verdict.checkpoint_time)
    if verdict.state == PodState.NODE_LOST:
        # the only path that starts the next attempt while the old pod may still run (a partitioned node):
        # the SDK's fence, claimed by the new attempt at start, refuses the old one's commits
        p.deletes.append((m.name, 0))
        p.events.append(("Warning", R.NODE_LOST, f"{verdict.message}; force-deleting pod {m.name}"))
        verdict = Verdict(PodState.PREEMPTED, R.NODE_LOST, verdict.message)
    return verdict


def _track_workers(st: _Status, gang: list[Member], verdicts: list[Verdict]) -> None:
    """status.workers: each rank's state in this attempt (an ended rank keeps its first recorded outcome)."""
    rows = []
    for m, v in zip(gang, verdicts, strict=True):
        known = _worker(st, m)
        node = _node_name(m.pod) or (known.node if known else None)
        idle = v.state in (PodState.RUNNING, PodState.PENDING) and v.reason in (R.POD_RUNNING, R.PODS_STARTING)
        rows.append(WorkerStatus(
            rank=m.rank, pod=m.name, node=node, state=_STATE_OF[v.state],
            reason=None if idle else v.reason or None, message=(v.message or "")[:300] or None,
            exit_code=v.exit_code, checkpoint_step=v.checkpoint_step, stopped=known.stopped if known else False))
    st.set(workers=rows)


def _gang_timeout(o: Observed, st: _Status, p: Plan, gang: list[Member], verdicts: list[Verdict],
                  now: dt.datetime, settings: Settings) -> list[Verdict]:
    """A rank left unschedulable while others run (holding their nodes) for longer than the gang timeout ends the
    attempt as a preemption (GangUnschedulable); before that, wake up when the timeout falls due."""
    if not any(v.state == PodState.RUNNING for v in verdicts):
        return verdicts
    out = list(verdicts)
    for index, (m, v) in enumerate(zip(gang, verdicts, strict=True)):
        since = _unschedulable_since(m.pod) if v.reason == R.UNSCHEDULABLE else None
        if since is None:
            continue
        due = since + dt.timedelta(seconds=settings.gang_start_timeout_seconds)
        if now < due:
            p.requeue = min(p.requeue or SAFETY_RESYNC_SECONDS, (due - now).total_seconds() + 0.5)
            continue
        out[index] = Verdict(PodState.PREEMPTED, R.GANG_UNSCHEDULABLE,
                             f"rank {m.rank} (pod {m.name}) was unschedulable for "
                             f"{settings.gang_start_timeout_seconds:.0f}s while the other ranks held their nodes: "
                             f"{v.message}")
    return out


def _unschedulable_since(pod: dict[str, Any] | None) -> dt.datetime | None:
    for cond in ((pod or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("lastTransitionTime"):
            return parse_iso(str(cond["lastTransitionTime"]))
    return None


def _gang_break(st: _Status, gang: list[Member], verdicts: list[Verdict]) -> tuple[Member, Verdict] | None:
    """The rank that breaks the gang, if any: the first one (not stopped by the operator) that ended other than
    by success or is being deleted by someone else. The attempt then ends as one unit."""
    if len(gang) == 1:
        return None
    return next(((m, v) for m, v in zip(gang, verdicts, strict=True) if not _stopped(st, m) and (
        (v.state.ended and v.state != PodState.SUCCEEDED) or v.state == PodState.TERMINATING)), None)


def _stop_gang(o: Observed, st: _Status, p: Plan, gang: list[Member], cause: tuple[Member, Verdict]) -> None:
    """SIGTERM (with the grace period, so they checkpoint) to every rank still alive."""
    grace = o.spec.preemption.grace_period_seconds
    stopping = {name for name, _ in p.deletes}
    stopped, signalled = set(), False
    for m in gang:
        if m.pod is not None and _pod_alive(m.pod) and m.name not in stopping:
            p.deletes.append((m.name, grace))  # the cause too, if still alive (an unschedulable rank)
            signalled = True
        if m.pod is not None and m is not cause[0]:
            stopped.add(m.rank)
    st.set(workers=[w.model_copy(update={"stopped": True}) if w.rank in stopped else w for w in st.workers])
    message = (f"rank {cause[0].rank} (pod {cause[0].name}) "
               f"{'is being deleted' if cause[1].state == PodState.TERMINATING else 'ended'}"
               f"{': ' + cause[1].reason if cause[1].reason else ''}; stopping the other ranks "
               f"({grace}s to checkpoint)")
    if signalled:
        p.events.append(("Warning", R.GANG_STOPPING, message))
    if _condition_reason(st, R.COND_RUNNING) != R.GANG_STOPPING:
        st.cond(R.COND_RUNNING, False, R.GANG_STOPPING, message)


_CAUSE_ORDER = {PodState.PREEMPTED: 0, PodState.FAILED: 1, PodState.SUCCEEDED: 3}


def _gang_verdict(st: _Status, gang: list[Member], verdicts: list[Verdict]) -> Verdict:
    """How the whole attempt ended: a preemption of any rank wins, then a real failure, then an unexplained
    SIGTERM; success only if every rank succeeded. The operator's own stop of a rank is never the cause; the
    checkpoint step is the newest any rank reported (rank 0 reports the gang's)."""
    if len(verdicts) == 1:
        return verdicts[0]
    # a rank the operator stopped counts only if something else took it meanwhile (its node was lost, it was
    # evicted): a peer that crashed because that rank's node vanished must not turn a preemption into a failure
    ranked = [(m, v) for m, v in zip(gang, verdicts, strict=True) if not _stopped(st, m) or (
        v.state == PodState.PREEMPTED and v.reason != R.POD_DELETED)]
    ranked = ranked or list(zip(gang, verdicts, strict=True))
    member, cause = min(ranked, key=lambda mv: _CAUSE_ORDER[mv[1].state] + (
        1 if mv[1].reason == R.UNEXPLAINED_SIGTERM else 0))
    reported = [v for v in verdicts if v.checkpoint_step is not None]
    newest = max(reported, key=lambda v: v.checkpoint_step or 0) if reported else None
    message = cause.message if cause.state == PodState.SUCCEEDED else f"rank {member.rank}: {cause.message}"
    return Verdict(cause.state, cause.reason, message, cause.exit_code,
                   newest.checkpoint_step if newest else None, newest.checkpoint_time if newest else None)


def _migrating(st: _Status) -> bool:
    """The operator is moving this attempt off a node that got an interruption notice."""
    notice = st.interruption
    return notice is not None and notice.attempt == st.attempt and notice.migrating


def _interruption(o: Observed, st: _Status, p: Plan, gang: list[Member], now: dt.datetime,
                  settings: Settings) -> None:
    """A notice taint on a node of a live rank: ask every rank for a checkpoint now (pod annotation, read by the SDK
    through a downward-API volume), then end the pods gracefully and resubmit them elsewhere (the taint keeps the
    scheduler off the node). Before the SIGTERM the request gets `notice_checkpoint_seconds`, bounded by the
    deadline minus the grace period."""
    current = st.interruption if st.interruption is not None and st.interruption.attempt == st.attempt else None
    if current is not None and current.migrating:
        return
    alive = [m for m in gang if _pod_alive(m.pod)]
    noticed = [(m, notice) for m in alive
               for notice in [_notice(o.nodes.get(_node_name(m.pod)), settings)] if notice is not None]
    if not noticed:
        if current is not None:  # the taint went away (a rebalance hint revoked, a scale-down cancelled)
            p.events.append(("Normal", R.INTERRUPTION_WITHDRAWN,
                             f"the interruption notice on node {current.node} was withdrawn; not migrating"))
            st.set(interruption=None)
        return
    grace = o.spec.preemption.grace_period_seconds
    if current is None:
        member, (taint, seconds, added) = noticed[0]
        deadline = (added or now) + dt.timedelta(seconds=seconds)
        latest = deadline - dt.timedelta(seconds=grace + MIGRATION_MARGIN_SECONDS)
        migrate = max(now, min(now + dt.timedelta(seconds=settings.notice_checkpoint_seconds), latest))
        node = _node_name(member.pod)
        current = InterruptionStatus(attempt=st.attempt, node=node, taint=taint, seen_time=iso(now),
                                     deadline=iso(deadline), migrate_time=iso(migrate))
        st.set(interruption=current)
        p.counters.append(("notices", taint))
        p.events.append(("Warning", R.INTERRUPTION_NOTICE,
                         f"node {node} has the interruption notice taint {taint} (deadline {iso(deadline)}): "
                         f"checkpoint requested from {len(alive)} pod(s); migrating at {iso(migrate)}"))
    for m in alive:
        annotations = (m.pod or {}).get("metadata", {}).get("annotations") or {}
        if annotations.get(R.ANNOTATION_CHECKPOINT_REQUESTED) != current.deadline:
            p.annotations.append((m.name, {R.ANNOTATION_CHECKPOINT_REQUESTED: current.deadline}))
    due = parse_iso(current.migrate_time)
    if now < due:
        p.requeue = max(0.1, min(p.requeue or SAFETY_RESYNC_SECONDS, (due - now).total_seconds() + 0.1))
        return
    p.deletes += [(m.name, grace) for m in alive if m.name not in {name for name, _ in p.deletes}]
    st.set(interruption=current.model_copy(update={"migrating": True}))
    message = (f"moving {len(alive)} pod(s) off node {current.node} before its end ({current.taint}, deadline "
               f"{current.deadline}): SIGTERM, {grace}s to checkpoint, then resubmitted on another node")
    p.events.append(("Warning", R.INTERRUPTION_NOTICE, message))
    st.cond(R.COND_RUNNING, False, R.INTERRUPTION_NOTICE, message)


def _notice(node: NodeInfo | None, settings: Settings) -> tuple[str, float, dt.datetime | None] | None:
    return node.notice(settings.notice_taints) if node is not None and node.exists else None


def _restart_reason(st: _Status) -> str:
    last = st.last_outcome
    return RESTART_REASONS.get(last.result, R.RESTART_NONE) if last is not None else R.RESTART_NONE


def _start_attempt(o: Observed, st: _Status, p: Plan, attempt: int, reason: str) -> bool:
    """Create the pod of `attempt` unless the job is suspended or the spec cannot be acted on."""
    if o.spec.suspend:
        _suspended(st, p)
        return False
    if o.problem is not None:
        st.cond(R.COND_SPEC_RESOLVED, False, o.problem.reason, o.problem.message)
        st.set(message=o.problem.message)
        p.events.append(("Warning", o.problem.reason, o.problem.message))
        retry = o.problem.retry_after_seconds
        p.requeue = retry if retry is not None else (
            p.requeue if p.requeue and p.requeue < SAFETY_RESYNC_SECONDS else 10.0)
        return False
    running = (st.now - parse_iso(st.start_time)).total_seconds() if st.start_time else 0.0
    mtbp = mean_time_between_preemptions(running, st.preemptions)
    patch = _fallback_patch(o, st, p)
    p.creates = build_pods(o.job, o.spec, attempt, reason, o.resume, mtbp, st.now, patch)
    name = p.creates[0]["metadata"]["name"]
    if o.spec.workers > 1:
        p.service = build_service(o.job)
    st.cond(R.COND_SPEC_RESOLVED, True, R.SPEC_VALID, "storage and template resolved")
    st.cond(R.COND_BACKOFF, False, R.RESUBMITTED, "")
    if st.phase == Phase.SUSPENDED:
        st.cond(R.COND_SUSPENDED, False, R.RESUMED_BY_USER, "resumed")
    if st.phase not in (Phase.PREEMPTED,) or reason != R.RESTART_PREEMPTED:
        st.set(phase=Phase.PENDING)
    st.set(policy=_policy(o.spec))
    _policy_condition(o, st)
    _history_start(st, attempt, [pod["metadata"]["name"] for pod in p.creates])
    if any(record.attempt is None for record in st.overrides):
        st.set(overrides=[r if r.attempt is not None else r.model_copy(update={"attempt": attempt})
                          for r in st.overrides])
    st.set(attempt=attempt, active_pod=name, message=None,
           attempt_start_step=st.last_checkpoint.step if st.last_checkpoint is not None else None,
           workers=[WorkerStatus(rank=rank, pod=pod["metadata"]["name"]) for rank, pod in enumerate(p.creates)]
           if o.spec.workers > 1 else [])
    verb = "Created" if reason == R.RESTART_NONE else f"Resubmitted ({reason})"
    what = f"pod {name}" if len(p.creates) == 1 else f"{len(p.creates)} pods ({name}, ...)"
    p.events.append(("Normal", R.RESUBMITTED if reason != R.RESTART_NONE else R.PODS_STARTING,
                     f"{verb} {what} for attempt {attempt}"))
    return True


def _record_override(o: Observed, st: _Status, p: Plan) -> None:
    """status.overrides: each spec change made with `kubectl ckpt resume|restart -f/--set`, recorded once."""
    raw = o.annotations.get(R.ANNOTATION_OVERRIDE)
    if not raw:
        return
    try:
        record = OverrideRecord.model_validate_json(raw)
    except ValueError:
        return  # not ours to judge: the annotation is the plugin's
    if any(known.time == record.time and known.command == record.command for known in st.overrides):
        return
    record = record.model_copy(update={"generation": o.generation})
    st.set(overrides=[*st.overrides, record][-20:])
    changes = ", ".join(f"{key}={json.dumps(value)[:80]}" for key, value in record.changes.items()) or "no change"
    p.events.append(("Normal", R.SPEC_OVERRIDDEN, f"kubectl ckpt {record.command}: {changes}"))


def _reopen(o: Observed, st: _Status, p: Plan, request: str) -> None:
    """`kubectl ckpt resume` of a Succeeded or Failed job: a fresh budget, and the next attempt resumes from the
    newest checkpoint (e.g. with more steps set by an override)."""
    was = st.phase.value
    st.set(resume_request=request, failures=0, attempts_without_progress=0, completion_time=None, message=None,
           phase=Phase.PENDING)
    st.cond(R.COND_FAILED, False, R.RESUMED_BY_USER, "")
    st.cond(R.COND_COMPLETE, False, R.RESUMED_BY_USER, "")
    step = st.last_checkpoint.step if st.last_checkpoint is not None else None
    p.events.append(("Normal", R.RESUMED_BY_USER, f"resumed after it {was.lower()}: attempt {st.attempt + 1} "
                                                 f"continues from checkpoint step {step}"))
    _start_attempt(o, st, p, st.attempt + 1, R.RESTART_RESUMED)


def _policy(spec: TrainingJobSpec) -> AttemptPolicy:
    return AttemptPolicy(keep=spec.checkpoint.keep, interval_seconds=spec.checkpoint.interval_seconds,
                         mount_path=spec.checkpoint.mount_path)


def _policy_condition(o: Observed, st: _Status) -> None:
    """PolicyApplied: whether the current attempt runs with the spec's checkpoint policy (a change waits for the
    next attempt: the pod's environment and mounts are fixed at its creation)."""
    running, wanted = st.policy, _policy(o.spec)
    if running is None or running == wanted:
        st.cond(R.COND_POLICY_APPLIED, True, R.POLICY_CURRENT, "")
        return
    changes = ", ".join(f"{name} {getattr(running, key)} -> {getattr(wanted, key)}"
                        for key, name in (("keep", "keep"), ("interval_seconds", "intervalSeconds"),
                                          ("mount_path", "mountPath"))
                        if getattr(running, key) != getattr(wanted, key))
    st.cond(R.COND_POLICY_APPLIED, False, R.POLICY_NEXT_ATTEMPT,
            f"checkpoint policy changed ({changes}): attempt {st.attempt} keeps its own, the next attempt gets it")


def _count_for_fallback(o: Observed, st: _Status, p: Plan) -> None:
    """A preemption: switch to preemption.fallback's template once `afterPreemptions` fell within the window."""
    fallback = o.spec.preemption.fallback
    if fallback is None:
        return
    state = st.fallback or FallbackStatus()
    window = dt.timedelta(seconds=fallback.window_seconds)
    recent = [t for t in state.recent_preemptions if st.now - parse_iso(t) < window] + [iso(st.now)]
    recent = recent[-fallback.after_preemptions:]
    if not state.active and len(recent) >= fallback.after_preemptions:
        state = state.model_copy(update={"active": True, "since": iso(st.now)})
        back = (f"; back to the template after {fallback.revert_after_seconds}s"
                if fallback.revert_after_seconds else "")
        p.events.append(("Warning", R.FALLBACK_APPLIED,
                         f"{len(recent)} preemptions within {fallback.window_seconds}s: the next attempts run with "
                         f"preemption.fallback.templatePatch{back}"))
    st.set(fallback=state.model_copy(update={"recent_preemptions": recent}))


def _fallback_patch(o: Observed, st: _Status, p: Plan) -> dict[str, Any] | None:
    """The template patch for the attempt starting now (None: the plain template); reverts when its time is up."""
    fallback, state = o.spec.preemption.fallback, st.fallback
    if fallback is None or state is None or not state.active:
        return None
    since = parse_iso(state.since) if state.since else st.now
    if fallback.revert_after_seconds is not None and \
            (st.now - since).total_seconds() >= fallback.revert_after_seconds:
        st.set(fallback=FallbackStatus())
        p.events.append(("Normal", R.FALLBACK_REVERTED,
                         f"the fallback ran for {fallback.revert_after_seconds}s: back to the pod template"))
        return None
    return fallback.template_patch


def _suspended(st: _Status, p: Plan) -> None:
    if st.phase != Phase.SUSPENDED:
        p.events.append(("Normal", R.SUSPENDED_BY_USER, "job suspended; its checkpoints are kept"))
    st.set(phase=Phase.SUSPENDED)
    st.cond(R.COND_SUSPENDED, True, R.SUSPENDED_BY_USER, "spec.suspend is true")
    st.cond(R.COND_RUNNING, False, R.SUSPENDED_BY_USER, "")
    p.requeue = None


def _observe_live(o: Observed, st: _Status, p: Plan, gang: list[Member], verdicts: list[Verdict],
                  settings: Settings) -> None:
    """No rank has ended (or only some succeeded): suspend, wait on an unreachable node, or report progress."""
    grace = o.spec.preemption.grace_period_seconds
    if o.spec.suspend:
        alive = [m.name for m in gang if _pod_alive(m.pod)]
        p.deletes += [(name, grace) for name in alive]
        if alive:
            p.events.append(("Normal", R.SUSPENDED_BY_USER,
                             f"suspending: SIGTERM to pod {', '.join(alive)}, {grace}s to checkpoint"))
        st.set(phase=Phase.SUSPENDED)
        st.cond(R.COND_SUSPENDED, True, R.SUSPENDING, "waiting for the trainer to checkpoint and exit")
        return
    live = [(m, v) for m, v in zip(gang, verdicts, strict=True) if not v.state.ended]
    for m, _ in live:  # NotReady, not lost yet: the pod may well be running; wait, and say so
        node = o.nodes.get(_node_name(m.pod))
        lost_at = node.lost_at(settings.node_lost_seconds) if node is not None else None
        if node is None or lost_at is None:
            continue
        message = (f"node {node.name} has not been Ready since {iso(node.not_ready_since or st.now)}; pod "
                   f"{m.name} counts as lost at {iso(lost_at)} unless the node recovers")
        if _condition_reason(st, R.COND_RUNNING) != R.NODE_UNREACHABLE:
            p.events.append(("Warning", R.NODE_UNREACHABLE, message))
        st.cond(R.COND_RUNNING, False, R.NODE_UNREACHABLE, message)
        p.requeue = max(0.5, min(30.0, (lost_at - st.now).total_seconds() + 0.5))
        return
    if all(v.state == PodState.RUNNING for _, v in live):
        what = f"pod {live[0][0].name} is running" if len(gang) == 1 else f"{len(live)} of {len(gang)} pods are " \
            f"running" + (f" ({len(gang) - len(live)} finished)" if len(live) < len(gang) else "")
        if st.phase != Phase.RUNNING or _condition_reason(st, R.COND_RUNNING) != R.POD_RUNNING:
            p.events.append(("Normal", R.POD_RUNNING, f"{what} (attempt {st.attempt})"))
        st.set(phase=Phase.RUNNING)
        st.cond(R.COND_RUNNING, True, R.POD_RUNNING, what)
        st.cond(R.COND_PREEMPTED, False, R.POD_RUNNING, "")
        return
    pending = [(m, v) for m, v in live if v.state == PodState.PENDING]
    if pending:
        if st.phase == Phase.RUNNING:
            st.set(phase=Phase.PENDING)
        member, verdict = next(((m, v) for m, v in pending if v.reason != R.PODS_STARTING), pending[0])
        if verdict.reason != R.PODS_STARTING:  # Unschedulable, ImagePullBackOff, CreateContainerConfigError...
            if _condition_reason(st, R.COND_RUNNING) != verdict.reason:
                p.events.append(("Warning", verdict.reason, f"pod {member.name} cannot start: {verdict.message}"))
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
        _count_for_fallback(o, st, p)
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
    if v.reason in (R.ADMISSION_REJECTED, R.GANG_UNSCHEDULABLE) and not st.phase.finished:
        # the node refused the pod before it ran (a device plugin restarting), or a rank found no node: retry
        # soon, not in a tight loop that would spend the whole progress budget in a second
        wait = min(ADMISSION_RETRY_CAP_SECONDS, 2.0 ** max(1, st.attempts_without_progress))
        retry_after = iso(st.now + dt.timedelta(seconds=wait))
    outcome = Outcome(attempt=n, result=result, reason=v.reason, message=v.message[:1000], exit_code=v.exit_code,
                      finished_at=iso(st.now), retry_after=retry_after)
    _history_end(o, st, outcome)
    st.set(last_outcome=outcome)
    return outcome


def _history_start(st: _Status, attempt: int, pods: list[str]) -> None:
    """status.attempts: a row for the attempt starting now, with what it resumes from and the work it redoes."""
    start = st.last_checkpoint.step if st.last_checkpoint is not None else None
    previous = next((r for r in reversed(st.attempts) if r.attempt < attempt), None)
    redone = None
    if previous is not None and previous.reached_step is not None:
        redone = max(0, previous.reached_step - (start or 0))
    row = AttemptRecord(attempt=attempt, pods=pods, start_time=iso(st.now), start_step=start, steps_redone=redone)
    st.set(attempts=([r for r in st.attempts if r.attempt != attempt] + [row])[-ATTEMPT_HISTORY:])


def _history_end(o: Observed, st: _Status, outcome: Outcome) -> None:
    """Complete the attempt's row: where it ran, how it ended, the newest checkpoint and the furthest step."""
    container = o.spec.trainer()["name"]
    pods = [m.pod for m in members(o, outcome.attempt) if m.pod is not None]
    reached = [step for step in (reached_step(pod, container) for pod in pods) if step is not None]
    rows = list(st.attempts)
    row = next((r for r in rows if r.attempt == outcome.attempt), None) or AttemptRecord(
        attempt=outcome.attempt, pods=member_names(o.job.name, outcome.attempt, o.spec.workers))
    last = st.last_checkpoint
    row = row.model_copy(update={
        "nodes": sorted({_node_name(pod) for pod in pods if _node_name(pod)}) or row.nodes,
        "end_time": outcome.finished_at, "result": outcome.result, "reason": outcome.reason,
        "checkpoint_step": last.step if last is not None else None,
        "reached_step": max(reached) if reached else None})
    st.set(attempts=([r for r in rows if r.attempt != outcome.attempt] + [row])[-ATTEMPT_HISTORY:])


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
