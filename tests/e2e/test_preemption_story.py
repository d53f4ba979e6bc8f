"""The product story end to end: real apiserver, scheduler, controller-manager, operator and local kubelet running
examples/startup.sh -> examples/train.py (torch) through ckpt-run, preempted in every way Kubernetes preempts."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kube import Jobs, ensure_priority_classes, evict, trainingjob, wait_for

pytest.importorskip("torch", reason="the end-to-end story trains a torch model; .ci/run installs torch")
pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 160, 20
ENV = {"TRAIN_STEPS": str(STEPS), "TRAIN_STEP_SECONDS": "0.04", "TRAIN_EVERY_STEPS": str(EVERY)}
STARTUP = ["ckpt-run", "--", "bash", str(ROOT / "examples" / "startup.sh")]


def job(name: str, *args: str, env: dict[str, str] | None = None, **spec: object) -> dict:
    body = trainingjob(name, [*STARTUP, *args], **spec)
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": k, "value": v}
                                                                 for k, v in {**ENV, **(env or {})}.items()]
    return body


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """Final weights of an uninterrupted run (a plain local process, no Kubernetes)."""
    tmp = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env.update(ENV, CKPT_DIR=str(tmp))
    subprocess.run([sys.executable, str(ROOT / "examples" / "train.py")], env=env, check=True, capture_output=True)
    return str(json.loads((tmp / "result.json").read_text())["weights_sha256"])


def attempts(host: Path) -> list[tuple[int, int]]:
    """(start step, last step reached) of every attempt, from the trainer's progress log."""
    runs: list[list[int]] = []
    for line in (host / "progress.log").read_text().splitlines():
        if line.startswith("attempt"):
            runs.append([int(line.split()[3])] * 2)
        elif line.startswith("step") and runs:
            runs[-1][1] = int(line.split()[1])
    return [(a, b) for a, b in runs]


def current_step(host: Path) -> int:
    try:
        return attempts(host)[-1][1]
    except (FileNotFoundError, IndexError):
        return -1


def test_uninterrupted_run_matches_the_reference(operator, core, namespace, claim, reference):
    jobs = Jobs(namespace)
    jobs.create(job("plain"))
    st = jobs.wait_phase("plain", "Succeeded", 180)
    assert (st["attempt"], st["preemptions"], st["failures"], st["lastCheckpoint"]["step"]) == (0, 0, 0, STEPS)
    assert json.loads((claim / "plain" / "result.json").read_text())["weights_sha256"] == reference


def _evict(core, ns, pod, **_):
    evict(core, ns, pod)


def _scheduler(core, ns, pod, n, **_):
    node = core.read_namespaced_pod(pod, ns).spec.node_name  # the urgent pod needs exactly the trainer's node
    core.create_namespaced_pod(ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"urgent-{n}"},
                                    "spec": {"priorityClassName": "e2e-high", "restartPolicy": "Never",
                                             "nodeSelector": {"kubernetes.io/hostname": node},
                                             "containers": [{"name": "c", "image": "x", "command": ["sleep", "1"],
                                                             "resources": {"requests": {"cpu": "6"}}}]}})


def _node_mode(mode):
    def act(core, ns, pod, **_):
        node = core.read_namespaced_pod(pod, ns).spec.node_name
        core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": mode}}})
    return act


def _suspend(core, ns, pod, jobs, name, **_):
    jobs.patch_spec(name, {"suspend": True})
    jobs.wait(name, "suspended", lambda s: (s.get("lastOutcome") or {}).get("result") == "Suspended", 90)
    jobs.patch_spec(name, {"suspend": False})


# (method, preemptions k, graceful, counted as preemption)
CASES = [("eviction", _evict, 3, True, True), ("scheduler", _scheduler, 2, True, True),
         ("node-shutdown", _node_mode("shutdown"), 2, True, True), ("suspend", _suspend, 1, True, False),
         ("node-lost", _node_mode("lost"), 1, False, True)]


@pytest.mark.parametrize(("method", "act", "k", "graceful", "counted"), CASES, ids=[c[0] for c in CASES])
def test_preempted_job_resumes_and_ends_bitwise_identical(operator, core, namespace, claim, reference,
                                                          method, act, k, graceful, counted):
    jobs, name = Jobs(namespace), method.replace("-", "")
    if method == "scheduler":
        ensure_priority_classes(**{"e2e-low": 10, "e2e-high": 1000})
    body = job(name)
    if method == "scheduler":
        pod_spec = body["spec"]["template"]["spec"]
        pod_spec["priorityClassName"] = "e2e-low"
        pod_spec["containers"][0]["resources"] = {"requests": {"cpu": "6"}}
    jobs.create(body)
    rng = random.Random(method)
    kill_steps = sorted(rng.sample(range(15, STEPS - 30), k))
    for n, kill_step in enumerate(kill_steps):
        wait_for(f"attempt {n} at step {kill_step}",
                 lambda n=n, s=kill_step: len(attempts(claim / name)) == n + 1 and current_step(claim / name) >= s,
                 120, interval=0.05)
        node = core.read_namespaced_pod(f"{name}-{n}", namespace).spec.node_name
        act(core, namespace, f"{name}-{n}", jobs=jobs, name=name, n=n)
        if method == "node-lost":
            try:
                jobs.wait(name, "node-lost preemption", lambda s: s.get("preemptions") == 1, 120)
            finally:
                core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": None}}})
        wait_for(f"attempt {n + 1} started", lambda n=n: len(attempts(claim / name)) >= n + 2, 120)
    st = jobs.wait_phase(name, "Succeeded", 240)
    assert st["preemptions"] == (k if counted else 0) and st["failures"] == 0 and st["attempt"] == k
    assert st["lastCheckpoint"]["step"] == STEPS
    runs = attempts(claim / name)
    assert len(runs) == k + 1
    for (_, reached), (resumed, _) in itertools.pairwise(runs):
        if graceful:
            assert resumed == reached, f"graceful preemption lost work: reached {reached}, resumed {resumed}"
        else:
            assert 0 <= reached - resumed <= EVERY, f"hard kill redid {reached - resumed} steps (> {EVERY})"
    assert json.loads((claim / name / "result.json").read_text())["weights_sha256"] == reference


def test_crashing_script_exhausts_backoff_limit_and_keeps_checkpoints(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(job("crashy", env={"TRAIN_FAIL_AT": "70"}, backoffLimit=1))
    st = jobs.wait_phase("crashy", "Failed", 180)
    assert (st["failures"], st["preemptions"]) == (2, 0)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "injected failure at step 70" in failed["message"]
    kept = sorted(p.name for p in (claim / "crashy").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000000000020", "step-000000000040", "step-000000000060"]
    assert [r for r, _ in attempts(claim / "crashy")] == [0, 60]  # the retry resumed from the checkpoint


def test_jobs_sharing_a_claim_stay_apart_and_warm_start_works(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(job("alpha", "--seed", "1"))
    jobs.create(job("beta", "--seed", "2"))
    for name in ("alpha", "beta"):
        jobs.wait_phase(name, "Succeeded", 240)
        for manifest in (claim / name).glob("step-*/MANIFEST.json"):
            assert json.loads(manifest.read_text())["job"] == name
    a = json.loads((claim / "alpha" / "result.json").read_text())["weights_sha256"]
    b = json.loads((claim / "beta" / "result.json").read_text())["weights_sha256"]
    assert a != b
    jobs.create(job("gamma", "--seed", "1", env={"TRAIN_STEPS": str(STEPS + 40)},
                    resumeFrom={"trainingJob": "alpha"}))
    jobs.wait_phase("gamma", "Succeeded", 240)
    assert attempts(claim / "gamma")[0][0] == STEPS  # warm-started from alpha's latest checkpoint
    assert sorted(p.name for p in (claim / "alpha").glob("step-*"))[-1] == f"step-{STEPS:012d}"  # untouched
