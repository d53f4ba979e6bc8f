"""The operator's tasks: one worker per TrainingJob (a work queue of one), the finalizer releaser, and the sweep of
pods whose job is gone. They read the watches' stores and kopf's indexes on the event loop and run passes in
threads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from . import kueue, metrics
from . import reasons as R
from .actuator import Pass, finish_pass, plan_pass, release_pod, release_workload
from .apiclient import BACKGROUND, DEFERRED, NORMAL, Api, error_backoff, priority, run_prepaid
from .cache import Cache, Expectations, owned_by_job, resource_version
from .classify import NodeInfo
from .events import ObjectRef
from .planning import Actions, Pod, deleting, held, node_name, settled

if TYPE_CHECKING:
    from .context import Runtime

log = logging.getLogger("ckpt_operator")
ORPHAN_SWEEP_SECONDS = 60.0
SETTLE_SECONDS = 30.0  # with the API budget contended, how long a write after a create waits for the pods to start


class Releaser:
    """Removes the operator's finalizer from pods whose outcome is recorded, at the lowest request priority: in a
    storm, replacement pods and status writes go first; a released pod only lingers a little longer."""

    def __init__(self, api: Api, tasks: int = 4) -> None:
        self.api = api
        self.queue: asyncio.Queue[Pod] = asyncio.Queue()
        self.queued: set[str] = set()  # pod uids waiting: a pod is released once however often it is submitted
        self.loop = asyncio.get_running_loop()
        self.tasks = [asyncio.create_task(self._run(), name=f"releaser-{index}") for index in range(tasks)]

    def submit(self, pod: Pod) -> None:
        """Queue a release (callable from any thread)."""
        if held(pod):
            self.loop.call_soon_threadsafe(self._put, pod)

    def _put(self, pod: Pod) -> None:
        uid = str(pod["metadata"].get("uid") or pod["metadata"]["name"])
        if uid not in self.queued:
            self.queued.add(uid)
            self.queue.put_nowait(pod)

    async def _run(self) -> None:
        while True:
            pod = await self.queue.get()
            try:
                await asyncio.to_thread(self._release, pod)
            except Exception as exc:
                log.warning("releasing pod %s failed; the next pass of its job retries: %s",
                            pod["metadata"]["name"], exc)
            finally:
                self.queued.discard(str(pod["metadata"].get("uid") or pod["metadata"]["name"]))

    def _release(self, pod: Pod) -> None:
        with priority(BACKGROUND):
            release_pod(self.api, pod)


@dataclass(frozen=True)
class Watched:
    """A job's state as its watches report it, reduced to what tells a change: the job's and its Workload's
    resource versions, each pod's phase, whether it is deleting and its node, and those nodes as the planner sees
    them."""

    job: int  # resource versions (-1: none, or gone)
    workload: int
    pods: dict[str, tuple[str, bool, str]]  # name -> (phase, deleting, node)
    nodes: dict[str, NodeInfo | None]

    def others(self, created: tuple[str, ...]) -> tuple[object, ...]:
        """All but the `created` pods and their nodes: what, if it changes, the plan must see before its write."""
        pods = {name: state for name, state in self.pods.items() if name not in created}
        return self.job, self.workload, pods, {state[2]: self.nodes.get(state[2]) for state in pods.values()}

    def started(self, name: str) -> bool:
        """The pod runs, has finished, or is being deleted: what its start changes in the job's status is known."""
        phase, going, _ = self.pods[name]
        return going or phase in ("Running", "Succeeded", "Failed")


class JobWorker:
    """One task per TrainingJob, a work queue of one: passes of a job never run concurrently, wake-ups that
    arrive during a pass coalesce into one more pass, API errors back off per job."""

    def __init__(self, runtime: Runtime, cache: Cache, uid: str, namespace: str, name: str) -> None:
        self.api, self.settings, self.cache, self.releaser = runtime.api, runtime.settings, cache, runtime.releaser
        self.recorder = runtime.recorder
        self.uid, self.namespace, self.name = uid, namespace, name
        self.expect = Expectations()
        self.failures = 0
        self.wakeup = asyncio.Event()
        self.task = asyncio.create_task(self._loop(), name=f"tj-{namespace}/{name}")

    def wake(self) -> None:
        self.wakeup.set()

    def job_event(self, job: dict[str, Any]) -> None:
        """The job's watch event: news unless it is the echo of this worker's own last status write (the job as
        planned, with the status that pass wrote: planned again, it changes nothing, see tests/unit/fixpoint.py)."""
        if self.expect.job is None or resource_version(job) != resource_version(self.expect.job):
            self.wake()

    def pod_event(self, pod: Pod) -> None:
        """A pod's watch event: news unless it is the pod as this worker's create returned it (planned with it
        already), or the pod is settled (ended, released, its outcome in the job's status as this worker last knew
        it): in a storm each preempted pod's release and deletion would be two more passes."""
        created = self.expect.pods.get(str(pod["metadata"]["name"]))
        if created is not None and resource_version(created[1]) == resource_version(pod) >= 0:
            return
        job = self.expect.newer_job(self.cache.job(self.uid))
        if job is None or not settled(pod, str(job["metadata"]["name"]), job.get("status") or {}):
            self.wake()

    def _snapshot(self) -> tuple[dict[str, Any] | None, list[Pod], dict[str, NodeInfo]]:
        """The job, its pods and their nodes as the watches (and our own unreported writes) say; read on the
        event loop, where the watches update the stores and kopf the indexes."""
        job = self.expect.newest_job(self.cache.job(self.uid))
        pods = self.expect.merge_pods(self.cache.job_pods(self.uid))
        nodes = {}
        for pod in pods:
            info = self.cache.node(node_name(pod)) if node_name(pod) else None
            if info is not None:
                nodes[info.name] = info
        return job, pods, nodes

    async def _loop(self) -> None:
        await self.cache.synced()
        while True:
            self.wakeup.clear()
            delay = await self._pass()
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    def _watched(self) -> Watched:
        """What the watches say of this job now, to tell later what changed (see `Watched`)."""
        pods = {str(pod["metadata"]["name"]): (str((pod.get("status") or {}).get("phase")), deleting(pod),
                                               node_name(pod)) for pod in self.cache.job_pods(self.uid)}
        nodes = {state[2]: self.cache.node(state[2]) for state in pods.values() if state[2]}
        return Watched(resource_version(self.cache.job(self.uid)), resource_version(self.cache.workload(self.uid)),
                       pods, nodes)

    async def _halves(self) -> tuple[Pass, Actions | None]:
        """Plan (and create) in a thread; take the status write's token on the event loop; write in a thread. A
        write after a create waits behind other jobs' creates, and while the budget is contended until the new pods
        start (`_settle`); if news came meanwhile, the job is planned again on it first, and a plan that creates
        again waits again: in a storm every replacement pod is created before the status writes, and one write
        records all that happened (the outcome, the new attempt, that it runs)."""
        limiter, paid = self.api.limiter, False
        (job, pods, nodes), planned_on = self._snapshot(), self._watched()
        step = await asyncio.to_thread(plan_pass, self.api, self.settings, self.cache, self.expect, job, pods, nodes)
        while step.writes:  # the status write's token is taken here, not by a thread blocked in the limiter
            news = await self._settle(step, planned_on) if step.created and limiter.contended() else False
            await limiter.take_async(DEFERRED if step.created else NORMAL)
            paid = True
            if not (step.created and (news or self.wakeup.is_set())):
                break
            self.wakeup.clear()
            (job, pods, nodes), planned_on = self._snapshot(), self._watched()
            step = await asyncio.to_thread(run_prepaid, limiter, True, plan_pass, self.api, self.settings,
                                           self.cache, self.expect, job, pods, nodes)
            paid = False  # spent on a create, or given back
        # in the thread pool's queue, the write waits behind the passes queued before it (most of them create a pod):
        # made on the loop instead, writes went out at once and 45 % more of them (benchmarks/README.md, ninth session)
        result = await asyncio.to_thread(run_prepaid, limiter, paid and step.writes, finish_pass, self.api,
                                         self.expect, step, self.releaser.submit)
        return step, result

    async def _settle(self, step: Pass, planned_on: Watched) -> bool:
        """Wait, woken by the job's watch events, until the pods `step` created have started (or stopped, or
        vanished), anything else the plan read changed, or SETTLE_SECONDS passed: a write made before the pods run
        would need a second one when they do, and in a storm those writes compete with creates. True if any event
        came meanwhile (the job is then planned again before its write)."""
        loop, news, seen = asyncio.get_running_loop(), False, set[str]()
        requeue = step.actions.requeue if step.actions is not None else None  # the plan's own deadline comes first
        deadline = loop.time() + min(SETTLE_SECONDS, requeue if requeue is not None else SETTLE_SECONDS)
        while (left := deadline - loop.time()) > 0:
            now = self._watched()
            seen.update(name for name in step.created if name in now.pods)
            if now.others(step.created) != planned_on.others(step.created) or all(
                    name in now.pods and now.started(name) for name in step.created) or (seen - now.pods.keys()):
                break
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=left)
            except asyncio.TimeoutError:
                break
            self.wakeup.clear()
            news = True
        return news

    async def _pass(self) -> float | None:
        """One pass; the seconds until the next one (None: until woken)."""
        try:
            metrics.RECONCILES.inc()
            step, result = await self._halves()
            body = step.job
        except Exception as exc:
            self.failures += 1
            metrics.RECONCILE_ERRORS.inc()
            delay = error_backoff(self.failures, exc)
            log.warning("%s/%s: reconcile failed (%d in a row); retrying in %.1fs: %s", self.namespace,
                        self.name, self.failures, delay, exc, exc_info=self.failures == 1)
            return delay
        self.failures = 0
        if result is None:
            return None
        if result.events:
            meta = body["metadata"]
            ref = ObjectRef(f"{R.GROUP}/{R.VERSION}", R.KIND, self.namespace, self.name, str(meta["uid"]))
            for kind, reason, message in result.events:
                self.recorder.record(ref, kind, reason, message)
                log.info("%s/%s: %s: %s", self.namespace, self.name, reason, message)
        metrics.set_phase(self.uid, self.namespace, step.phase)
        return result.requeue


def sweep_orphans(api: Api, cache: Cache, held: list[Pod]) -> int:
    """Release the finalizer of every pod (of `held`) whose TrainingJob no longer exists or is being deleted.
    Returns how many were released."""
    released = 0
    for pod in held:
        job = cache.job(owned_by_job(pod) or "")
        if job is None or job["metadata"].get("deletionTimestamp") is not None:
            release_pod(api, pod)
            released += 1
    return released


def release_orphan_workload(api: Api, cache: Cache, workload: Mapping[str, Any], job_uid: str) -> bool:
    """Free the Workload of a TrainingJob that no longer exists (deleted, perhaps while the operator was down): its
    quota goes back and the garbage collector can delete it. True if it was released."""
    meta = workload.get("metadata") or {}
    if kueue.FINALIZER not in (meta.get("finalizers") or []) or cache.job(job_uid) is not None:
        return False
    release_workload(api, str(meta["namespace"]), str(meta["name"]), list(meta.get("finalizers") or []))
    return True


def held_pods(cache: Cache) -> list[Pod]:
    """Every indexed pod that still carries the operator's finalizer."""
    return [pod for uid in list(cast(Any, cache.pods)) for pod in cache.job_pods(uid)
            if held(pod)]


async def sweep_loop(api: Api, cache: Cache) -> None:
    """Release pods whose job is gone (deleted while the operator was down, or its DELETED event missed): once the
    jobs and pods are listed and kopf's indexes filled, then every minute, from the stores alone."""
    await cache.synced()
    while True:
        try:
            held = [pod for pod in held_pods(cache) if cache.job(owned_by_job(pod) or "") is None]
            released = await asyncio.to_thread(sweep_orphans, api, cache, held) if held else 0
            if released:
                log.info("released the finalizer of %d pod(s) whose TrainingJob no longer exists", released)
        except Exception:
            log.exception("orphan sweep failed; retrying")
        await asyncio.sleep(ORPHAN_SWEEP_SECONDS)
