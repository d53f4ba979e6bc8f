"""Checkpointer: the save policy, SIGTERM handling, retention, async saves and restore."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, runtime_checkable

from . import _serialize, _tree
from ._env import DEFAULT_DIR, Environment
from ._errors import CheckpointConfigError, CheckpointError, CorruptCheckpointError
from ._policy import SavePolicy, daly_interval, expected_overhead
from ._storage import CheckpointInfo, Store, disk_error_message

log = logging.getLogger("ckpt_sdk")
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM
__version__ = "0.1.0"


@runtime_checkable
class Stateful(Protocol):
    """Anything with `state_dict()` and `load_state_dict()` (torch modules and optimizers, RNGState, yours)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


class Checkpointer:
    """Saves and restores a training state in one job's checkpoint directory.

    Arguments override the CKPT_* environment; everything is validated here, at construction.
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
        self.async_save = async_save
        self.exit_on_preemption = exit_on_preemption
        self.attempt = env.attempt
        self.policy = SavePolicy(every_steps, every_seconds, after, env.mtbp_seconds, last_time=time.monotonic())
        self.store = Store(self.directory)
        self.last_step: int | None = None  # last durable step
        self.last_save_seconds: float | None = None
        self._preempted = threading.Event()
        self._lock = threading.Lock()
        self._inflight: threading.Thread | None = None
        self._inflight_error: BaseException | None = None
        self._arena: bytearray | None = None
        self._initialized = False
        if handle_sigterm:
            self._install_sigterm()
        atexit.register(self.close)

    # -- public --------------------------------------------------------------------------------------
    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (the next maybe_save saves and exits 143)."""
        return self._preempted.is_set()

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self.store.list()

    def latest(self) -> CheckpointInfo | None:
        found = self.store.list()
        return found[-1] if found else None

    def maybe_save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None) -> bool:
        """Save if the policy says so; on SIGTERM save now, write the termination message and exit 143."""
        if self.preempted:
            self.wait()  # an in-flight async save of this step may already be the one we need
            if self.last_step != step:
                self.save(step, state, metrics=metrics, blocking=True)
            grace = self.env.grace_period_seconds
            log.warning("ckpt: preempted; checkpoint of step %d is durable, exiting %d (grace period %.0fs)",
                        step, PREEMPTED_EXIT_CODE, grace)
            self.write_termination_message(reason="preempted")
            if self.exit_on_preemption:
                raise SystemExit(PREEMPTED_EXIT_CODE)
            return True
        if self.policy.due(step, time.monotonic()):
            self.save(step, state, metrics=metrics)
            return True
        return False

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
        self._init_directory()
        self.wait()  # never two saves in flight
        started = time.monotonic()
        snapshot = _serialize.Snapshot(state)
        manifest = self._manifest(step, metrics, metadata)
        if blocking is False or (blocking is None and self.async_save):
            self._arena = snapshot.detach(self._arena)
            stall = time.monotonic() - started
            self._inflight = threading.Thread(
                target=self._write_async, args=(snapshot, step, manifest, started), name="ckpt-save", daemon=True
            )
            self._inflight.start()
            log.debug("ckpt: async save of step %d started after %.3fs stall", step, stall)
            return None
        return self._write(snapshot, step, manifest, started)

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
        """Load the newest verifiable checkpoint (or `info`) into `state`; return its step, 0 if none."""
        candidates = [info] if info is not None else list(reversed(self.store.list()))
        step = _restore_first(candidates, state)
        if step is None and info is None and self.env.resume_from:
            log.info("ckpt: %s has no checkpoint; warm-starting from %s", self.directory, self.env.resume_from)
            step = _restore_first(list(reversed(Store(self.env.resume_from).list_or_single())), state)
        if step is None:
            log.info("ckpt: no checkpoint found in %s; starting from step 0", self.directory)
            return 0
        self.last_step = step
        self.policy.record(step, time.monotonic(), None)
        return step

    def write_termination_message(self, reason: str = "exit") -> None:
        """Write {"step": ...} where Kubernetes reads the termination message (only if that file is set up)."""
        path = self.env.termination_log
        if not (os.environ.get("CKPT_TERMINATION_LOG") or os.path.exists(path)):
            return
        message = {"step": self.last_step, "reason": reason, "attempt": self.attempt,
                   "saveSeconds": None if self.last_save_seconds is None else round(self.last_save_seconds, 3)}
        if self.last_step is not None:
            message["time"] = _latest_time(self)
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(message))
        except OSError as exc:
            log.debug("ckpt: cannot write termination message to %s: %s", path, exc)

    def close(self) -> None:
        """Wait for an in-flight save and write the termination message (also run at interpreter exit)."""
        try:
            self.wait()
        except CheckpointError as exc:
            log.error("ckpt: the last async save failed: %s", exc)
        if self._initialized:
            self.write_termination_message(reason="preempted" if self.preempted else "exit")

    # -- internals -----------------------------------------------------------------------------------
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("ckpt: Checkpointer created off the main thread; SIGTERM is not handled")
            return

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self._preempted.set()  # only a flag: the save happens at the next maybe_save

        signal.signal(signal.SIGTERM, on_sigterm)

    def _init_directory(self) -> None:
        if not self._initialized:
            self.store.claim(self.attempt)
            self.store.clean_stale(self.attempt)
            self._initialized = True

    def _manifest(self, step: int, metrics: Mapping[str, float] | None, metadata: Mapping[str, Any] | None
                  ) -> dict[str, Any]:
        return {
            "format": "ckpt-sdk/1", "sdk_version": __version__, "step": int(step), "attempt": self.attempt,
            "time": time.time(), "job": self.env.job_name, "namespace": self.env.namespace,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()}, "metadata": dict(metadata or {}),
        }

    def _write_async(self, snapshot: _serialize.Snapshot, step: int, manifest: dict[str, Any], started: float
                     ) -> None:
        try:
            self._write(snapshot, step, manifest, started)
        except BaseException as exc:  # handed to the next wait()
            self._inflight_error = exc

    def _write(self, snapshot: _serialize.Snapshot, step: int, manifest: dict[str, Any], started: float
               ) -> CheckpointInfo:
        with self._lock:
            before = self.store.list()
            recycled = self._recyclable(before, step)
            temp = self.store.new_temp(step, self.attempt, recycle=recycled)
            try:
                manifest["files"] = snapshot.write(temp)
                info = self.store.commit(temp, step, self.attempt, manifest)
            except OSError as exc:
                import shutil

                shutil.rmtree(temp, ignore_errors=True)
                raise CheckpointError(disk_error_message(exc, self.directory)) from exc
            cost = time.monotonic() - started
            self.last_step, self.last_save_seconds = step, cost
            self.policy.record(step, time.monotonic(), cost)
            self._log_policy(step, cost, snapshot.nbytes)
            self.write_termination_message(reason="checkpoint")
            self._prune([c for c in before if c is not recycled and c.step != step] + [info], info)
            return info

    def _log_policy(self, step: int, cost: float, nbytes: int) -> None:
        grace = self.env.grace_period_seconds
        msg = "ckpt: saved step %d (%.1f MB) in %.3fs"
        args: list[Any] = [step, nbytes / 1e6, cost]
        if self.policy.automatic:
            interval = daly_interval(self.policy.save_cost or cost, self.policy.mtbp_seconds)
            overhead = expected_overhead(interval, self.policy.save_cost or cost, self.policy.mtbp_seconds)
            msg += "; automatic interval %.1fs (Young/Daly, MTBP %.0fs), expected overhead %.2f%%"
            args += [interval, self.policy.mtbp_seconds, 100 * overhead]
        log.info(msg, *args)
        if cost > 0.8 * grace:
            log.warning("ckpt: the last save took %.1fs, close to or over the %.0fs grace period: a save on SIGTERM "
                        "may be killed; raise preemption.gracePeriodSeconds or save less", cost, grace)

    def _retained(self, found: list[CheckpointInfo], newest: int) -> set[int]:
        """Steps to keep once `newest` is committed: the `keep` last (newest included) and the `keep_best` best."""
        older = [c for c in found if c.step != newest]
        keep = {c.step for c in older[len(older) - (self.keep - 1):]} if self.keep > 1 else set()
        keep.add(newest)
        metric = self.metric
        if self.keep_best and metric:
            scored = [c for c in found if metric in c.metrics]
            scored.sort(key=lambda c: c.metrics[metric], reverse=self.mode == "max")
            keep |= {c.step for c in scored[: self.keep_best]}
        return keep

    def _recyclable(self, listed: list[CheckpointInfo], step: int) -> CheckpointInfo | None:
        """The oldest checkpoint that pruning will delete after this save anyway. Never the newest one: with
        keep=1 nothing is recycled, so the last good checkpoint stays intact until the new one is durable."""
        if self.keep < 2:
            return None
        found = [c for c in listed if c.step < step]
        retained = self._retained(found, step)
        doomed = [c for c in found if c.step not in retained]
        return doomed[0] if doomed and doomed[0] is not found[-1] else None

    def _prune(self, found: list[CheckpointInfo], newest: CheckpointInfo) -> None:
        """Delete checkpoints beyond `keep` last (+ `keep_best` best); only after `newest` is durable.

        `found` is the listing taken before this save, without the recycled one, plus `newest`."""
        found.sort(key=lambda c: c.step)
        keep = self._retained(found, newest.step)
        for info in found:
            if info.step not in keep:
                log.debug("ckpt: pruning %s", info.path.name)
                self.store.delete(info, background=True)


def _restore_first(candidates: list[CheckpointInfo], state: MutableMapping[str, Any]) -> int | None:
    for info in candidates:
        try:
            tree, tensors = _serialize.load(info)
        except (CorruptCheckpointError, OSError) as exc:
            log.warning("ckpt: checkpoint %s is unusable (%s); falling back to an older one", info.path, exc)
            continue
        if not isinstance(tree, dict):
            log.warning("ckpt: checkpoint %s holds no state dict; falling back to an older one", info.path)
            continue
        _tree.restore(state, tree, functools.partial(_loaded_tensor, tensors))
        log.info("ckpt: resumed from %s (step %d)", info.path, info.step)
        return info.step
    return None


def _loaded_tensor(tensors: dict[str, Any], name: str, kind: str) -> Any:
    return tensors[name]


def _latest_time(ckpt: Checkpointer) -> str | None:
    latest = ckpt.directory / f"step-{ckpt.last_step:012d}" if ckpt.last_step is not None else None
    if latest is None or not latest.exists():
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(latest.stat().st_mtime))


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
