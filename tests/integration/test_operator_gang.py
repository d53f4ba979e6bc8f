"""Multi-node TrainingJobs (spec.workers > 1) against a real control plane and the test kubelet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.kube import Jobs, trainingjob, wait_for

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]

# every rank: resolve rank 0's DNS name, record what it sees; then rank 1 crashes (once rank 0 has recorded) and
# rank 0 trains on
RANK_SCRIPT = """
import json, os, socket, sys, time
for _ in range(600):
    try:
        address = socket.getaddrinfo(os.environ["MASTER_ADDR"], None)[0][4][0]
        break
    except socket.gaierror:
        time.sleep(0.1)
seen = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PET_NNODES",
                                   "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")}
seen.update(hostname=socket.gethostname(), master_ip=address)
with open(os.path.join(os.environ["CKPT_DIR"], "rank-%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(seen, f)
if os.environ["RANK"] == "1":
    while not os.path.exists(os.path.join(os.environ["CKPT_DIR"], "rank-0.json")):
        time.sleep(0.1)
    sys.exit(3)
time.sleep(600)
"""


def test_ranks_find_each_other_and_a_crashed_rank_stops_the_gang_as_one_failure(operator, core, namespace, claim):
    jobs, name = Jobs(namespace), "gang"
    jobs.create(trainingjob(name, [sys.executable, "-c", RANK_SCRIPT], workers=2, backoffLimit=0))
    st = jobs.wait_phase(name, "Failed", 120)
    assert (st["failures"], st["preemptions"], st["attempt"]) == (1, 0, 0)
    assert st["lastOutcome"]["reason"] == "ApplicationFailure" and "rank 1" in st["lastOutcome"]["message"]
    ranks = {w["rank"]: w for w in st["workers"]}
    assert ranks[1]["state"] == "Failed" and ranks[1]["exitCode"] == 3 and not ranks[1].get("stopped")
    assert ranks[0]["stopped"] is True  # stopped by the operator, with SIGTERM: never counted as the cause
    assert any(reason == "GangStopping" for _, reason, _ in jobs.events(name))
    for rank in (0, 1):
        seen = json.loads((claim / name / f"rank-{rank}.json").read_text())
        assert seen["RANK"] == seen["PET_NODE_RANK"] == str(rank)
        assert seen["WORLD_SIZE"] == seen["PET_NNODES"] == "2"
        assert seen["MASTER_ADDR"] == seen["PET_MASTER_ADDR"] == f"{name}-0.{name}"
        assert seen["MASTER_PORT"] == "29500" and seen["hostname"] == f"{name}-{rank}"
        assert seen["master_ip"] == "127.0.0.1"  # resolved through the headless Service, as cluster DNS would
    service = core.read_namespaced_service(name, namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    assert service.metadata.owner_references[0].kind == "TrainingJob"
    exe = str(Path(sys.executable).with_name("kubectl-ckpt"))
    described = subprocess.run([exe, "describe", name, "-n", namespace], env=operator.cluster.env(),
                               capture_output=True, text=True, timeout=60)
    ranks_table = described.stdout.split("Ranks (")[1].split("Timeline:")[0]
    rows = [line.split() for line in ranks_table.splitlines() if line.strip().startswith(("0 ", "1 "))]
    attempts_table = described.stdout.split("Attempts:")[1].split("Ranks (")[0]
    assert f"{name}-0-0 +1" in attempts_table and "ApplicationFailure" in attempts_table, described.stdout
    assert [row[:2] for row in rows] == [["0", f"{name}-0-0"], ["1", f"{name}-0-1"]], described.stdout
    assert "yes" in rows[0] and "3" in rows[1], described.stdout  # rank 0 stopped by the gang, rank 1 exit 3
    wait_for("every pod of the gang gone or finished", lambda: all(
        p.status.phase in ("Succeeded", "Failed") for p in core.list_namespaced_pod(namespace).items), 60)


def test_a_service_of_another_owner_is_reported_not_taken(operator, core, namespace, claim):
    core.create_namespaced_service(namespace, {"metadata": {"name": "taken"},
                                               "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}})
    jobs = Jobs(namespace)
    jobs.create(trainingjob("taken", [sys.executable, "-c", "pass"], workers=2))
    st = jobs.wait("taken", "ServiceConflict", lambda s: any(
        c["reason"] == "ServiceConflict" for c in s.get("conditions", [])), 60)
    assert st.get("attempt", 0) == 0 and not core.list_namespaced_pod(namespace).items
    assert core.read_namespaced_service("taken", namespace).spec.selector == {"app": "web"}  # untouched


def _apply(cluster, namespace: str, body: dict, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cluster.kubectl, "apply", "-n", namespace, *flags, "-f", "-"], input=json.dumps(body),
                          env=cluster.env(), capture_output=True, text=True)


def test_workers_is_validated_at_apply(operator, cluster, namespace):
    bad = _apply(cluster, namespace, trainingjob("1gang", ["true"], workers=2))
    assert bad.returncode != 0 and "starts with a letter" in bad.stderr
    elastic = _apply(cluster, namespace, trainingjob("2elastic", ["true"], workers={"min": 1, "max": 2}))
    assert elastic.returncode != 0 and "starts with a letter" in elastic.stderr
    assert _apply(cluster, namespace, trainingjob("1single", ["true"])).returncode == 0  # workers: 1 as before
    for value in (0, 1025, "two", {"min": 3, "max": 2}, {"min": 1}, {"min": 0, "max": 2},
                  {"min": 1, "max": 2, "step": 1}):
        refused = _apply(cluster, namespace, trainingjob("bad", ["true"], workers=value))
        assert refused.returncode != 0 and "spec.workers is a count" in refused.stderr, value
    assert _apply(cluster, namespace, trainingjob("grow", ["true"], workers=2, suspend=True)).returncode == 0
    # resharding on load makes the size changeable: the next attempt runs with the new one
    assert _apply(cluster, namespace, trainingjob("grow", ["true"], workers={"min": 2, "max": 3},
                                                 suspend=True)).returncode == 0


def test_every_example_trainingjob_is_accepted_by_the_api_server(operator, cluster, namespace):
    found = 0
    for path in sorted((ROOT / "examples").glob("**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "TrainingJob":
                out = _apply(cluster, namespace, doc, "--dry-run=server")
                assert out.returncode == 0, f"{path.name}: {out.stderr}"
                found += 1
    assert found >= 7
