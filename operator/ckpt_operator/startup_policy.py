"""How long an attempt's pods may take to start, alike for one pod and for a gang: a pod that finds no node, or is
bound and does not start (an image it cannot pull, a missing Secret, a volume stuck attaching), for longer than the
start timeout ends the attempt. A gang must not hold its other ranks' nodes (and GPUs), nor a lone pod its node,
while nothing trains.

- no node, or bound and stuck starting (ContainerCreating): the attempt did not start (NotStarted): no budget is
  spent, the next attempt comes after a short back-off and counts towards the capacity fallback;
- bound, and the kubelet says the pod cannot start as written (ImagePullBackOff, CreateContainerConfigError...):
  an application failure (StartFailed): it counts against backoffLimit, since only a change of the spec cures it.
"""

from __future__ import annotations

import datetime as dt

from . import reasons as R
from .classify import PodState, Verdict
from .planning import Cycle, Member, Pod, node_name, parse_iso


def start_timeouts(cycle: Cycle, gang: list[Member], verdicts: list[Verdict]) -> list[Verdict]:
    """`verdicts` with every rank that did not start in time turned into the end of the attempt; before that,
    a wake-up when the first timeout falls due."""
    timeout = dt.timedelta(seconds=cycle.settings.gang_start_timeout_seconds)
    out = list(verdicts)
    for index, (member, verdict) in enumerate(zip(gang, verdicts, strict=True)):
        since = _waiting_since(cycle, member.pod, verdict)
        if since is None:
            continue
        due = since + timeout
        if cycle.now < due:
            cycle.plan.wake_in((due - cycle.now).total_seconds() + 0.5)
            continue
        out[index] = _timed_out(member, verdict, len(gang), cycle.settings.gang_start_timeout_seconds)
    return out


def _waiting_since(cycle: Cycle, pod: Pod | None, verdict: Verdict) -> dt.datetime | None:
    """Since when this pending pod has waited for a node, or (bound) to start; None if it is not waiting."""
    if pod is None or verdict.state != PodState.PENDING:
        return None
    if verdict.reason == R.UNSCHEDULABLE:
        return _condition_since(pod, "PodScheduled", "False")
    if not node_name(pod):
        return None  # the scheduler has not decided yet
    bound = _condition_since(pod, "PodScheduled", "True")
    if bound is not None:
        return bound
    row = next((r for r in reversed(cycle.status.attempts) if r.attempt == cycle.status.attempt), None)
    return parse_iso(row.start_time) if row is not None and row.start_time else None


def _condition_since(pod: Pod, type_: str, status: str) -> dt.datetime | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == status and cond.get("lastTransitionTime"):
            return parse_iso(str(cond["lastTransitionTime"]))
    return None


def _timed_out(member: Member, verdict: Verdict, ranks: int, seconds: float) -> Verdict:
    who = f"pod {member.name}" if ranks == 1 else f"rank {member.rank} (pod {member.name})"
    held = "" if ranks == 1 else " while the other ranks held their nodes"
    if verdict.reason == R.UNSCHEDULABLE:
        reason = R.UNSCHEDULABLE if ranks == 1 else R.GANG_UNSCHEDULABLE
        return Verdict(PodState.NOT_STARTED, reason, f"{who} found no node for {seconds:.0f}s{held}: "
                                                     f"{verdict.message}")
    if verdict.reason in R.START_FAILURE_REASONS:
        return Verdict(PodState.FAILED, R.START_FAILED, f"{who} could not start for {seconds:.0f}s{held}: "
                                                        f"{verdict.reason}: {verdict.message}")
    return Verdict(PodState.NOT_STARTED, R.START_TIMEOUT, f"{who} was bound to node {node_name(member.pod)} and did "
                                                          f"not start for {seconds:.0f}s{held} ({verdict.reason}): "
                                                          f"{verdict.message}")
