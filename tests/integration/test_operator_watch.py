"""The operator is watch-driven: a steady job costs no API request, whatever events arrive meanwhile."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.kube import Jobs, trainingjob, wait_for

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
    # events that wake the job's worker without changing anything it acts on: the job, its pod and its node
    custom = client.CustomObjectsApi()
    custom.patch_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs", "steady",
                                          {"metadata": {"annotations": {"touched": "1"}}})
    core.patch_namespaced_pod("steady-0", namespace, {"metadata": {"annotations": {"touched": "1"}}})
    node = core.read_namespaced_pod("steady-0", namespace).spec.node_name
    core.patch_node(node, {"metadata": {"annotations": {"touched": str(time.time())}}})
    wait_for("the quiet window to pass, with passes over the job",
             lambda: time.monotonic() >= window_end and reconciles(operator) >= passes + 2, WINDOW_SECONDS + 30)
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
