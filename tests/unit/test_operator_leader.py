"""Leader election times a Lease by this replica's own clock, from when it saw the record change (issue #25,
defect 17: a standby whose wall clock ran 16 s ahead took a healthy leader's Lease)."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from kubernetes.client.exceptions import ApiException

from ckpt_operator.leader import LeaderElector, LeaseConfig


class FakeLeases:
    """One Lease in memory, with resourceVersion conflicts, recording each request's timeout."""

    def __init__(self) -> None:
        self.lease: SimpleNamespace | None = None
        self.version = 0
        self.timeouts: list[float] = []

    def _store(self, spec: dict) -> None:  # type: ignore[type-arg]
        self.version += 1
        parse = lambda text: dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None  # noqa: E731
        self.lease = SimpleNamespace(
            metadata=SimpleNamespace(resource_version=str(self.version)),
            spec=SimpleNamespace(holder_identity=spec["holderIdentity"], renew_time=parse(spec.get("renewTime")),
                                 acquire_time=parse(spec.get("acquireTime")),
                                 lease_duration_seconds=spec["leaseDurationSeconds"],
                                 lease_transitions=spec.get("leaseTransitions", 0)))

    def read_namespaced_lease(self, name, namespace, _request_timeout=None):  # type: ignore[no-untyped-def]
        self.timeouts.append(_request_timeout)
        if self.lease is None:
            raise ApiException(status=404)
        return self.lease

    def create_namespaced_lease(self, namespace, body, _request_timeout=None):  # type: ignore[no-untyped-def]
        self.timeouts.append(_request_timeout)
        self._store(body["spec"])

    def replace_namespaced_lease(self, name, namespace, body, _request_timeout=None):  # type: ignore[no-untyped-def]
        self.timeouts.append(_request_timeout)
        if body["metadata"]["resourceVersion"] != str(self.version):
            raise ApiException(status=409)
        self._store(body["spec"])

    def renew_as(self, holder: str, wall_clock: dt.datetime) -> None:
        """The leader's renewal, stamped with its own wall clock."""
        self._store({"holderIdentity": holder, "renewTime": wall_clock.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                     "leaseDurationSeconds": 15, "leaseTransitions": 0})


def test_a_standby_whose_clock_runs_ahead_never_takes_a_renewed_lease():
    leases = FakeLeases()
    now = [1000.0]
    standby = LeaderElector(LeaseConfig(namespace="ns", identity="standby"), leases, clock=lambda: now[0])
    behind = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=16)  # the leader's clock, 16 s behind
    for second in range(0, 60, 2):  # the leader renews every 2 s for a minute
        leases.renew_as("leader", behind + dt.timedelta(seconds=second))
        now[0] = 1000.0 + second
        assert not standby._try(), f"took a healthy leader's lease after {second}s"
    assert leases.lease is not None and leases.lease.spec.holder_identity == "leader"
    now[0] += 14  # the leader stops renewing: the lease lasts 15 s from when the standby last saw it change
    assert not standby._try()
    now[0] += 2
    assert standby._try() and leases.lease.spec.holder_identity == "standby"
    assert leases.lease.spec.lease_transitions == 1
    assert all(timeout is not None and timeout <= 10 for timeout in leases.timeouts)  # no request without one
