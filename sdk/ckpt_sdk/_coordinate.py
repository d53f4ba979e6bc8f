"""How the ranks of a run agree: on what to do at a step (save, stop, answer a checkpoint request), on the run they
belong to, and on a sharded save's shards and commit. One protocol, three implementations:

- `Solo`: one rank; every agreement is its own decision.
- `TorchCoordinator`: torch.distributed is initialized; every `maybe_save` all-reduces the ranks' signals (one small
  collective), so every rank decides the same at the same step.
- `FileCoordinator`: several ranks without torch.distributed meet through files in the shared checkpoint directory.
  Saves that come due by step need no meeting; an event (SIGTERM, a slot's end, a checkpoint request) on any rank
  starts a *round*: every rank joins with the step it is at, and all act at the furthest one (ranks behind train on
  to it). A rank blocked in a save (waiting for another rank's shard or for rank 0's commit) joins a round from
  inside that wait, so no rank ever waits for one that waits for it.

Before the first round or sharded save the ranks agree on a *run*: a name no earlier run of the same attempt used
(CKPT_ATTEMPT is unset outside Kubernetes, and a requeued Slurm job reuses it), so nothing a dead run left behind
(a shared temp, its shard markers, its round files) is ever taken for this run's.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ._errors import CheckpointConfigError, CheckpointError
from ._fileio import write_small_atomically
from ._ranks import Ranks, torch_distributed
from ._store import AGREEMENT_PREFIX, RENDEZVOUS_PREFIX

log = logging.getLogger("ckpt_sdk")

POLL_FIRST_SECONDS = 0.005
POLL_MAX_SECONDS = 0.02  # a stat of a marker file: cheap, and every poll interval is added to a sharded save
RENDEZVOUS_SECONDS = 300.0  # how long ranks wait for each other to agree on the run
ROUND_SECONDS = 60.0  # how long a round without a deadline waits for every rank to join


class Interrupted(CheckpointError):
    """A wait was given up because this process must stop now (SIGTERM before the ranks could agree)."""


@dataclass(frozen=True)
class Signals:
    """What one rank knows at a step, or what all of them know once merged (`merge`, an all-reduce of it)."""

    stop: bool = False  # SIGTERM arrived
    deadline: bool = False  # a time-limited slot ends soon
    due: bool = False  # the save policy says this step is due
    request: float | None = None  # the deadline (Unix time) of an interruption notice's checkpoint request
    covered: bool = False  # a save that ended after SIGTERM covers the stop, and another would not fit in time

    def merge(self, other: Signals) -> Signals:
        """Any rank's event is everyone's; a stop is covered only if it is covered on every rank."""
        requests = [r for r in (self.request, other.request) if r is not None]
        return Signals(self.stop or other.stop, self.deadline or other.deadline, self.due or other.due,
                       min(requests) if requests else None, self.covered and other.covered)

    @property
    def event(self) -> bool:
        return self.stop or self.deadline or self.request is not None

    def to_json(self, step: int) -> bytes:
        return json.dumps({"step": step, "stop": self.stop, "deadline": self.deadline, "request": self.request,
                           "covered": self.covered}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> tuple[int, Signals]:
        data = json.loads(raw)
        request = data.get("request")
        return int(data["step"]), cls(bool(data["stop"]), bool(data["deadline"]), False,
                                      None if request is None else float(request), bool(data["covered"]))


@dataclass(frozen=True)
class Agreement:
    """What every rank does: act on `signals` at step `target` (ranks behind it train on to it). `complete` is False
    when a rank never joined in time: no sharded checkpoint can be made, only the last durable one stands."""

    signals: Signals
    target: int
    complete: bool = True


class Coordinator(Protocol):
    """How the ranks of one run agree (see the module docstring)."""

    ranks: Ranks

    def agree(self, step: int, local: Signals) -> Agreement:
        """The agreement at `step` given this rank's `local` signals (a collective: every rank calls it)."""

    def run_id(self) -> str:
        """A name for this run, the same on every rank and never used by an earlier run (a collective)."""

    def barrier(self, on_main_thread: bool) -> Barrier:
        """How a sharded save learns that every shard is written and that rank 0 committed."""

    def loaded_everywhere(self, ok: bool) -> bool:
        """True on every rank only if every rank loaded its part of a checkpoint (False: all try an older one)."""

    def leave(self) -> None:
        """Before this process exits on purpose: let the other ranks go first where they need to."""


class Barrier(Protocol):
    """The two meetings of a sharded save."""

    def shards_written(self, ok: bool, ready: Callable[[], bool], what: str) -> bool:
        """Rank 0: True once every rank's shard is durable (`ready` checks the markers). Others: their own `ok`."""

    def commit_known(self, committed: bool, ready: Callable[[], bool], what: str) -> bool:
        """Every rank: True once rank 0 committed (`committed` on rank 0, `ready` checks the directory elsewhere)."""


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               on_poll: Callable[[], None] | None = None) -> None:
    """Poll `condition` (a file another rank writes) until it holds, calling `on_poll` between polls (it may raise
    Interrupted); CheckpointError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = POLL_FIRST_SECONDS
    while not condition():
        if time.monotonic() >= deadline:
            raise CheckpointError(f"timed out after {timeout:.0f}s waiting for {what}")
        if on_poll is not None:
            on_poll()
        time.sleep(pause)
        pause = min(POLL_MAX_SECONDS, pause * 2)


# -- one rank ------------------------------------------------------------------------------------------------------
class _OwnVerdict:
    """A barrier for one rank, or for ranks that only learn the verdicts through files and the directory."""

    def shards_written(self, ok: bool, ready: Callable[[], bool], what: str) -> bool:
        return ok

    def commit_known(self, committed: bool, ready: Callable[[], bool], what: str) -> bool:
        return committed


@dataclass
class Solo:
    """One rank saving alone."""

    ranks: Ranks = field(default_factory=Ranks)

    def agree(self, step: int, local: Signals) -> Agreement:
        return Agreement(local, step)

    def run_id(self) -> str:
        return "solo"

    def barrier(self, on_main_thread: bool) -> Barrier:
        return _OwnVerdict()

    def loaded_everywhere(self, ok: bool) -> bool:
        return ok

    def leave(self) -> None:
        return None


# -- torch.distributed ---------------------------------------------------------------------------------------------
class _Collective:
    """A sharded save's meetings as collectives (main thread only)."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    def shards_written(self, ok: bool, ready: Callable[[], bool], what: str) -> bool:
        return self.ranks.all_true(ok)

    def commit_known(self, committed: bool, ready: Callable[[], bool], what: str) -> bool:
        return self.ranks.from_coordinator(committed)


@dataclass
class TorchCoordinator:
    """Agreement through torch.distributed collectives; async saves (on a helper thread, where collectives must not
    run) meet through the shard markers and the directory, as file coordination does."""

    ranks: Ranks
    files: _FileBarrier
    _run: str | None = None

    def agree(self, step: int, local: Signals) -> Agreement:
        nonce = secrets.randbits(62) if self._run is None else 0
        values = self.ranks.reduce_max([int(local.stop), int(local.deadline), int(local.due), step, -step,
                                        int(local.request or 0), int(not local.covered), nonce])
        stop, deadline, due, high, negative_low, request, uncovered, shared = values
        if high != -negative_low:
            raise CheckpointConfigError(f"ranks called maybe_save with different steps ({-negative_low} to {high}); "
                                        "call it at the same step on every rank")
        if self._run is None:
            self._run = f"{shared:x}"
        return Agreement(Signals(bool(stop), bool(deadline), bool(due), float(request) if request else None,
                                 not uncovered), step)

    def run_id(self) -> str:
        if self._run is None:  # the largest of every rank's random number: the same everywhere, new every run
            self._run = f"{self.ranks.reduce_max([secrets.randbits(62)])[0]:x}"
        return self._run

    def barrier(self, on_main_thread: bool) -> Barrier:
        return _Collective(self.ranks) if on_main_thread else self.files

    def loaded_everywhere(self, ok: bool) -> bool:
        return self.ranks.all_true(ok)

    def leave(self) -> None:
        """Every rank meets once more, then the process group is torn down: no rank exits while a peer still uses
        the connections, and none exits with a live group (torch's exit-time teardown then aborts: exit -6)."""
        dist = torch_distributed()
        if dist is None:
            return
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as exc:  # a peer already gone: exiting is all that is left to do
            log.debug("ckpt: leaving the process group: %s", exc)


# -- files in the shared directory ---------------------------------------------------------------------------------
@dataclass
class _FileBarrier:
    """A sharded save's meetings through files: rank 0 waits for every shard marker, the others for the commit.
    `on_poll` runs while waiting on the main thread (joins a round another rank started)."""

    ranks: Ranks
    timeout: Callable[[], float]
    on_poll: Callable[[], None] | None = None

    def shards_written(self, ok: bool, ready: Callable[[], bool], what: str) -> bool:
        if ok and self.ranks.coordinator:
            wait_until(ready, self.timeout(), what, self.on_poll)
        return ok

    def commit_known(self, committed: bool, ready: Callable[[], bool], what: str) -> bool:
        if not self.ranks.coordinator:
            wait_until(ready, self.timeout(), what, self.on_poll)
            return True
        return committed


@dataclass
class FileCoordinator:
    """Agreement through files in the shared checkpoint directory (see the module docstring).

    `local(step)` gives this rank's signals at a step (used when it joins a round from inside a wait); `budget(s)`
    the seconds a round carrying `s` may wait for every rank; `stopping()` whether this process must stop now;
    `save_timeout()` how long a sharded save waits for another rank."""

    ranks: Ranks
    root: Path
    token: str
    local: Callable[[int], Signals]
    budget: Callable[[Signals], float]
    stopping: Callable[[], bool]
    save_timeout: Callable[[], float]
    _run: str | None = None
    _round: int = 0  # the next round this rank takes part in (every rank counts them alike)
    _joined: int | None = None  # the round this rank joined and has not resolved yet
    _step: int = 0  # the step this rank is at (the one it joins rounds with from inside a wait)
    _pending: list[Agreement] = field(default_factory=list)  # resolved, not yet acted on
    _requests: set[float] = field(default_factory=set)  # checkpoint requests already carried by a round
    _joined_with: Signals = field(default_factory=Signals)  # what this rank brought to the round it joined

    def agree(self, step: int, local: Signals) -> Agreement:
        self.run_id()
        self._step = step
        local = self._new_events(local)
        if self._joined is None and (local.event or self._round_started(self._round)):
            self._join(self._round, step, local)
        if self._joined is not None:
            self._resolve(step)
        now = [a for a in self._pending if a.target <= step]
        self._pending = [a for a in self._pending if a.target > step]
        if any(a.target < step for a in now):
            raise CheckpointConfigError(
                f"the ranks agreed to act at step {min(a.target for a in now)} and this rank called maybe_save at "
                f"step {step}: call maybe_save at every step on every rank")
        if not now:  # saves due by step go on while ranks train on to an agreed step: every rank makes them alike
            return Agreement(Signals(due=local.due), step)
        merged = Signals(due=local.due, covered=True)
        for agreement in now:
            merged = merged.merge(agreement.signals)
        return Agreement(merged, step, complete=all(agreement.complete for agreement in now))

    def _new_events(self, local: Signals) -> Signals:
        """Events not already on their way: a request another round carries, or a stop while one is agreed."""
        stopping = any(a.signals.stop or a.signals.deadline for a in self._pending)
        request = None if local.request in self._requests else local.request
        return replace(local, stop=local.stop and not stopping, deadline=local.deadline and not stopping,
                       request=request)

    def join_started_round(self) -> None:
        """From inside a wait: join a round another rank started, with the step this rank is at."""
        if self._joined is None and self._run is not None and self._round_started(self._round):
            self._join(self._round, self._step, self._new_events(self.local(self._step)))

    # -- rounds ---------------------------------------------------------------------------------------------------
    def _round_file(self, number: int, rank: int | None = None) -> Path:
        name = f"{AGREEMENT_PREFIX}{self.token}-r{self._run}-{number}"
        return self.root / (name if rank is None else f"{name}.rank-{rank:05d}")

    def _round_started(self, number: int) -> bool:
        return self._round_file(number).exists()

    def _join(self, number: int, step: int, local: Signals) -> None:
        if local.event:
            log.warning("ckpt: %s; asking the other ranks to agree on a step", _describe(local))
        else:
            log.warning("ckpt: another rank asked the ranks to agree on a step (this one is at step %d)", step)
        write_small_atomically(self._round_file(number, self.ranks.rank), local.to_json(step))
        self._round_file(number).touch()
        self._joined, self._joined_with = number, local

    def _resolve(self, step: int) -> None:
        """Wait until every rank joined the round; then everyone knows the target (the furthest step) and what to
        do there. A rank that never joins in time leaves an incomplete agreement."""
        number = self._joined
        assert number is not None
        joins: dict[int, tuple[int, Signals]] = {}

        def everyone() -> bool:
            for rank in range(self.ranks.world_size):
                if rank not in joins:
                    try:
                        joins[rank] = Signals.from_json(self._round_file(number, rank).read_bytes())
                    except (FileNotFoundError, ValueError, KeyError):
                        return False
            return True

        try:
            wait_until(everyone, self.budget(self._joined_with), f"every rank to join round {number}")
        except CheckpointError as exc:
            log.error("ckpt: %s; ranks %s never joined: no checkpoint every rank agrees on can be made", exc,
                      sorted(set(range(self.ranks.world_size)) - set(joins)))
            merged = self._merged(joins)
            self._finish_round(number, Agreement(merged, step, complete=not (merged.stop or merged.deadline)))
            return
        merged = self._merged(joins)
        target = max(joined_step for joined_step, _ in joins.values())
        self._finish_round(number, Agreement(merged, target))
        if target > step:
            log.warning("ckpt: the ranks agreed on step %d (%s); training on to it", target, _describe(merged))

    def _merged(self, joins: dict[int, tuple[int, Signals]]) -> Signals:
        merged = Signals(covered=True)
        for _, signals in joins.values():
            merged = merged.merge(signals)
        return merged

    def _finish_round(self, number: int, agreement: Agreement) -> None:
        self._joined, self._round = None, number + 1
        if agreement.signals.request is not None:
            self._requests.add(agreement.signals.request)
        if agreement.complete or agreement.signals.stop or agreement.signals.deadline:
            self._pending = sorted([*self._pending, agreement], key=lambda a: a.target)

    # -- the run ---------------------------------------------------------------------------------------------------
    def run_id(self) -> str:
        """Rank 0 names the run; a rank accepts the name only from a run file that lists the nonce it wrote just
        now, and rank 0 waits until every rank acknowledged its name (stale files name other nonces)."""
        if self._run is not None:
            return self._run
        nonce = secrets.token_hex(8)
        base = self.root / f"{RENDEZVOUS_PREFIX}{self.token}"
        self.root.mkdir(parents=True, exist_ok=True)
        interrupt = self._interrupt("agreeing on the run")
        if self.ranks.coordinator:
            self._run = self._lead_rendezvous(base, nonce, interrupt)
        else:
            self._run = self._follow_rendezvous(base, nonce, interrupt)
        log.debug("ckpt: rank %d of %d is in run %s", self.ranks.rank, self.ranks.world_size, self._run)
        return self._run

    def _lead_rendezvous(self, base: Path, nonce: str, interrupt: Callable[[], None]) -> str:
        written: dict[str, str] = {}

        def everyone_acknowledged() -> bool:
            hellos = {str(rank): _read_text(Path(f"{base}.rank-{rank:05d}"))
                      for rank in range(1, self.ranks.world_size)}
            if hellos != written:
                write_small_atomically(base, json.dumps({"run": nonce, "members": hellos}).encode())
                written.clear()
                written.update(hellos)
            return all(_read_text(Path(f"{base}.ack-{rank:05d}")) == nonce for rank in range(1, self.ranks.world_size))

        wait_until(everyone_acknowledged, RENDEZVOUS_SECONDS, "every rank to join this run", interrupt)
        return nonce

    def _follow_rendezvous(self, base: Path, nonce: str, interrupt: Callable[[], None]) -> str:
        rank = self.ranks.rank
        write_small_atomically(Path(f"{base}.rank-{rank:05d}"), nonce.encode())
        found: list[str] = []

        def named() -> bool:
            try:
                data = json.loads(base.read_bytes())
            except (FileNotFoundError, ValueError):
                return False
            if not isinstance(data, dict) or (data.get("members") or {}).get(str(rank)) != nonce:
                return False
            found.append(str(data["run"]))
            return True

        wait_until(named, RENDEZVOUS_SECONDS, "rank 0 to name this run", interrupt)
        write_small_atomically(Path(f"{base}.ack-{rank:05d}"), found[0].encode())
        return found[0]

    def _interrupt(self, doing: str) -> Callable[[], None]:
        def check() -> None:
            if self.stopping():
                raise Interrupted(f"SIGTERM arrived while {doing}")
        return check

    # -- the rest of the protocol --------------------------------------------------------------------------------
    def barrier(self, on_main_thread: bool) -> Barrier:
        return _FileBarrier(self.ranks, self.save_timeout, self.join_started_round if on_main_thread else None)

    def loaded_everywhere(self, ok: bool) -> bool:
        return ok

    def leave(self) -> None:
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, ValueError):
        return ""


def _describe(signals: Signals) -> str:
    if signals.stop:
        return "SIGTERM arrived"
    if signals.deadline:
        return "the time-limited slot ends soon"
    if signals.request is not None:
        return "a checkpoint was requested (interruption notice)"
    return "no event"


@dataclass(frozen=True)
class FileHooks:
    """What file coordination asks of the Checkpointer (see FileCoordinator)."""

    local: Callable[[int], Signals]
    budget: Callable[[Signals], float]
    stopping: Callable[[], bool]
    save_timeout: Callable[[], float]


def coordinator_for(ranks: Ranks, root: Path, token: str, hooks: FileHooks) -> Coordinator:
    """The coordinator for these ranks: one rank alone, torch.distributed, or files in `root`."""
    if not ranks.sharded:
        return Solo(ranks)
    if ranks.torch:
        return TorchCoordinator(ranks, _FileBarrier(ranks, hooks.save_timeout))
    return FileCoordinator(ranks, root, token, hooks.local, hooks.budget, hooks.stopping, hooks.save_timeout)
