"""Cloud interruption notices (a notice taint on a node of a live rank): ask every rank for a checkpoint now (a pod
annotation the SDK reads through a downward-API volume), then end the pods gracefully and resubmit them elsewhere
(the taint keeps the scheduler off the node). Before the SIGTERM the request gets `notice_checkpoint_seconds`,
bounded by the deadline minus the grace period."""

from __future__ import annotations

import datetime as dt

from . import reasons as R
from .classify import NodeInfo
from .models import InterruptionStatus, TrainingJobStatus
from .planning import Cycle, Member, iso, node_name, parse_iso, pod_alive

MIGRATION_MARGIN_SECONDS = 5.0  # an interruption migration's SIGTERM comes at least grace + this before the deadline


def migrating(st: TrainingJobStatus) -> bool:
    """The operator is moving this attempt off a node that got an interruption notice."""
    notice = st.interruption
    return notice is not None and notice.attempt == st.attempt and notice.migrating


def interruption(cycle: Cycle, gang: list[Member]) -> None:
    """Act on a notice taint on the node of a live rank (see the module docstring)."""
    st = cycle.status
    current = st.interruption if st.interruption is not None and st.interruption.attempt == st.attempt else None
    if current is not None and current.migrating:
        return
    alive = [m for m in gang if pod_alive(m.pod)]
    noticed = [(m, notice) for m in alive for notice in [_notice(cycle, m)] if notice is not None]
    if not noticed:
        if current is not None and _withdrawn(cycle, current):
            cycle.plan.event("Normal", R.INTERRUPTION_WITHDRAWN,
                             f"the interruption notice on node {current.node} was withdrawn; not migrating")
            st.interruption = None
        return
    if current is None:
        current = _first_notice(cycle, alive, noticed[0])
    for member in alive:
        annotations = (member.pod or {}).get("metadata", {}).get("annotations") or {}
        if annotations.get(R.ANNOTATION_CHECKPOINT_REQUESTED) != current.deadline:
            cycle.plan.annotations.append((member.name, {R.ANNOTATION_CHECKPOINT_REQUESTED: current.deadline}))
    due = parse_iso(current.migrate_time)
    if cycle.now < due:
        cycle.plan.wake_in(max(0.1, (due - cycle.now).total_seconds() + 0.1))
        return
    cycle.plan.sigterm([m.name for m in alive], cycle.grace)
    st.interruption = current.model_copy(update={"migrating": True})
    message = (f"moving {len(alive)} pod(s) off node {current.node} before its end ({current.taint}, deadline "
               f"{current.deadline}): SIGTERM, {cycle.grace}s to checkpoint, then resubmitted on another node")
    cycle.plan.event("Warning", R.INTERRUPTION_NOTICE, message)
    cycle.condition(R.COND_RUNNING, False, R.INTERRUPTION_NOTICE, message)


def _first_notice(cycle: Cycle, alive: list[Member],
                  noticed: tuple[Member, tuple[str, float, dt.datetime | None]]) -> InterruptionStatus:
    """Record a new notice: its deadline, and when the pods move (after the requested checkpoint had its time)."""
    member, (taint, seconds, added) = noticed
    deadline = (added or cycle.now) + dt.timedelta(seconds=seconds)
    latest = deadline - dt.timedelta(seconds=cycle.grace + MIGRATION_MARGIN_SECONDS)
    migrate = max(cycle.now, min(cycle.now + dt.timedelta(seconds=cycle.settings.notice_checkpoint_seconds), latest))
    node = node_name(member.pod)
    current = InterruptionStatus(attempt=cycle.status.attempt, node=node, taint=taint, seen_time=iso(cycle.now),
                                 deadline=iso(deadline), migrate_time=iso(migrate))
    cycle.status.interruption = current
    cycle.plan.count("notices", taint)
    cycle.plan.event("Warning", R.INTERRUPTION_NOTICE,
                     f"node {node} has the interruption notice taint {taint} (deadline {iso(deadline)}): checkpoint "
                     f"requested from {len(alive)} pod(s); migrating at {iso(migrate)}")
    return current


def _notice(cycle: Cycle, member: Member) -> tuple[str, float, dt.datetime | None] | None:
    node = cycle.seen.nodes.get(node_name(member.pod))
    return node.notice(cycle.settings.notice_taints) if node is not None and node.exists else None


def _withdrawn(cycle: Cycle, current: InterruptionStatus) -> bool:
    """The notice taint went away from its node (a rebalance hint revoked, a scale-down cancelled); not when the
    pods left the node otherwise (drained, evicted): then the node still carries it."""
    node: NodeInfo | None = cycle.seen.nodes.get(current.node)
    return node is not None and node.exists and node.notice(cycle.settings.notice_taints) is None
