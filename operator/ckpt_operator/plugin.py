"""kubectl-ckpt: `kubectl ckpt describe|suspend|resume|restart [--copy]|checkpoints JOB` for TrainingJobs."""

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
from .builders import CKPT_VOLUME, build_volume, storage_subpath
from .models import TrainingJobSpec


def _jobs() -> Any:  # the client's typed models add nothing for this small CLI
    return client.CustomObjectsApi()


def _core() -> Any:
    return client.CoreV1Api()


def _get(namespace: str, name: str) -> dict[str, Any]:
    return dict(_jobs().get_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, name))


def _patch_spec(namespace: str, name: str, spec: dict[str, Any]) -> None:
    _jobs().patch_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, name, {"spec": spec},
                                           _content_type="application/merge-patch+json")


def describe(namespace: str, name: str) -> int:
    job = _get(namespace, name)
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
        print(f"  {c['type']:<11} {c['status']:<6} {c['reason']:<24} {c.get('message', '')}")
    if st.get("workers"):
        print(f"Ranks (attempt {st.get('attempt', 0)}, {spec.get('workers')} workers):")
        print(f"  {'RANK':<5} {'POD':<30} {'NODE':<20} {'STATE':<12} {'EXIT':<5} {'REASON':<24} STOPPED")
        for w in st["workers"]:
            print(f"  {w['rank']:<5} {w['pod']:<30} {w.get('node') or '-':<20} {w['state']:<12} "
                  f"{w.get('exitCode', '-')!s:<5} {w.get('reason') or '-':<24} "
                  f"{'yes (gang)' if w.get('stopped') else '-'}")
    events = _core().list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    print("Timeline:")
    for e in sorted(events, key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp):
        stamp = e.last_timestamp or e.event_time or e.metadata.creation_timestamp
        print(f"  {stamp:%H:%M:%S}  {e.type:<7} {e.reason:<24} {e.message}")
    return 0


def checkpoints(namespace: str, name: str, timeout: float = 120) -> int:
    """Run `python -m ckpt_sdk ls` in a short-lived pod (the job's own image) that mounts its storage read-only."""
    job = _get(namespace, name)
    spec = TrainingJobSpec.model_validate(job["spec"])
    trainer = spec.template["spec"]["containers"][spec.trainer_index()]
    pod_name = f"{name}-ls-{uuid.uuid4().hex[:5]}"
    core = _core()
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name, "labels": {R.LABEL_JOB: name}},
        "spec": {"restartPolicy": "Never", "volumes": [build_volume(CKPT_VOLUME, spec.checkpoint, read_only=True)],
                 "containers": [{"name": "ls", "image": trainer.get("image", "python:3.11-slim"),
                                 "command": ["python", "-m", "ckpt_sdk", "ls", "/ckpt", "-o", "/dev/termination-log"],
                                 "volumeMounts": [{"name": CKPT_VOLUME, "mountPath": "/ckpt", "readOnly": True,
                                                   "subPath": storage_subpath(name, namespace, spec.checkpoint)}]}]}})
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = core.read_namespaced_pod(pod_name, namespace)
            if pod.status.phase in ("Succeeded", "Failed"):
                print(pod.status.container_statuses[0].state.terminated.message or "", end="")
                return 0 if pod.status.phase == "Succeeded" else 1
            time.sleep(0.5)
        print(f"timed out waiting for pod {pod_name}", file=sys.stderr)
        return 1
    finally:
        core.delete_namespaced_pod(pod_name, namespace, grace_period_seconds=0)


def restart(namespace: str, name: str, copy: bool) -> int:
    """Recreate the job with a fresh status (it resumes from its own checkpoints), or with --copy start a new
    job that warm-starts from this one's checkpoints and leave this one alone."""
    job = _get(namespace, name)
    spec = dict(job["spec"])
    spec["suspend"] = False
    if copy:
        new = f"{name[:44]}-r{uuid.uuid4().hex[:5]}"
        spec["resumeFrom"] = {"trainingJob": name}
        body = {"apiVersion": f"{R.GROUP}/{R.VERSION}", "kind": R.KIND, "metadata": {"name": new}, "spec": spec}
        _jobs().create_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, body)
        print(f"trainingjob.{R.GROUP}/{new} created, warm-starting from {name}")
        return 0
    _jobs().delete_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            _get(namespace, name)
            time.sleep(0.5)
        except ApiException as exc:
            if exc.status == 404:
                break
            raise
    meta = {"name": name, "labels": job["metadata"].get("labels") or {},
            "annotations": {k: v for k, v in (job["metadata"].get("annotations") or {}).items()
                            if not k.startswith("kubectl.kubernetes.io/")}}
    body = {"apiVersion": f"{R.GROUP}/{R.VERSION}", "kind": R.KIND, "metadata": meta, "spec": spec}
    _jobs().create_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, body)
    print(f"trainingjob.{R.GROUP}/{name} restarted; it resumes from its latest checkpoint")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubectl ckpt", description=__doc__)
    parser.add_argument("command", choices=["describe", "suspend", "resume", "restart", "checkpoints"])
    parser.add_argument("job")
    parser.add_argument("-n", "--namespace", default=None)
    parser.add_argument("--copy", action="store_true", help="restart: warm-start a new job instead")
    parser.add_argument("--kubeconfig", default=None)
    args = parser.parse_args(argv)
    config.load_kube_config(args.kubeconfig)  # type: ignore[no-untyped-call]
    namespace = args.namespace or config.list_kube_config_contexts(args.kubeconfig)[1]["context"].get(  # type: ignore[no-untyped-call]
        "namespace", "default")
    try:
        if args.command == "describe":
            return describe(namespace, args.job)
        if args.command in ("suspend", "resume"):
            _patch_spec(namespace, args.job, {"suspend": args.command == "suspend"})
            print(f"trainingjob.{R.GROUP}/{args.job} {'suspended' if args.command == 'suspend' else 'resumed'}")
            return 0
        if args.command == "restart":
            return restart(namespace, args.job, args.copy)
        return checkpoints(namespace, args.job)
    except ApiException as exc:
        try:
            message = json.loads(exc.body or "")["message"]
        except (ValueError, KeyError):
            message = exc.reason
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
