"""`kubectl ckpt suspend|resume|restart|checkpoints`: changing a job's course, never losing a checkpoint.

A restart in place stops the job first (suspend: its pods checkpoint and exit, however long its grace period),
sets checkpoints aside while the job still exists (a failure leaves it suspended, nothing deleted), keeps a copy of
the manifest on disk, and only then deletes and re-creates it. Every write is checked by the API server first
(dry run, strict field validation): a misspelled field is an error, not a silently pruned no-op; fields a restart
cannot change (the checkpoints were written for them) are refused before anything stops.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import reasons as R
from .builders import CKPT_VOLUME, build_volume, storage_subpath
from .errors import OperatorError
from .models import TrainingJobSpec
from .overrides import apply_overrides

STOP_MARGIN_SECONDS = 120.0  # past the grace period, for the kubelet to report the pods gone
TOOL_TIMEOUT_SECONDS = 300.0
# what a tool pod takes from the job's template, so it can pull the same image and land where the job may run
TOOL_POD_FIELDS = ("imagePullSecrets", "tolerations", "nodeSelector", "affinity", "securityContext",
                   "serviceAccountName", "priorityClassName")
TOOL_CONTAINER_FIELDS = ("image", "imagePullPolicy", "securityContext")


class PluginError(OperatorError):
    """A request the plugin refuses, with the reason for the user."""


def jobs_api() -> Any:  # the client's typed models add nothing for this small CLI
    return client.CustomObjectsApi()


def core_api() -> Any:
    return client.CoreV1Api()


def get_job(namespace: str, name: str) -> dict[str, Any]:
    return dict(jobs_api().get_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, name))


def now_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- tool pods on the job's storage -----------------------------------------------------------------------------
def tool_pod(namespace: str, name: str, spec: TrainingJobSpec, argv: list[str], read_only: bool) -> dict[str, Any]:
    """A pod that runs `python -m ckpt_sdk ARGV` in the job's own image, with its storage at /ckpt and what its
    template needs to pull that image and be scheduled (pull secrets, tolerations, node selector, security context)."""
    template = spec.template.get("spec") or {}
    trainer = spec.trainer()
    container = {key: trainer[key] for key in TOOL_CONTAINER_FIELDS if key in trainer}
    container.setdefault("image", "python:3.11-slim")
    container.update(name="tool", command=["python", "-m", "ckpt_sdk", *argv, "-o", "/dev/termination-log"],
                     terminationMessagePolicy="FallbackToLogsOnError",
                     volumeMounts=[{"name": CKPT_VOLUME, "mountPath": "/ckpt", "readOnly": read_only,
                                    "subPath": storage_subpath(name, namespace, spec.checkpoint)}])
    pod_spec = {key: template[key] for key in TOOL_POD_FIELDS if key in template}
    pod_spec.update(restartPolicy="Never", containers=[container],
                    volumes=[build_volume(CKPT_VOLUME, spec.checkpoint, read_only=read_only)])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name[:40]}-tool-{uuid.uuid4().hex[:5]}", "labels": {R.LABEL_JOB: name[:63]}},
            "spec": pod_spec}


def run_tool(namespace: str, name: str, spec: TrainingJobSpec, argv: list[str], read_only: bool,
             timeout: float = TOOL_TIMEOUT_SECONDS) -> tuple[bool, str]:
    """Run a tool pod to its end; (it succeeded, its output)."""
    core = core_api()
    pod = tool_pod(namespace, name, spec, argv, read_only)
    pod_name = pod["metadata"]["name"]
    core.create_namespaced_pod(namespace, pod)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = core.read_namespaced_pod(pod_name, namespace)
            if found.status.phase in ("Succeeded", "Failed"):
                ended = found.status.container_statuses[0].state.terminated
                return found.status.phase == "Succeeded", (ended.message if ended else "") or ""
            time.sleep(0.5)
        return False, f"timed out after {timeout:.0f}s waiting for pod {pod_name} (is its image pullable?)"
    finally:
        core.delete_namespaced_pod(pod_name, namespace, grace_period_seconds=0)


def checkpoints(namespace: str, name: str) -> int:
    """`python -m ckpt_sdk ls` in a short-lived pod that mounts the job's storage read-only."""
    ok, output = run_tool(namespace, name, TrainingJobSpec.model_validate(get_job(namespace, name)["spec"]),
                          ["ls", "/ckpt"], read_only=True)
    print(output, end="" if output.endswith("\n") else "\n")
    return 0 if ok else 1


# -- suspend, resume -----------------------------------------------------------------------------------------------
def suspend(namespace: str, name: str) -> int:
    _suspend(namespace, name)
    print(f"trainingjob.{R.GROUP}/{name} suspended")
    return 0


def _suspend(namespace: str, name: str) -> None:
    jobs_api().patch_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, name,
                                              {"spec": {"suspend": True}}, field_validation="Strict",
                                              _content_type="application/merge-patch+json")


def overridden(job: dict[str, Any], files: list[str], sets: list[str], command: str) -> tuple[dict[str, Any],
                                                                                             dict[str, str]]:
    """The job's spec with the overrides applied, and the annotations that record them for the operator."""
    texts = []
    for path in files:
        with open(path) as f:
            texts.append(f.read())
    spec, changes = apply_overrides(job["spec"], texts, sets)
    annotations = {}
    if changes:
        annotations[R.ANNOTATION_OVERRIDE] = json.dumps({"time": now_stamp(), "command": command, "changes": changes})
    return spec, annotations


def resume(namespace: str, name: str, files: list[str], sets: list[str]) -> int:
    """Continue a suspended job, or a Succeeded or Failed one (from its newest checkpoint), with any overrides."""
    job = get_job(namespace, name)
    spec, annotations = overridden(job, files, sets, "resume")
    spec["suspend"] = False
    phase = (job.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        annotations[R.ANNOTATION_RESUME_REQUEST] = f"{now_stamp()}-{uuid.uuid4().hex[:6]}"
    _replace(namespace, job, spec, annotations)
    what = f" after it {phase.lower()}" if phase in ("Succeeded", "Failed") else ""
    print(f"trainingjob.{R.GROUP}/{name} resumed{what}" + (" with overrides" if R.ANNOTATION_OVERRIDE in annotations
                                                           else ""))
    return 0


def _replace(namespace: str, job: dict[str, Any], spec: dict[str, Any], annotations: dict[str, str]) -> None:
    """Write the whole new spec (an override may remove fields) and the annotations, if nobody changed the job
    since it was read; a field the schema does not know is an error (strict field validation)."""
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion",
                                  "value": job["metadata"]["resourceVersion"]},
                                 {"op": "replace", "path": "/spec", "value": spec}]
    if annotations and not job["metadata"].get("annotations"):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops += [{"op": "add", "path": "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1"), "value": value}
            for key, value in annotations.items()]
    jobs_api().patch_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, job["metadata"]["name"], ops,
                                              field_validation="Strict", _content_type="application/json-patch+json")


# -- restart ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Restart:
    """What `kubectl ckpt restart` was asked to do."""

    namespace: str
    name: str
    copy: str | None  # a new job (this name, or generated) instead of restarting in place
    fresh: bool  # from step 0: every checkpoint set aside
    from_step: int | None  # from this older checkpoint: the newer ones set aside

    @property
    def start(self) -> str:
        if self.fresh:
            return "from step 0"
        return f"from step {self.from_step}" if self.from_step is not None else "from its latest checkpoint"


IMMUTABLE = {"checkpoint.persistentVolumeClaim": "its checkpoints live there", "checkpoint.nfs": "its checkpoints "
             "live there", "resumeFrom": "it is where the job warm-started from"}


def restart(request: Restart, files: list[str], sets: list[str]) -> int:
    """In place: stop the job, set checkpoints aside if asked, then delete and re-create it (a new incarnation)
    that resumes `request.start`. Never deletes a checkpoint. With `copy`: a new job instead, warm-starting from
    this one's checkpoints (or fresh); this one untouched."""
    if request.fresh and request.from_step is not None:
        raise PluginError("--fresh and --from-step exclude each other")
    job = get_job(request.namespace, request.name)
    spec, annotations = overridden(job, files, sets, "restart")
    spec["suspend"] = False
    if request.copy is not None:
        return _restart_as_copy(request, spec, annotations)
    _refuse_immutable(job["spec"], spec, request)
    body = _body(job, spec, annotations)
    _dry_run(request.namespace, body)
    parsed = TrainingJobSpec.model_validate(job["spec"])
    if request.from_step is not None:
        _check_step(request, parsed)  # before anything is stopped
    _stop(request, parsed)
    if request.fresh or request.from_step is not None:
        _set_aside(request, parsed)
    _recreate(request, job, body)
    print(f"trainingjob.{R.GROUP}/{request.name} restarted; it resumes {request.start}")
    return 0


def _restart_as_copy(request: Restart, spec: dict[str, Any], annotations: dict[str, str]) -> int:
    new = request.copy or f"{request.name[:44]}-r{uuid.uuid4().hex[:5]}"
    if request.fresh:
        spec.pop("resumeFrom", None)
    else:
        step = {"step": request.from_step} if request.from_step is not None else {}
        spec["resumeFrom"] = {"trainingJob": request.name, **step}
    body = {"apiVersion": f"{R.GROUP}/{R.VERSION}", "kind": R.KIND,
            "metadata": {"name": new, "annotations": annotations}, "spec": spec}
    jobs_api().create_namespaced_custom_object(R.GROUP, R.VERSION, request.namespace, R.PLURAL, body,
                                               field_validation="Strict")
    source = "from step 0" if request.fresh else f"warm-starting from {request.name}" + (
        f" step {request.from_step}" if request.from_step is not None else "")
    print(f"trainingjob.{R.GROUP}/{new} created, {source}")
    return 0


def _field(spec: dict[str, Any], path: str) -> Any:
    node: Any = spec
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _refuse_immutable(old: dict[str, Any], new: dict[str, Any], request: Restart) -> None:
    """Where the checkpoints live cannot change in place (`workers` may: a load reshards them)."""
    for path, why in IMMUTABLE.items():
        if _field(old, path) == _field(new, path):
            continue
        raise PluginError(f"restart in place cannot change {path} ({json.dumps(_field(old, path))} -> "
                          f"{json.dumps(_field(new, path))}): {why}. Nothing was changed; `kubectl ckpt restart "
                          f"{request.name} --copy NEW ...` starts a new job with it")


def _body(job: dict[str, Any], spec: dict[str, Any], annotations: dict[str, str]) -> dict[str, Any]:
    meta = job["metadata"]
    kept = {k: v for k, v in (meta.get("annotations") or {}).items()
            if not k.startswith(("kubectl.kubernetes.io/", f"{R.GROUP}/"))}
    return {"apiVersion": f"{R.GROUP}/{R.VERSION}", "kind": R.KIND,
            "metadata": {"name": meta["name"], "labels": meta.get("labels") or {},
                         "annotations": {**kept, **annotations}}, "spec": spec}


def _dry_run(namespace: str, body: dict[str, Any]) -> None:
    """The API server checks the new job (schema, CEL, unknown fields) before anything is stopped."""
    trial = {**body, "metadata": {**body["metadata"], "generateName": f"{body['metadata']['name'][:50]}-"}}
    trial["metadata"].pop("name")
    jobs_api().create_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, trial, dry_run="All",
                                               field_validation="Strict")


def _check_step(request: Restart, spec: TrainingJobSpec) -> None:
    ok, listing = run_tool(request.namespace, request.name, spec, ["ls", "/ckpt"], read_only=True)
    if not ok or not any(line.split()[:1] == [str(request.from_step)] for line in listing.splitlines()[1:]):
        raise PluginError(f"{request.name} has no complete checkpoint of step {request.from_step}:\n{listing}")


def _stop(request: Restart, spec: TrainingJobSpec) -> None:
    """Suspend the job and wait until none of its pods is alive: their SIGTERM saves are done."""
    timeout = spec.preemption.grace_period_seconds + STOP_MARGIN_SECONDS
    print(f"stopping {request.name}: its pods checkpoint and exit (up to {timeout:.0f}s)")
    _suspend(request.namespace, request.name)
    selector = f"{R.LABEL_JOB}={request.name[:63]},{R.LABEL_MANAGED_BY}={R.MANAGER}"
    deadline = time.monotonic() + timeout
    while any(pod.status.phase not in ("Succeeded", "Failed") for pod in
              core_api().list_namespaced_pod(request.namespace, label_selector=selector).items):
        if time.monotonic() > deadline:
            raise PluginError(f"{request.name}'s pods still run after {timeout:.0f}s; it is left suspended and "
                              f"nothing was deleted: `kubectl ckpt resume {request.name}` continues it")
        time.sleep(0.5)


def _set_aside(request: Restart, spec: TrainingJobSpec) -> None:
    """Move checkpoints aside while the (suspended) job still exists: a failure deletes nothing."""
    argv = ["set-aside", "/ckpt"] + (["--after", str(request.from_step)] if request.from_step is not None else [])
    ok, output = run_tool(request.namespace, request.name, spec, argv, read_only=False)
    print(output.strip())
    if not ok:
        raise PluginError(f"setting checkpoints aside failed; {request.name} is left suspended and was not "
                          f"deleted: fix the storage and retry, or `kubectl ckpt resume {request.name}`")


def _recreate(request: Restart, job: dict[str, Any], body: dict[str, Any]) -> None:
    """Delete the job and create it again; its manifest is kept on disk first, and named if anything fails."""
    with tempfile.NamedTemporaryFile("w", prefix=f"{request.name}-", suffix=".json", delete=False) as saved:
        json.dump(body, saved, indent=2)
    print(f"deleting {request.name} to re-create it (its manifest is saved in {saved.name})")
    jobs_api().delete_namespaced_custom_object(R.GROUP, R.VERSION, request.namespace, R.PLURAL, request.name,
                                               body=client.V1DeleteOptions(preconditions=client.V1Preconditions(
                                                   uid=job["metadata"]["uid"])))
    deadline = time.monotonic() + STOP_MARGIN_SECONDS
    try:
        while _exists(request.namespace, request.name):  # the job, or a pod of it (failed ones are kept)
            if time.monotonic() > deadline:
                raise PluginError(f"{request.name} is still being deleted after {STOP_MARGIN_SECONDS:.0f}s")
            time.sleep(0.5)
        jobs_api().create_namespaced_custom_object(R.GROUP, R.VERSION, request.namespace, R.PLURAL, body,
                                                   field_validation="Strict")
    except (ApiException, PluginError) as exc:
        raise PluginError(f"{request.name} was deleted and could not be re-created ({exc}); its checkpoints are "
                          f"kept: re-create it with `kubectl create -f {saved.name}`") from exc


def _exists(namespace: str, name: str) -> bool:
    try:
        get_job(namespace, name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        selector = f"{R.LABEL_JOB}={name[:63]},{R.LABEL_MANAGED_BY}={R.MANAGER}"
        return bool(core_api().list_namespaced_pod(namespace, label_selector=selector).items)
    return True
