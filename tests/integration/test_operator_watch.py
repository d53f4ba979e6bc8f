"""The operator is watch-driven: a steady job costs no API request, whatever events arrive meanwhile."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.kube import Jobs, evict, trainingjob, wait_for

pytestmark = pytest.mark.cluster
TRAINER = Path(__file__).parent / "trainers" / "sdk_trainer.py"
OPERATOR_AGENT = re.compile(r"^(ckpt-operator|kopf/)")  # its own client and kopf's (watches are not logged)
WINDOW_SECONDS = 35.0  # longer than the 30 s re-read of every job the operator used to do


def operator_requests(audit: Path, start: int, namespace: str) -> list[str]:
    """The operator's API requests logged since byte `start` of the API server's audit log that read anything
    (get, list) or touch `namespace` ("verb resource namespace/name"). Writes for other namespaces are not this
    test's business: an earlier test's namespace may still be being deleted."""
    with open(audit, "rb") as log:
        log.seek(start)
        entries = [json.loads(line) for line in log.read().splitlines() if line.strip()]
    found = []
    for entry in entries:
        ref = entry.get("objectRef", {})
        if OPERATOR_AGENT.search(entry.get("userAgent", "")) and (
                entry["verb"] in ("get", "list") or ref.get("namespace") == namespace):
            found.append(f"{entry['verb']} {ref.get('resource', '')} {ref.get('namespace', '')}/{ref.get('name', '')}")
    return found


def reconciles(operator) -> float:  # type: ignore[no-untyped-def]
    return float(re.search(r"^ckpt_operator_reconciles_total (\S+)$", operator.metrics(), re.M).group(1))


def test_a_steady_job_makes_no_api_request(operator, cluster, core, namespace, claim):
    audit = cluster.audit_log
    start = audit.stat().st_size
    jobs = Jobs(namespace)
    jobs.create(trainingjob("steady", [sys.executable, str(TRAINER), "--steps", "100000", "--every-steps", "50",
                                       "--step-seconds", "0.05"]))
    jobs.wait_phase("steady", "Running")
    jobs.wait_event("steady", "Normal", "PodRunning")
    # the audit log does attribute the operator's requests
    assert any(r.startswith("create pods") for r in operator_requests(audit, start, namespace))
    quiet_from = audit.stat().st_size
    passes = reconciles(operator)
    window_end = time.monotonic() + WINDOW_SECONDS
    # events that change nothing the operator acts on: the job's annotations (a pass over it, waited for: the
    # pass must make no request either), its pod's and its node's (which the watches drop and wake no one for)
    custom = client.CustomObjectsApi()
    custom.patch_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs", "steady",
                                          {"metadata": {"annotations": {"touched": "1"}}})
    wait_for("a pass over the touched job", lambda: reconciles(operator) >= passes + 1, 30)
    core.patch_namespaced_pod("steady-0", namespace, {"metadata": {"annotations": {"touched": "1"}}})
    node = core.read_namespaced_pod("steady-0", namespace).spec.node_name
    core.patch_node(node, {"metadata": {"annotations": {"touched": str(time.time())}}})
    wait_for("the quiet window to pass", lambda: time.monotonic() >= window_end, WINDOW_SECONDS + 30)
    assert operator_requests(audit, quiet_from, namespace) == []
    st = jobs.status("steady")
    assert (st["phase"], st["attempt"], st["preemptions"]) == ("Running", 0, 0)


def test_one_cache_and_one_orphan_sweep_whatever_the_number_of_objects(operator, namespace, claim):
    """kopf hands each object's handlers a copy of the memo: state kept on it would be made once per object (it
    was: one sweep over every pod per job and per pod, which starved the event loop at 5,000 jobs)."""
    marker = "orphan sweep started"
    before = operator.log.read_text().count(marker)
    jobs = Jobs(namespace)
    for index in range(3):
        jobs.create(trainingjob(f"many-{index}", ["sleep", "600"]))
    for index in range(3):
        jobs.wait_phase(f"many-{index}", "Running")
    after = operator.log.read_text().count(marker)
    assert after >= 1 and after - before <= 1, f"{after - before} sweeps started for 3 jobs and their pods"


def _storm_requests(audit: Path, start: int, namespace: str) -> dict[str, int]:
    """The operator's requests since `start`, by "verb resource[/subresource]", Events apart."""
    counts: dict[str, int] = {}
    with open(audit, "rb") as log:
        log.seek(start)
        for line in log.read().splitlines():
            entry = json.loads(line) if line.strip() else {}
            ref = entry.get("objectRef", {})
            if not OPERATOR_AGENT.search(entry.get("userAgent", "")) or ref.get("namespace") != namespace:
                continue
            key = f"{entry['verb']} {ref.get('resource', '')}" + (f"/{ref['subresource']}" if ref.get(
                "subresource") else "")
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_a_storm_costs_a_create_one_status_write_and_a_release_per_preemption(operator, cluster, core, namespace,
                                                                              claim):
    """With the client budget saturated (0.5 requests/s), replacements are created first; each job's status write
    waits until its new pod runs: one write records the outcome, the new attempt and that it runs."""
    jobs_count = 4
    operator.stop()
    operator.start("--qps", "0.5", "--burst", "1")
    try:
        jobs = Jobs(namespace)
        names = [f"storm-{index}" for index in range(jobs_count)]
        for name in names:
            jobs.create(trainingjob(name, ["sleep", "600"]))
        for name in names:
            jobs.wait_phase(name, "Running", timeout=120)
        audit = cluster.audit_log
        start = audit.stat().st_size
        for name in names:
            evict(core, namespace, f"{name}-0")
        for name in names:
            jobs.wait(name, "attempt 1 running, recorded", lambda st: st.get("attempt") == 1 and st.get(
                "phase") == "Running" and st.get("preemptions") == 1, timeout=120)
        wait_for("the old pods released", lambda: all(
            not (core.read_namespaced_pod(f"{name}-0", namespace).metadata.finalizers or [])
            if _exists(core, namespace, f"{name}-0") else True for name in names), 60)
        requests = _storm_requests(audit, start, namespace)
    finally:
        operator.stop()
    events = {key: count for key, count in requests.items() if "events" in key}
    budget = {key: count for key, count in requests.items() if "events" not in key}
    assert budget.get("create pods") == jobs_count, requests
    assert budget.get("patch pods") == jobs_count, requests  # each old pod's finalizer released once
    assert budget.get("patch trainingjobs/status", 0) <= jobs_count, requests  # one per job, once its pod runs
    assert budget.get("get persistentvolumeclaims", 0) <= 1, requests  # read once per claim at most, not per pod
    assert not [key for key in budget if key.startswith(("get", "list")) and "persistentvolumeclaims" not in key]
    assert sum(budget.values()) <= 3 * jobs_count, requests
    assert events, requests  # Events go on their own budget, still posted


def _exists(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
        return True
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise


def test_an_operator_watching_one_namespace_lists_and_watches_its_pods_there(operator, core, namespace, claim):
    """`--namespace`: the pod watch lists and watches that namespace alone (not all of them); an evicted pod there is
    seen and replaced, and its finalizer released."""
    operator.stop()
    logged = operator.log.stat().st_size
    operator.start("--namespace", namespace)
    try:
        jobs = Jobs(namespace)
        jobs.create(trainingjob("scoped", ["sleep", "600"]))
        jobs.wait_phase("scoped", "Running", timeout=120)
        evict(core, namespace, "scoped-0")
        status = jobs.wait("scoped", "attempt 1 running", lambda st: st.get("attempt") == 1 and st.get(
            "phase") == "Running", timeout=120)
        wait_for("the evicted pod released", lambda: not _exists(core, namespace, "scoped-0") or not (
            core.read_namespaced_pod("scoped-0", namespace).metadata.finalizers or []), 60)
    finally:
        operator.stop()
    assert status["preemptions"] == 1 and status["lastOutcome"]["reason"] == "EvictionByEvictionAPI"
    with open(operator.log, "rb") as log:
        log.seek(logged)
        assert b"pod watch: 0 pods listed" in log.read()  # its namespace was new, and no other one was listed
