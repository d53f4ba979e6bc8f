"""The ranks of an attempt as one unit: how each rank stands, the rank that breaks the gang, stopping the others
gracefully (so they checkpoint), and how the whole attempt ended."""

from __future__ import annotations

from . import reasons as R
from .classify import PodState, Verdict, classify
from .elastic_policy import resizing
from .interruption_policy import migrating
from .kueue_policy import eviction_verdict
from .models import WorkerStatus
from .planning import Cycle, Member, condition_reason, node_name, pod_alive

ENDED_STATES = {PodState.SUCCEEDED: "Succeeded", PodState.PREEMPTED: "Preempted", PodState.FAILED: "Failed",
                PodState.NOT_STARTED: "NotStarted"}
STATE_OF = {**ENDED_STATES, PodState.PENDING: "Pending", PodState.RUNNING: "Running",
            PodState.TERMINATING: "Terminating"}
# which rank's ending explains the attempt's: a preemption (a slot's end included) of any rank wins over a failure,
# a failure over ranks that could not start, success only if every rank succeeded
CAUSE_ORDER = {PodState.PREEMPTED: 0, PodState.FAILED: 1, PodState.NOT_STARTED: 2, PodState.SUCCEEDED: 3}


def worker(cycle: Cycle, member: Member) -> WorkerStatus | None:
    """The recorded state of this rank's pod in this attempt, if any."""
    return next((w for w in cycle.status.workers if w.rank == member.rank and w.pod == member.name), None)


def stopped(cycle: Cycle, member: Member) -> bool:
    """The operator stopped this rank because another one ended first."""
    known = worker(cycle, member)
    return known is not None and known.stopped


def member_verdict(cycle: Cycle, member: Member) -> Verdict:
    """How one rank stands. A rank recorded as ended stays ended (its pod may since be gone); a rank whose node
    is lost is force-deleted here."""
    known = worker(cycle, member)
    if known is not None and known.state in ENDED_STATES.values():
        state = next(k for k, v in ENDED_STATES.items() if v == known.state)
        return Verdict(state, known.reason or "", known.message or "", known.exit_code, known.checkpoint_step)
    if member.pod is None:
        return Verdict(PodState.PREEMPTED, R.POD_DELETED, f"pod {member.name} disappeared before it finished")
    settings = cycle.settings
    node = cycle.seen.nodes.get(node_name(member.pod))
    lost = node is not None and node.lost(cycle.now, settings.node_lost_seconds)
    verdict = classify(member.pod, cycle.seen.spec.trainer()["name"], lost)
    lost_at = node.lost_at(settings.node_lost_seconds) if node is not None else None
    if lost_at is not None and not verdict.state.ended:  # nothing else wakes the job when the node turns lost
        cycle.plan.wake_in(max(0.5, (lost_at - cycle.now).total_seconds() + 0.5))
    notice = cycle.status.interruption
    if verdict.reason == R.POD_DELETED and migrating(cycle.status) and notice is not None:
        verdict = Verdict(verdict.state, R.INTERRUPTION_NOTICE,
                          f"moved off node {notice.node} after its interruption notice (taint {notice.taint}, "
                          f"deadline {notice.deadline})", verdict.exit_code, verdict.checkpoint_step,
                          verdict.checkpoint_time, verdict.report)
    if verdict.reason == R.POD_DELETED and resizing(cycle):
        verdict = Verdict(verdict.state, R.RESIZED, f"stopped at a checkpoint to restart at "
                                                    f"{(cycle.status.elastic and cycle.status.elastic.resizing_to)} "
                                                    "ranks", verdict.exit_code, verdict.checkpoint_step,
                          verdict.checkpoint_time, verdict.report)
    verdict = eviction_verdict(cycle, verdict)
    if verdict.state == PodState.NODE_LOST:
        # the only path that starts the next attempt while the old pod may still run (a partitioned node):
        # the SDK's fence, claimed by the new attempt at start, refuses the old one's commits
        cycle.plan.force_delete(member.name)
        cycle.plan.event("Warning", R.NODE_LOST, f"{verdict.message}; force-deleting pod {member.name}")
        verdict = Verdict(PodState.PREEMPTED, R.NODE_LOST, verdict.message)
    return verdict


def track_workers(cycle: Cycle, gang: list[Member], verdicts: list[Verdict]) -> None:
    """status.workers: each rank's state in this attempt (an ended rank keeps its first recorded outcome)."""
    rows = []
    for member, verdict in zip(gang, verdicts, strict=True):
        known = worker(cycle, member)
        node = node_name(member.pod) or (known.node if known else None)
        idle = verdict.state in (PodState.RUNNING, PodState.PENDING) and \
            verdict.reason in (R.POD_RUNNING, R.PODS_STARTING)
        rows.append(WorkerStatus(
            rank=member.rank, pod=member.name, node=node, state=STATE_OF[verdict.state],
            reason=None if idle else verdict.reason or None, message=(verdict.message or "")[:300] or None,
            exit_code=verdict.exit_code, checkpoint_step=verdict.checkpoint_step,
            stopped=known.stopped if known else False))
    cycle.status.workers = rows


def gang_break(cycle: Cycle, gang: list[Member], verdicts: list[Verdict]) -> tuple[Member, Verdict] | None:
    """The rank that breaks the gang, if any: the first one (not stopped by the operator) that ended other than
    by success or is being deleted by someone else. The attempt then ends as one unit."""
    if len(gang) == 1:
        return None
    return next(((m, v) for m, v in zip(gang, verdicts, strict=True) if not stopped(cycle, m) and (
        (v.state.ended and v.state != PodState.SUCCEEDED) or v.state == PodState.TERMINATING)), None)


def stop_gang(cycle: Cycle, gang: list[Member], cause: tuple[Member, Verdict]) -> None:
    """SIGTERM (with the grace period, so they checkpoint) to every rank still alive, the cause too (a rank that
    could not start)."""
    alive = [m.name for m in gang if pod_alive(m.pod)]
    cycle.plan.sigterm(alive, cycle.grace)
    others = {m.rank for m in gang if m.pod is not None and m is not cause[0]}
    cycle.status.workers = [w.model_copy(update={"stopped": True}) if w.rank in others else w
                            for w in cycle.status.workers]
    member, verdict = cause
    message = (f"rank {member.rank} (pod {member.name}) "
               f"{'is being deleted' if verdict.state == PodState.TERMINATING else 'ended'}"
               f"{': ' + verdict.reason if verdict.reason else ''}; stopping the other ranks "
               f"({cycle.grace}s to checkpoint)")
    if alive:
        cycle.plan.event("Warning", R.GANG_STOPPING, message)
    if condition_reason(cycle.status, R.COND_RUNNING) != R.GANG_STOPPING:
        cycle.condition(R.COND_RUNNING, False, R.GANG_STOPPING, message)


def gang_verdict(cycle: Cycle, gang: list[Member], verdicts: list[Verdict]) -> Verdict:
    """How the whole attempt ended (see CAUSE_ORDER); an unexplained SIGTERM ranks below a real failure. The
    operator's own stop of a rank is never the cause; the checkpoint step is the newest any rank reported."""
    if len(verdicts) == 1:
        return verdicts[0]
    # a rank the operator stopped counts only if something else took it meanwhile (its node was lost, it was
    # evicted, its slot ended): a peer that crashed because that rank's node vanished must not turn a preemption
    # into a failure
    ranked = [(m, v) for m, v in zip(gang, verdicts, strict=True) if not stopped(cycle, m) or (
        v.state == PodState.PREEMPTED and v.reason != R.POD_DELETED)]
    ranked = ranked or list(zip(gang, verdicts, strict=True))
    member, cause = min(ranked, key=lambda mv: CAUSE_ORDER[mv[1].state] + (
        1 if mv[1].reason == R.UNEXPLAINED_SIGTERM else 0))
    reported = [v for v in verdicts if v.checkpoint_step is not None]
    newest = max(reported, key=lambda v: v.checkpoint_step or 0) if reported else None
    message = cause.message if cause.state == PodState.SUCCEEDED else f"rank {member.rank}: {cause.message}"
    return Verdict(cause.state, cause.reason, message, cause.exit_code,
                   newest.checkpoint_step if newest else None, newest.checkpoint_time if newest else None,
                   newest.report if newest else cause.report)
