"""kopf wiring: the operator's state lives in the stores of its own TrainingJob and pod watches (jobwatch, podwatch)
and in kopf indexes of nodes (and Kueue's objects); job, pod and node events wake the one worker task of each
affected TrainingJob (see worker), which plans (planner) and acts (actuator). Handlers stay thin: they only route
events. The shared state is the typed `OperatorContext` kopf passes as `memo`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf

from . import kueue, metrics
from . import reasons as R
from .apiclient import RECONCILE_THREADS, Api
from .cache import Cache, node_info, trim_workload
from .classify import NodeInfo
from .context import OperatorContext, Runtime, settings_from_env
from .events import EventRecorder
from .jobwatch import JobInformer
from .planning import Pod, held
from .podwatch import PodInformer
from .worker import ORPHAN_SWEEP_SECONDS, JobWorker, Releaser, release_orphan_workload, sweep_loop, sweep_orphans

log = logging.getLogger("ckpt_operator")
UNREADY_WARNING_SECONDS = 60.0


class NoDiffBase(kopf.DiffBaseStorage):
    """The operator registers no on.create/update/resume handlers, so it keeps no diff base. kopf's default deep-copies
    every watched object at every event to build one (the largest CPU cost of the 5,000-job storm's profile)."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _cache(memo: OperatorContext, indexes: Mapping[str, Any]) -> Cache:
    """The cache, its kopf indexes bound (kopf passes them to handlers only, once they are filled)."""
    cache = memo.cache
    assert cache is not None and cache.indexes_ready is not None  # made at startup
    if not cache.indexes_ready.is_set():
        cache.nodes = indexes["tj_nodes"]
        cache.workloads, cache.flavors = indexes.get("tj_workloads"), indexes.get("tj_flavors")
        cache.indexes_ready.set()
    return cache


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: OperatorContext, **_: Any) -> None:
    settings.posting.enabled = False  # Events go through our recorder (events.py), kopf's own logs do not
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    api = Api.connect(memo.qps, memo.burst)
    recorder = EventRecorder(api.event_sender, api.event_limiter)
    memo.tasks.append(asyncio.create_task(recorder.run(), name="event-recorder"))
    pods = PodInformer(api.watch, f"{R.LABEL_MANAGED_BY}={R.MANAGER}", memo.namespaces,
                       lambda uid, pod: pod_changed(memo, uid, pod))
    jobs = JobInformer(api.watch.api_client, memo.namespaces, lambda deleted, job: job_changed(memo, deleted, job))
    memo.started = Runtime(api, settings_from_env(), Releaser(api), recorder, pods, jobs)
    memo.cache = Cache(jobs.jobs, pods.store, {}, pods_synced=pods.synced, jobs_synced=jobs.synced,
                       indexes_ready=asyncio.Event())
    memo.sweeper = asyncio.create_task(sweep_loop(api, memo.cache), name="orphan-sweep")
    memo.tasks.append(asyncio.create_task(_warn_unready(memo.cache), name="unready-warning"))
    log.info("orphan sweep started: every %.0fs, from the stores", ORPHAN_SWEEP_SECONDS)
    pods.start()
    jobs.start()
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(RECONCILE_THREADS,
                                                                       thread_name_prefix="reconcile"))


@kopf.on.cleanup()
async def cleanup(memo: OperatorContext, **_: Any) -> None:
    if memo.started is not None:  # first: no event may make a worker or a release task after this
        await memo.started.jobs.stop()
        await memo.started.pods.stop()
    for worker in memo.workers.values():
        worker.task.cancel()
    if memo.sweeper is not None:
        memo.sweeper.cancel()
    for task in [*memo.tasks, *memo.releases]:
        task.cancel()
    for task in memo.started.releaser.tasks if memo.started is not None else []:
        task.cancel()


@kopf.index("", "v1", "nodes")
async def tj_nodes(body: kopf.Body, name: str, **_: Any) -> dict[str, NodeInfo]:
    """What the planner needs of each node: exists, Ready since when, out of service, its taints."""
    return {name: node_info(body)}


def job_changed(memo: OperatorContext, deleted: bool, job: dict[str, Any]) -> None:
    """A TrainingJob changed (the job watch calls this on the event loop): wake its worker (made at its first
    event); a deleted job's worker stops, and its pods and Workload are released."""
    meta = job["metadata"]
    uid, namespace, name = str(meta["uid"]), str(meta["namespace"]), str(meta["name"])
    if deleted:
        worker = memo.workers.pop(uid, None)
        if worker is not None:
            worker.task.cancel()
        metrics.set_phase(uid, namespace, None)
        task = asyncio.create_task(_release_deleted(memo, uid), name=f"release-{namespace}/{name}")
        memo.releases.add(task)
        task.add_done_callback(memo.releases.discard)
        return
    if uid not in memo.workers:
        assert memo.cache is not None
        memo.workers[uid] = JobWorker(memo.runtime, memo.cache, uid, namespace, name)
        memo.workers[uid].wake()
    else:
        memo.workers[uid].job_event(job)


async def _release_deleted(memo: OperatorContext, uid: str) -> None:
    """Release the pods and the Workload of a deleted job (what fails is left to the orphan sweep, and the Workload
    to its next event)."""
    cache, api = memo.cache, memo.runtime.api
    assert cache is not None
    await cache.synced()
    try:
        await asyncio.to_thread(sweep_orphans, api, cache, cache.job_pods(uid))
        workload = cache.workload(uid)
        if workload is not None:
            await asyncio.to_thread(release_orphan_workload, api, cache, workload, uid)
    except Exception:
        log.exception("releasing the pods and Workload of deleted TrainingJob %s failed", uid)


async def _warn_unready(cache: Cache, after: float = UNREADY_WARNING_SECONDS) -> None:
    """Say so if kopf's indexes are still unbound a while after startup: no job is planned before (a cluster
    without a single node)."""
    await asyncio.sleep(after)
    if cache.indexes_ready is not None and not cache.indexes_ready.is_set():
        log.warning("no Node seen %.0fs after startup: no TrainingJob is planned until kopf's node index is filled",
                    after)


def pod_changed(memo: OperatorContext, uid: str | None, pod: Pod) -> None:
    """A pod of the operator's changed (podwatch calls this on the event loop): wake its job's worker; release it if
    its job is gone (deleted while the operator was down). Until the jobs and the pods are listed (and kopf's
    indexes filled), orphans are left to the sweep that starts then: a job not listed yet is not a gone one."""
    worker = memo.workers.get(uid or "")
    if worker is not None:
        worker.pod_event(pod)
    elif (memo.cache is not None and memo.cache.is_synced() and held(pod)
          and (uid is None or memo.cache.job(uid) is None)):
        memo.runtime.releaser.submit(pod)


@kopf.on.event("", "v1", "nodes")
async def node_event(type: str, name: str, body: kopf.Body, memo: OperatorContext, **indexes: Any) -> None:
    """Wake the jobs with a pod on this node, and elastic gangs that may grow, when what the planner reads of the
    node changed."""
    cache = _cache(memo, indexes)
    info = None if type == "DELETED" else node_info(body)
    if info is None:
        cache.deleted_nodes.add(name)
    else:
        cache.deleted_nodes.discard(name)
    before = memo.nodes_seen.get(name)
    if before == info:
        return
    cache.node_generation += 1  # what elastic gangs fit may have changed
    taints = memo.runtime.settings.notice_taints
    notice = info.notice(taints) if info is not None else None
    if notice is not None and (before is None or before.notice(taints) is None):
        log.info("node %s: interruption notice (taint %s, %.0fs); TrainingJobs with pods there: %d", name,
                 notice[0], notice[1], len(cache.job_uids_on(name)))
    if info is None:
        memo.nodes_seen.pop(name, None)
    else:
        memo.nodes_seen[name] = info
    for uid in cache.job_uids_on(name) | cache.growable():
        worker = memo.workers.get(uid)
        if worker is not None:
            worker.wake()


# -- Kueue (registered by enable_kueue) --------------------------------------------------------------------------------
def enable_kueue() -> None:
    """Watch Kueue's Workloads and ResourceFlavors too: TrainingJobs labelled `kueue.x-k8s.io/queue-name` are then
    queued through Kueue (call before kopf runs; Kueue's CRDs must be installed)."""
    kopf.index(kueue.GROUP, kueue.VERSION, kueue.WORKLOADS)(tj_workloads)
    kopf.index(kueue.GROUP, kueue.VERSION, kueue.RESOURCE_FLAVORS)(tj_flavors)
    kopf.on.event(kueue.GROUP, kueue.VERSION, kueue.WORKLOADS)(workload_event)


async def tj_workloads(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
    """Workloads by the uid of the TrainingJob that controls them (the others are not ours)."""
    uid = _owning_job(body)
    return {uid: trim_workload(body)} if uid else None


async def tj_flavors(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    """ResourceFlavors' specs by name (their node labels and tolerations go into admitted pods)."""
    return {name: dict(body.get("spec") or {})}


async def workload_event(body: kopf.Body, memo: OperatorContext, **indexes: Any) -> None:
    cache = _cache(memo, indexes)
    uid = _owning_job(body)
    worker = memo.workers.get(uid or "")
    if worker is not None:
        worker.wake()
    elif uid is not None:  # its job is gone (deleted while the operator was down, or the DELETED event missed)
        await cache.synced()  # ... or not listed yet
        if memo.workers.get(uid) is None:
            await asyncio.to_thread(release_orphan_workload, memo.runtime.api, cache, body, uid)


def _owning_job(body: Mapping[str, Any]) -> str | None:
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == R.KIND and str(ref.get("apiVersion", "")).startswith(R.GROUP):
            return str(ref.get("uid"))
    return None
