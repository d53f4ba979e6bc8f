"""The TrainingJob state machine as a pure function: what the watches say in, the status to write and the actions
to take out. One pass decides in this order: the job is going away; a finished job (reopened by `kubectl ckpt
resume`, else kept finished); the current attempt (start it, follow it, or record how it ended); then the next
attempt. The policies live in modules of their own (startup, gang, interruption, failure, fallback, history)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from . import reasons as R
from .classify import Verdict
from .conditions import summarize
from .elastic_policy import capacity_lost, grow, resizing
from .failure_policy import record
from .gang_policy import gang_break, gang_verdict, member_verdict, stop_gang, track_workers
from .interruption_policy import interruption, migrating
from .kueue_policy import finish, queued, report_pods_ready, stop_on_eviction, sync_workload
from .lifecycle import (
    RESTART_REASONS,
    observe_live,
    policy_condition,
    record_override,
    reopen,
    restart_reason,
    start_attempt,
    strays,
    suspended,
    suspending,
)
from .models import Outcome, Result
from .planning import (
    Cycle,
    Member,
    Observed,
    Plan,
    Settings,
    deleting,
    iso,
    members,
    parse_iso,
    pod_alive,
    terminal,
    undone,
)
from .progress import refresh
from .startup_policy import start_timeouts

DEFAULT_SETTINGS = Settings()


def plan(seen: Observed, now: dt.datetime, settings: Settings = DEFAULT_SETTINGS) -> Plan:
    """The plan for one job: its status (written only if it changed) and the pod actions, in one pass."""
    cycle = Cycle.start(seen, now, settings)
    gang = members(seen, cycle.status.attempt)
    if seen.deleting:  # foreground or background deletion: the garbage collector removes the pods
        cycle.plan.idle()
    else:
        _plan_job(cycle, gang)
        strays(cycle, gang)
        if queued(cycle):
            sync_workload(cycle, gang)
            if cycle.status.phase.finished:
                finish(cycle)
    cycle.plan.goodput_seconds = refresh(cycle.status, seen.job.created)
    cycle.plan.status = summarize(cycle.status, now)
    return cycle.plan


def _plan_job(cycle: Cycle, gang: list[Member]) -> None:
    st = cycle.status
    record_override(cycle)
    request = cycle.seen.annotations.get(R.ANNOTATION_RESUME_REQUEST)
    if st.phase.finished and request and request != st.resume_request and \
            all(m.pod is None or terminal(m.pod) for m in gang):
        reopen(cycle, request)
    elif st.phase.finished:
        cycle.plan.sigterm([m.name for m in gang if pod_alive(m.pod)], cycle.grace)  # a sidecar keeps it alive
        cycle.plan.idle()
    else:
        if st.start_time is None:
            st.start_time = iso(cycle.now)
        policy_condition(cycle)  # the spec's policy may have changed since the attempt began
        outcome = st.last_outcome if st.last_outcome is not None and st.last_outcome.attempt == st.attempt else None
        if outcome is None:
            outcome = _follow_attempt(cycle, gang)
        if outcome is not None:
            _after_attempt(cycle, gang, outcome)


def _follow_attempt(cycle: Cycle, gang: list[Member]) -> Outcome | None:
    """Start the current attempt, follow it while it runs, or record how it ended (its outcome, once)."""
    st = cycle.status
    if st.active_pod != gang[0].name:  # the status never recorded this attempt's start
        if any(undone(m.pod) for m in gang):
            cycle.plan.wake_in(2.0)  # a create that was undone (a quota refused a rank): wait until it is gone
        elif start_attempt(cycle, st.attempt, R.RESTART_NONE if st.attempt == 0 else restart_reason(cycle)):
            _follow_adopted(cycle)  # made by a pass whose status write waited or was lost: they may have ended
        return None
    verdicts = start_timeouts(cycle, gang, [member_verdict(cycle, m) for m in gang])
    if len(gang) > 1:
        track_workers(cycle, gang, verdicts)
    if all(v.state.ended for v in verdicts):
        verdict = gang_verdict(cycle, gang, verdicts)
        capacity_lost(cycle, gang, verdicts, verdict.reason)
        return record(cycle, verdict, st.attempt)
    _follow_live(cycle, gang, verdicts)
    return None


def _follow_live(cycle: Cycle, gang: list[Member], verdicts: list[Verdict]) -> None:
    """Some rank still runs: end the gang as one unit if a rank broke it, keep moving off a noticed node, suspend,
    or report how it runs (and act on interruption notices)."""
    suspend = cycle.seen.spec.suspend
    report_pods_ready(cycle, verdicts)
    # our own SIGTERM to every rank (a migration, a Kueue eviction): not a gang break, not news of the pods
    moving = migrating(cycle.status) or resizing(cycle) or stop_on_eviction(cycle, gang)
    cause = None if moving else gang_break(cycle, gang, verdicts)
    if cause is not None and not suspend:  # suspend stops every rank itself
        stop_gang(cycle, gang, cause)
    elif moving:  # until the watch shows every pod deleting (a crash may have come before the delete)
        cycle.plan.sigterm([m.name for m in gang if pod_alive(m.pod)], cycle.grace)
    elif suspend:
        suspending(cycle, gang)
    else:
        observe_live(cycle, gang, verdicts)
        interruption(cycle, gang)
        if not migrating(cycle.status):
            grow(cycle, gang, verdicts)


def _after_attempt(cycle: Cycle, gang: list[Member], outcome: Outcome) -> None:
    """Attempt n has ended and was recorded once: wait until its pods are gone, then start attempt n+1 (unless the
    job finished, is suspended, or backs off)."""
    st = cycle.status
    cycle.plan.releases += [m.name for m in gang if m.pod is not None]  # its outcome is recorded: let it go
    if _stop_leftovers(cycle, gang, outcome):
        if st.phase.finished:
            cycle.plan.idle()
        else:
            cycle.plan.wake_in(2.0)
        return
    if st.phase.finished:
        cycle.plan.idle()
    elif cycle.seen.spec.suspend:
        suspended(cycle)
    elif outcome.result in (Result.FAILED, Result.PREEMPTED, Result.NOT_STARTED) and outcome.retry_after and \
            parse_iso(outcome.retry_after) > cycle.now:
        wait = (parse_iso(outcome.retry_after) - cycle.now).total_seconds()
        reason = R.APPLICATION_FAILURE if outcome.result is Result.FAILED else outcome.reason
        cycle.condition(R.COND_BACKOFF, True, reason, f"resubmitting in {wait:.0f}s")
        cycle.plan.wake_in(wait)
    else:
        reason = R.RESTART_RESIZED if outcome.reason == R.RESIZED else RESTART_REASONS[outcome.result]
        if start_attempt(cycle, st.attempt + 1, reason):
            cycle.plan.count("resubmissions", reason)
            cycle.plan.resubmit_latency = max(0.0, (cycle.now - parse_iso(outcome.finished_at)).total_seconds())
            _follow_adopted(cycle)


def _follow_adopted(cycle: Cycle) -> None:
    """The new attempt's pods exist already: made by a pass whose status write waited behind other jobs' creates
    (a storm) or was lost. Follow them in this same pass, so one status write records the outcome, the new attempt
    and how its pods run (the actuator adopts them without a request)."""
    gang = members(replace(cycle.seen, status=cycle.status), cycle.status.attempt)  # the ranks it started with
    if queued(cycle) or any(m.pod is None or undone(m.pod) for m in gang):
        return
    outcome = _follow_attempt(cycle, gang)
    if outcome is not None:
        _after_attempt(cycle, gang, outcome)


def _stop_leftovers(cycle: Cycle, gang: list[Member], outcome: Outcome) -> bool:
    """Never two attempts at once: stop what is left of the ended attempt (sidecars, ranks that could not start);
    True while any of it has not stopped. A finished preempted pod holds nothing worth keeping: it is removed
    (failed ones keep their logs)."""
    stopping = {name for name, _ in cycle.plan.deletes}
    waiting = False
    for member in gang:
        if member.pod is None or member.name in stopping:
            continue
        if not terminal(member.pod):
            if not deleting(member.pod):
                cycle.plan.sigterm([member.name], cycle.grace)
            waiting = True
        elif outcome.result is Result.PREEMPTED and not deleting(member.pod):
            cycle.plan.deletes.append((member.name, 0))
    return waiting
