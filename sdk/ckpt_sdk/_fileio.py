"""File I/O of the storage layer: durable writes (fsync, close checked, O_DIRECT where allowed), small atomic
replacements, and parallel verified reads whose per-range CRC-32s combine into the file's.

Files are never opened through a symbolic link for writing (O_NOFOLLOW): a link in a checkpoint directory (a backup
made with `cp -as`, an archive linked back in) is never written through.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from ._errors import CorruptCheckpointError
from ._faults import point

CHUNK = 32 << 20
ALIGN = 4096  # direct I/O: memory, file offsets and lengths in multiples of this (any logical block size up to 4 KiB)
DIRECT_CHUNK = 128 << 20  # one direct write; over NFS the client sends a COMMIT after each, so not too small
TMP_PREFIX = ".tmp-"
_Share = TypeVar("_Share")
_Result = TypeVar("_Result")


BLOCK = 8 << 20  # a file's CRC-32 is also kept per block of this many bytes: a load may read only what it needs


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint as its manifest records it."""

    size: int
    crc32: str  # 8 lowercase hex digits
    blocks: tuple[str, ...] = ()  # the CRC-32 of each `block` bytes of the file (files of more than one block)
    block: int = 0

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"size": self.size, "crc32": self.crc32}
        if self.blocks:
            body.update(block=self.block, blocks=list(self.blocks))
        return body

    @classmethod
    def from_json(cls, body: dict[str, object]) -> FileEntry:
        """An entry from its JSON; ValueError or TypeError if it is malformed."""
        size, crc, blocks, block = body["size"], str(body["crc32"]), body.get("blocks") or [], body.get("block", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not _is_crc(crc):
            raise ValueError("bad size or checksum")
        if not isinstance(blocks, list) or not all(_is_crc(str(b)) for b in blocks) or not isinstance(block, int) \
                or (blocks and (block < 1 or len(blocks) != -(-size // block))):
            raise ValueError("bad block checksums")
        return cls(size, crc, tuple(str(b) for b in blocks), block if blocks else 0)


def _is_crc(text: str) -> bool:
    return len(text) == 8 and all(c in "0123456789abcdef" for c in text)


class _Checksum:
    """CRC-32 of a byte stream, per BLOCK and whole, computed on a helper thread so hashing overlaps the I/O (both
    drop the GIL). The whole file's comes from the blocks' (one polynomial product each, see crc32_combine)."""

    def __init__(self) -> None:
        self.block = BLOCK
        self.blocks: list[int] = []
        self._current = self._filled = 0
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ckpt-crc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            while chunk.nbytes:
                take = min(chunk.nbytes, self.block - self._filled)
                self._current = zlib.crc32(chunk[:take], self._current)
                self._filled += take
                chunk = chunk[take:]
                if self._filled == self.block:
                    self.blocks.append(self._current)
                    self._current = self._filled = 0

    def update(self, chunk: memoryview) -> None:
        self._queue.put(chunk)

    def result(self) -> tuple[str, tuple[str, ...]]:
        """The whole stream's CRC-32, and each block's when there is more than one block."""
        self._queue.put(None)
        self._thread.join()
        crc = 0
        power = _power(self.block)
        for block in self.blocks:
            crc = _multmodp(power, crc) ^ block
        last = self._filled
        if last:
            crc = crc32_combine(crc, self._current, last)
        blocks = [*self.blocks, self._current] if last else list(self.blocks)
        return f"{crc:08x}", tuple(f"{b:08x}" for b in blocks) if len(blocks) > 1 else ()


def write_file(path: Path, parts: Iterable[memoryview | bytes], *, direct: bool = False, size: int | None = None
               ) -> FileEntry:
    """Write `parts` to the file, fsync it and check close(); return its size and checksum.

    A file left by a recycled checkpoint is overwritten in place (its blocks are reused, then truncated).
    `direct`: with O_DIRECT, in DIRECT_CHUNK writes (the parts page-aligned, whole blocks). `size`: the file's real
    size when the parts run past it (a last block written whole): only that much is checksummed and kept.
    """
    checksum = _Checksum()
    total = 0
    step = DIRECT_CHUNK if direct else CHUNK
    point("file.open")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_DIRECT if direct else 0), 0o644)
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
    crc, blocks = checksum.result()
    return FileEntry(total, crc, blocks, checksum.block if blocks else 0)


def write_image(path: Path, padded: memoryview, size: int, direct: bool) -> FileEntry:
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
    temp = path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
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
    return _multmodp(_power(length2), crc1) ^ crc2


@functools.lru_cache(maxsize=4)
def _power(length: int) -> int:
    """x^(8 * length) modulo the polynomial: crc32_combine's factor for a second part of `length` bytes."""
    power, k = 1 << 31, 3  # 2^3 bits per byte
    while length:
        if length & 1:
            power = _multmodp(_X2N[k & 31], power)
        length >>= 1
        k += 1
    return power


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


def verify_blocks(fd: int, entry: FileEntry, pieces: list[tuple[int, memoryview]], header_end: int,
                  path: Path) -> None:
    """Fill each (file offset, destination) and check the CRC-32 of every block they touch, and of the blocks
    holding [0, header_end): bytes of those blocks outside the pieces are read into scratch memory. Raises
    CorruptCheckpointError on a mismatch or a short file (the pieces may then hold damaged bytes)."""
    plans: dict[int, list[tuple[int, memoryview]]] = {}
    for offset, view in [(0, memoryview(bytearray(header_end))), *pieces]:
        start = 0
        while start < view.nbytes:
            block = (offset + start) // entry.block
            end = min(view.nbytes, (block + 1) * entry.block - offset)
            plans.setdefault(block, []).append((offset + start, view[start:end]))
            start = end
    shares: list[list[int]] = [[], []]
    for index, block in enumerate(sorted(plans)):
        shares[index % 2].append(block)

    def check(blocks: list[int]) -> None:
        for block in blocks:
            crc, position = 0, block * entry.block
            for offset, view in [*sorted(plans[block], key=lambda piece: piece[0]), (-1, memoryview(b""))]:
                end = min(entry.size, (block + 1) * entry.block) if offset < 0 else offset
                if end > position:  # a gap: bytes of the block nobody asked for
                    gap = memoryview(bytearray(end - position))
                    pread_into(fd, gap, position)
                    crc = zlib.crc32(gap, crc)
                if view.nbytes:
                    pread_into(fd, view, offset)
                    crc = zlib.crc32(view, crc)
                position = max(position, offset + view.nbytes)
            if f"{crc:08x}" != entry.blocks[block]:
                raise CorruptCheckpointError(f"{path}: checksum mismatch in block {block}")

    try:
        on_threads([share for share in shares if share], check, "ckpt-read")
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


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


def retry_enoent(fn: Callable[[], _Result], attempts: int = 5) -> _Result:
    """NFS listings can name entries that vanish before they are stat'ed; retry a few times."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            if i == attempts - 1:
                raise
            time.sleep(0.05 * (2**i))
    raise AssertionError("unreachable")


def verify_file(path: Path, entry: FileEntry, buffer: bytearray) -> None:
    """Check one file's size and CRC-32 against its manifest entry (reading through `buffer`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing") from None
    try:
        size = os.fstat(fd).st_size
        if size != entry.size:
            raise CorruptCheckpointError(f"{path}: size {size} != manifest {entry.size}")
        crc = 0
        for start in range(0, entry.size, CHUNK):
            view = memoryview(buffer)[: min(CHUNK, entry.size - start)]
            try:
                pread_into(fd, view, start)
            except CorruptCheckpointError:
                raise CorruptCheckpointError(f"{path}: truncated") from None
            crc = zlib.crc32(view, crc)
        if f"{crc:08x}" != entry.crc32:
            raise CorruptCheckpointError(f"{path}: checksum mismatch")
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
