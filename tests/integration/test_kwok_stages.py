"""kwok's fake nodes with our stages (the scale benchmark's cluster): pods run, end with a chosen exit code, and
an eviction ends them as a kubelet would; the operator treats them as it treats real pods."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.cluster.launcher import kwok_node
from tests.kube import Jobs, evict, wait_for

pytestmark = pytest.mark.cluster
NODE = "kwok-stage-node"
TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}  # keeps other tests' pods off


@pytest.fixture(scope="module")
def kwok(cluster):  # type: ignore[no-untyped-def]
    """kwok running against the session's control plane with one tainted fake node."""
    cluster.start_kwok()
    core = client.CoreV1Api()
    core.create_node(kwok_node(NODE, taints=(TAINT,)))
    wait_for("kwok node Ready", lambda: any(c.type == "Ready" and c.status == "True" for c in
                                            core.read_node(NODE).status.conditions or []), 120)
    yield NODE
    core.delete_node(NODE)
    proc = cluster.procs.pop("kwok")
    proc.terminate()
    proc.wait(20)


def fake_job(name: str) -> dict:
    return {"apiVersion": "ckpt.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
            "spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/hostname": NODE},
                                           "tolerations": [{**TAINT, "operator": "Equal"}],
                                           "containers": [{"name": "trainer", "image": "registry.invalid/fake"}]}},
                     "checkpoint": {"nfs": {"server": "nfs.invalid", "path": "/ckpt"}}}}


def end_with(core: client.CoreV1Api, namespace: str, pod: str, code: int) -> None:
    core.patch_namespaced_pod(pod, namespace, {"metadata": {"labels": {"kwok.ckpt.dev/exit-code": str(code)}}})


def test_fake_pods_run_and_end_with_the_exit_code_a_test_chooses(kwok, operator, core, namespace):
    jobs = Jobs(namespace)
    jobs.create(fake_job("fake"))
    jobs.wait_phase("fake", "Running", 60)
    end_with(core, namespace, "fake-0", 1)
    st = jobs.wait("fake", "one failure", lambda s: s.get("failures") == 1, 60)
    assert st["lastOutcome"]["exitCode"] == 1 and st["preemptions"] == 0
    jobs.wait("fake", "attempt 1 running", lambda s: s.get("attempt") == 1 and s.get("phase") == "Running", 60)
    end_with(core, namespace, "fake-1", 0)
    st = jobs.wait_phase("fake", "Succeeded", 60)
    assert st["lastOutcome"]["exitCode"] == 0


def test_an_evicted_fake_pod_ends_like_a_real_one_and_is_replaced(kwok, operator, core, namespace):
    jobs = Jobs(namespace)
    jobs.create(fake_job("evicted"))
    jobs.wait_phase("evicted", "Running", 60)
    evict(core, namespace, "evicted-0")
    st = jobs.wait("evicted", "attempt 1 running", lambda s: s.get("attempt") == 1 and s.get("phase") == "Running",
                   60)
    assert (st["preemptions"], st["failures"]) == (1, 0)
    assert st["lastOutcome"]["reason"] == "EvictionByEvictionAPI" and st["lastOutcome"]["exitCode"] == 143
    # the old pod turned Failed, and is removed once the operator released its finalizer
    wait_for("evicted pod removed", lambda: "evicted-0" not in [
        p.metadata.name for p in core.list_namespaced_pod(namespace).items], 60)
