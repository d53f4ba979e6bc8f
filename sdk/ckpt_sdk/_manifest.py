"""A checkpoint's manifest, typed: written last into the checkpoint directory, it is what makes it complete.

Parsing checks everything a later step relies on (names a file system can open, sizes, checksums, every rank's
shard named): a damaged manifest is a CorruptCheckpointError, never a ValueError or KeyError further on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ._errors import CorruptCheckpointError, IncompatibleCheckpointError
from ._fileio import FileEntry

FORMAT = "ckpt-sdk/1"
SHARDED_FORMAT = "ckpt-sdk/2"  # written only for sharded checkpoints, so older readers refuse them cleanly
FORMAT_VERSION = 2
MANIFEST = "MANIFEST.json"
SDK_VERSION = "0.1.0"
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}$")  # no path separators, NUL, or dot files
JSONValue = object  # what json.loads may return


def shard_prefix(rank: int) -> str:
    """The file-name prefix of one rank's files in a sharded checkpoint."""
    return f"rank-{rank:05d}."


def clean_metrics(metrics: Mapping[str, float] | None) -> dict[str, float | None]:
    """Metrics as JSON numbers; NaN and infinities become null (never "best")."""
    clean: dict[str, float | None] = {}
    for key, value in (metrics or {}).items():
        number = float(value)
        clean[str(key)] = number if math.isfinite(number) else None
    return clean


@dataclass(frozen=True)
class Manifest:
    """What a committed checkpoint holds and who wrote it."""

    step: int
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    attempt: int | None = None
    incarnation: str = ""
    time: float = 0.0
    job: str | None = None
    namespace: str | None = None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    metadata: Mapping[str, JSONValue] = field(default_factory=dict)
    sdk_version: str = SDK_VERSION
    world_size: int = 1
    replicated: tuple[str, ...] = ()  # top-level state keys rank 0 wrote for every rank
    shards: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # rank -> its file names

    @property
    def sharded(self) -> bool:
        return self.world_size > 1 or bool(self.shards)

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def with_files(self, files: Mapping[str, FileEntry]) -> Manifest:
        return replace(self, files=dict(files))

    def with_shards(self, shards: Mapping[int, Mapping[str, FileEntry]], replicated: tuple[str, ...]) -> Manifest:
        """The manifest of a sharded checkpoint: every rank's files, named per rank."""
        return replace(self, world_size=len(shards), replicated=replicated,
                       shards={rank: tuple(sorted(table)) for rank, table in shards.items()},
                       files={name: entry for table in shards.values() for name, entry in table.items()})

    def to_json(self) -> bytes:
        data: dict[str, JSONValue] = {
            "format": SHARDED_FORMAT if self.sharded else FORMAT, "sdk_version": self.sdk_version,
            "step": self.step, "attempt": self.attempt, "incarnation": self.incarnation, "time": self.time,
            "job": self.job, "namespace": self.namespace, "metrics": dict(self.metrics),
            "metadata": dict(self.metadata),
            "files": {name: e.to_json() for name, e in self.files.items()}}
        if self.sharded:
            data.update(world_size=self.world_size, replicated=list(self.replicated),
                        shards={str(rank): list(names) for rank, names in self.shards.items()})
        return json.dumps(data, indent=1, sort_keys=True, allow_nan=False).encode()


def read_manifest(path: Path) -> Manifest:
    """Parse and check a checkpoint directory's manifest: CorruptCheckpointError if it is not usable,
    IncompatibleCheckpointError if a newer ckpt_sdk wrote it."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)") from None
    except NotADirectoryError:
        raise CorruptCheckpointError(f"{path}: not a directory") from None
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """A manifest from its bytes (see `read_manifest`); `path` only names it in errors."""
    try:
        data = json.loads(raw)
        _check_format(data, path)
        return _parsed(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path}: {MANIFEST} is malformed ({exc})") from None


def _check_format(data: JSONValue, path: Path) -> None:
    if not isinstance(data, dict):
        raise TypeError("not an object")
    fmt = str(data["format"])
    name, _, version = fmt.partition("/")
    if name == "ckpt-sdk" and version.isdigit() and int(version) > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{path}: written in format {fmt} by ckpt_sdk {data.get('sdk_version', '?')}; this ckpt_sdk "
            f"reads {FORMAT} and {SHARDED_FORMAT} only: upgrade ckpt_sdk to load it")
    if fmt not in (FORMAT, SHARDED_FORMAT):
        raise ValueError(f"unknown format {fmt!r}")


def _parsed(data: dict[str, JSONValue]) -> Manifest:
    step = data["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError("step is not a count")
    files = _files(data["files"])
    world, replicated, shards = 1, tuple[str, ...](), dict[int, tuple[str, ...]]()
    if data["format"] == SHARDED_FORMAT:
        world, replicated, shards = _shards(data, files)
    metrics = data.get("metrics") or {}
    metadata = data.get("metadata") or {}
    attempt = data.get("attempt")
    if not isinstance(metrics, dict) or not isinstance(metadata, dict):
        raise TypeError("metrics and metadata must be objects")
    return Manifest(step=step, files=files, attempt=attempt if isinstance(attempt, int) else None,
                    incarnation=str(data.get("incarnation") or ""), time=_number(data.get("time")),
                    job=_optional_text(data.get("job")), namespace=_optional_text(data.get("namespace")),
                    metrics={str(k): None if v is None else _number(v) for k, v in metrics.items()},
                    metadata=metadata, sdk_version=str(data.get("sdk_version") or "?"), world_size=world,
                    replicated=replicated, shards=shards)


def _number(value: JSONValue) -> float:
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _optional_text(value: JSONValue) -> str | None:
    return value if isinstance(value, str) else None


def _files(raw: JSONValue) -> dict[str, FileEntry]:
    if not isinstance(raw, dict):
        raise TypeError("files must be an object")
    files = {}
    for name, entry in raw.items():
        if not _FILE_NAME.match(name) or name == MANIFEST:
            raise ValueError(f"file name {name!r} is not allowed")
        if not isinstance(entry, dict):
            raise TypeError(f"file {name!r}: not an object")
        try:
            files[name] = FileEntry.from_json(entry)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"file {name!r}: {exc}") from None
    return files


def _shards(data: dict[str, JSONValue], files: Mapping[str, FileEntry]) -> tuple[int, tuple[str, ...],
                                                                                    dict[int, tuple[str, ...]]]:
    """Every rank's shard named, and only files the manifest lists."""
    world, raw, replicated = data["world_size"], data["shards"], data.get("replicated") or []
    if not isinstance(world, int) or world < 1 or not isinstance(raw, dict) or not isinstance(replicated, list):
        raise ValueError("bad world_size, shards or replicated")
    if set(raw) != {str(rank) for rank in range(world)}:
        raise ValueError("a rank's shard is not named")
    shards: dict[int, tuple[str, ...]] = {}
    for rank, names in raw.items():
        if not isinstance(names, list) or not set(names) <= set(files):
            raise ValueError(f"rank {rank}'s shard names files the manifest does not list")
        shards[int(rank)] = tuple(str(name) for name in names)
    return world, tuple(str(key) for key in replicated), shards
