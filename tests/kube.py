"""Helpers for tests against the local control plane: fixtures' cluster, namespaces, waiting on conditions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})"
                                                                             if last_exc else ""))


class ObjectRecorder:
    """Records every version of the objects `lister(*args)` lists (including the final DELETED one) from one
    unbroken watch (resumed from the last resourceVersion it saw; listed again only when that expired). Every
    recorder is stopped after its test (conftest), even one whose test failed before calling stop()."""

    running: list[ObjectRecorder] = []

    @classmethod
    def stop_all(cls) -> None:
        for recorder in cls.running:
            recorder.stop()
        cls.running.clear()

    def __init__(self, lister: Callable[..., Any], *args: Any) -> None:
        ObjectRecorder.running.append(self)
        self.lister, self.args = lister, args
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _record(self, kind: str, obj: Any) -> str:
        found = obj if isinstance(obj, dict) else client.ApiClient().sanitize_for_serialization(obj)
        with self._lock:
            self.events.append((kind, found))
        return str(found["metadata"]["resourceVersion"])

    def _list(self) -> str:
        listed = self.lister(*self.args)
        found = listed if isinstance(listed, dict) else client.ApiClient().sanitize_for_serialization(listed)
        for item in found.get("items") or []:
            self._record("LISTED", item)
        self._ready.set()
        return str(found["metadata"]["resourceVersion"])

    def _run(self) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                version = version or self._list()
                for event in watch.Watch().stream(self.lister, *self.args, timeout_seconds=5,
                                                  resource_version=version):
                    if event["type"] == "ERROR":
                        version = None
                        break
                    version = self._record(event["type"], event["object"])
                    if self._stop.is_set():
                        break
            except client.ApiException as exc:
                version = None if exc.status == 410 else version
                time.sleep(0.2)
            except Exception:
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()

    def versions(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [obj for _, obj in self.events if obj["metadata"]["name"] == name]

    def uids(self) -> set[str]:
        with self._lock:
            return {obj["metadata"]["uid"] for _, obj in self.events}

    def deleted(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return next((obj for t, obj in self.events if t == "DELETED" and obj["metadata"]["name"] == name), None)



class PodRecorder(ObjectRecorder):
    """Every version of the pods in a namespace."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        super().__init__(core.list_namespaced_pod, namespace)

    def disruption(self, name: str) -> dict[str, Any] | None:
        for pod in reversed(self.versions(name)):
            for cond in pod.get("status", {}).get("conditions") or []:
                if cond["type"] == "DisruptionTarget" and cond["status"] == "True":
                    return dict(cond)
        return None

    def terminated(self, name: str) -> dict[str, Any] | None:
        for pod in reversed(self.versions(name)):
            for cs in pod.get("status", {}).get("containerStatuses") or []:
                if (cs.get("state") or {}).get("terminated"):
                    return dict(cs["state"]["terminated"])
        return None


GROUP, VERSION, PLURAL = "ckpt.dev", "v1alpha1", "trainingjobs"


def trainingjob(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    """A TrainingJob manifest on the `ckpt` claim with a single trainer container."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "trainer", "image": "python:3.11-slim",
                                                        "command": command}]}},
                 "checkpoint": {"persistentVolumeClaim": {"claimName": "ckpt"}}},
    }
    body["spec"].update(spec)
    return body


class Jobs:
    """TrainingJob helpers bound to one namespace."""

    def __init__(self, namespace: str) -> None:
        self.ns = namespace
        self.api = client.CustomObjectsApi()

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body))

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name))

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec},
                                                _content_type="application/merge-patch+json")

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def wait(self, name: str, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict:
        def probe() -> dict[str, Any] | None:
            st = self.status(name)
            return st if check(st) else None

        try:
            return dict(wait_for(f"{name}: {what}", probe, timeout))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status: {self.status(name)}") from None

    def wait_phase(self, name: str, phase: str, timeout: float = 120) -> dict[str, Any]:
        return self.wait(name, f"phase {phase}", lambda st: st.get("phase") == phase, timeout)

    def wait_event(self, name: str, type_: str, *reasons: str, timeout: float = 30) -> tuple[str, str, str]:
        """Wait for an Event of `type_` with one of `reasons` (kopf posts Events asynchronously)."""
        return tuple(wait_for(f"{name}: {type_} event {reasons}", lambda: next(
            (e for e in self.events(name) if e[0] == type_ and e[1] in reasons), None), timeout))  # type: ignore[return-value]

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = client.CoreV1Api().list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [(e.type, e.reason, e.message) for e in items]


def progress(directory: Any) -> list[str]:
    """The `progress.log` lines a trainer appends at every start (`attempt A start S reason R`)."""
    from pathlib import Path

    path = Path(directory) / "progress.log"
    return [line for line in path.read_text().splitlines() if line.startswith("attempt")] if path.exists() else []


def ensure_priority_classes(**values: int) -> None:
    """Create PriorityClasses by name -> value (shared by tests; already existing is fine)."""
    sched = client.SchedulingV1Api()
    for name, value in values.items():
        try:
            sched.create_priority_class(client.V1PriorityClass(metadata=client.V1ObjectMeta(name=name), value=value))
        except client.ApiException as exc:
            if exc.status != 409:
                raise


def evict(core: client.CoreV1Api, namespace: str, pod: str) -> None:
    """Evict a pod through the policy/v1 Eviction API (what a drain or an autoscaler does)."""
    core.create_namespaced_pod_eviction(pod, namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=pod, namespace=namespace)))


def create_hostpath_claim(core: client.CoreV1Api, namespace: str, host: Any, name: str = "ckpt") -> None:
    """A ReadWriteMany PVC `name` pre-bound to a hostPath PV (named pv-<namespace>) on directory `host`."""
    core.create_persistent_volume(client.V1PersistentVolume(
        metadata=client.V1ObjectMeta(name=f"pv-{namespace}"),
        spec=client.V1PersistentVolumeSpec(
            capacity={"storage": "1Gi"}, access_modes=["ReadWriteMany"], storage_class_name="",
            host_path=client.V1HostPathVolumeSource(path=str(host)),
            claim_ref=client.V1ObjectReference(namespace=namespace, name=name))))
    core.create_namespaced_persistent_volume_claim(namespace, client.V1PersistentVolumeClaim(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PersistentVolumeClaimSpec(access_modes=["ReadWriteMany"], storage_class_name="",
                                                resources=client.V1VolumeResourceRequirements(
                                                    requests={"storage": "1Gi"}))))
