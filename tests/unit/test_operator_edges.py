"""Issue #25's operator edge-path defects, at the planner and the actuator (each of these failed before), and the
contract written once: what the operator builds, the SDK reads; what the SDK writes, the operator classifies."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import time
from types import SimpleNamespace

import pytest
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel

from ckpt_operator import reasons as R
from ckpt_operator import worker as worker_module
from ckpt_operator.actuator import Pass, create_attempt, finish_pass, plan_pass
from ckpt_operator.apiclient import TokenBucket
from ckpt_operator.builders import JobRef, build_env, build_pods
from ckpt_operator.cache import Cache, Expectations, trim_job, trim_pod
from ckpt_operator.classify import NodeInfo, PodState, classify
from ckpt_operator.errors import InvalidSpecError
from ckpt_operator.models import Phase, Result, TrainingJobSpec, TrainingJobStatus
from ckpt_operator.planning import Observed, Plan, Settings, iso
from ckpt_operator.worker import JobWorker
from ckpt_sdk._env import Environment
from ckpt_sdk.contract import ExitReason, TerminationMessage
from tests.unit.fixpoint import plan

JOB = JobRef("demo", "ns", "uid", "2026-01-01T00:00:00Z")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SETTINGS = Settings(backoff_base_seconds=10, backoff_cap_seconds=60, gang_start_timeout_seconds=120)
AWS = "aws-node-termination-handler/spot-itn"


def spec(workers=1, **over):
    base = {"template": {"spec": {"containers": [{"name": "trainer", "command": ["python", "t.py"]}]}},
            "checkpoint": {"persistentVolumeClaim": {"claimName": "c"}}, "workers": workers}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def pod(name, phase="Running", node="n0", exit_code=None, message=None, deleting=False, waiting=None,
        conditions=(), attempt=None):
    p = {"metadata": {"name": name}, "spec": {"nodeName": node}, "status": {"phase": phase,
                                                                           "conditions": list(conditions)}}
    if attempt is not None:
        p["metadata"]["labels"] = {R.LABEL_ATTEMPT: str(attempt)}
    if waiting is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error", "message": message or ""}}}]
    if deleting:
        p["metadata"]["deletionTimestamp"] = iso(NOW)
    return p


def step(status, pods=(), s=None, now=NOW, nodes=None) -> Plan:
    nodes = nodes if nodes is not None else {f"n{i}": NodeInfo(f"n{i}") for i in range(3)}
    return plan(Observed(JOB, 1, s or spec(), status, list(pods), nodes), now, SETTINGS)


def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def started(s, pods) -> TrainingJobStatus:
    return step(step(TrainingJobStatus(), s=s).status, pods, s=s).status


# 10 -- slot ends of any rank are preemptions -------------------------------------------------------------------------
def test_a_gang_ending_its_time_limited_slot_is_preempted_not_failed():
    s = spec(workers=2, template={"spec": {"activeDeadlineSeconds": 600, "containers": [
        {"name": "trainer", "command": ["python", "t.py"]}]}})
    st = started(s, [pod("demo-0-0"), pod("demo-0-1", node="n1")])
    deadline = json.dumps({"step": 40, "reason": "deadline"})
    # rank 1 (an SDK that let only rank 0 speak) exits 143 with no message first: the gang is stopped ...
    first = step(st, [pod("demo-0-0"), pod("demo-0-1", "Failed", "n1", exit_code=143)], s=s, now=at(1))
    assert ("demo-0-0", 30) in first.deletes
    # ... and rank 0, which the operator is deleting, ends its slot with its checkpoint
    last = step(first.status, [pod("demo-0-0", "Failed", exit_code=143, message=deadline, deleting=True),
                               pod("demo-0-1", "Failed", "n1", exit_code=143)], s=s, now=at(2))
    outcome = last.status.last_outcome
    assert outcome.result == Result.PREEMPTED and outcome.reason == R.DEADLINE_EXCEEDED
    assert (last.status.failures, last.status.preemptions) == (0, 1)


# 12 -- a lost node is not "no progress" ------------------------------------------------------------------------------
def _lose_node_every_attempt(s, attempts: int) -> TrainingJobStatus:
    st = step(TrainingJobStatus(), s=s).status
    for attempt in range(attempts):
        lost = {"n0": NodeInfo("n0", exists=False, ready=False)}
        st = step(st, [pod(f"demo-{attempt}")], s=s, nodes=lost, now=at(attempt)).status
        assert st.attempt == attempt + 1 and st.last_outcome.reason == R.NODE_LOST
    return st


def test_attempts_on_lost_nodes_never_fail_the_job_for_no_progress_until_a_trainer_says_so():
    s = spec(preemption={"maxAttemptsWithoutProgress": 3})
    st = _lose_node_every_attempt(s, 5)  # five long attempts on reclaimed nodes: not one termination message
    assert st.phase != Phase.FAILED and st.attempts_without_progress == 0 and st.attempts_progress_unknown == 5
    # the sixth attempt's trainer says it resumed from step 900: the lost attempts did make progress
    message = json.dumps({"step": 950, "reason": "preempted", "resumed": 900})
    done = step(st, [pod("demo-5", "Failed", exit_code=137, message=message, deleting=True)], s=s, now=at(9)).status
    assert done.phase != Phase.FAILED
    assert (done.attempts_without_progress, done.attempts_progress_unknown) == (0, 0)
    assert done.last_checkpoint.step == 950 and done.attempts[-2].start_step == 900


def test_lost_attempts_that_made_no_progress_count_once_a_trainer_says_so():
    s = spec(preemption={"maxAttemptsWithoutProgress": 3})
    st = _lose_node_every_attempt(s, 5)
    message = json.dumps({"step": None, "reason": "preempted", "resumed": 0})  # nothing was ever saved
    done = step(st, [pod("demo-5", "Failed", exit_code=137, message=message, deleting=True)], s=s, now=at(9)).status
    assert done.phase == Phase.FAILED and done.attempts_without_progress == 6
    assert any(c.type == R.COND_FAILED and c.reason == R.NO_PROGRESS for c in done.conditions)


# 13, 16 -- one start policy for a lone pod and a gang ----------------------------------------------------------------
UNSCHEDULABLE = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                  "message": "0/3 nodes are available", "lastTransitionTime": iso(NOW)}]


def test_a_lone_pod_that_finds_no_node_ends_its_attempt_after_the_timeout_and_spends_no_budget():
    s = spec()
    st = step(TrainingJobStatus(), s=s).status
    waiting = pod("demo-0", "Pending", node="", conditions=UNSCHEDULABLE)
    early = step(st, [waiting], s=s, now=at(60))
    assert not early.deletes and 60 < early.requeue <= 61
    late = step(early.status, [waiting], s=s, now=at(121))
    assert late.deletes == [("demo-0", 30)]  # it waited forever before
    outcome = late.status.last_outcome
    assert outcome.result == Result.NOT_STARTED and outcome.reason == R.UNSCHEDULABLE and outcome.retry_after
    assert (late.status.preemptions, late.status.failures, late.status.attempts_without_progress) == (0, 0, 0)


@pytest.mark.parametrize(("waiting", "result", "reason"), [
    ({"reason": "CreateContainerConfigError", "message": 'secret "x" not found'}, Result.FAILED, R.START_FAILED),
    ({"reason": "ImagePullBackOff", "message": "pull access denied"}, Result.FAILED, R.START_FAILED),
    ({"reason": "ContainerCreating", "message": "Multi-Attach error for volume"}, Result.NOT_STARTED,
     R.START_TIMEOUT),
])
def test_a_gang_rank_bound_and_never_starting_stops_the_gang_after_the_timeout(waiting, result, reason):
    s = spec(workers=2)
    st = started(s, [pod("demo-0-0"), pod("demo-0-1", "Pending", "n1", waiting=waiting)])
    early = step(st, [pod("demo-0-0"), pod("demo-0-1", "Pending", "n1", waiting=waiting)], s=s, now=at(60))
    assert not early.deletes
    if waiting["reason"] != "ContainerCreating":  # plain start-up is not worth a condition
        assert any(c.type == R.COND_RUNNING and c.reason == waiting["reason"] for c in early.status.conditions)
    late = step(early.status, [pod("demo-0-0"), pod("demo-0-1", "Pending", "n1", waiting=waiting)], s=s,
                now=at(121))
    assert sorted(late.deletes) == [("demo-0-0", 30), ("demo-0-1", 30)]  # it held rank 0's GPU forever before
    gone = step(late.status, [pod("demo-0-0", "Failed", exit_code=143, deleting=True),
                              pod("demo-0-1", "Failed", "n1", deleting=True)], s=s, now=at(122))
    outcome = gone.status.last_outcome
    assert (outcome.result, outcome.reason) == (result, reason)
    assert gone.status.failures == (1 if result == Result.FAILED else 0) and gone.status.preemptions == 0


# 14 -- a pod of an attempt whose status write was lost -------------------------------------------------------------
def test_a_pod_created_for_an_attempt_whose_status_write_was_lost_is_stopped_when_the_job_is_suspended():
    s = spec()
    st = started(s, [pod("demo-0")])
    ended = step(st, [pod("demo-0", "Failed", exit_code=137, deleting=True)], s=s, now=at(1))
    assert ended.create is not None and ended.create["metadata"]["name"] == "demo-1"
    # the pod of attempt 1 was created, then the status write conflicted with a suspend: status.attempt is still 0
    suspended = spec(suspend=True)
    stray = pod("demo-1", attempt=1)
    result = step(st.model_copy(update={"last_outcome": ended.status.last_outcome}),
                  [pod("demo-0", "Failed", exit_code=137, deleting=True), stray], s=suspended, now=at(2))
    assert ("demo-1", 30) in result.deletes and not result.creates
    assert result.status.phase == Phase.SUSPENDED


# 18 -- notices, fallback, wake-ups ---------------------------------------------------------------------------------
def test_a_drain_after_a_notice_is_not_a_withdrawn_notice():
    s = spec()
    tainted = {"n0": NodeInfo("n0", taints=((AWS, None),))}
    st = step(started(s, [pod("demo-0")]), [pod("demo-0")], s=s, nodes=tainted).status
    assert st.interruption is not None and not st.interruption.migrating
    drained = step(st, [pod("demo-0", deleting=True)], s=s, nodes=tainted, now=at(1))
    assert not [e for e in drained.events if e[1] == R.INTERRUPTION_WITHDRAWN]
    withdrawn = step(st, [pod("demo-0")], s=s, nodes={"n0": NodeInfo("n0")}, now=at(1))
    assert [e for e in withdrawn.events if e[1] == R.INTERRUPTION_WITHDRAWN]


def test_the_end_of_a_time_limited_slot_does_not_count_towards_the_capacity_fallback():
    s = spec(preemption={"fallback": {"afterPreemptions": 1, "templatePatch": {"spec": {"nodeSelector": {"a": "b"}}}}})
    st = started(s, [pod("demo-0")])
    slot = step(st, [pod("demo-0", "Failed", exit_code=143, message='{"step": 4, "reason": "deadline"}')], s=s)
    assert slot.status.last_outcome.reason == R.DEADLINE_EXCEEDED
    assert slot.status.fallback is None or not slot.status.fallback.active
    evicted = step(st, [pod("demo-0", "Failed", exit_code=143, deleting=True)], s=s)
    assert evicted.status.fallback is not None and evicted.status.fallback.active


def test_the_earliest_wake_up_wins():
    s = spec(workers=2)
    st = started(s, [pod("demo-0-0"), pod("demo-0-1", "Pending", node="", conditions=UNSCHEDULABLE)])
    unreachable = {"n0": NodeInfo("n0", ready=False, not_ready_since=NOW)}  # lost in 300 s: look again in 30 s
    result = step(st, [pod("demo-0-0"), pod("demo-0-1", "Pending", node="", conditions=UNSCHEDULABLE)], s=s,
                  nodes=unreachable, now=at(115))
    assert 5 < result.requeue <= 6  # the gang's start timeout falls due first


# 11, 18 -- the actuator creating an attempt ---------------------------------------------------------------------
class Answer:
    """An unread HTTP answer: the actuator hands its connection back."""

    def __init__(self, calls: list[tuple[str, str]]) -> None:
        self.calls = calls

    def drain_conn(self) -> None:
        pass

    def release_conn(self) -> None:
        self.calls.append(("connection released", ""))


class FakeCore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def delete_namespaced_pod(self, name, namespace, **_):  # type: ignore[no-untyped-def]
        self.calls.append(("delete", name))
        return Answer(self.calls)


class FakeApi:
    def __init__(self, refuse: set[str], existing: dict | None = None) -> None:
        self.core, self.refuse, self.existing = FakeCore(), refuse, existing

    def patch_pod(self, namespace, name, patch):  # type: ignore[no-untyped-def]
        assert patch[-1]["value"] == [], patch  # only finalizer releases here
        self.core.calls.append(("release", name))

    def patch_status(self, group, version, plural, namespace, name, body):  # type: ignore[no-untyped-def]
        assert (group, version, plural, namespace) == (R.GROUP, R.VERSION, R.PLURAL, "ns")
        return self.custom.patch_status(name, body)  # type: ignore[attr-defined]

    def create_pod(self, namespace, body):  # type: ignore[no-untyped-def]
        name = body["metadata"]["name"]
        if name in self.refuse:
            status = 409 if self.existing is not None else 403
            exc = ApiException(status=status, reason="Forbidden")
            exc.body = json.dumps({"message": 'pods "x" is forbidden: exceeded quota: q, requested: pods=1'})
            raise exc
        return {**body, "metadata": {**body["metadata"], "uid": f"uid-{name}", "namespace": namespace,
                                     "resourceVersion": "11"}}

    def read_pod(self, namespace, name):  # type: ignore[no-untyped-def]
        return self.existing


def test_a_gang_partly_refused_by_a_quota_deletes_and_releases_what_it_created():
    s = spec(workers=2)
    result = Plan(status=TrainingJobStatus(), creates=build_pods(JOB, s, 0, "none"))
    api = FakeApi(refuse={"demo-0-1"})
    problem = create_attempt(api, Expectations(), JOB, result)  # type: ignore[arg-type]
    assert problem is not None and problem.reason == R.QUOTA_EXCEEDED
    assert api.core.calls == [("delete", "demo-0-0"), ("connection released", ""),  # never stuck Terminating
                              ("release", "demo-0-0")]


def test_a_pod_left_by_an_earlier_job_of_the_same_name_is_not_adopted():
    s = spec()
    result = Plan(status=TrainingJobStatus(), creates=build_pods(JOB, s, 0, "none"))
    old = {"metadata": {"name": "demo-0", "ownerReferences": [{"uid": "old-uid", "controller": True}]}}
    problem = create_attempt(FakeApi({"demo-0"}, old), Expectations(), JOB, result)  # type: ignore[arg-type]
    assert problem is not None and problem.reason == R.PREVIOUS_INCARNATION
    ours = {"metadata": {"name": "demo-0", "ownerReferences": [{"uid": "uid", "controller": True}]}}
    assert create_attempt(FakeApi({"demo-0"}, ours), Expectations(), JOB, result) is None  # type: ignore[arg-type]
    again = plan(Observed(JOB, 1, s, TrainingJobStatus(), [], {}, problem), NOW, SETTINGS)  # as the actuator plans
    assert not again.creates and again.status.preemptions == 0 and again.requeue == 2.0
    assert any(c.reason == R.PREVIOUS_INCARNATION for c in again.status.conditions)


# -- the contract, both ways -----------------------------------------------------------------------------------------
def test_what_the_operator_builds_is_what_the_sdk_reads():
    s = spec(workers=2, checkpoint={"persistentVolumeClaim": {"claimName": "c"}, "keep": 5, "intervalSeconds": 60},
             template={"spec": {"activeDeadlineSeconds": 3600, "containers": [{"name": "trainer"}]}},
             preemption={"gracePeriodSeconds": 90})
    env = {e["name"]: e["value"] for e in build_env(JOB, s, 3, R.RESTART_PREEMPTED, None, 7200.0, NOW)}
    read = Environment.read(env)
    assert (read.directory, read.job_name, read.namespace, read.job_uid) == ("/checkpoints", "demo", "ns", "uid")
    assert (read.attempt, read.restart_reason, read.grace_period_seconds) == (3, "preempted", 90.0)
    assert (read.keep, read.interval_seconds, read.mtbp_seconds) == (5, 60.0, 7200.0)
    assert read.deadline == NOW.timestamp() + 3600 and read.job_created == NOW.timestamp()
    assert read.annotations_file == "/etc/ckpt-podinfo/annotations"
    pods = build_pods(JOB, s, 3, R.RESTART_PREEMPTED)
    mounts = [m["mountPath"] for m in pods[1]["spec"]["containers"][0]["volumeMounts"]]
    assert "/etc/ckpt-podinfo" in mounts


@pytest.mark.parametrize(("message", "state", "reason"), [
    (TerminationMessage(step=40, reason=ExitReason.PREEMPTED.value), PodState.FAILED, R.UNEXPLAINED_SIGTERM),
    (TerminationMessage(step=40, reason=ExitReason.DEADLINE.value), PodState.PREEMPTED, R.DEADLINE_EXCEEDED),
])
def test_what_the_sdk_writes_is_what_the_operator_classifies(message, state, reason):
    terminated = pod("demo-0", "Failed", exit_code=143, message=message.to_json())
    verdict = classify(terminated, "trainer")
    assert (verdict.state, verdict.reason, verdict.checkpoint_step) == (state, reason, 40)
    assert verdict.report == message
    assert TerminationMessage.parse(message.to_json()) == message
    assert TerminationMessage.parse("Traceback (most recent call last): ...") is None  # a log tail


def test_the_planner_never_changes_the_status_it_was_given():
    """It works on a shallow copy (nested models are frozen; lists are replaced, never changed in place)."""
    s = spec(workers=2, preemption={"fallback": {"afterPreemptions": 1, "templatePatch": {"spec": {}}}})
    st = started(s, [pod("demo-0-0"), pod("demo-0-1", node="n1")])
    before = st.model_dump()
    ended = [pod("demo-0-0", "Failed", exit_code=143, message='{"step": 5, "reason": "preempted"}', deleting=True),
             pod("demo-0-1", "Failed", "n1", exit_code=143, deleting=True)]
    result = step(st, ended, s=s, now=at(1))
    assert result.status.last_outcome is not None and result.creates
    assert st.model_dump() == before


# -- a pass between its two halves --------------------------------------------------------------------------------
class FakeCustom:
    def __init__(self) -> None:
        self.written: list[dict] = []

    def patch_status(self, name, body):  # type: ignore[no-untyped-def]
        self.written.append(body)
        return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": "8"}, "status": body["status"]}


def _models_in(value: object, seen: set[int] | None = None) -> list[str]:
    """The pydantic models reachable from `value` (through dataclasses, dicts, lists and tuples)."""
    seen = seen if seen is not None else set()
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, BaseModel):
        return [type(value).__name__]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [m for f in dataclasses.fields(value) for m in _models_in(getattr(value, f.name), seen)]
    if isinstance(value, dict):
        return [m for item in value.values() for m in _models_in(item, seen)]
    if isinstance(value, list | tuple):
        return [m for item in value for m in _models_in(item, seen)]
    return []


def _preempted_job() -> tuple[dict, dict]:
    """A running job (as indexed) and its pod, evicted and held by the operator's finalizer."""
    s = spec(checkpoint={"nfs": {"server": "nfs.invalid", "path": "/checkpoints"}})
    status = started(s, [pod("demo-0", attempt=0)])
    evicted = pod("demo-0", phase="Failed", attempt=0, conditions=[
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "evicting"}])
    evicted["metadata"].update(namespace="ns", uid="pod-uid", finalizers=[R.POD_FINALIZER])
    job = trim_job({"apiVersion": "ckpt.dev/v1alpha1", "kind": "TrainingJob",
                    "metadata": {"name": "demo", "namespace": "ns", "uid": "uid", "resourceVersion": "7",
                                 "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
                    "spec": s.model_dump(by_alias=True, exclude_none=True), "status": status.dump()})
    return job, evicted


def test_a_preemption_pass_waiting_for_its_status_write_holds_no_models_and_then_does_what_it_planned():
    """In a storm thousands of passes wait for their write: each keeps the status as the dict to write and the
    actions, not the spec and status models (the 5,000-job memory); the second half still records and releases."""
    job, evicted = _preempted_job()
    api = FakeApi(refuse=set())
    api.custom = FakeCustom()
    cache = Cache(jobs={}, pods={}, nodes={})
    waiting = plan_pass(api, SETTINGS, cache, Expectations(), job, [evicted], {"n0": NodeInfo("n0")})  # type: ignore[arg-type]

    assert waiting.created and waiting.writes and waiting.phase == Phase.PREEMPTED.value
    assert _models_in(waiting) == []  # neither the spec, nor the old or the new status as models
    assert waiting.new_status["attempt"] == 1 and waiting.new_status["preemptions"] == 1
    assert list(waiting.releasable) == ["demo-0"]
    released: list[dict] = []
    actions = finish_pass(api, Expectations(), waiting, released.append)  # type: ignore[arg-type]
    assert actions is waiting.actions and [p["metadata"]["name"] for p in released] == ["demo-0"]
    assert [body["status"]["attempt"] for body in api.custom.written] == [1]  # one write: outcome and new attempt


def test_a_creating_pass_plans_once_when_the_storage_check_finds_nothing_new(monkeypatch):
    """The plan is pure: planned again on what it saw, it would plan the same (in a storm, one plan per preemption
    saved). A storage problem changes what it sees, and it is planned again on it."""
    from ckpt_operator import actuator

    planned: list[object] = []
    real_plan = actuator.plan
    monkeypatch.setattr(actuator, "plan", lambda seen, now, settings: planned.append(seen.problem) or real_plan(
        seen, now, settings))
    job, evicted = _preempted_job()
    api = FakeApi(refuse=set())
    api.custom = FakeCustom()  # type: ignore[attr-defined]

    def one_pass() -> Pass:
        return plan_pass(api, SETTINGS, Cache(jobs={}, pods={}, nodes={}), Expectations(), job, [evicted],  # type: ignore[arg-type]
                         {"n0": NodeInfo("n0")})

    step = one_pass()
    assert step.created == ("demo-1",) and planned == [None]
    missing = InvalidSpecError(R.CLAIM_NOT_FOUND, "claim missing")
    monkeypatch.setattr(actuator, "check_storage", lambda *args: (missing, None))
    planned.clear()
    step = one_pass()
    assert step.created == () and planned == [None, missing]


class CreatingApi(FakeApi):
    """Records the pods it creates; status writes go to a FakeCustom; one rate limiter for both."""

    def __init__(self, limiter: TokenBucket) -> None:
        super().__init__(refuse=set())
        self.custom, self.limiter, self.created = FakeCustom(), limiter, []

    def create_pod(self, namespace, body):  # type: ignore[no-untyped-def]
        self.created.append(body)
        return super().create_pod(namespace, body)


async def _until(what: str, check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Storm:
    """One preempted job run by a real JobWorker against CreatingApi, with the watch's pod index in hand."""

    def __init__(self, contended: bool) -> None:
        limiter = TokenBucket(qps=0.01, burst=4)  # no refill to speak of during a test
        for _ in range(3 if contended else 0):
            limiter.acquire()  # one token left: half the burst is spent, the budget is contended
        self.api = CreatingApi(limiter)
        self.job, self.evicted = _preempted_job()
        self.jobs, self.pods = {"uid": [self.job]}, {"uid": [self.evicted]}
        self.nodes = {"n0": [NodeInfo("n0")], "n2": [NodeInfo("n2")]}
        self.cache = Cache(jobs=self.jobs, pods=self.pods, nodes=self.nodes)
        self.released: list[dict] = []
        self.runtime = SimpleNamespace(api=self.api, settings=SETTINGS,
                                       releaser=SimpleNamespace(submit=self.released.append),
                                       recorder=SimpleNamespace(record=lambda *event: None))

    def run(self, scenario) -> None:  # type: ignore[no-untyped-def]
        async def main() -> None:
            worker = JobWorker(self.runtime, self.cache, "uid", "ns", "demo")  # type: ignore[arg-type]
            try:
                await scenario(worker)
            finally:
                worker.task.cancel()

        asyncio.run(main())

    def new_pod(self, phase: str) -> None:
        """The watch reports the replacement bound to n2, in `phase` (the old pod was on n0)."""
        self.pods["uid"] = [self.evicted, {**self.api.created[0], "spec": {"nodeName": "n2"},
                                           "status": {"phase": phase}}]

    @property
    def written(self) -> list[dict]:
        return self.api.custom.written


@pytest.mark.parametrize("index_lags", [False, True])
def test_with_the_budget_contended_the_write_after_a_create_waits_until_the_new_pod_runs(index_lags):
    """In a storm a status write made before the replacement runs needs a second one when it does: with the
    budget contended the worker holds the write until the watch shows the pod running; one write records the
    outcome, the new attempt and that it runs. Also when our own last write is newer than the job's watch."""
    storm = Storm(contended=True)

    async def scenario(worker: JobWorker) -> None:
        if index_lags:  # the pass plans on the copy our last write returned, newer than the index's
            worker.expect.job = {**storm.job, "metadata": {**storm.job["metadata"], "resourceVersion": "9"}}
        await _until("the replacement created", lambda: storm.api.created)
        storm.new_pod("Pending")  # bound, not running: no write yet
        worker.wake()
        await _until("the worker woken", lambda: not worker.wakeup.is_set())
        storm.new_pod("Running")
        worker.wake()
        await _until("the status written", lambda: storm.written)
        await _until("the old pod released", lambda: storm.released)

    storm.run(scenario)
    assert len(storm.api.created) == 1
    [written] = storm.written  # one write, not one before the pod runs and one after
    assert written["status"]["attempt"] == 1 and written["status"]["preemptions"] == 1
    assert _running(written) == ("True", "pod demo-1 is running")
    assert [p["metadata"]["name"] for p in storm.released] == ["demo-0"]


def test_with_the_budget_contended_a_pod_never_reported_holds_the_write_only_until_the_deadline(monkeypatch):
    monkeypatch.setattr(worker_module, "SETTLE_SECONDS", 0.3)
    storm = Storm(contended=True)
    storm.run(lambda worker: _until("the status written", lambda: storm.written))
    [written] = storm.written
    assert written["status"]["attempt"] == 1 and _running(written) != ("True", "pod demo-1 is running")


def test_with_the_budget_contended_the_hold_ends_when_the_plan_asked_to_be_planned_again(monkeypatch):
    """A plan that must run again soon (a timeout falling due) is not held past that: the hold ends at the plan's
    own requeue, not at SETTLE_SECONDS."""
    monkeypatch.setattr(worker_module, "SETTLE_SECONDS", 60.0)

    def soon(*args: object) -> Pass:
        step = plan_pass(*args)  # type: ignore[arg-type]
        if step.actions is not None:
            step.actions.requeue = 0.2
        return step

    monkeypatch.setattr(worker_module, "plan_pass", soon)
    storm = Storm(contended=True)
    started = time.monotonic()
    storm.run(lambda worker: _until("the status written", lambda: storm.written, timeout=10.0))
    assert time.monotonic() - started < 5.0  # not the 60 s hold
    [written] = storm.written
    assert written["status"]["attempt"] == 1 and _running(written) != ("True", "pod demo-1 is running")


@pytest.mark.parametrize("change", ["the job edited", "the old pod's node not ready"])
def test_with_the_budget_contended_another_change_ends_the_hold_at_once(monkeypatch, change):
    """What the plan read changing (the job itself, as an edit would; the node of another pod) is planned and
    written without waiting for the new pod."""
    monkeypatch.setattr(worker_module, "SETTLE_SECONDS", 60.0)
    storm = Storm(contended=True)

    async def scenario(worker: JobWorker) -> None:
        await _until("the replacement created", lambda: storm.api.created)
        storm.new_pod("Pending")
        if change == "the job edited":
            storm.jobs["uid"] = [{**storm.job, "metadata": {**storm.job["metadata"], "resourceVersion": "8"}}]
        else:
            storm.nodes["n0"] = [NodeInfo("n0", ready=False)]  # the old pod's node, not the new pod's
        await asyncio.sleep(0.05)  # the worker waits in its hold (the new pod is Pending)
        assert storm.written == []
        worker.wake()
        await _until("the status written", lambda: storm.written, timeout=10.0)

    storm.run(scenario)
    [written] = storm.written
    assert written["status"]["attempt"] == 1 and _running(written) != ("True", "pod demo-1 is running")


def test_with_the_budget_free_the_write_after_a_create_is_not_held(monkeypatch):
    """A lone preemption (budget unspent) records the new attempt right away, before its pod runs."""

    async def never(*_: object) -> bool:
        raise AssertionError("held with the budget free")

    monkeypatch.setattr(JobWorker, "_settle", never)
    storm = Storm(contended=False)
    storm.run(lambda worker: _until("the status written", lambda: storm.written))
    [written] = storm.written
    assert written["status"]["attempt"] == 1 and written["status"]["preemptions"] == 1
    assert _running(written) != ("True", "pod demo-1 is running")  # written before the new pod runs


def test_the_echo_of_its_own_writes_and_a_settled_pod_wake_nobody():
    """After the pass that records a preemption: the watch's echo of its own status write (the job as that write
    left it) and of its create, and the old pod's release and deletion (ended, released, its attempt's outcome
    recorded) are no news and start no pass; another change of the job or of the new pod, a held pod, or an ended
    pod whose attempt is not recorded yet are."""
    storm = Storm(contended=False)

    def released(pod: dict, **meta: object) -> dict:
        return {**pod, "metadata": {**pod["metadata"], "finalizers": [], **meta}}

    async def scenario(worker: JobWorker) -> None:
        await _until("the old pod released", lambda: storm.released)
        await _until("the pass done", lambda: not worker.wakeup.is_set())
        echo = worker.expect.job
        assert echo is not None and echo["status"]["attempt"] == 1
        body = storm.api.created[0]
        made = trim_pod({**body, "metadata": {**body["metadata"], "resourceVersion": "11"}})  # as the create returned
        quiet = [lambda: worker.job_event(echo), lambda: worker.pod_event(made),  # the watch reports our create
                 lambda: worker.pod_event(released(storm.evicted)),
                 lambda: worker.pod_event(released(storm.evicted, deletionTimestamp="2026-01-01T00:01:00Z"))]
        for event in quiet:
            event()
            assert not worker.wakeup.is_set()
        new_pod = {**storm.api.created[0], "status": {"phase": "Failed"}}
        bound = {**made, "metadata": {**made["metadata"], "resourceVersion": "12"}, "spec": {"nodeName": "n2"}}
        news = [lambda: worker.job_event({**echo, "metadata": {**echo["metadata"], "resourceVersion": "9"}}),
                lambda: worker.pod_event(bound),  # the new pod scheduled
                lambda: worker.pod_event(storm.evicted),  # still held
                lambda: worker.pod_event(released(new_pod))]  # attempt 1 ended, unrecorded (finalizer removed by hand)
        for event in news:
            event()
            assert worker.wakeup.is_set()
            worker.wakeup.clear()

    storm.run(scenario)


def _running(patch: dict) -> tuple[str, str] | None:
    """The Running condition a status patch writes: (status, message)."""
    found = [c for c in patch["status"].get("conditions", []) if c["type"] == R.COND_RUNNING]
    return (found[0]["status"], found[0]["message"]) if found else None


@pytest.mark.parametrize("namespace", ["", "team-*", "Team-A", "-team", "a" * 64])
def test_a_namespace_that_is_not_an_exact_name_is_refused_on_the_command_line(namespace, capsys):
    """An empty `--namespace ""` once watched `/api/v1/namespaces//pods` and retried forever; a pattern is kopf's
    syntax, not a name the pod watch can list. Both, and any other non-name, stop the operator with exit 2."""
    from ckpt_operator.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--namespace", "team-a", f"--namespace={namespace}"])
    assert exited.value.code == 2
    assert f"{namespace!r} is not a namespace name" in capsys.readouterr().err


@pytest.mark.parametrize("namespace", ["team-a", "a", "ml-2026", "a" * 63])
def test_exact_namespace_names_pass_the_command_line_check(namespace):
    from ckpt_operator.__main__ import exact_namespace

    assert exact_namespace(namespace)
