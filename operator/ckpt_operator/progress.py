"""status.progress and status.goodput (pure): how far the job is, when it would end at the measured pace, and how
much of its wall time went to useful training. Everything comes from the attempt history, which the SDK's reports
(termination messages: step time, save stalls, resume time, total steps) and the pods' start times fill in, so the
figures change only when an attempt starts or ends: no status write while an attempt runs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from ckpt_sdk.contract import TerminationMessage

from .models import AttemptRecord, Goodput, Phase, Progress, Result, TrainingJobStatus
from .planning import iso, parse_iso

LOSSES = ("redone", "saving", "restart", "queued")  # the kinds of lost time, as metrics label them


def trainer_started(pods: Sequence[dict[str, Any]], container: str) -> str | None:
    """When the attempt's trainer ran: the latest start of the trainer container over its pods (a gang trains
    once every rank runs); None if none started."""
    starts = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status.get("name") != container:
                continue
            state = status.get("state") or {}
            started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
            if started:
                starts.append(str(started))
    return max(starts) if len(starts) == len(pods) and starts else None


def pace_of(reports: Sequence[TerminationMessage]) -> dict[str, float | None]:
    """An attempt's pace from its ranks' reports: the slowest rank's (the gang waits for it)."""

    def slowest(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return max(known) if known else None

    return {"step_seconds": slowest([r.step_seconds for r in reports]),
            "stall_seconds": slowest([r.stall_seconds for r in reports]),
            "resume_seconds": slowest([r.resume_seconds for r in reports])}


def progress_of(st: TrainingJobStatus, total: int | None) -> Progress:
    """The furthest step, the total if known, and the estimated completion of the current attempt."""
    reached = [r.reached_step for r in st.attempts if r.reached_step is not None]
    checkpoint = st.last_checkpoint.step if st.last_checkpoint is not None else None
    step = max([*reached, checkpoint or 0])
    pace = next((r.step_seconds for r in reversed(st.attempts) if r.step_seconds), None)
    percent = min(100, step * 100 // total) if total else None
    display = f"{step}/{total} ({percent}%)" if total else str(step)
    return Progress(step=step, total_steps=total, percent=percent, step_seconds=pace,
                    estimated_completion_time=_completion(st, total, pace), display=display)


def _completion(st: TrainingJobStatus, total: int | None, pace: float | None) -> str | None:
    """The current attempt's start, plus the last resume's duration, plus its remaining steps at `pace`."""
    if st.phase.finished or st.phase == Phase.SUSPENDED or not total or not pace:
        return None
    current = next((r for r in reversed(st.attempts) if r.attempt == st.attempt and r.end_time is None), None)
    if current is None or current.start_time is None:
        return None
    resume = next((r.resume_seconds for r in reversed(st.attempts) if r.resume_seconds is not None), 0.0)
    remaining = max(0, total - (current.start_step or 0)) * pace + resume
    return iso(parse_iso(current.start_time) + dt.timedelta(seconds=remaining))


def goodput_of(attempts: Sequence[AttemptRecord], created: str) -> Goodput | None:
    """Useful time / wall time from `created` to the end of the last attempt that ended; None before one ended."""
    ended = sorted((r for r in attempts if r.end_time is not None), key=lambda r: r.attempt)
    if not ended or not created:
        return None
    start = parse_iso(created)
    lost = dict.fromkeys(LOSSES, 0.0)
    previous_end: dt.datetime | None = None
    pace: float | None = None
    for row in ended:
        assert row.end_time is not None
        never_ran = row.result == Result.NOT_STARTED  # its wait is not training
        running = parse_iso(row.running_time or (row.end_time if never_ran else row.start_time) or row.end_time)
        if previous_end is None:
            lost["queued"] += _seconds(running - start)
        else:
            lost["restart"] += _seconds(running - previous_end)
        lost["restart"] += row.resume_seconds or 0.0
        pace = row.step_seconds or pace
        lost["redone"] += (row.steps_redone or 0) * (pace or 0.0)
        lost["saving"] += row.stall_seconds or 0.0
        previous_end = parse_iso(row.end_time)
    assert previous_end is not None
    wall = _seconds(previous_end - start)
    useful = max(0.0, wall - sum(lost.values()))
    ratio = useful / wall if wall > 0 else 0.0
    return Goodput(as_of=iso(previous_end), ratio=round(ratio, 4), wall_seconds=round(wall, 1),
                   useful_seconds=round(useful, 1), redone_seconds=round(lost["redone"], 1),
                   saving_seconds=round(lost["saving"], 1), restart_seconds=round(lost["restart"], 1),
                   queued_seconds=round(lost["queued"], 1), display=f"{ratio * 100:.0f}%")


def _seconds(delta: dt.timedelta) -> float:
    return max(0.0, delta.total_seconds())


def seconds_by_kind(goodput: Goodput | None) -> dict[str, float]:
    """A goodput's seconds by kind (useful and each loss), as the metrics count them."""
    if goodput is None:
        return {}
    return {"useful": goodput.useful_seconds, "redone": goodput.redone_seconds, "saving": goodput.saving_seconds,
            "restart": goodput.restart_seconds, "queued": goodput.queued_seconds}


def refresh(st: TrainingJobStatus, created: str) -> dict[str, float]:
    """Recompute status.progress and status.goodput; returns the seconds each kind grew by (for the metrics)."""
    total = st.progress.total_steps if st.progress is not None else None
    st.progress = progress_of(st, total)
    before = seconds_by_kind(st.goodput)
    st.goodput = goodput_of(st.attempts, created) or st.goodput
    after = seconds_by_kind(st.goodput)
    return {kind: round(value - before.get(kind, 0.0), 1) for kind, value in after.items()
            if value - before.get(kind, 0.0) > 0.05}
