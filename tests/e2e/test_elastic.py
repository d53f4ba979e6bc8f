"""An elastic gang (workers: {min: 1, max: 2}) of torch DDP on gloo across the two test nodes: a node's device plugin
fails (the kubelet's `reject` mode: no allocatable GPU, new pods refused), the gang is preempted and continues on 1
rank from the 2-rank checkpoint; the node heals, and the gang grows back to 2 ranks at a checkpoint. No step is
lost, the loss curve continues, and the weights end as an uninterrupted run's (up to float rounding: the global
batch is the same, summed in another order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kube import Jobs, evict, trainingjob, wait_for
from tests.ranks import rendezvous_port

pytest.importorskip("torch", reason="the elastic story trains with torch.distributed; .ci/run installs torch")
pytestmark = pytest.mark.cluster
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "elastic" / "train.py"
STEPS = 300
MODE = "kubelet.ckpt.dev/mode"


def elastic(name: str) -> dict:
    body = trainingjob(name, [sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--every-steps", "10",
                              "--step-seconds", "0.05"], workers={"min": 1, "max": 2})
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "GLOO_SOCKET_IFNAME", "value": "lo"}]  # every test pod IP is lo
    container["resources"] = {"limits": {"nvidia.com/gpu": "4"}}  # a whole test node per rank
    return body


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """Final weights of an uninterrupted 1-rank run (a local process, no Kubernetes)."""
    tmp = tmp_path_factory.mktemp("elastic-reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_", "MASTER_", "RANK", "WORLD_"))}
    env.update(WORLD_SIZE="1", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(rendezvous_port()), CKPT_DIR=str(tmp),
               GLOO_SOCKET_IFNAME="lo")
    subprocess.run([sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--every-steps", "1000"], env=env,
                   check=True, capture_output=True, timeout=300)
    return flat(tmp / "weights.json")


def flat(path: Path) -> list[float]:
    return [value for tensor in json.loads(path.read_text())["weights"] for value in tensor]


def steps_logged(host: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (host / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def running(core, namespace: str, names: list[str]) -> list:
    pods = [core.read_namespaced_pod(name, namespace) for name in names]
    return pods if all(p.status.phase == "Running" for p in pods) else []


def newest_step(host: Path) -> int:
    steps = [int(path.name.split("-")[1]) for path in host.glob("step-*") if (path / "MANIFEST.json").exists()]
    return max(steps, default=0)


def test_an_elastic_gang_shrinks_when_a_node_fails_and_grows_back_when_it_heals(operator, core, namespace, claim,
                                                                              reference):
    jobs, name, host = Jobs(namespace), "elastic", claim / "elastic"
    jobs.create(elastic(name))
    pods = wait_for("2 ranks running", lambda: running(core, namespace, [f"{name}-0-0", f"{name}-0-1"]), 120)
    assert len({p.spec.node_name for p in pods}) == 2  # a whole node per rank
    assert jobs.status(name)["worldSize"] == 2
    wait_for("a 2-rank checkpoint", lambda: newest_step(host) >= 20, 120)
    failing = pods[1].spec.node_name
    core.patch_node(failing, {"metadata": {"annotations": {MODE: "reject"}}})  # its device plugin fails
    try:
        wait_for("the node reports no GPU", lambda: core.read_node(failing).status.allocatable["nvidia.com/gpu"]
                 == "0", 30)
        evict(core, namespace, f"{name}-0-1")  # the rank there is preempted: the gang checkpoints and restarts
        st = jobs.wait(name, "an attempt on 1 rank", lambda s: s.get("worldSize") == 1 and s.get("phase") ==
                       "Running", 120)
        shrunk = st["attempt"]
        resumed_from = st["attempts"][-1]["startStep"]
        wait_for("a 1-rank checkpoint past the resume", lambda: newest_step(host) >= (resumed_from or 0) + 20, 120)
        manifest = json.loads((host / f"step-{newest_step(host):012d}" / "MANIFEST.json").read_text())
        assert manifest.get("world_size", 1) == 1
    finally:
        core.patch_node(failing, {"metadata": {"annotations": {MODE: None}}})  # healed
    st = jobs.wait(name, "grown back to 2 ranks", lambda s: s.get("worldSize") == 2 and s.get("attempt", 0) > shrunk,
                   120)
    st = jobs.wait_phase(name, "Succeeded", 300)
    sizes = [row.get("workers") for row in st["attempts"]]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, st["attempts"]
    resized = [row for row in st["attempts"] if row.get("reason") == "Resized"]
    assert len(resized) == 1 and resized[0]["workers"] == 1, st["attempts"]
    assert st["failures"] == 0 and st["preemptions"] == len([r for r in st["attempts"] if r.get("result") ==
                                                             "Preempted" and r.get("reason") != "Resized"])
    assert st["elastic"]["resizes"] >= 2
    for before, after in zip(st["attempts"], st["attempts"][1:], strict=False):  # no step lost at any resize
        if before.get("checkpointStep") is not None and after.get("startStep") is not None:
            assert after["startStep"] == before["checkpointStep"], st["attempts"]
    logged = steps_logged(host)
    assert [row["step"] for row in logged] == list(range(1, STEPS + 1))  # the curve continues, every step once
    assert {row["world_size"] for row in logged} == {1, 2}
    assert flat(host / "weights.json") == pytest.approx(reference, abs=1e-4)
    reasons = [reason for _, reason, _ in jobs.events(name)]
    assert reasons.count("Resized") >= 3, reasons  # shrink, the stop to grow, and the attempt that grew
