"""Interruption notices: a notice taint on the trainer's node gets a checkpoint while the pod still runs, then the pod
moves to the other node before the node goes; the job loses no step and ends bitwise identical."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.conftest import NOTICE_CHECKPOINT_SECONDS
from tests.kube import Jobs, progress, trainingjob, wait_for

pytestmark = pytest.mark.cluster
TRAINER = Path(__file__).parents[1] / "integration" / "trainers" / "sdk_trainer.py"
EVERY = 100  # the periodic save: a checkpoint at another step is the one the notice asked for
COMMAND = [sys.executable, str(TRAINER), "--steps", "1200", "--every-steps", str(EVERY), "--step-seconds", "0.05"]
REQUESTED = "ckpt.dev/checkpoint-requested"
AWS = "aws-node-termination-handler/spot-itn"
GKE = "cloud.google.com/impending-node-termination"


@contextmanager
def tainted(core: client.CoreV1Api, node: str, key: str) -> Iterator[None]:
    """The taint a cloud's termination handler puts on a node it is about to take (removed afterwards)."""
    taints = [t for t in core.read_node(node).spec.taints or [] if t.key != key]
    core.patch_node(node, {"spec": {"taints": [client.ApiClient().sanitize_for_serialization(t) for t in taints]
                                    + [{"key": key, "value": "true", "effect": "NoSchedule"}]}})
    try:
        yield
    finally:
        left = [client.ApiClient().sanitize_for_serialization(t) for t in core.read_node(node).spec.taints or []
                if t.key != key]
        core.patch_node(node, {"spec": {"taints": left or None}})


def rfc3339(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def steps(directory: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in directory.glob("step-*")) if directory.is_dir() else []


def running_pod(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 60) -> Any:
    def probe() -> Any:
        try:
            pod = core.read_namespaced_pod(name, namespace)
        except client.ApiException:
            return None
        return pod if pod.status.phase == "Running" and pod.metadata.deletion_timestamp is None else None

    return wait_for(f"pod {name} running", probe, timeout)


def other_node(core: client.CoreV1Api, node: str) -> str:
    return next(n.metadata.name for n in core.list_node().items if n.metadata.name != node)


@pytest.mark.parametrize(("taint", "notice_seconds"), [(AWS, 120), (GKE, 30)], ids=["aws-spot-itn", "gke"])
def test_a_notice_checkpoints_then_migrates_with_no_step_lost(operator, cluster, core, namespace, claim, taint,
                                                              notice_seconds):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("notice", COMMAND, preemption={"gracePeriodSeconds": 10}))
    node = running_pod(core, namespace, "notice-0").spec.node_name
    elsewhere = other_node(core, node)
    reference = trainingjob("whole", COMMAND)  # uninterrupted, in a pod too, away from the node that will go
    reference["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": elsewhere}
    jobs.create(reference)
    wait_for("a periodic checkpoint", lambda: any(s >= 2 * EVERY for s in steps(claim / "notice")), 90)
    with tainted(core, node, taint):
        noticed = time.time()
        extra = wait_for("the requested checkpoint", lambda: [s for s in steps(claim / "notice") if s % EVERY],
                         NOTICE_CHECKPOINT_SECONDS, interval=0.05)
        durable = time.time() - noticed
        manifest = json.loads((claim / "notice" / f"step-{extra[0]:012d}" / "MANIFEST.json").read_text())
        pod = core.read_namespaced_pod("notice-0", namespace)
        # durable while the trainer still runs: the request did not stop it
        assert pod.status.phase == "Running" and pod.metadata.deletion_timestamp is None
        notice = jobs.status("notice")["interruption"]
        assert (notice["node"], notice["taint"]) == (node, taint)
        assert pod.metadata.annotations[REQUESTED] == notice["deadline"]
        describe = subprocess.run([str(Path(sys.executable).with_name("kubectl-ckpt")), "describe", "notice", "-n",
                                   namespace], env=cluster.env(), capture_output=True, text=True, timeout=60)
        assert f"node {node} has {taint}" in describe.stdout, describe.stdout + describe.stderr
        seen, deadline = rfc3339(notice["seenTime"]), rfc3339(notice["deadline"])
        assert deadline - seen == notice_seconds
        moved = running_pod(core, namespace, "notice-1", 60 + NOTICE_CHECKPOINT_SECONDS)
        moved_after = time.time() - noticed
        assert moved.spec.node_name == elsewhere  # the notice taint keeps the scheduler off the doomed node
        # moved well before the deadline: the SIGKILL never came
        assert time.time() < deadline
    st = jobs.wait_phase("notice", "Succeeded", 240)
    assert (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 1)
    jobs.wait_event("notice", "Warning", "InterruptionNotice")
    assert any(reason == "InterruptionNotice" and "attempt 0 preempted" in message
               for _, reason, message in jobs.events("notice"))
    assert f'ckpt_operator_interruption_notices_total{{namespace="{namespace}",taint="{taint}"}} 1.0' \
        in operator.metrics()
    assert f'ckpt_operator_preemptions_total{{namespace="{namespace}",reason="InterruptionNotice"}} 1.0' \
        in operator.metrics()
    stops = (claim / "notice" / "stops.log").read_text().split()
    starts = [line.split() for line in progress(claim / "notice")]
    assert starts[1][3] == stops[3]  # attempt 1 starts where attempt 0 stopped: 0 steps redone
    assert jobs.wait_phase("whole", "Succeeded", 120)["attempt"] == 0
    assert (claim / "notice" / "result").read_text() == (claim / "whole" / "result").read_text()
    print(f"\ninterruption notice ({taint}): taint -> save of step {extra[0]} started {manifest['time'] - noticed:.2f}s"
          f", durable (seen) {durable:.2f}s; pod moved by {moved_after:.1f}s; deadline {notice_seconds}s")


def test_a_notice_on_a_node_without_trainers_does_nothing(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    slow = [sys.executable, str(TRAINER), "--steps", "100000", "--every-steps", "100000", "--step-seconds", "0.1"]
    jobs.create(trainingjob("calm", slow))
    node = running_pod(core, namespace, "calm-0").spec.node_name
    empty = other_node(core, node)
    with tainted(core, empty, AWS):
        wait_for("the operator saw the notice", lambda: f"node {empty}: interruption notice" in
                 operator.log.read_text(), 30)
        # node events are handled in order: once the next notice (on the trainer's node) is acted on, the first one
        # would have been acted on before it, had it concerned the job
        with tainted(core, node, GKE):
            annotated = wait_for("the checkpoint request", lambda: (core.read_namespaced_pod(
                "calm-0", namespace).metadata.annotations or {}).get(REQUESTED), 30)
            notice = jobs.status("calm")["interruption"]
            assert notice["node"] == node and notice["deadline"] == annotated
            requests = [message for _, reason, message in jobs.events("calm")
                        if reason == "InterruptionNotice" and "checkpoint requested" in message]
            assert len(requests) <= 1 and all(empty not in message for message in requests)
