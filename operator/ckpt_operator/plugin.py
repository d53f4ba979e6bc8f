"""kubectl-ckpt: `kubectl ckpt describe|suspend|resume|restart|checkpoints|logs JOB` for TrainingJobs.

    kubectl ckpt describe JOB [-o json]          status, per-attempt history, ranks, timeline
    kubectl ckpt suspend JOB                     checkpoint and stop; `resume` continues
    kubectl ckpt resume JOB [-f F] [--set P=V]   continue (also a Succeeded or Failed job), with spec overrides
    kubectl ckpt restart JOB [--fresh | --from-step N] [--copy [NEW]] [-f F] [--set P=V]
    kubectl ckpt checkpoints JOB                 list the job's checkpoints (a short-lived pod reads its storage)
    kubectl ckpt logs JOB [--attempt N] [--rank R]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import reasons as R
from .builders import CKPT_VOLUME, build_volume, member_names, storage_subpath
from .errors import OperatorError
from .models import TrainingJobSpec
from .overrides import apply_overrides

COMMANDS = ("describe", "suspend", "resume", "restart", "checkpoints", "logs")


class PluginError(OperatorError):
    """A request the plugin refuses, with the reason for the user."""


def _jobs() -> Any:  # the client's typed models add nothing for this small CLI
    return client.CustomObjectsApi()


def _core() -> Any:
    return client.CoreV1Api()


def _get(namespace: str, name: str) -> dict[str, Any]:
    return dict(_jobs().get_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, name))


def _patch_spec(namespace: str, name: str, spec: dict[str, Any]) -> None:
    _jobs().patch_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, name, {"spec": spec},
                                           _content_type="application/merge-patch+json")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- describe ------------------------------------------------------------------------------------------------
def describe(namespace: str, name: str, output: str | None = None) -> int:
    job = _get(namespace, name)
    events = _core().list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    def when(event: Any) -> Any:
        return event.last_timestamp or event.event_time or event.metadata.creation_timestamp

    ordered = sorted(events, key=lambda event: (when(event), int(event.metadata.resource_version or 0)))
    timeline = [(when(event), event) for event in ordered]
    if output == "json":
        print(json.dumps({"name": name, "namespace": namespace, "spec": job["spec"], "status": job.get("status") or {},
                          "events": [{"time": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"), "type": e.type,
                                      "reason": e.reason, "message": e.message} for stamp, e in timeline]},
                         indent=2))
        return 0
    spec, st = job["spec"], job.get("status") or {}
    ckpt = spec["checkpoint"]
    storage = (f"pvc/{ckpt['persistentVolumeClaim']['claimName']}" if "persistentVolumeClaim" in ckpt
               else f"nfs {ckpt['nfs']['server']}:{ckpt['nfs']['path']}")
    last = st.get("lastCheckpoint") or {}
    rows = [
        ("Name", f"{namespace}/{name}"), ("Phase", st.get("phase", "-")), ("Attempt", st.get("attempt", 0)),
        ("Preemptions", f"{st.get('preemptions', 0)} (limit {spec['preemption'].get('maxPreemptions', 'none')})"),
        ("Failures", f"{st.get('failures', 0)} (backoffLimit {spec.get('backoffLimit')})"),
        ("Last checkpoint", f"step {last.get('step')} at {last.get('time')}" if last else "none yet"),
        ("Storage", f"{storage} mounted at {ckpt['mountPath']}, keep {ckpt['keep']}"),
        ("Grace period", f"{spec['preemption']['gracePeriodSeconds']}s"), ("Suspended", spec.get("suspend", False)),
    ]
    if st.get("message"):
        rows.append(("Message", st["message"]))
    notice = st.get("interruption")
    if notice:
        action = "moving the pods" if notice.get("migrating") else f"checkpoint requested, moving at " \
            f"{notice['migrateTime']}"
        rows.append(("Interruption", f"attempt {notice['attempt']}: node {notice['node']} has {notice['taint']} "
                                     f"(seen {notice['seenTime']}, deadline {notice['deadline']}): {action}"))
    fallback = st.get("fallback") or {}
    if fallback.get("active"):
        rows.append(("Fallback", f"in force since {fallback.get('since')} (preemption.fallback.templatePatch)"))
    for key, value in rows:
        print(f"{key + ':':<17}{value}")
    print("Conditions:")
    for c in st.get("conditions", []):
        print(f"  {c['type']:<14} {c['status']:<6} {c['reason']:<24} {c.get('message', '')}")
    _print_attempts(st.get("attempts") or [])
    if st.get("workers"):
        print(f"Ranks (attempt {st.get('attempt', 0)}, {spec.get('workers')} workers):")
        print(f"  {'RANK':<5} {'POD':<30} {'NODE':<20} {'STATE':<12} {'EXIT':<5} {'REASON':<24} STOPPED")
        for w in st["workers"]:
            print(f"  {w['rank']:<5} {w['pod']:<30} {w.get('node') or '-':<20} {w['state']:<12} "
                  f"{w.get('exitCode', '-')!s:<5} {w.get('reason') or '-':<24} "
                  f"{'yes (gang)' if w.get('stopped') else '-'}")
    if st.get("overrides"):
        print("Overrides:")
        for record in st["overrides"]:
            print(f"  {record['time']}  kubectl ckpt {record['command']:<8} (from attempt "
                  f"{record.get('attempt', '-')}): {json.dumps(record['changes'])[:200]}")
    print("Timeline:")
    for stamp, e in timeline:
        print(f"  {stamp:%H:%M:%S}  {e.type:<7} {e.reason:<24} {e.message}")
    return 0


def _print_attempts(attempts: list[dict[str, Any]]) -> None:
    """One row per attempt: where it ran, when, how it ended, what it resumed from and what it redid."""
    if not attempts:
        return
    print("Attempts:")
    print(f"  {'#':<3} {'POD':<24} {'NODE':<16} {'START':<9} {'END':<9} {'OUTCOME':<10} {'REASON':<24} "
          f"{'FROM':>6} {'CKPT':>6} {'REDONE':>6}")
    for row in attempts:
        pods = row.get("pods") or ["-"]
        print(f"  {row['attempt']:<3} {pods[0] + (f' +{len(pods) - 1}' if len(pods) > 1 else ''):<24} "
              f"{','.join(row.get('nodes') or []) or '-':<16} {(row.get('startTime') or '-')[11:19]:<9} "
              f"{(row.get('endTime') or '-')[11:19]:<9} {row.get('result') or 'running':<10} "
              f"{row.get('reason') or '-':<24} {_dash(row.get('startStep')):>6} {_dash(row.get('checkpointStep')):>6} "
              f"{_dash(row.get('stepsRedone')):>6}")


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


# -- short-lived tool pods on the job's storage ----------------------------------------------------------------
def _run_tool(namespace: str, name: str, spec: TrainingJobSpec, argv: list[str], read_only: bool,
              timeout: float = 120) -> tuple[bool, str]:
    """Run `python -m ckpt_sdk ...` in a pod of the job's own image with its storage at /ckpt; (ok, output)."""
    trainer = spec.trainer()
    pod_name = f"{name[:40]}-tool-{uuid.uuid4().hex[:5]}"
    core = _core()
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name, "labels": {R.LABEL_JOB: name[:63]}},
        "spec": {"restartPolicy": "Never",
                 "volumes": [build_volume(CKPT_VOLUME, spec.checkpoint, read_only=read_only)],
                 "containers": [{"name": "tool", "image": trainer.get("image", "python:3.11-slim"),
                                 "command": ["python", "-m", "ckpt_sdk", *argv, "-o", "/dev/termination-log"],
                                 "terminationMessagePolicy": "FallbackToLogsOnError",
                                 "volumeMounts": [{"name": CKPT_VOLUME, "mountPath": "/ckpt", "readOnly": read_only,
                                                   "subPath": storage_subpath(name, namespace, spec.checkpoint)}]}]}})
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = core.read_namespaced_pod(pod_name, namespace)
            if pod.status.phase in ("Succeeded", "Failed"):
                return pod.status.phase == "Succeeded", pod.status.container_statuses[0].state.terminated.message or ""
            time.sleep(0.5)
        return False, f"timed out waiting for pod {pod_name}"
    finally:
        core.delete_namespaced_pod(pod_name, namespace, grace_period_seconds=0)


def checkpoints(namespace: str, name: str) -> int:
    """`python -m ckpt_sdk ls` in a short-lived pod that mounts the job's storage read-only."""
    ok, output = _run_tool(namespace, name, TrainingJobSpec.model_validate(_get(namespace, name)["spec"]),
                           ["ls", "/ckpt"], read_only=True)
    print(output, end="" if output.endswith("\n") else "\n")
    return 0 if ok else 1


# -- suspend, resume, restart ------------------------------------------------------------------------------
def _override(job: dict[str, Any], files: list[str], sets: list[str], command: str) -> tuple[dict[str, Any],
                                                                                              dict[str, str]]:
    """The job's spec with the overrides applied, and the annotations that record them for the operator."""
    texts = []
    for path in files:
        with open(path) as f:
            texts.append(f.read())
    spec, changes = apply_overrides(job["spec"], texts, sets)
    annotations = {}
    if changes:
        annotations[R.ANNOTATION_OVERRIDE] = json.dumps({"time": _now(), "command": command, "changes": changes})
    return spec, annotations


def resume(namespace: str, name: str, files: list[str], sets: list[str]) -> int:
    """Continue a suspended job, or a Succeeded or Failed one (from its newest checkpoint), with any overrides."""
    job = _get(namespace, name)
    spec, annotations = _override(job, files, sets, "resume")
    spec["suspend"] = False
    phase = (job.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        annotations[R.ANNOTATION_RESUME_REQUEST] = f"{_now()}-{uuid.uuid4().hex[:6]}"
    _replace(namespace, job, spec, annotations)
    what = f" after it {phase.lower()}" if phase in ("Succeeded", "Failed") else ""
    print(f"trainingjob.{R.GROUP}/{name} resumed{what}" + (" with overrides" if R.ANNOTATION_OVERRIDE in annotations
                                                           else ""))
    return 0


def _replace(namespace: str, job: dict[str, Any], spec: dict[str, Any], annotations: dict[str, str]) -> None:
    """Write the whole new spec (an override may remove fields) and the annotations, if nobody changed the job
    since it was read."""
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion",
                                  "value": job["metadata"]["resourceVersion"]},
                                 {"op": "replace", "path": "/spec", "value": spec}]
    if annotations and not job["metadata"].get("annotations"):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops += [{"op": "add", "path": "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1"), "value": value}
            for key, value in annotations.items()]
    _jobs().patch_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, job["metadata"]["name"], ops,
                                           _content_type="application/json-patch+json")


def restart(namespace: str, name: str, copy: str | None, fresh: bool, from_step: int | None, files: list[str],
            sets: list[str]) -> int:
    """In place: delete and re-create the job (a new incarnation) once its pods are gone; it resumes from its newest
    checkpoint, from `from_step` (newer ones set aside), or from step 0 (`fresh`: all set aside). Never deletes a
    checkpoint. `copy`: a new job instead, warm-starting from this one's checkpoints (or fresh); this one untouched."""
    if fresh and from_step is not None:
        raise PluginError("--fresh and --from-step exclude each other")
    job = _get(namespace, name)
    spec, annotations = _override(job, files, sets, "restart")
    spec["suspend"] = False
    if copy is not None:
        new = copy or f"{name[:44]}-r{uuid.uuid4().hex[:5]}"
        if fresh:
            spec.pop("resumeFrom", None)
        else:
            spec["resumeFrom"] = {"trainingJob": name, **({"step": from_step} if from_step is not None else {})}
        body = {"apiVersion": f"{R.GROUP}/{R.VERSION}", "kind": R.KIND,
                "metadata": {"name": new, "annotations": annotations}, "spec": spec}
        _jobs().create_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, body)
        source = "from step 0" if fresh else f"warm-starting from {name}" + (
            f" step {from_step}" if from_step is not None else "")
        print(f"trainingjob.{R.GROUP}/{new} created, {source}")
        return 0
    parsed = TrainingJobSpec.model_validate(job["spec"])
    if from_step is not None:  # check before anything is stopped
        ok, listing = _run_tool(namespace, name, parsed, ["ls", "/ckpt"], read_only=True)
        if not ok or not any(line.split()[:1] == [str(from_step)] for line in listing.splitlines()[1:]):
            raise PluginError(f"{name} has no complete checkpoint of step {from_step}:\n{listing}")
    _jobs().delete_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, name)
    _wait_gone(namespace, name)
    if fresh or from_step is not None:
        argv = ["set-aside", "/ckpt"] + (["--after", str(from_step)] if from_step is not None else [])
        ok, output = _run_tool(namespace, name, parsed, argv, read_only=False)
        print(output.strip())
        if not ok:
            raise PluginError(f"setting checkpoints aside failed; {name} was deleted and is not re-created: "
                              "re-apply it once the storage is fixed")
    meta = {"name": name, "labels": job["metadata"].get("labels") or {},
            "annotations": {**{k: v for k, v in (job["metadata"].get("annotations") or {}).items()
                               if not k.startswith(("kubectl.kubernetes.io/", f"{R.GROUP}/"))}, **annotations}}
    body = {"apiVersion": f"{R.GROUP}/{R.VERSION}", "kind": R.KIND, "metadata": meta, "spec": spec}
    _jobs().create_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, body)
    start = "from step 0" if fresh else f"from step {from_step}" if from_step is not None else \
        "from its latest checkpoint"
    print(f"trainingjob.{R.GROUP}/{name} restarted; it resumes {start}")
    return 0


def _wait_gone(namespace: str, name: str, timeout: float = 120) -> None:
    """Until the job and every pod of it are gone (their SIGTERM saves are done: nothing writes any more)."""
    selector = f"{R.LABEL_JOB}={name[:63]},{R.LABEL_MANAGED_BY}={R.MANAGER}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _get(namespace, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            if not _core().list_namespaced_pod(namespace, label_selector=selector).items:
                return
        time.sleep(0.5)
    raise PluginError(f"{name} or its pods still exist after {timeout:.0f}s")


# -- logs ------------------------------------------------------------------------------------------------------
def logs(namespace: str, name: str, attempt: int | None, rank: int | None) -> int:
    """The trainer's log of one attempt (default: the current one), every rank or one."""
    job = _get(namespace, name)
    spec = TrainingJobSpec.model_validate(job["spec"])
    number = attempt if attempt is not None else (job.get("status") or {}).get("attempt", 0)
    pods = member_names(name, number, spec.workers)
    if rank is not None:
        if not 0 <= rank < len(pods):
            raise PluginError(f"{name} has ranks 0..{len(pods) - 1}")
        pods = [pods[rank]]
    container = spec.trainer()["name"]
    missing = 0
    for pod in pods:
        try:
            text = _core().read_namespaced_pod_log(pod, namespace, container=container)
        except ApiException as exc:
            if exc.status != 404:
                raise
            print(f"error: pod {pod} of attempt {number} is gone: Kubernetes keeps a pod's log only while the pod "
                  f"exists (the operator removes preempted ones; failed ones are kept)", file=sys.stderr)
            missing += 1
            continue
        if len(pods) > 1:
            print(f"==> {pod} <==")
        print(text, end="" if text.endswith("\n") or not text else "\n")
    return 1 if missing == len(pods) else 0


# -- completion ------------------------------------------------------------------------------------------------
def complete(words: list[str]) -> list[str]:
    """kubectl's plugin completion (`kubectl_complete-ckpt`): commands, then TrainingJob names, then flags."""
    namespace: str | None = None
    args: list[str] = []
    for index, word in enumerate(words):
        if index > 0 and words[index - 1] in ("-n", "--namespace"):
            namespace = word
        elif word.startswith("--namespace="):
            namespace = word.partition("=")[2]
        elif not word.startswith("-"):
            args.append(word)
    if len(args) <= 1:
        prefix = args[0] if args else ""
        return [command for command in COMMANDS if command.startswith(prefix)]
    if len(args) == 2:
        try:
            config.load_kube_config()  # type: ignore[no-untyped-call]
            names = [item["metadata"]["name"] for item in _jobs().list_namespaced_custom_object(
                R.GROUP, R.VERSION, _namespace(namespace, None), R.PLURAL)["items"]]
        except Exception:  # completion never fails loudly
            return []
        return [job for job in names if job.startswith(args[1])]
    flags = {"describe": ["--output"], "resume": ["-f", "--set"], "logs": ["--attempt", "--rank"],
             "restart": ["--copy", "--fresh", "--from-step", "-f", "--set"]}
    return flags.get(args[0], [])


def complete_main() -> int:
    for word in complete(sys.argv[1:]):
        print(word)
    print(":4")  # cobra's ShellCompDirectiveNoFileComp: nothing else to offer
    return 0


# -- CLI -------------------------------------------------------------------------------------------------------
def _namespace(namespace: str | None, kubeconfig: str | None) -> str:
    if namespace:
        return namespace
    current = config.list_kube_config_contexts(kubeconfig)[1]  # type: ignore[no-untyped-call]
    return str(current["context"].get("namespace", "default"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubectl ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("job")
    parser.add_argument("-n", "--namespace", default=None)
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("-o", "--output", choices=["json"], default=None, help="describe: machine-readable")
    parser.add_argument("-f", "--filename", action="append", default=[],
                        help="resume/restart: a spec override file (a JSON merge patch of the spec; repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="resume/restart: set one spec field, e.g. "
                             "template.spec.containers[0].env[0].value=0.01 (repeatable)")
    parser.add_argument("--copy", nargs="?", const="", default=None, metavar="NEW",
                        help="restart: create a new job (NEW, or a generated name) instead; this one is untouched")
    parser.add_argument("--fresh", action="store_true", help="restart: from step 0; the checkpoints are set aside")
    parser.add_argument("--from-step", type=int, default=None,
                        help="restart: from this older checkpoint; the newer ones are set aside, never deleted")
    parser.add_argument("--attempt", type=int, default=None, help="logs: the attempt (default: the current one)")
    parser.add_argument("--rank", type=int, default=None, help="logs: one rank of a multi-node job")
    args = parser.parse_args(argv)
    config.load_kube_config(args.kubeconfig)  # type: ignore[no-untyped-call]
    namespace = _namespace(args.namespace, args.kubeconfig)
    try:
        if args.command == "describe":
            return describe(namespace, args.job, args.output)
        if args.command == "suspend":
            _patch_spec(namespace, args.job, {"suspend": True})
            print(f"trainingjob.{R.GROUP}/{args.job} suspended")
            return 0
        if args.command == "resume":
            return resume(namespace, args.job, args.filename, args.set)
        if args.command == "restart":
            return restart(namespace, args.job, args.copy, args.fresh, args.from_step, args.filename, args.set)
        if args.command == "logs":
            return logs(namespace, args.job, args.attempt, args.rank)
        return checkpoints(namespace, args.job)
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ApiException as exc:
        try:
            message = json.loads(exc.body or "")["message"]
        except (ValueError, KeyError):
            message = exc.reason
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
