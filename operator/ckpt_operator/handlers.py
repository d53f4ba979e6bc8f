"""kopf wiring: the operator's state lives in kopf indexes fed by its watches; job, pod and node events wake the
one worker task of each affected TrainingJob, which runs reconcile.plan() on that state.

Handlers stay thin: they read the indexes, plan, and apply the plan (create the pod, then write the status, then
delete the old pod) so a crash between steps is always recoverable. A steady pass makes no API request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from . import metrics
from . import reasons as R
from .apiclient import BACKGROUND, RECONCILE_THREADS, URGENT, Api, error_backoff, priority, retry_after
from .builders import JobRef, ResumeSource, member_names
from .cache import Cache, Expectations, name_key, node_info, owned_by_job, trim_job, trim_pod
from .classify import NodeInfo
from .errors import InvalidSpecError
from .models import TrainingJobSpec, TrainingJobStatus
from .reconcile import Observed, Plan, Settings, plan

log = logging.getLogger("ckpt_operator")


def settings_from_env() -> Settings:
    return Settings(
        backoff_base_seconds=float(os.environ.get("CKPT_OPERATOR_BACKOFF_BASE_SECONDS", "10")),
        backoff_cap_seconds=float(os.environ.get("CKPT_OPERATOR_BACKOFF_CAP_SECONDS", "300")),
        node_lost_seconds=float(os.environ.get("CKPT_OPERATOR_NODE_LOST_SECONDS", "300")),
        gang_start_timeout_seconds=float(os.environ.get("CKPT_OPERATOR_GANG_START_TIMEOUT_SECONDS", "300")),
        notice_taints=parse_notice_taints(os.environ.get("CKPT_OPERATOR_NOTICE_TAINTS")),
        notice_checkpoint_seconds=float(os.environ.get("CKPT_OPERATOR_NOTICE_CHECKPOINT_SECONDS", "30")),
    )


def parse_notice_taints(text: str | None) -> dict[str, float]:
    """`key=seconds,key2=seconds` (a key alone gets 120 s of notice); unset means the default list, empty none."""
    if text is None:
        return dict(R.DEFAULT_NOTICE_TAINTS)
    taints = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, _, seconds = item.partition("=")
        try:
            taints[key.strip()] = float(seconds) if seconds.strip() else 120.0
        except ValueError:
            raise ValueError(f"CKPT_OPERATOR_NOTICE_TAINTS: {item!r} is not key=seconds") from None
    return taints


def _get(fn: Any, *args: Any) -> Any:
    """Call a read API; None on 404."""
    try:
        return fn(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _read_node(api: Api, cache: Cache, node_name: str) -> NodeInfo:
    """A node the watch never told of (deleted while the operator was down, or not delivered yet): one GET
    settles which, once."""
    node = _get(api.core.read_node, node_name)
    if node is None:
        cache.deleted_nodes.add(node_name)
        return NodeInfo(node_name, exists=False, ready=False)  # the node object is gone: nothing will report
    return node_info(api.plain(node))


def _confirm_pod(api: Api, expect: Expectations, namespace: str, name: str) -> dict[str, Any] | None:
    """One GET of a pod we created and the watch has long not reported (it lags, or the pod is gone)."""
    found = _get(api.read_pod, namespace, name)
    pod = trim_pod(found) if found is not None else None
    expect.confirm(name, pod)
    return pod


def _check_storage(api: Api, cache: Cache, namespace: str, spec: TrainingJobSpec) -> tuple[
        InvalidSpecError | None, ResumeSource | None]:
    """Resolve what a new pod needs: the claim exists, and the resumeFrom source job exists."""
    pvc = spec.checkpoint.persistent_volume_claim
    if pvc is not None and _get(api.core.read_namespaced_persistent_volume_claim, pvc.claim_name, namespace) is None:
        return InvalidSpecError(R.CLAIM_NOT_FOUND, f'persistentvolumeclaim "{pvc.claim_name}" not found in '
                                                   f'namespace "{namespace}"; create it and the job will start'), None
    if spec.resume_from is None:
        return None, None
    source = cache.job_by_name(namespace, spec.resume_from.training_job)
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


def _attempt_of(pod: dict[str, Any]) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(R.LABEL_ATTEMPT, "-1"))
    except ValueError:
        return -1


def sweep_old_attempts(api: Api, pods: list[dict[str, Any]], status: TrainingJobStatus,
                       release: Callable[[dict[str, Any]], None]) -> None:
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
        release(pod)


def _delete_pod(api: Api, name: str, namespace: str, grace: int) -> None:
    try:
        with priority(URGENT):
            api.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace,
                                           body=client.V1DeleteOptions(grace_period_seconds=grace),
                                           _preload_content=False)  # the answer is not read: do not parse it
    except ApiException as exc:
        if exc.status != 404:
            raise


def _annotate_pod(api: Api, name: str, namespace: str, wanted: dict[str, str]) -> None:
    """Set annotations on a pod (a checkpoint request); a pod gone meanwhile needs none."""
    try:
        with priority(URGENT):
            api.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": wanted}},
                                          _preload_content=False)
    except ApiException as exc:
        if exc.status != 404:
            raise


def create_problem(exc: ApiException) -> InvalidSpecError:
    """Why a pod create failed, as a condition reason: transient errors are retried with back-off."""
    message = _api_message(exc)
    retry_after_seconds = retry_after(exc)
    if exc.status == 403 and "quota" in message:  # "exceeded quota", or "status unknown for quota" at first
        return InvalidSpecError(R.QUOTA_EXCEEDED, f"cannot create the pod: {message}", retry_after_seconds or 30.0)
    if exc.status in (400, 403, 422):  # the template is invalid, or forbidden: changing the spec fixes it
        return InvalidSpecError(R.INVALID_TEMPLATE, f"cannot create the pod: {message}", 30.0)
    return InvalidSpecError(R.CREATE_FAILED, f"cannot create the pod (HTTP {exc.status}): {message}",
                            retry_after_seconds or 5.0)


def reconcile_once(api: Api, settings: Settings, cache: Cache, expect: Expectations, job: dict[str, Any] | None,
                   pods: list[dict[str, Any]], nodes: dict[str, NodeInfo],
                   release: Callable[[dict[str, Any]], None]) -> tuple[Plan | None, dict[str, Any]]:
    """Plan from the watched state and apply; finalizer releases are handed to `release` (done later, at the lowest
    priority). Returns the plan (None if the job is gone or invalid) and the job."""
    if job is None:
        return None, {}
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    ref = JobRef(name, namespace, meta["uid"], meta.get("creationTimestamp") or "")
    if meta.get("deletionTimestamp") is not None:  # being deleted: free every pod for the GC
        for held in pods:
            release_pod(api, held)
        return Plan(status=TrainingJobStatus.model_validate(job.get("status") or {}), requeue=None), job
    old_status = job.get("status") or {}
    try:
        spec = TrainingJobSpec.model_validate(job.get("spec") or {})
        status = TrainingJobStatus.model_validate(old_status)
    except ValidationError as exc:
        message = f"invalid TrainingJob: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        _write_status(api, expect, job, old_status, {**old_status, "message": message})
        return None, job
    sweep_old_attempts(api, pods, status, release)
    names = set(member_names(name, status.attempt, spec.workers))
    current = []
    for listed in pods:
        if _attempt_of(listed) != status.attempt or listed["metadata"]["name"] not in names:
            continue
        pod: dict[str, Any] | None = listed
        if expect.unconfirmed(listed["metadata"]["name"]):
            pod = _confirm_pod(api, expect, namespace, listed["metadata"]["name"])
        if pod is not None:
            current.append(pod)
    nodes = dict(nodes)
    for pod in current:
        node_name = (pod.get("spec") or {}).get("nodeName")
        if node_name and node_name not in nodes:
            nodes[node_name] = _read_node(api, cache, node_name)
    observed = Observed(ref, meta.get("generation"), spec, status, current, nodes,
                        annotations=meta.get("annotations") or {})
    now = dt.datetime.now(dt.timezone.utc)
    result = plan(observed, now, settings)
    if result.creates:
        observed.problem, observed.resume = _check_storage(api, cache, namespace, spec)
        result = plan(observed, now, settings)
    if result.creates:
        observed.problem = _create_attempt(api, expect, namespace, result)
        if observed.problem is not None:
            result = plan(observed, now, settings)
    if not _write_status(api, expect, job, old_status, result.status.dump()):
        return Plan(status=result.status, requeue=0.5), job  # conflict: plan again from fresh state
    for pod_to_annotate, wanted in result.annotations:
        _annotate_pod(api, pod_to_annotate, namespace, wanted)
    for pod_to_delete, grace in result.deletes:
        _delete_pod(api, pod_to_delete, namespace, grace)
    if result.status.last_outcome is not None and result.status.last_outcome.attempt == status.attempt:
        for pod in current:
            release(pod)  # its outcome is recorded: let it go
    for metric, reason in result.counters:
        metrics.record_counter(metric, namespace, reason)
    if result.resubmit_latency is not None:
        metrics.RESUBMIT_LATENCY.labels(namespace).observe(result.resubmit_latency)
    metrics.set_phase(ref.uid, namespace, result.status.phase.value)
    return result, job


def _create_attempt(api: Api, expect: Expectations, namespace: str, result: Plan) -> InvalidSpecError | None:
    """Create a gang's Service, then every pod of the attempt; if one pod cannot be created, the ones created in
    this pass are deleted again (never N-1 ranks waiting for one that will not come). 409 = made earlier."""
    if result.service is not None:  # made again at each attempt's start, in case someone deleted it
        problem = _ensure_service(api, namespace, result.service)
        if problem is not None:
            return problem
    made: list[str] = []
    for pod in result.creates:
        try:
            expect.created(api.create_pod(namespace, pod))
            made.append(pod["metadata"]["name"])
        except ApiException as exc:
            if exc.status == 409:  # created by an earlier pass whose status write was lost
                continue
            for name in made:
                _delete_pod(api, name, namespace, 0)
            return create_problem(exc)
    return None


def _ensure_service(api: Api, namespace: str, service: dict[str, Any]) -> InvalidSpecError | None:
    """Create the headless Service; a Service of that name that this job does not own is a conflict."""
    try:
        with priority(URGENT):
            api.core.create_namespaced_service(namespace, cast(Any, service), _preload_content=False)
        return None
    except ApiException as exc:
        if exc.status != 409:
            return create_problem(exc)
    found = _get(api.core.read_namespaced_service, service["metadata"]["name"], namespace)
    owner = service["metadata"]["ownerReferences"][0]["uid"]
    refs = (found.metadata.owner_references or []) if found is not None else []
    if found is None or any(ref.uid == owner for ref in refs):
        return None if found is not None else InvalidSpecError(R.CREATE_FAILED, "the Service vanished", 1.0)
    return InvalidSpecError(R.SERVICE_CONFLICT, f'service "{service["metadata"]["name"]}" exists and is not owned '
                                                f"by this TrainingJob: a multi-node job names its headless Service "
                                                f"after itself; rename the job or the Service", 30.0)


def release_pod(api: Api, pod: dict[str, Any]) -> None:
    """Remove the operator's finalizer from a pod whose outcome is recorded (or whose job is gone)."""
    finalizers = pod["metadata"].get("finalizers") or []
    if R.POD_FINALIZER not in finalizers:
        return
    patch = [{"op": "test", "path": "/metadata/finalizers", "value": finalizers},
             {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers
                                                                       if f != R.POD_FINALIZER]}]
    try:
        api.core.patch_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"], patch,
                                      _preload_content=False)  # the answer is not read: do not parse it
    except ApiException as exc:
        if exc.status not in (404, 409, 422):  # gone, or changed meanwhile: the next pass retries
            raise


def _api_message(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)


def _write_status(api: Api, expect: Expectations, job: dict[str, Any], old: dict[str, Any],
                  new: dict[str, Any]) -> bool:
    """Patch the status only when it changed (and remember the result until the watch reports it); False on a
    write conflict."""
    patch = _status_patch(old, new)
    if not patch or expect.already_pruned(new, old):  # nothing new, or exactly what the server pruned last time
        return True
    body = {"metadata": {"resourceVersion": job["metadata"]["resourceVersion"]}, "status": patch}
    try:
        written = api.custom.patch_namespaced_custom_object_status(
            R.GROUP, R.VERSION, job["metadata"]["namespace"], R.PLURAL, job["metadata"]["name"], body,
            _content_type="application/merge-patch+json")
    except ApiException as exc:
        if exc.status in (404, 409):
            return False
        raise
    expect.job = trim_job(cast(dict[str, Any], written))
    kept = dict(expect.job.get("status") or {})
    dropped = sorted(key for key, value in new.items() if kept.get(key) != value)
    expect.pruned, expect.pruned_at = ((new, kept) if dropped else None), time.monotonic()
    if dropped:
        _warn_pruned(job, dropped)
    return True


_PRUNING_WARNED: set[str] = set()


def _warn_pruned(job: dict[str, Any], fields: list[str]) -> None:
    """The installed CRD is older than this operator: say once which status fields it drops, and how to fix it."""
    key = ",".join(fields)
    if key in _PRUNING_WARNED:
        return
    _PRUNING_WARNED.add(key)
    log.warning("%s/%s: the API server dropped status fields %s: the TrainingJob CRD is older than this operator. "
                "Apply the new one: kubectl apply --server-side -f crds/ (Helm never upgrades a chart's crds/)",
                job["metadata"]["namespace"], job["metadata"]["name"], ", ".join(fields))


class Releaser:
    """Removes the operator's finalizer from pods whose outcome is recorded, at the lowest request priority: in a
    storm, replacement pods and status writes go first; a released pod only lingers a little longer."""

    def __init__(self, api: Api, tasks: int = 4) -> None:
        self.api = api
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queued: set[str] = set()  # pod uids waiting: a pod is released once however often it is submitted
        self.loop = asyncio.get_running_loop()
        self.tasks = [asyncio.create_task(self._run(), name=f"releaser-{index}") for index in range(tasks)]

    def submit(self, pod: dict[str, Any]) -> None:
        """Queue a release (callable from any thread)."""
        if R.POD_FINALIZER in (pod["metadata"].get("finalizers") or []):
            self.loop.call_soon_threadsafe(self._put, pod)

    def _put(self, pod: dict[str, Any]) -> None:
        uid = str(pod["metadata"].get("uid") or pod["metadata"]["name"])
        if uid not in self.queued:
            self.queued.add(uid)
            self.queue.put_nowait(pod)

    async def _run(self) -> None:
        while True:
            pod = await self.queue.get()
            try:
                await asyncio.to_thread(self._release, pod)
            except Exception as exc:
                log.warning("releasing pod %s failed; the next pass of its job retries: %s",
                            pod["metadata"]["name"], exc)
            finally:
                self.queued.discard(str(pod["metadata"].get("uid") or pod["metadata"]["name"]))

    def _release(self, pod: dict[str, Any]) -> None:
        with priority(BACKGROUND):
            release_pod(self.api, pod)


class JobWorker:
    """One task per TrainingJob, a work queue of one: passes of a job never run concurrently, wake-ups that
    arrive during a pass coalesce into one more pass, API errors back off per job."""

    def __init__(self, api: Api, settings: Settings, cache: Cache, releaser: Releaser, uid: str, namespace: str,
                 name: str) -> None:
        self.api, self.settings, self.cache, self.releaser = api, settings, cache, releaser
        self.uid, self.namespace, self.name = uid, namespace, name
        self.expect = Expectations()
        self.failures = 0
        self.wakeup = asyncio.Event()
        self.task = asyncio.create_task(self._loop(), name=f"tj-{namespace}/{name}")

    def wake(self) -> None:
        self.wakeup.set()

    def _snapshot(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]], dict[str, NodeInfo]]:
        """The job, its pods and their nodes as the watches (and our own unreported writes) say; read on the
        event loop, where kopf updates the indexes."""
        job = self.expect.newest_job(self.cache.job(self.uid))
        pods = self.expect.merge_pods(self.cache.job_pods(self.uid))
        nodes = {}
        for pod in pods:
            node_name = (pod.get("spec") or {}).get("nodeName")
            info = self.cache.node(node_name) if node_name else None
            if info is not None:
                nodes[info.name] = info
        return job, pods, nodes

    async def _loop(self) -> None:
        while True:
            self.wakeup.clear()
            delay: float | None
            try:
                job, pods, nodes = self._snapshot()
                metrics.RECONCILES.inc()
                result, body = await asyncio.to_thread(reconcile_once, self.api, self.settings, self.cache,
                                                       self.expect, job, pods, nodes, self.releaser.submit)
                self.failures = 0
                delay = result.requeue if result is not None else None
                for type_, reason, message in result.events if result is not None else []:
                    kopf.event(cast(Any, body), type=type_, reason=reason, message=message)
                    log.info("%s/%s: %s: %s", self.namespace, self.name, reason, message)
            except Exception as exc:
                self.failures += 1
                delay = error_backoff(self.failures, exc)
                metrics.RECONCILE_ERRORS.inc()
                log.warning("%s/%s: reconcile failed (%d in a row); retrying in %.1fs: %s", self.namespace,
                            self.name, self.failures, delay, exc, exc_info=self.failures == 1)
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass


ORPHAN_SWEEP_SECONDS = 60.0


def sweep_orphans(api: Api, cache: Cache, held: list[dict[str, Any]]) -> int:
    """Release the finalizer of every pod (of `held`) whose TrainingJob no longer exists or is being deleted.
    Returns how many were released."""
    released = 0
    for pod in held:
        job = cache.job(owned_by_job(pod) or "")
        if job is None or job["metadata"].get("deletionTimestamp") is not None:
            release_pod(api, pod)
            released += 1
    return released


def _held_pods(cache: Cache) -> list[dict[str, Any]]:
    """Every indexed pod that still carries the operator's finalizer."""
    return [pod for uid in list(cast(Any, cache.pods)) for pod in cache.job_pods(uid)
            if R.POD_FINALIZER in (pod["metadata"].get("finalizers") or [])]


async def _sweep_loop(api: Api, cache: Cache) -> None:
    """Release pods whose job is gone (its DELETED event was missed): every minute, from the indexes alone."""
    while True:
        await asyncio.sleep(ORPHAN_SWEEP_SECONDS)
        try:
            held = [pod for pod in _held_pods(cache) if cache.job(owned_by_job(pod) or "") is None]
            released = await asyncio.to_thread(sweep_orphans, api, cache, held) if held else 0
            if released:
                log.info("released the finalizer of %d pod(s) whose TrainingJob no longer exists", released)
        except Exception:
            log.exception("orphan sweep failed; retrying")


def _cache(memo: Any, kwargs: Mapping[str, Any]) -> Cache:
    """The indexes (kopf passes them to every handler); the first call also starts the orphan sweep.

    kopf gives each object's handlers a shallow copy of the operator's memo: what every handler must share lives
    in `memo["shared"]`, a dict made at startup (a key set on the copy would make one cache and one sweep per
    object: at 5,000 jobs, thousands of sweeps over every pod, starving the event loop)."""
    shared: dict[str, Any] = memo["shared"]
    if "cache" not in shared:
        shared["cache"] = Cache(kwargs["tj_jobs"], kwargs["tj_pods"], kwargs["tj_nodes"], kwargs["tj_jobs_on_node"])
        shared["sweeper"] = asyncio.create_task(_sweep_loop(memo["api"], shared["cache"]), name="orphan-sweep")
        log.info("orphan sweep started: every %.0fs, from the indexes", ORPHAN_SWEEP_SECONDS)
    return cast(Cache, shared["cache"])


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.label_selectors["", "v1", "pods"] = f"{R.LABEL_MANAGED_BY}={R.MANAGER}"
    memo["api"] = Api.connect(float(memo.get("qps") or 50.0), int(memo.get("burst") or 100))
    memo["settings"] = settings_from_env()
    memo["workers"] = {}
    memo["nodes_seen"] = {}
    memo["shared"] = {}
    memo["releaser"] = Releaser(memo["api"])
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(RECONCILE_THREADS,
                                                                       thread_name_prefix="reconcile"))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for worker in memo.get("workers", {}).values():
        worker.task.cancel()
    if memo.get("shared", {}).get("sweeper") is not None:
        memo["shared"]["sweeper"].cancel()
    for task in memo["releaser"].tasks if memo.get("releaser") is not None else []:
        task.cancel()


@kopf.index(R.GROUP, R.VERSION, R.PLURAL)
async def tj_jobs(body: kopf.Body, uid: str, name: str, namespace: str | None, **_: Any) -> dict[str, Any]:
    """TrainingJobs by uid, and by `namespace/name`."""
    job = trim_job(body)
    return {uid: job, name_key(namespace or "", name): job}


@kopf.index("", "v1", "pods", labels={R.LABEL_MANAGED_BY: R.MANAGER})
async def tj_pods(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
    """The operator's pods by the uid of the TrainingJob that controls them."""
    uid = owned_by_job(body)
    return {uid: trim_pod(body)} if uid else None


@kopf.index("", "v1", "pods", labels={R.LABEL_MANAGED_BY: R.MANAGER})
async def tj_jobs_on_node(body: kopf.Body, **_: Any) -> dict[str, str] | None:
    """TrainingJob uids by the node their pods are bound to: a node event wakes only those jobs."""
    uid, node = owned_by_job(body), (body.get("spec") or {}).get("nodeName")
    return {node: uid} if uid and node else None


@kopf.index("", "v1", "nodes")
async def tj_nodes(body: kopf.Body, name: str, **_: Any) -> dict[str, NodeInfo]:
    """What the planner needs of each node: exists, Ready since when, out of service."""
    return {name: node_info(body)}


@kopf.on.event(R.GROUP, R.VERSION, R.PLURAL)
async def job_event(type: str, name: str, namespace: str | None, uid: str, memo: Any, **kwargs: Any) -> None:
    assert namespace is not None  # TrainingJobs are namespaced
    cache = _cache(memo, kwargs)
    workers: dict[str, JobWorker] = memo["workers"]
    if type == "DELETED":
        worker = workers.pop(uid, None)
        if worker is not None:
            worker.task.cancel()
        metrics.set_phase(uid, namespace, None)
        await asyncio.to_thread(sweep_orphans, memo["api"], cache, cache.job_pods(uid))
        return
    if uid not in workers:
        workers[uid] = JobWorker(memo["api"], memo["settings"], cache, memo["releaser"], uid, namespace, name)
    workers[uid].wake()


@kopf.on.event("", "v1", "pods", labels={R.LABEL_MANAGED_BY: R.MANAGER})
async def pod_event(body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    cache = _cache(memo, kwargs)
    uid = owned_by_job(body)
    worker = memo["workers"].get(uid or "")
    if worker is not None:
        worker.wake()
    elif R.POD_FINALIZER in (body.get("metadata") or {}).get("finalizers", []) and (
            uid is None or cache.job(uid) is None):  # its job is gone (deleted while the operator was down)
        await asyncio.to_thread(sweep_orphans, memo["api"], cache, [trim_pod(body)])


@kopf.on.event("", "v1", "nodes")
async def node_event(type: str, name: str, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    """Wake the jobs with a pod on this node, when what the planner reads of the node changed."""
    cache = _cache(memo, kwargs)
    seen: dict[str, NodeInfo] = memo["nodes_seen"]
    info = None if type == "DELETED" else node_info(body)
    if info is None:
        cache.deleted_nodes.add(name)
    else:
        cache.deleted_nodes.discard(name)
    if seen.get(name) == info:
        return
    notice = info.notice(memo["settings"].notice_taints) if info is not None else None
    before = seen.get(name)
    if notice is not None and (before is None or before.notice(memo["settings"].notice_taints) is None):
        log.info("node %s: interruption notice (taint %s, %.0fs); TrainingJobs with pods there: %d", name,
                 notice[0], notice[1], len(cache.job_uids_on(name)))
    if info is None:
        seen.pop(name, None)
    else:
        seen[name] = info
    for uid in cache.job_uids_on(name):
        worker = memo["workers"].get(uid)
        if worker is not None:
            worker.wake()
