"""The save engine: writes one save and commits it, on the calling thread or on a helper thread (async), as one
rank's whole checkpoint or as its shard of a sharded one. What to save when is decided elsewhere (_decide)."""

from __future__ import annotations

import logging
import mmap
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ._coordinate import Coordinator
from ._errors import CheckpointError, FencedError
from ._fileio import is_disk_full
from ._manifest import Manifest, shard_prefix
from ._serialize import Snapshot
from ._store import CheckpointInfo, Fence, Store

log = logging.getLogger("ckpt_sdk")


@dataclass
class Ledger:
    """What this process knows of its checkpoints: the last durable one, which are known good or bad, how far it
    trained (the work past the last checkpoint)."""

    last_step: int | None = None
    last_time: float | None = None  # the manifest time of last_step
    last_world_size: int | None = None
    last_save_seconds: float | None = None
    finished_at: float | None = None  # time.monotonic() when the last save became durable
    reached: int | None = None  # the furthest step given to maybe_save
    resumed: int | None = None  # the step restore() loaded (0: none); reported so the operator knows the progress
    good: set[int] = field(default_factory=set)  # written by this process or verified by a load
    bad: set[int] = field(default_factory=set)  # failed verification: never loaded, recycled or counted
    touched: bool = False  # resumed or saved: a termination message is owed at exit

    def record(self, info: CheckpointInfo, save_seconds: float | None, known_good: bool = True) -> None:
        """`info` is durable (saved now, or verified by a resume; `known_good`: it is in this job's directory)."""
        if known_good:
            self.good.add(info.step)
        self.record_step(info.step, info.time or None, info.world_size, save_seconds)

    def record_step(self, step: int, when: float | None, world_size: int | None, save_seconds: float | None) -> None:
        """A checkpoint of `step` is durable (also one a framework wrote: see integrations)."""
        self.touched = True
        self.last_step, self.last_time, self.last_world_size = step, when, world_size
        if save_seconds is not None:
            self.last_save_seconds, self.finished_at = save_seconds, time.monotonic()


@dataclass(frozen=True)
class SaveJob:
    """One save, snapshotted: everything its write needs."""

    snapshot: Snapshot
    manifest: Manifest
    started: float  # time.monotonic() when save() was called
    stall: float | None  # async saves: how long training was stalled (None: sync, the whole save)
    coordinator: Coordinator
    run: str  # the ranks' run (names the shared temp of a sharded save)
    save_number: int  # counted alike on every rank
    on_main_thread: bool  # collectives allowed (torch.distributed), and rounds joined while waiting
    replicated: tuple[str, ...]
    wait_seconds: float  # how long a rank waits for another rank's shard or commit


@dataclass(frozen=True)
class Committed:
    """A save that is durable, for the book-keeping that follows (costs, termination message, pruning)."""

    info: CheckpointInfo
    job: SaveJob
    listed: list[CheckpointInfo] | None  # what pruning chooses among (None on ranks other than 0: never prune)


class Saver:
    """Writes saves for one directory: never two at once; async ones on a helper thread whose error the next
    `wait()` re-raises. `recycle(listed, step)` names a checkpoint whose files a save may reuse."""

    def __init__(self, store: Store, fence: Fence, direct_io: bool,
                 recycle: Callable[[list[CheckpointInfo], int], CheckpointInfo | None],
                 on_commit: Callable[[Committed], None]) -> None:
        self.store, self.fence, self.direct_io = store, fence, direct_io
        self.recycle, self.on_commit = recycle, on_commit
        self.save_number = 0  # counts this run's saves the same way on every rank: names the shared temp
        self._lock = threading.Lock()
        self._inflight: threading.Thread | None = None
        self._error: BaseException | None = None
        self._arena: mmap.mmap | None = None

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None and self._inflight.is_alive()

    def wait(self) -> None:
        """Wait for an in-flight async save; re-raise its error, if any."""
        thread = self._inflight
        if thread is not None:
            thread.join()
            self._inflight = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def write(self, job: SaveJob) -> CheckpointInfo:
        """Write and commit `job` on this thread."""
        if job.coordinator.ranks.sharded:
            return self._write_shard(job)
        return self._write_alone(job)

    def write_async(self, job: SaveJob) -> None:
        """Detach the snapshot (training may change the state from here on) and write it on a helper thread."""
        self._arena = job.snapshot.detach(self._arena)
        job = replace(job, stall=time.monotonic() - job.started, on_main_thread=False)
        self._inflight = threading.Thread(target=self._write_in_background, args=(job,), name="ckpt-save",
                                          daemon=True)
        self._inflight.start()
        log.debug("ckpt: async save of step %d started after %.3fs stall", job.manifest.step, job.stall)

    def _write_in_background(self, job: SaveJob) -> None:
        try:
            self.write(job)
        except BaseException as exc:  # handed to the next wait()
            self._error = exc

    def _write_alone(self, job: SaveJob) -> CheckpointInfo:
        """The whole checkpoint, written by this process alone (reusing the files of one pruning would delete)."""
        step = job.manifest.step
        with self._lock:
            before: list[CheckpointInfo] = []
            recycled: CheckpointInfo | None = None
            temp: Path | None = None
            try:
                before = self.store.list()
                victim = self.recycle(before, step)
                temp, reused = self.store.new_temp(step, self.fence, recycle=victim)
                recycled = victim if reused else None
                files = job.snapshot.write(temp, direct=self.direct_io)
                info = self.store.commit(temp, self.fence, job.manifest.with_files(files))
            except FencedError:
                raise
            except OSError as exc:
                if temp is not None:
                    shutil.rmtree(temp, ignore_errors=True)
                raise CheckpointError(self.failure_message(step, exc, recycled)) from exc
            listed = [c for c in before if c is not recycled and c.step != step] + [info]
            self.on_commit(Committed(info, job, listed))
            return info

    def _write_shard(self, job: SaveJob) -> CheckpointInfo:
        """One rank's part of a sharded save: its shard into the shared temp, then every shard durable (a collective,
        or rank 0 waits for the markers), then rank 0 writes the manifest last and renames; every rank returns once
        it is committed."""
        step, ranks = job.manifest.step, job.coordinator.ranks
        barrier = job.coordinator.barrier(job.on_main_thread)
        with self._lock:
            temp, error = self._shard_into_temp(job)
            written = barrier.shards_written(error is None, lambda: self._shards_done(temp, ranks.world_size),
                                             f"every rank's shard of step {step}")
            if not written and error is None:
                error = CheckpointError(f"another rank could not write its shard of step {step}; not committed")
            info: CheckpointInfo | None = None
            if ranks.coordinator and error is None and temp is not None:
                info, error = self._commit_shards(job, temp)
            known = barrier.commit_known(info is not None, lambda: self.store.committed(step, self.fence) is not None,
                                         f"rank 0 to commit step {step}")
            if not known and error is None:
                error = CheckpointError(f"rank 0 could not commit step {step}; see its log")
            if ranks.coordinator:
                self._drop_reused(job)
            if error is not None:
                raise error
            info = info or self.store.committed(step, self.fence)
            if info is None:
                raise CheckpointError(f"step {step} was committed and is gone again (fenced out?)")
            listed = [c for c in self.store.list() if c.step != step] + [info] if ranks.coordinator else None
            self.on_commit(Committed(info, job, listed))
            return info

    def _drop_reused(self, job: SaveJob) -> None:
        """Rank 0, once the ranks are past their shards: remove what is left of the checkpoint they reused."""
        try:
            self.store.delete_directory(self.store.reuse_path(self.fence, job.run, job.save_number), background=True)
        except OSError as exc:  # a leftover temp: the next run's cleaning removes it
            log.warning("ckpt: could not remove the rest of a reused checkpoint: %s", exc)

    def _shards_done(self, temp: Path | None, world_size: int) -> bool:
        return temp is not None and self.store.shards_done(temp, world_size)

    def _shard_into_temp(self, job: SaveJob) -> tuple[Path | None, CheckpointError | None]:
        """This rank's files into the shared temp (its files of a checkpoint pruning would delete, overwritten in
        place), then its marker."""
        rank = job.coordinator.ranks.rank
        temp: Path | None = None
        try:
            temp = self.store.shared_temp(job.manifest.step, self.fence, job.run, job.save_number)
            victim = self.recycle(self.store.list(), job.manifest.step)
            pool = self.store.shared_reuse(victim, self.fence, job.run, job.save_number)
            if pool is not None:
                self.store.take_files(pool, temp, job.snapshot.file_names(shard_prefix(rank)))
            files = job.snapshot.write(temp, shard_prefix(rank), direct=self.direct_io)
            self.store.write_shard_marker(temp, rank, files)
        except OSError as exc:
            return temp, CheckpointError(self.failure_message(job.manifest.step, exc, None))
        return temp, None

    def _commit_shards(self, job: SaveJob, temp: Path) -> tuple[CheckpointInfo | None, CheckpointError | None]:
        """Rank 0: the manifest naming every rank's files, written last."""
        step = job.manifest.step
        try:
            shards = self.store.read_shards(temp, job.coordinator.ranks.world_size)
            return self.store.commit(temp, self.fence, job.manifest.with_shards(shards, job.replicated)), None
        except CheckpointError as exc:
            return None, exc
        except OSError as exc:
            return None, CheckpointError(self.failure_message(step, exc, None))

    def failure_message(self, step: int, exc: OSError, recycled: CheckpointInfo | None) -> str:
        """What a failed save left behind, counted from the directory (never a promise it cannot keep)."""
        what = f"out of space ({exc.strerror})" if is_disk_full(exc) else f"failed: {exc}"
        try:
            kept = self.store.list()
        except OSError:
            kept = []
        left = (f"{len(kept)} checkpoint(s) remain, newest step {kept[-1].step}" if kept
                else "no checkpoint remains")
        lost = f"; step {recycled.step}, which was being reused for this save, is gone" if recycled else ""
        return f"saving step {step} under {self.store.root}: {what}; {left}{lost}"
