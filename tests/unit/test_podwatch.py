"""The operator's own pod watch (podwatch): list in pages, watch from the list's version, resume a dropped stream
where it was, list again on 410 Gone and forget what the new list lacks; and no job plans before the pods are
listed. Driven by a scripted API whose watch streams arrive in pieces that split lines."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any

from ckpt_operator import reasons as R
from ckpt_operator.apiclient import TokenBucket
from ckpt_operator.cache import Cache, trim_pod
from ckpt_operator.classify import NodeInfo
from ckpt_operator.errors import WatchExpired
from ckpt_operator.podwatch import UNOWNED, PodInformer, PodStore
from ckpt_operator.worker import JobWorker, held_pods

from .test_operator_edges import SETTINGS, CreatingApi, _preempted_job


def job_pod(name: str, job: str | None, version: int, phase: str = "Pending") -> dict[str, Any]:
    """A pod as the API server sends it: labelled and (if `job`) controlled by a TrainingJob."""
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": str(version),
                            "labels": {R.LABEL_MANAGED_BY: R.MANAGER, R.LABEL_JOB_UID: job or "none"},
                            "managedFields": [{"manager": "ckpt-operator", "fieldsV1": {"f:spec": {}}}]}
    if job is not None:
        meta["ownerReferences"] = [{"apiVersion": "ckpt.dev/v1alpha1", "kind": "TrainingJob", "name": "j",
                                    "uid": job, "controller": True}]
    return {"metadata": meta, "spec": {"nodeName": "n0", "containers": [{"name": "trainer", "image": "x"}]},
            "status": {"phase": phase, "hostIP": "10.0.0.1"}}


def page(items: list[dict[str, Any]], version: int, token: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(data=json.dumps({"metadata": {"resourceVersion": str(version), "continue": token},
                                            "items": items}).encode())


class Stream:
    """A watch answer: its events as JSON lines, sent in 37-byte pieces (lines arrive split), then `then` raised."""

    def __init__(self, events: list[tuple[str, dict[str, Any]]], then: Exception | None = None) -> None:
        self.body = b"".join(json.dumps({"type": kind, "object": obj}).encode() + b"\n" for kind, obj in events)
        self.then = then

    def pieces(self) -> Iterator[bytes]:
        yield from (self.body[start:start + 37] for start in range(0, len(self.body), 37))


class ScriptedCore:
    """Answers list calls (in a thread) and watch requests (on the loop) in order from a script; past its end, waits
    until the test is over."""

    def __init__(self, script: list[Any]) -> None:
        self.script, self.calls, self.stamps = list(script), list[dict[str, Any]](), list[float]()
        self.done, self.over = threading.Event(), threading.Event()

    def _next(self, call: dict[str, Any]) -> Any:
        self.calls.append(call)
        self.stamps.append(time.monotonic())
        if not self.script:
            self.done.set()
            return None
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def list_pod_for_all_namespaces(self, **params: Any) -> Any:
        answer = self._next(params)
        if answer is None:
            self.over.wait(10)
            raise ConnectionError("the test is over")
        return answer

    async def watch(self, namespace: str | None, query: dict[str, str]) -> AsyncIterator[bytes]:
        answer = self._next({**query, "watch": True, "resource_version": query["resourceVersion"]})
        if answer is None:
            while not self.over.is_set():
                await asyncio.sleep(0.01)
            raise ConnectionError("the test is over")
        for piece in answer.pieces():
            yield piece
            await asyncio.sleep(0)
        if answer.then is not None:
            raise answer.then


async def _until(what: str, check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _names(store: PodStore) -> dict[str, list[tuple[str, str]]]:
    return {uid: sorted((pod["metadata"]["name"], pod["status"]["phase"]) for pod in store[uid]) for uid in store}


def _play(core: ScriptedCore, listener: Callable[[PodInformer, str | None, dict[str, Any]], None] | None = None
          ) -> PodInformer:
    """Run an informer over the whole script of `core`, telling `listener` (with the informer) of every change."""

    async def main() -> PodInformer:
        told = (lambda uid, pod: listener(informer, uid, pod)) if listener is not None else None
        informer = PodInformer(core, "managed=us", [], told, stream=core.watch)
        informer.start()
        await _until("the script played", core.done.is_set)
        await asyncio.sleep(0.05)  # the loop applies what the thread handed it before blocking
        core.over.set()
        await informer.stop()
        return informer

    return asyncio.run(main())


def test_the_pod_watch_lists_watches_resumes_and_lists_again_when_its_version_expired():
    gone = {"kind": "Status", "code": 410, "message": "too old resource version: 14 (30)"}
    core = ScriptedCore([
        page([job_pod("a", "job1", 5)], 10, token="next"),
        page([job_pod("b", "job1", 6), job_pod("c", "job2", 7)], 10),
        Stream([("MODIFIED", job_pod("a", "job1", 11, "Running")),
                ("BOOKMARK", {"metadata": {"resourceVersion": "12"}}), ("DELETED", job_pod("c", "job2", 13)),
                ("ADDED", job_pod("stray", None, 14))]),  # the server ends the stream: resume from 14
        Stream([("ERROR", gone)]),  # 410 in the stream: list again
        page([job_pod("a", "job1", 11, "Running"), job_pod("e", "job2", 19)], 20),  # b deleted meanwhile
        Stream([("MODIFIED", job_pod("e", "job2", 21, "Running"))],
               then=ConnectionResetError("dropped")),  # a dropped stream: resume from 21, do not list
    ])
    told: list[tuple[str | None, str, bool]] = []  # (job uid, pod, listed yet)

    informer = _play(core, lambda informer, uid, pod: told.append(
        (uid, pod["metadata"]["name"], informer.synced.is_set())))
    assert told == [("job1", "a", False), ("job1", "b", False), ("job2", "c", False),  # listed, then synced
                    ("job1", "a", True), ("job2", "c", True), (None, "stray", True),  # a pod of no job is told too
                    ("job1", "b", True), ("job2", "e", True),  # the second list: b gone, e new, a unchanged
                    ("job2", "e", True)]
    assert _names(informer.store) == {"job1": [("a", "Running")], "job2": [("e", "Running")]}
    versions = [(call.get("watch", False), call.get("resource_version"), call.get("_continue")) for call in core.calls]
    assert versions == [(False, None, None), (False, None, "next"), (True, "10", None), (True, "14", None),
                        (False, None, None), (True, "20", None), (True, "21", None)]
    lists, watches = [call for call in core.calls if not call.get("watch")], [c for c in core.calls if c.get("watch")]
    assert all(call["label_selector"] == "managed=us" and call["_preload_content"] is False for call in lists)
    assert all(call["_request_timeout"] for call in lists)  # a list stalled on a dead connection is given up
    assert all(call["labelSelector"] == "managed=us" and call["allowWatchBookmarks"] == "true" for call in watches)
    kept = informer.store["job1"][0]
    assert "managedFields" not in kept["metadata"] and "containers" not in kept["spec"]  # trimmed


def test_a_watch_refused_with_410_lists_again():
    """The answer to the watch request itself is 410 (WatchClient raises WatchExpired on it)."""
    core = ScriptedCore([page([job_pod("a", "job1", 5)], 10), WatchExpired("410: Gone"),
                         page([], 30)])

    informer = _play(core)
    assert len(informer.store) == 0  # the second list lacked the pod: it is forgotten
    assert [call.get("resource_version") for call in core.calls] == [None, "10", None, "30"]


def test_a_change_the_trim_drops_wakes_no_job_but_is_kept():
    """kwok's delete shortens the grace period of an evicted pod, the kubelet flips readiness: a new resourceVersion,
    nothing the planner reads. The job is not woken for it (in a storm, one pass per preemption saved); a real
    change still wakes it."""
    quiet = job_pod("a", "job1", 11, "Running")
    quiet["metadata"]["deletionGracePeriodSeconds"] = 0
    quiet["status"]["hostIP"] = "10.0.0.9"
    moved = job_pod("a", "job2", 14, "Failed")
    core = ScriptedCore([page([job_pod("a", "job1", 5, "Running")], 10),
                         Stream([("MODIFIED", quiet), ("MODIFIED", job_pod("a", "job1", 12, "Failed")),
                                 ("MODIFIED", job_pod("a", "job1", 13, "Failed")), ("MODIFIED", moved)])])
    told: list[tuple[str | None, str]] = []

    informer = _play(core, lambda informer, uid, pod: told.append((uid, pod["status"]["phase"])))
    assert told == [("job1", "Running"), ("job1", "Failed"), ("job1", "Failed"), ("job2", "Failed")]
    assert informer.store["job2"][0]["metadata"]["resourceVersion"] == "14" and "job1" not in informer.store
    store = PodStore()
    store.put("job1", trim_pod(job_pod("b", "job1", 5)))
    assert store.unchanged("job1", trim_pod(job_pod("b", "job1", 6)))
    assert not store.unchanged("job2", trim_pod(job_pod("b", "job1", 6)))  # kept under another job
    assert not store.unchanged("job1", trim_pod(job_pod("b", "job1", 6, "Running")))
    assert not store.unchanged("job1", trim_pod(job_pod("c", "job1", 6)))  # not kept at all
    ready = job_pod("b", "job1", 7)  # readiness flips: the planner reads no Ready or ContainersReady condition
    ready["status"]["conditions"] = [{"type": kind, "status": "True"} for kind in ("Ready", "ContainersReady")]
    assert store.unchanged("job1", trim_pod(ready))
    ready["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "Eviction"})
    assert not store.unchanged("job1", trim_pod(ready))  # the classifier reads that one


def test_a_pod_moved_to_another_job_leaves_the_first():
    store = PodStore()
    store.put("job1", {"metadata": {"name": "p", "namespace": "ns"}})
    assert store.put("job2", {"metadata": {"name": "p", "namespace": "ns"}}) == "job1"
    assert "job1" not in store and [pod["metadata"]["name"] for pod in store["job2"]] == ["p"]
    assert store.put(None, {"metadata": {"name": "p", "namespace": "ns"}}) == "job2"
    assert list(store) == [UNOWNED]
    assert store.put("job1", {"metadata": {"name": "p", "namespace": "ns"}}) is None  # not told as an orphan
    assert store.remove(("ns", "p")) == "job1" and len(store) == 0


def test_a_held_pod_no_job_controls_is_left_to_the_orphan_sweep():
    """Listed before the kopf indexes were ready (so not released on sight), it must still be found by the sweep:
    kept under UNOWNED, it is among the held pods whose job is gone."""
    store = PodStore()
    stray = job_pod("stray", None, 5)
    stray["metadata"]["finalizers"] = [R.POD_FINALIZER]
    store.put(None, trim_pod(stray))
    cache = Cache(jobs={}, pods=store, nodes={})
    assert [pod["metadata"]["name"] for pod in held_pods(cache)] == ["stray"]


def test_a_watch_that_ends_at_once_without_an_event_backs_off():
    """Like client-go's "very short watch": a proxy ending every watch at once must not make a request loop."""
    core = ScriptedCore([page([], 10), Stream([]), Stream([])])

    async def main() -> None:
        informer = PodInformer(core, "managed=us", [], stream=core.watch)
        informer.start()
        await _until("the script played", core.done.is_set)
        core.over.set()
        await informer.stop()

    asyncio.run(main())
    watches = [stamp for call, stamp in zip(core.calls, core.stamps, strict=True) if call.get("watch")]
    assert len(watches) == 3 and all(later - earlier >= 0.3 for earlier, later in itertools.pairwise(watches))


def test_no_job_plans_before_the_pods_are_listed():
    """A pod missing from an unlisted store would be taken for a lost one (a replacement created beside it)."""
    job, evicted = _preempted_job()
    api = CreatingApi(TokenBucket(qps=100, burst=100))
    runtime = SimpleNamespace(api=api, settings=SETTINGS, releaser=SimpleNamespace(submit=lambda pod: None),
                              recorder=SimpleNamespace(record=lambda *event: None))
    listed_at: list[float] = []

    async def main() -> None:
        event = asyncio.Event()
        cache = Cache(jobs={"uid": [job]}, pods={"uid": [evicted]}, nodes={"n0": [NodeInfo("n0")]},
                      pods_synced=event)
        worker = JobWorker(runtime, cache, "uid", "ns", "demo")  # type: ignore[arg-type]
        try:
            await asyncio.sleep(0.3)
            listed_at.append(time.monotonic())
            assert api.created == [] and api.custom.written == []  # nothing planned, nothing done
            event.set()
            await _until("the replacement created", lambda: api.created)
        finally:
            worker.task.cancel()

    asyncio.run(main())
    assert len(api.created) == 1
