"""The checkpoint store: one job's directory of atomic, fenced checkpoints.

A checkpoint is a directory `step-<12 digits>/` holding data files and `MANIFEST.json`, which is written last.
It is built in `.tmp-*` next to its final name, fsynced, renamed into place, and the parent fsynced. Re-saving a
step moves the old copy to `step-<12 digits>.prev` first; the listing falls back to it until the new one is in.

A sharded checkpoint (several ranks) is built in one shared temp directory, named by the run (see `_coordinate`):
each rank writes its files prefixed `rank-<5 digits>.` and then its marker `rank-<5 digits>.done.json`; rank 0, once
every marker is there, writes the manifest naming every rank's files and renames the directory into place.

Entries reached through a symbolic link (a step directory or a file: a `cp -as` copy, an archive linked back in) are
loaded, but never recycled, pruned or written through; files with other hard links (a `cp -al` backup) are never
overwritten in place.
"""

from __future__ import annotations

import builtins
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import CheckpointError, CorruptCheckpointError, FencedError, IncompatibleCheckpointError
from ._faults import point
from ._fileio import (
    CHUNK,
    TMP_PREFIX,
    FileEntry,
    fsync_dir,
    retry_enoent,
    verify_file,
    write_file,
    write_small_atomically,
)
from ._manifest import MANIFEST, Manifest, read_manifest, shard_prefix

log = logging.getLogger("ckpt_sdk")

FENCE = ".fence"
STEP_DIR = re.compile(r"^step-(\d{12})(\.prev)?$")
_PROCESS_START = time.time() - 1.0  # temps older than this process are never its own
AGREEMENT_PREFIX = ".agree-"  # files of the ranks' agreement rounds (see _coordinate)
RENDEZVOUS_PREFIX = ".run-"  # files of the ranks' agreement on their run (see _coordinate)
COORDINATION_PREFIXES = (AGREEMENT_PREFIX, RENDEZVOUS_PREFIX)


def step_dirname(step: int) -> str:
    return f"step-{step:012d}"


def shard_marker(rank: int) -> str:
    return f"{shard_prefix(rank)}done.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint as listed from its manifest."""

    step: int
    path: Path
    manifest: Manifest = field(repr=False)

    @property
    def time(self) -> float:
        return self.manifest.time

    @property
    def metrics(self) -> dict[str, float]:
        return {key: value for key, value in self.manifest.metrics.items() if value is not None}

    @property
    def size(self) -> int:
        return self.manifest.size

    @property
    def world_size(self) -> int:
        """How many ranks wrote it (1 for an unsharded checkpoint)."""
        return self.manifest.world_size


def symlinked(info: CheckpointInfo) -> bool:
    """True if the checkpoint directory, or a file in it, is a symbolic link (an archive linked back in, a `cp -as`
    copy): it is loaded, but never recycled or pruned (nothing is ever written or removed through a link)."""
    try:
        return info.path.is_symlink() or any((info.path / name).is_symlink() for name in [*info.manifest.files,
                                                                                            MANIFEST])
    except OSError:
        return True


def shares_files(info: CheckpointInfo) -> bool:
    """True if a file of the checkpoint has another name too (a `cp -al` or `rsync --link-dest` backup): pruning
    removes only this name, but overwriting it in place would change the backup."""
    try:
        return any(os.lstat(info.path / name).st_nlink > 1 for name in [*info.manifest.files, MANIFEST])
    except OSError:
        return True


def _reusable(info: CheckpointInfo) -> bool:
    """A checkpoint a save may overwrite in place: neither linked nor sharing a file with a backup (logged if not)."""
    if symlinked(info) or shares_files(info):
        log.info("ckpt: %s is linked or has hard-linked files (a backup?); writing a new checkpoint instead of "
                 "reusing it", info.path.name)
        return False
    return True


def verify(info: CheckpointInfo) -> None:
    """Check every file's size and CRC-32 against the manifest."""
    largest = max((entry.size for entry in info.manifest.files.values()), default=0)
    buffer = bytearray(min(CHUNK, largest))
    for name, entry in info.manifest.files.items():
        verify_file(info.path / name, entry, buffer)


@dataclass(frozen=True)
class Fence:
    """Who may commit: one attempt of one incarnation of a job (a restart under the same name is a new one).

    Incarnations are ordered by creation time; the fence file remembers every incarnation that was replaced."""

    incarnation: str
    created: float
    attempt: int

    @property
    def token(self) -> str:
        """A short name for temp directories written under this fence."""
        digest = hashlib.sha1(f"{self.incarnation}/{self.attempt}".encode()).hexdigest()[:8]  # noqa: S324
        return f"a{self.attempt}-{digest}"

    def describe(self) -> str:
        return f"attempt {self.attempt}" + (f" of incarnation {self.incarnation}" if self.incarnation else "")


@dataclass
class Listing:
    """What a checkpoint directory holds: loadable-looking checkpoints (oldest first), damaged ones, ones too new to
    read, and `.prev` copies superseded by a complete re-save (removed at the next save)."""

    good: list[CheckpointInfo] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)
    newer: list[tuple[str, str]] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.good or self.damaged or self.newer)

    def candidates(self) -> list[CheckpointInfo]:
        """What a resume tries, newest first; a newer format than this SDK reads is an error, not skipped."""
        if self.newer:
            raise IncompatibleCheckpointError(self.newer[-1][1])
        return list(reversed(self.good))

    def names(self) -> str:
        return ", ".join([c.path.name for c in self.good] + [name for name, _ in self.damaged])


class Store:
    """One job's checkpoint directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._pruner: threading.Thread | None = None

    # -- listing -------------------------------------------------------------------------------------
    def scan(self) -> Listing:
        """Committed checkpoints with a readable manifest (oldest first), and what was skipped and why."""
        listing = Listing()
        if not self.root.is_dir():
            return listing
        by_step: dict[int, list[str]] = {}
        for name in retry_enoent(lambda: os.listdir(self.root)):
            match = STEP_DIR.match(name)
            if match:
                by_step.setdefault(int(match.group(1)), []).append(name)
        for step, found in sorted(by_step.items()):
            self._scan_step(step, sorted(found), listing)  # `step-N` before `step-N.prev`
        return listing

    def _scan_step(self, step: int, names: builtins.list[str], listing: Listing) -> None:
        """The first loadable-looking copy of one step (the `.prev` copy is used only if needed)."""
        for index, name in enumerate(names):
            path = self.root / name
            try:
                manifest = retry_enoent(functools.partial(read_manifest, path))
            except IncompatibleCheckpointError as exc:
                listing.newer.append((name, str(exc)))
                return
            except (CorruptCheckpointError, FileNotFoundError) as exc:
                log.warning("ckpt: skipping %s: %s", name, exc)
                listing.damaged.append((name, str(exc)))
                continue
            if manifest.step != step:
                log.warning("ckpt: skipping %s: manifest says step %s", name, manifest.step)
                listing.damaged.append((name, f"manifest says step {manifest.step}"))
                continue
            listing.good.append(CheckpointInfo(step, path, manifest))
            listing.superseded += names[index + 1:]
            return

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, oldest first; invalid ones are logged and skipped."""
        return self.scan().good

    # -- fencing -------------------------------------------------------------------------------------
    def read_fence(self) -> dict[str, object] | None:
        try:
            data = json.loads((self.root / FENCE).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            raise CheckpointError(f"{self.root / FENCE} is unreadable; remove it only if no trainer runs") from None
        return data if isinstance(data, dict) else None

    def claim(self, me: Fence) -> None:
        """Make `me` the only writer allowed to commit; refuse if a newer attempt or incarnation owns it."""
        self.root.mkdir(parents=True, exist_ok=True)
        owner = self.read_fence()
        retired: builtins.list[str] = []
        if owner is not None:
            retired = [str(r) for r in owner.get("retired") or []]  # type: ignore[attr-defined]
            same = owner.get("incarnation") == me.incarnation
            owner_attempt = int(str(owner.get("attempt", -1)))
            if same and owner_attempt > me.attempt:
                raise FencedError(f"{self.root} is owned by attempt {owner_attempt}; this is attempt {me.attempt}")
            if not same:
                if me.incarnation in retired or float(str(owner.get("created", 0))) > me.created:
                    raise FencedError(f"{self.root} is owned by a newer incarnation of the job "
                                      f"({owner.get('incarnation')}); this is {me.describe()}")
                retired = [*retired, str(owner.get("incarnation"))][-100:]
            elif owner_attempt == me.attempt:
                return  # already ours
        body = {"incarnation": me.incarnation, "created": me.created, "attempt": me.attempt, "retired": retired,
                "claimed": time.time()}
        point("fence.write")
        write_small_atomically(self.root / FENCE, json.dumps(body).encode())

    def check(self, me: Fence, step: int) -> None:
        """Raise FencedError unless `me` still owns the directory."""
        point("commit.check")
        owner = self.read_fence()
        if owner is None or owner.get("incarnation") != me.incarnation or owner.get("attempt") != me.attempt:
            who = "nobody" if owner is None else f"attempt {owner.get('attempt')} ({owner.get('incarnation') or '-'})"
            raise FencedError(f"{me.describe()} may not commit step {step}: {self.root} is owned by {who}")

    # -- cleaning ------------------------------------------------------------------------------------
    def clean_stale(self, me: Fence, run: str | None = None) -> None:
        """Remove what crashed or fenced-out writers left: temps and coordination files of other attempts, this
        attempt's unshared temps older than this process, `.prev` copies made redundant; with `run` (the ranks of
        this run agreed on it), also this attempt's shared temps and coordination files of other runs."""
        if not self.root.is_dir():
            return
        names = set(os.listdir(self.root))
        for name in names:
            if self._stale(name, me, run):
                log.info("ckpt: removing stale temporary %s", name)
                _remove(self.root / name)
            elif name.endswith(".prev") and name.removesuffix(".prev") in names:
                try:
                    read_manifest(self.root / name.removesuffix(".prev"))
                except CheckpointError:
                    continue
                _remove(self.root / name)

    def _stale(self, name: str, me: Fence, run: str | None) -> bool:
        prefix = next((p for p in (TMP_PREFIX, *COORDINATION_PREFIXES) if name.startswith(p)), None)
        if prefix is None:
            return False
        rest = name[len(prefix):]
        if prefix == TMP_PREFIX and rest.startswith("."):  # a small file's temp (the fence, a rank's join or
            return _older_than_process(self.root / name)  # hello): its writer may be renaming it right now
        if not (rest == me.token or rest.startswith((f"{me.token}-", f"{me.token}."))):
            return True  # another attempt's (or a removal that was interrupted)
        if prefix == RENDEZVOUS_PREFIX:
            return False  # how the ranks of this attempt agree on their run: rewritten by each run
        if prefix in COORDINATION_PREFIXES or "-shared" in rest:  # per run: another rank may have made it before
            return run is not None and not rest.startswith(f"{me.token}-r{run}-")  # this one started
        return _older_than_process(self.root / name)

    # -- writing -------------------------------------------------------------------------------------
    def new_temp(self, step: int, me: Fence, recycle: CheckpointInfo | None = None) -> tuple[Path, bool]:
        """A temporary directory for a new checkpoint, and whether it is `recycle` (one that pruning would delete
        after this save): its files are then overwritten in place instead of freeing and allocating as much space
        again. A checkpoint reached through a symbolic link, or sharing a file with a backup, is never recycled."""
        self.wait_pruned()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{TMP_PREFIX}{me.token}-{step_dirname(step)}-{secrets.token_hex(4)}"
        if recycle is not None and _reusable(recycle):
            try:
                point("recycle.rename")
                os.rename(recycle.path, path)  # invisible from here on: the temp name has no step
                (path / MANIFEST).unlink(missing_ok=True)
                return path, True
            except FileNotFoundError:
                pass
        point("temp.mkdir")
        path.mkdir()
        return path, False

    def shared_temp(self, step: int, me: Fence, run: str, save_number: int) -> Path:
        """The temp directory every rank of run `run` writes its shard of a save into (the same name on every rank:
        each counts its saves the same way; another run's never has this name)."""
        self.wait_pruned()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{TMP_PREFIX}{me.token}-r{run}-{step_dirname(step)}-shared{save_number}"
        point("temp.mkdir")
        path.mkdir(exist_ok=True)
        return path

    def shared_reuse(self, victim: CheckpointInfo | None, me: Fence, run: str, save_number: int) -> Path | None:
        """The checkpoint whose files the ranks of a sharded save overwrite in place (one pruning would delete after
        it), renamed out of sight by whichever rank gets there first; None if there is none. Each rank may name a
        different `victim` (listings race with pruning): the first rename wins, the others leave theirs alone."""
        pool = self.reuse_path(me, run, save_number)
        if victim is not None and _reusable(victim):
            try:
                point("recycle.rename")
                os.rename(victim.path, pool)
                log.debug("ckpt: reusing the files of %s for a sharded save", victim.path.name)
            except FileNotFoundError:
                pass  # another rank renamed it first
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # another rank renamed another one there
                    log.info("ckpt: not reusing %s: %s", victim.path.name, exc)
        return pool if pool.is_dir() else None

    def reuse_path(self, me: Fence, run: str, save_number: int) -> Path:
        """Where `shared_reuse` puts the checkpoint a sharded save reuses (rank 0 removes it after the commit)."""
        return self.root / f"{TMP_PREFIX}{me.token}-r{run}-reused-shared{save_number}"

    def take_files(self, pool: Path, temp: Path, names: Iterable[str]) -> None:
        """Move the files `names` (one rank's shard) from `pool` into `temp`, where they are overwritten in place."""
        for name in names:
            try:
                point("recycle.rename")
                os.rename(pool / name, temp / name)
            except FileNotFoundError:
                pass  # not in that checkpoint (another world size, another state): written new

    def write_shard_marker(self, temp: Path, rank: int, files: Mapping[str, FileEntry]) -> None:
        """Declare this rank's shard durable (its files are fsynced; the marker is written last)."""
        point("shard.marker")
        body = {"rank": rank, "files": {name: entry.to_json() for name, entry in files.items()}}
        write_small_atomically(temp / shard_marker(rank), json.dumps(body).encode())

    def shards_done(self, temp: Path, world_size: int) -> bool:
        return all((temp / shard_marker(rank)).exists() for rank in range(world_size))

    def read_shards(self, temp: Path, world_size: int) -> dict[int, dict[str, FileEntry]]:
        """Every rank's file table, from the markers."""
        shards = {}
        for rank in range(world_size):
            try:
                table = json.loads((temp / shard_marker(rank)).read_bytes())["files"]
                shards[rank] = {str(name): FileEntry.from_json(entry) for name, entry in table.items()}
            except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{temp}: the shard of rank {rank} is not complete ({exc})") from None
        return shards

    def committed(self, step: int, me: Fence) -> CheckpointInfo | None:
        """The checkpoint of `step` if attempt `me` committed it (rank 0 did, for a sharded save)."""
        path = self.root / step_dirname(step)
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            return None
        if manifest.incarnation != me.incarnation or manifest.attempt != me.attempt:
            return None
        return CheckpointInfo(step, path, manifest)

    def commit(self, temp: Path, me: Fence, manifest: Manifest) -> CheckpointInfo:
        """Write the manifest last, fsync, rename into place; refuse if another writer owns the directory."""
        step = manifest.step
        final = self.root / step_dirname(step)
        try:
            point("manifest.write")
            write_file(temp / MANIFEST, [manifest.to_json()])
            fsync_dir(temp)
            self.check(me, step)
            self._rename_into_place(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        try:
            self.check(me, step)  # fenced while renaming: take the commit back
        except FencedError:
            self.delete(CheckpointInfo(step, final, manifest))
            raise
        return CheckpointInfo(step, final, manifest)

    def _rename_into_place(self, temp: Path, final: Path) -> None:
        """Rename `temp` to `final`; re-saving a step keeps the old copy listable as `.prev` until the new one is in."""
        if os.path.lexists(final):
            previous = final.with_name(final.name + ".prev")
            _remove(previous)
            point("resave.rename")
            os.rename(final, previous)
            fsync_dir(self.root)
            point("commit.rename")
            os.rename(temp, final)
            fsync_dir(self.root)
            _remove(previous)
        else:
            point("commit.rename")
            os.rename(temp, final)
            fsync_dir(self.root)

    # -- pruning -------------------------------------------------------------------------------------
    def wait_pruned(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def delete(self, info: CheckpointInfo, background: bool = False) -> bool:
        """Make a checkpoint invisible first (rename), then remove it (on a helper thread if `background`); False if
        it is reached through a link (never deleted: it is somebody's backup or archive).

        An interrupted removal leaves a `.tmp-deleting-*` directory that the next writer cleans up."""
        if symlinked(info):
            log.warning("ckpt: not pruning %s: it is (or holds) a symbolic link, maybe to an archive; remove it by "
                        "hand when it is no longer needed", info.path.name)
            return False
        return self.delete_directory(info.path, background)

    def delete_directory(self, path: Path, background: bool = False) -> bool:
        """Rename a directory of `root` out of sight, then remove it; a symbolic link is never deleted."""
        if path.is_symlink():
            log.warning("ckpt: not deleting %s: it is a symbolic link", path.name)
            return False
        trash = self.root / f"{TMP_PREFIX}deleting-{path.name}-{secrets.token_hex(4)}"
        try:
            point("prune.rename")
            os.rename(path, trash)
        except FileNotFoundError:
            return True
        if background:
            self.wait_pruned()
            self._pruner = threading.Thread(target=_remove, args=(trash,), name="ckpt-prune", daemon=True)
            self._pruner.start()
        else:
            _remove(trash)
        return True


def _older_than_process(path: Path) -> bool:
    try:
        return path.lstat().st_mtime < _PROCESS_START
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a directory tree (links inside are not followed)."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError as exc:
        log.debug("ckpt: could not remove %s: %s", path, exc)


__all__ = ["CheckpointInfo", "Fence", "Listing", "Store"]
