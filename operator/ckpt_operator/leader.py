"""Leader election with a coordination.k8s.io Lease, as client-go's leaderelection does it.

Standby replicas wait to acquire the Lease; the leader runs the operator and renews the Lease every
`retry_seconds`. A leader that cannot renew within `renew_deadline_seconds` exits at once (the kubelet restarts it
as a standby), so two replicas never act at the same time for longer than the clock skew allows.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquires and keeps one Lease; `on_lost` is called (from the renew thread) if leadership is lost."""

    def __init__(self, config: LeaseConfig, api: Any = None) -> None:
        self.config = config
        self.identity = config.identity or f"{os.uname().nodename}-{os.getpid()}"
        self.api: Any = api or client.CoordinationV1Api()  # typed models add nothing for four calls
        self.leader = threading.Event()

    def _try(self) -> bool:
        """One acquire-or-renew round; True if this replica holds the Lease afterwards."""
        cfg = self.config
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(cfg.lease_seconds),
                "renewTime": _stamp(now)}
        try:
            lease = self.api.read_namespaced_lease(cfg.name, cfg.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": cfg.name, "namespace": cfg.namespace},
                    "spec": {**spec, "acquireTime": _stamp(now), "leaseTransitions": 0}}
            try:
                self.api.create_namespaced_lease(cfg.namespace, body)
            except ApiException as exc2:
                if exc2.status == 409:
                    return False  # another replica created it first
                raise
            return True
        holder = lease.spec.holder_identity
        renewed = lease.spec.renew_time
        duration = lease.spec.lease_duration_seconds or cfg.lease_seconds
        expired = renewed is None or now > renewed + dt.timedelta(seconds=duration)
        if holder not in (None, "", self.identity) and not expired:
            return False
        if holder != self.identity:
            spec.update(acquireTime=_stamp(now), leaseTransitions=(lease.spec.lease_transitions or 0) + 1)
        body = {"metadata": {"name": cfg.name, "namespace": cfg.namespace,
                             "resourceVersion": lease.metadata.resource_version}, "spec": spec}
        try:
            self.api.replace_namespaced_lease(cfg.name, cfg.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False  # someone else renewed or took it between our read and write
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
