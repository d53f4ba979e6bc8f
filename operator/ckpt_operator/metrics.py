"""Prometheus metrics of the operator (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
PREEMPTIONS = Counter("ckpt_operator_preemptions_total", "Attempts that ended in a preemption",
                      ["namespace", "reason"], registry=REGISTRY)
FAILURES = Counter("ckpt_operator_failures_total", "Attempts that ended in an application failure",
                   ["namespace"], registry=REGISTRY)
RESUBMISSIONS = Counter("ckpt_operator_resubmissions_total", "Pods created to continue a job",
                        ["namespace", "reason"], registry=REGISTRY)
NOTICES = Counter("ckpt_operator_interruption_notices_total",
                  "Interruption notices (node taints) acted on: a checkpoint requested, then a migration",
                  ["namespace", "taint"], registry=REGISTRY)
NOT_STARTED = Counter("ckpt_operator_not_started_total",
                      "Attempts whose pods could not all start in time (no capacity, or stuck starting): no budget "
                      "is spent", ["namespace", "reason"], registry=REGISTRY)
GOODPUT_SECONDS = Counter("ckpt_operator_goodput_seconds_total",
                          "TrainingJobs' wall time by use, accounted when an attempt ends: useful, redone (steps "
                          "trained again), saving (training waiting on saves), restart, queued", ["namespace", "kind"],
                          registry=REGISTRY)
JOBS = Gauge("ckpt_operator_jobs", "TrainingJobs by phase", ["namespace", "phase"], registry=REGISTRY)
RESUBMIT_LATENCY = Histogram("ckpt_operator_resubmission_latency_seconds",
                             "From an attempt's end being observed to the next pod's creation",
                             ["namespace"], buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600), registry=REGISTRY)
RECONCILE_ERRORS = Counter("ckpt_operator_reconcile_errors_total", "Reconciliations that raised",
                           registry=REGISTRY)
RECONCILES = Counter("ckpt_operator_reconciles_total", "Passes of the planner over one TrainingJob",
                     registry=REGISTRY)
API_REQUESTS = Counter("ckpt_operator_api_requests_total", "Requests the operator's client sent (watches excluded)",
                       ["verb"], registry=REGISTRY)
EVENTS_DROPPED = Counter("ckpt_operator_events_dropped_total",
                         "Events not posted: an object's spam filter (25, then one per 5 minutes) or a full queue",
                         ["why"], registry=REGISTRY)

_phases: dict[str, tuple[str, str]] = {}  # job uid -> (namespace, phase)


def record_counter(metric: str, namespace: str, reason: str) -> None:
    if metric == "preemptions":
        PREEMPTIONS.labels(namespace, reason).inc()
    elif metric == "failures":
        FAILURES.labels(namespace).inc()
    elif metric == "resubmissions":
        RESUBMISSIONS.labels(namespace, reason).inc()
    elif metric == "notices":
        NOTICES.labels(namespace, reason).inc()
    elif metric == "not_started":
        NOT_STARTED.labels(namespace, reason).inc()


def set_phase(uid: str, namespace: str, phase: str | None) -> None:
    """Track a job's phase (None: deleted): the jobs-by-phase gauge moves by one, only on a change."""
    old = _phases.get(uid)
    new = (namespace, phase) if phase is not None else None
    if old == new:
        return
    if old is not None:
        JOBS.labels(*old).dec()
    if new is not None:
        JOBS.labels(*new).inc()
        _phases[uid] = new
    else:
        _phases.pop(uid, None)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)
