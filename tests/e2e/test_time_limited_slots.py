"""Time-limited slots (activeDeadlineSeconds, the DSRI case): a job runs across slots with no lost step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.kube import Jobs, progress, trainingjob

pytestmark = pytest.mark.cluster
TRAINER = Path(__file__).parents[1] / "integration" / "trainers" / "sdk_trainer.py"
COMMAND = [sys.executable, str(TRAINER), "--steps", "1200", "--every-steps", "100", "--step-seconds", "0.05"]


def test_a_job_runs_across_time_limited_slots_and_ends_bitwise_identical(operator, core, namespace, claim):
    jobs = Jobs(namespace)
    # the reference runs in a pod too: same environment (the host's OPENBLAS_* settings change numpy's kernels)
    jobs.create(trainingjob("whole", COMMAND))
    body = trainingjob("slots", COMMAND)
    body["spec"]["template"]["spec"]["activeDeadlineSeconds"] = 20  # ~60 s of training in 20 s slots
    jobs.create(body)
    st = jobs.wait_phase("slots", "Succeeded", 300)
    assert jobs.wait_phase("whole", "Succeeded", 120)["attempt"] == 0
    assert st["failures"] == 0 and st["attempt"] >= 2 and st["preemptions"] == st["attempt"]
    jobs.wait_event("slots", "Warning", "DeadlineExceeded")
    runs = [line.split() for line in progress(claim / "slots")]
    assert len(runs) >= 3 and all(run[5] == "preempted" for run in runs[1:])
    # every slot resumed exactly where the previous one checkpointed ahead of its deadline
    assert (claim / "slots" / "result").read_text() == (claim / "whole" / "result").read_text()
