"""A TrainingJob in a Kueue queue (issue #28), at the planner: one Workload for its whole life, pods only while it
is admitted (with its flavor's placement), an eviction stops them gracefully and counts as a preemption, the quota
goes back once they are gone."""

from __future__ import annotations

import datetime as dt

from ckpt_operator import reasons as R
from ckpt_operator.builders import JobRef
from ckpt_operator.classify import NodeInfo
from ckpt_operator.kueue import WorkloadView, workload_name
from ckpt_operator.models import Phase, Result, TrainingJobSpec, TrainingJobStatus
from ckpt_operator.planning import Observed, Plan, Settings, iso
from tests.unit.fixpoint import plan

JOB = JobRef("demo", "ns", "uid")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SPOT = {"nodeLabels": {"pool": "spot"}, "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]}


def spec(**over):  # type: ignore[no-untyped-def]
    base = {"template": {"spec": {"containers": [{"name": "trainer", "command": ["python", "t.py"]}]}},
            "checkpoint": {"persistentVolumeClaim": {"claimName": "c"}}}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def condition(type_: str, status: bool, reason: str, message: str = "") -> dict:  # type: ignore[type-arg]
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": iso(NOW)}


def workload(*conditions: dict, admitted_to: str | None = None, active: bool = True,  # type: ignore[type-arg]
             finalized: bool = False) -> WorkloadView:
    return WorkloadView(name=workload_name(JOB), resource_version="7", active=active, conditions=tuple(conditions),
                        cluster_queue=admitted_to, flavors=("spot",) if admitted_to else (), finalized=finalized)


ADMITTED = (condition("QuotaReserved", True, "QuotaReserved"), condition("Admitted", True, "Admitted"))


def pod(name: str = "demo-0", phase: str = "Running", exit_code: int | None = None, message: str = "",
        deleting: bool = False) -> dict:  # type: ignore[type-arg]
    p = {"metadata": {"name": name}, "spec": {"nodeName": "n0"}, "status": {"phase": phase}}
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error", "message": message}}}]
    if deleting:
        p["metadata"]["deletionTimestamp"] = iso(NOW)
    return p


def step(status: TrainingJobStatus, wl: WorkloadView | None, pods=(), s=None) -> Plan:  # type: ignore[no-untyped-def]
    return plan(Observed(JOB, 1, s or spec(), status, list(pods), {"n0": NodeInfo("n0")}, queue="q", workload=wl,
                         flavors={"spot": SPOT}), NOW, Settings())


def reason_of(p: Plan, type_: str) -> str | None:
    return next((c.reason for c in p.status.conditions if c.type == type_), None)


def test_kueues_own_workload_name():
    assert workload_name(JobRef("name", "ns", "uid"), "Job", "batch") == "job-name-ef3a1"  # Kueue's test vector


def test_nothing_starts_before_admission_and_the_workload_is_made_once():
    first = step(TrainingJobStatus(), None)
    assert first.workload.create and not first.creates
    waiting = step(first.status, workload(condition("QuotaReserved", False, "Pending",
                                                    "couldn't assign flavors to pod set main: insufficient quota")))
    assert not waiting.workload.create and not waiting.creates and waiting.status.phase == Phase.PENDING
    found = next(c for c in waiting.status.conditions if c.type == R.COND_ADMITTED)
    assert (found.status, found.reason) == ("False", R.QUEUED) and "insufficient quota" in found.message


def test_an_admission_places_the_pods_on_its_flavor():
    admitted = step(TrainingJobStatus(), workload(*ADMITTED, admitted_to="cq"))
    [created] = admitted.creates
    assert created["spec"]["nodeSelector"] == {"pool": "spot"}
    assert SPOT["tolerations"][0] in created["spec"]["tolerations"]
    labels = created["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/local-queue-name"] == "q" and labels["kueue.x-k8s.io/cluster-queue-name"] == "cq"
    assert created["metadata"]["annotations"]["kueue.x-k8s.io/workload"] == workload_name(JOB)
    assert reason_of(admitted, R.COND_ADMITTED) == R.KUEUE_ADMITTED
    running = step(admitted.status, workload(*ADMITTED, admitted_to="cq"), [pod()])
    ready = running.workload.status_patch["status"]["conditions"]
    assert {"type": "PodsReady", "status": "True", "reason": "Started"}.items() <= ready[-1].items()


def test_an_eviction_stops_the_pods_gracefully_counts_a_preemption_and_gives_the_quota_back():
    wl = workload(*ADMITTED, admitted_to="cq")
    running = step(step(TrainingJobStatus(), wl).status, wl, [pod()]).status
    evicted = workload(*ADMITTED, condition("Evicted", True, "Preempted", "Preempted to accommodate a workload"),
                       admitted_to="cq")
    stopping = step(running, evicted, [pod()])
    assert stopping.deletes == [("demo-0", 30)] and not stopping.workload.status_patch
    assert any(e[1] == R.KUEUE_PREEMPTED for e in stopping.events)
    ended = pod(phase="Failed", exit_code=143, message='{"step": 40, "reason": "preempted"}', deleting=True)
    recorded = step(stopping.status, evicted, [ended])
    outcome = recorded.status.last_outcome
    assert (outcome.result, outcome.reason) == (Result.PREEMPTED, R.KUEUE_PREEMPTED)
    assert (recorded.status.preemptions, recorded.status.failures) == (1, 0)
    assert not recorded.creates  # the quota is not ours any more: wait in the queue
    release = recorded.workload.status_patch
    assert release["status"]["admission"] is None and release["metadata"]["resourceVersion"] == "7"
    kinds = {c["type"]: (c["status"], c["reason"]) for c in release["status"]["conditions"]}
    assert kinds["QuotaReserved"] == ("False", "Pending") and kinds["Requeued"] == ("True", "Preempted")
    queued = workload(condition("QuotaReserved", False, "Pending", "waiting"))
    waiting = step(recorded.status, queued)
    assert not waiting.creates and reason_of(waiting, R.COND_ADMITTED) == R.QUEUED
    again = step(waiting.status, workload(*ADMITTED, admitted_to="cq"))
    assert again.create is not None and again.create["metadata"]["name"] == "demo-1"


def test_suspend_deactivates_the_workload_and_a_finished_job_releases_it():
    suspended = step(TrainingJobStatus(), workload(*ADMITTED, admitted_to="cq"), s=spec(suspend=True))
    assert suspended.workload.active is False and not suspended.creates
    wl = workload(*ADMITTED, admitted_to="cq")
    running = step(step(TrainingJobStatus(), wl).status, wl, [pod()]).status
    done = step(running, wl, [pod(phase="Succeeded", exit_code=0)])
    assert done.status.phase == Phase.SUCCEEDED
    finished = done.workload.status_patch["status"]["conditions"][-1]
    assert (finished["type"], finished["status"], finished["reason"]) == ("Finished", "True", "Succeeded")
    later = step(done.status, workload(*ADMITTED, condition("Finished", True, "Succeeded"), admitted_to="cq"))
    assert later.workload.release_finalizer and not later.workload.status_patch


def test_a_reopened_job_replaces_its_finished_workload_before_anything_runs():
    done = TrainingJobStatus(phase=Phase.SUCCEEDED, attempt=0, active_pod="demo-0")
    finished = workload(*ADMITTED, condition("Finished", True, "Succeeded"), admitted_to="cq")
    reopened = done.model_copy(update={"phase": Phase.PENDING, "attempt": 1})
    again = step(reopened, finished)
    assert again.workload.replace and not again.creates and not again.workload.status_patch
    assert reason_of(again, R.COND_ADMITTED) == R.QUEUED
    fresh = step(again.status, None)
    assert fresh.workload.create and not fresh.creates
