"""Checkpointer: the facade. `maybe_save` gathers this rank's signals, has the ranks agree (_coordinate), decides
(_decide) and acts; saves go through the save engine (_saver), resumes through _restore."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from . import _restore
from ._coordinate import ROUND_SECONDS, Coordinator, FileHooks, Interrupted, Signals, coordinator_for
from ._decide import Action, Decision, decide
from ._env import DEFAULT_DIR, Environment
from ._errors import CheckpointConfigError, CheckpointError
from ._manifest import SDK_VERSION, Manifest, clean_metrics
from ._notice import CheckpointRequests
from ._pace import Pace
from ._policy import SavePolicy, daly_interval, expected_overhead
from ._ranks import Ranks
from ._retention import Retention
from ._saver import Committed, Ledger, SaveJob, Saver
from ._serialize import Snapshot
from ._sigterm import SIGTERM, grace_left
from ._store import CheckpointInfo, Fence, Store
from .contract import EXIT_PREEMPTED, ExitReason, TerminationMessage, format_time

log = logging.getLogger("ckpt_sdk")
PREEMPTED_EXIT_CODE = EXIT_PREEMPTED
__version__ = SDK_VERSION
SIGTERM_SAVE_MARGIN = 1.5  # a second save on SIGTERM is tried only if 1.5x its measured time fits the grace left
DEADLINE_MARGIN_SECONDS = 3.0  # a time-limited slot: the save must be durable this long before CKPT_DEADLINE
UNMEASURED_SAVE_SECONDS = 2.0  # the save-time estimate before any save was measured
SHARD_WAIT_MIN_SECONDS = 60.0  # how long ranks wait for each other's shards (or rank 0's commit) at least


@runtime_checkable
class Stateful(Protocol):
    """Anything with `state_dict()` and `load_state_dict()` (torch modules and optimizers, RNGState, yours)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckpointConfigError(message)


@dataclass(frozen=True)
class Options:
    """The Checkpointer's arguments over the CKPT_* environment, validated at construction."""

    directory: Path
    retention: Retention
    every_steps: int | None
    every_seconds: float | None
    after: int
    async_save: bool
    handle_sigterm: bool
    exit_on_preemption: bool
    replicated: frozenset[str]
    distributed: bool
    direct_io: bool

    @classmethod
    def validated(cls, env: Environment, directory: str | os.PathLike[str] | None, keep: int | None,
                  every_steps: int | None, every_seconds: float | None, after: int, keep_best: int,
                  metric: str | None, mode: str, replicated: Iterable[str], *, async_save: bool, handle_sigterm: bool,
                  exit_on_preemption: bool, distributed: bool, direct_io: bool) -> Options:
        keep = keep if keep is not None else env.keep or 3
        if every_seconds is None and every_steps is None:
            every_seconds = env.interval_seconds
        _check(keep >= 1, f"keep must be >= 1, got {keep}")
        _check(every_steps is None or every_steps >= 1, f"every_steps must be >= 1, got {every_steps}")
        _check(every_seconds is None or every_seconds > 0, f"every_seconds must be > 0, got {every_seconds}")
        _check(after >= 0, f"after must be >= 0, got {after}")
        _check(keep_best >= 0, f"keep_best must be >= 0, got {keep_best}")
        _check(mode in ("min", "max"), f"mode must be 'min' or 'max', got {mode!r}")
        _check(keep_best == 0 or bool(metric), "keep_best needs metric=<name of a metric passed to save()>")
        _check(not isinstance(replicated, str), "replicated must be a list of state keys, not one string")
        keys = frozenset(replicated)
        _check(all(isinstance(key, str) and key for key in keys), "replicated names top-level state keys")
        _check(isinstance(direct_io, bool), f"direct_io must be True or False, got {direct_io!r}")
        return cls(Path(directory if directory is not None else env.directory or DEFAULT_DIR),
                   Retention(keep, keep_best, metric, mode), every_steps, every_seconds, after, async_save,
                   handle_sigterm, exit_on_preemption, keys, distributed, direct_io)


class Checkpointer:
    """Saves and restores a training state in one job's checkpoint directory.

    Arguments override the CKPT_* environment; everything is validated here, at construction, and the
    directory is claimed for this attempt at once (an older attempt still running can no longer commit).

    With several ranks (torch.distributed initialized, or WORLD_SIZE/RANK set) the same calls on every rank save one
    shard per rank into one checkpoint that rank 0 commits once every shard is durable; `replicated` names top-level
    state keys that are identical on every rank (a DDP model): rank 0 alone writes them, every rank loads them.
    `distributed=False` makes this process save alone, as one rank (the classic `if rank == 0: save`).
    Async saves write their snapshot with O_DIRECT where the file system allows it; `direct_io=False` writes
    through the page cache instead. A save that comes due while an async one is still being written waits for it.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, keep: int | None = None,
                 every_steps: int | None = None, every_seconds: float | None = None, after: int = 0,
                 keep_best: int = 0, metric: str | None = None, mode: str = "min", async_save: bool = False,
                 handle_sigterm: bool = True, exit_on_preemption: bool = True, replicated: Iterable[str] = (),
                 distributed: bool = True, direct_io: bool = True, total_steps: int | None = None) -> None:
        _check(total_steps is None or (isinstance(total_steps, int) and total_steps >= 1),
               f"total_steps must be an int >= 1 (the run's length, for progress and ETA), got {total_steps!r}")
        self.env = env = Environment.read()
        self.options = Options.validated(
            env, directory, keep, every_steps, every_seconds, after, keep_best, metric, mode, replicated,
            async_save=async_save, handle_sigterm=handle_sigterm, exit_on_preemption=exit_on_preemption,
            distributed=distributed, direct_io=direct_io)
        self.directory = self.options.directory
        self.keep = self.options.retention.keep
        self.fence = Fence(env.job_uid, env.job_created, env.attempt)
        self.store = Store(self.directory)
        self.policy = SavePolicy(every_steps, self.options.every_seconds, after, env.mtbp_seconds,
                                 last_time=time.monotonic())
        self.ledger = Ledger()
        self.pace = Pace(total_steps=total_steps)
        self.saver = Saver(self.store, self.fence, direct_io, self._recyclable, self._committed)
        self._requests = CheckpointRequests(env.annotations_file)  # the operator's interruption-notice requests
        self._exit = _ExitRecord()
        self._coordinator: Coordinator | None = None
        self._cleaned_run: str | None = None
        self._resumed_world_size: int | None = None
        self._handles_sigterm = handle_sigterm and SIGTERM.install()
        self._disk("claiming", lambda: self.store.claim(self.fence))
        if self.ranks.coordinator:  # other ranks never clean: a temp they see may be another rank's save
            self._disk("cleaning", lambda: self.store.clean_stale(self.fence))
        atexit.register(self.close)

    # -- public --------------------------------------------------------------------------------------
    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (the next maybe_save saves and exits 143)."""
        return self._handles_sigterm and SIGTERM.event.is_set()

    @property
    def ranks(self) -> Ranks:
        """The ranks saving together now (torch.distributed may be initialized after construction)."""
        return self.coordinator.ranks

    @property
    def coordinator(self) -> Coordinator:
        ranks = Ranks.detect() if self.options.distributed else Ranks()
        if self._coordinator is None or self._coordinator.ranks != ranks:
            hooks = FileHooks(lambda step: self._local_signals(step, due=False), self._round_budget,
                              lambda: self.preempted, self._wait_seconds)
            self._coordinator = coordinator_for(ranks, self.directory, self.fence.token, hooks)
        return self._coordinator

    @property
    def world_size(self) -> int:
        """How many ranks save together now."""
        return self.ranks.world_size

    @property
    def resumed_world_size(self) -> int | None:
        """How many ranks saved the checkpoint this process resumed from (None before a resume, or if there was
        none): with `world_size`, what a script needs to keep its global batch when the gang's size changed."""
        return self._resumed_world_size

    @property
    def last_step(self) -> int | None:
        """The last durable step (saved or resumed) this process knows of."""
        return self.ledger.last_step

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self.store.list()

    def latest(self) -> CheckpointInfo | None:
        found = self.store.list()
        return found[-1] if found else None

    def maybe_save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None) -> bool:
        """Save if the policy says so; on SIGTERM save now, write the termination message and exit 143.

        With several ranks, call it at every step on every rank: they agree on whether to save, and on the step to
        stop at when any of them got SIGTERM (ranks behind train on to it)."""
        coordinator = self.coordinator
        if coordinator.ranks.sharded and not coordinator.ranks.torch and self.policy.time_based:
            raise CheckpointConfigError(
                "several ranks (WORLD_SIZE > 1) without torch.distributed cannot agree on a time-based save: pass "
                "every_steps=N to the Checkpointer, or initialize torch.distributed before the first maybe_save")
        entered = time.monotonic()
        outer = self.pace.enter(step, entered)
        try:
            return self._act(self.decide_at(step), step, state, metrics)
        finally:
            if outer:
                self.pace.leave(step, entered, time.monotonic())

    def decide_at(self, step: int, *, due: bool = True) -> Decision:
        """What every rank does at `step` (a collective with several ranks): the decide and agree half of
        `maybe_save`, for the framework integrations, whose framework saves (`due=False`: it keeps its own cadence)."""
        self.ledger.reached = max(self.ledger.reached or 0, step)
        try:
            agreement = self.coordinator.agree(step, self._local_signals(step, due=due))
        except Interrupted as exc:
            log.warning("ckpt: %s: no checkpoint every rank agrees on can be made now", exc)
            return Decision(Action.EXIT, ExitReason.PREEMPTED)
        return decide(agreement, self.ledger.last_step)

    def exit_preempted(self, reason: ExitReason, step: int) -> None:
        """Say why and exit 143 (the checkpoint is durable, or no better one can be made); for the integrations."""
        self._exit_now(reason, step)

    def answered(self, deadline: float) -> None:
        """A checkpoint request was answered by a save the framework made (for the integrations)."""
        self._requests.answer(deadline)
        self._exit.notice = deadline

    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None,
             metadata: Mapping[str, Any] | None = None, blocking: bool | None = None) -> CheckpointInfo | None:
        """Save `state` as `step` now. Returns the committed checkpoint, or None while an async save is in flight.
        A save in flight is waited for first (never two at once): that wait counts as this save's stall."""
        if not isinstance(state, Mapping):
            raise CheckpointConfigError("state must be a dict of name -> value")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointConfigError(f"step must be an int >= 0 (the number of completed steps), got {step!r}")
        started = time.monotonic()
        outer = self.pace.enter(step, started)  # called directly, not from maybe_save: its time is a stall too
        try:
            self.saver.wait()
            coordinator = self.coordinator
            job = self._job(step, state, metrics, metadata, coordinator, started)
            self.policy.mark(step, started)  # due-ness counts from the snapshot, not from the end of the write
            if blocking is False or (blocking is None and self.options.async_save):
                self.saver.write_async(job)
                return None
            return self.saver.write(job)
        finally:
            if outer:
                self.pace.leave(step, started, time.monotonic())

    def wait(self) -> None:
        """Wait for an in-flight async save; re-raise its error, if any."""
        self.saver.wait()

    def restore(self, state: MutableMapping[str, Any], info: CheckpointInfo | None = None) -> int:
        """Load the newest verifiable checkpoint (or `info`) into `state`; return its step, 0 if none.

        Damage with nothing to fall back to is an error, never a silent start from step 0; a warm start from
        CKPT_RESUME_FROM happens only when this job's directory has no checkpoint at all."""
        self.ledger.touched = True
        started = time.monotonic()
        try:
            step = self._restore(state, info)
        finally:
            self.pace.resume_seconds = time.monotonic() - started
        self.pace.left_at, self.pace.left_step = time.monotonic(), step  # training starts here
        return step

    def _restore(self, state: MutableMapping[str, Any], info: CheckpointInfo | None) -> int:
        source = _restore.Source([info], f"checkpoint {info.path}", explicit=True) if info is not None \
            else _restore.own_directory(self.store)
        if source is None and self.env.resume_from:
            log.info("ckpt: %s has no checkpoint; warm-starting from %s", self.directory, self.env.resume_from)
            source = _restore.warm_start(Path(self.env.resume_from))
        if source is None:
            log.info("ckpt: no checkpoint found in %s; starting from step 0", self.directory)
            self.ledger.resumed = 0
            return 0
        loaded = _restore.restore_from(source, state, self.coordinator, self.ledger.bad)
        self._resumed_world_size = loaded.world_size
        if loaded.world_size != self.ranks.world_size:
            log.info("ckpt: resumed from %s (step %d) saved by %d rank(s), resharded onto %d", loaded.path,
                     loaded.step, loaded.world_size, self.ranks.world_size)
        else:
            log.info("ckpt: resumed from %s (step %d)", loaded.path, loaded.step)
        self.ledger.record(loaded, None, known_good=source.own)  # another job's says nothing of this directory
        self.ledger.resumed = loaded.step
        self.policy.record(loaded.step, time.monotonic(), None)
        return loaded.step

    def write_termination_message(self, reason: str = ExitReason.EXIT.value) -> None:
        """Write {"step": ...} where Kubernetes reads the termination message: only inside a pod, or where
        CKPT_TERMINATION_LOG points. Every rank writes its own pod's (a gang's ranks each say why they ended)."""
        path = self.env.termination_log
        if path is None:
            return
        ledger = self.ledger
        message = TerminationMessage(
            step=ledger.last_step, reason=reason, attempt=self.env.attempt,
            save_seconds=None if ledger.last_save_seconds is None else round(ledger.last_save_seconds, 3),
            time=format_time(ledger.last_time) if ledger.last_time is not None else None,
            reached=max(ledger.reached, ledger.last_step or 0) if ledger.reached is not None else None,
            resumed=ledger.resumed,
            error=SIGTERM.error, warning=self._exit.warning, world_size=ledger.last_world_size,
            checkpoint_requested=format_time(self._exit.notice) if self._exit.notice is not None else None,
            **self._pace_fields())
        try:
            message.write(path)
        except OSError as exc:
            log.debug("ckpt: cannot write termination message to %s: %s", path, exc)

    def _pace_fields(self) -> dict[str, Any]:
        pace = self.pace
        rounded = {"step_seconds": pace.step_seconds, "resume_seconds": pace.resume_seconds,
                   "stall_seconds": pace.stall_seconds if pace.left_step is not None else None}
        return {"total_steps": pace.total_steps,
                **{key: round(value, 4) for key, value in rounded.items() if value is not None}}

    def close(self) -> None:
        """Wait for an in-flight save and a removal under way, and write the termination message (also run at
        interpreter exit)."""
        try:
            self.saver.wait()
        except CheckpointError as exc:
            log.error("ckpt: the last async save failed: %s", exc)
        self.store.wait_pruned()  # a clean exit leaves no temp behind
        if self.ledger.touched:
            reason = self._exit.reason or (ExitReason.PREEMPTED if self.preempted else
                                           ExitReason.ERROR if SIGTERM.error is not None else ExitReason.EXIT)
            self.write_termination_message(reason=reason.value)

    # -- decide -> agree -> act ---------------------------------------------------------------------
    def _local_signals(self, step: int, due: bool = True) -> Signals:
        """What this rank knows now. Before a stop, an in-flight save settles: it may be the one that covers it."""
        stop = self.preempted
        if stop:
            self._settle_inflight(step)
        return Signals(stop=stop, deadline=self._deadline_near(), due=due and self.policy.due(step, time.monotonic()),
                       request=self._requests.pending(), covered=stop and not self._resave_fits())

    def _act(self, decision: Decision, step: int, state: Mapping[str, Any],
             metrics: Mapping[str, float] | None) -> bool:
        action = decision.action
        if action is Action.NOTHING:
            return False
        if action is Action.SAVE:
            self.save(step, state, metrics=metrics)
            if self.saver.in_flight:
                return True
            # agree once more at this step: a SIGTERM during this save makes it the preemption checkpoint
            follow = decide(self.coordinator.agree(step, self._local_signals(step, due=False)), self.ledger.last_step)
            self._act(follow, step, state, metrics)
            return True
        if action is Action.ANSWER_REQUEST:
            assert decision.request is not None
            return self._answer_request(step, state, metrics, decision.request)
        reason = decision.reason or ExitReason.PREEMPTED
        if action is Action.SAVE_AND_EXIT:
            self._settle_inflight(step)
            if self.ledger.last_step != step:
                self._warn_if_short_of_time(step, reason)
                self.save(step, state, metrics=metrics, blocking=True)
        self._exit_now(reason, step)
        return True

    def _answer_request(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None,
                        deadline: float) -> bool:
        """The node got an interruption notice: checkpoint this step now and keep training (the operator moves the
        pod once the checkpoint had its time; the SIGTERM then saves only the steps done since)."""
        self.answered(deadline)
        log.warning("ckpt: interruption notice: checkpoint requested before %s (%.0fs left); saving step %d now",
                    format_time(deadline), deadline - time.time(), step)
        self._settle_inflight(step)
        if self.ledger.last_step == step:
            return False
        self._warn_if_short_of_time(step, ExitReason.CHECKPOINT)
        self.save(step, state, metrics=metrics, blocking=True)
        return True

    def _exit_now(self, reason: ExitReason, step: int) -> None:
        """The checkpoint is durable (or no better one can be made): say so, and exit 143."""
        last = self.ledger.last_step
        if last is not None and last < step and reason is ExitReason.PREEMPTED:
            log.warning("ckpt: no save of step %d fits (or every rank could make) before the grace period ends: step "
                        "%d is the preemption checkpoint (%d steps redone)", step, last, step - last)
        what = "preempted" if reason is ExitReason.PREEMPTED else "time-limited slot ending"
        log.warning("ckpt: %s; checkpoint of step %s is durable, exiting %d (grace period %.0fs)", what, last,
                    PREEMPTED_EXIT_CODE, self.env.grace_period_seconds)
        self._exit.reason = reason
        self.write_termination_message(reason=reason.value)
        if self.options.exit_on_preemption:
            self.coordinator.leave()
            raise SystemExit(PREEMPTED_EXIT_CODE)

    def _settle_inflight(self, step: int) -> None:
        """Before a last save (SIGTERM, deadline, request): wait for an in-flight async save; if it failed, log it
        (the caller then saves `step` itself) instead of letting its error end the process."""
        try:
            self.saver.wait()
        except Exception as exc:
            log.error("ckpt: the async save in flight failed (%s); saving step %d now", exc, step)

    # -- time ----------------------------------------------------------------------------------------
    def _save_estimate(self) -> float:
        return self.policy.write_cost or self.policy.save_cost or UNMEASURED_SAVE_SECONDS

    def _resave_fits(self) -> bool:
        """After SIGTERM: whether another save fits, if one that ended after the signal already covers it."""
        finished = self.ledger.finished_at
        if SIGTERM.arrived is None or finished is None or finished < SIGTERM.arrived:
            return True
        left = grace_left(self.env.grace_period_seconds) or 0.0
        return SIGTERM_SAVE_MARGIN * (self.policy.write_cost or 0.0) < left

    def _deadline_near(self) -> bool:
        """True once a save started now would only just be durable before CKPT_DEADLINE (with a margin)."""
        deadline = self.env.deadline
        if deadline is None:
            return False
        return time.time() >= deadline - (SIGTERM_SAVE_MARGIN * self._save_estimate() + DEADLINE_MARGIN_SECONDS)

    def _time_left(self, signals: Signals | None = None) -> tuple[float, str] | None:
        """The time before the nearest known end (SIGKILL after SIGTERM, a notice's deadline, the slot's end)."""
        limits = []
        grace = grace_left(self.env.grace_period_seconds)
        if grace is not None and (signals is None or signals.stop) and self.preempted:
            limits.append((grace, "the grace period ends (SIGKILL)"))
        request = signals.request if signals is not None else self._exit.notice
        if request is not None:
            limits.append((request - time.time(), "the node's interruption deadline"))
        if self.env.deadline is not None and (signals is None or signals.deadline):
            limits.append((self.env.deadline - time.time(), "the time-limited slot ends"))
        return min(limits) if limits else None

    def _round_budget(self, signals: Signals) -> float:
        """How long ranks meeting through files wait for each other before acting on `signals`."""
        left = self._time_left(signals)
        if left is None:
            return ROUND_SECONDS
        return max(1.0, left[0] - SIGTERM_SAVE_MARGIN * self._save_estimate())

    def _wait_seconds(self) -> float:
        return max(SHARD_WAIT_MIN_SECONDS, 5 * (self.policy.write_cost or 0.0))

    def _warn_if_short_of_time(self, step: int, reason: ExitReason) -> None:
        """Before a save that may not finish in time: say so in the log and in the termination message (written
        first, so it is there even if the save is killed), then try anyway."""
        left = self._time_left()
        estimate = self._save_estimate()
        if left is None or estimate <= left[0]:
            return
        durable = f"step {self.ledger.last_step}" if self.ledger.last_step is not None else "none"
        self._exit.warning = (f"a save takes about {estimate:.1f}s and {max(0.0, left[0]):.1f}s are left before "
                              f"{left[1]}: trying to save step {step} anyway; the last durable checkpoint is "
                              f"{durable}")
        log.warning("ckpt: %s", self._exit.warning)
        self.write_termination_message(reason=reason.value)

    # -- saving --------------------------------------------------------------------------------------
    def _job(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None,
             metadata: Mapping[str, Any] | None, coordinator: Coordinator, started: float) -> SaveJob:
        ranks = coordinator.ranks
        if ranks.sharded and not ranks.coordinator and self.options.replicated:
            state = {key: value for key, value in state.items() if key not in self.options.replicated}
        run = coordinator.run_id() if ranks.sharded else ""
        if ranks.sharded and ranks.coordinator and self._cleaned_run != run:  # once the ranks agreed on their run:
            self._disk("cleaning", lambda: self.store.clean_stale(self.fence, run))  # other runs' temps are stale
            self._cleaned_run = run
        self.saver.save_number += 1
        manifest = Manifest(step=int(step), attempt=self.env.attempt, incarnation=self.fence.incarnation,
                            time=time.time(), job=self.env.job_name, namespace=self.env.namespace,
                            metrics=clean_metrics(metrics), metadata=dict(metadata or {}))
        return SaveJob(Snapshot(state), manifest, started, None, coordinator, run, self.saver.save_number,
                       on_main_thread=True, replicated=tuple(sorted(self.options.replicated)),
                       wait_seconds=self._wait_seconds())

    def _recyclable(self, listed: list[CheckpointInfo], step: int) -> CheckpointInfo | None:
        return self.options.retention.recyclable(listed, step, self.ledger.good, self.ledger.bad)

    def _committed(self, done: Committed) -> None:
        """Book-keeping once a save is committed: costs, policy, log, termination message, pruning (rank 0)."""
        cost = time.monotonic() - done.job.started
        self.ledger.record(done.info, cost)
        self.policy.measured(cost if done.job.stall is None else done.job.stall, cost)
        self.write_termination_message(reason=ExitReason.CHECKPOINT.value)
        if done.listed is None:
            return
        self._log_policy(done.info.step, cost, done.job.snapshot.nbytes)
        for info in self.options.retention.doomed(done.listed, done.info.step, self.ledger.bad):
            log.debug("ckpt: pruning %s", info.path.name)
            self._disk("pruning", functools.partial(self.store.delete, info, background=True))

    def _log_policy(self, step: int, cost: float, nbytes: int) -> None:
        grace = self.env.grace_period_seconds
        policy = self.policy
        if policy.automatic and policy.save_cost is not None:
            interval = policy.interval_seconds() or 0.0
            log.info("ckpt: saved step %d (%.1f MB) in %.3fs; automatic interval %.1fs (Young/Daly %.1fs, MTBP "
                     "%.0fs), expected overhead %.2f%%", step, nbytes / 1e6, cost, interval,
                     daly_interval(policy.save_cost, policy.mtbp_seconds), policy.mtbp_seconds,
                     100 * expected_overhead(interval, policy.save_cost, policy.mtbp_seconds))
        else:
            log.info("ckpt: saved step %d (%.1f MB) in %.3fs", step, nbytes / 1e6, cost)
        if cost > 0.8 * grace:
            log.warning("ckpt: the last save took %.1fs, close to or over the %.0fs grace period: a save on SIGTERM "
                        "may be killed; raise preemption.gracePeriodSeconds or save less", cost, grace)

    def _disk(self, doing: str, action: Callable[[], object]) -> None:
        """Run a filesystem step; an OSError becomes a CheckpointError that names the directory."""
        try:
            action()
        except OSError as exc:
            raise CheckpointError(f"{doing} checkpoint directory {self.directory} failed: {exc}") from exc


@dataclass
class _ExitRecord:
    """Why this process is ending, for the termination message."""

    reason: ExitReason | None = None  # set when it exits on purpose (preempted, deadline)
    warning: str | None = None  # a save was tried with less time left than it needs
    notice: float | None = None  # the deadline of the last checkpoint request answered


_default: Checkpointer | None = None


def default_checkpointer() -> Checkpointer:
    """The process-wide Checkpointer configured from the CKPT_* environment (created on first use)."""
    global _default
    if _default is None:
        _default = Checkpointer()
    return _default


def maybe_resume(state: MutableMapping[str, Any], ckpt: Checkpointer | None = None) -> int:
    """Load the newest complete checkpoint into `state` in place; return its step, or 0 if there is none."""
    return (ckpt or default_checkpointer()).restore(state)
