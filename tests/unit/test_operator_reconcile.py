import datetime as dt
import json

import pytest

from ckpt_operator import reasons as R
from ckpt_operator.builders import JobRef
from ckpt_operator.classify import PodState, classify
from ckpt_operator.errors import InvalidSpecError
from ckpt_operator.models import Phase, TrainingJobSpec, TrainingJobStatus
from ckpt_operator.reconcile import Observed, Settings, iso, plan

JOB = JobRef("demo", "ns", "uid")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SETTINGS = Settings(backoff_base_seconds=10, backoff_cap_seconds=60)


def spec(**over):
    base = {"template": {"spec": {"containers": [{"name": "trainer", "command": ["python", "t.py"]}]}},
            "checkpoint": {"persistentVolumeClaim": {"claimName": "c"}}}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def pod(attempt=0, phase="Running", exit_code=None, message=None, disruption=None, deleting=False, node="n1"):
    p = {"metadata": {"name": f"demo-{attempt}"}, "spec": {"nodeName": node}, "status": {"phase": phase}}
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error" if exit_code else "Completed", "message": message or ""}}}]
    if disruption:
        p["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": disruption,
                                      "message": "taken"}]
    if deleting:
        p["metadata"]["deletionTimestamp"] = iso(NOW)
    return p


def step(status, p=None, s=None, now=NOW, node_ready=True, problem=None):
    return plan(Observed(JOB, 1, s or spec(), status, p, node_ready, problem), now, SETTINGS)


# -- classify ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("p", "state", "reason"), [
    (pod(phase="Succeeded", exit_code=0), PodState.SUCCEEDED, R.COMPLETED),
    (pod(phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI"), PodState.PREEMPTED,
     "EvictionByEvictionAPI"),
    (pod(phase="Failed", exit_code=143, disruption="PreemptionByKubeScheduler"), PodState.PREEMPTED,
     "PreemptionByKubeScheduler"),
    (pod(phase="Failed", exit_code=137, disruption="TerminationByKubelet"), PodState.PREEMPTED,
     "TerminationByKubelet"),
    (pod(phase="Failed", exit_code=143), PodState.PREEMPTED, R.EXIT_AFTER_SIGTERM),
    (pod(phase="Failed", exit_code=137, deleting=True), PodState.PREEMPTED, R.POD_DELETED),
    (pod(phase="Failed", exit_code=1), PodState.FAILED, R.APPLICATION_FAILURE),
    (pod(phase="Failed", exit_code=137), PodState.FAILED, R.APPLICATION_FAILURE),  # OOM-kill is not preemption
    (pod(phase="Running"), PodState.RUNNING, R.POD_RUNNING),
    (pod(phase="Running", deleting=True), PodState.TERMINATING, R.POD_DELETED),
    (pod(phase="Pending", node=None), PodState.PENDING, R.PODS_STARTING),
])
def test_classify(p, state, reason):
    verdict = classify(p, "trainer", True)
    assert (verdict.state, verdict.reason) == (state, reason)


def test_classify_reads_the_sdk_termination_message():
    v = classify(pod(phase="Failed", exit_code=143, message=json.dumps({"step": 120, "time": "t"})), "trainer", True)
    assert (v.checkpoint_step, v.checkpoint_time) == (120, "t")
    v = classify(pod(phase="Failed", exit_code=143, message="not json"), "trainer", True)
    assert v.checkpoint_step is None


def test_classify_lost_node():
    assert classify(pod(phase="Running"), "trainer", False).state == PodState.NODE_LOST


# -- plan -------------------------------------------------------------------------------------------
def test_first_pass_creates_attempt_zero():
    p = step(TrainingJobStatus())
    assert p.create["metadata"]["name"] == "demo-0"
    assert p.status.active_pod == "demo-0" and p.status.attempt == 0 and p.status.phase == Phase.PENDING
    assert p.status.start_time == iso(NOW)


def test_running_pod_sets_running_once():
    st = step(TrainingJobStatus()).status
    p = step(st, pod())
    assert p.status.phase == Phase.RUNNING and p.create is None and p.delete is None
    assert step(p.status, pod()).status == p.status  # idempotent: nothing to write


def test_preemption_is_counted_once_and_resubmitted_without_touching_failures():
    st = step(step(TrainingJobStatus()).status, pod()).status
    ended = pod(phase="Failed", exit_code=143, message='{"step": 40}', disruption="PreemptionByScheduler")
    p = step(st, ended)
    assert p.status.preemptions == 1 and p.status.failures == 0
    assert p.status.last_checkpoint.step == 40 and p.status.phase == Phase.PREEMPTED
    assert p.create["metadata"]["name"] == "demo-1" and p.status.attempt == 1
    assert {e["name"]: e["value"] for e in p.create["spec"]["containers"][0]["env"]}["CKPT_RESTART_REASON"] \
        == "preempted"
    assert p.delete == ("demo-0", 0)
    assert ("preemptions", "PreemptionByScheduler") in p.counters and p.resubmit_latency == 0.0
    again = step(p.status, pod(1, phase="Pending", node=None))  # the new attempt is waiting to be scheduled
    assert again.status.preemptions == 1 and again.create is None and again.status.phase == Phase.PREEMPTED
    running = step(again.status, pod(1))
    assert running.status.phase == Phase.RUNNING and running.status.preemptions == 1


def test_failures_back_off_exponentially_then_fail_the_job():
    st = step(TrainingJobStatus(), s=spec(backoffLimit=1)).status
    p = step(st, pod(phase="Failed", exit_code=2), s=spec(backoffLimit=1))
    assert p.status.failures == 1 and p.create is None and p.status.phase == Phase.PENDING
    assert p.requeue == 10.0 and p.status.last_outcome.retry_after == iso(NOW + dt.timedelta(seconds=10))
    later = step(p.status, pod(phase="Failed", exit_code=2), s=spec(backoffLimit=1),
                 now=NOW + dt.timedelta(seconds=11))
    assert later.create["metadata"]["name"] == "demo-1" and later.delete is None  # failed pods keep their logs
    env = {e["name"]: e["value"] for e in later.create["spec"]["containers"][0]["env"]}
    assert env["CKPT_RESTART_REASON"] == "failed"
    final = step(later.status, pod(1, phase="Failed", exit_code=2), s=spec(backoffLimit=1),
                 now=NOW + dt.timedelta(seconds=30))
    assert final.status.phase == Phase.FAILED and final.status.failures == 2 and final.create is None
    assert any(c.type == R.COND_FAILED and c.reason == R.BACKOFF_LIMIT_EXCEEDED for c in final.status.conditions)


def test_max_preemptions_fails_the_job():
    s = spec(preemption={"maxPreemptions": 0})
    st = step(TrainingJobStatus(), s=s).status
    p = step(st, pod(phase="Failed", exit_code=143), s=s)
    assert p.status.phase == Phase.FAILED and p.create is None
    assert p.status.conditions[-1].reason == R.PREEMPTION_LIMIT_EXCEEDED


def test_never_two_attempts_at_once():
    st = step(step(TrainingJobStatus()).status, pod()).status
    p = step(st, pod(phase="Running", deleting=True))
    assert p.create is None and p.status.phase == Phase.RUNNING


def test_lost_node_force_deletes_and_counts_a_preemption():
    st = step(TrainingJobStatus()).status
    p = step(st, pod(phase="Running"), node_ready=False)
    assert p.delete == ("demo-0", 0) and p.status.preemptions == 1
    assert p.status.last_outcome.reason == R.NODE_LOST
    assert p.create is not None and p.create["metadata"]["name"] == "demo-1"


def test_vanished_pod_is_a_preemption():
    st = step(TrainingJobStatus()).status
    p = step(st, None)
    assert p.status.preemptions == 1 and p.status.last_outcome.reason == R.POD_DELETED


def test_suspend_and_resume():
    st = step(step(TrainingJobStatus()).status, pod()).status
    s = spec(suspend=True)
    p = step(st, pod(), s=s)
    assert p.delete == ("demo-0", 30) and p.status.phase == Phase.SUSPENDED
    p = step(p.status, pod(phase="Failed", exit_code=143, message='{"step": 7}', deleting=True), s=s)
    assert p.status.preemptions == 0 and p.status.last_outcome.result == "Suspended" and p.create is None
    assert p.status.last_checkpoint.step == 7
    p = step(p.status, None, s=spec(suspend=False))
    env = {e["name"]: e["value"] for e in p.create["spec"]["containers"][0]["env"]}
    assert env["CKPT_RESTART_REASON"] == "resumed" and p.create["metadata"]["name"] == "demo-1"


def test_spec_problem_is_reported_and_retried():
    problem = InvalidSpecError(R.CLAIM_NOT_FOUND, 'persistentvolumeclaim "c" not found')
    p = step(TrainingJobStatus(), problem=problem)
    assert p.create is None and p.requeue == 10.0
    cond = next(c for c in p.status.conditions if c.type == R.COND_READY)
    assert (cond.status, cond.reason) == ("False", R.CLAIM_NOT_FOUND)
    assert p.events == [("Warning", R.CLAIM_NOT_FOUND, 'persistentvolumeclaim "c" not found')]


def test_success_completes_and_stops_requeueing():
    st = step(TrainingJobStatus()).status
    p = step(st, pod(phase="Succeeded", exit_code=0, message='{"step": 300}'))
    assert p.status.phase == Phase.SUCCEEDED and p.status.completion_time == iso(NOW)
    assert p.status.last_checkpoint.step == 300 and p.requeue is None and p.create is None
