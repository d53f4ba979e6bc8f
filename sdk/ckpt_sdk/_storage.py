"""The storage layer: durable files, atomic directory commits, listings, fencing and pruning.

A checkpoint is a directory `step-<12 digits>/` holding data files and `MANIFEST.json`, which is written last.
It is built in `.tmp-*` next to its final name, fsynced, renamed into place, and the parent fsynced. Re-saving a
step moves the old copy to `step-<12 digits>.prev` first; the listing falls back to it until the new one is in.

A sharded checkpoint (several ranks) is built in one shared temp directory: each rank writes its files prefixed
`rank-<5 digits>.` and then its marker `rank-<5 digits>.done.json`; rank 0, once every marker is there, writes the
manifest (format ckpt-sdk/2, naming every rank's files) and renames the directory into place. A checkpoint missing
a shard never gets a manifest, so it is never listed.
"""

from __future__ import annotations

import builtins
import errno
import functools
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from ._errors import CheckpointError, CorruptCheckpointError, FencedError, IncompatibleCheckpointError
from ._faults import point

log = logging.getLogger("ckpt_sdk")

FORMAT = "ckpt-sdk/1"
SHARDED_FORMAT = "ckpt-sdk/2"  # written only for sharded checkpoints, so older readers refuse them cleanly
FORMAT_VERSION = 2
MANIFEST = "MANIFEST.json"
FENCE = ".fence"
_STEP_DIR = re.compile(r"^step-(\d{12})(\.prev)?$")
_TMP_PREFIX = ".tmp-"
_STOP_PREFIX = ".stop-"  # a multi-rank stop request without torch.distributed (see Checkpointer)
CHUNK = 32 << 20
ALIGN = 4096  # direct I/O: memory, file offsets and lengths in multiples of this (any logical block size up to 4 KiB)
DIRECT_CHUNK = 128 << 20  # one direct write; over NFS the client sends a COMMIT after each, so not too small
_PROCESS_START = time.time() - 1.0  # temps older than this process are never its own
_Share = TypeVar("_Share")
_Result = TypeVar("_Result")


def step_dirname(step: int) -> str:
    return f"step-{step:012d}"


def shard_prefix(rank: int) -> str:
    """The file-name prefix of one rank's files in a sharded checkpoint."""
    return f"rank-{rank:05d}."


def _shard_marker(rank: int) -> str:
    return f"{shard_prefix(rank)}done.json"


class _Checksum:
    """CRC-32 of a byte stream, computed on a helper thread so hashing overlaps the I/O (both drop the GIL)."""

    def __init__(self) -> None:
        self.value = 0
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ckpt-crc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.value = zlib.crc32(chunk, self.value)

    def update(self, chunk: memoryview) -> None:
        self._queue.put(chunk)

    def result(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return f"{self.value:08x}"


def write_file(path: Path, parts: Iterable[memoryview | bytes], *, direct: bool = False, size: int | None = None
               ) -> dict[str, Any]:
    """Write `parts` to the file, fsync it and check close(); return its size and checksum.

    A file left by a recycled checkpoint is overwritten in place (its blocks are reused, then truncated).
    `direct`: with O_DIRECT, in DIRECT_CHUNK writes (the parts page-aligned, whole blocks). `size`: the file's real
    size when the parts run past it (a last block written whole): only that much is checksummed and kept.
    """
    checksum = _Checksum()
    total = 0
    step = DIRECT_CHUNK if direct else CHUNK
    point("file.open")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, view.nbytes, step):
                chunk = view[start : start + step]
                checksum.update(chunk if size is None else chunk[: max(0, size - total)])
                point("file.write")
                written = 0
                while written < chunk.nbytes:
                    written += os.write(fd, chunk[written:])
                total += chunk.nbytes
        total = total if size is None else size
        os.ftruncate(fd, total)
        point("file.fsync")
        os.fsync(fd)
    except BaseException:
        checksum.result()
        os.close(fd)
        raise
    point("file.close")
    os.close(fd)  # NFS reports deferred write errors here
    return {"size": total, "crc32": checksum.result()}


def write_image(path: Path, padded: memoryview, size: int, direct: bool) -> dict[str, Any]:
    """Write a file's first `size` bytes from `padded` (page-aligned memory, `size` rounded up to ALIGN); `direct`:
    with O_DIRECT (no copy into the page cache, no writeback left for the kernel to do on training's cores) unless
    the file system refuses it. Returns its size and checksum, as `write_file`."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return write_file(path, [padded], direct=True, size=size)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # refused at open (tmpfs, some FUSE mounts) or at a write (alignment)
                raise
    return write_file(path, [padded[:size]])


def write_small_atomically(path: Path, data: bytes) -> None:
    """Replace a small file atomically and durably (temp file, fsync, rename, directory fsync)."""
    temp = path.with_name(f"{_TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        write_file(temp, [data])
        point("fence.rename")
        os.rename(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def pread_into(fd: int, target: memoryview, offset: int) -> None:
    """Fill `target` from `fd` at `offset`; raise CorruptCheckpointError on a short file."""
    got = 0
    while got < target.nbytes:
        count = os.preadv(fd, [target[got:]], offset + got)
        if count == 0:
            raise CorruptCheckpointError("file is truncated")
        got += count


READ_THREADS = max(1, min(4, os.cpu_count() or 1))
_CRC_POLY = 0xEDB88320  # CRC-32 (zlib's), bit-reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (reflected bit order), as zlib's crc32_combine does it."""
    mask, product = 1 << 31, 0
    while a:
        if a & mask:
            product ^= b
            a ^= mask
        mask >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A+B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine, which Python's zlib lacks)."""
    power, k = 1 << 31, 3  # x^(8 * length2): 2^3 bits per byte
    while length2:
        if length2 & 1:
            power = _multmodp(_X2N[k & 31], power)
        length2 >>= 1
        k += 1
    return _multmodp(power, crc1) ^ crc2


def read_pieces(fd: int, pieces: list[tuple[int, memoryview]], threads: int = READ_THREADS
                ) -> list[tuple[int, int, int]]:
    """Fill each (file offset, destination) with `pread`, on up to `threads` threads over contiguous byte ranges
    (reads and CRC-32 both drop the GIL; page faults of fresh memory run on every core); return the CRC-32 of each
    contiguous run read, as (offset, length, crc), in file order. Raises CorruptCheckpointError on a short file."""
    total = sum(view.nbytes for _, view in pieces)
    count = max(1, min(threads, total // CHUNK))
    shares: list[list[tuple[int, memoryview]]] = [[] for _ in range(count)]
    ends = [total * (i + 1) // count for i in range(count)]  # where each share ends, in bytes read
    index = done = 0
    for offset, view in pieces:  # split at byte boundaries, so every thread reads about as much
        start = 0
        while start < view.nbytes:
            while done >= ends[index]:
                index += 1
            end = min(view.nbytes, start + ends[index] - done)
            shares[index].append((offset + start, view[start:end]))
            done += end - start
            start = end

    def read(share: list[tuple[int, memoryview]]) -> list[tuple[int, int, int]]:
        runs: list[tuple[int, int, int]] = []
        for offset, view in share:
            for start in range(0, view.nbytes, CHUNK):
                chunk = view[start : start + CHUNK]
                pread_into(fd, chunk, offset + start)
                if runs and runs[-1][0] + runs[-1][1] == offset + start:  # extends the current run
                    run_offset, length, crc = runs[-1]
                    runs[-1] = (run_offset, length + chunk.nbytes, zlib.crc32(chunk, crc))
                else:
                    runs.append((offset + start, chunk.nbytes, zlib.crc32(chunk)))
        return runs

    return [run for runs in on_threads(shares, read, "ckpt-read") for run in runs]


def on_threads(shares: Sequence[_Share], work: Callable[[_Share], _Result], name: str) -> list[_Result]:
    """`work(share)` for every share at once: the first on the calling thread, the others on helper threads named
    `name`. Returns the results in order, or re-raises here the first error any of them raised."""
    results: list[_Result | None] = [None] * len(shares)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = work(shares[index])
        except BaseException as exc:
            errors.append(exc)

    helpers = [threading.Thread(target=run, args=(i,), name=name) for i in range(1, len(shares))]
    for helper in helpers:
        helper.start()
    run(0)
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
    return cast("list[_Result]", results)


def combine_runs(crc: int, offset: int, runs: Iterable[tuple[int, int, int]], end: int) -> int:
    """Extend the CRC-32 of a file's bytes [0, offset) by `runs` (offset, length, crc); they must tile [offset,
    end) exactly, or the file was not read whole."""
    for run_offset, length, run_crc in sorted(runs):
        if run_offset != offset:
            raise CorruptCheckpointError(f"read gap at byte {offset}")
        crc = crc32_combine(crc, run_crc, length)
        offset += length
    if offset != end:
        raise CorruptCheckpointError(f"read ended at byte {offset} of {end}")
    return crc


def fsync_dir(path: Path) -> None:
    point("dir.fsync")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _retry_enoent(fn: Callable[[], Any], attempts: int = 5) -> Any:
    """NFS listings can name entries that vanish before they are stat'ed; retry a few times."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            if i == attempts - 1:
                raise
            time.sleep(0.05 * (2**i))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint as listed from its manifest."""

    step: int
    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def time(self) -> float:
        return float(self.manifest.get("time", 0.0))

    @property
    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in (self.manifest.get("metrics") or {}).items() if v is not None}

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"].values())

    @property
    def world_size(self) -> int:
        """How many ranks wrote it (1 for an unsharded checkpoint)."""
        return int(self.manifest.get("world_size", 1))


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a checkpoint's manifest; raise CorruptCheckpointError if it is not usable and
    IncompatibleCheckpointError if a newer ckpt_sdk wrote it."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)") from None
    except NotADirectoryError:
        raise CorruptCheckpointError(f"{path}: not a directory") from None
    try:
        manifest = json.loads(raw)
        fmt = manifest["format"]
        name, _, version = str(fmt).partition("/")
        if name == "ckpt-sdk" and version.isdigit() and int(version) > FORMAT_VERSION:
            raise IncompatibleCheckpointError(
                f"{path}: written in format {fmt} by ckpt_sdk {manifest.get('sdk_version', '?')}; this ckpt_sdk "
                f"reads {FORMAT} only: upgrade ckpt_sdk to load it")
        files = manifest["files"]
        ok = fmt in (FORMAT, SHARDED_FORMAT) and isinstance(manifest["step"], int) and isinstance(files, dict)
        ok = ok and all("/" not in n and not n.startswith(".") and {"size", "crc32"} <= set(v)
                        for n, v in files.items())
        if ok and fmt == SHARDED_FORMAT:  # every rank's shard is named, and only files the manifest lists
            world, shards = manifest["world_size"], manifest["shards"]
            ok = isinstance(world, int) and world >= 1 and set(shards) == {str(r) for r in range(world)}
            ok = ok and all(isinstance(names, list) and set(names) <= set(files) for names in shards.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CorruptCheckpointError(f"{path}: {MANIFEST} is malformed")
    return dict(manifest)


def verify(info: CheckpointInfo) -> None:
    """Check every file's size and CRC-32 against the manifest."""
    buffer = bytearray(min(CHUNK, max((int(m["size"]) for m in info.manifest["files"].values()), default=0)))
    for name, meta in info.manifest["files"].items():
        file = info.path / name
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{file}: missing") from None
        try:
            if os.fstat(fd).st_size != meta["size"]:
                raise CorruptCheckpointError(f"{file}: size {os.fstat(fd).st_size} != manifest {meta['size']}")
            crc = 0
            for start in range(0, int(meta["size"]), CHUNK):
                view = memoryview(buffer)[: min(CHUNK, meta["size"] - start)]
                try:
                    pread_into(fd, view, start)
                except CorruptCheckpointError:
                    raise CorruptCheckpointError(f"{file}: truncated") from None
                crc = zlib.crc32(view, crc)
            if f"{crc:08x}" != meta["crc32"]:
                raise CorruptCheckpointError(f"{file}: checksum mismatch")
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Fence:
    """Who may commit: one attempt of one incarnation of a job (a restart under the same name is a new one).

    Incarnations are ordered by creation time; `retired` remembers every incarnation that was replaced."""

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
    """What a checkpoint directory holds: loadable-looking checkpoints, damaged ones and ones too new to read."""

    good: list[CheckpointInfo]
    damaged: list[tuple[str, str]]
    newer: list[tuple[str, str]]


class Store:
    """One job's checkpoint directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._pruner: threading.Thread | None = None

    # -- listing -------------------------------------------------------------------------------------
    def scan(self) -> Listing:
        """Committed checkpoints with a readable manifest (oldest first), and what was skipped and why."""
        listing = Listing([], [], [])
        if not self.root.is_dir():
            return listing
        names: list[str] = _retry_enoent(lambda: os.listdir(self.root))
        by_step: dict[int, list[str]] = {}
        for name in names:
            m = _STEP_DIR.match(name)
            if m:
                by_step.setdefault(int(m.group(1)), []).append(name)
        for step, found in sorted(by_step.items()):
            for name in sorted(found):  # `step-N` before `step-N.prev`: the fallback is used only if needed
                path = self.root / name
                try:
                    manifest = _retry_enoent(functools.partial(read_manifest, path))
                except IncompatibleCheckpointError as exc:
                    listing.newer.append((name, str(exc)))
                    break
                except (CorruptCheckpointError, FileNotFoundError) as exc:
                    log.warning("ckpt: skipping %s: %s", name, exc)
                    listing.damaged.append((name, str(exc)))
                    continue
                if manifest["step"] != step:
                    log.warning("ckpt: skipping %s: manifest says step %s", name, manifest["step"])
                    listing.damaged.append((name, f"manifest says step {manifest['step']}"))
                    continue
                listing.good.append(CheckpointInfo(step, path, manifest))
                break
        return listing

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, oldest first; invalid ones are logged and skipped."""
        return self.scan().good

    # -- fencing -------------------------------------------------------------------------------------
    def read_fence(self) -> dict[str, Any] | None:
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
        retired: list[str] = []
        if owner is not None:
            retired = [str(r) for r in owner.get("retired") or []]
            same = owner.get("incarnation") == me.incarnation
            if same and int(owner.get("attempt", -1)) > me.attempt:
                raise FencedError(f"{self.root} is owned by attempt {owner['attempt']}; this is attempt {me.attempt}")
            if not same:
                if me.incarnation in retired or float(owner.get("created", 0)) > me.created:
                    raise FencedError(f"{self.root} is owned by a newer incarnation of the job "
                                      f"({owner.get('incarnation')}); this is {me.describe()}")
                retired = [*retired, str(owner.get("incarnation"))][-100:]
            elif int(owner.get("attempt", -1)) == me.attempt:
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

    # -- writing -------------------------------------------------------------------------------------
    def clean_stale(self, me: Fence, shared: bool = False) -> None:
        """Remove temp directories of crashed or fenced-out writers, and `.prev` copies made redundant.

        Temps written under `me` are left alone unless they predate this process (another Checkpointer of this
        process may have a save in flight); with `shared` (ranks of one attempt write one temp together), temps
        and stop markers of `me` are always left alone: another rank may have made them before this one started."""
        if not self.root.is_dir():
            return
        names = set(os.listdir(self.root))
        for name in names:
            path = self.root / name
            if name.startswith(_STOP_PREFIX):  # another attempt's, or older than this process: a run before this
                try:
                    if not name.startswith(f"{_STOP_PREFIX}{me.token}") or path.stat().st_mtime < _PROCESS_START:
                        path.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            if name.startswith(_TMP_PREFIX):
                if name.startswith(f"{_TMP_PREFIX}{me.token}-") or name.startswith(f"{_TMP_PREFIX}{FENCE}"):
                    try:
                        if shared or path.stat().st_mtime >= _PROCESS_START:
                            continue
                    except FileNotFoundError:
                        continue
                log.info("ckpt: removing stale temporary %s", name)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            elif name.endswith(".prev") and name.removesuffix(".prev") in names:
                try:
                    read_manifest(self.root / name.removesuffix(".prev"))
                except CheckpointError:
                    continue
                shutil.rmtree(path, ignore_errors=True)

    def new_temp(self, step: int, me: Fence, recycle: CheckpointInfo | None = None) -> Path:
        """A temporary directory for a new checkpoint; `recycle` (one that pruning would delete after this save)
        becomes it, so its files are overwritten in place instead of freeing and allocating as much space again."""
        self.wait_pruned()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{_TMP_PREFIX}{me.token}-{step_dirname(step)}-{secrets.token_hex(4)}"
        if recycle is not None:
            try:
                point("recycle.rename")
                os.rename(recycle.path, path)  # invisible from here on: the temp name has no step
                (path / MANIFEST).unlink(missing_ok=True)
                return path
            except FileNotFoundError:
                pass
        point("temp.mkdir")
        path.mkdir()
        return path

    # -- sharded checkpoints -------------------------------------------------------------------------
    def shared_temp(self, step: int, me: Fence, save_number: int) -> Path:
        """The temp directory every rank of attempt `me` writes its shard of a save into (the same name on every
        rank: each counts its saves the same way)."""
        self.wait_pruned()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{_TMP_PREFIX}{me.token}-{step_dirname(step)}-shared{save_number}"
        point("temp.mkdir")
        path.mkdir(exist_ok=True)
        return path

    def write_shard_marker(self, temp: Path, rank: int, files: dict[str, Any]) -> None:
        """Declare this rank's shard durable (its files are fsynced; the marker is written last)."""
        point("shard.marker")
        write_small_atomically(temp / _shard_marker(rank), json.dumps({"rank": rank, "files": files}).encode())

    def shards_done(self, temp: Path, world_size: int) -> bool:
        return all((temp / _shard_marker(rank)).exists() for rank in range(world_size))

    def read_shards(self, temp: Path, world_size: int) -> dict[int, dict[str, Any]]:
        """Every rank's file table, from the markers."""
        shards = {}
        for rank in range(world_size):
            try:
                shards[rank] = json.loads((temp / _shard_marker(rank)).read_bytes())["files"]
            except (FileNotFoundError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{temp}: the shard of rank {rank} is not complete ({exc})") from None
        return shards

    def committed(self, step: int, me: Fence) -> CheckpointInfo | None:
        """The checkpoint of `step` if attempt `me` committed it (rank 0 did, for a sharded save)."""
        path = self.root / step_dirname(step)
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            return None
        if manifest.get("incarnation") != me.incarnation or manifest.get("attempt") != me.attempt:
            return None
        return CheckpointInfo(step, path, manifest)

    def request_stop(self, me: Fence, rank: int, step: int) -> None:
        """Tell the other ranks of attempt `me` to stop, and at which step this rank is."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / f"{_STOP_PREFIX}{me.token}").touch()
        write_small_atomically(self._stop_step_file(me, rank), str(step).encode())

    def _stop_step_file(self, me: Fence, rank: int) -> Path:
        return self.root / f"{_STOP_PREFIX}{me.token}-{shard_prefix(rank)}step"

    def clear_stop(self, me: Fence) -> None:
        """Remove a stop request once its checkpoint is committed (every rank knew the step before it saved)."""
        for path in self.root.glob(f"{_STOP_PREFIX}{me.token}*"):
            path.unlink(missing_ok=True)

    def stop_requested(self, me: Fence) -> bool:
        return (self.root / f"{_STOP_PREFIX}{me.token}").exists()

    def stop_steps(self, me: Fence, world_size: int) -> dict[int, int]:
        """The step each rank stood at when it joined the stop (ranks that have not joined are absent)."""
        steps = {}
        for rank in range(world_size):
            try:
                steps[rank] = int(self._stop_step_file(me, rank).read_text())
            except (FileNotFoundError, ValueError):
                continue
        return steps

    def commit(self, temp: Path, step: int, me: Fence, manifest: dict[str, Any]) -> CheckpointInfo:
        """Write the manifest last, fsync, rename into place; refuse if another writer owns the directory."""
        final = self.root / step_dirname(step)
        try:
            body = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode()
            point("manifest.write")
            write_file(temp / MANIFEST, [body])
            fsync_dir(temp)
            self.check(me, step)
            if final.exists():  # re-saving a step: keep the old copy listable as `.prev` until the new one is in
                previous = final.with_name(final.name + ".prev")
                shutil.rmtree(previous, ignore_errors=True)
                point("resave.rename")
                os.rename(final, previous)
                fsync_dir(self.root)
                point("commit.rename")
                os.rename(temp, final)
                fsync_dir(self.root)
                shutil.rmtree(previous, ignore_errors=True)
            else:
                point("commit.rename")
                os.rename(temp, final)
                fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        try:
            self.check(me, step)  # fenced while renaming: take the commit back
        except FencedError:
            self.delete(CheckpointInfo(step, final, manifest))
            raise
        return CheckpointInfo(step, final, manifest)

    def wait_pruned(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def delete(self, info: CheckpointInfo, background: bool = False) -> None:
        """Make a checkpoint invisible first (rename), then remove it (on a helper thread if `background`).

        An interrupted removal leaves a `.tmp-deleting-*` directory that the next writer cleans up.
        """
        trash = self.root / f"{_TMP_PREFIX}deleting-{info.path.name}-{secrets.token_hex(4)}"
        try:
            point("prune.rename")
            os.rename(info.path, trash)
        except FileNotFoundError:
            return
        if background:
            self.wait_pruned()
            self._pruner = threading.Thread(target=shutil.rmtree, args=(trash, True), name="ckpt-prune", daemon=True)
            self._pruner.start()
        else:
            shutil.rmtree(trash, ignore_errors=True)


def hard_linked(info: CheckpointInfo) -> bool:
    """True if a file of the checkpoint has other hard links (a `cp -al` backup): never overwrite it in place."""
    try:
        return any(os.stat(info.path / name).st_nlink > 1 for name in [*info.manifest["files"], MANIFEST])
    except OSError:
        return True


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


__all__ = ["CheckpointInfo", "Fence", "Listing", "Store"]
