"""Starting attempts, suspending and reopening jobs, what a live attempt reports, and pods that belong to no attempt
the planner follows (strays)."""

from __future__ import annotations

import json

from . import reasons as R
from .builders import build_pods, build_service, mean_time_between_preemptions
from .classify import PodState, Verdict
from .elastic_policy import attempt_size as elastic_size
from .elastic_policy import started as elastic_started
from .fallback_policy import fallback_patch
from .history import history_start
from .kueue import apply_placement
from .kueue_policy import admission
from .models import AttemptPolicy, OverrideRecord, Phase, Result, TrainingJobSpec, WorkerStatus
from .planning import Cycle, Member, attempt_of, condition_reason, iso, node_name, parse_iso, pod_alive, terminal

RESTART_REASONS = {Result.PREEMPTED: R.RESTART_PREEMPTED, Result.FAILED: R.RESTART_FAILED,
                   Result.SUSPENDED: R.RESTART_RESUMED, Result.NOT_STARTED: R.RESTART_PREEMPTED}


def restart_reason(cycle: Cycle) -> str:
    last = cycle.status.last_outcome
    if last is not None and last.reason == R.RESIZED:
        return R.RESTART_RESIZED
    return RESTART_REASONS.get(last.result, R.RESTART_NONE) if last is not None else R.RESTART_NONE


def start_attempt(cycle: Cycle, attempt: int, reason: str) -> bool:
    """Plan the pods of `attempt` unless the job is suspended or the spec cannot be acted on."""
    seen, st = cycle.seen, cycle.status
    if seen.spec.suspend:
        suspended(cycle)
        return False
    if seen.problem is not None:
        cycle.condition(R.COND_SPEC_RESOLVED, False, seen.problem.reason, seen.problem.message)
        st.message = seen.problem.message
        cycle.plan.event("Warning", seen.problem.reason, seen.problem.message)
        retry = seen.problem.retry_after_seconds
        cycle.plan.wake_in(retry if retry is not None else cycle.settings.problem_retry_seconds)
        return False
    allowed, place = admission(cycle)
    if not allowed:  # waiting in a Kueue queue: the Admitted condition says why
        return False
    spec = seen.spec if place is None else seen.spec.model_copy(
        update={"template": apply_placement(seen.spec.template, place)})
    running = (cycle.now - parse_iso(st.start_time)).total_seconds() if st.start_time else 0.0
    mtbp = mean_time_between_preemptions(running, st.preemptions)
    size = elastic_size(cycle, attempt)
    cycle.plan.creates = build_pods(seen.job, spec, attempt, reason, seen.resume, mtbp, cycle.now,
                                    fallback_patch(cycle), size)
    names = [pod["metadata"]["name"] for pod in cycle.plan.creates]
    if seen.spec.ranked or size > 1:
        cycle.plan.service = build_service(seen.job)
    elastic_started(cycle, attempt, size, st.world_size if attempt > 0 else None)
    cycle.condition(R.COND_SPEC_RESOLVED, True, R.SPEC_VALID, "storage and template resolved")
    cycle.condition(R.COND_BACKOFF, False, R.RESUBMITTED, "")
    if st.phase == Phase.SUSPENDED:
        cycle.condition(R.COND_SUSPENDED, False, R.RESUMED_BY_USER, "resumed")
    if st.phase != Phase.PREEMPTED or reason != R.RESTART_PREEMPTED:
        st.phase = Phase.PENDING
    st.policy = attempt_policy(seen.spec)
    policy_condition(cycle)
    history_start(cycle, attempt, names)
    st.overrides = [r if r.attempt is not None else r.model_copy(update={"attempt": attempt}) for r in st.overrides]
    st.attempt, st.active_pod, st.message = attempt, names[0], None
    st.attempt_start_step = st.last_checkpoint.step if st.last_checkpoint is not None else None
    st.world_size = size
    st.workers = [WorkerStatus(rank=rank, pod=name) for rank, name in enumerate(names)] \
        if seen.spec.ranked or size > 1 else []
    verb = "Created" if reason == R.RESTART_NONE else f"Resubmitted ({reason})"
    what = f"pod {names[0]}" if len(names) == 1 else f"{len(names)} pods ({names[0]}, ...)"
    cycle.plan.event("Normal", R.RESUBMITTED if reason != R.RESTART_NONE else R.PODS_STARTING,
                     f"{verb} {what} for attempt {attempt}")
    return True


def record_override(cycle: Cycle) -> None:
    """status.overrides: each spec change made with `kubectl ckpt resume|restart -f/--set`, recorded once."""
    raw = cycle.seen.annotations.get(R.ANNOTATION_OVERRIDE)
    if not raw:
        return
    try:
        record = OverrideRecord.model_validate_json(raw)
    except ValueError:
        return  # not ours to judge: the annotation is the plugin's
    st = cycle.status
    if any(known.time == record.time and known.command == record.command for known in st.overrides):
        return
    st.overrides = [*st.overrides, record.model_copy(update={"generation": cycle.seen.generation})][-20:]
    changes = ", ".join(f"{key}={json.dumps(value)[:80]}" for key, value in record.changes.items()) or "no change"
    cycle.plan.event("Normal", R.SPEC_OVERRIDDEN, f"kubectl ckpt {record.command}: {changes}")


def reopen(cycle: Cycle, request: str) -> None:
    """`kubectl ckpt resume` of a Succeeded or Failed job: a fresh budget, and the next attempt resumes from the
    newest checkpoint (e.g. with more steps set by an override)."""
    st = cycle.status
    was = st.phase.value
    st.resume_request, st.failures, st.attempts_without_progress = request, 0, 0
    st.completion_time, st.message, st.phase = None, None, Phase.PENDING
    cycle.condition(R.COND_FAILED, False, R.RESUMED_BY_USER, "")
    cycle.condition(R.COND_COMPLETE, False, R.RESUMED_BY_USER, "")
    step = st.last_checkpoint.step if st.last_checkpoint is not None else None
    cycle.plan.event("Normal", R.RESUMED_BY_USER, f"resumed after it {was.lower()}: attempt {st.attempt + 1} "
                                                  f"continues from checkpoint step {step}")
    start_attempt(cycle, st.attempt + 1, R.RESTART_RESUMED)


def attempt_policy(spec: TrainingJobSpec) -> AttemptPolicy:
    return AttemptPolicy(keep=spec.checkpoint.keep, interval_seconds=spec.checkpoint.interval_seconds,
                         mount_path=spec.checkpoint.mount_path)


def policy_condition(cycle: Cycle) -> None:
    """PolicyApplied: whether the current attempt runs with the spec's checkpoint policy (a change waits for the
    next attempt: the pod's environment and mounts are fixed at its creation)."""
    running, wanted = cycle.status.policy, attempt_policy(cycle.seen.spec)
    if running is None or running == wanted:
        cycle.condition(R.COND_POLICY_APPLIED, True, R.POLICY_CURRENT, "")
        return
    changes = ", ".join(f"{name} {getattr(running, key)} -> {getattr(wanted, key)}"
                        for key, name in (("keep", "keep"), ("interval_seconds", "intervalSeconds"),
                                          ("mount_path", "mountPath"))
                        if getattr(running, key) != getattr(wanted, key))
    cycle.condition(R.COND_POLICY_APPLIED, False, R.POLICY_NEXT_ATTEMPT,
                    f"checkpoint policy changed ({changes}): attempt {cycle.status.attempt} keeps its own, the next "
                    f"attempt gets it")


def suspended(cycle: Cycle) -> None:
    if cycle.status.phase != Phase.SUSPENDED:
        cycle.plan.event("Normal", R.SUSPENDED_BY_USER, "job suspended; its checkpoints are kept")
    cycle.status.phase = Phase.SUSPENDED
    cycle.condition(R.COND_SUSPENDED, True, R.SUSPENDED_BY_USER, "spec.suspend is true")
    cycle.condition(R.COND_RUNNING, False, R.SUSPENDED_BY_USER, "")
    cycle.plan.idle()


def suspending(cycle: Cycle, gang: list[Member]) -> None:
    """spec.suspend while the attempt runs: SIGTERM to every rank (they checkpoint and exit)."""
    alive = [m.name for m in gang if pod_alive(m.pod)]
    cycle.plan.sigterm(alive, cycle.grace)
    if alive:
        cycle.plan.event("Normal", R.SUSPENDED_BY_USER,
                         f"suspending: SIGTERM to pod {', '.join(alive)}, {cycle.grace}s to checkpoint")
    cycle.status.phase = Phase.SUSPENDED
    cycle.condition(R.COND_SUSPENDED, True, R.SUSPENDING, "waiting for the trainer to checkpoint and exit")


def observe_live(cycle: Cycle, gang: list[Member], verdicts: list[Verdict]) -> None:
    """No rank has ended (or only some succeeded): wait on an unreachable node, or report running or pending."""
    live = [(m, v) for m, v in zip(gang, verdicts, strict=True) if not v.state.ended]
    if _unreachable(cycle, [m for m, _ in live]):
        return
    st = cycle.status
    if all(v.state == PodState.RUNNING for _, v in live):
        finished = f" ({len(gang) - len(live)} finished)" if len(live) < len(gang) else ""
        what = f"pod {live[0][0].name} is running" if len(gang) == 1 else \
            f"{len(live)} of {len(gang)} pods are running{finished}"
        if st.phase != Phase.RUNNING or condition_reason(st, R.COND_RUNNING) != R.POD_RUNNING:
            cycle.plan.event("Normal", R.POD_RUNNING, f"{what} (attempt {st.attempt})")
        st.phase = Phase.RUNNING
        cycle.condition(R.COND_RUNNING, True, R.POD_RUNNING, what)
        cycle.condition(R.COND_PREEMPTED, False, R.POD_RUNNING, "")
        return
    pending = [(m, v) for m, v in live if v.state == PodState.PENDING]
    if not pending:
        return
    if st.phase == Phase.RUNNING:
        st.phase = Phase.PENDING
    member, verdict = next(((m, v) for m, v in pending if v.reason != R.PODS_STARTING), pending[0])
    if verdict.reason != R.PODS_STARTING:  # Unschedulable, ImagePullBackOff, CreateContainerConfigError...
        if condition_reason(st, R.COND_RUNNING) != verdict.reason:
            cycle.plan.event("Warning", verdict.reason, f"pod {member.name} cannot start: {verdict.message}")
        cycle.condition(R.COND_RUNNING, False, verdict.reason, verdict.message[:1000])


def _unreachable(cycle: Cycle, live: list[Member]) -> bool:
    """A live rank's node is NotReady, not lost yet: the pod may well be running; wait, and say so."""
    for member in live:
        node = cycle.seen.nodes.get(node_name(member.pod))
        lost_at = node.lost_at(cycle.settings.node_lost_seconds) if node is not None else None
        if node is None or lost_at is None:
            continue
        message = (f"node {node.name} has not been Ready since {iso(node.not_ready_since or cycle.now)}; pod "
                   f"{member.name} counts as lost at {iso(lost_at)} unless the node recovers")
        if condition_reason(cycle.status, R.COND_RUNNING) != R.NODE_UNREACHABLE:
            cycle.plan.event("Warning", R.NODE_UNREACHABLE, message)
        cycle.condition(R.COND_RUNNING, False, R.NODE_UNREACHABLE, message)
        cycle.plan.wake_in(max(0.5, min(30.0, (lost_at - cycle.now).total_seconds() + 0.5)))
        return True
    return False


def strays(cycle: Cycle, current: list[Member]) -> None:
    """Pods of the job that are no member of the current attempt: an earlier attempt's (a crash between two API
    calls left it alive) is stopped at once; a later attempt's (created by a pass whose status write was lost,
    e.g. to a suspend that landed in between) is stopped gracefully unless this pass creates that attempt again
    (then the create finds it and adopts it). Both are released once they ended."""
    members = {m.name for m in current}
    creating = {pod["metadata"]["name"] for pod in cycle.plan.creates}
    for pod in cycle.seen.pods:
        name = pod["metadata"]["name"]
        if name in members or name in creating:
            continue
        later = attempt_of(pod, cycle.seen.job.name) > cycle.status.attempt
        if pod_alive(pod):
            if later:
                cycle.plan.sigterm([name], cycle.grace)
            else:
                cycle.plan.force_delete(name)
        if terminal(pod) or not later:
            cycle.plan.releases.append(name)
