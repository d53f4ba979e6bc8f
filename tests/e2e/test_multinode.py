"""A 2-rank torch DDP job (gloo, CPU) across the two test nodes: the gang is preempted, restarts as one unit and
resumes both ranks from the same sharded checkpoint, ending with the weights of an uninterrupted run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.kube import Jobs, evict, trainingjob, wait_for
from tests.ranks import TRAINER, finish, start_ranks

pytest.importorskip("torch", reason="the multi-node story trains with torch.distributed; .ci/run installs torch")
pytestmark = pytest.mark.cluster
STEPS = 80


def gang(name: str, every_steps: int) -> dict:
    body = trainingjob(name, [sys.executable, str(TRAINER), "--steps", str(STEPS), "--every-steps",
                              str(every_steps), "--step-seconds", "0.05"], workers=2)
    pod_spec = body["spec"]["template"]["spec"]
    pod_spec["containers"][0]["env"] = [{"name": "GLOO_SOCKET_IFNAME", "value": "lo"}]  # every test pod IP is lo
    pod_spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": {"ckpt.dev/job": name}}, "topologyKey": "kubernetes.io/hostname"}]}}
    return body


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """Final weights of an uninterrupted 2-rank run (local processes, no Kubernetes)."""
    tmp = tmp_path_factory.mktemp("ddp-reference")
    results = finish(start_ranks(tmp / "ckpt", tmp / "out", "torch", STEPS))
    assert [code for code, _ in results] == [0, 0], results
    return (tmp / "out").read_text()


def starts(host: Path) -> list[tuple[int, int, int]]:
    """(attempt, rank, start step) of every rank start, from the trainer's progress log."""
    found = re.findall(r"rank (\d+) attempt (\d+) start (\d+)", (host / "progress.log").read_text())
    return sorted((int(attempt), int(rank), int(step)) for rank, attempt, step in found)


def reached(host: Path, rank: int) -> int:
    try:
        lines = (host / f"progress-rank{rank}.log").read_text().split()
    except FileNotFoundError:
        return -1
    return int(lines[-1]) if lines else -1


def _running_pods(core, namespace: str, name: str, attempt: int) -> list:
    pods = [core.read_namespaced_pod(f"{name}-{attempt}-{rank}", namespace) for rank in range(2)]
    return pods if all(p.status.phase == "Running" for p in pods) else []


def test_evicting_one_rank_restarts_the_gang_from_the_same_step_bitwise(operator, core, namespace, claim,
                                                                        reference):
    jobs, name = Jobs(namespace), "ddp-evict"
    jobs.create(gang(name, every_steps=1000))  # no periodic save: all that survives is the preemption checkpoint
    pods = wait_for("both ranks running", lambda: _running_pods(core, namespace, name, 0), 120)
    assert len({p.spec.node_name for p in pods}) == 2  # one rank per test node
    assert {p.spec.hostname for p in pods} == {f"{name}-0", f"{name}-1"}
    wait_for("rank 1 at step 25", lambda: reached(claim / name, 1) >= 25, 120, interval=0.05)
    evict(core, namespace, f"{name}-0-1")
    st = jobs.wait_phase(name, "Succeeded", 300)
    assert (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 1)
    assert st["lastOutcome"]["result"] == "Succeeded"
    runs = starts(claim / name)
    assert [(a, r) for a, r, _ in runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    stopped = {step for attempt, _, step in runs if attempt == 1}
    assert len(stopped) == 1 and min(stopped) >= 25  # both ranks resumed the one step they agreed on
    assert [w["state"] for w in st["workers"]] == ["Succeeded", "Succeeded"]
    events = jobs.events(name)
    assert any(reason == "GangStopping" for _, reason, _ in events), events
    assert (claim / name / "result").read_text() == reference


# (node mode, periodic save every N steps, preemption reason, graceful: no step lost)
NODE_CASES = [("shutdown", 1000, "TerminationByKubelet", True), ("lost", 10, "NodeLost", False)]


@pytest.mark.parametrize(("mode", "every", "reason", "graceful"), NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_a_node_going_away_restarts_the_gang_bitwise(operator, core, namespace, claim, reference, mode, every,
                                                     reason, graceful):
    """`shutdown`: graceful node shutdown SIGTERMs rank 1 only; both ranks agree and save the same step.
    `lost`: rank 1 is killed with its node, rank 0 crashes on the broken connection; the gang resumes from the last
    complete checkpoint and the attempt counts as the preemption it is, not as rank 0's failure."""
    jobs, name = Jobs(namespace), f"ddp-{mode}"
    jobs.create(gang(name, every_steps=every))
    pods = wait_for("both ranks running", lambda: _running_pods(core, namespace, name, 0), 120)
    node = next(p.spec.node_name for p in pods if p.metadata.name.endswith("-1"))
    wait_for("rank 1 at step 35", lambda: reached(claim / name, 1) >= 35, 120, interval=0.05)
    core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": mode}}})
    try:
        st = jobs.wait(name, "the gang preempted", lambda s: s.get("preemptions") == 1, 240)
        assert st["lastOutcome"]["reason"] == reason and st["failures"] == 0
    finally:
        core.patch_node(node, {"metadata": {"annotations": {"kubelet.ckpt.dev/mode": None}}})
    st = jobs.wait_phase(name, "Succeeded", 300)
    assert (st["preemptions"], st["failures"]) == (1, 0)
    resumed = {step for attempt, _, step in starts(claim / name) if attempt == 1}
    assert len(resumed) == 1  # both ranks resumed one and the same step
    if graceful:
        assert min(resumed) >= 35  # the step they agreed on at the SIGTERM: no periodic save was due
    else:
        assert min(resumed) % every == 0 and min(resumed) >= 30
    assert (claim / name / "result").read_text() == reference
