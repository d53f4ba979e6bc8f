"""Events posted the way client-go's recorder posts them: correlated (the same event again within ten minutes raises
the count of one Event: a PATCH, not a new object), aggregated (more than ten messages of one reason on one object
within ten minutes become one "combined" Event), filtered per object (a token bucket of 25, one more every five
minutes), and sent by one task with a rate limit of its own from a bounded queue. In a storm Events wait or are
dropped (counted in ckpt_operator_events_dropped_total); they never take the requests that create pods."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from . import metrics
from .apiclient import MERGE_PATCH, Sender, TokenBucket, api_path

log = logging.getLogger("ckpt_operator")
COMPONENT = "ckpt-operator"
COMBINED = "(combined from similar events): "
MESSAGE_LIMIT = 1024  # the API server refuses longer Event messages


@dataclass(frozen=True)
class ObjectRef:
    """The object an Event is about."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str


@dataclass
class _Similar:
    """The messages of one (object, type, reason) within the current window."""

    started: float
    messages: set[str] = field(default_factory=set)


@dataclass
class _Allowance:
    """One object's spam-filter bucket."""

    tokens: float
    stamp: float


@dataclass
class _Posted:
    """An Event already on the server: a repeat raises its count."""

    name: str
    count: int
    first: str
    at: float


class Correlator:
    """client-go's EventCorrelator, pure (a clock is passed in): what key and message an event is posted under, and
    whether the object's spam filter lets it through at all."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = 600.0, max_similar: int = 10,
                 burst: int = 25, refill_seconds: float = 300.0, max_keys: int = 4096) -> None:
        if window <= 0 or max_similar < 1 or burst < 1 or refill_seconds <= 0 or max_keys < 1:
            raise ValueError("window, refill_seconds > 0; max_similar, burst, max_keys >= 1")
        self.clock, self.window, self.max_similar = clock, window, max_similar
        self.burst, self.refill_seconds, self.max_keys = burst, refill_seconds, max_keys
        self._similar: OrderedDict[tuple[str, str, str], _Similar] = OrderedDict()
        self._allowance: OrderedDict[str, _Allowance] = OrderedDict()

    def correlate(self, ref: ObjectRef, type_: str, reason: str, message: str) -> tuple[tuple[str, ...], str] | None:
        """(correlation key, message) of this event, or None when the object has sent too many lately."""
        now = self.clock()
        similar_key = (ref.uid, type_, reason)
        similar = self._similar.pop(similar_key, None)
        if similar is None or now - similar.started > self.window:
            similar = _Similar(now)
        similar.messages.add(message)
        self._remember(self._similar, similar_key, similar)
        key: tuple[str, ...] = (ref.uid, type_, reason, message)
        if len(similar.messages) > self.max_similar:  # one Event for all of them, with the latest message
            message, key = COMBINED + message, similar_key
        return (key, message[:MESSAGE_LIMIT]) if self._allow(ref.uid, now) else None

    def _allow(self, uid: str, now: float) -> bool:
        allowance = self._allowance.pop(uid, None) or _Allowance(float(self.burst), now)
        allowance.tokens = min(self.burst, allowance.tokens + (now - allowance.stamp) / self.refill_seconds)
        allowance.stamp = now
        self._remember(self._allowance, uid, allowance)
        if allowance.tokens < 1:
            return False
        allowance.tokens -= 1
        return True

    def _remember(self, table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        table[key] = value  # most recently used last; the least recently used go first
        while len(table) > self.max_keys:
            table.popitem(last=False)


@dataclass
class _Pending:
    ref: ObjectRef
    type_: str
    reason: str
    message: str
    count: int = 1


class EventRecorder:
    """Queues Events (from the event loop) and posts them from one task at its own rate; an Event still queued when
    it happens again is sent once with the higher count."""

    def __init__(self, send: Sender, limiter: TokenBucket, correlator: Correlator | None = None,
                 max_queued: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1 (got {max_queued})")
        self.send, self.limiter, self.clock = send, limiter, clock
        self.correlator = correlator or Correlator(clock=clock)
        self.max_queued = max_queued
        self.pending: OrderedDict[tuple[str, ...], _Pending] = OrderedDict()
        self.posted: OrderedDict[tuple[str, ...], _Posted] = OrderedDict()
        self._ready = asyncio.Event()
        self._dropped_logged = 0.0

    def record(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        """Queue one Event (call on the event loop; never waits)."""
        correlated = self.correlator.correlate(ref, type_, reason, message)
        if correlated is None:
            self._drop("spam filter")
            return
        key, text = correlated
        queued = self.pending.get(key)
        if queued is not None:
            queued.count, queued.message = queued.count + 1, text
        elif len(self.pending) >= self.max_queued:
            self._drop("queue full")
        else:
            self.pending[key] = _Pending(ref, type_, reason, text)
            self._ready.set()

    def _drop(self, why: str) -> None:
        metrics.EVENTS_DROPPED.labels(why).inc()
        now = self.clock()
        if now - self._dropped_logged > 60.0:
            self._dropped_logged = now
            log.info("Events are being dropped (%s): the API server is not flooded in a storm; the status has the "
                     "facts (ckpt_operator_events_dropped_total counts them)", why)

    async def run(self) -> None:
        """Post queued Events, oldest first, one token of the recorder's own bucket each."""
        while True:
            await self._ready.wait()
            while self.pending:
                await self.limiter.take_async()
                key, item = self.pending.popitem(last=False)
                try:
                    await asyncio.to_thread(self._post, key, item)
                except Exception as exc:  # an Event is best effort: never retried into a storm
                    log.debug("posting Event %s failed: %s", item.reason, exc)
            self._ready.clear()

    def _post(self, key: tuple[str, ...], item: _Pending) -> None:
        """PATCH the count of the same Event posted within the window, else POST a new one."""
        now, stamp = self.clock(), dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        earlier = self.posted.pop(key, None)
        if earlier is not None and now - earlier.at <= self.correlator.window:
            count = earlier.count + item.count
            try:
                self.send("PATCH", event_path(item.ref.namespace, earlier.name), {
                    "count": count, "lastTimestamp": stamp, "message": item.message}, MERGE_PATCH)
                self._remember(key, _Posted(earlier.name, count, earlier.first, now))
                return
            except ApiException as exc:
                if exc.status != 404:  # deleted (events expire after an hour): post it again
                    raise
        name = f"{item.ref.name}.{time.time_ns():x}"
        self.send("POST", events_path(item.ref.namespace), build_event(name, item, stamp))
        self._remember(key, _Posted(name, item.count, stamp, now))

    def _remember(self, key: tuple[str, ...], posted: _Posted) -> None:
        self.posted[key] = posted
        while len(self.posted) > self.correlator.max_keys:
            self.posted.popitem(last=False)


def events_path(namespace: str) -> str:
    """The path of a namespace's core/v1 Events (where one is created)."""
    return api_path("api", "v1", "namespaces", namespace, "events")


def event_path(namespace: str, name: str) -> str:
    """The path of one core/v1 Event."""
    return api_path("api", "v1", "namespaces", namespace, "events", name)


def build_event(name: str, item: _Pending, stamp: str) -> dict[str, Any]:
    """A core/v1 Event about `item.ref`, as the recorder first posts it."""
    ref = item.ref
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": ref.namespace},
        "involvedObject": {"apiVersion": ref.api_version, "kind": ref.kind, "namespace": ref.namespace,
                           "name": ref.name, "uid": ref.uid},
        "type": item.type_, "reason": item.reason, "message": item.message, "count": item.count,
        "firstTimestamp": stamp, "lastTimestamp": stamp,
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
    }
