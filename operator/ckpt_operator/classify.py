"""Decides how an attempt's pod stands: running, or ended as success, preemption or application failure."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ckpt_sdk.contract import EXIT_PREEMPTED, ExitReason, TerminationMessage

from . import reasons as R


class PodState(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    TERMINATING = "Terminating"  # being deleted, has not stopped yet: never start the next attempt now
    NODE_LOST = "NodeLost"  # its node is gone, out of service or unreachable past the timeout: force-delete it
    SUCCEEDED = "Succeeded"
    PREEMPTED = "Preempted"
    FAILED = "Failed"
    NOT_STARTED = "NotStarted"  # never started in time (decided by the start policy, not read off the pod)

    @property
    def ended(self) -> bool:
        return self in (PodState.SUCCEEDED, PodState.PREEMPTED, PodState.FAILED, PodState.NOT_STARTED)


@dataclass(frozen=True)
class Verdict:
    state: PodState
    reason: str
    message: str = ""
    exit_code: int | None = None
    checkpoint_step: int | None = None
    checkpoint_time: str | None = None
    report: TerminationMessage | None = None  # the SDK's termination message, if the trainer left one


@dataclass(frozen=True)
class NodeInfo:
    """What the planner knows of the node a pod is bound to (from the Node object, or its absence)."""

    name: str
    exists: bool = True
    ready: bool = True
    not_ready_since: dt.datetime | None = None  # the Ready condition's lastTransitionTime when it is not True
    out_of_service: bool = False  # node.kubernetes.io/out-of-service: the admin says the node is gone
    taints: tuple[tuple[str, str | None], ...] = ()  # (key, timeAdded) of each taint: interruption notices
    # what an elastic gang's size is judged by (elastic_policy.rank_slots)
    schedulable: bool = True  # not cordoned (spec.unschedulable)
    blocking: tuple[tuple[str, str], ...] = ()  # (key, value) of each NoSchedule/NoExecute taint
    labels: tuple[tuple[str, str], ...] = ()
    allocatable: tuple[tuple[str, str], ...] = ()

    def notice(self, notice_taints: Mapping[str, float]) -> tuple[str, float, dt.datetime | None] | None:
        """The first interruption-notice taint on the node: (key, seconds of notice, when it was added if known)."""
        for key, added in self.taints:
            if key in notice_taints:
                when = dt.datetime.fromisoformat(added.replace("Z", "+00:00")) if added else None
                return key, notice_taints[key], when
        return None

    def lost(self, now: dt.datetime, timeout_seconds: float) -> bool:
        """Lost: deleted, marked out of service, or not Ready for longer than the timeout. A shorter NotReady
        blip (missed heartbeats, a container runtime restart) is not: the pod may still be running."""
        if not self.exists or self.out_of_service:
            return True
        if self.ready or self.not_ready_since is None:
            return False
        return (now - self.not_ready_since).total_seconds() >= timeout_seconds

    def lost_at(self, timeout_seconds: float) -> dt.datetime | None:
        """When an unreachable node will count as lost (None if it is Ready)."""
        if self.ready or self.not_ready_since is None:
            return None
        return self.not_ready_since + dt.timedelta(seconds=timeout_seconds)


def _disruption(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return dict(cond)
    return None


def terminated(pod: dict[str, Any], container: str) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            return (cs.get("state") or {}).get("terminated")
    return None


def _waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """The first container waiting for a reason other than plain start-up (ImagePullBackOff, ...)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] not in ("ContainerCreating", "PodInitializing"):
            return str(waiting["reason"]), f"container {cs.get('name')}: {waiting.get('message', '')}".strip()
    return None


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable":
            return str(cond.get("message") or "no node fits the pod")
    return None


def report_of(pod: dict[str, Any], container: str) -> TerminationMessage | None:
    """The SDK's termination message of this pod's trainer (None if it left none: killed, lost, not the SDK)."""
    return TerminationMessage.parse((terminated(pod, container) or {}).get("message"))


def classify(pod: dict[str, Any], container: str, node_lost: bool = False) -> Verdict:
    """Classify one attempt's pod; `node_lost` says its node counts as lost (see NodeInfo.lost)."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    deleting = (pod.get("metadata") or {}).get("deletionTimestamp") is not None
    disruption = _disruption(pod)
    term = terminated(pod, container)
    if phase in ("Succeeded", "Failed") or term is not None:
        return _ended(status, phase, term, disruption, deleting)
    if node_lost and phase in ("Running", "Pending") and (pod.get("spec") or {}).get("nodeName"):
        return Verdict(PodState.NODE_LOST, R.NODE_LOST, f"node {pod['spec']['nodeName']} is lost")
    if deleting:
        return Verdict(PodState.TERMINATING, disruption.get("reason", R.POD_DELETED) if disruption else R.POD_DELETED)
    if phase == "Running":
        return Verdict(PodState.RUNNING, R.POD_RUNNING)
    return _pending(pod)


def _pending(pod: dict[str, Any]) -> Verdict:
    """Why a pod is not running yet: no node fits it, a container waits (ImagePullBackOff...), or plain start-up."""
    unschedulable = _unschedulable(pod)
    if unschedulable is not None:
        return Verdict(PodState.PENDING, R.UNSCHEDULABLE, unschedulable)
    waiting = _waiting(pod)
    if waiting is not None:
        return Verdict(PodState.PENDING, waiting[0], waiting[1])
    return Verdict(PodState.PENDING, R.PODS_STARTING)


def _ended(status: dict[str, Any], phase: str, term: dict[str, Any] | None, disruption: dict[str, Any] | None,
           deleting: bool) -> Verdict:
    """How an ended pod ended: success, a preemption (it was taken away), or an application failure."""
    code = term.get("exitCode") if term else None
    raw = (term or {}).get("message")
    report = TerminationMessage.parse(raw)
    said = report.reason if report is not None else None
    pod_reason = status.get("reason") or ""
    interrupted = disruption is not None or pod_reason in R.NODE_TERMINATION_REASONS or deleting
    found: tuple[PodState, str, str] | None
    if term is None and phase == "Failed" and _is_admission_rejection(pod_reason):
        # no container ever ran: the node refused the pod (a device plugin restarting, resources gone)
        found = (PodState.PREEMPTED, R.ADMISSION_REJECTED, f"{pod_reason}: {status.get('message', '')}".strip())
    elif code == 0 and not (interrupted and said != ExitReason.EXIT.value):
        found = (PodState.SUCCEEDED, R.COMPLETED, "the trainer exited 0")
    else:
        found = _taken(status, code, said, disruption, deleting) or _failed(status, term, code, raw, report)
    state, reason, message = found
    return Verdict(state, reason, message, code, report.step if report else None, report.time if report else None,
                   report)


def _taken(status: dict[str, Any], code: int | None, said: str | None, disruption: dict[str, Any] | None,
           deleting: bool) -> tuple[PodState, str, str] | None:
    """The pod was taken away (a preemption), if anything says so; a slot's end first: a gang's rank the operator
    is stopping may have ended its slot on its own before."""
    pod_reason = status.get("reason") or ""
    if pod_reason == R.DEADLINE_EXCEEDED or (code == EXIT_PREEMPTED and said == ExitReason.DEADLINE.value):
        ahead = " after the SDK checkpointed ahead of it" if said == ExitReason.DEADLINE.value else ""
        return PodState.PREEMPTED, R.DEADLINE_EXCEEDED, f"the time-limited slot (activeDeadlineSeconds) ended{ahead}"
    if disruption is not None:
        return (PodState.PREEMPTED, str(disruption.get("reason") or R.UNKNOWN_DISRUPTION),
                str(disruption.get("message", "")))
    if pod_reason in R.NODE_TERMINATION_REASONS:
        return PodState.PREEMPTED, R.NODE_TERMINATION_REASONS[pod_reason], str(status.get("message", ""))
    if deleting:
        return PodState.PREEMPTED, R.POD_DELETED, "the pod was deleted while running"
    return None


def _failed(status: dict[str, Any], term: dict[str, Any] | None, code: int | None, raw: str | None,
            report: TerminationMessage | None) -> tuple[PodState, str, str]:
    if code == EXIT_PREEMPTED:
        return (PodState.FAILED, R.UNEXPLAINED_SIGTERM,
                "the trainer exited 143 after a SIGTERM that no deletion or disruption explains (a liveness probe, "
                "or the trainer signalling itself?)")
    reason = (term or {}).get("reason") or status.get("reason") or "Error"
    detail = (report.error or "") if report is not None else (raw or status.get("message") or "")
    return (PodState.FAILED, R.APPLICATION_FAILURE,
            f"the trainer exited {code} ({reason}){': ' + detail[-300:] if detail else ''}")


def _is_admission_rejection(reason: str) -> bool:
    return reason in R.ADMISSION_REASONS or (reason.startswith("OutOf") and len(reason) > 5)
