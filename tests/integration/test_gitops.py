"""What GitOps tools read: `kubectl wait` on each terminal state, kstatus (Flux, kpt) through the real cli-utils
library, observedGeneration per condition, and a checkpoint-policy change that applies from the next attempt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.kube import Jobs, evict, progress, trainingjob, wait_for

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).parents[2]
TRAINER = Path(__file__).parent / "trainers" / "sdk_trainer.py"


def trainer(steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(TRAINER), "--steps", str(steps), "--every-steps", "5", "--step-seconds", "0.05",
            *extra]


@pytest.fixture(scope="module")
def kstatus() -> str:
    out = subprocess.run(["bash", str(ROOT / "hack" / "build-tools.sh"), "kstatus"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return str(Path(out.stdout.strip().splitlines()[-1]) / "kstatus")


def read_status(kstatus: str, cluster, namespace: str, name: str) -> str:  # type: ignore[no-untyped-def]
    """kstatus' verdict (InProgress, Current, Failed, ...) on the object as the API server serves it."""
    body = subprocess.run([cluster.kubectl, "get", "tj", name, "-n", namespace, "-o", "json"], env=cluster.env(),
                          capture_output=True, text=True, check=True).stdout
    out = subprocess.run([kstatus], input=body, capture_output=True, text=True, check=True)
    return out.stdout.split("\t")[0]


def kubectl_wait(cluster, namespace: str, name: str, condition: str, timeout: int = 120) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run([cluster.kubectl, "wait", f"--for={condition}", f"--timeout={timeout}s", "-n", namespace,
                          f"tj/{name}"], env=cluster.env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "condition met" in out.stdout, out.stdout


def test_kubectl_wait_and_kstatus_read_every_terminal_state(operator, cluster, namespace, claim, kstatus):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("ok", trainer(60)))
    jobs.create(trainingjob("bad", trainer(60, "--crash-at", "3"), backoffLimit=0))
    jobs.create(trainingjob("paused", trainer(100000)))
    jobs.wait_phase("ok", "Running", 60)
    assert read_status(kstatus, cluster, namespace, "ok") == "InProgress"  # a running job is not done: like a Job
    kubectl_wait(cluster, namespace, "ok", "condition=Complete")
    kubectl_wait(cluster, namespace, "ok", "condition=Ready")
    assert read_status(kstatus, cluster, namespace, "ok") == "Current"
    kubectl_wait(cluster, namespace, "bad", "condition=Failed")
    kubectl_wait(cluster, namespace, "bad", "condition=Stalled")
    assert read_status(kstatus, cluster, namespace, "bad") == "Failed"
    wait_for("paused trainer started", lambda: progress(claim / "paused"), 60)
    jobs.patch_spec("paused", {"suspend": True})
    kubectl_wait(cluster, namespace, "paused", "condition=Ready")  # suspended and stopped: what the spec asks
    assert jobs.status("paused")["phase"] == "Suspended"
    assert read_status(kstatus, cluster, namespace, "paused") == "Current"
    for name in ("ok", "bad", "paused"):
        job = jobs.get(name)
        generation = job["metadata"]["generation"]
        assert job["status"]["observedGeneration"] == generation
        assert all(c["observedGeneration"] == generation for c in job["status"]["conditions"]), job["status"]


def test_a_checkpoint_policy_change_applies_from_the_next_attempt(operator, cluster, core, namespace, claim,
                                                                 kstatus):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("pol", trainer(200)))
    wait_for("trainer started", lambda: progress(claim / "pol"), 60)
    jobs.patch_spec("pol", {"checkpoint": {"keep": 5, "mountPath": "/ckpt"}})
    kubectl_wait(cluster, namespace, "pol", "jsonpath={.status.observedGeneration}=2", 30)
    st = jobs.status("pol")
    applied = next(c for c in st["conditions"] if c["type"] == "PolicyApplied")
    assert (applied["status"], applied["reason"]) == ("False", "AppliesAtNextAttempt")
    assert "keep 3 -> 5" in applied["message"] and "mountPath /checkpoints -> /ckpt" in applied["message"]
    assert st["policy"] == {"keep": 3, "mountPath": "/checkpoints"}  # the running attempt keeps its own
    assert all(c["observedGeneration"] == 2 for c in st["conditions"])
    assert read_status(kstatus, cluster, namespace, "pol") == "InProgress"
    evict(core, namespace, "pol-0")
    wait_for("attempt 1 started", lambda: len(progress(claim / "pol")) == 2, 60)
    pod = core.read_namespaced_pod("pol-1", namespace)
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["CKPT_KEEP"] == "5" and env["CKPT_DIR"] == "/ckpt"
    assert any(m.mount_path == "/ckpt" for m in pod.spec.containers[0].volume_mounts)
    st = jobs.wait("pol", "policy applied", lambda s: any(
        c["type"] == "PolicyApplied" and c["status"] == "True" for c in s.get("conditions", [])), 30)
    assert st["policy"] == {"keep": 5, "mountPath": "/ckpt"}
    assert int(progress(claim / "pol")[1].split()[3]) > 0  # resumed from the same directory at the new mountPath
    jobs.wait_phase("pol", "Succeeded")
