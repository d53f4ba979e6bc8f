"""Kueue (v0.17, `kueue.x-k8s.io/v1beta2`) as the operator sees it: a TrainingJob labelled
`kueue.x-k8s.io/queue-name` is one Workload for its whole life. Kueue knows TrainingJob as an external framework
(`integrations.externalFrameworks: ["TrainingJob.v1alpha1.ckpt.dev"]`), so, as Kueue's own job controllers do, the
operator creates the Workload, starts pods only while it is admitted (with its flavors' node labels and
tolerations), stops them gracefully when Kueue evicts it and then gives the quota back, and marks it finished.

Pure functions: the Workload's name (Kueue's own algorithm), its body, what the planner reads of it, and the status
patches. The planner decides (kueue_policy); the actuator sends them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from . import reasons as R
from .builders import JobRef
from .models import TrainingJobSpec

GROUP: Final = "kueue.x-k8s.io"
VERSION: Final = "v1beta2"
WORKLOADS: Final = "workloads"
RESOURCE_FLAVORS: Final = "resourceflavors"
LABEL_QUEUE: Final = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY_CLASS: Final = "kueue.x-k8s.io/priority-class"
LABEL_JOB_UID: Final = "kueue.x-k8s.io/job-uid"
LABEL_PODSET: Final = "kueue.x-k8s.io/podset"
LABEL_LOCAL_QUEUE: Final = "kueue.x-k8s.io/local-queue-name"
LABEL_CLUSTER_QUEUE: Final = "kueue.x-k8s.io/cluster-queue-name"
ANNOTATION_WORKLOAD: Final = "kueue.x-k8s.io/workload"
FINALIZER: Final = "kueue.x-k8s.io/resource-in-use"
PODSET: Final = "main"
# what the operator publishes on the Workload for whoever chooses victims (a policy, a person, a future Kueue)
ANNOTATION_LAST_CHECKPOINT: Final = "ckpt.dev/last-checkpoint-time"
ANNOTATION_LAST_CHECKPOINT_STEP: Final = "ckpt.dev/last-checkpoint-step"

# Workload condition types and reasons (Kueue's own strings)
QUOTA_RESERVED: Final = "QuotaReserved"
ADMITTED: Final = "Admitted"
EVICTED: Final = "Evicted"
PODS_READY: Final = "PodsReady"
FINISHED: Final = "Finished"
REQUEUED: Final = "Requeued"
REQUEUE_ON: Final = frozenset({"Preempted", "NodeFailures"})  # evictions after which Kueue requeues at once


def workload_name(job: JobRef, kind: str = R.KIND, group: str = R.GROUP) -> str:
    """Kueue's name for a job's Workload (jobframework's GetWorkloadNameForOwnerWithGVK)."""
    digest = hashlib.sha1(f"{kind}\n{group}\n{job.name}\n{job.uid}".encode()).hexdigest()[:5]  # noqa: S324
    return f"{f'{kind.lower()}-{job.name}'[:253 - 1 - 5]}-{digest}"


def build_workload(job: JobRef, spec: TrainingJobSpec, queue: str, priority: tuple[str, str, int] | None
                   ) -> dict[str, Any]:
    """The Workload of a job: one pod set of `workers` pods of the job's template (what Kueue counts quota by).
    `priority`: (kind, name, value) of its WorkloadPriorityClass or PriorityClass, if it has one."""
    template = spec.template
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Workload",
        "metadata": {"name": workload_name(job), "namespace": job.namespace, "labels": {LABEL_JOB_UID: job.uid},
                     "finalizers": [FINALIZER],
                     "ownerReferences": [{"apiVersion": f"{R.GROUP}/{R.VERSION}", "kind": R.KIND, "name": job.name,
                                          "uid": job.uid, "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"queueName": queue, "active": not spec.suspend,
                 "podSets": [{"name": PODSET, "count": spec.worker_range()[1], **_min_count(spec),
                              "template": {"metadata": {k: v for k, v in (template.get("metadata") or {}).items()
                                                        if k in ("labels", "annotations")},
                                           "spec": template["spec"]}}]},
    }
    if priority is not None:
        kind, name, value = priority
        group = GROUP if kind == "WorkloadPriorityClass" else "scheduling.k8s.io"
        body["spec"]["priorityClassRef"] = {"group": group, "kind": kind, "name": name}
        body["spec"]["priority"] = value
    return body


@dataclass(frozen=True)
class Placement:
    """What an admission puts into the pods: its flavors' node labels and tolerations, and Kueue's labels."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkloadView:
    """What the planner reads of a job's Workload."""

    name: str
    resource_version: str
    active: bool
    conditions: tuple[dict[str, Any], ...]
    cluster_queue: str | None  # set while it holds quota (status.admission)
    flavors: tuple[str, ...]  # the ResourceFlavors its pod set was assigned
    finalized: bool  # our finalizer is gone (nothing more to do on it)
    annotations: Mapping[str, str] = field(default_factory=dict)
    admitted_count: int | None = None  # the pods its admission holds quota for (fewer than asked: partial)
    finalizers: tuple[str, ...] = ()  # as last watched: releasing ours is one conditional patch, no GET

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.conditions if c.get("type") == type_), None)

    def true(self, type_: str) -> bool:
        found = self.condition(type_)
        return found is not None and found.get("status") == "True"

    @property
    def admitted(self) -> bool:
        """Admitted, and not evicted since: pods may run."""
        return self.true(ADMITTED) and not self.evicted

    @property
    def evicted(self) -> tuple[str, str] | None:
        """(reason, message) of an eviction Kueue asked for, while the workload still holds its quota."""
        found = self.condition(EVICTED)
        if found is None or found.get("status") != "True" or self.cluster_queue is None:
            return None
        return str(found.get("reason") or "Evicted"), str(found.get("message") or "")

    @property
    def finished(self) -> bool:
        return self.true(FINISHED)

    @property
    def waiting(self) -> str:
        """Why it is not admitted yet, as Kueue says it (its QuotaReserved condition's message)."""
        found = self.condition(QUOTA_RESERVED)
        message = str((found or {}).get("message") or "")
        return message or "waiting for Kueue to admit the workload"


def _min_count(spec: TrainingJobSpec) -> dict[str, int]:
    """An elastic gang asks Kueue for partial admission: any count from workers.min up (quota permitting)."""
    low, high = spec.worker_range()
    return {"minCount": low} if spec.elastic and low < high else {}


def view(workload: Mapping[str, Any]) -> WorkloadView:
    meta, spec, status = workload.get("metadata") or {}, workload.get("spec") or {}, workload.get("status") or {}
    admission = status.get("admission") or None
    assignments = (admission or {}).get("podSetAssignments") or []
    flavors = tuple(sorted({str(f) for a in assignments for f in (a.get("flavors") or {}).values()}))
    return WorkloadView(name=str(meta.get("name")), resource_version=str(meta.get("resourceVersion") or ""),
                        active=spec.get("active", True) is not False,
                        conditions=tuple(dict(c) for c in status.get("conditions") or []),
                        cluster_queue=str(admission["clusterQueue"]) if admission else None, flavors=flavors,
                        finalized=FINALIZER not in (meta.get("finalizers") or []),
                        annotations=dict(meta.get("annotations") or {}),
                        admitted_count=int(assignments[0]["count"]) if assignments and "count" in assignments[0]
                        else None, finalizers=tuple(meta.get("finalizers") or ()))


def placement(workload: WorkloadView, flavors: Mapping[str, Mapping[str, Any]], queue: str) -> Placement:
    """The pods' placement from an admission (jobframework's PodSetInfo): the union of the assigned flavors' node
    labels, their tolerations, and Kueue's pod labels and annotation."""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    for name in workload.flavors:
        flavor = flavors.get(name) or {}
        node_selector.update({str(k): str(v) for k, v in (flavor.get("nodeLabels") or {}).items()})
        tolerations += [dict(t) for t in flavor.get("tolerations") or [] if dict(t) not in tolerations]
    labels = {LABEL_PODSET: PODSET, LABEL_LOCAL_QUEUE: queue}
    if workload.cluster_queue:
        labels[LABEL_CLUSTER_QUEUE] = workload.cluster_queue
    return Placement(node_selector, tuple(tolerations), labels, {ANNOTATION_WORKLOAD: workload.name})


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _set(conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str,
         now: dt.datetime) -> list[dict[str, Any]]:
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    if old is not None and (old.get("status"), old.get("reason"), old.get("message")) == (value, reason, message):
        return conditions
    since = old.get("lastTransitionTime") if old is not None and old.get("status") == value else _stamp(now)
    new = {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": since}
    return [c for c in conditions if c.get("type") != type_] + [new]


def release_patch(workload: WorkloadView, now: dt.datetime) -> dict[str, Any]:
    """Give an evicted (or deactivated) workload's quota back once its pods are gone (jobframework: requeued
    condition, then UnsetQuotaReservationWithCondition): a merge patch of /status."""
    reason, message = workload.evicted or ("Pending", "")
    conditions = list(workload.conditions)
    conditions = _set(conditions, REQUEUED, reason in REQUEUE_ON, reason, message, now)
    conditions = _set(conditions, QUOTA_RESERVED, False, "Pending", message, now)
    conditions = _set(conditions, ADMITTED, False, "NoReservation", "The workload has no reservation", now)
    return {"metadata": {"resourceVersion": workload.resource_version},
            "status": {"admission": None, "conditions": conditions}}


def pods_ready_patch(workload: WorkloadView, ready: bool, now: dt.datetime) -> dict[str, Any] | None:
    """PodsReady (what waitForPodsReady waits for): None when it already says so."""
    old = workload.condition(PODS_READY)
    if ready:
        recovering = old is not None and old.get("reason") in ("WaitForRecovery", "Recovered")
        wanted = ("True", "Recovered" if recovering else "Started", "All pods reached readiness and the workload "
                                                                    "is running")
    elif old is not None and old.get("status") == "True":
        wanted = ("False", "WaitForRecovery", "At least one pod has failed, waiting for recovery")
    else:
        wanted = ("False", "WaitForStart", "Not all pods are ready or succeeded")
    if old is not None and (old.get("status"), old.get("reason")) == wanted[:2]:
        return None
    conditions = _set(list(workload.conditions), PODS_READY, wanted[0] == "True", wanted[1], wanted[2], now)
    return {"metadata": {"resourceVersion": workload.resource_version}, "status": {"conditions": conditions}}


def finish_patch(workload: WorkloadView, succeeded: bool, message: str, now: dt.datetime) -> dict[str, Any]:
    conditions = _set(list(workload.conditions), FINISHED, True, "Succeeded" if succeeded else "Failed",
                      message[:1000], now)
    return {"metadata": {"resourceVersion": workload.resource_version}, "status": {"conditions": conditions}}


def queue_of(labels: Mapping[str, str]) -> str | None:
    return labels.get(LABEL_QUEUE) or None


def apply_placement(template: Mapping[str, Any], where: Placement) -> dict[str, Any]:
    """The pod template with an admission's placement merged in (podset.Merge): node labels added to the node
    selector, tolerations appended, Kueue's labels and annotation added."""
    merged: dict[str, Any] = {**template, "metadata": dict(template.get("metadata") or {}),
                              "spec": dict(template["spec"])}
    meta, spec = merged["metadata"], merged["spec"]
    meta["labels"] = {**(meta.get("labels") or {}), **where.labels}
    meta["annotations"] = {**(meta.get("annotations") or {}), **where.annotations}
    if where.node_selector:
        spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **where.node_selector}
    if where.tolerations:
        known = list(spec.get("tolerations") or [])
        spec["tolerations"] = known + [t for t in where.tolerations if t not in known]
    return merged
