"""The operator under real node faults, deletion, restarts and HA (issue #10), on the real control plane.

Faults come from the local test kubelet (`kubelet.ckpt.dev/mode`: partition, lost, reject, shutdown) and from
real API operations (foreground deletion, quotas, SIGKILLed operator replicas).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.conftest import NODE_LOST_SECONDS
from tests.kube import Jobs, PodRecorder, evict, progress, trainingjob, wait_for

pytestmark = pytest.mark.cluster
TRAINER = Path(__file__).parent / "trainers" / "sdk_trainer.py"
MODE = "kubelet.ckpt.dev/mode"


def trainer(steps: int, *extra: str, step_seconds: float = 0.05) -> list[str]:
    return [sys.executable, str(TRAINER), "--steps", str(steps), "--every-steps", "5", "--step-seconds",
            str(step_seconds), *extra]


def started(host: Path, job: str, attempt: int) -> bool:
    return any(line.startswith(f"attempt {attempt} start") for line in progress(host / job))


def set_mode(core: client.CoreV1Api, node: str, mode: str | None) -> None:
    core.patch_node(node, {"metadata": {"annotations": {MODE: mode}}})


def node_of(core: client.CoreV1Api, namespace: str, pod: str) -> str:
    return str(core.read_namespaced_pod(pod, namespace).spec.node_name)


def manifests(directory: Path) -> list[dict]:
    found = []
    for path in sorted(directory.glob("step-*/MANIFEST.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return found


def live_trainers(recorder: PodRecorder, job: str) -> int:
    """The most pods of `job` that the watch ever saw alive (created, not yet terminal or deleted) at once."""
    alive: set[str] = set()
    most = 0
    for kind, obj in recorder.events:
        name = obj["metadata"]["name"]
        if not name.startswith(f"{job}-"):
            continue
        ended = kind == "DELETED" or (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        (alive.discard if ended else alive.add)(name)
        most = max(most, len(alive))
    return most


# -- node faults ----------------------------------------------------------------------------------------
def test_a_20s_partition_heals_without_a_preemption_and_never_two_trainers(operator, core, namespace, claim):
    jobs, rec = Jobs(namespace), PodRecorder(core, namespace)
    jobs.create(trainingjob("part", trainer(1200)))  # ~60 s of training
    wait_for("trainer started", lambda: started(claim, "part", 0), 60)
    node = node_of(core, namespace, "part-0")
    set_mode(core, node, "partition")
    partitioned_at = time.monotonic()
    try:
        st = jobs.wait("part", "NodeUnreachable reported", lambda s: any(
            c["type"] == "Running" and c["reason"] == "NodeUnreachable" for c in s.get("conditions", [])), 60)
        assert st["preemptions"] == 0
        time.sleep(max(0.0, partitioned_at + 20 - time.monotonic()))  # the fault lasts 20 s (< the lost timeout)
        assert jobs.status("part")["preemptions"] == 0
    finally:
        set_mode(core, node, None)
    st = jobs.wait_phase("part", "Succeeded", 180)
    rec.stop()
    assert (st["preemptions"], st["failures"], st["attempt"]) == (0, 0, 0)
    assert live_trainers(rec, "part") == 1
    assert {obj["metadata"]["name"] for t, obj in rec.events if t == "ADDED"} == {"part-0"}
    jobs.wait_event("part", "Warning", "NodeUnreachable")


def test_a_partition_past_the_timeout_resubmits_elsewhere_and_fences_the_zombie(operator, cluster, core, namespace,
                                                                                   claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("zomb", trainer(2000)))  # ~100 s: the zombie is still training when it is replaced
    wait_for("trainer started", lambda: started(claim, "zomb", 0), 60)
    node = node_of(core, namespace, "zomb-0")
    uid = core.read_namespaced_pod("zomb-0", namespace).metadata.uid
    set_mode(core, node, "partition")
    try:
        st = jobs.wait("zomb", "node-lost preemption", lambda s: s.get("preemptions") == 1,
                       NODE_LOST_SECONDS + 60)
        assert st["lastOutcome"]["reason"] == "NodeLost" and st["attempt"] == 1
        wait_for("attempt 1 started", lambda: started(claim, "zomb", 1), 60)
        assert node_of(core, namespace, "zomb-1") != node  # the unreachable node is tainted: elsewhere
        # force-deleted from the API while its processes keep running on the partitioned node
        wait_for("zomb-0 gone from the API", lambda: not core.list_namespaced_pod(
            namespace, label_selector="ckpt.dev/attempt=0").items, 30)
        zombie_log = cluster.workdir / "kubelet" / node / "pods" / uid / "trainer" / "log"
        # its next commit is refused: by the fence, or because the new attempt removed its temp directory
        wait_for("the zombie's commit refused", lambda: "FencedError" in zombie_log.read_text()
                 or "CheckpointError" in zombie_log.read_text(), 60)
    finally:
        set_mode(core, node, None)
    resumed = int(progress(claim / "zomb")[1].split()[3])
    st = jobs.wait_phase("zomb", "Succeeded", 240)
    assert (st["preemptions"], st["failures"]) == (1, 0)
    late = [m for m in manifests(claim / "zomb") if m["step"] > resumed]
    assert late and all(m["attempt"] == 1 for m in late), [(m["step"], m["attempt"]) for m in late]


def test_admission_rejection_is_a_preemption_not_a_failure(operator, core, namespace, claim):
    nodes = [n.metadata.name for n in core.list_node().items]
    jobs = Jobs(namespace)
    body = trainingjob("rej", trainer(20))
    body["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": nodes[0]}
    set_mode(core, nodes[0], "reject")
    try:
        jobs.create(body)
        st = jobs.wait("rej", "rejected attempts", lambda s: s.get("preemptions", 0) >= 1, 60)
        assert st["lastOutcome"]["reason"] == "AdmissionRejected" and st["failures"] == 0
    finally:
        set_mode(core, nodes[0], None)
    st = jobs.wait_phase("rej", "Succeeded", 120)
    assert st["failures"] == 0
    jobs.wait_event("rej", "Warning", "AdmissionRejected")


# -- deletion, restarts, finalizers --------------------------------------------------------------------
def test_foreground_deletion_creates_no_new_attempt(operator, core, namespace, claim):
    jobs, rec = Jobs(namespace), PodRecorder(core, namespace)
    jobs.create(trainingjob("fg", trainer(1200)))
    wait_for("trainer started", lambda: started(claim, "fg", 0), 60)
    jobs.api.delete_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs", "fg",
                                             body=client.V1DeleteOptions(propagation_policy="Foreground"))
    wait_for("job and pods gone", lambda: not core.list_namespaced_pod(namespace).items and not jobs.api.
             list_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs")["items"], 90)
    rec.stop()
    assert {obj["metadata"]["name"] for t, obj in rec.events if t == "ADDED"} == {"fg-0"}
    assert f'ckpt_operator_resubmissions_total{{namespace="{namespace}"' not in operator.metrics()


def test_restart_at_attempt_two_is_a_new_incarnation_that_resumes(operator, cluster, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("again", trainer(600)))
    for attempt in (0, 1):
        wait_for(f"attempt {attempt} started", lambda a=attempt: started(claim, "again", a), 60)
        evict(core, namespace, f"again-{attempt}")
    jobs.wait("again", "attempt 2", lambda s: s.get("attempt") == 2, 60)
    wait_for("attempt 2 started", lambda: started(claim, "again", 2), 60)
    exe = str(Path(sys.executable).with_name("kubectl-ckpt"))
    out = subprocess.run([exe, "restart", "again", "-n", namespace], env=cluster.env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    st = jobs.wait_phase("again", "Succeeded", 180)
    assert (st["attempt"], st["failures"]) == (0, 0)  # the new incarnation's attempt 0 was not fenced out
    last = progress(claim / "again")[-1].split()
    assert last[:2] == ["attempt", "0"] and int(last[3]) > 0  # and it resumed from the old checkpoints


def test_finalizers_are_released_after_operator_downtime(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("orph", trainer(1200)))
    wait_for("trainer started", lambda: started(claim, "orph", 0), 60)
    operator.stop()
    try:
        jobs.api.delete_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs", "orph")
        wait_for("pod held by the finalizer", lambda: (p := core.read_namespaced_pod("orph-0", namespace))
                 .metadata.deletion_timestamp is not None and (p.status.phase in ("Succeeded", "Failed")), 60)
    finally:
        operator.start()
    wait_for("the startup sweep released the pod", lambda: not core.list_namespaced_pod(namespace).items, 60)


# -- classification --------------------------------------------------------------------------------------
def test_a_sigterm_nobody_explains_is_a_failure(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    suicide = [sys.executable, "-c", "import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: "
               "sys.exit(143)); os.kill(os.getpid(), signal.SIGTERM); time.sleep(10)"]
    jobs.create(trainingjob("selfterm", suicide, backoffLimit=0))
    st = jobs.wait_phase("selfterm", "Failed", 60)
    assert (st["failures"], st["preemptions"]) == (1, 0)
    assert st["lastOutcome"]["reason"] == "UnexplainedSigterm" and st["lastOutcome"]["exitCode"] == 143


def test_a_wrapper_exiting_0_after_a_preemption_is_not_success(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    wrapper = [str(Path(sys.executable).with_name("ckpt-run")), "--", "bash", "-c",
               "trap '' TERM; " + " ".join(trainer(600)) + "; exit 0"]
    jobs.create(trainingjob("wrap", wrapper))
    wait_for("trainer started", lambda: started(claim, "wrap", 0), 60)
    evict(core, namespace, "wrap-0")
    st = jobs.wait("wrap", "resubmitted", lambda s: s.get("attempt") == 1, 60)
    assert st["preemptions"] == 1 and st["lastOutcome"]["exitCode"] == 0
    assert st["lastOutcome"]["reason"] == "EvictionByEvictionAPI"
    st = jobs.wait_phase("wrap", "Succeeded", 120)
    assert st["attempt"] == 1


def test_a_finished_job_stops_its_sidecar(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    body = trainingjob("side", trainer(10))
    body["spec"]["template"]["spec"]["containers"].append(
        {"name": "sidecar", "image": "busybox", "command": [
            sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "time.sleep(3600)"]})
    jobs.create(body)
    jobs.wait_phase("side", "Succeeded", 60)
    wait_for("the pod (and its GPU) released", lambda: not core.list_namespaced_pod(namespace).items, 60)


@pytest.mark.parametrize("cause", ["Unschedulable", "CreateContainerConfigError"])
def test_a_pod_stuck_pending_is_reported(operator, core, namespace, claim, cause):
    jobs = Jobs(namespace)
    body = trainingjob("stuck", trainer(10))
    container = body["spec"]["template"]["spec"]["containers"][0]
    if cause == "Unschedulable":
        container["resources"] = {"requests": {"nvidia.com/gpu": "64"}, "limits": {"nvidia.com/gpu": "64"}}
    else:
        container["env"] = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}}]
    jobs.create(body)
    st = jobs.wait("stuck", cause, lambda s: any(c["type"] == "Running" and c["reason"] == cause
                                                 for c in s.get("conditions", [])), 60)
    assert st["phase"] == "Pending"
    jobs.wait_event("stuck", "Warning", cause)
    if cause == "CreateContainerConfigError":  # fixing the cause lets it run
        core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="missing"),
                                                                 string_data={"k": "v"}))
        jobs.wait_phase("stuck", "Succeeded", 90)


def test_a_quota_refusal_is_retried_not_an_invalid_template(operator, core, namespace, claim):
    core.create_namespaced_resource_quota(namespace, client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="none"), spec=client.V1ResourceQuotaSpec(hard={"pods": "0"})))
    jobs = Jobs(namespace)
    jobs.create(trainingjob("quota", trainer(10)))
    st = jobs.wait("quota", "QuotaExceeded", lambda s: any(
        c["type"] == "SpecResolved" and c["reason"] == "QuotaExceeded" for c in s.get("conditions", [])), 60)
    assert st["failures"] == 0
    core.delete_namespaced_resource_quota("none", namespace)
    jobs.wait_phase("quota", "Succeeded", 120)


def test_a_gang_partly_refused_by_a_quota_leaves_no_pod_terminating_and_starts_once_it_fits(
        operator, core, namespace, claim):
    """Issue #25, defect 11: with room for 1 pod of 2, the created rank was deleted and kept its finalizer: stuck
    Terminating for good, and the job with it even after the quota was raised."""
    core.create_namespaced_resource_quota(namespace, client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="one"), spec=client.V1ResourceQuotaSpec(hard={"pods": "1"})))
    wait_for("the quota's usage known", lambda: (core.read_namespaced_resource_quota("one", namespace).status.used
                                                 or {}).get("pods") == "0", 30)
    jobs = Jobs(namespace)
    jobs.create(trainingjob("half", [sys.executable, "-c", "import time; time.sleep(3)"], workers=2))
    jobs.wait("half", "QuotaExceeded", lambda s: any(
        c["type"] == "SpecResolved" and c["reason"] == "QuotaExceeded" for c in s.get("conditions", [])), 60)
    wait_for("no pod of the job left (none stuck Terminating)", lambda: not [
        p for p in core.list_namespaced_pod(namespace).items if p.metadata.name.startswith("half-")], 30)
    core.patch_namespaced_resource_quota("one", namespace, {"spec": {"hard": {"pods": "4"}}})
    st = jobs.wait_phase("half", "Succeeded", 120)
    assert (st["failures"], st["preemptions"]) == (0, 0), json.dumps(st["attempts"])


def _terminating(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    pod = core.read_namespaced_pod(name, namespace)
    return pod if pod.metadata.deletion_timestamp is not None else None


IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); time.sleep(600)"


def test_a_job_recreated_under_its_name_waits_for_the_old_pod_and_records_no_preemption(
        operator, core, namespace, claim):
    """Issue #25, defect 18: the new incarnation's create found the old one's pod (409), took it for its own, and
    recorded a preemption when it went away."""
    jobs = Jobs(namespace)
    old = trainingjob("same", [sys.executable, "-c", IGNORES_SIGTERM], preemption={"gracePeriodSeconds": 15})
    jobs.create(old)
    jobs.wait_phase("same", "Running", 60)
    client.CustomObjectsApi().delete_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs",
                                                              "same")
    wait_for("the old job gone", lambda: not [j for j in client.CustomObjectsApi().list_namespaced_custom_object(
        "ckpt.dev", "v1alpha1", namespace, "trainingjobs")["items"]], 30)
    # what the garbage collector does for the deleted owner (in its own time: its REST mapper may learn of a new CRD
    # only at its next 30 s discovery resync), done now: the old pod is Terminating, in its 15 s grace period
    core.delete_namespaced_pod("same-0", namespace)
    lingering = wait_for("the old pod in its grace period", lambda: _terminating(core, namespace, "same-0"), 10)
    jobs.create(trainingjob("same", trainer(10)))
    jobs.wait("same", "the old pod reported", lambda s: any(
        c["reason"] == "PreviousIncarnationTerminating" for c in s.get("conditions", [])), 30)
    st = jobs.wait_phase("same", "Succeeded", 120)
    assert (st["attempt"], st["preemptions"], st["failures"]) == (0, 0, 0)
    assert core.read_namespaced_pod("same-0", namespace).metadata.uid != lingering.metadata.uid


def test_attempts_without_progress_fail_the_job(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("stall", trainer(60, "--crash-at", "2"), backoffLimit=10,
                            preemption={"maxAttemptsWithoutProgress": 2}))
    st = jobs.wait_phase("stall", "Failed", 120)
    assert st["failures"] == 2 and st["attemptsWithoutProgress"] == 2
    assert next(c for c in st["conditions"] if c["type"] == "Failed")["reason"] == "NoProgress"


# -- HA -------------------------------------------------------------------------------------------------
def test_two_replicas_one_acts_and_the_other_takes_over_when_it_is_killed(operator, cluster, core, namespace,
                                                                          claim, tmp_path):
    from tests.cluster.launcher import free_port

    lease_ns, lease_seconds = namespace, 6
    operator.stop()
    replicas: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for i in range(2):
            health = free_port()
            env = {**cluster.env(), "CKPT_OPERATOR_BACKOFF_BASE_SECONDS": "1"}
            proc = subprocess.Popen([str(Path(sys.executable).with_name("ckpt-operator")), "--metrics-port",
                                     str(free_port()), "--health-port", str(health), "--leader-elect",
                                     "--leader-election-namespace", lease_ns, "--lease-seconds", str(lease_seconds)],
                                    env=env, stdout=open(tmp_path / f"op{i}.log", "wb"),  # noqa: SIM115
                                    stderr=subprocess.STDOUT)
            replicas.append((proc, health))
        coordination = client.CoordinationV1Api()

        def holder() -> str | None:
            try:
                return coordination.read_namespaced_lease("ckpt-operator", lease_ns).spec.holder_identity
            except client.ApiException:
                return None

        leader_id = wait_for("a leader", holder, 60)
        leader = next(p for p, _ in replicas if leader_id.endswith(f"-{p.pid}"))
        standby = next(p for p, _ in replicas if p is not leader)
        jobs, rec = Jobs(namespace), PodRecorder(core, namespace)
        jobs.create(trainingjob("ha", trainer(800)))
        wait_for("trainer started", lambda: started(claim, "ha", 0), 60)
        os.kill(leader.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        evict(core, namespace, "ha-0")  # needs an operator to resubmit: only the standby is left
        wait_for("standby took over", lambda: holder() == leader_id.rsplit("-", 1)[0] + f"-{standby.pid}", 60)
        st = jobs.wait("ha", "resubmitted by the standby", lambda s: s.get("attempt") == 1, 60)
        takeover = time.monotonic() - killed_at
        assert takeover < lease_seconds * 3, takeover
        st = jobs.wait_phase("ha", "Succeeded", 120)
        rec.stop()
        assert (st["preemptions"], st["failures"]) == (1, 0)
        assert {obj["metadata"]["name"] for t, obj in rec.events if t == "ADDED"} == {"ha-0", "ha-1"}
        print(f"takeover after SIGKILL: {takeover:.1f}s (lease {lease_seconds}s)")
    finally:
        for proc, _ in replicas:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)
        operator.start()
