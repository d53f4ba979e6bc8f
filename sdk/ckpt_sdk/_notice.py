"""Checkpoint requests from the operator: the pod annotation `ckpt.dev/checkpoint-requested: <RFC 3339 deadline>`,
read from the downward-API file of the pod's annotations (no API access from the pod)."""

from __future__ import annotations

import json
import logging
import time

from .contract import ANNOTATION_CHECKPOINT_REQUESTED, format_time, parse_time

log = logging.getLogger("ckpt_sdk")
POLL_SECONDS = 0.5  # maybe_save may run every few milliseconds: the file is read at most this often


def parse_annotations(text: str) -> dict[str, str]:
    """The kubelet's format for a map field: one `key="value"` per line, the value quoted like Go's %q."""
    found = {}
    for line in text.splitlines():
        key, sep, quoted = line.partition("=")
        if not sep:
            continue
        try:
            value = json.loads(quoted)
        except ValueError:
            value = quoted.strip('"')
        if isinstance(value, str):
            found[key.strip()] = value
    return found


class CheckpointRequests:
    """Polls the annotations file for a checkpoint request the trainer has not answered yet."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.next_read = 0.0
        self.seen: str | None = None  # the request value last read
        self.answered: set[str] = set()  # request values a save already answered

    def pending(self) -> float | None:
        """The deadline (Unix time) of an unanswered request, or None; reads the file at most every 0.5 s."""
        if self.path is None:
            return None
        now = time.monotonic()
        if now >= self.next_read:
            self.next_read = now + POLL_SECONDS
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.seen = parse_annotations(f.read()).get(ANNOTATION_CHECKPOINT_REQUESTED)
            except OSError:
                self.seen = None
        if self.seen is None or self.seen in self.answered:
            return None
        deadline = parse_time(self.seen)
        if deadline is None:
            log.warning("ckpt: ignoring %s=%r: not an RFC 3339 time", ANNOTATION_CHECKPOINT_REQUESTED, self.seen)
            self.answered.add(self.seen)
        return deadline

    def answer(self, deadline: float) -> None:
        """A save answered every request with this deadline (every rank agrees on it through its value)."""
        if self.seen is not None and parse_time(self.seen) == deadline:
            self.answered.add(self.seen)
        self.answered.add(format_time(deadline))

