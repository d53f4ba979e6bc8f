"""What one status write costs the API server: a TrainingJob's (custom resource) against a batch/v1 Job's.

One fresh local control plane, no controller acting (the Jobs are suspended, no operator runs): N objects of each
kind, then W status merge patches of each from 8 threads; prints the CPU seconds of kube-apiserver and etcd per
write (from /proc), for a status like the operator's after a preemption and for a one-field patch.
--no-cel applies the CRD without its CEL rules (x-kubernetes-validations) to measure what they cost.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubernetes import client, config  # noqa: E402
from operator_scale import proc_usage  # noqa: E402 (benchmarks/, first on sys.path as a script)

from tests.cluster.launcher import Cluster  # noqa: E402

NAMESPACE = "write-cost"


def training_job_status(index: int) -> dict[str, Any]:
    """A status like the operator's after a preemption: five conditions, the last outcome, two attempt records."""
    stamp = f"2026-12-07T03:{index % 60:02d}:{(index // 60) % 60:02d}Z"
    pod = f"tj-x-{index}"

    def condition(kind: str, status: str, reason: str) -> dict[str, str]:
        return {"type": kind, "status": status, "reason": reason, "message": f"pod {pod} {reason}",
                "lastTransitionTime": stamp}

    return {"phase": "Running", "attempt": 2 + index, "preemptions": 1 + index, "failures": 0,
            "observedGeneration": 1, "activePod": pod, "startTime": stamp, "worldSize": 1,
            "lastOutcome": {"attempt": 1 + index, "result": "Preempted", "reason": "Evicted", "message": "evicted",
                            "finishedAt": stamp},
            "conditions": [condition("Running", "True", "PodRunning"), condition("Preempted", "False", "PodRunning"),
                           condition("Backoff", "False", "Resubmitted"), condition("Complete", "False", "Running"),
                           condition("Failed", "False", "Running")],
            "workers": [{"rank": 0, "pod": pod, "node": "kwok-node-1", "state": "Running"}],
            "attempts": [{"attempt": attempt, "pods": [f"tj-x-{attempt}"], "nodes": ["kwok-node-1"],
                          "startTime": stamp, "endTime": stamp, "result": "Preempted", "reason": "Evicted"}
                         for attempt in range(2)],
            "progress": {"step": index, "display": f"{index}/?"}}


def crds_without_cel(source: Path, target: Path) -> Path:
    """Copies of the CRDs with every x-kubernetes-validations removed."""

    def strip(node: Any) -> None:
        if isinstance(node, dict):
            node.pop("x-kubernetes-validations", None)
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    target.mkdir()
    for path in source.glob("*.yaml"):
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        if all(doc.get("kind") == "CustomResourceDefinition" for doc in docs):
            for doc in docs:
                strip(doc)
            (target / path.name).write_text(yaml.safe_dump_all(docs))
    return target


def create_objects(count: int) -> None:
    custom, batch = client.CustomObjectsApi(), client.BatchV1Api()
    template = {"metadata": {"labels": {"app": "write-cost"}}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "trainer", "image": "registry.invalid/trainer:1", "command": ["python", "train.py"]}]}}
    for index in range(count):
        custom.create_namespaced_custom_object("ckpt.dev", "v1alpha1", NAMESPACE, "trainingjobs", {
            "apiVersion": "ckpt.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": f"tj-{index}"},
            "spec": {"template": template, "checkpoint": {"nfs": {"server": "nfs.invalid", "path": "/c"}}}})
        batch.create_namespaced_job(NAMESPACE, {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"job-{index}"},
            "spec": {"suspend": True, "backoffLimit": 0, "template": template}})


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--writes", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-cel", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-write-cost-"))
    cluster = Cluster(workdir).start(nodes=(), progress=True)
    try:
        config.load_kube_config(str(cluster.kubeconfig))
        cluster.install_crds(crds_without_cel(ROOT / "crds", workdir / "crds") if args.no_cel else ROOT / "crds")
        client.CoreV1Api().create_namespace({"metadata": {"name": NAMESPACE}})
        create_objects(args.objects)
        custom, batch, count = client.CustomObjectsApi(), client.BatchV1Api(), args.objects
        cases: dict[str, Callable[[int], object]] = {
            "trainingjobs/status merge patch": lambda i: custom.patch_namespaced_custom_object_status(
                "ckpt.dev", "v1alpha1", NAMESPACE, "trainingjobs", f"tj-{i % count}",
                {"status": training_job_status(i)}),
            "trainingjobs/status small patch": lambda i: custom.patch_namespaced_custom_object_status(
                "ckpt.dev", "v1alpha1", NAMESPACE, "trainingjobs", f"tj-{i % count}", {"status": {"attempt": 2 + i}}),
            "jobs/status merge patch (baseline)": lambda i: batch.patch_namespaced_job_status(
                f"job-{i % count}", NAMESPACE, {"status": {"active": 1 + i % 2, "ready": i % 2, "terminating": 0}}),
        }
        apiserver, etcd = cluster.procs["kube-apiserver"].pid, cluster.procs["etcd"].pid
        for round_number in range(args.rounds):
            for name, write in cases.items():
                (api0, _), (etcd0, _), start = proc_usage(apiserver), proc_usage(etcd), time.monotonic()
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(write, range(round_number * args.writes, (round_number + 1) * args.writes)))
                api_ms = 1e3 * (proc_usage(apiserver)[0] - api0) / args.writes
                etcd_ms = 1e3 * (proc_usage(etcd)[0] - etcd0) / args.writes
                print(f"round {round_number + 1} {name:<36} {args.writes} writes in {time.monotonic() - start:6.1f}s"
                      f"  apiserver {api_ms:6.2f} ms/write  etcd {etcd_ms:6.2f} ms/write", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
