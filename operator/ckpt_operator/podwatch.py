"""The operator's pods from a list-and-watch of its own (`Reflector`, like client-go's: list, watch from the list's
resourceVersion, resume after a dropped stream, list again on 410 Gone). Kept trimmed (`cache.trim_pod`) by the uid
of their TrainingJob; a change the trim drops wakes no job. Pods are the kind that storms (each changes ~8 times per
preemption): kopf's per-event machinery for them (a worker task per object, a handler call per index and event, the
raw body kept per object) was a quarter of the operator's CPU and much of its memory at 5,000 jobs. The TrainingJobs
are watched by the same reflector (jobwatch); nodes and Kueue's objects stay with kopf. Events are parsed with
pydantic's JSON parser (twice as fast as `json` on a pod)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Generic, TypeVar, cast

import aiohttp
from kubernetes import client
from pydantic_core import from_json

from .apiclient import api_path, error_backoff, pods_path, request_parts, tls_context
from .cache import owned_by_job, trim_pod
from .errors import WatchError, WatchExpired
from .planning import Pod

log = logging.getLogger("ckpt_operator.podwatch")

WATCH_SECONDS = 300  # the server ends a watch after this long; the client gives up 30 s later (a hung connection)
LIST_PAGE = 500
LIST_TIMEOUT = (10, 60)  # (connect, read) seconds of one page: a list stalled on a dead connection is tried again
SHORT_WATCH_SECONDS = 1.0  # a watch that ends sooner without an event backs off like a failure
Listener = Callable[[str | None, Pod], None]  # (the TrainingJob uid the pod belongs to, or None; the trimmed pod)
Listed = TypeVar("Listed")  # what a reflector's list yields per object
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

    def unchanged(self, uid: str | None, pod: Pod) -> bool:
        """`pod` is kept under `uid` already and differs only in its resourceVersion: nothing the planner reads
        changed (a shortened grace period, a field the trim drops)."""
        key = _key(pod)
        before = self.pod(key)
        if before is None or self._owner.get(key) != (uid if uid is not None else UNOWNED):
            return False
        return (before["spec"], before["status"]) == (pod["spec"], pod["status"]) and (
            {**before["metadata"], "resourceVersion": None} == {**pod["metadata"], "resourceVersion": None})

    def pod(self, key: tuple[str, str]) -> Pod | None:
        uid = self._owner.get(key)
        return self._by_job[uid][key] if uid is not None else None

    def keys_in(self, namespace: str | None) -> list[tuple[str, str]]:
        """The pods kept of one namespace (None: of all)."""
        return [key for key in self._owner if namespace is None or key[0] == namespace]


def _key(pod: Pod) -> tuple[str, str]:
    meta = pod["metadata"]
    return str(meta.get("namespace") or ""), str(meta["name"])


Chunks = Callable[[str | None, dict[str, str]], AsyncIterator[bytes]]  # (namespace, query) -> a watch's body


class Reflector(Generic[Listed]):
    """Lists and watches one collection in `namespaces` (none: all), one task per namespace on the event loop (lists
    in a thread), like client-go's reflector; subclasses keep what they list and watch (`_replace`, `_event`).
    `synced` is set once every namespace is listed. The watches run on the loop, as kopf's do: a watch in a thread
    waits for the GIL at every read of the stream."""

    kind = "object"  # what the log lines call it ("pod", "TrainingJob")

    def __init__(self, api_client: client.ApiClient | None, namespaces: list[str], selector: str = "",
                 stream: Chunks | None = None) -> None:
        self.selector = selector
        self.client = None if stream is not None else WatchClient(cast(client.ApiClient, api_client), self.path)
        self.stream: Chunks = stream or cast(WatchClient, self.client).chunks
        self.namespaces: list[str | None] = list(dict.fromkeys(namespaces)) or [None]
        self.synced = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self._unlisted = set(self.namespaces)
        self._versions: dict[str | None, str | None] = {}  # namespace -> the resourceVersion to watch from

    @staticmethod
    def path(namespace: str | None) -> str:
        """The URL path of the watched collection (None: of every namespace)."""
        raise NotImplementedError

    def _page(self, namespace: str | None, params: dict[str, Any]) -> Any:
        """One page of the list (its answer unread: `.data` holds the bytes)."""
        raise NotImplementedError

    def _item(self, item: dict[str, Any]) -> Listed:
        """What is kept of one listed object."""
        raise NotImplementedError

    def _list(self, namespace: str | None) -> tuple[list[Listed], str]:
        """Every page (in a thread): what was listed, and the list's resourceVersion."""
        listed: list[Listed] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": LIST_PAGE, "_continue": token, "_request_timeout": LIST_TIMEOUT,
                                      "_preload_content": False}
            page = from_json(self._page(namespace, params).data)
            listed += [self._item(item) for item in page.get("items") or []]
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return listed, str(page["metadata"]["resourceVersion"])

    def _replace(self, namespace: str | None, listed: list[Listed]) -> None:
        """A full list of one namespace: what it lacks was deleted meanwhile; what differs changed."""
        raise NotImplementedError

    def _event(self, deleted: bool, body: dict[str, Any]) -> None:
        """One watch event's object (ADDED, MODIFIED or DELETED)."""
        raise NotImplementedError

    def _count(self) -> int:
        """How many objects are kept (for the log line once everything is listed)."""
        raise NotImplementedError

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._run(namespace), name=f"{self.kind}-watch-{namespace or 'all'}")
                      for namespace in self.namespaces]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    async def _run(self, namespace: str | None) -> None:
        failures = 0
        while True:
            before = self._versions.get(namespace)
            try:
                if before is None:
                    listed, before = await asyncio.to_thread(self._list, namespace)
                    self._replace(namespace, listed)
                    self._listed(namespace)
                    self._versions[namespace] = before
                began = time.monotonic()
                await self._watch(namespace)
                if self._versions[namespace] == before and time.monotonic() - began < SHORT_WATCH_SECONDS:
                    raise WatchError("the watch ended at once without an event")  # as client-go's "very short watch"
                failures = 0
            except WatchExpired:
                log.info("%s watch (%s): resourceVersion %s expired; listing again", self.kind, namespace or "all",
                         self._versions.get(namespace))
                self._versions[namespace] = None
            except Exception as exc:  # the API server restarting, a dropped connection: resume where it was
                # a stream that delivered events before it dropped is not one more failure in a row
                failures = 1 if self._versions.get(namespace) != before else failures + 1
                delay = error_backoff(failures, exc, cap=30.0)
                log.warning("%s watch (%s) failed (%d in a row); again in %.1fs: %s", self.kind, namespace or "all",
                            failures, delay, exc)
                await asyncio.sleep(delay)

    def _listed(self, namespace: str | None) -> None:
        self._unlisted.discard(namespace)
        if not self._unlisted and not self.synced.is_set():
            log.info("%s watch: %d %ss listed", self.kind, self._count(), self.kind)
            self.synced.set()

    async def _watch(self, namespace: str | None) -> None:
        """Watch from the last resourceVersion seen until the server ends the stream, advancing it event by event (a
        dropped stream resumes after the last event applied)."""
        query = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": str(self._versions[namespace]),
                 "timeoutSeconds": str(WATCH_SECONDS), **({"labelSelector": self.selector} if self.selector else {})}
        async for line in _lines(self.stream(namespace, query)):
            event = from_json(line)
            kind, body = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                error = WatchExpired if body.get("code") == 410 else WatchError
                raise error(str(body.get("message") or body))
            if kind != "BOOKMARK":
                self._event(kind == "DELETED", body)
            self._versions[namespace] = str(body["metadata"]["resourceVersion"])


class PodInformer(Reflector[tuple[str | None, Pod]]):
    """The operator's pods (those matching `selector`), kept in `store` by their job's uid; every change is told to
    `listener`. Nothing may plan before `synced`: a pod missing from the store would be taken for a lost one."""

    kind = "pod"

    def __init__(self, core: client.CoreV1Api, selector: str, namespaces: list[str],
                 listener: Listener | None = None, stream: Chunks | None = None) -> None:
        super().__init__(None if stream is not None else core.api_client, namespaces, selector, stream)
        self.core, self.listener = core, listener
        self.store = PodStore()

    @staticmethod
    def path(namespace: str | None) -> str:
        return api_path("api", "v1", "pods") if namespace is None else pods_path(namespace)

    def _count(self) -> int:
        return sum(len(self.store[uid]) for uid in self.store)

    def _page(self, namespace: str | None, params: dict[str, Any]) -> Any:
        params = {**params, "label_selector": self.selector}
        return (self.core.list_pod_for_all_namespaces(**params) if namespace is None
                else self.core.list_namespaced_pod(namespace, **params))

    def _item(self, item: dict[str, Any]) -> tuple[str | None, Pod]:
        return owned_by_job(item), trim_pod(item)

    def _event(self, deleted: bool, body: dict[str, Any]) -> None:
        self._apply(deleted, *self._item(body))

    def _apply(self, deleted: bool, uid: str | None, pod: Pod) -> None:
        if not deleted and self.store.unchanged(uid, pod):  # kept (its resourceVersion is newer), nobody woken
            self.store.put(uid, pod)
            return
        before = self.store.remove(_key(pod)) if deleted else self.store.put(uid, pod)
        if before is not None and before != uid:  # no longer that job's pod
            self._tell(before, pod)
        self._tell(uid, pod)

    def _replace(self, namespace: str | None, listed: list[tuple[str | None, Pod]]) -> None:
        keys = {_key(pod) for _, pod in listed}
        for key in self.store.keys_in(namespace):
            if key not in keys:
                gone, uid = self.store.pod(key) or {}, self.store.remove(key)
                if uid is not None:  # a job's pod deleted meanwhile (an unowned one needs nothing)
                    self._tell(uid, gone)
        for uid, pod in listed:
            if self.store.pod(_key(pod)) != pod:
                self._apply(False, uid, pod)

    def _tell(self, uid: str | None, pod: Pod) -> None:
        if self.listener is not None:
            try:
                self.listener(uid, pod)
            except Exception:
                log.exception("pod watch: handling pod %s failed", (pod.get("metadata") or {}).get("name"))


class WatchClient:
    """Watch streams over aiohttp on the event loop (kopf's own HTTP client), addressed and authenticated by a
    kubernetes `ApiClient` (its server, TLS files, token and its refresh, user agent)."""

    def __init__(self, api_client: client.ApiClient, path: Callable[[str | None], str]) -> None:
        self.api_client, self.path = api_client, path
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def chunks(self, namespace: str | None, query: dict[str, str]) -> AsyncIterator[bytes]:
        """The body of one watch request as it arrives; WatchExpired on 410, WatchError on another failure."""
        url, headers = request_parts(self.api_client, "GET", self.path(namespace), query, None)
        if self._session is None:
            context = tls_context(self.api_client.configuration)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_SECONDS + 30)
        async with self._session.get(url, headers=headers, timeout=timeout) as response:
            if response.status != 200:
                error = WatchExpired if response.status == 410 else WatchError
                raise error(f"{response.status}: {(await response.text())[:500]}")
            async for chunk in response.content.iter_any():
                yield chunk


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The lines of a streamed answer as they arrive (a watch sends one JSON event per line)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending
