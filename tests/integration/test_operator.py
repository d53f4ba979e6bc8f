"""The operator against a real control plane: every classification path, budgets, suspend, warm start, restarts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client

from tests.kube import (
    Jobs,
    PodRecorder,
    create_hostpath_claim,
    ensure_priority_classes,
    evict,
    progress,
    trainingjob,
    wait_for,
)

pytestmark = pytest.mark.cluster
TRAINER = Path(__file__).parent / "trainers" / "sdk_trainer.py"


def trainer(steps: int = 60, *extra: str) -> list[str]:
    return [sys.executable, str(TRAINER), "--steps", str(steps), "--every-steps", "5", "--step-seconds", "0.05",
            *extra]


def started(host: Path, job: str, attempt: int) -> bool:
    """The trainer of `attempt` is past its SIGTERM handler installation (it logged its start)."""
    return any(line.startswith(f"attempt {attempt} start") for line in progress(host / job))


def pods_of(core: client.CoreV1Api, ns: str, job: str) -> list[str]:
    return sorted(p.metadata.name for p in core.list_namespaced_pod(ns, label_selector=f"ckpt.dev/job={job}").items)


def test_uninterrupted_job_succeeds(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("ok", trainer(20)))
    st = jobs.wait_phase("ok", "Succeeded")
    assert (st["attempt"], st["preemptions"], st["failures"]) == (0, 0, 0)
    assert st["lastCheckpoint"]["step"] == 20
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in st["conditions"])
    assert (claim / "ok" / "result").exists()  # the per-job subdirectory of the claim
    jobs.wait_event("ok", "Normal", "PodStarting")
    jobs.wait_event("ok", "Normal", "Completed")
    pod = core.read_namespaced_pod("ok-0", namespace)
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["CKPT_DIR"] == "/checkpoints" and env["CKPT_ATTEMPT"] == "0" and env["CKPT_RESTART_REASON"] == "none"
    assert pod.spec.termination_grace_period_seconds == 30 and pod.spec.restart_policy == "Never"


def test_eviction_is_a_preemption_resubmitted_and_resumed(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("ev", trainer(80)))
    wait_for("trainer started", lambda: started(claim, "ev", 0), 60)
    evict(core, namespace, "ev-0")
    st = jobs.wait_phase("ev", "Succeeded")
    assert (st["attempt"], st["preemptions"], st["failures"]) == (1, 1, 0)
    lines = progress(claim / "ev")
    assert lines[0] == "attempt 0 start 0 reason none"
    resumed = int(lines[1].split()[3])
    assert lines[1].endswith("reason preempted") and resumed > 0
    jobs.wait_event("ev", "Warning", "EvictionByEvictionAPI")
    metrics = operator.metrics()
    for line in (f'ckpt_operator_preemptions_total{{namespace="{namespace}",reason="EvictionByEvictionAPI"}} 1.0',
                 f'ckpt_operator_resubmissions_total{{namespace="{namespace}",reason="preempted"}} 1.0',
                 f'ckpt_operator_resubmission_latency_seconds_count{{namespace="{namespace}"}} 1.0',
                 f'ckpt_operator_jobs{{namespace="{namespace}",phase="Succeeded"}} 1.0'):
        assert line in metrics, line


def test_scheduler_preemption_is_a_preemption(operator, core, namespace, claim):
    ensure_priority_classes(**{"tj-low": 10, "tj-high": 1000})
    jobs = Jobs(namespace)
    template = {"spec": {"priorityClassName": "tj-low", "containers": [{
        "name": "trainer", "image": "x", "command": trainer(80), "resources": {"requests": {"cpu": "6"}}}]}}
    jobs.create({**trainingjob("sp", []), "spec": {**trainingjob("sp", [])["spec"], "template": template}})
    wait_for("trainer started", lambda: started(claim, "sp", 0), 60)
    node = core.read_namespaced_pod("sp-0", namespace).spec.node_name  # the urgent pod needs that very node
    core.create_namespaced_pod(namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "urgent"},
                                           "spec": {"priorityClassName": "tj-high", "restartPolicy": "Never",
                                                    "nodeSelector": {"kubernetes.io/hostname": node},
                                                    "containers": [{"name": "c", "image": "x",
                                                                    "command": ["sleep", "2"],
                                                                    "resources": {"requests": {"cpu": "6"}}}]}})
    jobs.wait("sp", "preempted", lambda st: st.get("preemptions") == 1, 60)
    st = jobs.wait_phase("sp", "Succeeded", 180)
    jobs.wait_event("sp", "Warning", "PreemptionByScheduler", "PreemptionByKubeScheduler")
    assert st["failures"] == 0


def test_node_shutdown_is_a_preemption(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("ns", trainer(80)))
    wait_for("trainer started", lambda: started(claim, "ns", 0), 60)
    node = core.read_namespaced_pod("ns-0", namespace).spec.node_name
    core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": "shutdown"}}})
    st = jobs.wait_phase("ns", "Succeeded", 180)
    assert st["preemptions"] == 1 and st["failures"] == 0
    jobs.wait_event("ns", "Warning", "TerminationByKubelet")


def test_crashes_back_off_then_fail_and_keep_checkpoints(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("crash", trainer(60, "--crash-at", "12"), backoffLimit=2))
    st = jobs.wait_phase("crash", "Failed", 120)
    assert (st["failures"], st["preemptions"], st["attempt"]) == (3, 0, 2)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "exited 1" in failed["message"]
    # the SDK recorded the uncaught exception in the termination message, which the operator shows
    assert "RuntimeError: crashing on purpose at step 12" in failed["message"]
    assert [line.split()[-1] for line in progress(claim / "crash")] == ["none", "failed", "failed"]
    assert sorted(p.name for p in (claim / "crash").iterdir() if p.name.startswith("step-"))  # checkpoints kept
    assert pods_of(core, namespace, "crash") == ["crash-0", "crash-1", "crash-2"]  # failed pods keep their logs


def test_one_crash_then_success_counts_one_failure(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("flaky", trainer(30, "--crash-at", "12", "--crash-attempts", "1")))
    st = jobs.wait_phase("flaky", "Succeeded", 120)
    assert (st["failures"], st["preemptions"], st["attempt"]) == (1, 0, 1)
    assert progress(claim / "flaky")[1] == "attempt 1 start 10 reason failed"


def test_max_preemptions_fails_the_job(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("maxp", trainer(400), preemption={"maxPreemptions": 0}))
    wait_for("trainer started", lambda: started(claim, "maxp", 0), 60)
    evict(core, namespace, "maxp-0")
    st = jobs.wait_phase("maxp", "Failed")
    assert next(c for c in st["conditions"] if c["type"] == "Failed")["reason"] == "PreemptionLimitExceeded"


def test_capacity_fallback_patches_the_template_after_k_preemptions(operator, cluster, core, namespace, claim):
    jobs = Jobs(namespace)
    target = sorted(n.metadata.name for n in core.list_node().items)[-1]
    patch = {"metadata": {"labels": {"capacity": "on-demand"}},
             "spec": {"nodeSelector": {"kubernetes.io/hostname": target}}}
    jobs.create(trainingjob("fb", trainer(120), preemption={
        "fallback": {"afterPreemptions": 2, "windowSeconds": 600, "templatePatch": patch}}))
    for attempt in (0, 1):
        wait_for(f"attempt {attempt} started", lambda attempt=attempt: started(claim, "fb", attempt), 60)
        pod = core.read_namespaced_pod(f"fb-{attempt}", namespace)
        assert "capacity" not in (pod.metadata.labels or {}) and not pod.spec.node_selector  # spot, as written
        evict(core, namespace, f"fb-{attempt}")
    st = jobs.wait("fb", "fallback active", lambda st: (st.get("fallback") or {}).get("active"), 60)
    assert st["preemptions"] == 2 and len(st["fallback"]["recentPreemptions"]) == 2
    jobs.wait_event("fb", "Warning", "FallbackApplied")
    wait_for("attempt 2 started", lambda: started(claim, "fb", 2), 60)
    pod = core.read_namespaced_pod("fb-2", namespace)
    assert pod.metadata.labels["capacity"] == "on-demand" and pod.spec.node_name == target
    assert pod.metadata.labels["ckpt.dev/job"] == "fb"  # the operator's own labels survive the patch
    describe = subprocess.run([str(Path(sys.executable).with_name("kubectl-ckpt")), "describe", "fb", "-n", namespace],
                              env=cluster.env(), capture_output=True, text=True, timeout=60)
    assert "Fallback:" in describe.stdout and "FallbackApplied" in describe.stdout, describe.stderr
    st = jobs.wait_phase("fb", "Succeeded")
    assert (st["attempt"], st["preemptions"], st["failures"]) == (2, 2, 0)


def test_suspend_checkpoints_and_resume_continues(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("sus", trainer(120)))
    wait_for("trainer started", lambda: started(claim, "sus", 0), 60)
    jobs.patch_spec("sus", {"suspend": True})
    st = jobs.wait("sus", "suspended with a checkpoint",
                   lambda s: s.get("phase") == "Suspended" and (s.get("lastOutcome") or {}).get("result")
                   == "Suspended", 60)
    saved = st["lastCheckpoint"]["step"]
    assert saved > 0 and st["preemptions"] == 0
    wait_for("suspended pod released and gone", lambda: pods_of(core, namespace, "sus") == [], 30)
    jobs.patch_spec("sus", {"suspend": False})
    st = jobs.wait_phase("sus", "Succeeded", 120)
    assert progress(claim / "sus")[1] == f"attempt 1 start {saved} reason resumed"
    assert (st["preemptions"], st["failures"]) == (0, 0)


def test_resume_from_warm_starts_a_second_job(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("pre", trainer(20)))
    jobs.wait_phase("pre", "Succeeded")
    jobs.create(trainingjob("fine", trainer(30), resumeFrom={"trainingJob": "pre", "step": 15}))
    jobs.wait_phase("fine", "Succeeded")
    assert progress(claim / "fine")[0] == "attempt 0 start 15 reason none"
    pod = core.read_namespaced_pod("fine-0", namespace)
    ro = [m for m in pod.spec.containers[0].volume_mounts if m.mount_path == "/ckpt-resume-from"]
    assert ro and ro[0].read_only and ro[0].sub_path == "pre"
    assert sorted(p.name for p in (claim / "pre").iterdir() if p.name.startswith("step-"))[-1] == "step-000000000020"


def test_missing_claim_is_reported_then_recovers(operator, core, namespace, tmp_path):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("noclaim", trainer(10)))
    st = jobs.wait("noclaim", "SpecResolved=False", lambda s: any(
        c["type"] == "SpecResolved" and c["status"] == "False" for c in s.get("conditions", [])), 30)
    cond = next(c for c in st["conditions"] if c["type"] == "SpecResolved")
    assert cond["reason"] == "ClaimNotFound" and 'persistentvolumeclaim "ckpt" not found' in cond["message"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ClaimNotFound")  # what `kubectl wait` users see
    jobs.wait_event("noclaim", "Warning", "ClaimNotFound")
    assert pods_of(core, namespace, "noclaim") == []
    host = tmp_path / "late"
    host.mkdir()
    create_hostpath_claim(core, namespace, host)
    jobs.wait_phase("noclaim", "Succeeded", 90)
    core.delete_persistent_volume(f"pv-{namespace}")


def test_a_template_field_the_api_server_does_not_know_is_reported_not_dropped(operator, core, namespace, claim):
    """A typo in the pod template is refused by the API server's strict field validation of the pod create:
    reported in a condition and a Warning Event, no pod made (not run without the field); fixed, the job runs."""
    jobs = Jobs(namespace)
    body = trainingjob("typo", trainer(10))
    container = dict(body["spec"]["template"]["spec"]["containers"][0])
    body["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Never"
    jobs.create(body)
    st = jobs.wait("typo", "reason InvalidTemplate", lambda s: any(
        c.get("reason") == "InvalidTemplate" for c in s.get("conditions", [])), 30)
    cond = next(c for c in st["conditions"] if c.get("reason") == "InvalidTemplate")
    assert cond["status"] == "False" and "imagePullPolicyy" in cond["message"], cond
    jobs.wait_event("typo", "Warning", "InvalidTemplate")
    assert pods_of(core, namespace, "typo") == []
    jobs.patch_spec("typo", {"template": {"spec": {"containers": [container]}}})  # a merge patch replaces the list
    jobs.wait_phase("typo", "Succeeded", 90)


def test_operator_restart_mid_run_does_not_duplicate_pods(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    rec = PodRecorder(core, namespace)
    jobs.create(trainingjob("rs", trainer(400)))  # 20 s: still running after the operator has stopped
    wait_for("trainer started", lambda: started(claim, "rs", 0), 60)
    operator.stop()
    try:
        evict(core, namespace, "rs-0")  # happens while no operator is watching
        wait_for("evicted pod stopped", lambda: (rec.terminated("rs-0") or {}).get("exitCode") == 143, 30)
    finally:
        operator.start()
    st = jobs.wait_phase("rs", "Succeeded", 120)
    rec.stop()
    assert (st["attempt"], st["preemptions"]) == (1, 1)
    # the finalizer kept the evicted pod until the restarted operator read why it ended
    jobs.wait_event("rs", "Warning", "EvictionByEvictionAPI")
    created = {obj["metadata"]["name"] for t, obj in rec.events if t == "ADDED"}
    assert created == {"rs-0", "rs-1"}


def test_deleting_the_job_removes_pods_and_keeps_checkpoints(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("del", trainer(400)))
    wait_for("trainer started", lambda: started(claim, "del", 0), 60)
    wait_for("a checkpoint", lambda: any(p.name.startswith("step-") for p in (claim / "del").iterdir()), 30)
    jobs.api.delete_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs", "del")
    wait_for("pods gone", lambda: pods_of(core, namespace, "del") == [], 60)
    assert any(p.name.startswith("step-") for p in (claim / "del").iterdir())


INVALID = [
    ({"checkpoint": {"persistentVolumeClaim": {"claimName": "a"}, "nfs": {"server": "s", "path": "/p"}}},
     "exactly one of checkpoint.persistentVolumeClaim or checkpoint.nfs must be set"),
    ({"checkpoint": {"mountPath": "/c"}}, "exactly one of checkpoint.persistentVolumeClaim or checkpoint.nfs"),
    ({"preemption": {"gracePeriodSeconds": 0}}, "should be greater than or equal to 1"),
    ({"preemption": {"gracePeriodSeconds": 4000}}, "should be less than or equal to 3600"),
    ({"checkpoint": {"persistentVolumeClaim": {"claimName": "a"}, "keep": 0}}, "greater than or equal to 1"),
    ({"backoffLimit": -1}, "should be greater than or equal to 0"),
    ({"template": {"spec": {"containers": []}}}, "should have at least 1 items"),
    ({"checkpoint": {"persistentVolumeClaim": {"claimName": "Not_A_Name"}}}, "should match"),
]


@pytest.mark.parametrize(("override", "message"), INVALID)
def test_invalid_manifests_are_refused_by_kubectl_apply(operator, cluster, namespace, override, message):
    body = trainingjob("bad", ["python", "x.py"])
    body["spec"].update(override)
    out = subprocess.run([cluster.kubectl, "apply", "-n", namespace, "-f", "-"], input=json.dumps(body),
                         env=cluster.env(), capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_long_names_and_storage_changes_are_refused(operator, cluster, namespace):
    long = trainingjob("x" * 53, ["python", "x.py"])
    out = subprocess.run([cluster.kubectl, "apply", "-n", namespace, "-f", "-"], input=json.dumps(long),
                         env=cluster.env(), capture_output=True, text=True)
    assert out.returncode != 0 and "at most 52 characters" in out.stderr
    body = trainingjob("imm", ["python", "x.py"], suspend=True)
    subprocess.run([cluster.kubectl, "apply", "-n", namespace, "-f", "-"], input=json.dumps(body),
                   env=cluster.env(), capture_output=True, text=True, check=True)
    def apply(checkpoint: dict) -> subprocess.CompletedProcess[str]:
        body["spec"]["checkpoint"] = checkpoint
        return subprocess.run([cluster.kubectl, "apply", "-n", namespace, "-f", "-"], input=json.dumps(body),
                              env=cluster.env(), capture_output=True, text=True)

    for storage in ({"persistentVolumeClaim": {"claimName": "other"}}, {"nfs": {"server": "s", "path": "/x"}}):
        out = apply(storage)
        assert out.returncode != 0 and "checkpoint storage (persistentVolumeClaim or nfs) is immutable" in out.stderr
    policy = apply({"persistentVolumeClaim": {"claimName": "ckpt"}, "keep": 7, "intervalSeconds": 900,
                    "mountPath": "/ckpt"})
    assert policy.returncode == 0, policy.stderr  # the policy may change; it applies from the next attempt
    body["spec"]["resumeFrom"] = {"trainingJob": "other"}
    out = apply(body["spec"]["checkpoint"])
    assert out.returncode != 0 and "resumeFrom is immutable" in out.stderr


def test_lost_node_is_a_preemption_and_the_job_resumes(operator, cluster, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("lost", trainer(120)))
    wait_for("trainer started", lambda: started(claim, "lost", 0), 60)
    wait_for("a checkpoint", lambda: any(p.name.startswith("step-") for p in (claim / "lost").iterdir()), 30)
    node = core.read_namespaced_pod("lost-0", namespace).spec.node_name
    core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": "lost"}}})
    try:
        st = jobs.wait("lost", "node-lost preemption", lambda s: s.get("preemptions") == 1, 150)
        assert st["lastOutcome"]["reason"] == "NodeLost" and st["failures"] == 0
    finally:
        core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": None}}})
    st = jobs.wait_phase("lost", "Succeeded", 180)
    lines = progress(claim / "lost")
    assert lines[1].startswith("attempt 1 start") and int(lines[1].split()[3]) > 0
    assert st["attempt"] == 1


def test_kubectl_ckpt_plugin(operator, cluster, core, namespace, claim):
    def ckpt(*args: str) -> subprocess.CompletedProcess[str]:
        exe = str(Path(sys.executable).with_name("kubectl-ckpt"))
        return subprocess.run([exe, *args, "-n", namespace], env=cluster.env(), capture_output=True, text=True,
                              timeout=120)

    jobs = Jobs(namespace)
    jobs.create(trainingjob("plug", trainer(200)))
    wait_for("trainer started", lambda: started(claim, "plug", 0), 60)
    assert "suspended" in ckpt("suspend", "plug").stdout
    jobs.wait_phase("plug", "Suspended", 60)
    jobs.wait("plug", "pod gone", lambda s: (s.get("lastOutcome") or {}).get("result") == "Suspended", 60)
    listing = ckpt("checkpoints", "plug")
    assert listing.returncode == 0 and "STEP" in listing.stdout, listing.stderr
    saved = jobs.status("plug")["lastCheckpoint"]["step"]
    assert str(saved) in listing.stdout
    out = ckpt("describe", "plug").stdout
    assert "Phase:           Suspended" in out and f"step {saved}" in out and "SuspendedByUser" in out
    copy = ckpt("restart", "plug", "--copy")
    assert copy.returncode == 0, copy.stderr
    new = copy.stdout.split()[0].split("/")[1]
    assert jobs.get(new)["spec"]["resumeFrom"] == {"trainingJob": "plug"}
    jobs.api.delete_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs", new)
    assert "resumed" in ckpt("resume", "plug").stdout
    jobs.wait_phase("plug", "Succeeded", 120)
    assert "error:" in ckpt("describe", "nope").stderr
