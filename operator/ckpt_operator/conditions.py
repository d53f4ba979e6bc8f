"""kstatus' conditions (Ready, Reconciling, Stalled), derived from the phase and the other conditions once per pass,
each stamped with the generation it was computed from (as kstatus reads a batch/v1 Job)."""

from __future__ import annotations

import datetime as dt

from . import reasons as R
from .models import Phase, TrainingJobStatus
from .planning import set_condition


def summarize(st: TrainingJobStatus, now: dt.datetime) -> TrainingJobStatus:
    """Reconciling while on its way, Stalled once Failed, Ready once it succeeded (or is suspended with no pod);
    every condition's observedGeneration set to the status's."""
    phase = st.phase
    conditions = {c.type: c for c in st.conditions}
    failed = conditions.get(R.COND_FAILED)
    failed = failed if failed is not None and failed.status == "True" else None
    unresolved = conditions.get(R.COND_SPEC_RESOLVED)
    unresolved = unresolved if unresolved is not None and unresolved.status == "False" else None
    on_its_way = phase in (Phase.PENDING, Phase.RUNNING, Phase.PREEMPTED)
    set_condition(st, R.COND_RECONCILING, on_its_way, phase.value,
                  f"the job is {phase.value.lower()}" if on_its_way else "", now)
    set_condition(st, R.COND_STALLED, phase == Phase.FAILED, failed.reason if failed else phase.value,
                  failed.message if failed else "", now)
    why = failed or unresolved  # the most useful reason why it is not (yet) done
    suspended = conditions.get(R.COND_SUSPENDED)
    if phase == Phase.SUCCEEDED:
        set_condition(st, R.COND_READY, True, R.COMPLETED, "training finished", now)
    elif phase == Phase.SUSPENDED and suspended is not None and suspended.reason not in ("", R.SUSPENDING):
        # what the spec asks for is reached, no pod left: nothing in progress
        set_condition(st, R.COND_READY, True, R.SUSPENDED_BY_USER, "suspended; its checkpoints are kept", now)
    else:
        set_condition(st, R.COND_READY, False, why.reason if why else phase.value, why.message if why else "", now)
    generation = st.observed_generation
    st.conditions = [c if c.observed_generation == generation else c.model_copy(
        update={"observed_generation": generation}) for c in st.conditions]
    return st
