"""TrainingJobs queued through the real Kueue (v0.17, built by `make tools`): one Workload for a job's whole life,
nothing runs before admission, a gang admitted all-or-nothing on its flavor's nodes, and a preemption by a
higher-priority Kueue workload that checkpoints, waits in the queue and resumes with no step lost."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from ckpt_sdk._store import Store
from tests.kube import Jobs, ObjectRecorder, progress, trainingjob, wait_for

pytestmark = pytest.mark.cluster
TRAINER = Path(__file__).parent / "trainers" / "sdk_trainer.py"
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
QUEUE_LABEL, PRIORITY_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"


def trainer(steps: int, every: int, seconds: float = 0.05) -> list[str]:
    return [sys.executable, str(TRAINER), "--steps", str(steps), "--every-steps", str(every), "--step-seconds",
            str(seconds)]


class Kueue:
    """Kueue objects for one test: cluster-scoped ones (flavors, ClusterQueues, priority classes) named after the
    test's namespace and deleted after it."""

    def __init__(self, namespace: str) -> None:
        self.ns, self.api = namespace, client.CustomObjectsApi()
        self.cluster_scoped: list[tuple[str, str]] = []

    def create(self, plural: str, body: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", **body}
        if plural == "localqueues":
            self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, body)
            return
        self.api.create_cluster_custom_object(GROUP, VERSION, plural, body)
        self.cluster_scoped.append((plural, body["metadata"]["name"]))

    def flavor(self, name: str, node_labels: dict[str, str] | None = None) -> str:
        name = f"{name}-{self.ns}"[:63]
        self.create("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": name},
                                        "spec": {"nodeLabels": node_labels or {}}})
        return name

    def queue(self, name: str, flavor: str, cpu: str, cohort: str | None = None,
              preemption: dict[str, str] | None = None) -> str:
        """A ClusterQueue with `cpu` (and plenty of memory) of `flavor`, and a LocalQueue `name` to it."""
        cluster_queue = f"{name}-{self.ns}"[:63]
        spec: dict[str, Any] = {"namespaceSelector": {}, "resourceGroups": [{
            "coveredResources": ["cpu", "memory"], "flavors": [{"name": flavor, "resources": [
                {"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": "64Gi"}]}]}]}
        if cohort:
            spec["cohortName"] = cohort
        if preemption:
            spec["preemption"] = preemption
        self.create("clusterqueues", {"kind": "ClusterQueue", "metadata": {"name": cluster_queue}, "spec": spec})
        self.create("localqueues", {"kind": "LocalQueue", "metadata": {"name": name},
                                    "spec": {"clusterQueue": cluster_queue}})
        return cluster_queue

    def priority(self, name: str, value: int) -> str:
        name = f"{name}-{self.ns}"[:63]
        self.create("workloadpriorityclasses", {"kind": "WorkloadPriorityClass", "metadata": {"name": name},
                                                "value": value})
        return name

    def workloads(self) -> list[dict[str, Any]]:
        return list(self.api.list_namespaced_custom_object(GROUP, VERSION, self.ns, "workloads")["items"])

    def workload_of(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((w for w in self.workloads() if any(
            o["kind"] == kind and o["name"] == name for o in w["metadata"].get("ownerReferences") or [])), None)

    def delete_all(self) -> None:
        for plural, name in reversed(self.cluster_scoped):
            try:
                self.api.delete_cluster_custom_object(GROUP, VERSION, plural, name)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture()
def queues(kueue, namespace) -> Iterator[Kueue]:  # type: ignore[no-untyped-def]
    objects = Kueue(namespace)
    yield objects
    objects.delete_all()


def requesting(cpu: str, command: list[str], **metadata: Any) -> dict[str, Any]:
    """A TrainingJob manifest whose trainer requests `cpu` (what Kueue counts against the quota)."""
    body = trainingjob(metadata.pop("name"), command, **metadata.pop("spec", {}))
    body["metadata"].update(metadata)
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["resources"] = {"requests": {"cpu": cpu, "memory": "1Gi"}}
    return body


def admitted(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == "Admitted"), None)


def pods_of(core: client.CoreV1Api, namespace: str, job: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"ckpt.dev/job={job}").items)


def until(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    return wait_for(what, check, timeout)


def test_a_job_over_quota_stays_queued_with_a_condition_and_releases_its_workload(operator, core, namespace, claim,
                                                                                   queues):
    flavor = queues.flavor("small")
    queues.queue("q", flavor, cpu="2")
    jobs = Jobs(namespace)
    jobs.create(requesting("3", trainer(5, 5), name="big", labels={QUEUE_LABEL: "q"}))
    status = jobs.wait("big", "queued", lambda st: (admitted(st) or {}).get("reason") == "Queued"
                       and "insufficient quota" in (admitted(st) or {}).get("message", ""), 60)
    condition = admitted(status)
    assert condition is not None and condition["status"] == "False", condition
    assert "request (3) > maximum capacity (2)" in condition["message"], condition  # Kueue's words for why
    assert status["phase"] == "Pending" and status["kueue"]["workload"].startswith("trainingjob-big-")
    workload = queues.workload_of("TrainingJob", "big")
    assert workload is not None and workload["spec"]["podSets"][0]["count"] == 1
    assert workload["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "3"
    assert pods_of(core, namespace, "big") == []  # nothing runs before admission
    assert jobs.status("big")["attempt"] == 0 and pods_of(core, namespace, "big") == []  # still nothing, still queued
    described = subprocess.run([str(Path(sys.executable).with_name("kubectl-ckpt")), "describe", "big", "-n",
                                namespace], env=operator.cluster.env(), capture_output=True, text=True, timeout=60)
    assert f"Workload {status['kueue']['workload']}, not admitted" in described.stdout, described.stdout
    assert "insufficient quota for cpu" in described.stdout.split("Queued")[1], described.stdout
    jobs.api.delete_namespaced_custom_object("ckpt.dev", "v1alpha1", namespace, "trainingjobs", "big")
    until("the Workload deleted with its job", lambda: queues.workload_of("TrainingJob", "big") is None, 60)


RANK_SCRIPT = "import os; open(os.path.join(os.environ['CKPT_DIR'], 'rank-' + os.environ['RANK']), 'w').close()"


def test_a_gang_is_admitted_all_or_nothing_on_its_flavors_nodes(operator, core, namespace, claim, queues):
    node = "local-node-2"
    flavor = queues.flavor("pinned", {"kubernetes.io/hostname": node})
    cluster_queue = queues.queue("q", flavor, cpu="3")
    jobs = Jobs(namespace)
    jobs.create(requesting("2", [sys.executable, "-c", RANK_SCRIPT], name="gang", labels={QUEUE_LABEL: "q"},
                           spec={"workers": 2}))
    jobs.wait("gang", "queued", lambda st: "insufficient quota" in (admitted(st) or {}).get("message", ""), 60)
    assert pods_of(core, namespace, "gang") == []  # one rank would fit the quota: none starts
    queues.api.patch_cluster_custom_object(GROUP, VERSION, "clusterqueues", cluster_queue, {"spec": {
        "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{"name": flavor, "resources": [
            {"name": "cpu", "nominalQuota": "4"}, {"name": "memory", "nominalQuota": "64Gi"}]}]}]}})
    status = jobs.wait_phase("gang", "Succeeded", 120)
    assert (admitted(status) or {}).get("status") == "False" and status["failures"] == 0, status
    pods = pods_of(core, namespace, "gang")
    assert sorted(p.metadata.name for p in pods) == ["gang-0-0", "gang-0-1"]
    assert sorted(p.name for p in (claim / "gang").iterdir() if p.name.startswith("rank-")) == ["rank-0", "rank-1"]
    for pod in pods:  # the admission's flavor placed both ranks, with Kueue's labels on them
        assert pod.spec.node_selector.get("kubernetes.io/hostname") == node and pod.spec.node_name == node
        assert pod.metadata.labels["kueue.x-k8s.io/podset"] == "main"
        assert pod.metadata.annotations["kueue.x-k8s.io/workload"] == status["kueue"]["workload"]
    workload = queues.workload_of("TrainingJob", "gang")
    assert workload is not None
    finished = next(c for c in workload["status"]["conditions"] if c["type"] == "Finished")
    assert finished["status"] == "True" and finished["reason"] == "Succeeded"


def uninterrupted(tmp: Path, command: list[str]) -> str:
    """The result hash of the same training run straight through on this host (no pause between steps)."""
    tmp.mkdir()
    fast = [*command[:command.index("--step-seconds")], "--step-seconds", "0", "--dir", str(tmp)]
    subprocess.run(fast, check=True, capture_output=True, timeout=300)
    return (tmp / "result").read_text()


def test_kueue_preemption_checkpoints_waits_and_resumes_with_no_step_lost(operator, core, namespace, claim, queues,
                                                                         tmp_path):
    """Two ClusterQueues in one cohort with quota for one node: ours borrows it all; a high-priority batch/v1 Job
    in the lending queue reclaims it. Ours checkpoints on SIGTERM, waits, is admitted again and finishes as if never
    stopped, with one Workload throughout."""
    flavor = queues.flavor("node")
    cohort = f"cohort-{namespace}"[:63]
    ours = queues.queue("research", flavor, cpu="0", cohort=cohort)
    queues.queue("prod", flavor, cpu="8", cohort=cohort,
                 preemption={"reclaimWithinCohort": "Any", "withinClusterQueue": "LowerPriority"})
    low, high = queues.priority("low", 10), queues.priority("high", 1000)
    recorder = ObjectRecorder(queues.api.list_namespaced_custom_object, GROUP, VERSION, namespace, "workloads")
    command = trainer(400, 40)
    jobs = Jobs(namespace)
    jobs.create(requesting("6", command, name="lo", labels={QUEUE_LABEL: "research", PRIORITY_LABEL: low}))
    until("attempt 0 trained past its first checkpoint", lambda: Store(claim / "lo").list(), 120)
    assert jobs.status("lo")["kueue"]["clusterQueue"] == ours
    batch = client.BatchV1Api()
    batch.create_namespaced_job(namespace, {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "urgent", "labels": {QUEUE_LABEL: "prod", PRIORITY_LABEL: high}},
        "spec": {"suspend": True, "backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "c", "image": "x", "command": ["sleep", "3"],
             "resources": {"requests": {"cpu": "6", "memory": "1Gi"}}}]}}}})
    preempted = jobs.wait("lo", "preempted by Kueue", lambda st: st.get("preemptions") == 1, 90)
    assert preempted["failures"] == 0
    jobs.wait_event("lo", "Warning", "KueuePreempted")
    until("the urgent Job ran and succeeded", lambda: (batch.read_namespaced_job_status("urgent", namespace).status
                                                       .succeeded or 0) == 1, 120)
    status = jobs.wait_phase("lo", "Succeeded", 240)
    assert (status["attempt"], status["preemptions"], status["failures"]) == (1, 1, 0), status
    assert status["attempts"][0]["reason"] == "KueuePreempted", status["attempts"]
    # 0 steps lost: attempt 1 started exactly where attempt 0 stopped (its SIGTERM checkpoint)
    stops = [line for line in (claim / "lo" / "stops.log").read_text().splitlines() if line.startswith("attempt 0")]
    stopped_at = int(stops[0].split()[-1])
    starts = progress(claim / "lo")
    assert starts[1] == f"attempt 1 start {stopped_at} reason preempted", (starts, stops)
    assert 40 <= stopped_at < 400, stops
    assert (claim / "lo" / "result").read_text() == uninterrupted(tmp_path / "reference", command)
    ours_seen = {obj["metadata"]["uid"] for _, obj in recorder.events
                 if any(o["kind"] == "TrainingJob" for o in obj["metadata"].get("ownerReferences") or [])}
    assert len(ours_seen) == 1, f"Workloads seen for the TrainingJob: {ours_seen}"
    workload = queues.workload_of("TrainingJob", "lo")
    assert workload is not None and {workload["metadata"]["uid"]} == ours_seen
    finished = next(c for c in workload["status"]["conditions"] if c["type"] == "Finished")
    assert finished["reason"] == "Succeeded", workload["status"]
    evictions = {c["reason"] for _, obj in recorder.events for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == "Evicted" and c["status"] == "True"}
    assert evictions == {"Preempted"}, evictions  # Kueue preempted it (and nothing else evicted it)
