"""The operator's pods from a list-and-watch of its own, like client-go's reflector: list, watch from the list's
resourceVersion, resume after a dropped stream, list again on 410 Gone. Kept trimmed (`cache.trim_pod`) by the uid
of their TrainingJob. Pods are the kind that storms (each changes ~8 times per preemption): kopf's per-event
machinery for them (a worker task per object, a handler call per index and event, the raw body kept per object) was
a quarter of the operator's CPU and much of its memory at 5,000 jobs. Jobs, nodes and Workloads stay with kopf."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .apiclient import error_backoff
from .cache import owned_by_job, trim_pod
from .errors import WatchError, WatchExpired
from .planning import Pod

log = logging.getLogger("ckpt_operator.podwatch")

WATCH_SECONDS = 300  # the server ends a watch after this long; the client gives up 30 s later (a hung connection)
LIST_PAGE = 500
LIST_TIMEOUT = (10, 60)  # (connect, read) seconds of one page: a list stalled on a dead connection is tried again
SHORT_WATCH_SECONDS = 1.0  # a watch that ends sooner without an event backs off like a failure
Listener = Callable[[str | None, Pod], None]  # (the TrainingJob uid the pod belongs to, or None; the trimmed pod)
UNOWNED = ""  # the store's key of pods labelled ours that no TrainingJob controls: the orphan sweep sees them too


class PodStore:
    """The operator's pods by the uid of their TrainingJob, the others under UNOWNED (read like a kopf index:
    `uid in store`, `store[uid]`, iteration over uids). Changed on the event loop only."""

    def __init__(self) -> None:
        self._by_job: dict[str, dict[tuple[str, str], Pod]] = {}
        self._owner: dict[tuple[str, str], str] = {}  # (namespace, name) -> job uid

    def __contains__(self, uid: object) -> bool:
        return uid in self._by_job

    def __getitem__(self, uid: str) -> list[Pod]:
        return list(self._by_job[uid].values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_job)

    def __len__(self) -> int:
        return len(self._by_job)

    def put(self, uid: str | None, pod: Pod) -> str | None:
        """Store (or replace) a pod under its job's uid (None: under UNOWNED); the job it was kept under before, if
        that differs."""
        key, owner = _key(pod), uid if uid is not None else UNOWNED
        before = self.remove(key) if self._owner.get(key, owner) != owner else None
        self._by_job.setdefault(owner, {})[key] = pod
        self._owner[key] = owner
        return before

    def remove(self, key: tuple[str, str]) -> str | None:
        """Forget a pod; the job it was kept under (None: none, or UNOWNED)."""
        uid = self._owner.pop(key, None)
        if uid is not None:
            pods = self._by_job[uid]
            pods.pop(key, None)
            if not pods:
                del self._by_job[uid]
        return uid or None

    def pod(self, key: tuple[str, str]) -> Pod | None:
        uid = self._owner.get(key)
        return self._by_job[uid][key] if uid is not None else None

    def keys_in(self, namespace: str | None) -> list[tuple[str, str]]:
        """The pods kept of one namespace (None: of all)."""
        return [key for key in self._owner if namespace is None or key[0] == namespace]


def _key(pod: Pod) -> tuple[str, str]:
    meta = pod["metadata"]
    return str(meta.get("namespace") or ""), str(meta["name"])


class PodInformer:
    """Lists and watches the pods matching `selector` in `namespaces` (none: all), one thread per watch; applies
    every change to `store` on the event loop and tells `listener`. `synced` is set once every namespace is listed:
    nothing may plan before it (a pod missing from the store would be taken for a lost one)."""

    def __init__(self, core: client.CoreV1Api, selector: str, namespaces: list[str],
                 listener: Listener | None = None) -> None:
        self.core, self.selector, self.listener = core, selector, listener
        self.namespaces: list[str | None] = list(dict.fromkeys(namespaces)) or [None]
        self.store = PodStore()
        self.synced = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._unlisted = set(self.namespaces)
        self._versions: dict[str | None, str | None] = {}  # namespace -> the resourceVersion to watch from
        self._stopped = threading.Event()

    def start(self) -> None:
        for namespace in self.namespaces:
            threading.Thread(target=self._run, args=(namespace,), daemon=True,
                             name=f"pod-watch-{namespace or 'all'}").start()

    def stop(self) -> None:
        """The threads end at their next event or when their watch ends (they are daemons: exiting does not wait)."""
        self._stopped.set()

    def _run(self, namespace: str | None) -> None:
        failures = 0
        while not self._stopped.is_set():
            before = self._versions.get(namespace)
            try:
                if before is None:
                    self._versions[namespace] = before = self._list(namespace)
                began = time.monotonic()
                self._watch(namespace)
                if self._versions[namespace] == before and time.monotonic() - began < SHORT_WATCH_SECONDS:
                    raise WatchError("the watch ended at once without an event")  # as client-go's "very short watch"
                failures = 0
            except WatchExpired:
                log.info("pod watch (%s): resourceVersion %s expired; listing again", namespace or "all",
                         self._versions.get(namespace))
                self._versions[namespace] = None
            except Exception as exc:  # the API server restarting, a dropped connection: resume where it was
                # a stream that delivered events before it dropped is not one more failure in a row
                failures = 1 if self._versions.get(namespace) != before else failures + 1
                delay = error_backoff(failures, exc, cap=30.0)
                log.warning("pod watch (%s) failed (%d in a row); again in %.1fs: %s", namespace or "all",
                            failures, delay, exc)
                self._stopped.wait(delay)

    def _request(self, namespace: str | None, **params: Any) -> Any:
        params.update(label_selector=self.selector, _preload_content=False)
        if namespace is None:
            return self.core.list_pod_for_all_namespaces(**params)
        return self.core.list_namespaced_pod(namespace, **params)

    def _list(self, namespace: str | None) -> str:
        """List every page; hand the whole list to the loop (it replaces what the store had of the namespace)."""
        pods: list[tuple[str | None, Pod]] = []
        token: str | None = None
        while True:
            page = json.loads(self._request(namespace, limit=LIST_PAGE, _continue=token,
                                            _request_timeout=LIST_TIMEOUT).data)
            pods += [(owned_by_job(item), trim_pod(item)) for item in page.get("items") or []]
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        self.loop.call_soon_threadsafe(self._replace, namespace, pods)
        return str(page["metadata"]["resourceVersion"])

    def _watch(self, namespace: str | None) -> None:
        """Watch from the last resourceVersion seen until the server ends the stream, advancing it event by event (a
        dropped stream resumes after the last event handed over)."""
        try:
            response = self._request(namespace, watch=True, resource_version=self._versions[namespace],
                                     allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                                     _request_timeout=(10, WATCH_SECONDS + 30))
        except ApiException as exc:
            if exc.status == 410:
                raise WatchExpired(str(exc)) from exc
            raise
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, body = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    error = WatchExpired if body.get("code") == 410 else WatchError
                    raise error(str(body.get("message") or body))
                if kind != "BOOKMARK":
                    self.loop.call_soon_threadsafe(self._apply, kind == "DELETED", owned_by_job(body),
                                                   trim_pod(body))
                self._versions[namespace] = str(body["metadata"]["resourceVersion"])
                if self._stopped.is_set():
                    break
        finally:  # an unfinished stream must not go back to the pool
            response.close()
            response.release_conn()

    def _apply(self, deleted: bool, uid: str | None, pod: Pod) -> None:
        before = self.store.remove(_key(pod)) if deleted else self.store.put(uid, pod)
        if before is not None and before != uid:  # no longer that job's pod
            self._tell(before, pod)
        self._tell(uid, pod)

    def _replace(self, namespace: str | None, pods: list[tuple[str | None, Pod]]) -> None:
        """A full list: what it lacks was deleted meanwhile; what differs changed."""
        listed = {_key(pod) for _, pod in pods}
        for key in self.store.keys_in(namespace):
            if key not in listed:
                gone, uid = self.store.pod(key) or {}, self.store.remove(key)
                if uid is not None:  # a job's pod deleted meanwhile (an unowned one needs nothing)
                    self._tell(uid, gone)
        for uid, pod in pods:
            if self.store.pod(_key(pod)) != pod:
                self._apply(False, uid, pod)
        self._unlisted.discard(namespace)
        if not self._unlisted and not self.synced.is_set():
            log.info("pod watch: %d pods listed", sum(len(self.store[uid]) for uid in self.store))
            self.synced.set()

    def _tell(self, uid: str | None, pod: Pod) -> None:
        if self.listener is not None:
            try:
                self.listener(uid, pod)
            except Exception:
                log.exception("pod watch: handling pod %s failed", (pod.get("metadata") or {}).get("name"))


def _lines(response: Any) -> Iterator[bytes]:
    """The lines of a streamed answer as they arrive (a watch sends one JSON event per line)."""
    pending = b""
    for chunk in response.stream(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending
