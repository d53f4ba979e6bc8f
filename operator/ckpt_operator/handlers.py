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
    )


def _get(fn: Any, *args: Any) -> Any:
    """Call a read API; None on 404."""
    try:
        return fn(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _node_ready(api: Api, pod: dict[str, Any] | None) -> bool | None:
    node_name = ((pod or {}).get("spec") or {}).get("nodeName")
    if not node_name:
        return None
    node = _get(api.core.read_node, node_name)
    if node is None:
        return False  # the node object is gone: the pod will never be confirmed dead
    for cond in node.status.conditions or []:
        if cond.type == "Ready":
            return bool(cond.status == "True")
    return None


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


def reconcile_once(api: Api, settings: Settings, namespace: str, name: str) -> tuple[Plan | None, dict[str, Any]]:
    """Fetch, plan, apply. Returns the plan (None if the job is gone or invalid) and the job body for events."""
    job = _get(api.custom.get_namespaced_custom_object, R.GROUP, R.VERSION, namespace, R.PLURAL, name)
    if job is None:
        return None, {}
    ref = JobRef(name, namespace, job["metadata"]["uid"], job["metadata"].get("creationTimestamp") or "")
    old_status = job.get("status") or {}
    try:
        spec = TrainingJobSpec.model_validate(job.get("spec") or {})
        status = TrainingJobStatus.model_validate(old_status)
    except ValidationError as exc:
        message = f"invalid TrainingJob: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        _write_status(api, job, old_status, {**old_status, "message": message})
        return None, job
    pod = _get(api.core.read_namespaced_pod, pod_name(name, status.attempt), namespace)
    pod_dict = api.core.api_client.sanitize_for_serialization(pod) if pod is not None else None
    observed = Observed(ref, job["metadata"].get("generation"), spec, status, pod_dict, _node_ready(api, pod_dict))
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
                observed.problem = InvalidSpecError(R.INVALID_TEMPLATE, f"cannot create the pod: {_api_message(exc)}")
                result = plan(observed, now, settings)
    if not _write_status(api, job, old_status, result.status.dump()):
        return Plan(status=result.status, requeue=0.5), job  # conflict: plan again from fresh state
    if result.delete is not None:
        pod_to_delete, grace = result.delete
        try:
            api.core.delete_namespaced_pod(pod_to_delete, namespace, grace_period_seconds=grace,
                                           body=client.V1DeleteOptions(grace_period_seconds=grace))
        except ApiException as exc:
            if exc.status != 404:
                raise
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
    pods = api.core.list_namespaced_pod(namespace, label_selector=f"{R.LABEL_JOB_UID}={uid}")
    for pod in pods.items:
        release_pod(api, api.core.api_client.sanitize_for_serialization(pod))


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


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    memo["api"] = Api.connect()
    memo["settings"] = settings_from_env()
    memo["workers"] = {}


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for worker in memo.get("workers", {}).values():
        worker.task.cancel()


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
async def node_event(status: Mapping[str, Any], memo: Any, **_: Any) -> None:
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready != "True":  # a node went away: pods on it may need to be replaced
        for worker in memo["workers"].values():
            worker.wake()
