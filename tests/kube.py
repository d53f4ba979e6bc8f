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


class PodRecorder:
    """Records every version of the pods in a namespace (including the final DELETED one) from a watch."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        api = client.ApiClient()
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                initial = self.core.list_namespaced_pod(self.namespace)
                self._ready.set()
                for ev in w.stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=5,
                                   resource_version=initial.metadata.resource_version):
                    with self._lock:
                        self.events.append((ev["type"], api.sanitize_for_serialization(ev["object"])))
                    if self._stop.is_set():
                        break
            except Exception:
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()

    def versions(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [obj for _, obj in self.events if obj["metadata"]["name"] == name]

    def deleted(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return next((obj for t, obj in self.events if t == "DELETED" and obj["metadata"]["name"] == name), None)

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
