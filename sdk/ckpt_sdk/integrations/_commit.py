"""Commits for checkpoint directories a framework writes itself (`checkpoint-N/` of the Hugging Face Trainer,
Lightning's `.ckpt` directories, Accelerate's `save_state`): every file fsynced, then a marker written last that
names every file with its size and CRC-32, under the job's fence. A directory without a valid marker, or whose files
do not match it, is incomplete: never returned as a checkpoint to resume from."""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .._errors import CorruptCheckpointError
from .._fileio import CHUNK, FileEntry, fsync_dir, write_small_atomically
from .._store import Fence, Store

log = logging.getLogger("ckpt_sdk")
MARKER = "ckpt-commit.json"
MARKER_FORMAT = "ckpt-sdk-commit/1"


@dataclass(frozen=True)
class Marker:
    """A commit marker: the step, and every file with its size and CRC-32 (paths relative to the directory)."""

    step: int
    files: Mapping[str, FileEntry]


def _files(directory: Path) -> list[Path]:
    """Every regular file under `directory` (links are not followed), the marker excluded."""
    found = []
    for parent, _, names in os.walk(directory, followlinks=False):
        for name in names:
            path = Path(parent) / name
            if path.is_file() and not path.is_symlink() and not (parent == str(directory) and name == MARKER):
                found.append(path)
    return sorted(found)


def fsync_tree(directory: Path) -> None:
    """Make every file and directory under `directory` durable (each rank does it for what it wrote)."""
    for path in _files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for parent, _, _ in os.walk(directory, followlinks=False):
        fsync_dir(Path(parent))


def _entry(path: Path) -> FileEntry:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return FileEntry(size, f"{crc:08x}")


def commit(directory: Path, step: int, store: Store, fence: Fence,
           files: Mapping[str, FileEntry] | None = None) -> None:
    """Write the marker of a directory whose files are durable (see `fsync_tree`), if `fence` still owns the job's
    directory; then it is a complete checkpoint of `step`. `files`: their entries when the writer knows them (else
    every file is read once). Raises FencedError if a newer attempt owns it."""
    if files is None:
        files = {str(path.relative_to(directory)): _entry(path) for path in _files(directory)}
    body = {"format": MARKER_FORMAT, "step": step, "attempt": fence.attempt, "incarnation": fence.incarnation,
            "files": {name: {"size": e.size, "crc32": e.crc32} for name, e in files.items()}}
    store.check(fence, step)
    write_small_atomically(directory / MARKER, json.dumps(body, sort_keys=True).encode())
    fsync_dir(directory.parent)


def read_marker(directory: Path) -> Marker:
    """The marker of a checkpoint directory; CorruptCheckpointError if it is missing or damaged."""
    try:
        data = json.loads((directory / MARKER).read_bytes())
        files = {str(name): FileEntry(int(e["size"]), str(e["crc32"])) for name, e in data["files"].items()}
        step = data["step"]
        if data["format"] != MARKER_FORMAT or not isinstance(step, int) or not files:
            raise ValueError("not a commit marker")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{directory}: no {MARKER} (incomplete: the save did not finish)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{directory}: {MARKER} is damaged ({exc})") from None
    for name in files:
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise CorruptCheckpointError(f"{directory}: {MARKER} names {name!r}, outside the checkpoint")
    return Marker(step, files)


def verify(directory: Path, full: bool = True) -> Marker:
    """The marker of a complete checkpoint directory; CorruptCheckpointError if it is missing or damaged, or a file
    differs from it (in size; with `full`, also in CRC-32)."""
    marker = read_marker(directory)
    for name, expected in marker.files.items():
        path = directory / name
        try:
            found = _entry(path) if full else FileEntry(path.stat().st_size, expected.crc32)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: missing") from None
        if found != expected:
            raise CorruptCheckpointError(f"{path}: {'checksum' if found.size == expected.size else 'size'} "
                                         "mismatch")
    return marker


def checkpoints(root: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    """Directories under `root` whose name matches `pattern` (its first group: the step), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_complete(root: Path, pattern: re.Pattern[str], full: bool = True) -> Path | None:
    """The newest complete checkpoint directory under `root`; incomplete or damaged ones are skipped with a log line
    (never returned: the framework would load them)."""
    for step, path in reversed(checkpoints(root, pattern)):
        try:
            verify(path, full)
        except CorruptCheckpointError as exc:
            log.warning("ckpt: skipping %s: %s", path.name, exc)
            continue
        log.info("ckpt: the newest complete checkpoint is %s (step %d)", path, step)
        return path
    return None


def rotate(root: Path, pattern: re.Pattern[str], keep: int, protect: Path | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the `keep` newest (never the newest complete one, nor `protect`: a best
    model), and incomplete ones older than the newest complete one (a save that died). Returns what was deleted."""
    found = checkpoints(root, pattern)
    complete = [(step, path) for step, path in found if (path / MARKER).exists()]
    if not complete:
        return []
    newest = complete[-1][0]
    kept = {path for _, path in complete[-max(1, keep):]} | ({protect} if protect is not None else set())
    doomed = [path for step, path in found if path not in kept and (
        (path / MARKER).exists() or step < newest)]
    for path in doomed:
        Store(root).delete_directory(path)
    return doomed
