"""What the operator knows from its watch streams: trimmed objects for its stores and kopf's in-memory indexes, read
through one `Cache`, plus the expectations that cover the gap between a write and the watch event that reports it."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from . import reasons as R
from .classify import NodeInfo

EXPECTATION_SECONDS = 30.0  # how long a write the watch has not reported yet stands in for it


class IndexLike(Protocol):
    """The read side of a kopf index: key -> the values indexed under it."""

    def __contains__(self, key: object) -> bool: ...

    def __getitem__(self, key: Any) -> Iterable[Any]: ...


CONDITION_KEYS = ("type", "status", "reason", "message", "lastTransitionTime")
# the pod conditions the planner reads (classify, startup_policy): a flip of Ready or ContainersReady is no news
POD_CONDITIONS = ("PodScheduled", "DisruptionTarget")


def interned(value: Any) -> Any:
    """A copy of a JSON value whose strings are interned (see `interned_dict`)."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict | Mapping):  # kopf's views are Mappings: copied like dicts
        return interned_dict(value)
    if isinstance(value, list | tuple):
        return [interned(item) for item in value]
    return value


def interned_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a JSON object whose strings are interned: each watch event is parsed on its own, so every object
    kept in an index would otherwise hold its own copy of every key ("lastTransitionTime", ...) and of every
    repeated value ("True", a phase, a timestamp). Halves the indexes' memory at thousands of jobs."""
    return {sys.intern(str(key)): interned(item) for key, item in value.items()}


def trim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a pod the planner reads (keeps the index small at thousands of pods), strings interned."""
    meta = body.get("metadata") or {}
    return interned_dict({
        "metadata": {key: meta[key] for key in ("name", "namespace", "uid", "labels", "ownerReferences",
                                                "finalizers", "creationTimestamp", "deletionTimestamp",
                                                "resourceVersion")
                     if meta.get(key) is not None},
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
        "status": _trim_pod_status(body.get("status") or {}),
    })


def _trim_pod_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """What the planner reads of a pod's status: its phase, reason and message, its scheduling and disruption
    conditions, and each container's name and state (not images, IDs, resources, mounts, readiness: most of a pod's
    status, kept for thousands of pods; and a change of those wakes nobody)."""
    trimmed: dict[str, Any] = {key: status[key] for key in ("phase", "reason", "message") if key in status}
    conditions = [{key: condition[key] for key in CONDITION_KEYS if key in condition}
                  for condition in status.get("conditions") or () if condition.get("type") in POD_CONDITIONS]
    if conditions:
        trimmed["conditions"] = conditions
    if status.get("containerStatuses"):
        trimmed["containerStatuses"] = [{key: container[key] for key in ("name", "state") if key in container}
                                        for container in status["containerStatuses"]]
    return trimmed


def trim_job(body: Mapping[str, Any]) -> dict[str, Any]:
    """A TrainingJob as the planner reads it (kopf's bodies are live views: take a copy), strings interned."""
    meta = body.get("metadata") or {}
    return interned_dict({
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {**{key: meta[key] for key in ("name", "namespace", "uid", "generation", "resourceVersion",
                                                   "creationTimestamp", "deletionTimestamp") if key in meta},
                     "annotations": {key: value for key, value in (meta.get("annotations") or {}).items()
                                     if key.startswith(f"{R.GROUP}/")},  # the plugin's requests only
                     "labels": {key: value for key, value in (meta.get("labels") or {}).items()
                                if key.startswith("kueue.x-k8s.io/")}},  # its queue and priority class
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    })


def trim_workload(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Kueue Workload as the planner reads it (see kueue.view), strings interned."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return interned_dict({
        "metadata": {**{key: meta[key] for key in ("name", "namespace", "uid", "resourceVersion", "finalizers")
                        if key in meta},
                     "annotations": {key: value for key, value in (meta.get("annotations") or {}).items()
                                     if key.startswith(f"{R.GROUP}/")}},
        "spec": {"active": (body.get("spec") or {}).get("active", True)},
        "status": {"conditions": status.get("conditions") or [],
                   "admission": status.get("admission") or None},
    })


def controller_uid(pod: Mapping[str, Any]) -> str | None:
    """The uid of the pod's controlling owner, if it has one."""
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def owned_by_job(pod: Mapping[str, Any]) -> str | None:
    """The TrainingJob uid a pod belongs to: labelled with it *and* controlled by it (never by name alone)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    uid = labels.get(R.LABEL_JOB_UID)
    return uid if uid and controller_uid(pod) == uid else None


def node_info(node: Mapping[str, Any]) -> NodeInfo:
    """NodeInfo from a Node object (as a dict)."""
    ready = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    is_ready = ready is None or ready.get("status") == "True"
    since = None
    if not is_ready and ready is not None and ready.get("lastTransitionTime"):
        since = dt.datetime.fromisoformat(str(ready["lastTransitionTime"]).replace("Z", "+00:00"))
    spec = node.get("spec") or {}
    taints = spec.get("taints") or []
    return NodeInfo(str(node["metadata"]["name"]), ready=is_ready, not_ready_since=since,
                    out_of_service=any(t.get("key") == R.TAINT_OUT_OF_SERVICE for t in taints),
                    taints=tuple((str(t.get("key") or ""), t.get("timeAdded")) for t in taints),
                    schedulable=not spec.get("unschedulable"),
                    blocking=tuple((str(t.get("key") or ""), str(t.get("value") or "")) for t in taints
                                   if t.get("effect") in ("NoSchedule", "NoExecute")),
                    labels=tuple(sorted(((node.get("metadata") or {}).get("labels") or {}).items())),
                    allocatable=tuple(sorted(((node.get("status") or {}).get("allocatable") or {}).items())))


def resource_version(body: Mapping[str, Any] | None) -> int:
    """The resourceVersion as a number, to tell the newer of two copies of one object (-1 if unknown)."""
    try:
        return int(((body or {}).get("metadata") or {}).get("resourceVersion") or -1)
    except (TypeError, ValueError):
        return -1


def _first(index: IndexLike, key: str) -> Any | None:
    return next(iter(index[key]), None) if key in index else None


PRUNED_RECHECK_SECONDS = 600.0  # how long a status the API server pruned is not written again


@dataclass
class Expectations:
    """Writes of one job the watches have not reported yet (like the Job controller's expectations)."""

    job: dict[str, Any] | None = None  # the job as the last status write returned it
    # (status we wrote, status the API server kept): an older CRD prunes fields it does not know; writing the same
    # status again would only be pruned again, in a loop at the speed of the watch
    # (until a re-check: the CRD may have been upgraded since)
    pruned: tuple[dict[str, Any], dict[str, Any]] | None = None
    pruned_at: float = 0.0

    def already_pruned(self, new: dict[str, Any], old: dict[str, Any]) -> bool:
        """`new` was written before and the server kept `old` of it: no use writing it again for a while."""
        return self.pruned == (new, old) and time.monotonic() - self.pruned_at < PRUNED_RECHECK_SECONDS
    pods: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)  # name -> (created at, pod)

    def created(self, pod: Mapping[str, Any]) -> None:
        self.pods[pod["metadata"]["name"]] = (time.monotonic(), trim_pod(pod))

    def newer_job(self, watched: dict[str, Any] | None) -> dict[str, Any] | None:
        """The watched job, unless our own last write is newer than what the watch delivered so far."""
        if watched is not None and self.job is not None and resource_version(self.job) > resource_version(watched):
            return self.job
        return watched

    def newest_job(self, watched: dict[str, Any] | None) -> dict[str, Any] | None:
        """`newer_job`, forgetting our write once the watch has delivered it (or the job is gone)."""
        newest = self.newer_job(watched)
        if newest is watched:
            self.job = None
        return newest

    def merge_pods(self, watched: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The watched pods plus the ones we created that the watch has not delivered yet. Never dropped for time
        alone: a watch can lag minutes behind a busy operator (see `unconfirmed`)."""
        names = {pod["metadata"]["name"] for pod in watched}
        for name in [name for name in self.pods if name in names]:
            del self.pods[name]
        return watched + [pod for _, pod in self.pods.values()]

    def unconfirmed(self, name: str) -> bool:
        """A pod we created that the watch has not reported for a while: read it once before trusting it (it may
        have been deleted before the watch saw it) or taking its absence for a preemption."""
        entry = self.pods.get(name)
        return entry is not None and time.monotonic() - entry[0] > EXPECTATION_SECONDS

    def confirm(self, name: str, pod: Mapping[str, Any] | None) -> None:
        """What a read of an unconfirmed pod found: the pod (trust it a while longer) or nothing (forget it)."""
        if pod is None:
            self.pods.pop(name, None)
        else:
            self.created(pod)


GROWABLE = "growable"  # a key of the jobs index (never a uid nor a namespace/name key)


def growable(job: Mapping[str, Any]) -> bool:
    """An elastic gang running below its most ranks."""
    workers = (job.get("spec") or {}).get("workers")
    size = (job.get("status") or {}).get("worldSize")
    return isinstance(workers, dict) and isinstance(size, int) and size < int(workers.get("max") or 0)


@dataclass
class Cache:
    """Reads of what the watches keep: jobs by uid (and by name, and the elastic gangs that may grow: jobwatch's
    store), pods by their job's uid (podwatch's store), nodes by name (a kopf index, like Kueue's objects; bound by
    the first kopf handler call, which kopf makes only once its indexes are filled)."""

    jobs: IndexLike
    pods: IndexLike
    nodes: IndexLike
    pods_synced: asyncio.Event | None = None  # set once the pod watch listed every pod (None: always)
    jobs_synced: asyncio.Event | None = None  # set once the job watch listed every TrainingJob (None: always)
    indexes_ready: asyncio.Event | None = None  # set once kopf's indexes are bound (None: always)

    async def synced(self) -> None:
        """Wait until the pods and the jobs are listed and kopf's indexes filled: a pod missing from the store would
        be taken for a lost one, a job missing for a deleted one."""
        for event in (self.pods_synced, self.jobs_synced, self.indexes_ready):
            if event is not None:
                await event.wait()

    def is_synced(self) -> bool:
        return all(event is None or event.is_set() for event in (self.pods_synced, self.jobs_synced,
                                                                  self.indexes_ready))

    def job(self, uid: str) -> dict[str, Any] | None:
        return _first(self.jobs, uid)

    def job_pods(self, uid: str) -> list[dict[str, Any]]:
        return list(self.pods[uid]) if uid in self.pods else []

    deleted_nodes: set[str] = field(default_factory=set)  # seen deleted (or answered 404): no GET for them again
    node_generation: int = 0  # raised at every node change the planner can see (node_event)
    capacity_memo: dict[tuple[int, str], int] = field(default_factory=dict)  # (generation, template key) -> ranks
    claims_seen: dict[tuple[str, str], float] = field(default_factory=dict)  # (namespace, claim) -> when it was read

    def node(self, name: str) -> NodeInfo | None:
        """The node's state; a gone node if it was deleted; None if the watch never told of it."""
        info = _first(self.nodes, name)
        if info is None and name in self.deleted_nodes:
            return NodeInfo(name, exists=False, ready=False)
        return cast(NodeInfo | None, info)

    def all_nodes(self) -> list[NodeInfo]:
        """Every node the watch knows of."""
        return [info for key in list(cast(Any, self.nodes)) for info in self.nodes[key]]

    def job_uids_on(self, node_name: str) -> set[str]:
        """The jobs with a pod bound to the node (a scan of the pods: node changes that matter are rare)."""
        return {uid for uid in list(cast(Any, self.pods)) for pod in self.pods[uid]
                if (pod.get("spec") or {}).get("nodeName") == node_name}

    def growable(self) -> set[str]:
        """The uids of elastic gangs running below their most ranks (any node's change may let them grow)."""
        return {str(job["metadata"]["uid"]) for job in self.jobs[GROWABLE]} if GROWABLE in self.jobs else set()

    def job_by_name(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A job by name (for a resumeFrom source): the jobs index also keys each job by `name_key()`."""
        return _first(self.jobs, name_key(namespace, name))

    workloads: IndexLike | None = None  # Kueue Workloads by the uid of the TrainingJob that owns them (Kueue on)
    flavors: IndexLike | None = None  # Kueue ResourceFlavors' specs by name

    @property
    def kueue(self) -> bool:
        return self.workloads is not None

    def workload(self, uid: str) -> dict[str, Any] | None:
        return _first(self.workloads, uid) if self.workloads is not None else None

    def flavor_specs(self) -> dict[str, dict[str, Any]]:
        if self.flavors is None:
            return {}
        return {str(key): dict(next(iter(self.flavors[key]), {})) for key in list(cast(Any, self.flavors))}


def name_key(namespace: str, name: str) -> str:
    """The jobs-index key of a job's name (uids never contain a slash)."""
    return f"{namespace}/{name}"
