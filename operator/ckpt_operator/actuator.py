"""One pass over one job against the API, in two halves: observe (the watched state, read once where the watch
cannot be trusted), plan and create the pods of a new attempt (`plan_pass`); then, once the worker holds the token of
its status write, write the status that records them and carry out deletes, annotations and finalizer releases
(`finish_pass`). The order survives a crash between any two requests: pods made before their status is written are
adopted by name by the next pass."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from . import kueue, metrics
from . import reasons as R
from .apiclient import URGENT, Api, priority, retry_after, unread
from .builders import JobRef, ResumeSource
from .cache import Cache, Expectations, interned_dict, node_info, trim_job, trim_pod
from .classify import NodeInfo
from .elastic_policy import rank_slots
from .errors import InvalidSpecError
from .kueue import WorkloadView
from .models import TrainingJobSpec, TrainingJobStatus
from .planner import plan
from .planning import Actions, Observed, Plan, Pod, Settings, WorkloadPlan, node_name, parse_iso

log = logging.getLogger("ckpt_operator")
PREVIOUS_INCARNATION_RETRY_SECONDS = 2.0
CLAIM_SEEN_SECONDS = 300.0


def get_or_none(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a read API; None on 404."""
    try:
        return fn(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


@dataclass
class Pass:
    """One pass between its two halves: planned (and the new attempt's pods created), its status not written yet.
    It keeps what the second half needs, not what planning read: in a storm thousands of passes wait for their
    write, so the status is kept as the dict to write, without the spec and status models."""

    job: dict[str, Any]
    actions: Actions | None  # None: the job is gone or invalid
    phase: str = ""
    new_status: dict[str, Any] = field(default_factory=dict)
    writes: bool = False  # the status changed: the second half makes a request (a token is taken for it first)
    created: tuple[str, ...] = ()  # the pods created (names): in a storm the write waits behind other jobs' creates
    releasable: dict[str, Pod] = field(default_factory=dict)  # the pods the actions release, by name
    workload: WorkloadView | None = None  # the job's Kueue Workload, as watched
    new_workload: dict[str, Any] | None = None  # a Workload to create (built in the first half)


def plan_pass(api: Api, settings: Settings, cache: Cache, expect: Expectations, job: dict[str, Any] | None,
              pods: list[Pod], nodes: dict[str, NodeInfo]) -> Pass:
    """The first half of a pass: plan from the watched state; create a new attempt's pods (they come first: the
    status that records them is written after, and a pass after a crash in between adopts them)."""
    if job is None:
        return Pass({}, None)
    meta = job["metadata"]
    if meta.get("deletionTimestamp") is not None:  # being deleted: free every pod (and its Workload) for the GC
        for held in pods:
            release_pod(api, held)
        workload = cache.workload(meta["uid"])
        if workload is not None and kueue.FINALIZER in (workload["metadata"].get("finalizers") or []):
            release_workload(api, meta["namespace"], workload["metadata"]["name"],
                             list(workload["metadata"].get("finalizers") or []))
        phase = TrainingJobStatus.model_validate(job.get("status") or {}).phase.value
        return Pass(job, Actions(requeue=None), phase)
    seen = observe(api, cache, expect, job, pods, nodes, settings)
    if seen is None:
        return Pass(job, None)
    result = _plan_with_storage(api, cache, expect, seen, settings)
    new_status = result.status.dump()
    old_status = job.get("status") or {}
    writes = bool(status_patch(old_status, new_status)) and not expect.already_pruned(new_status, old_status)
    if writes:  # held while the write waits for its token: as compact as the index's (a pass without one drops it)
        new_status = interned_dict(new_status)
    created = tuple(pod["metadata"]["name"] for pod in result.creates)
    result.creates = []  # made: the manifests are not kept while the write waits (thousands of them in a storm)
    new_workload = None
    if result.workload.create and seen.queue is not None:
        new_workload = kueue.build_workload(seen.job, seen.spec, seen.queue, _priority(api, seen))
    releasable = {pod["metadata"]["name"]: pod for pod in seen.pods if pod["metadata"]["name"] in result.releases}
    return Pass(job, result.actions(), result.status.phase.value, new_status, writes, created, releasable,
                seen.workload, new_workload)


def finish_pass(api: Api, expect: Expectations, step: Pass, release: Callable[[Pod], None]) -> Actions | None:
    """The second half: write the status if it changed, then delete, annotate and hand finalizer releases to
    `release` (done later, at the lowest priority). Returns the actions (None if the job is gone or invalid)."""
    if step.actions is None or not step.new_status:  # gone, invalid, or being deleted: nothing to write or do
        return step.actions
    if step.writes and not write_status(api, expect, step.job, step.job.get("status") or {}, step.new_status):
        return Actions(requeue=0.5)  # conflict: plan again from fresh state
    _carry_out(api, step, step.actions, release)
    return step.actions


def observe(api: Api, cache: Cache, expect: Expectations, job: dict[str, Any], pods: list[Pod],
            nodes: dict[str, NodeInfo], settings: Settings) -> Observed | None:
    """What the planner sees of the job: its spec and status (None if invalid: reported in status), its pods (a
    pod we created and the watch has long not reported is read once), and their nodes."""
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    old_status = job.get("status") or {}
    try:
        spec = TrainingJobSpec.model_validate(job.get("spec") or {})
        status = TrainingJobStatus.model_validate(old_status)
    except ValidationError as exc:
        message = f"invalid TrainingJob: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        write_status(api, expect, job, old_status, {**old_status, "message": message})
        return None
    if spec.ranked and not name[:1].isalpha():
        write_status(api, expect, job, old_status, {**old_status, "message": (
            "invalid TrainingJob: a gang (workers > 1, or {min, max}) needs a metadata.name that starts with a "
            "letter: it names the gang's headless Service")})
        return None
    current = []
    for listed in pods:
        pod: Pod | None = listed
        if expect.unconfirmed(listed["metadata"]["name"]):
            pod = _confirm_pod(api, expect, namespace, listed["metadata"]["name"])
        if pod is not None:
            current.append(pod)
    nodes = dict(nodes)
    for pod in current:
        bound = node_name(pod)
        if bound and bound not in nodes:
            nodes[bound] = _read_node(api, cache, bound)
    ref = JobRef(name, namespace, meta["uid"], meta.get("creationTimestamp") or "")
    seen = Observed(ref, meta.get("generation"), spec, status, current, nodes,
                    annotations=meta.get("annotations") or {})
    if spec.elastic:
        seen.capacity = capacity(cache, spec, settings.notice_taints)
    if cache.kueue:
        seen.labels = meta.get("labels") or {}
        seen.queue = kueue.queue_of(seen.labels)
        workload = cache.workload(meta["uid"])
        seen.workload = kueue.view(workload) if workload is not None else None
        seen.flavors = cache.flavor_specs() if seen.workload is not None and seen.workload.flavors else {}
    return seen


def capacity(cache: Cache, spec: TrainingJobSpec, notice_taints: Mapping[str, float]) -> int:
    """`rank_slots` over every node, computed once per node change and pod template (not per pass of every elastic
    job: a node event wakes them all)."""
    generation = cache.node_generation  # read before the nodes: a change meanwhile files the result under the old
    pod_spec = spec.template.get("spec") or {}
    template = json.dumps([[c.get("resources") for c in pod_spec.get("containers") or []],
                           pod_spec.get("nodeSelector"), pod_spec.get("tolerations")], sort_keys=True, default=str)
    found = cache.capacity_memo.get((generation, template))
    if found is None:
        found = rank_slots(cache.all_nodes(), spec, notice_taints)
        for stale in [key for key in list(cache.capacity_memo) if key[0] != generation]:
            cache.capacity_memo.pop(stale, None)
        cache.capacity_memo[(generation, template)] = found
    return found


def _plan_with_storage(api: Api, cache: Cache, expect: Expectations, seen: Observed, settings: Settings) -> Plan:
    """Plan; when the plan starts an attempt, resolve its storage first and create its pods (planning again if
    either fails: the status then says why)."""
    now = dt.datetime.now(dt.timezone.utc)
    result = plan(seen, now, settings)
    if result.creates and _adopt(seen, result, now):
        return result
    if result.creates:
        problem, resume = check_storage(api, cache, seen.job.namespace, seen.spec)
        if (problem, resume) != (seen.problem, seen.resume):  # else the plan would be the same
            seen.problem, seen.resume = problem, resume
            result = plan(seen, now, settings)
    if result.creates:
        seen.problem = create_attempt(api, expect, seen.job, result)
        if seen.problem is not None:
            result = plan(seen, now, settings)
    return result


def _adopt(seen: Observed, result: Plan, now: dt.datetime) -> bool:
    """Every pod the plan would create is there already: made by an earlier pass whose status write has not
    happened yet (it waited behind other jobs' creates) or was lost. Adopted without a request; the resubmission
    latency counts to their creation. True if adopted."""
    made = {pod["metadata"]["name"]: pod for pod in seen.pods}
    if not all(pod["metadata"]["name"] in made for pod in result.creates):
        return False
    created = [made[pod["metadata"]["name"]]["metadata"].get("creationTimestamp") for pod in result.creates]
    if result.resubmit_latency is not None and all(created):
        waited = (now - max(parse_iso(str(stamp)) for stamp in created)).total_seconds()
        result.resubmit_latency = max(0.0, result.resubmit_latency - max(0.0, waited))
    result.creates = []
    return True


def _carry_out(api: Api, step: Pass, actions: Actions, release: Callable[[Pod], None]) -> None:
    """The actions of a pass, after the status that records them is written."""
    namespace = step.job["metadata"]["namespace"]
    _carry_out_workload(api, step, actions.workload)
    for pod_to_annotate, wanted in actions.annotations:
        annotate_pod(api, pod_to_annotate, namespace, wanted)
    for pod_to_delete, grace in actions.deletes:
        delete_pod(api, pod_to_delete, namespace, grace)
    for pod in step.releasable.values():
        release(pod)
    for metric, reason in actions.counters:
        metrics.record_counter(metric, namespace, reason)
    for kind, seconds in actions.goodput_seconds.items():
        metrics.GOODPUT_SECONDS.labels(namespace, kind).inc(seconds)
    if actions.resubmit_latency is not None:
        metrics.RESUBMIT_LATENCY.labels(namespace).observe(actions.resubmit_latency)


def _read_node(api: Api, cache: Cache, name: str) -> NodeInfo:
    """A node the watch never told of (deleted while the operator was down, or not delivered yet): one GET
    settles which, once."""
    node = get_or_none(api.core.read_node, name)
    if node is None:
        cache.deleted_nodes.add(name)
        return NodeInfo(name, exists=False, ready=False)  # the node object is gone: nothing will report
    return node_info(api.plain(node))


def _confirm_pod(api: Api, expect: Expectations, namespace: str, name: str) -> Pod | None:
    """One GET of a pod we created and the watch has long not reported (it lags, or the pod is gone)."""
    found = get_or_none(api.read_pod, namespace, name)
    pod = trim_pod(found) if found is not None else None
    expect.confirm(name, pod)
    return pod


def check_storage(api: Api, cache: Cache, namespace: str, spec: TrainingJobSpec) -> tuple[
        InvalidSpecError | None, ResumeSource | None]:
    """Resolve what a new pod needs: the claim exists, and the resumeFrom source job exists."""
    pvc = spec.checkpoint.persistent_volume_claim
    if pvc is not None and not _claim_exists(api, cache, namespace, pvc.claim_name):
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


def _claim_exists(api: Api, cache: Cache, namespace: str, claim: str) -> bool:
    """One GET of the claim, unless it was found within the last CLAIM_SEEN_SECONDS (in a storm, the jobs sharing a
    claim are not each a GET). A claim deleted meanwhile leaves the new pod Pending, which the start timeout ends."""
    seen = cache.claims_seen.get((namespace, claim))
    if seen is not None and time.monotonic() - seen < CLAIM_SEEN_SECONDS:
        return True
    if get_or_none(api.core.read_namespaced_persistent_volume_claim, claim, namespace) is None:
        cache.claims_seen.pop((namespace, claim), None)
        return False
    cache.claims_seen[(namespace, claim)] = time.monotonic()
    return True


def create_attempt(api: Api, expect: Expectations, job: JobRef, result: Plan) -> InvalidSpecError | None:
    """Create a gang's Service, then every pod of the attempt. If one pod cannot be created, the ones created in
    this pass are deleted again and released at once (never N-1 ranks waiting for one that will not come, nor a
    pod left Terminating on our finalizer). 409: made by an earlier pass whose status write was lost (ours: adopted),
    or still there from an earlier job of the same name (not ours: wait for it to go)."""
    if result.service is not None:  # made again at each attempt's start, in case someone deleted it
        problem = _ensure_service(api, job.namespace, result.service)
        if problem is not None:
            return problem
    made: list[Pod] = []
    for pod in result.creates:
        try:
            created = api.create_pod(job.namespace, pod)
        except ApiException as exc:
            problem = _existing(api, job, pod["metadata"]["name"]) if exc.status == 409 else create_problem(exc)
            if problem is None:
                continue  # ours already
            for undone in made:
                delete_pod(api, undone["metadata"]["name"], job.namespace, 0)
                release_pod(api, undone)
                expect.confirm(undone["metadata"]["name"], None)  # not ours to expect any more
            return problem
        expect.created(created)
        made.append(created)
    return None


def _existing(api: Api, job: JobRef, name: str) -> InvalidSpecError | None:
    """A pod of this name exists: None if it is this job's (adopted), else why no attempt can start yet."""
    found = get_or_none(api.read_pod, job.namespace, name)
    owners = [ref.get("uid") for ref in ((found or {}).get("metadata") or {}).get("ownerReferences") or []
              if ref.get("controller")]
    if found is not None and owners == [job.uid]:
        return None
    owner = ", ".join(map(str, owners)) or "none"
    what = "is gone meanwhile" if found is None else f"belongs to another owner ({owner})"
    return InvalidSpecError(R.PREVIOUS_INCARNATION, f"pod {name} already exists and {what}: an earlier TrainingJob "
                                                    "of the same name is still stopping; waiting for it to go",
                            PREVIOUS_INCARNATION_RETRY_SECONDS)


def _ensure_service(api: Api, namespace: str, service: dict[str, Any]) -> InvalidSpecError | None:
    """Create the headless Service; a Service of that name that this job does not own is a conflict."""
    try:
        with priority(URGENT):
            unread(api.core.create_namespaced_service(namespace, cast(Any, service), _preload_content=False))
        return None
    except ApiException as exc:
        if exc.status != 409:
            return create_problem(exc)
    found = get_or_none(api.core.read_namespaced_service, service["metadata"]["name"], namespace)
    owner = service["metadata"]["ownerReferences"][0]["uid"]
    refs = (found.metadata.owner_references or []) if found is not None else []
    if found is None or any(ref.uid == owner for ref in refs):
        return None if found is not None else InvalidSpecError(R.CREATE_FAILED, "the Service vanished", 1.0)
    return InvalidSpecError(R.SERVICE_CONFLICT, f'service "{service["metadata"]["name"]}" exists and is not owned '
                                                f"by this TrainingJob: a multi-node job names its headless Service "
                                                f"after itself; rename the job or the Service", 30.0)


def create_problem(exc: ApiException) -> InvalidSpecError:
    """Why a pod create failed, as a condition reason: transient errors are retried with back-off."""
    message = api_message(exc)
    retry_after_seconds = retry_after(exc)
    if exc.status == 403 and "quota" in message:  # "exceeded quota", or "status unknown for quota" at first
        return InvalidSpecError(R.QUOTA_EXCEEDED, f"cannot create the pod: {message}", retry_after_seconds or 30.0)
    if exc.status in (400, 403, 422):  # the template is invalid, or forbidden: changing the spec fixes it
        return InvalidSpecError(R.INVALID_TEMPLATE, f"cannot create the pod: {message}", 30.0)
    return InvalidSpecError(R.CREATE_FAILED, f"cannot create the pod (HTTP {exc.status}): {message}",
                            retry_after_seconds or 5.0)


def delete_pod(api: Api, name: str, namespace: str, grace: int) -> None:
    try:
        with priority(URGENT):
            unread(api.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace,
                                                  body=client.V1DeleteOptions(grace_period_seconds=grace),
                                                  _preload_content=False))  # not read: not parsed
    except ApiException as exc:
        if exc.status != 404:
            raise


def annotate_pod(api: Api, name: str, namespace: str, wanted: dict[str, str]) -> None:
    """Set annotations on a pod (a checkpoint request); a pod gone meanwhile needs none."""
    try:
        with priority(URGENT):
            api.patch_pod(namespace, name, {"metadata": {"annotations": wanted}})
    except ApiException as exc:
        if exc.status != 404:
            raise


def finalizer_removal(finalizers: list[str], finalizer: str) -> list[dict[str, Any]]:
    """A JSON patch that removes `finalizer`, applied only if the list is still `finalizers` (no lost update)."""
    return [{"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != finalizer]}]


def release_pod(api: Api, pod: Pod) -> None:
    """Remove the operator's finalizer from a pod whose outcome is recorded (or whose job is gone)."""
    finalizers = pod["metadata"].get("finalizers") or []
    if R.POD_FINALIZER not in finalizers:
        return
    patch = finalizer_removal(finalizers, R.POD_FINALIZER)
    try:
        api.patch_pod(pod["metadata"]["namespace"], pod["metadata"]["name"], patch)
    except ApiException as exc:
        if exc.status not in (404, 409, 422):  # gone, or changed meanwhile: the next pass retries
            raise


def api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning `old` into `new`: keys that disappeared become null, at every depth (a merge patch
    merges objects key by key: an optional field left out of a nested object would otherwise stay)."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        patch[key] = status_patch(before, value) if isinstance(before, dict) and isinstance(value, dict) else value
    return patch


def write_status(api: Api, expect: Expectations, job: dict[str, Any], old: dict[str, Any],
                 new: dict[str, Any]) -> bool:
    """Patch the status only when it changed (and remember the result until the watch reports it); False on a
    write conflict."""
    patch = status_patch(old, new)
    if not patch or expect.already_pruned(new, old):  # nothing new, or exactly what the server pruned last time
        return True
    body = {"metadata": {"resourceVersion": job["metadata"]["resourceVersion"]}, "status": patch}
    try:
        written = api.patch_status(R.GROUP, R.VERSION, R.PLURAL, job["metadata"]["namespace"],
                                   job["metadata"]["name"], body)
    except ApiException as exc:
        if exc.status in (404, 409):
            return False
        raise
    expect.job = trim_job(written)
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


# -- Kueue ---------------------------------------------------------------------------------------------------------
def _carry_out_workload(api: Api, step: Pass, plan: WorkloadPlan) -> None:
    """The Workload actions of a plan (see kueue_policy). A write that races Kueue's own (409) is left to the next
    pass, which plans again from what the watch then says."""
    namespace, workload = step.job["metadata"]["namespace"], step.workload
    custom = api.custom
    try:
        if step.new_workload is not None:
            with priority(URGENT):
                custom.create_namespaced_custom_object(kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS,
                                                       step.new_workload)
        if workload is None:
            return
        if plan.replace:  # the next pass, once the watch shows it gone, creates a new one
            release_workload(api, namespace, workload.name, list(workload.finalizers))
            custom.delete_namespaced_custom_object(kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS,
                                                   workload.name)
            return
        merge = "application/merge-patch+json"
        meta: dict[str, Any] = {}
        if plan.annotations:
            meta["annotations"] = plan.annotations
        spec = {"active": plan.active} if plan.active is not None else None
        if meta or spec is not None:
            body = {**({"metadata": meta} if meta else {}), **({"spec": spec} if spec is not None else {})}
            custom.patch_namespaced_custom_object(kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS,
                                                  workload.name, body, _content_type=merge)
        if plan.status_patch is not None:
            custom.patch_namespaced_custom_object_status(kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS,
                                                         workload.name, plan.status_patch, _content_type=merge)
        if plan.release_finalizer:
            release_workload(api, namespace, workload.name, list(workload.finalizers))
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise


def _priority(api: Api, seen: Observed) -> tuple[str, str, int] | None:
    """The Workload's priority, as Kueue resolves a job's (kueue.x-k8s.io/priority-class, else the pods'
    priorityClassName); None if it has none. One GET, when the Workload is created."""
    workload_class = seen.labels.get(kueue.LABEL_PRIORITY_CLASS)
    if workload_class:
        found = get_or_none(api.custom.get_cluster_custom_object, kueue.GROUP, kueue.VERSION,
                            "workloadpriorityclasses", workload_class)
        return ("WorkloadPriorityClass", workload_class, int(found.get("value", 0))) if found else None
    pod_class = seen.spec.template["spec"].get("priorityClassName")
    if pod_class:
        found = get_or_none(client.SchedulingV1Api(api.core.api_client).read_priority_class, pod_class)
        return ("PriorityClass", str(pod_class), int(found.value)) if found is not None else None
    return None


def release_workload(api: Api, namespace: str, name: str, finalizers: list[str]) -> None:
    """Remove Kueue's resource-in-use finalizer, which Kueue leaves to the job's controller (its quota goes back; a
    Workload being deleted is then gone). `finalizers` is the list as last watched: the patch applies only if it is
    still that list (else 422: the next pass, woken by the watch, tries again with the new one)."""
    if kueue.FINALIZER not in finalizers:
        return
    patch = finalizer_removal(finalizers, kueue.FINALIZER)
    try:
        api.custom.patch_namespaced_custom_object(kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS, name,
                                                  patch, _content_type="application/json-patch+json")
    except ApiException as exc:
        if exc.status not in (404, 409, 422):
            raise
