"""The storage layer: durable files, atomic directory commits, listings, fencing and pruning.

A checkpoint is a directory `step-<12 digits>/` holding data files and `MANIFEST.json`, which is written last.
It is built in `.tmp-*` next to its final name, fsynced, renamed into place, and the parent fsynced.
"""

from __future__ import annotations

import builtins
import errno
import functools
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import CheckpointError, CorruptCheckpointError, FencedError

log = logging.getLogger("ckpt_sdk")

FORMAT = "ckpt-sdk/1"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d{12})$")
_TMP_PREFIX = ".tmp-"
_FENCE = re.compile(r"^\.fence-(\d{9})$")
CHUNK = 32 << 20


def step_dirname(step: int) -> str:
    return f"step-{step:012d}"


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


def _chunks(data: memoryview) -> Iterator[memoryview]:
    for start in range(0, data.nbytes, CHUNK):
        yield data[start : start + CHUNK]


def write_file(path: Path, parts: Iterable[memoryview | bytes]) -> dict[str, Any]:
    """Write `parts` to the file, fsync it and check close(); return its size and checksum.

    A file left by a recycled checkpoint is overwritten in place (its blocks are reused, then truncated).
    """
    checksum = _Checksum()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            for chunk in _chunks(view):
                checksum.update(chunk)
                written = 0
                while written < chunk.nbytes:
                    written += os.write(fd, chunk[written:])
                size += chunk.nbytes
        os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException:
        checksum.result()
        os.close(fd)
        raise
    os.close(fd)  # NFS reports deferred write errors here
    return {"size": size, "crc32": checksum.result()}


def read_exact(fd: int, target: memoryview, checksum: _Checksum | None) -> None:
    """Fill `target` from the current offset of `fd`, feeding the checksum; raise on a short file."""
    for chunk in _chunks(target):
        got = 0
        while got < chunk.nbytes:
            n = os.readv(fd, [chunk[got:]])
            if n == 0:
                raise CorruptCheckpointError("file is truncated")
            got += n
        if checksum is not None:
            checksum.update(chunk)


def fsync_dir(path: Path) -> None:
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
        return dict(self.manifest.get("metrics") or {})

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"].values())


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a checkpoint's manifest; raise CorruptCheckpointError if it is not usable."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)") from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        ok = manifest.get("format") == FORMAT and isinstance(manifest["step"], int) and isinstance(files, dict)
        ok = ok and all("/" not in n and not n.startswith(".") and {"size", "crc32"} <= set(v)
                        for n, v in files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CorruptCheckpointError(f"{path}: {MANIFEST} is malformed")
    return dict(manifest)


def verify(info: CheckpointInfo) -> None:
    """Check every file's size and CRC-32 against the manifest."""
    for name, meta in info.manifest["files"].items():
        file = info.path / name
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{file}: missing") from None
        try:
            if os.fstat(fd).st_size != meta["size"]:
                raise CorruptCheckpointError(f"{file}: size {os.fstat(fd).st_size} != manifest {meta['size']}")
            checksum = _Checksum()
            try:
                for start in range(0, int(meta["size"]), CHUNK):  # a fresh buffer per chunk: the CRC runs behind
                    read_exact(fd, memoryview(bytearray(min(CHUNK, meta["size"] - start))), checksum)
            except CorruptCheckpointError:
                raise CorruptCheckpointError(f"{file}: truncated") from None
            finally:
                crc = checksum.result()
            if crc != meta["crc32"]:
                raise CorruptCheckpointError(f"{file}: checksum mismatch")
        finally:
            os.close(fd)


class Store:
    """One job's checkpoint directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._pruner: threading.Thread | None = None

    # -- listing -------------------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, oldest first; invalid ones are logged and skipped."""
        if not self.root.is_dir():
            return []
        names: list[str] = _retry_enoent(lambda: os.listdir(self.root))
        found = []
        for name in names:
            m = _STEP_DIR.match(name)
            if not m:
                continue
            path = self.root / name
            try:
                manifest = _retry_enoent(functools.partial(read_manifest, path))
            except (CorruptCheckpointError, FileNotFoundError) as exc:
                log.warning("ckpt: skipping %s: %s", name, exc)
                continue
            if manifest["step"] != int(m.group(1)):
                log.warning("ckpt: skipping %s: manifest says step %s", name, manifest["step"])
                continue
            found.append(CheckpointInfo(int(m.group(1)), path, manifest))
        return sorted(found, key=lambda c: c.step)

    def list_or_single(self) -> builtins.list[CheckpointInfo]:
        """Like list(), but `root` may also be one checkpoint directory (a `step-...` dir with a manifest)."""
        if (self.root / MANIFEST).exists():
            try:
                manifest = read_manifest(self.root)
            except CorruptCheckpointError as exc:
                log.warning("ckpt: skipping %s: %s", self.root, exc)
                return []
            return [CheckpointInfo(int(manifest["step"]), self.root, manifest)]
        return self.list()

    # -- fencing -------------------------------------------------------------------------------------
    def claim(self, attempt: int) -> None:
        """Record that `attempt` now writes here; older attempts' commits will be refused."""
        self.root.mkdir(parents=True, exist_ok=True)
        fence = self.root / f".fence-{attempt:09d}"
        if not fence.exists():
            fence.touch()
            fsync_dir(self.root)
        newest = self.newest_attempt()
        if newest > attempt:
            raise FencedError(f"{self.root} is owned by attempt {newest}; this is attempt {attempt}")
        for name in os.listdir(self.root):  # only the newest marker matters; older ones would pile up
            m = _FENCE.match(name)
            if m and int(m.group(1)) < attempt:
                (self.root / name).unlink(missing_ok=True)

    def newest_attempt(self) -> int:
        names = _retry_enoent(lambda: os.listdir(self.root)) if self.root.is_dir() else []
        return max((int(m.group(1)) for n in names if (m := _FENCE.match(n))), default=-1)

    # -- writing -------------------------------------------------------------------------------------
    def clean_stale(self, attempt: int) -> None:
        """Remove temp directories left by this or older attempts (crashed mid-save)."""
        if not self.root.is_dir():
            return
        for name in os.listdir(self.root):
            if name.startswith(_TMP_PREFIX):
                m = re.match(r"^\.tmp-a(\d+)-", name)
                if m is None or int(m.group(1)) <= attempt:
                    log.info("ckpt: removing stale temporary %s", name)
                    shutil.rmtree(self.root / name, ignore_errors=True)

    def new_temp(self, step: int, attempt: int, recycle: CheckpointInfo | None = None) -> Path:
        """A temporary directory for a new checkpoint; `recycle` (one that pruning would delete after this save)
        becomes it, so its files are overwritten in place instead of freeing and allocating as much space again."""
        self.wait_pruned()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{_TMP_PREFIX}a{attempt}-{step_dirname(step)}-{secrets.token_hex(4)}"
        if recycle is not None:
            try:
                os.rename(recycle.path, path)  # invisible from here on: the temp name has no step
                (path / MANIFEST).unlink(missing_ok=True)
                return path
            except FileNotFoundError:
                pass
        path.mkdir()
        return path

    def commit(self, temp: Path, step: int, attempt: int, manifest: dict[str, Any]) -> CheckpointInfo:
        """Write the manifest last, fsync, rename into place; refuse if a newer attempt owns the directory."""
        try:
            body = json.dumps(manifest, indent=1, sort_keys=True).encode()
            write_file(temp / MANIFEST, [body])
            fsync_dir(temp)
            newest = self.newest_attempt()
            if newest > attempt:
                raise FencedError(f"attempt {attempt} may not commit step {step}: attempt {newest} owns {self.root}")
            final = self.root / step_dirname(step)
            if final.exists():  # re-saving a step (e.g. after resume): replace it atomically via a trash name
                trash = self.root / f"{_TMP_PREFIX}a{attempt}-old-{final.name}-{secrets.token_hex(4)}"
                os.rename(final, trash)
                os.rename(temp, final)
                fsync_dir(self.root)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(temp, final)
                fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
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
            os.rename(info.path, trash)
        except FileNotFoundError:
            return
        if background:
            self.wait_pruned()
            self._pruner = threading.Thread(target=shutil.rmtree, args=(trash, True), name="ckpt-prune", daemon=True)
            self._pruner.start()
        else:
            shutil.rmtree(trash, ignore_errors=True)


def disk_error_message(exc: OSError, root: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"checkpoint directory {root} is out of space ({exc.strerror}); older checkpoints were kept"
    return f"writing a checkpoint under {root} failed: {exc}"


__all__ = ["CheckpointError", "CheckpointInfo", "Store"]
