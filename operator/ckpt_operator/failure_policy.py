"""How an ended attempt is counted, exactly once: the result, the budgets it spends (preemptions, application
failures, attempts without progress) and when the next attempt may start.

Budgets: a preemption never counts as a failure; an attempt that could not start counts in no budget (a capacity
shortage, retried with back-off); progress is judged from what the trainers report, and an attempt that ended with
no report at all (its node was lost, its pod force-deleted) is judged once a later attempt reports the step it
resumed from: a lost node is not "no progress"."""

from __future__ import annotations

import datetime as dt

from . import reasons as R
from .builders import failure_backoff
from .classify import PodState, Verdict, report_of, terminated
from .fallback_policy import count_capacity_loss
from .history import history_end
from .models import LastCheckpoint, Outcome, Phase, Result
from .planning import Cycle, iso, members

CAPACITY_RETRY_CAP_SECONDS = 60.0
RESULT_OF = {PodState.SUCCEEDED: Result.SUCCEEDED, PodState.PREEMPTED: Result.PREEMPTED,
             PodState.FAILED: Result.FAILED, PodState.NOT_STARTED: Result.NOT_STARTED}
CAPACITY_REASONS = frozenset({R.ADMISSION_REJECTED, R.GANG_UNSCHEDULABLE, R.UNSCHEDULABLE, R.START_TIMEOUT})


def record(cycle: Cycle, verdict: Verdict, attempt: int) -> Outcome:
    """Count how `attempt` ended and set the phase; returns the outcome (also kept in status.lastOutcome)."""
    st = cycle.status
    if verdict.checkpoint_step is not None:
        when = verdict.checkpoint_time or iso(cycle.now)
        st.last_checkpoint = LastCheckpoint(step=verdict.checkpoint_step, time=when)
    result = RESULT_OF[verdict.state]
    if result is Result.PREEMPTED and cycle.seen.spec.suspend:
        result = Result.SUSPENDED
    cycle.condition(R.COND_RUNNING, False, verdict.reason, verdict.message)
    ckpt = f" (last checkpoint: step {verdict.checkpoint_step})" if verdict.checkpoint_step is not None else ""
    retry_after = _COUNT[result](cycle, verdict, attempt, ckpt)
    if result.counted_for_progress and verdict.reason != R.RESIZED:
        _count_progress(cycle, verdict, attempt)
    if verdict.reason in CAPACITY_REASONS and not st.phase.finished:
        # the node refused the pod, or no capacity came in time: retry soon, not in a tight loop
        retry_after = _capacity_retry(cycle)
    outcome = Outcome(attempt=attempt, result=result, reason=verdict.reason, message=verdict.message[:1000],
                      exit_code=verdict.exit_code, finished_at=iso(cycle.now), retry_after=retry_after)
    history_end(cycle, outcome)
    st.last_outcome = outcome
    return outcome


def _succeeded(cycle: Cycle, verdict: Verdict, attempt: int, ckpt: str) -> str | None:
    st = cycle.status
    st.phase, st.completion_time, st.message = Phase.SUCCEEDED, iso(cycle.now), None
    cycle.condition(R.COND_COMPLETE, True, R.COMPLETED, f"attempt {attempt} finished{ckpt}")
    cycle.plan.event("Normal", R.COMPLETED, f"training finished on attempt {attempt}{ckpt}")
    return None


def _suspended(cycle: Cycle, verdict: Verdict, attempt: int, ckpt: str) -> str | None:
    cycle.status.phase = Phase.SUSPENDED
    cycle.plan.event("Normal", R.SUSPENDED_BY_USER, f"attempt {attempt} stopped for suspend{ckpt}")
    return None


def _preempted(cycle: Cycle, verdict: Verdict, attempt: int, ckpt: str) -> str | None:
    st = cycle.status
    if verdict.reason == R.RESIZED:  # the operator's own stop, to grow the gang: no budget is spent
        st.phase = Phase.PENDING
        cycle.plan.event("Normal", R.RESIZED, f"attempt {attempt} stopped: {verdict.message}{ckpt}")
        return None
    st.preemptions += 1
    st.phase = Phase.PREEMPTED
    cycle.condition(R.COND_PREEMPTED, True, verdict.reason, verdict.message)
    cycle.plan.count("preemptions", verdict.reason)
    cycle.plan.event("Warning", verdict.reason, f"attempt {attempt} preempted: {verdict.message}{ckpt}")
    count_capacity_loss(cycle, verdict.reason)
    limit = cycle.seen.spec.preemption.max_preemptions
    if limit is not None and st.preemptions > limit:
        fail(cycle, R.PREEMPTION_LIMIT_EXCEEDED, f"{st.preemptions} preemptions exceed maxPreemptions={limit}")
    return None


def _failed(cycle: Cycle, verdict: Verdict, attempt: int, ckpt: str) -> str | None:
    st, spec = cycle.status, cycle.seen.spec
    st.failures += 1
    cycle.plan.count("failures", verdict.reason)
    cycle.plan.event("Warning", R.APPLICATION_FAILURE, f"attempt {attempt} failed: {verdict.message}")
    if st.failures > spec.backoff_limit:
        fail(cycle, R.BACKOFF_LIMIT_EXCEEDED,
             f"{st.failures} application failures exceed backoffLimit={spec.backoff_limit}; last: {verdict.message}")
        return None
    st.phase = Phase.PENDING
    wait = failure_backoff(st.failures, cycle.settings.backoff_base_seconds, cycle.settings.backoff_cap_seconds)
    return iso(cycle.now + dt.timedelta(seconds=wait))


def _not_started(cycle: Cycle, verdict: Verdict, attempt: int, ckpt: str) -> str | None:
    cycle.status.phase = Phase.PENDING
    cycle.plan.count("not_started", verdict.reason)
    cycle.plan.event("Warning", verdict.reason, f"attempt {attempt} could not start: {verdict.message}; retrying "
                                                "(no budget is spent)")
    count_capacity_loss(cycle, verdict.reason)
    return None


_COUNT = {Result.SUCCEEDED: _succeeded, Result.SUSPENDED: _suspended, Result.PREEMPTED: _preempted,
          Result.FAILED: _failed, Result.NOT_STARTED: _not_started}


def _capacity_retry(cycle: Cycle) -> str:
    """Back-off for capacity shortages: doubling with the consecutive attempts that did not run, capped."""
    waiting = 0
    for row in reversed(cycle.status.attempts):
        if row.result is not None and row.reason not in CAPACITY_REASONS:
            break
        waiting += 1
    wait = min(CAPACITY_RETRY_CAP_SECONDS, 2.0 ** max(1, waiting))
    return iso(cycle.now + dt.timedelta(seconds=wait))


def _progressed(since: int | None, step: int | None) -> bool:
    """A checkpoint at `step` is newer than the one at `since` (None: there was none)."""
    return step is not None and step > 0 and (since is None or step > since)


def _count_progress(cycle: Cycle, verdict: Verdict, attempt: int) -> None:
    """The progress budget: consecutive attempts that ended without committing a new checkpoint."""
    st, seen = cycle.status, cycle.seen
    container = seen.spec.trainer()["name"]
    pods = [m.pod for m in members(seen, attempt) if m.pod is not None]
    reports = [r for r in (report_of(pod, container) for pod in pods) if r is not None]
    # the SDK rewrites its termination message after every save: a trainer that ended and left none saved nothing;
    # one that left no ending at all (its node lost, its pod gone) is judged when a later attempt says where it
    # resumed
    if not reports and not any(terminated(pod, container) for pod in pods):
        if st.attempts_progress_unknown == 0:
            st.progress_unknown_since = st.attempt_start_step
        st.attempts_progress_unknown += 1
        return
    resumed = max((r.resumed for r in reports if r.resumed is not None), default=None) or None
    start = resumed if resumed is not None else st.attempt_start_step
    stalled = st.attempts_without_progress
    if st.attempts_progress_unknown:
        unknown_progressed = _progressed(st.progress_unknown_since, start)
        stalled = 0 if unknown_progressed else stalled + st.attempts_progress_unknown
        st.attempts_progress_unknown, st.progress_unknown_since = 0, None
    if resumed is not None and (st.last_checkpoint is None or (st.last_checkpoint.step or 0) < resumed):
        st.last_checkpoint = LastCheckpoint(step=resumed, time=st.last_checkpoint.time if st.last_checkpoint else None)
    st.attempts_without_progress = 0 if _progressed(start, verdict.checkpoint_step) else stalled + 1
    limit = seen.spec.preemption.max_attempts_without_progress
    if st.attempts_without_progress >= limit and not st.phase.finished:
        fail(cycle, R.NO_PROGRESS, f"{st.attempts_without_progress} consecutive attempts (the last: attempt "
                                   f"{attempt}, {verdict.reason}) committed no new checkpoint "
                                   f"(maxAttemptsWithoutProgress={limit})")


def fail(cycle: Cycle, reason: str, message: str) -> None:
    st = cycle.status
    st.phase, st.completion_time, st.message = Phase.FAILED, iso(cycle.now), message
    cycle.condition(R.COND_FAILED, True, reason, message)
    cycle.plan.event("Warning", reason, message)
