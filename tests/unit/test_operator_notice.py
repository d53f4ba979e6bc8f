"""The planner acting on interruption notices (node taints) and the capacity fallback (spec.preemption.fallback)."""

import datetime as dt

from ckpt_operator import reasons as R
from ckpt_operator.builders import JobRef
from ckpt_operator.classify import NodeInfo
from ckpt_operator.models import TrainingJobSpec, TrainingJobStatus
from ckpt_operator.planning import Observed, Plan, Settings, iso
from tests.unit.fixpoint import plan

JOB = JobRef("demo", "ns", "uid")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SETTINGS = Settings(backoff_base_seconds=10, backoff_cap_seconds=60, notice_checkpoint_seconds=20)
AWS = "aws-node-termination-handler/spot-itn"
GKE = "cloud.google.com/impending-node-termination"


def spec(workers=1, grace=10, **over):
    base = {"template": {"spec": {"containers": [{"name": "trainer", "command": ["python", "t.py"]}]}},
            "checkpoint": {"persistentVolumeClaim": {"claimName": "c"}}, "workers": workers,
            "preemption": {"gracePeriodSeconds": grace}}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def pod(name="demo-0", node="n0", phase="Running", exit_code=None, deleting=False, annotations=None):
    p = {"metadata": {"name": name, "annotations": dict(annotations or {})}, "spec": {"nodeName": node},
         "status": {"phase": phase}}
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error", "message": '{"step": 40, "reason": "preempted"}'}}}]
    if deleting:
        p["metadata"]["deletionTimestamp"] = iso(NOW)
    return p


def tainted(name, key=AWS, added=None):
    return NodeInfo(name, taints=((key, added),))


def step(status, pods=(), s=None, now=NOW, nodes=None) -> Plan:
    nodes = nodes if nodes is not None else {"n0": NodeInfo("n0"), "n1": NodeInfo("n1")}
    return plan(Observed(JOB, 1, s or spec(), status, list(pods), nodes), now, SETTINGS)


def running(s=None, pods=None) -> TrainingJobStatus:
    started = step(TrainingJobStatus(), s=s).status
    return step(started, pods or [pod()], s=s).status


def later(seconds):
    return NOW + dt.timedelta(seconds=seconds)


def test_a_notice_taint_asks_the_trainer_for_a_checkpoint_without_stopping_it():
    result = step(running(), [pod()], nodes={"n0": tainted("n0")})
    deadline = iso(later(120))
    assert result.annotations == [("demo-0", {R.ANNOTATION_CHECKPOINT_REQUESTED: deadline})]
    assert result.deletes == []
    notice = result.status.interruption
    assert (notice.node, notice.taint, notice.deadline, notice.migrate_time, notice.migrating) == (
        "n0", AWS, deadline, iso(later(20)), False)
    assert ("notices", AWS) in result.counters
    assert any(reason == R.INTERRUPTION_NOTICE and "checkpoint requested" in message
               for _, reason, message in result.events)
    assert 19 < result.requeue <= 20.2  # woken when the migration is due
    # the annotation is on the pod: nothing is asked again, nothing is reported twice
    again = step(result.status, [pod(annotations={R.ANNOTATION_CHECKPOINT_REQUESTED: deadline})],
                 nodes={"n0": tainted("n0")}, now=later(5))
    assert again.annotations == [] and again.deletes == [] and again.events == [] and again.counters == []


def test_the_pod_is_migrated_when_the_checkpoint_had_its_time_and_counts_as_an_interruption_preemption():
    asked = step(running(), [pod()], nodes={"n0": tainted("n0")})
    annotated = pod(annotations={R.ANNOTATION_CHECKPOINT_REQUESTED: asked.status.interruption.deadline})
    migrate = step(asked.status, [annotated], nodes={"n0": tainted("n0")}, now=later(20))
    assert migrate.deletes == [("demo-0", 10)]  # SIGTERM with the grace period: the SDK saves what it did since
    assert migrate.status.interruption.migrating
    running_condition = next(c for c in migrate.status.conditions if c.type == R.COND_RUNNING)
    assert (running_condition.status, running_condition.reason) == ("False", R.INTERRUPTION_NOTICE)
    # the watch has not shown the deletion yet (or the operator crashed between the status write and the delete)
    lagging = step(migrate.status, [annotated], nodes={"n0": tainted("n0")}, now=later(20.5))
    assert lagging.deletes == [("demo-0", 10)]  # sent again (idempotent), never forgotten
    assert lagging.events == []  # the move is not undone, nor reported twice
    assert next(c for c in lagging.status.conditions if c.type == R.COND_RUNNING).reason == R.INTERRUPTION_NOTICE
    ended = step(migrate.status, [pod(exit_code=143, deleting=True, phase="Failed")],
                 nodes={"n0": tainted("n0")}, now=later(22))
    assert ended.status.preemptions == 1 and ended.status.failures == 0
    assert ended.status.last_outcome.reason == R.INTERRUPTION_NOTICE
    assert ended.status.last_checkpoint.step == 40
    assert ("preemptions", R.INTERRUPTION_NOTICE) in ended.counters
    assert [p["metadata"]["name"] for p in ended.creates] == ["demo-1"]  # resubmitted at once, no back-off


def test_a_short_notice_migrates_in_time_for_the_grace_period():
    # GKE gives 30 s: with a 10 s grace period the SIGTERM must come by deadline - grace - margin = 15 s
    result = step(running(), [pod()], nodes={"n0": tainted("n0", GKE)})
    assert result.status.interruption.deadline == iso(later(30))
    assert result.status.interruption.migrate_time == iso(later(15))
    # a notice too short for a checkpoint before the grace period: SIGTERM at once (the SIGTERM save is the one)
    hurried = step(running(spec(grace=40)), [pod()], s=spec(grace=40), nodes={"n0": tainted("n0", GKE)})
    assert hurried.deletes == [("demo-0", 40)]


def test_the_deadline_counts_from_when_the_taint_was_added_if_the_node_says():
    result = step(running(), [pod()], nodes={"n0": tainted("n0", AWS, added=iso(NOW - dt.timedelta(seconds=100)))})
    assert result.status.interruption.deadline == iso(later(20))
    assert result.status.interruption.migrate_time == iso(later(5))  # deadline - grace (10 s) - margin (5 s)
    late = step(running(), [pod()], nodes={"n0": tainted("n0", AWS, added=iso(NOW - dt.timedelta(seconds=110)))})
    assert late.deletes == [("demo-0", 10)]  # 10 s left: move now, the SIGTERM save is the checkpoint


def test_taints_that_are_not_notices_do_nothing():
    for key in ("node.kubernetes.io/unreachable", "dedicated", "node.kubernetes.io/unschedulable"):
        result = step(running(), [pod()], nodes={"n0": tainted("n0", key)})
        assert result.annotations == [] and result.deletes == [] and result.status.interruption is None


def test_a_withdrawn_notice_cancels_the_migration():
    asked = step(running(), [pod()], nodes={"n0": tainted("n0")})
    withdrawn = step(asked.status, [pod()], now=later(5))
    assert withdrawn.status.interruption is None and withdrawn.deletes == []
    assert [reason for _, reason, _ in withdrawn.events] == [R.INTERRUPTION_WITHDRAWN]
    assert step(withdrawn.status, [pod()], now=later(30)).deletes == []


def test_if_the_node_dies_first_it_is_a_node_loss_as_always():
    asked = step(running(), [pod()], nodes={"n0": tainted("n0")})
    lost = step(asked.status, [pod()], nodes={"n0": NodeInfo("n0", exists=False, ready=False)}, now=later(5))
    assert lost.deletes == [("demo-0", 0)]
    assert lost.status.last_outcome.reason == R.NODE_LOST and lost.status.preemptions == 1


def test_a_gang_checkpoints_and_moves_as_one_unit():
    gang = spec(workers=2)
    ranks = [pod("demo-0-0", "n0"), pod("demo-0-1", "n1")]
    nodes = {"n0": NodeInfo("n0"), "n1": tainted("n1")}
    asked = step(running(gang, ranks), ranks, s=gang, nodes=nodes)
    deadline = asked.status.interruption.deadline
    assert sorted(name for name, _ in asked.annotations) == ["demo-0-0", "demo-0-1"]  # a sharded save needs all
    annotated = [pod(p["metadata"]["name"], p["spec"]["nodeName"],
                     annotations={R.ANNOTATION_CHECKPOINT_REQUESTED: deadline}) for p in ranks]
    moving = step(asked.status, annotated, s=gang, nodes=nodes, now=later(20))
    assert sorted(moving.deletes) == [("demo-0-0", 10), ("demo-0-1", 10)]
    stopping = [pod(p["metadata"]["name"], p["spec"]["nodeName"], deleting=True) for p in ranks]
    during = step(moving.status, stopping, s=gang, nodes=nodes, now=later(21))
    assert not any(reason == R.GANG_STOPPING for _, reason, _ in during.events)  # not a gang break: our own move
    ended = [pod(p["metadata"]["name"], p["spec"]["nodeName"], "Failed", 143, deleting=True) for p in ranks]
    done = step(during.status, ended, s=gang, nodes=nodes, now=later(23))
    assert done.status.preemptions == 1 and done.status.last_outcome.reason == R.INTERRUPTION_NOTICE


def fallback_spec(**fallback):
    return spec(preemption={"gracePeriodSeconds": 10, "fallback": {
        "afterPreemptions": 2, "windowSeconds": 600,
        "templatePatch": {"spec": {"nodeSelector": {"capacity": "on-demand"}}}, **fallback}})


def preempt(status, s, now, attempt):
    """One attempt evicted, then the next one created: the new status and the created pods."""
    name = f"demo-{attempt}"
    evicted = pod(name, exit_code=143, phase="Failed")
    evicted["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                        "reason": "EvictionByEvictionAPI"}]
    ended = step(status, [evicted], s=s, now=now)  # recorded, and the next attempt created in the same pass
    return ended.status, ended.creates, ended.events


def test_the_fallback_patch_applies_after_k_preemptions_within_the_window():
    s = fallback_spec()
    status = running(s)
    status, creates, events = preempt(status, s, NOW, 0)
    assert "nodeSelector" not in creates[0]["spec"] and not status.fallback.active
    status, creates, events = preempt(step(status, [pod("demo-1")], s=s, now=later(10)).status, s, later(60), 1)
    assert creates[0]["spec"]["nodeSelector"] == {"capacity": "on-demand"}
    assert status.fallback.active and status.fallback.since == iso(later(60))
    assert any(reason == R.FALLBACK_APPLIED for _, reason, _ in events)


def test_preemptions_outside_the_window_do_not_switch():
    s = fallback_spec()
    status, _, _ = preempt(running(s), s, NOW, 0)
    status, creates, _ = preempt(step(status, [pod("demo-1")], s=s, now=later(10)).status, s, later(700), 1)
    assert "nodeSelector" not in creates[0]["spec"] and not status.fallback.active
    assert status.fallback.recent_preemptions == [iso(later(700))]


def test_the_fallback_reverts_after_its_period():
    s = fallback_spec(revertAfterSeconds=300)
    status, _, _ = preempt(running(s), s, NOW, 0)
    status, creates, _ = preempt(step(status, [pod("demo-1")], s=s, now=later(10)).status, s, later(20), 1)
    assert creates[0]["spec"]["nodeSelector"] == {"capacity": "on-demand"}
    # preempted again on the fallback (on-demand can be reclaimed too): past the period, back to the template
    status, creates, events = preempt(step(status, [pod("demo-2")], s=s, now=later(30)).status, s, later(400), 2)
    assert "nodeSelector" not in creates[0]["spec"] and not status.fallback.active
    assert any(reason == R.FALLBACK_REVERTED for _, reason, _ in events)
