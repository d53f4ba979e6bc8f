"""What every framework integration shares: one `Checkpointer` for its signals (SIGTERM, a slot's end, an
interruption notice's checkpoint request), the ranks' agreement on them, the fence, and the termination message;
commits of the directories the framework writes; the newest complete one; rotation; the exit that says
"preempted" (143) to the operator."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from .._checkpointer import Checkpointer
from .._decide import Action, Decision
from .._env import DEFAULT_DIR, Environment
from .._errors import CheckpointError
from .._ranks import torch_distributed
from ..contract import ExitReason
from . import _commit

log = logging.getLogger("ckpt_sdk")


def default_directory(directory: str | Path | None = None) -> Path:
    """`directory`, else $CKPT_DIR (inside a TrainingJob), else ./checkpoints."""
    return Path(directory if directory is not None else Environment.read().directory or DEFAULT_DIR)


class FrameworkRun:
    """One training process whose framework writes its own checkpoint directories under `directory` (named by
    `pattern`, its first group the step). `check(step)` at every step end says what every rank does; `committed`
    after each framework save makes that checkpoint durable and complete; `stop` exits 143."""

    def __init__(self, directory: str | Path | None, pattern: re.Pattern[str], *, keep: int | None = None,
                 every_steps: int | None = None, every_seconds: float | None = None) -> None:
        self.directory = default_directory(directory)
        self.pattern = pattern
        self.keep = keep
        env = Environment.read()
        self.periodic = every_steps is not None or every_seconds is not None or env.interval_seconds is not None
        self.checkpointer = Checkpointer(self.directory, every_steps=every_steps, every_seconds=every_seconds,
                                         keep=keep)
        self.stopping: ExitReason | None = None  # set once every rank agreed to stop
        self.request: float | None = None  # a checkpoint request the next save answers

    def resumed(self, step: int) -> None:
        """The framework resumed at `step` (0: from scratch); the termination message reports it, so the operator
        knows the progress of attempts that ended without a report."""
        self.checkpointer.ledger.resumed = step
        self.checkpointer.ledger.touched = True
        pace = self.checkpointer.pace
        pace.left_at, pace.left_step = time.monotonic(), step  # training starts here

    def total(self, steps: int | None) -> None:
        """The run's length in steps, as the framework knows it (reported for progress and ETA)."""
        self.checkpointer.pace.total_steps = steps if steps is not None and steps > 0 else None

    def check(self, step: int) -> Decision:
        """What every rank does at `step` (a collective with several ranks): save (periodic, only when an interval
        is set: otherwise the framework keeps its own schedule), answer a request, save and stop, or stop."""
        pace, entered = self.checkpointer.pace, time.monotonic()
        outer = pace.enter(step, entered)
        decision = self.checkpointer.decide_at(step, due=self.periodic)
        if outer:
            pace.leave(step, entered, time.monotonic())
        if decision.action is Action.ANSWER_REQUEST:
            self.request = decision.request
        if decision.action in (Action.SAVE_AND_EXIT, Action.EXIT):
            self.stopping = decision.reason or ExitReason.PREEMPTED
        return decision

    def committed(self, path: Path, step: int, protect: Path | None = None) -> None:
        """The framework wrote checkpoint `path` of `step` (every rank calls this): make it durable on every rank,
        then complete (rank 0 writes the marker under the fence), then rotate. Raises CheckpointError if rank 0
        could not commit it."""
        started = time.monotonic()
        _commit.fsync_tree(path)
        ranks = self.checkpointer.ranks
        _barrier()
        error: BaseException | None = None
        if ranks.coordinator:
            try:
                _commit.commit(path, step, self.checkpointer.store, self.checkpointer.fence)
            except (OSError, CheckpointError) as exc:
                error = exc
        if not ranks.from_coordinator(error is None):
            raise CheckpointError(f"committing {path} failed on rank 0: {error or 'see its log'}") from error
        self.saved(step, protect, started)
        log.info("ckpt: %s is complete (step %d)", path, step)

    def saved(self, step: int, protect: Path | None = None, started: float | None = None) -> None:
        """A complete checkpoint of `step` exists (committed here, or by the framework's writer): the termination
        message says so, an answered request is marked, old ones are rotated (rank 0)."""
        now = time.monotonic()
        pace = self.checkpointer.pace
        if pace.left_at is not None and pace.left_step == step:  # the framework's save since the step's end: a stall
            pace.stall_seconds += now - pace.left_at
            pace.left_at = now
        ranks = self.checkpointer.ranks
        self.checkpointer.ledger.record_step(step, time.time(), ranks.world_size,
                                             now - started if started is not None else None)
        self.checkpointer.policy.mark(step, started if started is not None else now)
        if self.request is not None:
            self.checkpointer.answered(self.request)
            self.request = None
        self.checkpointer.write_termination_message(ExitReason.CHECKPOINT.value)
        if ranks.coordinator and self.keep is not None:
            for gone in _commit.rotate(self.directory, self.pattern, self.keep, protect):
                log.info("ckpt: removed %s (keep %d)", gone.name, self.keep)

    def latest(self, full: bool = True) -> Path | None:
        return _commit.newest_complete(self.directory, self.pattern, full)

    def stop(self, step: int) -> None:
        """Exit 143 with the termination message, once the stop every rank agreed on is behind the framework."""
        self.checkpointer.exit_preempted(self.stopping or ExitReason.PREEMPTED, step)


def _barrier() -> None:
    dist = torch_distributed()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()
