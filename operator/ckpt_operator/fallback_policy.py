"""Capacity fallback (spec.preemption.fallback): after `afterPreemptions` capacity losses within a window, the next
attempts run with a template patch (on-demand nodes, another zone); back to the template after a while.

Capacity losses are preemptions and attempts that could not start; the scheduled end of a time-limited slot is not
one (it says nothing about the capacity)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import reasons as R
from .models import FallbackStatus
from .planning import Cycle, iso, parse_iso

NOT_CAPACITY = frozenset({R.DEADLINE_EXCEEDED})


def count_capacity_loss(cycle: Cycle, reason: str) -> None:
    """An attempt lost its capacity (`reason`): switch to the fallback once enough fell within the window."""
    fallback = cycle.seen.spec.preemption.fallback
    if fallback is None or reason in NOT_CAPACITY:
        return
    st = cycle.status
    state = st.fallback or FallbackStatus()
    window = dt.timedelta(seconds=fallback.window_seconds)
    recent = [t for t in state.recent_preemptions if cycle.now - parse_iso(t) < window] + [iso(cycle.now)]
    recent = recent[-fallback.after_preemptions:]
    if not state.active and len(recent) >= fallback.after_preemptions:
        state = state.model_copy(update={"active": True, "since": iso(cycle.now)})
        back = (f"; back to the template after {fallback.revert_after_seconds}s"
                if fallback.revert_after_seconds else "")
        cycle.plan.event("Warning", R.FALLBACK_APPLIED,
                         f"{len(recent)} capacity losses within {fallback.window_seconds}s: the next attempts run "
                         f"with preemption.fallback.templatePatch{back}")
    st.fallback = state.model_copy(update={"recent_preemptions": recent})


def fallback_patch(cycle: Cycle) -> dict[str, Any] | None:
    """The template patch for the attempt starting now (None: the plain template); reverts when its time is up."""
    fallback, state = cycle.seen.spec.preemption.fallback, cycle.status.fallback
    if fallback is None or state is None or not state.active:
        return None
    since = parse_iso(state.since) if state.since else cycle.now
    if fallback.revert_after_seconds is not None and \
            (cycle.now - since).total_seconds() >= fallback.revert_after_seconds:
        cycle.status.fallback = FallbackStatus()
        cycle.plan.event("Normal", R.FALLBACK_REVERTED,
                         f"the fallback ran for {fallback.revert_after_seconds}s: back to the pod template")
        return None
    return fallback.template_patch
