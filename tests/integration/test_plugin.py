"""`kubectl ckpt` against the real control plane: per-attempt history, JSON output, logs through the API server
(the test kubelet serves them as a kubelet does), kubectl's plugin completion, and Polyaxon-style resume/restart
with overrides, from an older step, fresh, or as a copy (checkpoints set aside, never deleted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kube import Jobs, PodRecorder, progress, trainingjob, wait_for

pytestmark = pytest.mark.cluster
TRAINER = Path(__file__).parent / "trainers" / "sdk_trainer.py"
BIN = Path(sys.executable).parent


def trainer(steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(TRAINER), "--steps", str(steps), "--every-steps", "5", "--step-seconds", "0.05",
            *extra]


def ckpt(cluster, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([str(BIN / "kubectl-ckpt"), *args, "-n", namespace], env=cluster.env(),
                          capture_output=True, text=True, timeout=180)


def test_describe_history_json_logs_and_completion(operator, cluster, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("hist", trainer(60, "--crash-at", "12", "--crash-attempts", "1")))
    st = jobs.wait_phase("hist", "Succeeded", 120)
    assert (st["attempt"], st["failures"]) == (1, 1)
    out = ckpt(cluster, namespace, "describe", "hist")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.split("Attempts:")[1].split("Timeline:")[0].splitlines()[2:4]
    assert rows[0].split()[:2] == ["0", "hist-0"] and "Failed" in rows[0] and "ApplicationFailure" in rows[0]
    assert rows[1].split()[:2] == ["1", "hist-1"] and "Succeeded" in rows[1]
    data = json.loads(ckpt(cluster, namespace, "describe", "hist", "-o", "json").stdout)
    first, second = data["status"]["attempts"]
    # it crashed in step 12 (the SDK last saw step 11); the newest checkpoint was step 10
    assert (first["result"], first["reachedStep"], second["startStep"], second["reachedStep"]) == (
        "Failed", 11, 10, 60)
    assert second["stepsRedone"] == 1
    assert {"type": "Normal", "reason": "Completed"}.items() <= data["events"][-1].items()
    # logs through the API server, served by the (test) kubelet as a kubelet does
    current = ckpt(cluster, namespace, "logs", "hist")
    assert current.returncode == 0 and "step 60" in current.stdout, current.stderr
    failed = ckpt(cluster, namespace, "logs", "hist", "--attempt", "0")  # a failed pod is kept with its log
    assert "crashing on purpose at step 12" in failed.stdout, failed.stderr
    direct = subprocess.run([cluster.kubectl, "logs", "hist-1", "-n", namespace, "--tail", "1"], env=cluster.env(),
                            capture_output=True, text=True)
    assert direct.returncode == 0 and direct.stdout.strip() == current.stdout.strip().splitlines()[-1]
    # kubectl's own completion of plugins (kubectl_complete-ckpt next to kubectl-ckpt on the PATH)
    env = {**cluster.env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def complete(*words: str) -> list[str]:
        out = subprocess.run([cluster.kubectl, "__complete", "ckpt", *words], env=env, capture_output=True,
                             text=True)
        return [line for line in out.stdout.splitlines() if not line.startswith(":")]

    assert complete("re") == ["resume", "restart"]
    assert complete("describe", "-n", namespace, "hi") == ["hist"]


def test_resume_and_restart_with_overrides_older_steps_fresh_and_copies(operator, cluster, namespace, claim,
                                                                        tmp_path):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("ov", trainer(40), checkpoint={"persistentVolumeClaim": {"claimName": "ckpt"},
                                                            "keep": 100}))
    jobs.wait_phase("ov", "Succeeded", 120)
    # more steps for a finished job: resume it with an override (a YAML value: quote what looks like a number)
    override = tmp_path / "override.yaml"
    override.write_text("spec:\n  backoffLimit: 5\n")
    out = ckpt(cluster, namespace, "resume", "ov", "-f", str(override),
               "--set", 'template.spec.containers[0].command[3]="80"')
    assert out.returncode == 0 and "resumed after it succeeded with overrides" in out.stdout, out.stderr
    st = jobs.wait("ov", "attempt 1 succeeded", lambda s: s.get("phase") == "Succeeded" and s.get("attempt") == 1,
                   120)
    assert st["lastCheckpoint"]["step"] == 80 and jobs.get("ov")["spec"]["backoffLimit"] == 5
    [record] = st["overrides"]
    assert record["command"] == "resume" and record["attempt"] == 1
    assert record["changes"] == {"backoffLimit": 5, "template.spec.containers[0].command[3]": "80"}
    jobs.wait_event("ov", "Normal", "SpecOverridden")
    assert progress(claim / "ov")[-1] == "attempt 1 start 40 reason resumed"
    # the model diverged after step 50: continue from there, the newer checkpoints set aside (never deleted)
    newer = sorted(p.name for p in (claim / "ov").glob("step-*") if int(p.name[5:]) > 50)
    out = ckpt(cluster, namespace, "restart", "ov", "--from-step", "50")
    assert out.returncode == 0 and "resumes from step 50" in out.stdout, out.stdout + out.stderr
    jobs.wait("ov", "the new incarnation finished", lambda s: s.get("phase") == "Succeeded", 120)
    assert progress(claim / "ov")[-1] == "attempt 0 start 50 reason none"
    [aside] = list((claim / "ov").glob("set-aside-*"))
    assert sorted(p.name for p in aside.iterdir()) == newer
    assert ckpt(cluster, namespace, "restart", "ov", "--from-step", "7").returncode == 1  # no such checkpoint
    assert jobs.get("ov")["status"]["phase"] == "Succeeded"  # and nothing was stopped for it
    # from scratch, keeping every checkpoint aside
    out = ckpt(cluster, namespace, "restart", "ov", "--fresh")
    assert out.returncode == 0, out.stderr
    jobs.wait("ov", "the fresh run finished", lambda s: s.get("phase") == "Succeeded", 120)
    assert progress(claim / "ov")[-1] == "attempt 0 start 0 reason none"
    assert len(list((claim / "ov").glob("set-aside-*"))) == 2
    # a copy warm-starts from this job's checkpoints with its own overrides; the original is untouched
    before = jobs.get("ov")["metadata"]["resourceVersion"]
    out = ckpt(cluster, namespace, "restart", "ov", "--copy", "ov-copy", "--set", "backoffLimit=1")
    assert out.returncode == 0 and "ov-copy created, warm-starting from ov" in out.stdout, out.stderr
    copy = jobs.get("ov-copy")
    assert copy["spec"]["resumeFrom"] == {"trainingJob": "ov"} and copy["spec"]["backoffLimit"] == 1
    jobs.wait_phase("ov-copy", "Succeeded", 120)
    assert progress(claim / "ov-copy")[0].startswith("attempt 0 start 80")  # warm start from ov's newest
    assert jobs.get("ov")["metadata"]["resourceVersion"] == before


def test_restart_refuses_what_it_cannot_change_and_misspelled_fields_before_stopping_anything(
        operator, cluster, core, namespace, claim):
    """Issue #25, defect 15: a storage change went through `restart --set` (a restart deletes and re-creates, so the
    API server's transition rules never saw it); a misspelled `--set` reported success while the API server pruned
    it. Both are refused now, as is a bad workers value (a change of workers is allowed since loads reshard), and
    nothing stops."""
    from tests.cluster.launcher import test_node_names

    node = test_node_names()[0]
    jobs = Jobs(namespace)
    template = {"spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                         "tolerations": [{"key": "example.com/spot", "operator": "Exists", "effect": "NoSchedule"}],
                         "imagePullSecrets": [{"name": "registry-credentials"}],
                         "securityContext": {"fsGroup": 1234},
                         "containers": [{"name": "trainer", "image": "python:3.11-slim", "command": trainer(400),
                                         "securityContext": {"allowPrivilegeEscalation": False}}]}}
    jobs.create(trainingjob("keep", trainer(400), template=template))
    jobs.wait_phase("keep", "Running", 60)
    before = jobs.get("keep")["metadata"]["uid"]
    for assignment, refusal in (("workers=two", "spec.workers is a count"),
                                ("checkpoint.persistentVolumeClaim.claimName=other", "cannot change checkpoint"),
                                ("backofLimit=1", 'unknown field "spec.backofLimit"')):
        out = ckpt(cluster, namespace, "restart", "keep", "--set", assignment)
        assert out.returncode == 1 and refusal in out.stderr, out.stdout + out.stderr
    out = ckpt(cluster, namespace, "resume", "keep", "--set", "preemption.gracePeriod=5")
    assert out.returncode == 1 and 'unknown field "spec.preemption.gracePeriod"' in out.stderr, out.stderr
    job = jobs.get("keep")
    assert job["metadata"]["uid"] == before and not job["spec"].get("suspend")
    assert job["spec"].get("workers", 1) == 1 and job["status"]["phase"] == "Running"
    # the tool pod of `checkpoints` (and of --fresh/--from-step) can pull the image and land where the job may run
    recorder = PodRecorder(core, namespace)
    listing = ckpt(cluster, namespace, "checkpoints", "keep")
    assert listing.returncode == 0, listing.stderr
    [tool] = [name for name in {obj["metadata"]["name"] for _, obj in recorder.events} if "-tool-" in name]
    spec = recorder.versions(tool)[0]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": node} and spec["tolerations"][0]["key"] == \
        "example.com/spot"
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}] and spec["securityContext"]["fsGroup"] == 1234
    assert spec["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False}
    recorder.stop()


def test_restart_in_place_stops_the_job_first_and_sets_aside_before_deleting(operator, cluster, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("again", trainer(400)))
    wait_for("a checkpoint", lambda: list((claim / "again").glob("step-*")), 60)
    out = ckpt(cluster, namespace, "restart", "again", "--fresh")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("moved ") for line in lines), out.stdout
    stopping = next(i for i, line in enumerate(lines) if line.startswith("stopping again"))
    moved = next(i for i, line in enumerate(lines) if line.startswith("moved "))
    deleting = next(i for i, line in enumerate(lines) if line.startswith("deleting again"))
    assert stopping < moved < deleting, out.stdout  # set aside while the job still existed, suspended
    saved = lines[deleting].split("saved in ")[1].rstrip(")")
    assert json.loads(Path(saved).read_text())["metadata"]["name"] == "again"
    [aside] = list((claim / "again").glob("set-aside-*"))
    assert list(aside.glob("step-*"))  # the first incarnation's checkpoints, its SIGTERM save among them
    jobs.wait("again", "the new incarnation's start", lambda s: len(progress(claim / "again")) == 2, 60)
    assert progress(claim / "again") == ["attempt 0 start 0 reason none"] * 2
