"""Checkpointer: the save policy, SIGTERM handling, retention, async saves and restore."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import mmap
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol, runtime_checkable

from . import _serialize, _tree
from ._env import DEFAULT_DIR, Environment
from ._errors import (
    CheckpointConfigError,
    CheckpointError,
    CorruptCheckpointError,
    FencedError,
    IncompatibleCheckpointError,
)
from ._notice import CheckpointRequests, stamp
from ._policy import SavePolicy, daly_interval, expected_overhead
from ._ranks import Ranks, wait_for
from ._storage import (
    MANIFEST,
    SHARDED_FORMAT,
    CheckpointInfo,
    Fence,
    Store,
    hard_linked,
    is_disk_full,
    read_manifest,
    shard_prefix,
)

log = logging.getLogger("ckpt_sdk")
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM
__version__ = "0.1.0"
SIGTERM_SAVE_MARGIN = 1.5  # a second save on SIGTERM is tried only if 1.5x its measured time fits the grace left
DEADLINE_MARGIN_SECONDS = 3.0  # a time-limited slot: the save must be durable this long before CKPT_DEADLINE
UNMEASURED_SAVE_SECONDS = 2.0  # the save-time estimate before any save was measured
SHARD_WAIT_MIN_SECONDS = 60.0  # how long ranks wait for each other's shards (or rank 0's commit) at least


@runtime_checkable
class Stateful(Protocol):
    """Anything with `state_dict()` and `load_state_dict()` (torch modules and optimizers, RNGState, yours)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


class _Sigterm:
    """One process-wide SIGTERM handler shared by every Checkpointer; it chains to the handler it replaced.
    It also records an uncaught exception (through a chained sys.excepthook) for the termination message, since
    Kubernetes shows the container's log tail only when that message is empty."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.arrived: float | None = None  # time.monotonic() of the first SIGTERM
        self.installed = False
        self.previous: Callable[[int, FrameType | None], Any] | None = None
        self.error: str | None = None  # the uncaught exception that is ending the process

    def _excepthook(self, previous: Callable[..., Any]) -> Callable[..., Any]:
        def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            self.error = "".join(traceback.format_exception_only(kind, value)).strip()[-1500:]
            previous(kind, value, tb)
        return hook

    def install(self) -> bool:
        if self.installed:
            return True
        sys.excepthook = self._excepthook(sys.excepthook)
        if threading.current_thread() is not threading.main_thread():
            log.warning("ckpt: Checkpointer created off the main thread; SIGTERM is not handled")
            return False
        previous = signal.getsignal(signal.SIGTERM)
        self.previous = previous if callable(previous) else None
        signal.signal(signal.SIGTERM, self._handle)
        self.installed = True
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.arrived is None:
            self.arrived = time.monotonic()
        self.event.set()  # only a flag: the save happens at the next maybe_save
        if self.previous is not None:
            self.previous(signum, frame)


_SIGTERM = _Sigterm()


class Checkpointer:
    """Saves and restores a training state in one job's checkpoint directory.

    Arguments override the CKPT_* environment; everything is validated here, at construction, and the
    directory is claimed for this attempt at once (an older attempt still running can no longer commit).

    With several ranks (torch.distributed initialized, or WORLD_SIZE/RANK set) the same calls on every rank save one
    shard per rank into one checkpoint that rank 0 commits once every shard is durable; `replicated` names top-level
    state keys that are identical on every rank (a DDP model): rank 0 alone writes them, every rank loads them.
    `distributed=False` makes this process save alone, as one rank (the classic `if rank == 0: save`).
    Async saves write their snapshot with O_DIRECT where the file system allows it; `direct_io=False` writes
    through the page cache instead.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        keep: int | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        after: int = 0,
        keep_best: int = 0,
        metric: str | None = None,
        mode: str = "min",
        async_save: bool = False,
        handle_sigterm: bool = True,
        exit_on_preemption: bool = True,
        replicated: Iterable[str] = (),
        distributed: bool = True,
        direct_io: bool = True,
    ) -> None:
        env = Environment.read()
        self.env = env
        self.directory = Path(directory if directory is not None else env.directory or DEFAULT_DIR)
        self.keep = keep if keep is not None else env.keep or 3
        if every_seconds is None and every_steps is None:
            every_seconds = env.interval_seconds
        _check(self.keep >= 1, f"keep must be >= 1, got {self.keep}")
        _check(every_steps is None or every_steps >= 1, f"every_steps must be >= 1, got {every_steps}")
        _check(every_seconds is None or every_seconds > 0, f"every_seconds must be > 0, got {every_seconds}")
        _check(after >= 0, f"after must be >= 0, got {after}")
        _check(keep_best >= 0, f"keep_best must be >= 0, got {keep_best}")
        _check(mode in ("min", "max"), f"mode must be 'min' or 'max', got {mode!r}")
        _check(keep_best == 0 or bool(metric), "keep_best needs metric=<name of a metric passed to save()>")
        self.keep_best, self.metric, self.mode = keep_best, metric, mode
        _check(not isinstance(replicated, str), "replicated must be a list of state keys, not one string")
        self.replicated = frozenset(replicated)
        _check(all(isinstance(key, str) and key for key in self.replicated), "replicated names top-level state keys")
        self.distributed = distributed
        self.ranks = self._detect_ranks()
        self._save_number = 0  # counts this attempt's saves the same way on every rank: names the shared temp
        self._stop_step: int | None = None  # without torch.distributed: the step every rank agreed to stop at
        self.async_save = async_save
        _check(isinstance(direct_io, bool), f"direct_io must be True or False, got {direct_io!r}")
        self.direct_io = direct_io
        self.exit_on_preemption = exit_on_preemption
        self.attempt = env.attempt
        self.fence = Fence(env.job_uid, env.job_created, env.attempt)
        self.policy = SavePolicy(every_steps, every_seconds, after, env.mtbp_seconds, last_time=time.monotonic())
        self.store = Store(self.directory)
        self.last_step: int | None = None  # last durable step (saved or resumed)
        self.last_save_seconds: float | None = None
        self._last_time: float | None = None  # the manifest time of last_step
        self._finished_at: float | None = None  # time.monotonic() when the last save became durable
        self._good: set[int] = set()  # steps known good: written by this process or verified by a load
        self._bad: set[int] = set()  # steps that failed verification: never loaded, recycled or counted
        self._touched = False  # resumed or saved: the termination message is owed at exit
        self._exit_reason: str | None = None  # why this process is exiting on purpose ("preempted", "deadline")
        self._lock = threading.Lock()
        self._inflight: threading.Thread | None = None
        self._inflight_error: BaseException | None = None
        self._arena: mmap.mmap | None = None
        self._requests = CheckpointRequests(env.annotations_file)  # the operator's interruption-notice requests
        self._notice_deadline: float | None = None  # the deadline of the last request answered
        self._warning: str | None = None  # a save was tried with less time left than it needs
        self._reached: int | None = None  # the furthest step given to maybe_save: work past the last checkpoint
        self._handles_sigterm = handle_sigterm and _SIGTERM.install()
        self._disk("claiming", self._claim)
        atexit.register(self.close)

    def _detect_ranks(self) -> Ranks:
        """The ranks saving together; one alone with `distributed=False` (a script that saves on rank 0 only)."""
        return Ranks.detect() if self.distributed else Ranks()

    def _claim(self) -> None:
        self.store.claim(self.fence)
        if self.ranks.coordinator:  # other ranks never clean: a temp they see may be another rank's save
            self.store.clean_stale(self.fence, shared=self.ranks.sharded)

    # -- public --------------------------------------------------------------------------------------
    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (the next maybe_save saves and exits 143)."""
        return self._handles_sigterm and _SIGTERM.event.is_set()

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self.store.list()

    def latest(self) -> CheckpointInfo | None:
        found = self.store.list()
        return found[-1] if found else None

    def maybe_save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None) -> bool:
        """Save if the policy says so; on SIGTERM save now, write the termination message and exit 143.

        A due save while an async one is still being written is deferred to a later step, never waited for.
        With several ranks, call it at the same step on every rank: they agree on whether to save and on the step
        to stop at when any of them got SIGTERM."""
        self.ranks = self._detect_ranks()
        self._reached = max(self._reached or 0, step)
        if self.ranks.sharded:
            return self._maybe_save_ranked(step, state, metrics)
        if self.preempted:
            return self._save_on_sigterm(step, state, metrics)
        if self._deadline_near():
            return self._save_before_deadline(step, state, metrics)
        requested = self._requests.pending()
        if requested is not None:
            return self._save_on_request(step, state, metrics, requested)
        if not self.policy.due(step, time.monotonic()):
            return False
        if self._inflight is not None and self._inflight.is_alive():
            return False
        self.save(step, state, metrics=metrics)
        if self.preempted and self.last_step == step:  # SIGTERM came during this save: it is the one
            self._exit_preempted(step)
        return True

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        blocking: bool | None = None,
    ) -> CheckpointInfo | None:
        """Save `state` as `step` now. Returns the committed checkpoint, or None while an async save is in flight."""
        if not isinstance(state, Mapping):
            raise CheckpointConfigError("state must be a dict of name -> value")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointConfigError(f"step must be an int >= 0 (the number of completed steps), got {step!r}")
        self.wait()  # never two saves in flight
        self.ranks = self._detect_ranks()
        started = time.monotonic()
        if self.ranks.sharded and not self.ranks.coordinator and self.replicated:
            state = {key: value for key, value in state.items() if key not in self.replicated}
        snapshot = _serialize.Snapshot(state)
        manifest = self._manifest(step, metrics, metadata)
        self.policy.mark(step, started)  # due-ness counts from the snapshot, not from the end of the write
        self._save_number += 1
        if blocking is False or (blocking is None and self.async_save):
            self._arena = snapshot.detach(self._arena)
            stall = time.monotonic() - started
            self._inflight = threading.Thread(
                target=self._write_async, args=(snapshot, step, manifest, started, stall), name="ckpt-save",
                daemon=True)
            self._inflight.start()
            log.debug("ckpt: async save of step %d started after %.3fs stall", step, stall)
            return None
        return self._write(snapshot, step, manifest, started, None, collective=True)

    def wait(self) -> None:
        """Wait for an in-flight async save; re-raise its error, if any."""
        thread = self._inflight
        if thread is not None:
            thread.join()
            self._inflight = None
        error, self._inflight_error = self._inflight_error, None
        if error is not None:
            raise error

    def restore(self, state: MutableMapping[str, Any], info: CheckpointInfo | None = None) -> int:
        """Load the newest verifiable checkpoint (or `info`) into `state`; return its step, 0 if none.

        Damage with nothing to fall back to is an error, never a silent start from step 0; a warm start from
        CKPT_RESUME_FROM happens only when this job's directory has no checkpoint at all."""
        self._touched = True
        if info is not None:
            return self._restore_from([info], state, f"checkpoint {info.path}", explicit=True)
        listing = self.store.scan()
        if listing.newer:
            raise IncompatibleCheckpointError(listing.newer[-1][1])
        if listing.good or listing.damaged:
            names = [c.path.name for c in listing.good] + [name for name, _ in listing.damaged]
            return self._restore_from(list(reversed(listing.good)), state, f"{self.directory} ({', '.join(names)})")
        if self.env.resume_from:
            return self._warm_start(Path(self.env.resume_from), state)
        log.info("ckpt: no checkpoint found in %s; starting from step 0", self.directory)
        return 0

    def write_termination_message(self, reason: str = "exit") -> None:
        """Write {"step": ...} where Kubernetes reads the termination message: only inside a pod, or where
        CKPT_TERMINATION_LOG points. The file is never truncated first, so a reader never sees it empty."""
        path = self.env.termination_log
        if path is None or not self.ranks.coordinator:  # one message per job: rank 0 speaks for the gang
            return
        message: dict[str, Any] = {"step": self.last_step, "reason": reason, "attempt": self.attempt,
                                   "saveSeconds": None if self.last_save_seconds is None
                                   else round(self.last_save_seconds, 3)}
        if self._last_time is not None:
            message["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._last_time))
        if _SIGTERM.error is not None:
            message["error"] = _SIGTERM.error
        if self._reached is not None:
            message["reached"] = max(self._reached, self.last_step or 0)
        if self._notice_deadline is not None:
            message["checkpointRequested"] = stamp(self._notice_deadline)
        if self._warning is not None:
            message["warning"] = self._warning
        try:
            _overwrite(path, json.dumps(message).encode())
        except OSError as exc:
            log.debug("ckpt: cannot write termination message to %s: %s", path, exc)

    def close(self) -> None:
        """Wait for an in-flight save and write the termination message (also run at interpreter exit)."""
        try:
            self.wait()
        except CheckpointError as exc:
            log.error("ckpt: the last async save failed: %s", exc)
        if self._touched:
            reason = self._exit_reason or ("preempted" if self.preempted else "error" if _SIGTERM.error is not None
                                           else "exit")
            self.write_termination_message(reason=reason)

    # -- SIGTERM -------------------------------------------------------------------------------------
    def _save_on_sigterm(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None) -> bool:
        self._settle_inflight(step)  # an in-flight async save may already be the one we need
        if self.last_step != step and self._second_save_fits(step):
            self._warn_if_short_of_time(step, "preempted")
            self.save(step, state, metrics=metrics, blocking=True)
        self._exit_preempted(self.last_step if self.last_step is not None else step)
        return True

    def _settle_inflight(self, step: int) -> None:
        """Before a last save (SIGTERM, deadline): wait for an in-flight async save; if it failed, log it (the
        caller then saves `step` itself) instead of letting its error end the process."""
        try:
            self.wait()
        except Exception as exc:
            log.error("ckpt: the async save in flight failed (%s); saving step %d now", exc, step)

    def _second_save_fits(self, step: int) -> bool:
        """After SIGTERM: save `step` unless a save that ended after the signal already covers it and another
        one would not fit in the grace period left (then that save is the preemption checkpoint)."""
        arrived = _SIGTERM.arrived
        if arrived is None or self._finished_at is None or self._finished_at < arrived:
            return True
        left = self.env.grace_period_seconds - (time.monotonic() - arrived)
        needed = SIGTERM_SAVE_MARGIN * (self.policy.write_cost or 0.0)
        if needed < left:
            return True
        log.warning("ckpt: SIGTERM arrived during the save of step %s; another save (~%.1fs) would not fit the "
                    "%.1fs left, so step %s is the preemption checkpoint (%d steps redone)",
                    self.last_step, needed, left, self.last_step, step - (self.last_step or 0))
        return False

    def _exit_preempted(self, step: int, reason: str = "preempted") -> None:
        log.warning("ckpt: %s; checkpoint of step %d is durable, exiting %d (grace period %.0fs)",
                    "preempted" if reason == "preempted" else "time-limited slot ending", step, PREEMPTED_EXIT_CODE,
                    self.env.grace_period_seconds)
        self._exit_reason = reason
        self.write_termination_message(reason=reason)
        if self.exit_on_preemption:
            if self.ranks.sharded and self.ranks.torch:  # every rank is here: leave the group together
                self.ranks.leave()
            raise SystemExit(PREEMPTED_EXIT_CODE)

    # -- time-limited slots (CKPT_DEADLINE) -----------------------------------------------------------
    def _save_estimate(self) -> float:
        return self.policy.write_cost or self.policy.save_cost or UNMEASURED_SAVE_SECONDS

    def _deadline_near(self) -> bool:
        """True once a save started now would only just be durable before CKPT_DEADLINE (with a margin)."""
        deadline = self.env.deadline
        if deadline is None:
            return False
        needed = SIGTERM_SAVE_MARGIN * self._save_estimate() + DEADLINE_MARGIN_SECONDS
        return time.time() >= deadline - needed

    def _save_before_deadline(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None
                              ) -> bool:
        """The slot ends soon: checkpoint this step and exit 143, so the next slot resumes with no step lost."""
        self._settle_inflight(step)
        if self.last_step != step:
            self._warn_if_short_of_time(step, "deadline")
            self.save(step, state, metrics=metrics, blocking=True)
        self._exit_preempted(step, reason="deadline")
        return True

    # -- interruption notices (the operator's checkpoint requests) ---------------------------------------
    def _save_on_request(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None,
                         deadline: float) -> bool:
        """The node got an interruption notice: checkpoint this step now and keep training (the operator moves the
        pod once the checkpoint had its time; the SIGTERM then saves only the steps done since)."""
        self._requests.answer(deadline)
        self._notice_deadline = deadline
        log.warning("ckpt: interruption notice: checkpoint requested before %s (%.0fs left); saving step %d now",
                    stamp(deadline), deadline - time.time(), step)
        self._settle_inflight(step)
        if self.last_step == step:
            return False
        self._warn_if_short_of_time(step, "checkpoint")
        self.save(step, state, metrics=metrics, blocking=True)
        return True

    def _time_left(self) -> tuple[float, str] | None:
        """The time before the nearest known end (SIGKILL after SIGTERM, a notice's deadline, the slot's end)."""
        limits = []
        if self.preempted and _SIGTERM.arrived is not None:
            limits.append((self.env.grace_period_seconds - (time.monotonic() - _SIGTERM.arrived),
                           "the grace period ends (SIGKILL)"))
        if self._notice_deadline is not None:
            limits.append((self._notice_deadline - time.time(), "the node's interruption deadline"))
        if self.env.deadline is not None:
            limits.append((self.env.deadline - time.time(), "the time-limited slot ends"))
        return min(limits) if limits else None

    def _warn_if_short_of_time(self, step: int, reason: str) -> None:
        """Before a save that may not finish in time: say so in the log and in the termination message (written
        first, so it is there even if the save is killed), then try anyway."""
        left = self._time_left()
        estimate = self._save_estimate()
        if left is None or estimate <= left[0]:
            return
        durable = f"step {self.last_step}" if self.last_step is not None else "none"
        self._warning = (f"a save takes about {estimate:.1f}s and {max(0.0, left[0]):.1f}s are left before "
                         f"{left[1]}: trying to save step {step} anyway; the last durable checkpoint is {durable}")
        log.warning("ckpt: %s", self._warning)
        self.write_termination_message(reason=reason)

    # -- restore -------------------------------------------------------------------------------------
    def _warm_start(self, source: Path, state: MutableMapping[str, Any]) -> int:
        explicit = (source / MANIFEST).exists() or source.name.startswith("step-")
        if explicit:
            if not source.is_dir():
                raise CheckpointError(f"CKPT_RESUME_FROM={source}: no such checkpoint (was it pruned?)")
            info = CheckpointInfo(0, source, {})
            try:
                manifest = read_manifest(source)
                info = CheckpointInfo(int(manifest["step"]), source, manifest)
            except CorruptCheckpointError as exc:
                raise CorruptCheckpointError(f"CKPT_RESUME_FROM: {exc}") from None
            log.info("ckpt: %s has no checkpoint; warm-starting from %s", self.directory, source)
            return self._restore_from([info], state, f"CKPT_RESUME_FROM={source}", explicit=True, own=False)
        listing = Store(source).scan()
        if listing.newer:
            raise IncompatibleCheckpointError(listing.newer[-1][1])
        if not listing.good and not listing.damaged:
            raise CheckpointError(f"CKPT_RESUME_FROM={source} has no checkpoint to warm-start from")
        log.info("ckpt: %s has no checkpoint; warm-starting from %s", self.directory, source)
        return self._restore_from(list(reversed(listing.good)), state, f"CKPT_RESUME_FROM={source}", own=False)

    def _restore_from(self, candidates: list[CheckpointInfo], state: MutableMapping[str, Any], where: str,
                      explicit: bool = False, own: bool = True) -> int:
        """Load the first candidate that verifies; raise CorruptCheckpointError if none does."""
        clobbered: set[int] = set()  # targets a damaged file was read into before its checksum failed
        problems = []
        ranks = self.ranks = self._detect_ranks()
        for info in candidates:
            written: set[int] = set()
            problem: BaseException | None = None
            try:
                tree, tensors = self._load_own(info, state, written, ranks)
                if not isinstance(tree, dict):
                    raise CorruptCheckpointError(f"{info.path}: holds no state dict")
            except (CorruptCheckpointError, OSError) as exc:
                problem = exc
            if ranks.sharded and ranks.torch and not ranks.all_true(problem is None) and problem is None:
                problem = CorruptCheckpointError(f"{info.path}: another rank's shard of it is unusable")
            if ranks.sharded and not ranks.torch and problem is not None:
                raise CorruptCheckpointError(
                    f"rank {ranks.rank} cannot load its shard of {info.path} ({problem}); without torch.distributed "
                    "the ranks cannot agree on an older checkpoint: move it aside to resume from the one before "
                    "(`python -m ckpt_sdk verify DIR` shows the damage)")
            if problem is not None:
                clobbered |= written
                problems.append(f"{info.path.name}: {problem}")
                if own and isinstance(problem, CorruptCheckpointError):
                    self._bad.add(info.step)
                if not explicit:
                    log.warning("ckpt: checkpoint %s is unusable (%s); falling back to an older one", info.path,
                                problem)
                continue
            if clobbered - written:
                raise CorruptCheckpointError(
                    f"a damaged checkpoint was partly read into the state and {info.path.name} does not overwrite "
                    f"all of it; restart the process to load {info.path.name} ({'; '.join(problems)})")
            _tree.restore(state, tree, functools.partial(_loaded_tensor, tensors))
            log.info("ckpt: resumed from %s (step %d)", info.path, info.step)
            if own:
                self._good.add(info.step)
            self.last_step, self._last_time = info.step, info.time or None
            self.policy.record(info.step, time.monotonic(), None)
            return info.step
        raise CorruptCheckpointError(
            f"no loadable checkpoint in {where}: {'; '.join(problems) or 'none'}. Refusing to start over and lose "
            "that training; `python -m ckpt_sdk verify DIR` shows the damage. Move the damaged checkpoints aside "
            "to resume from an older one, or start fresh on purpose (kubectl ckpt restart --fresh).")

    def _load_own(self, info: CheckpointInfo, state: MutableMapping[str, Any], written: set[int], ranks: Ranks
                  ) -> tuple[Any, dict[str, Any]]:
        """Read this rank's part of a checkpoint: the whole of an unsharded one, else its own shard plus the
        replicated keys from rank 0's."""
        if info.world_size != ranks.world_size:
            raise CheckpointConfigError(
                f"{info.path} was saved by {info.world_size} rank(s) and this job runs {ranks.world_size}: a sharded "
                "checkpoint is loaded by as many ranks as wrote it")
        if info.world_size == 1:
            return _serialize.load(info, lambda tree: _tree.tensor_targets(state, tree), written)
        tree, tensors = _serialize.load(info, lambda tree: _tree.tensor_targets(state, tree), written,
                                        shard_prefix(ranks.rank))
        shared = set(info.manifest.get("replicated") or [])
        if shared and ranks.rank != 0:
            def shared_targets(tree0: Any) -> dict[str, Any]:
                return {name: target for name, target in _tree.tensor_targets(state, tree0).items()
                        if name.split("/")[0] in shared}

            tree0, tensors0 = _serialize.load(info, shared_targets, written, shard_prefix(0))
            tree = {**{key: value for key, value in tree0.items() if key in shared}, **tree}
            tensors = {**{name: t for name, t in tensors0.items() if name.split("/")[0] in shared}, **tensors}
        return tree, tensors

    # -- saving --------------------------------------------------------------------------------------
    def _manifest(self, step: int, metrics: Mapping[str, float] | None, metadata: Mapping[str, Any] | None
                  ) -> dict[str, Any]:
        clean: dict[str, float | None] = {}
        for key, value in (metrics or {}).items():
            number = float(value)
            clean[str(key)] = number if math.isfinite(number) else None  # JSON has no NaN; None is never "best"
        return {
            "format": "ckpt-sdk/1", "sdk_version": __version__, "step": int(step), "attempt": self.attempt,
            "incarnation": self.fence.incarnation, "time": time.time(), "job": self.env.job_name,
            "namespace": self.env.namespace, "metrics": clean, "metadata": dict(metadata or {}),
        }

    def _write_async(self, snapshot: _serialize.Snapshot, step: int, manifest: dict[str, Any], started: float,
                     stall: float) -> None:
        try:
            self._write(snapshot, step, manifest, started, stall)
        except BaseException as exc:  # handed to the next wait()
            self._inflight_error = exc

    def _write(self, snapshot: _serialize.Snapshot, step: int, manifest: dict[str, Any], started: float,
               stall: float | None, collective: bool = False) -> CheckpointInfo:
        """Write and commit one save. `collective`: on the main thread, where torch.distributed may be used."""
        if self.ranks.sharded:
            return self._write_sharded(snapshot, step, manifest, started, stall, collective and self.ranks.torch)
        with self._lock:
            before: list[CheckpointInfo] = []
            recycled: CheckpointInfo | None = None
            temp: Path | None = None
            try:
                before = self.store.list()
                recycled = self._recyclable(before, step)
                temp = self.store.new_temp(step, self.fence, recycle=recycled)
                manifest["files"] = snapshot.write(temp, direct=self.direct_io)
                info = self.store.commit(temp, step, self.fence, manifest)
            except FencedError:
                raise
            except OSError as exc:
                if temp is not None:
                    shutil.rmtree(temp, ignore_errors=True)
                raise CheckpointError(self._failure_message(step, exc, recycled)) from exc
            self._saved(info, started, stall, snapshot.nbytes,
                        [c for c in before if c is not recycled and c.step != step] + [info])
            return info

    def _saved(self, info: CheckpointInfo, started: float, stall: float | None, nbytes: int,
               listed: list[CheckpointInfo] | None) -> None:
        """Book-keeping once a save is committed: costs, policy, log, termination message, pruning (`listed`:
        the checkpoints to prune among; None on ranks other than 0, which never prune)."""
        cost = time.monotonic() - started
        self._good.add(info.step)
        self._touched = True
        self.last_step, self.last_save_seconds, self._last_time = info.step, cost, info.time
        self._finished_at = time.monotonic()
        self.policy.measured(cost if stall is None else stall, cost)
        if listed is not None:
            self._log_policy(info.step, cost, nbytes)
            self.write_termination_message(reason="checkpoint")
            self._prune(listed, info)

    def _write_sharded(self, snapshot: _serialize.Snapshot, step: int, manifest: dict[str, Any], started: float,
                       stall: float | None, use_torch: bool) -> CheckpointInfo:
        """One rank's part of a sharded save: its shard into the shared temp, then a barrier (torch.distributed, or
        the shard markers), then rank 0 writes the manifest last and renames; every rank returns once committed."""
        ranks, world = self.ranks, self.ranks.world_size
        timeout = max(SHARD_WAIT_MIN_SECONDS, 5 * (self.policy.write_cost or 0.0))
        with self._lock:
            error: BaseException | None = None
            temp: Path | None = None
            try:
                temp = self.store.shared_temp(step, self.fence, self._save_number)
                files = snapshot.write(temp, shard_prefix(ranks.rank), direct=self.direct_io)
                self.store.write_shard_marker(temp, ranks.rank, files)
            except OSError as exc:
                error = CheckpointError(self._failure_message(step, exc, None))
            if use_torch and not ranks.all_true(error is None) and error is None:
                error = CheckpointError(f"another rank could not write its shard of step {step}; not committed")
            info: CheckpointInfo | None = None
            if ranks.coordinator and error is None and temp is not None:
                try:
                    if not use_torch:
                        shared_temp = temp
                        wait_for(lambda: self.store.shards_done(shared_temp, world), timeout,
                                 f"every rank's shard of step {step}")
                    shards = self.store.read_shards(temp, world)
                    manifest.update({
                        "format": SHARDED_FORMAT, "world_size": world, "replicated": sorted(self.replicated),
                        "shards": {str(rank): sorted(table) for rank, table in shards.items()},
                        "files": {name: meta for table in shards.values() for name, meta in table.items()}})
                    info = self.store.commit(temp, step, self.fence, manifest)
                except (OSError, CheckpointError) as exc:
                    error = exc if isinstance(exc, CheckpointError) else CheckpointError(
                        self._failure_message(step, exc, None))
            if use_torch:
                if not ranks.from_coordinator(info is not None) and error is None:
                    error = CheckpointError(f"rank 0 could not commit step {step}; see its log")
            elif error is None and not ranks.coordinator:
                wait_for(lambda: self.store.committed(step, self.fence) is not None, timeout,
                         f"rank 0 to commit step {step}")
            if error is not None:
                raise error
            if info is None:
                info = self.store.committed(step, self.fence)
                if info is None:
                    raise CheckpointError(f"step {step} was committed and is gone again (fenced out?)")
            self._saved(info, started, stall, snapshot.nbytes,
                        [c for c in self.store.list() if c.step != step] + [info] if ranks.coordinator else None)
            return info

    # -- several ranks ---------------------------------------------------------------------------------
    def _maybe_save_ranked(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None) -> bool:
        """maybe_save with several ranks: every rank decides the same (save now, stop at which step). A due save
        waits for this rank's async save in flight instead of being deferred: ranks must never differ on it."""
        due = self.policy.due(step, time.monotonic())
        if self.ranks.torch:
            requested = self._requests.pending()
            stop, deadline, due_any, high, negative_low, request = self.ranks.reduce_max(
                [int(self.preempted), int(self._deadline_near()), int(due), step, -step, int(requested or 0)])
            if high != -negative_low:
                raise CheckpointConfigError(f"ranks called maybe_save with different steps ({-negative_low} to "
                                            f"{high}); call it at the same step on every rank")
            if stop or deadline:
                if not self.preempted and stop:
                    log.warning("ckpt: another rank got SIGTERM; saving step %d with it", step)
                return self._save_and_stop(step, state, metrics, "preempted" if stop else "deadline")
            if request:  # any rank saw the request: all save this step (and know its deadline from the reduce)
                return self._save_on_request(step, state, metrics, float(request))
            if due_any:
                self.save(step, state, metrics=metrics)
                return True
            return False
        if self.policy.automatic or self.policy.every_seconds is not None:  # step-based: each rank decides alike
            raise CheckpointConfigError(
                "several ranks (WORLD_SIZE > 1) without torch.distributed cannot agree on a time-based save: pass "
                "every_steps=N to the Checkpointer, or initialize torch.distributed before the first maybe_save")
        target = self._stop_step_by_files(step)
        if target is not None:
            if step < target:
                return False  # keep training up to the step the furthest rank stopped at
            return self._save_and_stop(step, state, metrics, "deadline" if self._exit_reason == "deadline"
                                       else "preempted")
        if due:
            self.save(step, state, metrics=metrics)
            return True
        return False

    def _save_and_stop(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None,
                       reason: str) -> bool:
        self._settle_inflight(step)
        if self.last_step != step:
            self.save(step, state, metrics=metrics, blocking=True)
        if self._stop_step is not None and self.ranks.coordinator:
            self._disk("clearing the stop request in", functools.partial(self.store.clear_stop, self.fence))
        self._exit_preempted(step, reason=reason)
        return True

    def _stop_step_by_files(self, step: int) -> int | None:
        """Without torch.distributed: a rank that got SIGTERM (or reaches its deadline) says so with a file; every
        rank then writes the step it is at, and all stop at the furthest one (ranks that never meet in a collective
        can each train on to it). None while nobody asked to stop."""
        if self._stop_step is not None:
            return self._stop_step
        local = self.preempted or self._deadline_near()
        if not local and not self.store.stop_requested(self.fence):
            return None
        if not local:
            log.warning("ckpt: another rank asked to stop; agreeing on the step to save")
        elif not self.preempted:
            self._exit_reason = "deadline"
        world = self.ranks.world_size
        self.store.request_stop(self.fence, self.ranks.rank, step)
        left = self.env.grace_period_seconds - (time.monotonic() - (_SIGTERM.arrived or time.monotonic()))
        try:
            wait_for(lambda: len(self.store.stop_steps(self.fence, world)) == world, max(1.0, left / 3),
                     "every rank to join the stop")
        except CheckpointError as exc:
            log.warning("ckpt: %s; saving the furthest step known", exc)
        self._stop_step = max([step, *self.store.stop_steps(self.fence, world).values()])
        return self._stop_step

    def _failure_message(self, step: int, exc: OSError, recycled: CheckpointInfo | None) -> str:
        """What a failed save left behind, counted from the directory (never a promise it cannot keep)."""
        what = f"out of space ({exc.strerror})" if is_disk_full(exc) else f"failed: {exc}"
        try:
            kept = self.store.list()
        except OSError:
            kept = []
        left = (f"{len(kept)} checkpoint(s) remain, newest step {kept[-1].step}" if kept
                else "no checkpoint remains")
        lost = f"; step {recycled.step}, which was being reused for this save, is gone" if recycled else ""
        return f"saving step {step} under {self.directory}: {what}; {left}{lost}"

    def _log_policy(self, step: int, cost: float, nbytes: int) -> None:
        grace = self.env.grace_period_seconds
        msg = "ckpt: saved step %d (%.1f MB) in %.3fs"
        args: list[Any] = [step, nbytes / 1e6, cost]
        if self.policy.automatic and self.policy.save_cost is not None:
            interval = self.policy.interval_seconds() or 0.0
            overhead = expected_overhead(interval, self.policy.save_cost, self.policy.mtbp_seconds)
            msg += "; automatic interval %.1fs (Young/Daly %.1fs, MTBP %.0fs), expected overhead %.2f%%"
            args += [interval, daly_interval(self.policy.save_cost, self.policy.mtbp_seconds),
                     self.policy.mtbp_seconds, 100 * overhead]
        log.info(msg, *args)
        if cost > 0.8 * grace:
            log.warning("ckpt: the last save took %.1fs, close to or over the %.0fs grace period: a save on SIGTERM "
                        "may be killed; raise preemption.gracePeriodSeconds or save less", cost, grace)

    def _retained(self, found: list[CheckpointInfo], newest: int) -> set[int]:
        """Steps to keep once `newest` is committed: the `keep` last (newest included) and the `keep_best` best.
        Checkpoints known to be damaged are not counted."""
        usable = [c for c in found if c.step != newest and c.step not in self._bad]
        keep = {c.step for c in usable[len(usable) - (self.keep - 1):]} if self.keep > 1 else set()
        keep.add(newest)
        metric = self.metric
        if self.keep_best and metric:
            scored = [c for c in found if metric in c.metrics and c.step not in self._bad]
            scored.sort(key=lambda c: c.metrics[metric], reverse=self.mode == "max")
            keep |= {c.step for c in scored[: self.keep_best]}
        return keep

    def _recyclable(self, listed: list[CheckpointInfo], step: int) -> CheckpointInfo | None:
        """The oldest checkpoint that pruning will delete after this save anyway, if reusing its files is safe:
        never the newest, never the last one known good, never one with hard-linked files (a backup), never for a
        sharded save (every rank writes into one new temp)."""
        if self.keep < 2 or self.ranks.sharded:
            return None
        found = [c for c in listed if c.step < step and c.step not in self._bad]
        retained = self._retained(found, step)
        doomed = [c for c in found if c.step not in retained]
        if not doomed or doomed[0] is found[-1]:
            return None
        victim = doomed[0]
        if not any(c.step in self._good for c in found if c is not victim):
            return None
        if hard_linked(victim):
            log.info("ckpt: %s has hard-linked files (a backup?); writing a new checkpoint instead of reusing it",
                     victim.path.name)
            return None
        return victim

    def _prune(self, found: list[CheckpointInfo], newest: CheckpointInfo) -> None:
        """Delete checkpoints beyond `keep` last (+ `keep_best` best); only after `newest` is durable.

        `found` is the listing taken before this save, without the recycled one, plus `newest`."""
        found.sort(key=lambda c: c.step)
        keep = self._retained(found, newest.step)
        for info in found:
            if info.step not in keep and info.step not in self._bad:
                log.debug("ckpt: pruning %s", info.path.name)
                self._disk("pruning", functools.partial(self.store.delete, info, background=True))

    def _disk(self, doing: str, action: Callable[[], Any]) -> None:
        """Run a filesystem step; an OSError becomes a CheckpointError that names the directory."""
        try:
            action()
        except OSError as exc:
            raise CheckpointError(f"{doing} checkpoint directory {self.directory} failed: {exc}") from exc


def _loaded_tensor(tensors: dict[str, Any], name: str, kind: str) -> Any:
    return tensors[name]


def _overwrite(path: str, data: bytes) -> None:
    """Replace a small file's content without a moment where it is empty (pad, then trim)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        old = os.fstat(fd).st_size
        padded = data + b" " * max(0, old - len(data))  # JSON readers ignore trailing spaces
        os.pwrite(fd, padded, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckpointConfigError(message)


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
