"""Leader election with a coordination.k8s.io Lease, as client-go's leaderelection does it.

Standby replicas wait to acquire the Lease; the leader runs the operator and renews the Lease every
`retry_seconds`. A leader that cannot renew within `renew_deadline_seconds` exits at once (the kubelet restarts it
as a standby). As in client-go, a standby never compares the holder's `renewTime` with its own clock (clocks of two
nodes differ): it times the lease from the moment it last saw the record change, on its own monotonic clock. Every
Lease request has a timeout, so a hung connection cannot stretch a renewal past the deadline.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("ckpt_operator.leader")


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str = "ckpt-operator"
    identity: str = ""
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0

    @property
    def request_timeout(self) -> float:
        """Seconds one Lease request may take (a renewal must fit the renew deadline)."""
        return max(1.0, self.renew_deadline_seconds / 2)


@dataclass
class _Observed:
    """The Lease record as last read, and when (this replica's monotonic clock) it was first seen that way."""

    record: tuple[Any, ...] | None = None
    at: float = field(default_factory=time.monotonic)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquires and keeps one Lease; `on_lost` is called (from the renew thread) if leadership is lost."""

    def __init__(self, config: LeaseConfig, api: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.identity = config.identity or f"{os.uname().nodename}-{os.getpid()}"
        self.api: Any = api or client.CoordinationV1Api()  # typed models add nothing for four calls
        self.leader = threading.Event()
        self.clock = clock
        self.observed = _Observed(at=clock())

    def _try(self) -> bool:
        """One acquire-or-renew round; True if this replica holds the Lease afterwards."""
        cfg = self.config
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(cfg.lease_seconds),
                "renewTime": _stamp(_now())}
        try:
            lease = self.api.read_namespaced_lease(cfg.name, cfg.namespace, _request_timeout=cfg.request_timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return self._create(spec)
        holder = lease.spec.holder_identity
        duration = lease.spec.lease_duration_seconds or cfg.lease_seconds
        record = (holder, lease.spec.renew_time, lease.spec.acquire_time, lease.spec.lease_transitions, duration)
        if record != self.observed.record:  # it changed: its holder is alive as of now, by our clock
            self.observed = _Observed(record, self.clock())
        expired = self.clock() > self.observed.at + duration
        if holder not in (None, "", self.identity) and not expired:
            return False
        if holder != self.identity:
            spec.update(acquireTime=_stamp(_now()), leaseTransitions=(lease.spec.lease_transitions or 0) + 1)
        body = {"metadata": {"name": cfg.name, "namespace": cfg.namespace,
                             "resourceVersion": lease.metadata.resource_version}, "spec": spec}
        try:
            self.api.replace_namespaced_lease(cfg.name, cfg.namespace, body, _request_timeout=cfg.request_timeout)
        except ApiException as exc:
            if exc.status == 409:
                return False  # someone else renewed or took it between our read and write
            raise
        return True

    def _create(self, spec: dict[str, Any]) -> bool:
        cfg = self.config
        body = {"metadata": {"name": cfg.name, "namespace": cfg.namespace},
                "spec": {**spec, "acquireTime": spec["renewTime"], "leaseTransitions": 0}}
        try:
            self.api.create_namespaced_lease(cfg.namespace, body, _request_timeout=cfg.request_timeout)
        except ApiException as exc:
            if exc.status == 409:
                return False  # another replica created it first
            raise
        return True

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this replica is the leader (True), or `stop` is set (False)."""
        log.info("leader election: %s waiting for lease %s/%s", self.identity, self.config.namespace,
                 self.config.name)
        while stop is None or not stop.is_set():
            try:
                if self._try():
                    self.leader.set()
                    log.info("leader election: %s acquired the lease", self.identity)
                    return True
            except Exception as exc:  # the API server may be briefly unavailable
                log.warning("leader election: %s", exc)
            time.sleep(self.config.retry_seconds)
        return False

    def keep(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew in the background; call `on_lost` if no renewal succeeds within the renew deadline."""

        def renew() -> None:
            last_ok = time.monotonic()
            while True:
                time.sleep(self.config.retry_seconds)
                try:
                    if self._try():
                        last_ok = time.monotonic()
                        continue
                    log.error("leader election: another replica holds the lease now")
                except Exception as exc:
                    log.warning("leader election: renewal failed: %s", exc)
                    if time.monotonic() - last_ok < self.config.renew_deadline_seconds:
                        continue
                self.leader.clear()
                on_lost()
                return

        thread = threading.Thread(target=renew, name="lease-renew", daemon=True)
        thread.start()
        return thread
