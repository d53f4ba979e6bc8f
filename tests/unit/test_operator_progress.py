"""status.progress and status.goodput from the attempt history (pure): the figures the PROGRESS, ETA and GOODPUT
columns, the Prometheus counters and `kubectl ckpt describe` show."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from ckpt_operator.models import AttemptRecord, Goodput, LastCheckpoint, Phase, Progress, Result, TrainingJobStatus
from ckpt_operator.planning import iso, parse_iso
from ckpt_operator.progress import goodput_of, pace_of, progress_of, refresh, trainer_started
from ckpt_sdk.contract import TerminationMessage

CREATED = "2026-01-01T00:00:00Z"


def _row(attempt: int, start: str, running: str | None, end: str | None, **fields: object) -> AttemptRecord:
    return AttemptRecord(attempt=attempt, start_time=start, running_time=running, end_time=end,
                         result=Result.PREEMPTED if end else None, **fields)  # type: ignore[arg-type]


def _history() -> list[AttemptRecord]:
    """Queued 10 s; attempt 0 runs 100 s (2 s of saves); 20 s until attempt 1 runs (3 s resume), which redoes
    30 steps of 0.5 s and runs 50 s (1 s of saves)."""
    return [_row(0, "2026-01-01T00:00:05Z", "2026-01-01T00:00:10Z", "2026-01-01T00:01:50Z", step_seconds=0.5,
                 stall_seconds=2.0, resume_seconds=0.0, reached_step=190, start_step=0),
            _row(1, "2026-01-01T00:01:55Z", "2026-01-01T00:02:10Z", "2026-01-01T00:03:00Z", step_seconds=0.5,
                 stall_seconds=1.0, resume_seconds=3.0, steps_redone=30, start_step=160, reached_step=250)]


def test_goodput_splits_the_wall_time_into_useful_and_each_loss():
    found = goodput_of(_history(), CREATED)
    assert found is not None
    assert (found.wall_seconds, found.queued_seconds, found.restart_seconds) == (180.0, 10.0, 23.0)
    assert (found.redone_seconds, found.saving_seconds) == (15.0, 3.0)
    assert found.useful_seconds == 180.0 - 10 - 23 - 15 - 3
    assert found.ratio == round(129 / 180, 4) and found.display == "72%" and found.as_of == "2026-01-01T00:03:00Z"


def test_no_goodput_before_an_attempt_ended():
    assert goodput_of([_row(0, "2026-01-01T00:00:05Z", None, None)], CREATED) is None


def test_an_attempt_that_never_ran_counts_its_wait_not_as_useful():
    rows = [_row(0, "2026-01-01T00:00:05Z", None, "2026-01-01T00:01:00Z").model_copy(
        update={"result": Result.NOT_STARTED})]  # its pods never all started
    found = goodput_of(rows, CREATED)
    assert found is not None and found.queued_seconds == 60.0 and found.useful_seconds == 0.0


def test_progress_shows_the_furthest_step_of_the_total_and_the_eta_of_the_current_attempt():
    st = TrainingJobStatus(phase=Phase.RUNNING, attempt=2, last_checkpoint=LastCheckpoint(step=240),
                           attempts=[*_history(), _row(2, "2026-01-01T00:03:05Z", None, None, start_step=240)])
    found = progress_of(st, 400)
    assert (found.step, found.percent, found.display) == (250, 62, "250/400 (62%)")
    # the current attempt started 00:03:05; 160 steps left from 240 at 0.5 s, plus the last resume's 3 s
    assert found.estimated_completion_time == "2026-01-01T00:04:28Z"


def test_progress_without_a_total_or_a_pace_has_no_percent_or_eta():
    st = TrainingJobStatus(phase=Phase.RUNNING, attempts=[_row(0, "2026-01-01T00:00:05Z", None, None)])
    found = progress_of(st, None)
    assert (found.display, found.percent, found.estimated_completion_time) == ("0", None, None)
    assert progress_of(st, 100).estimated_completion_time is None  # no step time measured yet


def test_a_finished_job_has_no_eta():
    st = TrainingJobStatus(phase=Phase.SUCCEEDED, attempts=_history())
    assert progress_of(st, 250).estimated_completion_time is None
    assert progress_of(st, 250).display == "250/250 (100%)"


def test_refresh_reports_only_the_seconds_newly_accounted():
    st = TrainingJobStatus(phase=Phase.RUNNING, attempt=1, attempts=_history()[:1], progress=Progress(total_steps=400))
    first = refresh(st, CREATED)
    assert first == {"useful": 98.0, "saving": 2.0, "queued": 10.0}
    assert refresh(st, CREATED) == {}  # nothing new: nothing counted twice, and the status is unchanged
    st.attempts = _history()
    assert refresh(st, CREATED) == {"useful": 31.0, "redone": 15.0, "saving": 1.0, "restart": 23.0}
    assert isinstance(st.goodput, Goodput) and st.progress is not None and st.progress.total_steps == 400


def test_the_pace_of_a_gang_is_its_slowest_rank_and_it_trains_once_every_rank_runs():
    reports = [TerminationMessage(step=5, step_seconds=0.2, stall_seconds=1.0),
               TerminationMessage(step=5, step_seconds=0.3, stall_seconds=None, resume_seconds=2.0)]
    assert pace_of(reports) == {"step_seconds": 0.3, "stall_seconds": 1.0, "resume_seconds": 2.0}
    pods = [{"status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
        "startedAt": "2026-01-01T00:00:10Z"}}}]}},
            {"status": {"containerStatuses": [{"name": "trainer", "state": {"running": {
                "startedAt": "2026-01-01T00:00:12Z"}}}]}}]
    assert trainer_started(pods, "trainer") == "2026-01-01T00:00:12Z"
    assert trainer_started([*pods, {"status": {}}], "trainer") is None  # a rank never started


def test_every_metric_the_dashboard_queries_is_one_the_operator_exports():
    import json
    import re
    from pathlib import Path

    from ckpt_operator import metrics

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "charts" / "ckpt-operator" / "dashboards" /
                            "ckpt-operator.json").read_text())
    queried = {re.sub(r"_(total|bucket|count|sum)$", "", name) for panel in dashboard["panels"]
               for target in panel.get("targets", []) for name in re.findall(r"ckpt_operator_\w+", target["expr"])}
    families = {family.name for family in metrics.REGISTRY.collect()}
    assert "ckpt_operator_goodput_seconds" in queried
    assert queried <= families, queried - families


def test_timestamps_parse_as_strptime_parses_the_one_form_the_api_server_writes():
    """`parse_iso` reads exactly `%Y-%m-%dT%H:%M:%SZ` (with `fromisoformat`): the same instant as strptime over
    four years of seconds, UTC. Other forms are refused (strptime also took a lowercase z or one-digit fields)."""
    rng = random.Random(30)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    for seconds in [0, 59, 86399, *(rng.randrange(4 * 366 * 86400) for _ in range(2000))]:
        text = iso(start + dt.timedelta(seconds=seconds))
        expected = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
        parsed = parse_iso(text)
        assert parsed == expected and parsed.utcoffset() == dt.timedelta(0), text
    for bad in ["2026-01-01T00:00:00+00:00", "2026-01-01 00:00:00Z", "2026-01-01T00:00:00.5Z", "2026-W01-1T00:00:00Z",
                "2026-13-01T00:00:00Z", "2026-01-01T0a:00:00Z", ""]:
        with pytest.raises(ValueError):
            parse_iso(bad)
