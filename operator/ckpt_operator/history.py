"""status.attempts: one row per attempt (where it ran, how it ended, what it resumed from, what it redid)."""

from __future__ import annotations

from .classify import report_of
from .models import AttemptRecord, Outcome, Progress
from .planning import Cycle, attempt_names, iso, members, node_name
from .progress import pace_of, trainer_started

ATTEMPT_HISTORY = 100  # attempts kept in status.attempts


def history_start(cycle: Cycle, attempt: int, pods: list[str]) -> None:
    """A row for the attempt starting now, with what it resumes from and the work it redoes."""
    st = cycle.status
    start = st.last_checkpoint.step if st.last_checkpoint is not None else None
    previous = next((r for r in reversed(st.attempts) if r.attempt < attempt), None)
    redone = None
    if previous is not None and previous.reached_step is not None:
        redone = max(0, previous.reached_step - (start or 0))
    row = AttemptRecord(attempt=attempt, pods=pods, start_time=iso(cycle.now), start_step=start, steps_redone=redone,
                        workers=len(pods) if cycle.seen.spec.ranked else None)
    st.attempts = ([r for r in st.attempts if r.attempt != attempt] + [row])[-ATTEMPT_HISTORY:]


def history_end(cycle: Cycle, outcome: Outcome) -> None:
    """Complete the attempt's row: where it ran, how it ended, the newest checkpoint, the furthest step, and the
    step it really resumed from when its trainer said so."""
    st, seen = cycle.status, cycle.seen
    container = seen.spec.trainer()["name"]
    pods = [m.pod for m in members(seen, outcome.attempt) if m.pod is not None]
    reports = [report for report in (report_of(pod, container) for pod in pods) if report is not None]
    reached = [r.reached for r in reports if r.reached is not None]
    resumed = [r.resumed for r in reports if r.resumed is not None]
    row = next((r for r in st.attempts if r.attempt == outcome.attempt), None) or AttemptRecord(
        attempt=outcome.attempt, pods=attempt_names(seen, outcome.attempt))
    last = st.last_checkpoint
    row = row.model_copy(update={
        "nodes": sorted({node_name(pod) for pod in pods if node_name(pod)}) or row.nodes,
        "end_time": outcome.finished_at, "result": outcome.result, "reason": outcome.reason,
        "checkpoint_step": last.step if last is not None else None,
        "reached_step": max(reached) if reached else None,
        "start_step": max(resumed) if resumed else row.start_step,
        "running_time": trainer_started(pods, container), **pace_of(reports)})
    st.attempts = ([r for r in st.attempts if r.attempt != outcome.attempt] + [row])[-ATTEMPT_HISTORY:]
    totals = [r.total_steps for r in reports if r.total_steps is not None]
    if totals:  # the run's length, as its trainer said (kept for the progress of later attempts)
        st.progress = (st.progress or Progress()).model_copy(update={"total_steps": max(totals)})
