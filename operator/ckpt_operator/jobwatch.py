"""The TrainingJobs from a list-and-watch of the operator's own (`podwatch.Reflector`, which the pod watch uses too,
over another collection). kopf's machinery per TrainingJob event (a worker task per object, a handler call for the
index and one for the event, each with its kwargs, state and logger) cost ~1.6 ms of CPU per event in the 1,000-job
storm's profile against ~0.34 ms per pod event of the pod watch; most TrainingJob events are the echoes of the
operator's own status writes (benchmarks/README.md, thirteenth session)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client

from . import reasons as R
from .apiclient import api_path
from .cache import GROWABLE, growable, name_key, trim_job
from .podwatch import Chunks, Reflector

log = logging.getLogger("ckpt_operator.jobwatch")

Job = dict[str, Any]
JobListener = Callable[[bool, Job], None]  # (deleted, the trimmed job)


class JobStore:
    """TrainingJobs (trimmed) by uid, by `namespace/name` (`cache.name_key`), and under GROWABLE the elastic gangs
    that may grow: read like the kopf index it replaces (`key in store`, `store[key]`). Changed on the loop only."""

    def __init__(self) -> None:
        self._by_uid: dict[str, Job] = {}
        self._by_name: dict[str, str] = {}  # name_key -> uid
        self._growable: set[str] = set()

    def __contains__(self, key: object) -> bool:
        if key == GROWABLE:
            return bool(self._growable)
        return key in self._by_uid or key in self._by_name

    def __getitem__(self, key: str) -> list[Job]:
        if key == GROWABLE:
            return [self._by_uid[uid] for uid in self._growable]
        return [self._by_uid[self._by_name.get(key, key)]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_uid)

    def __len__(self) -> int:
        return len(self._by_uid)

    def get(self, uid: str) -> Job | None:
        return self._by_uid.get(uid)

    def put(self, job: Job) -> None:
        meta = job["metadata"]
        uid = str(meta["uid"])
        self._by_uid[uid] = job
        self._by_name[name_key(str(meta.get("namespace") or ""), str(meta["name"]))] = uid
        if growable(job):
            self._growable.add(uid)
        else:
            self._growable.discard(uid)

    def remove(self, uid: str) -> Job | None:
        job = self._by_uid.pop(uid, None)
        if job is not None:
            meta = job["metadata"]
            key = name_key(str(meta.get("namespace") or ""), str(meta["name"]))
            if self._by_name.get(key) == uid:
                del self._by_name[key]
            self._growable.discard(uid)
        return job

    def uids_in(self, namespace: str | None) -> list[str]:
        return [uid for uid, job in self._by_uid.items()
                if namespace is None or job["metadata"].get("namespace") == namespace]


class JobInformer(Reflector[Job]):
    """The TrainingJobs, kept in `jobs`; every change is told to `on_job` (a relist tells every job listed, and the
    ones it lacks as deleted). Nothing may take a job's absence from `jobs` for its deletion before `synced`."""

    kind = "TrainingJob"

    def __init__(self, api_client: client.ApiClient | None, namespaces: list[str], on_job: JobListener,
                 stream: Chunks | None = None, custom: Any = None) -> None:
        super().__init__(None if stream is not None else api_client, namespaces, stream=stream)
        self.custom = custom if custom is not None else client.CustomObjectsApi(api_client)
        self.jobs = JobStore()
        self.on_job = on_job

    @staticmethod
    def path(namespace: str | None) -> str:
        if namespace is None:
            return api_path("apis", R.GROUP, R.VERSION, R.PLURAL)
        return api_path("apis", R.GROUP, R.VERSION, "namespaces", namespace, R.PLURAL)

    def _count(self) -> int:
        return len(self.jobs)

    def _page(self, namespace: str | None, params: dict[str, Any]) -> Any:
        if namespace is None:
            return self.custom.list_cluster_custom_object(R.GROUP, R.VERSION, R.PLURAL, **params)
        return self.custom.list_namespaced_custom_object(R.GROUP, R.VERSION, namespace, R.PLURAL, **params)

    def _item(self, item: dict[str, Any]) -> Job:
        return trim_job(item)

    def _event(self, deleted: bool, body: dict[str, Any]) -> None:
        self._apply(deleted, self._item(body))

    def _apply(self, deleted: bool, job: Job) -> None:
        if deleted:
            self.jobs.remove(str(job["metadata"]["uid"]))
        else:
            self.jobs.put(job)
        try:
            self.on_job(deleted, job)
        except Exception:
            log.exception("TrainingJob watch: handling TrainingJob %s failed", job["metadata"].get("name"))

    def _replace(self, namespace: str | None, listed: list[Job]) -> None:
        uids = {str(job["metadata"]["uid"]) for job in listed}
        for uid in self.jobs.uids_in(namespace):
            gone = self.jobs.get(uid)
            if uid not in uids and gone is not None:
                self._apply(True, gone)
        for job in listed:
            self._apply(False, job)
