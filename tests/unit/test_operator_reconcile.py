import datetime as dt
import json

import pytest

from ckpt_operator import reasons as R
from ckpt_operator.builders import JobRef
from ckpt_operator.classify import NodeInfo, PodState, classify
from ckpt_operator.errors import InvalidSpecError
from ckpt_operator.models import Phase, TrainingJobSpec, TrainingJobStatus
from ckpt_operator.planning import Observed, Settings, iso
from tests.unit.fixpoint import plan

JOB = JobRef("demo", "ns", "uid")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SETTINGS = Settings(backoff_base_seconds=10, backoff_cap_seconds=60)


def spec(**over):
    base = {"template": {"spec": {"containers": [{"name": "trainer", "command": ["python", "t.py"]}]}},
            "checkpoint": {"persistentVolumeClaim": {"claimName": "c"}}}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def pod(attempt=0, phase="Running", exit_code=None, message=None, disruption=None, deleting=False, node="n1",
        reason=None, conditions=(), waiting=None):
    p = {"metadata": {"name": f"demo-{attempt}"}, "spec": {"nodeName": node}, "status": {"phase": phase}}
    if reason:
        p["status"]["reason"] = reason
    if conditions:
        p["status"]["conditions"] = list(conditions)
    if waiting:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error" if exit_code else "Completed", "message": message or ""}}}]
    if disruption:
        p["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "message": "taken",
                                      **({"reason": disruption} if disruption is not True else {})}]
    if deleting:
        p["metadata"]["deletionTimestamp"] = iso(NOW)
    return p


READY = NodeInfo("n1")


def unreachable(seconds: float) -> NodeInfo:
    return NodeInfo("n1", ready=False, not_ready_since=NOW - dt.timedelta(seconds=seconds))


def step(status, p=None, s=None, now=NOW, node=READY, problem=None, deleting=False):
    nodes = {node.name: node} if p is not None and node is not None else {}
    return plan(Observed(JOB, 1, s or spec(), status, [p] if p is not None else [], nodes, problem,
                         deleting=deleting), now, SETTINGS)


# -- classify ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("p", "state", "reason"), [
    (pod(phase="Succeeded", exit_code=0), PodState.SUCCEEDED, R.COMPLETED),
    (pod(phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI"), PodState.PREEMPTED,
     "EvictionByEvictionAPI"),
    (pod(phase="Failed", exit_code=143, disruption="PreemptionByKubeScheduler"), PodState.PREEMPTED,
     "PreemptionByKubeScheduler"),
    (pod(phase="Failed", exit_code=137, disruption="TerminationByKubelet"), PodState.PREEMPTED,
     "TerminationByKubelet"),
    (pod(phase="Failed", exit_code=143), PodState.FAILED, R.UNEXPLAINED_SIGTERM),  # a liveness kill, not a preemption
    (pod(phase="Failed", exit_code=143, disruption="SomethingNew"), PodState.PREEMPTED, "SomethingNew"),
    (pod(phase="Failed", exit_code=143, disruption=True), PodState.PREEMPTED, R.UNKNOWN_DISRUPTION),
    (pod(phase="Succeeded", exit_code=0, disruption="EvictionByEvictionAPI"), PodState.PREEMPTED,
     "EvictionByEvictionAPI"),  # a wrapper that exits 0 after its trainer was preempted
    (pod(phase="Succeeded", exit_code=0, disruption="EvictionByEvictionAPI", message='{"step": 9, "reason": "exit"}'),
     PodState.SUCCEEDED, R.COMPLETED),  # the SDK says the trainer finished on its own
    (pod(phase="Failed", reason="UnexpectedAdmissionError"), PodState.PREEMPTED, R.ADMISSION_REJECTED),
    (pod(phase="Failed", reason="OutOfnvidia.com/gpu"), PodState.PREEMPTED, R.ADMISSION_REJECTED),
    (pod(phase="Failed", reason="NodeAffinity"), PodState.PREEMPTED, R.ADMISSION_REJECTED),
    (pod(phase="Failed", exit_code=137, reason="Terminated"), PodState.PREEMPTED, "TerminationByKubelet"),
    (pod(phase="Failed", exit_code=137, reason="Evicted"), PodState.PREEMPTED, "EvictionByKubelet"),
    (pod(phase="Failed", exit_code=143, reason="DeadlineExceeded"), PodState.PREEMPTED, R.DEADLINE_EXCEEDED),
    (pod(phase="Failed", exit_code=143, message='{"step": 9, "reason": "deadline"}'), PodState.PREEMPTED,
     R.DEADLINE_EXCEEDED),  # the SDK checkpointed ahead of the slot's end
    (pod(phase="Pending", node=None, conditions=[{"type": "PodScheduled", "status": "False",
                                                  "reason": "Unschedulable", "message": "0/2 nodes"}]),
     PodState.PENDING, R.UNSCHEDULABLE),
    (pod(phase="Pending", waiting={"reason": "ImagePullBackOff", "message": "no such image"}), PodState.PENDING,
     "ImagePullBackOff"),
    (pod(phase="Pending", waiting={"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}),
     PodState.PENDING, "CreateContainerConfigError"),
    (pod(phase="Failed", exit_code=137, deleting=True), PodState.PREEMPTED, R.POD_DELETED),
    (pod(phase="Failed", exit_code=1), PodState.FAILED, R.APPLICATION_FAILURE),
    (pod(phase="Failed", exit_code=137), PodState.FAILED, R.APPLICATION_FAILURE),  # OOM-kill is not preemption
    (pod(phase="Running"), PodState.RUNNING, R.POD_RUNNING),
    (pod(phase="Running", deleting=True), PodState.TERMINATING, R.POD_DELETED),
    (pod(phase="Pending", node=None), PodState.PENDING, R.PODS_STARTING),
])
def test_classify(p, state, reason):
    verdict = classify(p, "trainer")
    assert (verdict.state, verdict.reason) == (state, reason)


def test_classify_reads_the_sdk_termination_message():
    v = classify(pod(phase="Failed", exit_code=143, message=json.dumps({"step": 120, "time": "t"})), "trainer")
    assert (v.checkpoint_step, v.checkpoint_time) == (120, "t")
    v = classify(pod(phase="Failed", exit_code=143, message="not json"), "trainer")
    assert v.checkpoint_step is None


def test_a_failure_shows_the_error_the_sdk_recorded_or_the_log_tail():
    sdk = json.dumps({"step": 12, "reason": "error", "error": "RuntimeError: diverged"})
    assert classify(pod(phase="Failed", exit_code=1, message=sdk), "trainer").message == \
        "the trainer exited 1 (Error): RuntimeError: diverged"
    assert classify(pod(phase="Failed", exit_code=1, message="Traceback ... KeyError: 'x'"), "trainer").message == \
        "the trainer exited 1 (Error): Traceback ... KeyError: 'x'"


def test_classify_lost_node():
    assert classify(pod(phase="Running"), "trainer", True).state == PodState.NODE_LOST


@pytest.mark.parametrize(("node", "lost"), [
    (NodeInfo("n1"), False),
    (unreachable(60), False),  # a NotReady blip: the pod may well be running
    (unreachable(299), False),
    (unreachable(300), True),
    (NodeInfo("n1", exists=False, ready=False), True),
    (NodeInfo("n1", out_of_service=True), True),
])
def test_node_is_lost_only_when_gone_out_of_service_or_past_the_timeout(node, lost):
    assert node.lost(NOW, 300) is lost


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
    p = step(st, pod(phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI"), s=s)
    assert p.status.phase == Phase.FAILED and p.create is None
    assert p.status.conditions[-1].reason == R.PREEMPTION_LIMIT_EXCEEDED


def test_never_two_attempts_at_once():
    st = step(step(TrainingJobStatus()).status, pod()).status
    p = step(st, pod(phase="Running", deleting=True))
    assert p.create is None and p.status.phase == Phase.RUNNING


def test_lost_node_force_deletes_and_counts_a_preemption():
    st = step(TrainingJobStatus()).status
    p = step(st, pod(phase="Running"), node=unreachable(301))
    assert p.delete == ("demo-0", 0) and p.status.preemptions == 1
    assert p.status.last_outcome.reason == R.NODE_LOST
    assert p.create is not None and p.create["metadata"]["name"] == "demo-1"


def test_a_not_ready_blip_waits_and_says_so():
    st = step(step(TrainingJobStatus()).status, pod()).status
    p = step(st, pod(phase="Running"), node=unreachable(20))
    assert p.create is None and p.delete is None and p.status.preemptions == 0
    cond = next(c for c in p.status.conditions if c.type == R.COND_RUNNING)
    assert (cond.status, cond.reason) == ("False", R.NODE_UNREACHABLE)
    assert p.requeue == pytest.approx(280.5, abs=1) or p.requeue == 30.0  # woken again before the deadline
    assert [e[1] for e in p.events] == [R.NODE_UNREACHABLE]
    healed = step(p.status, pod(phase="Running"))
    assert healed.status.preemptions == 0 and healed.create is None
    assert next(c for c in healed.status.conditions if c.type == R.COND_RUNNING).reason == R.POD_RUNNING


def test_a_terminating_pod_on_a_partitioned_node_is_replaced_only_after_the_timeout():
    st = step(step(TrainingJobStatus()).status, pod()).status
    evicted = pod(phase="Running", deleting=True, disruption="DeletionByTaintManager")
    assert step(st, evicted, node=unreachable(100)).create is None
    p = step(st, evicted, node=unreachable(300))
    assert p.create is not None and p.delete == ("demo-0", 0) and p.status.last_outcome.reason == R.NODE_LOST


def test_a_deleting_job_never_starts_another_attempt():
    st = step(step(TrainingJobStatus()).status, pod()).status
    p = step(st, pod(phase="Running", deleting=True), deleting=True)  # the GC deletes the pod (foreground)
    assert p.create is None and p.status.preemptions == 0 and p.requeue is None
    p = step(st, None, deleting=True)
    assert p.create is None and p.status.preemptions == 0


def test_a_finished_job_stops_a_pod_that_a_sidecar_keeps_running():
    st = step(TrainingJobStatus()).status
    trainer_done = pod(phase="Running", exit_code=0, message='{"step": 50, "reason": "exit"}')
    p = step(st, trainer_done)
    assert p.status.phase == Phase.SUCCEEDED and p.delete == ("demo-0", 30)
    again = step(p.status, trainer_done)
    assert again.delete == ("demo-0", 30) and again.create is None
    assert step(p.status, pod(phase="Running", exit_code=0, deleting=True)).delete is None


def test_an_admission_rejection_is_resubmitted_after_a_growing_pause_without_burning_the_failure_budget():
    st = step(TrainingJobStatus()).status
    rejected = pod(phase="Failed", reason="UnexpectedAdmissionError")
    p = step(st, rejected)
    assert p.status.failures == 0 and p.status.preemptions == 1 and p.create is None
    assert p.status.last_outcome.reason == R.ADMISSION_REJECTED and 1 <= p.requeue <= 2
    assert step(p.status, rejected, now=NOW + dt.timedelta(seconds=1)).create is None  # not in a tight loop
    p = step(p.status, rejected, now=NOW + dt.timedelta(seconds=2))
    assert p.create is not None and p.status.attempt == 1
    again = step(p.status, pod(attempt=1, phase="Failed", reason="UnexpectedAdmissionError"),
                 now=NOW + dt.timedelta(seconds=3))
    assert again.create is None and 3 <= again.requeue <= 4  # the second one in a row waits twice as long


def test_stuck_pending_is_reported_once():
    st = step(TrainingJobStatus()).status
    unsched = pod(phase="Pending", node=None, conditions=[{"type": "PodScheduled", "status": "False",
                                                           "reason": "Unschedulable", "message": "0/2 nodes fit"}])
    p = step(st, unsched)
    cond = next(c for c in p.status.conditions if c.type == R.COND_RUNNING)
    assert (cond.status, cond.reason, cond.message) == ("False", R.UNSCHEDULABLE, "0/2 nodes fit")
    assert [(e[0], e[1]) for e in p.events] == [("Warning", R.UNSCHEDULABLE)]
    assert step(p.status, unsched).events == []  # said once, not on every pass


def test_attempts_without_progress_fail_the_job():
    s = spec(preemption={"maxAttemptsWithoutProgress": 3})
    st = step(TrainingJobStatus(), s=s).status
    for attempt in range(3):  # killed before the first checkpoint every time
        p = step(st, pod(attempt, phase="Failed", exit_code=137, disruption="EvictionByEvictionAPI"), s=s)
        st = p.status
        if attempt < 2:
            assert st.phase != Phase.FAILED and st.attempts_without_progress == attempt + 1
            assert p.create is not None  # preemptions are resubmitted at once
    assert st.phase == Phase.FAILED and st.conditions[-1].reason == R.NO_PROGRESS


def test_progress_resets_the_budget():
    s = spec(preemption={"maxAttemptsWithoutProgress": 2})
    st = step(TrainingJobStatus(), s=s).status
    st = step(st, pod(0, phase="Failed", exit_code=137, disruption="EvictionByEvictionAPI"), s=s).status
    assert st.attempts_without_progress == 1 and st.attempt == 1
    st = step(st, pod(1, phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                      message='{"step": 10}'), s=s).status
    assert st.attempts_without_progress == 0 and st.attempt_start_step == 10
    st = step(st, pod(2, phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI",
                      message='{"step": 10}'), s=s).status  # saved nothing new
    assert st.attempts_without_progress == 1 and st.phase != Phase.FAILED


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
    cond = next(c for c in p.status.conditions if c.type == R.COND_SPEC_RESOLVED)
    assert (cond.status, cond.reason) == ("False", R.CLAIM_NOT_FOUND)
    ready = next(c for c in p.status.conditions if c.type == R.COND_READY)
    assert (ready.status, ready.reason) == ("False", R.CLAIM_NOT_FOUND)  # why it is not done: the claim
    assert p.events == [("Warning", R.CLAIM_NOT_FOUND, 'persistentvolumeclaim "c" not found')]


def test_success_completes_and_stops_requeueing():
    st = step(TrainingJobStatus()).status
    p = step(st, pod(phase="Succeeded", exit_code=0, message='{"step": 300}'))
    assert p.status.phase == Phase.SUCCEEDED and p.status.completion_time == iso(NOW)
    assert p.status.last_checkpoint.step == 300 and p.requeue is None and p.create is None


@pytest.mark.parametrize(("status", "body", "headers", "reason", "retry"), [
    (403, 'pods "x" is forbidden: exceeded quota: q, requested: pods=1, used: pods=0, limited: pods=0', {},
     R.QUOTA_EXCEEDED, 30.0),
    (429, "too many requests", {"Retry-After": "7"}, R.CREATE_FAILED, 7.0),
    (503, "etcdserver: leader changed", {}, R.CREATE_FAILED, 5.0),
    (422, 'Pod "x" is invalid: spec.containers[0].image: Required value', {}, R.INVALID_TEMPLATE, 30.0),
])
def test_create_errors_are_classified_and_transient_ones_retried(status, body, headers, reason, retry):
    from kubernetes.client.exceptions import ApiException

    from ckpt_operator.actuator import create_problem

    exc = ApiException(status=status, reason="x")
    exc.body, exc.headers = json.dumps({"message": body}), headers
    problem = create_problem(exc)
    assert (problem.reason, problem.retry_after_seconds) == (reason, retry)
    assert body in problem.message
    planned = step(TrainingJobStatus(), problem=problem)
    assert planned.create is None and planned.requeue == retry


def _conditions(status):
    return {c.type: (c.status, c.reason, c.observed_generation) for c in status.conditions}


def test_kstatus_conditions_follow_the_phase_like_a_job():
    """Reconciling while on its way, Stalled once Failed, Ready once succeeded; every condition carries the
    generation it was computed from (kstatus: InProgress, then Current or Failed)."""
    running = step(step(TrainingJobStatus()).status, pod()).status
    conds = _conditions(running)
    assert conds[R.COND_RECONCILING] == ("True", "Running", 1)
    assert conds[R.COND_READY] == ("False", "Running", 1) and conds[R.COND_STALLED][0] == "False"
    assert all(c.observed_generation == 1 for c in running.conditions) and running.observed_generation == 1
    done = step(running, pod(phase="Succeeded", exit_code=0)).status
    assert _conditions(done)[R.COND_READY] == ("True", R.COMPLETED, 1)
    assert _conditions(done)[R.COND_RECONCILING][0] == "False"
    failed = step(running, pod(phase="Failed", exit_code=1), s=spec(backoffLimit=0)).status
    conds = _conditions(failed)
    assert conds[R.COND_STALLED] == ("True", R.BACKOFF_LIMIT_EXCEEDED, 1)
    assert conds[R.COND_READY] == ("False", R.BACKOFF_LIMIT_EXCEEDED, 1)
    assert conds[R.COND_RECONCILING][0] == "False"


def test_the_attempt_history_says_where_each_ran_and_what_was_redone():
    st = step(TrainingJobStatus()).status
    st = step(st, pod(node="n1")).status
    assert [(r.attempt, r.pods, r.start_step) for r in st.attempts] == [(0, ["demo-0"], None)]
    evicted = pod(phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI", node="n1",
                  message='{"step": 40, "reached": 45, "reason": "preempted"}')
    st = step(st, evicted, now=NOW + dt.timedelta(seconds=60)).status
    first = st.attempts[0]
    assert (first.result, first.reason, first.nodes, first.checkpoint_step, first.reached_step) == (
        "Preempted", "EvictionByEvictionAPI", ["n1"], 40, 45)
    assert first.end_time == iso(NOW + dt.timedelta(seconds=60))
    second = st.attempts[1]  # created in the same pass
    assert (second.attempt, second.start_step, second.steps_redone) == (1, 40, 5)  # 45 reached, resumed at 40
    done = pod(attempt=1, phase="Succeeded", exit_code=0, message='{"step": 80, "reached": 80, "reason": "exit"}')
    st = step(st, done).status
    assert (st.attempts[1].result, st.attempts[1].checkpoint_step, st.attempts[1].reached_step) == (
        "Succeeded", 80, 80)


def test_a_finished_job_resumes_once_when_asked_with_a_fresh_budget():
    st = step(step(TrainingJobStatus()).status, pod()).status
    failed = step(st, pod(phase="Failed", exit_code=1), s=spec(backoffLimit=0)).status
    assert failed.phase == Phase.FAILED and failed.failures == 1
    asked = plan(Observed(JOB, 2, spec(backoffLimit=0), failed, [pod(phase="Failed", exit_code=1)], {},
                          annotations={R.ANNOTATION_RESUME_REQUEST: "r1"}), NOW, SETTINGS)
    assert [c["metadata"]["name"] for c in asked.creates] == ["demo-1"]
    assert asked.status.failures == 0 and asked.status.phase == Phase.PENDING and asked.status.resume_request == "r1"
    env = {e["name"]: e["value"] for e in asked.creates[0]["spec"]["containers"][0]["env"]}
    assert env["CKPT_RESTART_REASON"] == "resumed"
    assert any(reason == R.RESUMED_BY_USER for _, reason, _ in asked.events)
    assert next(c for c in asked.status.conditions if c.type == R.COND_FAILED).status == "False"
    # the same request is not acted on twice
    done = asked.status.model_copy(update={"phase": Phase.SUCCEEDED})
    again = plan(Observed(JOB, 2, spec(), done, [], {}, annotations={R.ANNOTATION_RESUME_REQUEST: "r1"}), NOW,
                 SETTINGS)
    assert again.creates == []


def test_overrides_are_recorded_once_with_the_attempt_that_ran_them():
    override = json.dumps({"time": "2026-01-01T00:00:00Z", "command": "resume",
                           "changes": {"template.spec.containers[0].env": [{"name": "LR", "value": "0.1"}]}})
    first = plan(Observed(JOB, 3, spec(), TrainingJobStatus(), [], {},
                          annotations={R.ANNOTATION_OVERRIDE: override}), NOW, SETTINGS)
    [record] = first.status.overrides
    assert (record.command, record.generation, record.attempt) == ("resume", 3, 0)
    assert [reason for _, reason, _ in first.events].count(R.SPEC_OVERRIDDEN) == 1
    again = plan(Observed(JOB, 3, spec(), first.status, [], {}, annotations={R.ANNOTATION_OVERRIDE: override}),
                 NOW, SETTINGS)
    assert len(again.status.overrides) == 1 and R.SPEC_OVERRIDDEN not in [r for _, r, _ in again.events]


def test_the_status_patch_removes_a_nested_field_that_became_unset():
    from ckpt_operator.actuator import status_patch

    old = {"phase": "Running", "elastic": {"resizingTo": 2, "resizes": 1}, "lastOutcome": {"attempt": 1,
           "retryAfter": "2026-01-01T00:00:00Z"}, "attempts": [{"attempt": 0}], "message": "x"}
    new = {"phase": "Running", "elastic": {"resizes": 2}, "lastOutcome": {"attempt": 2}, "attempts": [{"attempt": 1}]}
    assert status_patch(old, new) == {"message": None, "elastic": {"resizingTo": None, "resizes": 2},
                                      "lastOutcome": {"attempt": 2, "retryAfter": None},
                                      "attempts": [{"attempt": 1}]}
    assert status_patch(new, new) == {}


def test_a_new_attempt_made_before_its_status_write_is_followed_in_the_same_pass():
    """In a storm the status write after a create waits behind other jobs' creates; the pass that finally writes
    sees the new pod running: one write records the preemption, the new attempt and that it runs."""
    running = step(step(TrainingJobStatus()).status, pod()).status
    evicted = pod(phase="Failed", exit_code=143, message='{"step": 40}', disruption="EvictionByEvictionAPI")
    both = plan(Observed(JOB, 1, spec(), running, [evicted, pod(1)], {"n1": READY}), NOW, SETTINGS)
    assert (both.status.attempt, both.status.preemptions, both.status.phase) == (1, 1, Phase.RUNNING)
    assert both.status.active_pod == "demo-1" and both.create["metadata"]["name"] == "demo-1"  # adopted by name
    assert both.delete == ("demo-0", 0) and "demo-0" in both.releases
    assert [reason for _, reason, _ in both.events] == ["EvictionByEvictionAPI", R.RESUBMITTED, R.POD_RUNNING]
    assert ("preemptions", "EvictionByEvictionAPI") in both.counters
    later = step(both.status, pod(1))
    assert later.status == both.status and later.events == []  # nothing left for the next pass to write
    again = plan(Observed(JOB, 1, spec(), running, [evicted, pod(1, phase="Failed", exit_code=143,
                                                                   disruption="EvictionByEvictionAPI")],
                          {"n1": READY}), NOW, SETTINGS)
    assert (again.status.attempt, again.status.preemptions) == (2, 2)  # that one was evicted too: attempt 2
    assert again.create["metadata"]["name"] == "demo-2"


def test_a_pod_evicted_before_its_attempt_was_recorded_is_adopted_and_counted():
    """The storm's order: the create goes first, the status write waits, and the pod may be evicted before the
    write. It still carries the operator's finalizer: it is this attempt's, ended, not an undone create."""
    evicted = pod(phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI", deleting=True)
    evicted["metadata"]["finalizers"] = [R.POD_FINALIZER]
    result = step(TrainingJobStatus(), evicted)
    assert (result.status.attempt, result.status.preemptions, result.status.failures) == (1, 1, 0)
    assert result.create["metadata"]["name"] == "demo-1" and "demo-0" in result.releases
    undone = pod(phase="Pending", deleting=True, node=None)  # a create undone (released at once): wait for it
    waiting = step(TrainingJobStatus(), undone)
    assert waiting.create is None and waiting.status.active_pod is None and waiting.requeue == 2.0
