"""The planner for multi-node attempts (spec.workers > 1): one unit that starts, stops and is counted together."""

import datetime as dt
import json

from ckpt_operator import reasons as R
from ckpt_operator.builders import JobRef, build_pods
from ckpt_operator.classify import NodeInfo
from ckpt_operator.models import Phase, Result, TrainingJobSpec, TrainingJobStatus
from ckpt_operator.planning import Observed, Plan, Settings, iso
from tests.unit.fixpoint import plan

JOB = JobRef("demo", "ns", "uid")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SETTINGS = Settings(backoff_base_seconds=10, backoff_cap_seconds=60, gang_start_timeout_seconds=120)


def spec(workers=2, **over):
    base = {"template": {"spec": {"containers": [{"name": "trainer", "command": ["python", "t.py"]}]}},
            "checkpoint": {"persistentVolumeClaim": {"claimName": "c"}}, "workers": workers}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def pod(rank, attempt=0, phase="Running", exit_code=None, message=None, disruption=None, deleting=False,
        node=None, conditions=()):
    p = {"metadata": {"name": f"demo-{attempt}-{rank}"}, "spec": {"nodeName": node or f"n{rank}"},
         "status": {"phase": phase, "conditions": list(conditions)}}
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error" if exit_code else "Completed", "message": message or ""}}}]
    if disruption:
        p["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": disruption,
                                          "message": "evicted"})
    if deleting:
        p["metadata"]["deletionTimestamp"] = iso(NOW)
    return p


def step(status, pods=(), s=None, now=NOW, nodes=None) -> Plan:
    nodes = nodes if nodes is not None else {f"n{r}": NodeInfo(f"n{r}") for r in range(4)}
    return plan(Observed(JOB, 1, s or spec(), status, list(pods), nodes), now, SETTINGS)


def running() -> TrainingJobStatus:
    started = step(TrainingJobStatus()).status
    return step(started, [pod(0), pod(1)]).status


def env_of(manifest):
    return {e["name"]: e["value"] for e in manifest["spec"]["containers"][0]["env"]}


def test_an_attempt_is_n_indexed_pods_behind_a_headless_service():
    p = step(TrainingJobStatus())
    assert [c["metadata"]["name"] for c in p.creates] == ["demo-0-0", "demo-0-1"]
    assert p.service is not None and p.service["spec"]["clusterIP"] == "None"
    assert p.service["spec"]["publishNotReadyAddresses"] is True
    assert p.service["metadata"]["ownerReferences"][0]["uid"] == "uid"
    for rank, manifest in enumerate(p.creates):
        env = env_of(manifest)
        assert manifest["spec"]["hostname"] == f"demo-{rank}" and manifest["spec"]["subdomain"] == "demo"
        assert manifest["metadata"]["labels"][R.LABEL_RANK] == str(rank)
        assert env["RANK"] == env["PET_NODE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["PET_NNODES"] == "2"
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "demo-0.demo"
        assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29500"
    assert [w.pod for w in p.status.workers] == ["demo-0-0", "demo-0-1"]
    assert p.status.active_pod == "demo-0-0"


def test_one_worker_is_the_single_pod_job_of_before():
    [single] = build_pods(JOB, spec(workers=1), 0, "none")
    assert single["metadata"]["name"] == "demo-0" and "hostname" not in single["spec"]
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} & set(env_of(single))
    p = step(TrainingJobStatus(), s=spec(workers=1))
    assert p.service is None and p.status.workers == []


def test_a_port_the_user_chose_is_kept():
    trainer = {"name": "trainer", "env": [{"name": "MASTER_PORT", "value": "23456"}]}
    s = spec(template={"spec": {"containers": [trainer]}})
    env = env_of(build_pods(JOB, s, 0, "none")[1])
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "23456"


def test_running_only_when_every_rank_runs():
    started = step(TrainingJobStatus()).status
    half = step(started, [pod(0), pod(1, phase="Pending")])
    assert half.status.phase != Phase.RUNNING
    both = step(half.status, [pod(0), pod(1)])
    assert both.status.phase == Phase.RUNNING and [w.state for w in both.status.workers] == ["Running", "Running"]
    assert step(both.status, [pod(0), pod(1)]).status == both.status  # nothing to write


def test_one_rank_evicted_stops_the_others_and_counts_one_preemption():
    st = running()
    evicted = pod(1, phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI")
    p = step(st, [pod(0), evicted])
    assert p.deletes == [("demo-0-0", 30)]  # SIGTERM with the grace period: rank 0 checkpoints too
    assert p.status.last_outcome is None and p.status.preemptions == 0 and not p.creates
    assert any(reason == R.GANG_STOPPING for _, reason, _ in p.events)
    assert [w.stopped for w in p.status.workers] == [True, False]
    # rank 0 is terminating: nothing new
    terminating = step(p.status, [pod(0, deleting=True), evicted])
    assert not terminating.deletes and not terminating.creates and terminating.status.preemptions == 0
    # rank 0 saved step 40 (the SDK's coordinator reports it) and exited 143
    saved = json.dumps({"step": 40, "reason": "preempted"})
    done = step(terminating.status, [pod(0, phase="Failed", exit_code=143, message=saved, deleting=True), evicted])
    assert done.status.preemptions == 1 and done.status.failures == 0
    assert done.status.last_outcome.reason == "EvictionByEvictionAPI"  # the cause, not the rank we stopped
    assert done.status.last_outcome.message.startswith("rank 1:")
    assert done.status.last_checkpoint.step == 40
    assert [c["metadata"]["name"] for c in done.creates] == ["demo-1-0", "demo-1-1"]
    assert ("demo-1-0", 0) not in done.deletes and ("demo-0-1", 0) in done.deletes
    assert [w.pod for w in done.status.workers] == ["demo-1-0", "demo-1-1"]


def test_the_next_attempt_waits_until_every_old_pod_is_gone():
    st = running()
    evicted = pod(1, phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI")
    stopped = step(st, [pod(0), evicted]).status
    # a sidecar keeps rank 0's pod running after its trainer ended: recorded, but no new attempt yet
    trainer_done = pod(0, phase="Running", exit_code=143, deleting=True)
    p = step(stopped, [trainer_done, evicted])
    assert p.status.preemptions == 1 and not p.creates and p.requeue == 2.0
    assert step(p.status, [pod(0, phase="Failed", exit_code=143, deleting=True), evicted]).creates


def test_a_failed_rank_stops_the_others_and_counts_one_failure():
    st = running()
    crashed = pod(0, phase="Failed", exit_code=1, message="boom")
    p = step(st, [crashed, pod(1)])
    assert p.deletes == [("demo-0-1", 30)]
    done = step(p.status, [crashed, pod(1, phase="Failed", exit_code=143, deleting=True)])
    assert done.status.failures == 1 and done.status.preemptions == 0
    assert done.status.last_outcome.result == "Failed" and done.status.last_outcome.reason == R.APPLICATION_FAILURE
    assert done.status.workers[0].exit_code == 1 and done.status.workers[1].stopped


def test_succeeds_when_every_rank_succeeded():
    st = running()
    p = step(st, [pod(0, phase="Succeeded", exit_code=0), pod(1)])
    assert p.status.phase == Phase.RUNNING and not p.deletes  # rank 1 is finishing
    done = step(p.status, [pod(0, phase="Succeeded", exit_code=0), pod(1, phase="Succeeded", exit_code=0)])
    assert done.status.phase == Phase.SUCCEEDED and not done.creates


def test_a_rank_unschedulable_while_the_others_run_ends_the_attempt_after_the_timeout():
    st = running()
    since = NOW - dt.timedelta(seconds=30)
    stuck = pod(1, phase="Pending", node="", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available",
        "lastTransitionTime": iso(since)}])
    early = step(st, [pod(0), stuck])
    assert not early.deletes and 90 < early.requeue <= 91  # woken when the timeout falls due
    late = step(st, [pod(0), stuck], now=NOW + dt.timedelta(seconds=100))
    assert sorted(late.deletes) == [("demo-0-0", 30), ("demo-0-1", 30)]
    assert late.status.workers[1].reason == R.GANG_UNSCHEDULABLE
    later = NOW + dt.timedelta(seconds=101)
    gone = step(late.status, [pod(0, phase="Failed", exit_code=143, deleting=True)], now=later)
    outcome = gone.status.last_outcome
    assert outcome.result == Result.NOT_STARTED and outcome.reason == R.GANG_UNSCHEDULABLE
    # issue #25, defect 13: a capacity shortage spends no budget (it failed the job NoProgress in 4 rounds)
    assert (gone.status.preemptions, gone.status.failures, gone.status.attempts_without_progress) == (0, 0, 0)
    assert outcome.retry_after is not None and not gone.creates  # backs off, no tight loop


def test_a_lost_node_force_deletes_its_rank_and_stops_the_rest():
    st = running()
    lost = {"n0": NodeInfo("n0"), "n1": NodeInfo("n1", exists=False, ready=False)}
    p = step(st, [pod(0), pod(1)], nodes=lost)
    assert ("demo-0-1", 0) in p.deletes and ("demo-0-0", 30) in p.deletes
    assert p.status.workers[1].reason == R.NODE_LOST and p.status.workers[1].state == "Preempted"
    done = step(p.status, [pod(0, phase="Failed", exit_code=143, deleting=True)], nodes=lost)
    assert done.status.last_outcome.reason == R.NODE_LOST and done.status.preemptions == 1
    assert len(done.creates) == 2


def test_a_rank_deleted_by_someone_stops_the_others_at_once():
    st = running()
    p = step(st, [pod(0), pod(1, deleting=True)])  # still terminating: the others get SIGTERM now, not later
    assert p.deletes == [("demo-0-0", 30)]
    vanished = step(st, [pod(0)])
    assert vanished.deletes == [("demo-0-0", 30)]


def test_suspend_stops_every_rank():
    st = running()
    p = step(st, [pod(0), pod(1)], s=spec(suspend=True))
    assert sorted(p.deletes) == [("demo-0-0", 30), ("demo-0-1", 30)] and p.status.phase == Phase.SUSPENDED


def test_a_finished_job_stops_leftover_ranks():
    st = running().model_copy(update={"phase": Phase.FAILED})
    assert sorted(step(st, [pod(0), pod(1)]).deletes) == [("demo-0-0", 30), ("demo-0-1", 30)]


def test_a_peer_that_crashed_because_a_node_vanished_is_not_a_failure():
    st = running()
    crashed = pod(0, phase="Failed", exit_code=1, message="gloo: connection closed by peer")
    stopping = step(st, [crashed, pod(1)])  # rank 0 crashed first: rank 1 is stopped
    assert stopping.deletes == [("demo-0-1", 30)]
    lost = {"n0": NodeInfo("n0"), "n1": NodeInfo("n1", exists=False, ready=False)}
    done = step(stopping.status, [crashed, pod(1, deleting=True)], nodes=lost)  # then its node turned out lost
    assert done.status.preemptions == 1 and done.status.failures == 0
    assert done.status.last_outcome.reason == R.NODE_LOST


def test_suspending_a_gang_is_not_a_gang_break():
    st = running()
    suspending = step(st, [pod(0), pod(1)], s=spec(suspend=True)).status
    p = step(suspending, [pod(0, deleting=True), pod(1, deleting=True)], s=spec(suspend=True))
    assert not any(reason == R.GANG_STOPPING for _, reason, _ in p.events) and p.status.phase == Phase.SUSPENDED
    ended = [pod(r, phase="Failed", exit_code=143, deleting=True, message='{"step": 7}') for r in (0, 1)]
    done = step(p.status, ended, s=spec(suspend=True))
    assert done.status.last_outcome.result == "Suspended" and done.status.preemptions == 0
    assert done.status.last_checkpoint.step == 7


def test_a_stopping_gang_wakes_up_when_a_silent_node_turns_lost():
    st = running()
    crashed = pod(0, phase="Failed", exit_code=1)
    stopping = step(st, [crashed, pod(1)]).status
    silent = {"n0": NodeInfo("n0"), "n1": NodeInfo("n1", ready=False, not_ready_since=NOW - dt.timedelta(seconds=60))}
    p = step(stopping, [crashed, pod(1, deleting=True)], nodes=silent)
    assert 240 <= p.requeue <= 241  # lost at 300 s (the default): the planner is run again then
