"""The operator's own TrainingJob watch (jobwatch): the store reads like the kopf index it replaced (by uid, by
name, the growable gangs); listed jobs are told, a relist's missing job is told deleted, and `synced` is set only
once every job is listed."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from ckpt_operator import reasons as R
from ckpt_operator.apiclient import TokenBucket
from ckpt_operator.cache import GROWABLE, Cache, name_key, trim_pod
from ckpt_operator.classify import NodeInfo
from ckpt_operator.context import OperatorContext
from ckpt_operator.handlers import _warn_unready, pod_changed
from ckpt_operator.jobwatch import JobInformer, JobStore
from ckpt_operator.worker import JobWorker

from .test_operator_edges import SETTINGS, CreatingApi, _preempted_job
from .test_podwatch import Stream, _until, job_pod, page


def tj(name: str, uid: str, version: int, world: int | None = None, elastic: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"workers": {"min": 1, "max": 4} if elastic else 1}
    status: dict[str, Any] = {"worldSize": world} if world is not None else {}
    return {"apiVersion": "ckpt.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": str(version),
                         "managedFields": [{"manager": "kubectl"}]}, "spec": spec, "status": status}


def test_the_store_reads_like_the_index_it_replaced():
    store = JobStore()
    store.put(tj("a", "u1", 1))
    store.put(tj("gang", "u2", 2, world=2, elastic=True))
    cache = Cache(store, {}, {})
    assert cache.job("u1")["metadata"]["name"] == "a" and cache.job_by_name("ns", "gang")["metadata"]["uid"] == "u2"
    assert cache.growable() == {"u2"} and cache.job("nope") is None
    store.put(tj("gang", "u2", 3, world=4, elastic=True))  # grown to its most ranks
    assert GROWABLE not in store and cache.growable() == set()
    store.remove("u2")
    assert cache.job("u2") is None and name_key("ns", "gang") not in store and list(store) == ["u1"]


class ScriptedCustom:
    """List answers of the custom-objects API from a script, then the watch streams (see test_podwatch)."""

    def __init__(self, script: list[Any]) -> None:
        self.script, self.calls = list(script), list[dict[str, Any]]()

    def list_cluster_custom_object(self, group: str, version: str, plural: str, **params: Any) -> Any:
        self.calls.append({"list": plural, **params})
        return self.script.pop(0)

    async def watch(self, namespace: str | None, query: dict[str, str]) -> Any:
        self.calls.append({"watch": query["resourceVersion"]})
        answer = self.script.pop(0) if self.script else None
        if answer is None:
            await asyncio.sleep(30)
            return
        for piece in answer.pieces():
            yield piece
        if answer.then is not None:
            raise answer.then


def test_listed_jobs_are_told_then_watched_and_a_relist_tells_the_missing_deleted():
    gone = {"kind": "Status", "code": 410, "message": "too old resource version"}
    custom = ScriptedCustom([
        page([tj("a", "u1", 5), tj("b", "u2", 6)], 10),
        Stream([("MODIFIED", tj("a", "u1", 11)), ("DELETED", tj("b", "u2", 12)), ("ADDED", tj("c", "u3", 13)),
                ("ERROR", gone)]),
        page([tj("c", "u3", 13)], 20),  # a deleted meanwhile
    ])
    told: list[tuple[str, bool, bool]] = []  # (name, deleted, listed yet)

    async def main() -> JobInformer:
        informer = JobInformer(None, [], lambda deleted, job: told.append(
            (job["metadata"]["name"], deleted, informer.synced.is_set())), stream=custom.watch, custom=custom)
        informer.start()
        await _until("the script played", lambda: not custom.script and len(custom.calls) >= 4)
        await informer.stop()
        return informer

    informer = asyncio.run(main())
    assert told == [("a", False, False), ("b", False, False),  # listed, then synced
                    ("a", False, True), ("b", True, True), ("c", False, True),
                    ("a", True, True), ("c", False, True)]  # the relist: a gone, c told again
    assert list(informer.jobs) == ["u3"] and "managedFields" not in informer.jobs["u3"][0]["metadata"]
    assert [call.get("watch") for call in custom.calls] == [None, "10", None, "20"]


@pytest.mark.parametrize("unset", ["pods_synced", "jobs_synced", "indexes_ready"])
def test_no_job_plans_before_jobs_and_pods_are_listed_and_kopfs_indexes_bound(unset: str):
    """A pod missing from an unlisted store would be taken for a lost one, a node missing from kopf's unfilled index
    read with a GET: the worker waits for all three."""
    job, evicted = _preempted_job()
    api = CreatingApi(TokenBucket(qps=100, burst=100))
    runtime = SimpleNamespace(api=api, settings=SETTINGS, releaser=SimpleNamespace(submit=lambda pod: None),
                              recorder=SimpleNamespace(record=lambda *event: None))

    async def main() -> None:
        events = {name: asyncio.Event() for name in ("pods_synced", "jobs_synced", "indexes_ready")}
        for name, event in events.items():
            if name != unset:
                event.set()
        cache = Cache(jobs={"uid": [job]}, pods={"uid": [evicted]}, nodes={"n0": [NodeInfo("n0")]}, **events)
        worker = JobWorker(runtime, cache, "uid", "ns", "demo")  # type: ignore[arg-type]
        try:
            await asyncio.sleep(0.3)
            assert api.created == [] and api.custom.written == []  # nothing planned, nothing done
            events[unset].set()
            await _until("the replacement created", lambda: api.created)
        finally:
            worker.task.cancel()

    asyncio.run(main())
    assert len(api.created) == 1


def test_a_held_pod_of_a_job_not_listed_yet_is_not_released():
    """Before the jobs are listed, a pod whose job is not in the store is not an orphan: its job may be listed next."""
    released: list[str] = []
    pod = trim_pod(job_pod("p", "job1", 5))
    pod["metadata"]["finalizers"] = [R.POD_FINALIZER]

    async def main() -> None:
        jobs_synced = asyncio.Event()
        memo = OperatorContext()
        memo.started = SimpleNamespace(releaser=SimpleNamespace(  # type: ignore[assignment]
            submit=lambda held: released.append(held["metadata"]["name"])))
        memo.cache = Cache(jobs=JobStore(), pods={}, nodes={}, jobs_synced=jobs_synced)
        pod_changed(memo, "job1", pod)
        assert released == []
        jobs_synced.set()  # listed, and job1 is not among the jobs: gone
        pod_changed(memo, "job1", pod)

    asyncio.run(main())
    assert released == ["p"]


def test_kopfs_indexes_still_unbound_after_a_while_are_logged(caplog: pytest.LogCaptureFixture):
    """No node, no kopf handler call, no pass: the operator says why instead of idling silently."""
    bound = Cache(jobs=JobStore(), pods={}, nodes={}, indexes_ready=asyncio.Event())
    assert bound.indexes_ready is not None
    bound.indexes_ready.set()
    unbound = Cache(jobs=JobStore(), pods={}, nodes={}, indexes_ready=asyncio.Event())

    async def main() -> None:
        await asyncio.gather(_warn_unready(bound, after=0.01), _warn_unready(unbound, after=0.01))

    with caplog.at_level(logging.WARNING, logger="ckpt_operator"):
        asyncio.run(main())
    assert [record.getMessage() for record in caplog.records] == [
        "no Node seen 0s after startup: no TrainingJob is planned until kopf's node index is filled"]
