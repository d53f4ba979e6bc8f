"""Decides how an attempt's pod stands: running, or ended as success, preemption or application failure."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import reasons as R

PREEMPTED_EXIT_CODE = 143
KILLED_EXIT_CODE = 137


class PodState(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    TERMINATING = "Terminating"  # being deleted, has not stopped yet: never start the next attempt now
    NODE_LOST = "NodeLost"  # its node stopped reporting: the operator force-deletes it
    SUCCEEDED = "Succeeded"
    PREEMPTED = "Preempted"
    FAILED = "Failed"

    @property
    def ended(self) -> bool:
        return self in (PodState.SUCCEEDED, PodState.PREEMPTED, PodState.FAILED)


@dataclass(frozen=True)
class Verdict:
    state: PodState
    reason: str
    message: str = ""
    exit_code: int | None = None
    checkpoint_step: int | None = None
    checkpoint_time: str | None = None


def _disruption(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return dict(cond)
    return None


def _terminated(pod: dict[str, Any], container: str) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            return (cs.get("state") or {}).get("terminated")
    return None


def termination_checkpoint(message: str | None) -> tuple[int | None, str | None]:
    """The SDK's termination message: {"step": N, "time": ...}; anything else yields (None, None)."""
    try:
        data = json.loads(message or "")
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    step = data.get("step")
    time = data.get("time")
    return (step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None,
            time if isinstance(time, str) else None)


def classify(pod: dict[str, Any], container: str, node_ready: bool | None) -> Verdict:
    """Classify one attempt's pod. `node_ready` is the Ready condition of its node (None: unknown/no node)."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    deleting = (pod.get("metadata") or {}).get("deletionTimestamp") is not None
    disruption = _disruption(pod)
    term = _terminated(pod, container)
    if phase in ("Succeeded", "Failed") or term is not None:
        code = term.get("exitCode") if term else None
        step, time = termination_checkpoint(term.get("message") if term else None)
        msg = (term or {}).get("message") or status.get("message") or ""
        if phase == "Succeeded" or (code == 0 and phase != "Failed"):
            return Verdict(PodState.SUCCEEDED, R.COMPLETED, "the trainer exited 0", 0, step, time)
        if disruption and disruption.get("reason") in R.DISRUPTION_REASONS:
            return Verdict(PodState.PREEMPTED, str(disruption["reason"]), str(disruption.get("message", "")), code,
                           step, time)
        if code == PREEMPTED_EXIT_CODE:
            return Verdict(PodState.PREEMPTED, R.EXIT_AFTER_SIGTERM,
                           "the trainer checkpointed on SIGTERM and exited 143", code, step, time)
        if deleting:
            return Verdict(PodState.PREEMPTED, R.POD_DELETED, "the pod was deleted while running", code, step, time)
        reason = (term or {}).get("reason") or status.get("reason") or "Error"
        return Verdict(PodState.FAILED, R.APPLICATION_FAILURE,
                       f"the trainer exited {code} ({reason}){': ' + msg[-300:] if msg and step is None else ''}",
                       code, step, time)
    if node_ready is False and status.get("phase") in ("Running", "Pending") and pod.get("spec", {}).get("nodeName"):
        return Verdict(PodState.NODE_LOST, R.NODE_LOST, f"node {pod['spec']['nodeName']} stopped reporting")
    if deleting:
        return Verdict(PodState.TERMINATING, disruption.get("reason", R.POD_DELETED) if disruption else R.POD_DELETED)
    if phase == "Running":
        return Verdict(PodState.RUNNING, R.POD_RUNNING)
    return Verdict(PodState.PENDING, R.PODS_STARTING)
