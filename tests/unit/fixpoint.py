"""The planner the planner tests call, checked on every call: planned again on the status it returned and with the
pods it created (what the job's next pass sees once its status write is watched), it changes nothing more. The
worker relies on it: the watch event of its own status write wakes nobody (`JobWorker.job_event`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from ckpt_operator.actuator import status_patch
from ckpt_operator.cache import trim_pod
from ckpt_operator.models import TrainingJobStatus
from ckpt_operator.planner import DEFAULT_SETTINGS
from ckpt_operator.planner import plan as planner_plan
from ckpt_operator.planning import Observed, Plan, Settings


def plan(seen: Observed, now: dt.datetime, settings: Settings = DEFAULT_SETTINGS) -> Plan:
    """`planner.plan`, failing the test if planning again on its own result would write or create more."""
    result = planner_plan(seen, now, settings)
    written = result.status.dump()
    names = {pod["metadata"]["name"] for pod in seen.pods}
    created = [{**trim_pod(pod), "status": {"phase": "Pending"}} for pod in result.creates
               if pod["metadata"]["name"] not in names]
    again = planner_plan(replace(seen, status=TrainingJobStatus.model_validate(written), pods=[*seen.pods, *created]),
                         now, settings)
    more = status_patch(written, again.status.dump())
    assert not more, f"not a fixpoint: planned again on its own status, the plan writes {more}"
    extra = [pod["metadata"]["name"] for pod in again.creates]
    assert not extra, f"not a fixpoint: planned again, it creates {extra}"
    return result
