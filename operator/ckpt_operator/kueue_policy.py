"""A job in a Kueue queue (see kueue): its one Workload follows the job, pods start only while it is admitted, an
eviction stops them gracefully (they checkpoint) and counts as a preemption (`KueuePreempted`, `KueueEvicted`),
the quota goes back once they are gone, and the job waits in the queue for its next admission."""

from __future__ import annotations

from . import reasons as R
from .classify import PodState, Verdict
from .kueue import (
    ANNOTATION_LAST_CHECKPOINT,
    ANNOTATION_LAST_CHECKPOINT_STEP,
    Placement,
    finish_patch,
    placement,
    pods_ready_patch,
    release_patch,
    workload_name,
)
from .models import KueueStatus, Phase
from .planning import Cycle, Member, condition_reason, pod_alive


def queued(cycle: Cycle) -> bool:
    return cycle.seen.queue is not None


def sync_workload(cycle: Cycle, gang: list[Member]) -> None:
    """Every pass of a queued job: the Workload exists, its `active` follows spec.suspend, it carries the last
    checkpoint, and it gives its quota back once an evicted attempt's pods are gone; status and conditions say
    where the job stands in the queue."""
    seen, st, plan = cycle.seen, cycle.status, cycle.plan.workload
    workload = seen.workload
    known = st.kueue or KueueStatus(workload=workload_name(seen.job))
    if workload is None:
        if not st.phase.finished:
            plan.create = True
            cycle.condition(R.COND_ADMITTED, False, R.QUEUED, f"creating Workload {known.workload} in queue "
                                                             f"{seen.queue}")
        st.kueue = known
        return
    st.kueue = known.model_copy(update={"workload": workload.name, "cluster_queue": workload.cluster_queue})
    if workload.finished and not st.phase.finished:  # reopened: Kueue never admits a Finished Workload again
        plan.replace = True
        cycle.condition(R.COND_ADMITTED, False, R.QUEUED, f"replacing the finished Workload {workload.name}")
        return
    if workload.active == seen.spec.suspend and not st.phase.finished:
        plan.active = not seen.spec.suspend
    _publish_checkpoint(cycle)
    if workload.evicted is not None and not any(pod_alive(m.pod) for m in gang):
        plan.status_patch = release_patch(workload, cycle.now)  # its pods are gone: the quota goes back
    if workload.admitted and not st.phase.finished:  # a finished job's quota is released (`finish`)
        cycle.condition(R.COND_ADMITTED, True, R.KUEUE_ADMITTED, f"admitted by ClusterQueue {workload.cluster_queue}")
    elif not st.phase.finished:
        cycle.condition(R.COND_ADMITTED, False, R.QUEUED, workload.waiting[:1000])


def _publish_checkpoint(cycle: Cycle) -> None:
    """The last checkpoint the operator knows of, on the Workload, for whoever chooses what to preempt."""
    last, workload = cycle.status.last_checkpoint, cycle.seen.workload
    if last is None or last.step is None or workload is None:
        return
    wanted = {ANNOTATION_LAST_CHECKPOINT_STEP: str(last.step)}
    if last.time:
        wanted[ANNOTATION_LAST_CHECKPOINT] = last.time
    if any(workload.annotations.get(k) != v for k, v in wanted.items()):
        cycle.plan.workload.annotations = wanted


def admission(cycle: Cycle) -> tuple[bool, Placement | None]:
    """Whether an attempt may start now, and where its pods go: (True, None) for a job in no queue; for a queued
    one, (True, the admission's placement) once admitted, else (False, None): it waits in the queue."""
    if not queued(cycle):
        return True, None
    workload = cycle.seen.workload
    if workload is None or not workload.admitted or workload.finished or cycle.plan.workload.status_patch is not None:
        if cycle.status.phase not in (Phase.SUSPENDED, Phase.PREEMPTED):
            cycle.status.phase = Phase.PENDING
        return False, None
    assert cycle.seen.queue is not None
    return True, placement(workload, cycle.seen.flavors, cycle.seen.queue)


def evicting(cycle: Cycle) -> bool:
    """The operator is stopping this attempt because Kueue evicted its Workload."""
    known = cycle.status.kueue
    return known is not None and known.evicting_attempt == cycle.status.attempt


def stop_on_eviction(cycle: Cycle, gang: list[Member]) -> bool:
    """Kueue evicted the Workload (preempted it, or a pods-ready timeout, a stopped queue...): SIGTERM every rank
    (they checkpoint). True while the operator is stopping the attempt for it."""
    workload = cycle.seen.workload
    if not queued(cycle) or cycle.seen.spec.suspend:
        return False
    if evicting(cycle):
        cycle.plan.sigterm([m.name for m in gang if pod_alive(m.pod)], cycle.grace)
        return True
    if workload is None or workload.evicted is None:
        return False
    kueue_reason, message = workload.evicted
    reason = R.KUEUE_PREEMPTED if kueue_reason == "Preempted" else R.KUEUE_EVICTED
    known = cycle.status.kueue or KueueStatus(workload=workload.name)
    cycle.status.kueue = known.model_copy(update={"evicting_attempt": cycle.status.attempt,
                                                  "eviction_reason": reason,
                                                  "eviction_message": f"{kueue_reason}: {message}"[:1000]})
    alive = [m.name for m in gang if pod_alive(m.pod)]
    cycle.plan.sigterm(alive, cycle.grace)
    text = (f"Kueue evicted Workload {workload.name} ({kueue_reason}: {message}): SIGTERM to {len(alive)} pod(s), "
            f"{cycle.grace}s to checkpoint; the job waits in queue {cycle.seen.queue} for its next admission")
    cycle.plan.event("Warning", reason, text)
    cycle.condition(R.COND_RUNNING, False, reason, text[:1000])
    return True


def eviction_verdict(cycle: Cycle, verdict: Verdict) -> Verdict:
    """A pod deleted by the operator for a Kueue eviction ended for that eviction."""
    known = cycle.status.kueue
    if verdict.reason != R.POD_DELETED or not evicting(cycle) or known is None:
        return verdict
    return Verdict(verdict.state, known.eviction_reason or R.KUEUE_EVICTED, known.eviction_message or "",
                   verdict.exit_code, verdict.checkpoint_step, verdict.checkpoint_time, verdict.report)


def report_pods_ready(cycle: Cycle, verdicts: list[Verdict]) -> None:
    """PodsReady on the Workload (what Kueue's waitForPodsReady waits for)."""
    workload = cycle.seen.workload
    if not queued(cycle) or workload is None or not workload.admitted or cycle.plan.workload.status_patch:
        return
    ready = all(v.state in (PodState.RUNNING, PodState.SUCCEEDED) for v in verdicts)
    cycle.plan.workload.status_patch = pods_ready_patch(workload, ready, cycle.now)


def finish(cycle: Cycle) -> None:
    """A finished job's Workload: marked Finished (its quota is free), then our finalizer goes."""
    workload = cycle.seen.workload
    if not queued(cycle) or workload is None:
        return
    if not workload.finished:
        cycle.plan.workload.status_patch = finish_patch(workload, cycle.status.phase == Phase.SUCCEEDED,
                                                        cycle.status.message or "", cycle.now)
    elif not workload.finalized:
        cycle.plan.workload.release_finalizer = True
    if condition_reason(cycle.status, R.COND_ADMITTED) == R.KUEUE_ADMITTED:
        cycle.condition(R.COND_ADMITTED, False, R.COMPLETED if cycle.status.phase == Phase.SUCCEEDED else
                        R.COND_FAILED, "finished: the quota is released")
