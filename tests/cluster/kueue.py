"""Kueue v0.17's manager on the local control plane (test infrastructure only): its CRDs, a serving certificate
signed by the cluster's CA, its webhooks registered by URL, and a default ResourceFlavor and ClusterQueue for the
test nodes. `python -m tests.cluster.kueue CERTS -- KUEUE ARGS...` runs the manager in a private mount namespace
where its hard-coded metrics certificate path (/etc/kueue/metrics/certs) exists, without touching the host's /etc.
"""

from __future__ import annotations

import base64
import copy
import ctypes
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.podinit import _mount, _shadow

VERSION = "v0.17.0"
FRAMEWORKS = ["batch/job"]
EXTERNAL = ["TrainingJob.v1alpha1.ckpt.dev"]
# the webhooks of what this Kueue serves (the others, of frameworks it does not run, would fail every request)
SERVED_WEBHOOKS = ("workload", "clusterqueue", "cohort", "resourceflavor", "batch-v1-job")
CLONE_NEWNS = 0x00020000
METRICS_CERTS = "/etc/kueue/metrics/certs"
QUEUE = "ckpt-queue"  # the default ClusterQueue; tests create LocalQueues pointing at it


def serving_cert(pki: Path, directory: Path) -> None:
    """tls.crt/tls.key for 127.0.0.1, signed by the cluster's CA (the API server trusts it via caBundle)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
                    "-subj", "/CN=kueue-webhook"], cwd=directory, check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", "tls.csr", "-CA", str(pki / "ca.crt"), "-CAkey",
                    str(pki / "ca.key"), "-CAcreateserial", "-out", "tls.crt", "-days", "3650", "-extfile",
                    "san.cnf"], cwd=directory, check=True, capture_output=True)


def configuration(namespace: str, webhook_port: int, metrics_port: int, health_port: int, certs: Path,
                  wait_for_pods_ready: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": namespace,
        "leaderElection": {"leaderElect": False},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(certs)},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "internalCertManagement": {"enable": False},
        "featureGates": {"VisibilityOnDemand": False},
        "integrations": {"frameworks": FRAMEWORKS, "externalFrameworks": EXTERNAL},
        "manageJobsWithoutQueueName": False,
    }
    if wait_for_pods_ready is not None:
        config["waitForPodsReady"] = wait_for_pods_ready
    return config


def webhook_configurations(manifests: Path, port: int, ca: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations with each webhook called by URL on this host, the others left out."""
    bundle = base64.b64encode(ca).decode()
    found = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        config = copy.deepcopy(doc)
        config["metadata"] = {"name": f"kueue-{doc['metadata']['name']}"}
        hooks = []
        for hook in config.get("webhooks") or []:
            path = hook["clientConfig"]["service"]["path"]
            if not any(part in path for part in SERVED_WEBHOOKS):
                continue
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
            hooks.append(hook)
        config["webhooks"] = hooks
        found.append(config)
    return found


def local_queue(namespace: str, name: str = QUEUE, cluster_queue: str = QUEUE) -> dict[str, Any]:
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}}


def default_queue_objects(cpu: str, memory: str, namespace: str | None = None) -> list[dict[str, Any]]:
    """A ResourceFlavor and a ClusterQueue (quota for `cpu` and `memory`) every namespace may use, and a LocalQueue
    of the same name in `namespace` if given."""
    local = [local_queue(namespace)] if namespace else []
    return [*local,
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": QUEUE},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [
             {"name": "default", "resources": [{"name": "cpu", "nominalQuota": cpu},
                                               {"name": "memory", "nominalQuota": memory}]}]}]}},
    ]


def main() -> int:
    """In a private mount namespace: the certificates where Kueue's metrics server looks, then exec Kueue."""
    certs, command = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        print(f"kueue runner: unshare failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 126
    _mount("--make-rprivate", "/")
    _shadow("/etc", os.path.join(os.path.dirname(certs), "shadow-etc"))
    os.makedirs(METRICS_CERTS, exist_ok=True)
    _mount("--bind", certs, METRICS_CERTS)
    os.execv(command[0], command)
    return 127


if __name__ == "__main__":
    sys.exit(main())


