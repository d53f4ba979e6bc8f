"""Elastic gangs (`workers: {min, max}`): each attempt starts at the largest size in [min, max] that fits; when more
ranks fit again, the running gang is stopped gracefully (SIGTERM: the SDK checkpoints at its next step) and restarts
at the larger size, with reason `Resized`, which spends no budget. The SDK reshards the checkpoint on load.

What fits: the ranks the nodes could take (`rank_slots`: Ready, schedulable nodes whose taints the template
tolerates and whose labels match its nodeSelector, each taking as many ranks as its allocatable resources hold of
one rank's requests, one if it requests none). Other pods' requests are not counted (that would need a watch of
every pod); the scheduler has the last word: when ranks of an attempt find no place (unschedulable past the gang
start timeout, refused by their node), the next attempt is limited to the ranks that did start (at least one fewer),
until the nodes fit more than they did then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from . import reasons as R
from .classify import NodeInfo, PodState, Verdict
from .failure_policy import CAPACITY_REASONS
from .models import ElasticStatus, TrainingJobSpec
from .planning import Cycle, Member, attempt_of, pod_alive


def rank_slots(nodes: Iterable[NodeInfo], spec: TrainingJobSpec, notice_taints: Mapping[str, float]) -> int:
    """How many ranks of this job the nodes could take (see the module)."""
    pod_spec = spec.template.get("spec") or {}
    requests = _requests(pod_spec.get("containers") or [])
    selector = pod_spec.get("nodeSelector") or {}
    tolerations = pod_spec.get("tolerations") or []
    total = 0
    for node in nodes:
        labels = dict(node.labels)
        if not (node.exists and node.ready and node.schedulable) or node.notice(notice_taints) is not None \
                or any(labels.get(key) != value for key, value in selector.items()) \
                or any(not _tolerated(key, value, tolerations) for key, value in node.blocking):
            continue
        total += _fits(dict(node.allocatable), requests)
    return total


def _requests(containers: list[dict[str, Any]]) -> dict[str, Decimal]:
    """One rank's resource requests (a limit stands for a missing request, as the API server defaults it)."""
    total: dict[str, Decimal] = {}
    for container in containers:
        resources = container.get("resources") or {}
        wanted = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        for name, quantity in wanted.items():
            total[name] = total.get(name, Decimal(0)) + _quantity(quantity)
    return {name: amount for name, amount in total.items() if amount > 0}


def _quantity(text: object) -> Decimal:
    from kubernetes.utils import parse_quantity

    parse = cast(Callable[[object], Decimal], parse_quantity)  # (untyped upstream)
    try:
        return Decimal(parse(text))
    except (ValueError, InvalidOperation, TypeError):
        return Decimal(0)


def _fits(allocatable: Mapping[str, str], requests: Mapping[str, Decimal]) -> int:
    if not requests:
        return 1
    return min(math.floor(_quantity(allocatable.get(name, "0")) / amount) for name, amount in requests.items())


def _tolerated(key: str, value: str, tolerations: list[dict[str, Any]]) -> bool:
    for toleration in tolerations:
        if toleration.get("key") not in (None, "", key):
            continue
        if toleration.get("operator") == "Exists" or toleration.get("value", "") == value:
            return True
    return False


def attempt_size(cycle: Cycle, attempt: int) -> int:
    """The size `attempt` starts at: the largest in [min, max] that fits (a fixed gang: its size). If its pods
    exist already (made by a pass whose status write waited or was lost), their number: they carry that size."""
    low, high = cycle.seen.spec.worker_range()
    if not cycle.seen.spec.elastic:
        return high
    made = sum(1 for pod in cycle.seen.pods if attempt_of(pod, cycle.seen.job.name) == attempt)
    if made:
        return made
    fits = cycle.seen.capacity if cycle.seen.capacity is not None else high
    limit = _limit(cycle)
    if limit is not None:
        fits = min(fits, limit)
    workload = cycle.seen.workload
    if workload is not None and workload.admitted and workload.admitted_count is not None:
        fits = min(fits, workload.admitted_count)  # Kueue admitted part of the gang (partial admission)
    return max(low, min(high, fits))


def _limit(cycle: Cycle) -> int | None:
    """The limit set when ranks found no place, while the nodes fit no more than they did then."""
    elastic = cycle.status.elastic
    if elastic is None or elastic.limit is None:
        return None
    capacity = cycle.seen.capacity
    if capacity is not None and elastic.limit_capacity is not None and capacity > elastic.limit_capacity:
        return None
    return elastic.limit


def started(cycle: Cycle, attempt: int, size: int, previous: int | None) -> None:
    """Record the size an attempt starts at; an Event when it differs from the attempt before."""
    spec = cycle.seen.spec
    if not spec.elastic:
        return
    low, high = spec.worker_range()
    elastic = cycle.status.elastic or ElasticStatus()
    limited = _limit(cycle) is not None
    fits = cycle.seen.capacity
    why = (f"the nodes fit {fits} rank(s)" if fits is not None else "capacity unknown") + (
        f", limited to {elastic.limit} since ranks found no place" if limited else "")
    message = f"{size} of at most {high} ranks (at least {low}): {why}"
    resized = previous is not None and previous != size
    cycle.status.elastic = elastic.model_copy(update={
        "resizing_to": None, "message": message, "resizes": elastic.resizes + (1 if resized else 0),
        "limit": elastic.limit if limited else None, "limit_capacity": elastic.limit_capacity if limited else None})
    if resized:
        cycle.plan.event("Normal", R.RESIZED, f"attempt {attempt} runs {message} (the attempt before ran {previous})")


def capacity_lost(cycle: Cycle, gang: list[Member], verdicts: list[Verdict], reason: str) -> None:
    """An elastic attempt ended because ranks found no place: limit the next one to the ranks that started."""
    spec = cycle.seen.spec
    if not spec.elastic or reason not in CAPACITY_REASONS:
        return
    low, _ = spec.worker_range()
    placed = sum(1 for v in verdicts if v.state != PodState.NOT_STARTED and v.reason not in CAPACITY_REASONS)
    limit = max(low, min(placed, len(gang) - 1))
    elastic = cycle.status.elastic or ElasticStatus()
    cycle.status.elastic = elastic.model_copy(update={"limit": limit, "limit_capacity": cycle.seen.capacity})


def resizing(cycle: Cycle) -> bool:
    """The operator is stopping this attempt to restart it at another size."""
    elastic = cycle.status.elastic
    return elastic is not None and elastic.resizing_to is not None


def grow(cycle: Cycle, gang: list[Member], verdicts: list[Verdict]) -> bool:
    """More ranks fit than the running gang has: stop it gracefully to restart larger. True if it is stopping."""
    size = len(gang)
    if not cycle.seen.spec.elastic or resizing(cycle) or not all(v.state == PodState.RUNNING for v in verdicts) \
            or cycle.seen.workload is not None:  # in a Kueue queue, the size is what Kueue admits
        return resizing(cycle)
    target = attempt_size(cycle, cycle.status.attempt + 1)
    if target <= size:
        return False
    message = (f"{target} ranks fit now (the attempt runs {size}): stopping the gang at its next checkpoint "
               f"(SIGTERM, {cycle.grace}s) to restart it with {target}")
    elastic = cycle.status.elastic or ElasticStatus()
    cycle.status.elastic = elastic.model_copy(update={"resizing_to": target})
    cycle.plan.sigterm([m.name for m in gang if pod_alive(m.pod)], cycle.grace)
    cycle.plan.event("Normal", R.RESIZED, message)
    cycle.condition(R.COND_RUNNING, False, R.RESIZED, message)
    return True
