"""kopf wiring: job and pod events wake one worker task per TrainingJob, which runs reconcile.plan().

Handlers stay thin: they parse the body into the models, fetch what the planner needs, and apply its plan
(create the pod, then write the status, then delete the old pod) so a crash between steps is always recoverable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from . import metrics
from . import reasons as R
from .builders import JobRef, ResumeSource, pod_name
from .classify import NodeInfo
from .errors import InvalidSpecError
from .models import TrainingJobSpec, TrainingJobStatus
from .reconcile import Observed, Plan, Settings, plan

log = logging.getLogger("ckpt_operator")


@dataclass
class Api:
    core: client.CoreV1Api
    custom: client.CustomObjectsApi

    @classmethod
    def connect(cls) -> Api:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        return cls(client.CoreV1Api(), client.CustomObjectsApi())


def settings_from_env() -> Settings:
    return Settings(
        backoff_base_seconds=float(os.environ.get("CKPT_OPERATOR_BACKOFF_BASE_SECONDS", "10")),
        backoff_cap_seconds=float(os.environ.get("CKPT_OPERATOR_BACKOFF_CAP_SECONDS", "300")),
        node_lost_seconds=float(os.environ.get("CKPT_OPERATOR_NODE_LOST_SECONDS", "300")),
    )


def _get(fn: Any, *args: Any) -> Any:
    """Call a read API; None on 404."""
    try:
        return fn(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _node_info(api: Api, pod: dict[str, Any] | None) -> NodeInfo | None:
    node_name = ((pod or {}).get("spec") or {}).get("nodeName")
    if not node_name:
        return None
    node = _get(api.core.read_node, node_name)
    if node is None:
        return NodeInfo(node_name, exists=False, ready=False)  # the node object is gone: nothing will report
    return node_info(api.core.api_client.sanitize_for_serialization(node))


def node_info(node: Mapping[str, Any]) -> NodeInfo:
    """NodeInfo from a Node object (as a dict)."""
    ready = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    is_ready = ready is None or ready.get("status") == "True"
    since = None
    if not is_ready and ready is not None and ready.get("lastTransitionTime"):
        since = dt.datetime.fromisoformat(str(ready["lastTransitionTime"]).replace("Z", "+00:00"))
    taints = (node.get("spec") or {}).get("taints") or []
    return NodeInfo(str(node["metadata"]["name"]), ready=is_ready, not_ready_since=since,
                    out_of_service=any(t.get("key") == R.TAINT_OUT_OF_SERVICE for t in taints))


def _check_storage(api: Api, namespace: str, spec: TrainingJobSpec) -> tuple[InvalidSpecError | None,
                                                                             ResumeSource | None]:
    """Resolve what a new pod needs: the claim exists, and the resumeFrom source job exists."""
    pvc = spec.checkpoint.persistent_volume_claim
    if pvc is not None and _get(api.core.read_namespaced_persistent_volume_claim, pvc.claim_name, namespace) is None:
        return InvalidSpecError(R.CLAIM_NOT_FOUND, f'persistentvolumeclaim "{pvc.claim_name}" not found in '
                                                   f'namespace "{namespace}"; create it and the job will start'), None
    if spec.resume_from is None:
        return None, None
    source = _get(api.custom.get_namespaced_custom_object, R.GROUP, R.VERSION, namespace, R.PLURAL,
                  spec.resume_from.training_job)
    if source is None:
        return InvalidSpecError(R.RESUME_SOURCE_NOT_FOUND,
                                f'resumeFrom: TrainingJob "{spec.resume_from.training_job}" not found'), None
    source_spec = TrainingJobSpec.model_validate(source["spec"])
    return None, ResumeSource(spec.resume_from.training_job, source_spec.checkpoint, spec.resume_from.step)


def _status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning `old` into `new` (keys that disappeared become null)."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    patch.update({k: v for k, v in new.items() if old.get(k) != v})
    return patch


def job_pods(api: Api, namespace: str, uid: str) -> list[dict[str, Any]]:
    """The pods this job controls: labelled with its uid *and* owned by it (never matched by name alone)."""
    pods = api.core.list_namespaced_pod(namespace, label_selector=f"{R.LABEL_JOB_UID}={uid}").items
    owned = []
    for pod in pods:
        body = api.core.api_client.sanitize_for_serialization(pod)
        refs = (body.get("metadata") or {}).get("ownerReferences") or []
        if any(ref.get("uid") == uid and ref.get("controller") for ref in refs):
            owned.append(body)
    return owned


def _attempt_of(pod: dict[str, Any]) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(R.LABEL_ATTEMPT, "-1"))
    except ValueError:
        return -1


def sweep_old_attempts(api: Api, pods: list[dict[str, Any]], status: TrainingJobStatus) -> None:
    """Pods of earlier attempts (left by a crash between two API calls): stop them if alive, release them."""
    for pod in pods:
        attempt = _attempt_of(pod)
        if attempt >= status.attempt:
            continue
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") is None and (pod.get("status") or {}).get("phase") not in (
                "Succeeded", "Failed"):
            log.warning("%s/%s: pod of attempt %d is still alive after attempt %d started; deleting it",
                        meta["namespace"], meta["name"], attempt, status.attempt)
            _delete_pod(api, meta["name"], meta["namespace"], 0)
        release_pod(api, pod)


def _delete_pod(api: Api, name: str, namespace: str, grace: int) -> None:
    try:
        api.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace,
                                       body=client.V1DeleteOptions(grace_period_seconds=grace))
    except ApiException as exc:
        if exc.status != 404:
            raise


def create_problem(exc: ApiException) -> InvalidSpecError:
    """Why a pod create failed, as a condition reason: transient errors are retried with back-off."""
    message = _api_message(exc)
    retry_after = _retry_after(exc)
    if exc.status == 403 and "quota" in message:  # "exceeded quota", or "status unknown for quota" at first
        return InvalidSpecError(R.QUOTA_EXCEEDED, f"cannot create the pod: {message}", retry_after or 30.0)
    if exc.status in (400, 403, 422):  # the template is invalid, or forbidden: changing the spec fixes it
        return InvalidSpecError(R.INVALID_TEMPLATE, f"cannot create the pod: {message}", 30.0)
    return InvalidSpecError(R.CREATE_FAILED, f"cannot create the pod (HTTP {exc.status}): {message}",
                            retry_after or 5.0)


def _retry_after(exc: ApiException) -> float | None:
    headers = exc.headers or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def reconcile_once(api: Api, settings: Settings, namespace: str, name: str) -> tuple[Plan | None, dict[str, Any]]:
    """Fetch, plan, apply. Returns the plan (None if the job is gone or invalid) and the job body for events."""
    job = _get(api.custom.get_namespaced_custom_object, R.GROUP, R.VERSION, namespace, R.PLURAL, name)
    if job is None:
        return None, {}
    ref = JobRef(name, namespace, job["metadata"]["uid"], job["metadata"].get("creationTimestamp") or "")
    pods = job_pods(api, namespace, ref.uid)
    if job["metadata"].get("deletionTimestamp") is not None:  # being deleted: free every pod for the GC
        for pod in pods:
            release_pod(api, pod)
        return Plan(status=TrainingJobStatus.model_validate(job.get("status") or {}), requeue=None), job
    old_status = job.get("status") or {}
    try:
        spec = TrainingJobSpec.model_validate(job.get("spec") or {})
        status = TrainingJobStatus.model_validate(old_status)
    except ValidationError as exc:
        message = f"invalid TrainingJob: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        _write_status(api, job, old_status, {**old_status, "message": message})
        return None, job
    sweep_old_attempts(api, pods, status)
    pod_dict = next((p for p in pods if _attempt_of(p) == status.attempt
                     and p["metadata"]["name"] == pod_name(name, status.attempt)), None)
    observed = Observed(ref, job["metadata"].get("generation"), spec, status, pod_dict, _node_info(api, pod_dict))
    now = dt.datetime.now(dt.timezone.utc)
    result = plan(observed, now, settings)
    if result.create is not None:
        observed.problem, observed.resume = _check_storage(api, namespace, spec)
        result = plan(observed, now, settings)
    if result.create is not None:
        try:
            api.core.create_namespaced_pod(namespace, cast(Any, result.create))
        except ApiException as exc:
            if exc.status != 409:  # 409: created by an earlier pass whose status write was lost
                observed.problem = create_problem(exc)
                result = plan(observed, now, settings)
    if not _write_status(api, job, old_status, result.status.dump()):
        return Plan(status=result.status, requeue=0.5), job  # conflict: plan again from fresh state
    if result.delete is not None:
        _delete_pod(api, result.delete[0], namespace, result.delete[1])
    if pod_dict is not None and result.status.last_outcome is not None \
            and result.status.last_outcome.attempt == status.attempt:
        release_pod(api, pod_dict)  # its outcome is recorded: let it go
    for metric, reason in result.counters:
        metrics.record_counter(metric, namespace, reason)
    if result.resubmit_latency is not None:
        metrics.RESUBMIT_LATENCY.labels(namespace).observe(result.resubmit_latency)
    metrics.set_phase(ref.uid, namespace, result.status.phase.value)
    return result, job


def release_pod(api: Api, pod: dict[str, Any]) -> None:
    """Remove the operator's finalizer from a pod whose outcome is recorded (or whose job is gone)."""
    finalizers = pod["metadata"].get("finalizers") or []
    if R.POD_FINALIZER not in finalizers:
        return
    patch = [{"op": "test", "path": "/metadata/finalizers", "value": finalizers},
             {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers
                                                                       if f != R.POD_FINALIZER]}]
    try:
        api.core.patch_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"], patch)
    except ApiException as exc:
        if exc.status not in (404, 409, 422):  # gone, or changed meanwhile: the next pass retries
            raise


def release_job_pods(api: Api, namespace: str, uid: str) -> None:
    """The job was deleted: free its pods so garbage collection can remove them."""
    for pod in job_pods(api, namespace, uid):
        release_pod(api, pod)


def sweep_orphans(api: Api, namespaces: list[str]) -> int:
    """Release the finalizer of every pod whose TrainingJob no longer exists (the operator was down, or missed
    the DELETED event), in the watched namespaces (all if empty). Returns how many were released."""
    selector = f"{R.LABEL_MANAGED_BY}={R.MANAGER}"
    if namespaces:
        pods = [p for ns in namespaces for p in api.core.list_namespaced_pod(ns, label_selector=selector).items]
    else:
        pods = api.core.list_pod_for_all_namespaces(label_selector=selector).items
    bodies = [api.core.api_client.sanitize_for_serialization(p) for p in pods]
    held = [p for p in bodies if R.POD_FINALIZER in (p["metadata"].get("finalizers") or [])]
    if not held:
        return 0
    if namespaces:
        jobs = [j for ns in namespaces for j in cast(dict[str, Any], api.custom.list_namespaced_custom_object(
            R.GROUP, R.VERSION, ns, R.PLURAL))["items"]]
    else:
        jobs = cast(dict[str, Any], api.custom.list_cluster_custom_object(R.GROUP, R.VERSION, R.PLURAL))["items"]
    alive = {job["metadata"]["uid"] for job in jobs if job["metadata"].get("deletionTimestamp") is None}
    released = 0
    for pod in held:
        owners = [ref.get("uid") for ref in pod["metadata"].get("ownerReferences") or [] if ref.get("controller")]
        if not any(uid in alive for uid in owners):
            release_pod(api, pod)
            released += 1
    return released


def _api_message(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)


def _write_status(api: Api, job: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Patch the status only when it changed; False on a write conflict."""
    patch = _status_patch(old, new)
    if not patch:
        return True
    body = {"metadata": {"resourceVersion": job["metadata"]["resourceVersion"]}, "status": patch}
    try:
        api.custom.patch_namespaced_custom_object_status(R.GROUP, R.VERSION, job["metadata"]["namespace"], R.PLURAL,
                                                         job["metadata"]["name"], body,
                                                         _content_type="application/merge-patch+json")
    except ApiException as exc:
        if exc.status in (404, 409):
            return False
        raise
    return True


class JobWorker:
    """One task per TrainingJob: reconciliations of a job never run concurrently."""

    def __init__(self, api: Api, settings: Settings, namespace: str, name: str) -> None:
        self.api, self.settings, self.namespace, self.name = api, settings, namespace, name
        self.wakeup = asyncio.Event()
        self.task = asyncio.create_task(self._loop(), name=f"tj-{namespace}/{name}")

    def wake(self) -> None:
        self.wakeup.set()

    async def _loop(self) -> None:
        while True:
            self.wakeup.clear()
            delay: float | None = 5.0
            try:
                result, body = await asyncio.to_thread(reconcile_once, self.api, self.settings, self.namespace,
                                                       self.name)
                if result is not None:
                    delay = result.requeue
                    for type_, reason, message in result.events:
                        kopf.event(cast(Any, body), type=type_, reason=reason, message=message)
                        log.info("%s/%s: %s: %s", self.namespace, self.name, reason, message)
            except Exception:
                metrics.RECONCILE_ERRORS.inc()
                log.exception("%s/%s: reconcile failed; retrying in 5s", self.namespace, self.name)
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass


ORPHAN_SWEEP_SECONDS = 60.0


async def _sweep_loop(api: Api, namespaces: list[str]) -> None:
    """Release pods whose job is gone: at start, then every minute."""
    while True:
        try:
            released = await asyncio.to_thread(sweep_orphans, api, namespaces)
            if released:
                log.info("released the finalizer of %d pod(s) whose TrainingJob no longer exists", released)
        except Exception:
            log.exception("orphan sweep failed; retrying")
        await asyncio.sleep(ORPHAN_SWEEP_SECONDS)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    memo["api"] = Api.connect()
    memo["settings"] = settings_from_env()
    memo["workers"] = {}
    memo["sweeper"] = asyncio.create_task(_sweep_loop(memo["api"], list(memo.get("namespaces") or [])),
                                          name="orphan-sweep")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for worker in memo.get("workers", {}).values():
        worker.task.cancel()
    if memo.get("sweeper") is not None:
        memo["sweeper"].cancel()


@kopf.on.event(R.GROUP, R.VERSION, R.PLURAL)
async def job_event(type: str, name: str, namespace: str | None, uid: str, memo: Any, **_: Any) -> None:
    assert namespace is not None  # TrainingJobs are namespaced
    workers: dict[str, JobWorker] = memo["workers"]
    if type == "DELETED":
        worker = workers.pop(uid, None)
        if worker is not None:
            worker.task.cancel()
        metrics.set_phase(uid, namespace, None)
        await asyncio.to_thread(release_job_pods, memo["api"], namespace, uid)
        return
    if uid not in workers:
        workers[uid] = JobWorker(memo["api"], memo["settings"], namespace, name)
    workers[uid].wake()


@kopf.on.event("", "v1", "pods", labels={R.LABEL_MANAGED_BY: R.MANAGER})
async def pod_event(labels: Mapping[str, str], memo: Any, **_: Any) -> None:
    worker = memo["workers"].get(labels.get(R.LABEL_JOB_UID, ""))
    if worker is not None:
        worker.wake()


@kopf.on.event("", "v1", "nodes")
async def node_event(type: str, body: Mapping[str, Any], memo: Any, **_: Any) -> None:
    info = node_info(body)
    if type == "DELETED" or not info.ready or info.out_of_service:  # pods on it may need to be replaced
        for worker in memo["workers"].values():
            worker.wake()
