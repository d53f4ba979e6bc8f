"""The planner for elastic gangs (workers: {min, max}): the size each attempt starts at, the limit after ranks found
no place, growing back at a checkpoint without spending budget, and what the nodes are judged to fit."""

import datetime as dt

import pytest

from ckpt_operator import reasons as R
from ckpt_operator.builders import JobRef
from ckpt_operator.classify import NodeInfo
from ckpt_operator.elastic_policy import rank_slots
from ckpt_operator.models import Phase, Result, TrainingJobSpec, TrainingJobStatus
from ckpt_operator.planning import Observed, Plan, Settings, iso
from tests.unit.fixpoint import plan

JOB = JobRef("demo", "ns", "uid")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SETTINGS = Settings(gang_start_timeout_seconds=120)
GPU_NODE = (("cpu", "8"), ("nvidia.com/gpu", "4"))


def spec(workers=None, gpus="4", **over):
    container = {"name": "trainer", "command": ["python", "t.py"],
                 "resources": {"limits": {"nvidia.com/gpu": gpus}}}
    base = {"template": {"spec": {"containers": [container]}},
            "checkpoint": {"persistentVolumeClaim": {"claimName": "c"}},
            "workers": workers if workers is not None else {"min": 1, "max": 4}}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def node(name, gpus="4", **over):
    return NodeInfo(name, allocatable=(("cpu", "8"), ("nvidia.com/gpu", gpus)), **over)


def pod(rank, attempt=0, phase="Running", exit_code=None, deleting=False, reason=None, message=""):
    p = {"metadata": {"name": f"demo-{attempt}-{rank}"}, "spec": {"nodeName": f"n{rank}"},
         "status": {"phase": phase, "conditions": []}}
    if reason:
        p["status"].update(reason=reason, message=message)
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error", "message": '{"step": 40}'}}}]
    if deleting:
        p["metadata"]["deletionTimestamp"] = iso(NOW)
    return p


def step(status, pods=(), nodes=2, s=None, now=NOW) -> Plan:
    infos = {f"n{r}": node(f"n{r}") for r in range(4)}
    seen = Observed(JOB, 1, s or spec(), status, list(pods), infos)
    seen.capacity = rank_slots([node(f"n{r}") for r in range(nodes)], seen.spec, SETTINGS.notice_taints)
    return plan(seen, now, SETTINGS)


def env_of(manifest):
    return {e["name"]: e["value"] for e in manifest["spec"]["containers"][0]["env"]}


def test_an_attempt_starts_at_the_largest_size_that_fits():
    p = step(TrainingJobStatus(), nodes=3)
    assert [c["metadata"]["name"] for c in p.creates] == ["demo-0-0", "demo-0-1", "demo-0-2"]
    assert {env_of(c)["WORLD_SIZE"] for c in p.creates} == {"3"} and p.status.world_size == 3
    assert p.status.elastic is not None and "3 of at most 4 ranks (at least 1)" in p.status.elastic.message
    assert p.service is not None


def test_one_rank_of_an_elastic_gang_is_still_a_ranked_pod_and_never_below_min():
    p = step(TrainingJobStatus(), nodes=0, s=spec({"min": 2, "max": 4}))
    assert [c["metadata"]["name"] for c in p.creates] == ["demo-0-0", "demo-0-1"]  # min, even with nothing free
    one = step(TrainingJobStatus(), nodes=1, s=spec({"min": 1, "max": 2}))
    assert [c["metadata"]["name"] for c in one.creates] == ["demo-0-0"]
    assert env_of(one.creates[0])["WORLD_SIZE"] == "1" and one.creates[0]["spec"]["hostname"] == "demo-0"


def running(size, nodes=None):
    status = step(TrainingJobStatus(), nodes=nodes or size).status
    return step(status, [pod(r) for r in range(size)], nodes=nodes or size).status


def test_when_more_ranks_fit_the_gang_stops_at_a_checkpoint_and_restarts_larger_without_spending_budget():
    status = running(2)
    p = step(status, [pod(0), pod(1)], nodes=3)  # a third node came back
    assert sorted(name for name, _ in p.deletes) == ["demo-0-0", "demo-0-1"]  # SIGTERM: the SDK saves, exits 143
    assert p.status.elastic.resizing_to == 3
    assert any(reason == R.RESIZED for _, reason, _ in p.events)
    ended = [pod(r, phase="Failed", exit_code=143, deleting=True) for r in range(2)]
    gone = step(p.status, ended, nodes=3)  # (the ended pods hold nothing: the next attempt starts at once)
    assert gone.status.last_outcome.reason == R.RESIZED and gone.status.last_outcome.result == Result.PREEMPTED
    assert gone.status.preemptions == 0 and gone.status.failures == 0 and gone.status.phase == Phase.PENDING
    assert gone.status.attempts_without_progress == 0
    assert [c["metadata"]["name"] for c in gone.creates] == ["demo-1-0", "demo-1-1", "demo-1-2"]
    assert {env_of(c)["CKPT_RESTART_REASON"] for c in gone.creates} == {"resized"}
    assert gone.status.elastic.resizes == 1 and gone.status.elastic.resizing_to is None
    assert gone.status.attempts[-1].workers == 3 and gone.status.attempts[-2].workers == 2
    assert any(reason == R.RESIZED and "the attempt before ran 2" in message for _, reason, message in gone.events)


def test_a_gang_at_its_max_never_resizes():
    status = running(4)
    assert not step(status, [pod(r) for r in range(4)], nodes=4).deletes


def test_a_rejected_rank_limits_the_next_attempt_until_the_nodes_fit_more():
    status = running(2)
    rejected = pod(1, phase="Failed", reason="UnexpectedAdmissionError", message="no healthy devices")
    stopping = step(status, [pod(0), rejected])  # the gang breaks: rank 0 is stopped (it checkpoints)
    assert [name for name, _ in stopping.deletes] == ["demo-0-0"]
    ended = step(stopping.status, [pod(0, phase="Failed", exit_code=143, deleting=True), rejected])
    assert ended.status.last_outcome.reason == R.ADMISSION_REJECTED
    assert ended.status.elastic.limit == 1 and ended.status.elastic.limit_capacity == 2
    assert not ended.creates  # (after a capacity back-off)
    nxt = step(ended.status, [], nodes=2, now=NOW + dt.timedelta(minutes=5))  # the nodes still fit 2: limit holds
    assert [c["metadata"]["name"] for c in nxt.creates] == ["demo-1-0"]
    later = NOW + dt.timedelta(minutes=6)
    live = step(nxt.status, [pod(0, attempt=1)], nodes=2, now=later)
    assert not step(live.status, [pod(0, attempt=1)], nodes=2, now=later).deletes  # no resize while the limit holds
    grow = step(live.status, [pod(0, attempt=1)], nodes=3, now=later)  # a node more than then: grow
    assert [name for name, _ in grow.deletes] == ["demo-1-0"] and grow.status.elastic.resizing_to == 3


def test_rank_slots_counts_what_each_schedulable_node_holds_of_one_rank():
    job = spec(gpus="2", template={"spec": {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "trainer", "resources": {"requests": {"nvidia.com/gpu": "2", "cpu": "500m"}}}]}})
    labels = (("pool", "gpu"),)
    nodes = [
        NodeInfo("a", labels=labels, allocatable=GPU_NODE),  # 2 ranks
        NodeInfo("b", labels=labels, allocatable=GPU_NODE, blocking=(("spot", "true"),)),  # tolerated: 2
        NodeInfo("c", labels=labels, allocatable=GPU_NODE, blocking=(("dedicated", "x"),)),  # not tolerated
        NodeInfo("d", labels=labels, allocatable=GPU_NODE, schedulable=False),  # cordoned
        NodeInfo("e", labels=labels, allocatable=GPU_NODE, ready=False),
        NodeInfo("f", allocatable=GPU_NODE),  # no label
        NodeInfo("g", labels=labels, allocatable=(("cpu", "8"), ("nvidia.com/gpu", "0"))),  # device plugin down
        NodeInfo("h", labels=labels, allocatable=GPU_NODE, taints=(("aws-node-termination-handler/spot-itn", None),)),
    ]
    assert rank_slots(nodes, job, SETTINGS.notice_taints) == 4


@pytest.mark.parametrize(("workers", "message"), [
    ({"min": 3, "max": 2}, "larger than workers.max"), ({"min": 1}, "max: Field required"),
    ({"min": 1, "max": 2, "x": 1}, "x: Extra inputs"), ("two", "a count"), (0, "between 1 and 1024"),
    (True, "a count")])
def test_bad_workers_values_are_refused_with_a_clear_message(workers, message):
    with pytest.raises(ValueError, match=message):
        spec(workers)


def test_a_started_attempt_keeps_its_pod_names_when_workers_is_edited():
    single = spec(workers=1)
    status = step(TrainingJobStatus(), s=single).status
    lone = {"metadata": {"name": "demo-0"}, "spec": {"nodeName": "n0"}, "status": {"phase": "Running"}}
    status = step(status, [lone], s=single).status
    p = step(status, [lone], s=spec(workers=2))  # the next attempt takes it; this one runs on
    assert not p.deletes and not p.creates and p.status.active_pod == "demo-0"
    p = step(status, [lone], s=spec({"min": 1, "max": 2}), nodes=1)  # elastic now, and nothing more fits
    assert not p.deletes and not p.creates and p.status.active_pod == "demo-0"
    p = step(status, [lone], s=spec({"min": 1, "max": 2}), nodes=2)  # more fits: it grows, at a checkpoint
    assert p.deletes == [("demo-0", 30)] and p.status.elastic.resizing_to == 2
    grown = running(2)
    p = step(grown, [pod(0), pod(1)], nodes=2, s=spec(workers=4))  # (no worldSize recorded: the same holds)
    assert not p.deletes and not p.creates and [w.pod for w in p.status.workers] == ["demo-0-0", "demo-0-1"]


def test_an_attempt_made_before_its_status_write_keeps_the_size_its_pods_were_made_with():
    """The pods of attempt 0 were created at 2 ranks; the status write waited (a storm) and meanwhile a third node
    came: the pass that records the attempt adopts 2 ranks (their WORLD_SIZE), it does not plan 3."""
    made = [pod(0), pod(1)]
    p = step(TrainingJobStatus(), made, nodes=3)
    assert p.status.world_size == 2 and p.status.active_pod == "demo-0-0"
    assert [c["metadata"]["name"] for c in p.creates] == ["demo-0-0", "demo-0-1"]  # adopted by name, no third rank
    assert p.status.phase == Phase.RUNNING  # and followed in the same pass: its ranks run (one status write)
