"""Progress, ETA and goodput (issue #29) of a job that crashes once (the steps past its checkpoint are redone) and
is preempted twice, checked against what its trainer logged: the steps each attempt trained from and to, and when
its training loop ran (`times.log`)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client

from ckpt_sdk._store import Store
from tests.kube import Jobs, evict, trainingjob, wait_for

pytestmark = pytest.mark.cluster
TRAINER = Path(__file__).parent / "trainers" / "sdk_trainer.py"
BIN = Path(sys.executable).parent
STEPS, PACE = 300, 0.05
PER_ATTEMPT = 1.5  # seconds: pod timestamps are whole seconds, the interpreter's start and exit are not training


def _times(directory: Path) -> list[tuple[int, int, float, int, float]]:
    """(attempt, from step, loop start, to step, loop end) per attempt, as the trainer logged."""
    rows = []
    for line in (directory / "times.log").read_text().splitlines():
        _, attempt, _, start, _, began, _, reached, _, ended = line.split()
        rows.append((int(attempt), int(start), float(began), int(reached), float(ended)))
    return sorted(rows)


def _newest(directory: Path) -> int:
    found = Store(directory).list()
    return found[-1].step if found else 0


def _unix(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_progress_eta_and_goodput_match_the_trainers_log(operator, cluster, core, namespace, claim):
    jobs = Jobs(namespace)
    jobs.create(trainingjob("pace", [sys.executable, str(TRAINER), "--steps", str(STEPS), "--every-steps", "20",
                                     "--step-seconds", str(PACE), "--crash-at", "30", "--crash-attempts", "1"]))
    directory = claim / "pace"
    for attempt, past in ((1, 80), (2, 160)):  # attempt 0 crashed at step 30 (checkpoint 20): 1 resumes from 20
        jobs.wait("pace", f"attempt {attempt}", lambda st, a=attempt: st.get("attempt") == a, 90)
        wait_for(f"attempt {attempt} checkpointed past step {past}", lambda p=past: _newest(directory) >= p, 90)
        evict(core, namespace, f"pace-{attempt}")
    running = jobs.wait("pace", "attempt 3 with an ETA", lambda st: st.get("attempt") == 3 and bool(
        (st.get("progress") or {}).get("estimatedCompletionTime")), 90)
    eta = running["progress"]["estimatedCompletionTime"]
    st = jobs.wait_phase("pace", "Succeeded", 120)
    assert (st["attempt"], st["preemptions"], st["failures"]) == (3, 2, 1)
    log = _times(directory)
    assert [row[0] for row in log] == [0, 1, 2, 3]
    progress = st["progress"]
    assert progress["display"] == f"{STEPS}/{STEPS} (100%)" and progress["totalSteps"] == STEPS
    assert PACE <= progress["stepSeconds"] < PACE + 0.05  # the trainer sleeps PACE a step; its math is quick
    # the ETA made when attempt 3 started: the completion, within the interpreter's start and whole seconds
    assert abs(_unix(eta) - _unix(st["completionTime"])) <= 2 * PER_ATTEMPT + 2, (eta, st["completionTime"])
    # redone steps: the trainer's log says attempt 0 trained to step 30 and attempt 1 began at 20; the SDK's last
    # report was step 29 (step 30 crashed before maybe_save saw it): within one step
    redone_log = [log[k - 1][3] - log[k][1] for k in range(1, 4)]
    redone_status = [row.get("stepsRedone") for row in st["attempts"][1:]]
    assert redone_log[1:] == [0, 0] and redone_status[1:] == [0, 0], (redone_log, redone_status)
    assert redone_log[0] - 1 <= redone_status[0] <= redone_log[0] == 10
    goodput = st["goodput"]
    wall = _unix(goodput["asOf"]) - _unix(client.CustomObjectsApi().get_namespaced_custom_object(
        "ckpt.dev", "v1alpha1", namespace, "trainingjobs", "pace")["metadata"]["creationTimestamp"])
    assert goodput["wallSeconds"] == pytest.approx(wall, abs=0.1)
    losses = ("redoneSeconds", "savingSeconds", "restartSeconds", "queuedSeconds")
    assert goodput["usefulSeconds"] + sum(goodput[k] for k in losses) == pytest.approx(wall, abs=0.5)
    assert goodput["ratio"] == pytest.approx(goodput["usefulSeconds"] / wall, abs=0.005)  # useful: to 0.1 s
    assert goodput["redoneSeconds"] == pytest.approx(redone_status[0] * st["attempts"][1]["stepSeconds"], abs=0.1)
    # useful: the time the trainer's loops ran, less the redone steps and the saves
    trained = sum(ended - began for _, _, began, _, ended in log)
    useful_log = trained - redone_log[0] * progress["stepSeconds"] - goodput["savingSeconds"]
    assert abs(goodput["usefulSeconds"] - useful_log) <= 4 * PER_ATTEMPT, (goodput, trained)
    # restarts: from one loop's end to the next one's start (pod deleted, created, interpreter started, resumed)
    gaps = sum(log[k][2] - log[k - 1][4] for k in range(1, 4))
    assert abs(goodput["restartSeconds"] - gaps) <= 3 * PER_ATTEMPT, (goodput, gaps)
    assert 0 < goodput["savingSeconds"] < 2 and goodput["queuedSeconds"] < 10
    # the printer columns and the plugin show them
    table = subprocess.run([cluster.kubectl, "get", "trainingjob", "pace", "-n", namespace], env=cluster.env(),
                           capture_output=True, text=True).stdout
    assert "PROGRESS" in table and f"{STEPS}/{STEPS}" in table and goodput["display"] in table, table
    described = subprocess.run([str(BIN / "kubectl-ckpt"), "describe", "pace", "-n", namespace], env=cluster.env(),
                               capture_output=True, text=True, timeout=60).stdout
    assert f"Goodput:         {goodput['display']} of" in described, described
    assert "STEP_S" in described and "SAVING_S" in described
    exposed = operator.metrics().splitlines()
    counted = {line.split('kind="')[1].split('"')[0]: float(line.split()[-1]) for line in exposed
               if line.startswith("ckpt_operator_goodput_seconds_total{") and f'namespace="{namespace}"' in line}
    assert set(counted) >= {"useful", "redone"}, counted  # (queueing and restarts here may be under 0.05 s)
    assert sum(counted.values()) == pytest.approx(goodput["wallSeconds"], abs=1.0), (counted, goodput)
