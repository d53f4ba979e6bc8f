"""Monitoring that survives preemption: after a resume from step S, every event a killed attempt logged past S is
dropped, so each step appears once, in order, across any number of attempts. TensorBoard event files (TFRecord
framing, `Event.step`) are rewritten atomically without the records past S; a JSON-lines metrics log the same way.
Standard library only: the records are copied as they are (their checksums stay valid), never re-encoded."""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ._fileio import write_small_atomically

log = logging.getLogger("ckpt_sdk")

EVENT_FILE_MARKER = "tfevents"
METRICS_FILE = "metrics.jsonl"
_HEADER = struct.Struct("<QI")  # record length, masked CRC-32C of the length
_FOOTER = 4  # masked CRC-32C of the data
_CRC32C_POLY = 0x82F63B78
_CRC32C_TABLE = []
for _byte in range(256):
    _value = _byte
    for _ in range(8):
        _value = (_value >> 1) ^ _CRC32C_POLY if _value & 1 else _value >> 1
    _CRC32C_TABLE.append(_value)


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (only ever of the 8-byte length: cheap in pure Python)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if not byte & 0x80:
            return value, offset


def event_step(event: bytes) -> int:
    """`Event.step` (field 2, a varint) of a serialized tensorflow `Event`; 0 when absent (the file header)."""
    offset = 0
    while offset < len(event):
        key, offset = _varint(event, offset)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, offset = _varint(event, offset)
            if field == 2:
                return value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 1:
            offset += 8
        elif wire == 5:
            offset += 4
        elif wire == 2:
            length, offset = _varint(event, offset)
            offset += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return 0


def event_records(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(start, end, step) of each complete record of an event file; stops at a torn or damaged tail."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, length_crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length + _FOOTER
        if _masked_crc32c(data[offset:offset + 8]) != length_crc or end > len(data):
            return
        try:
            step = event_step(data[offset + _HEADER.size:end - _FOOTER])
        except ValueError:
            return
        yield offset, end, step
        offset = end


def truncate_event_files(directory: str | os.PathLike[str], after_step: int) -> int:
    """Drop every TensorBoard event past `after_step` (and torn tails) from the event files under `directory`
    (recursively), each file replaced atomically (removed if nothing is left). Returns how many were dropped."""
    dropped = 0
    root = Path(directory)
    if not root.is_dir():
        return 0
    for path in sorted(root.rglob(f"*{EVENT_FILE_MARKER}*")):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        records = list(event_records(data))
        kept = [(start, end) for start, end, step in records if step <= after_step]
        size = records[-1][1] if records else 0
        if len(kept) == len(records) and size == len(data):
            continue
        if kept:
            write_small_atomically(path, b"".join(data[start:end] for start, end in kept))
        else:
            path.unlink()  # all of it past the step (an attempt that never checkpointed)
        dropped += len(records) - len(kept)
        log.info("ckpt: %s: dropped %d event(s) past the resumed step %d%s", path, len(records) - len(kept),
                 after_step, f" and a torn tail of {len(data) - size} bytes" if size != len(data) else "")
    return dropped


class MetricsLog:
    """A JSON-lines metrics log that survives preemption: opening it after a resume from step S drops the lines a
    killed attempt wrote past S (and a torn last line); `log(step, **values)` appends one line per call."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, resumed_step: int) -> None:
        if resumed_step < 0:
            raise ValueError(f"resumed_step must be >= 0, got {resumed_step}")
        default_dir = os.environ.get("CKPT_DIR") or "checkpoints"
        self.path = Path(path) if path is not None else Path(default_dir) / METRICS_FILE
        self.resumed_step = resumed_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = self._truncate()
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def _truncate(self) -> int:
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return 0
        kept, dropped = [], 0
        for line in lines:
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1  # a torn line (killed mid-write) or not ours: never read back as a metric
                continue
            if isinstance(step, int) and step <= self.resumed_step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            write_small_atomically(self.path, b"".join(line + b"\n" for line in kept))
            log.info("ckpt: %s: dropped %d line(s) past the resumed step %d", self.path, dropped, self.resumed_step)
        return dropped

    def log(self, step: int, **values: float | int | str) -> None:
        """Append `{"step": step, "time": <unix time>, **values}` and flush it (one write per line)."""
        if self._file is None:
            raise ValueError(f"{self.path}: the metrics log is closed")
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
