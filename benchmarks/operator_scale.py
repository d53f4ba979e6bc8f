"""The operator at cluster scale, against the batch/v1 Job controller on the same control plane (`make bench-scale`).

Local control planes (etcd, kube-apiserver, kube-scheduler, kube-controller-manager) with kwok's fake nodes.
In one run: N batch/v1 Jobs with podFailurePolicy (DisruptionTarget -> Ignore), the baseline, then N TrainingJobs,
each on a fresh control plane of its own with the same flags and nodes (--one-control-plane: both on one, in turn).
For each: the time until every pod runs, an eviction storm (every pod evicted through the Eviction API) and the
time until every replacement pod exists, per-job resubmission latency (old pod seen terminal -> replacement seen),
API requests per job (the API server's apiserver_request_total, and the controller's own from the audit log), the
controller process's CPU seconds and peak RSS, and the controller's API requests per job-hour at rest.
Both controllers get the same client QPS/burst; the scheduler's limit is lifted so it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubernetes import client, config, watch  # noqa: E402

from tests.cluster.launcher import Cluster, kwok_node  # noqa: E402

BENCH_LABEL = "ckpt.dev/bench"
AUDIT_TAIL_BYTES = 1 << 20  # an audit line (metadata level) is a few KB: its end is in the last MiB
OURS_NS, BASELINE_NS = "bench-trainingjobs", "bench-jobs"


@dataclass
class PodTimes:
    seen: float
    running: float | None = None
    ended: float | None = None


@dataclass
class Tracker:
    """Watches the benchmark's pods; records when each was first seen, seen running and seen ended."""

    group_label: dict[str, str]  # namespace -> the label naming a pod's owning job
    pods: dict[tuple[str, str], PodTimes] = field(default_factory=dict)
    owner: dict[tuple[str, str], str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, core: client.CoreV1Api, stop: threading.Event) -> None:
        """Watch until `stop`, resuming each ended stream from the last resourceVersion seen. Events are parsed as
        plain JSON: a watch restarted without a resourceVersion replays every pod, and turning 15,000 pods into
        client models every minute kept this tracker minutes behind the cluster (and its CPU off the controllers)."""
        version: str | None = None
        while not stop.is_set():
            options: dict[str, Any] = {"label_selector": BENCH_LABEL, "timeout_seconds": 60, "_request_timeout": 90,
                                       "allow_watch_bookmarks": True, "deserialize": False}
            if version is not None:
                options["resource_version"] = version
            try:
                for event in watch.Watch().stream(core.list_pod_for_all_namespaces, **options):
                    body = event["object"]  # an ERROR event (410 Gone) never gets here: see the except below
                    version = body["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._record(body)
                    if stop.is_set():
                        break
            except Exception as exc:  # a dropped watch, or an ERROR event (with deserialize=False this client raises
                # KeyError on one before yielding it): start again from now, every pod replayed (not measured)
                version = None
                print(f"[bench] pod watch restarted: {exc}", file=sys.stderr)

    def _record(self, pod: dict[str, Any]) -> None:
        now = time.monotonic()
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        with self.lock:
            times = self.pods.setdefault(key, PodTimes(seen=now))
            self.owner[key] = (meta.get("labels") or {}).get(self.group_label.get(key[0], ""), "")
            phase = (pod.get("status") or {}).get("phase")
            if phase == "Running" and times.running is None:
                times.running = now
            if phase in ("Succeeded", "Failed") and times.ended is None:
                times.ended = now

    def by_job(self, namespace: str) -> dict[str, list[tuple[str, PodTimes]]]:
        with self.lock:
            jobs: dict[str, list[tuple[str, PodTimes]]] = {}
            for (ns, name), times in self.pods.items():
                if ns == namespace:
                    jobs.setdefault(self.owner[(ns, name)], []).append((name, times))
            return {job: sorted(pods, key=lambda item: item[1].seen) for job, pods in jobs.items()}


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic()


class ApiServer:
    """Reads the API server's request counter and the audit log of the benchmark's cluster."""

    def __init__(self, cluster: Cluster) -> None:
        pki = cluster.workdir / "pki"
        self.context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.server, self.audit = cluster.server, cluster.audit_log

    def requests(self) -> float:
        """apiserver_request_total summed over every verb but WATCH (long-running, not a request per change)."""
        with urllib.request.urlopen(f"{self.server}/metrics", context=self.context, timeout=30) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{") and 'verb="WATCH"' not in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def audit_offset(self) -> int:
        """Where the audit log's complete lines end: the API server may be midway through writing one."""
        if not self.audit.exists():
            return 0
        with open(self.audit, "rb") as log:
            size = log.seek(0, os.SEEK_END)
            tail_start = max(0, size - AUDIT_TAIL_BYTES)
            log.seek(tail_start)
            tail = log.read(size - tail_start)
        return tail_start + tail.rfind(b"\n") + 1 if b"\n" in tail else tail_start

    def audit_count(self, start: int, end: int, agent: re.Pattern[str]) -> tuple[int, dict[str, int]]:
        """Requests in the audit log between two offsets whose user agent matches; and their verbs."""
        verbs: dict[str, int] = {}
        with open(self.audit, "rb") as log:
            log.seek(start)
            data = log.read(end - start)
        for line in data.splitlines():
            entry = json.loads(line)
            if agent.search(entry.get("userAgent", "")):
                key = f"{entry['verb']} {entry.get('objectRef', {}).get('resource', '')}"
                verbs[key] = verbs.get(key, 0) + 1
        return sum(verbs.values()), verbs


def wait_quiet(api: ApiServer, agent: re.Pattern[str], quiet_seconds: float, timeout: float) -> float:
    """Wait until the controller has made no request for `quiet_seconds` (its storm work is done)."""
    start = time.monotonic()
    offset, last_request = api.audit_offset(), time.monotonic()
    while time.monotonic() - last_request < quiet_seconds:
        if time.monotonic() - start > timeout:
            raise TimeoutError("the controller never went quiet")
        time.sleep(1.0)
        end = api.audit_offset()
        if api.audit_count(offset, end, agent)[0]:
            last_request = time.monotonic()
        offset = end
    return time.monotonic()


def proc_usage(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and peak RSS in MB of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return cpu, peak / 1024


def pod_template(name: str) -> dict[str, Any]:
    return {"metadata": {"labels": {BENCH_LABEL: "scale"}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 30,
                     "containers": [{"name": "trainer", "image": "registry.invalid/trainer:bench",
                                     "command": ["python", "train.py", name]}]}}


def training_job(name: str) -> dict[str, Any]:
    return {"apiVersion": "ckpt.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
            "spec": {"template": pod_template(name),
                     "checkpoint": {"nfs": {"server": "nfs.invalid", "path": "/checkpoints"}}}}


def batch_job(name: str) -> dict[str, Any]:
    template = pod_template(name)
    template["metadata"]["labels"]["bench-job"] = name
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": template,
                     "podFailurePolicy": {"rules": [{"action": "Ignore",
                                                     "onPodConditions": [{"type": "DisruptionTarget"}]}]}}}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass
class Result:
    running_s: float
    storm_s: float
    settled_s: float
    resubmit: list[float]
    requests_per_job: float
    own_requests_per_job: float
    own_verbs: dict[str, int]
    cpu_s: float
    rss_mb: float
    rest_per_job_hour: float
    rest_verbs: dict[str, int]


def run_case(kind: str, n: int, namespace: str, create: Callable[[int], None], tracker: Tracker, api: ApiServer,
             core: client.CoreV1Api, controller_pid: int, agent: re.Pattern[str], rest_seconds: float,
             workers: int) -> Result:
    say = lambda message: print(f"[bench] {kind}: {message}", file=sys.stderr, flush=True)  # noqa: E731
    cpu0, _ = proc_usage(controller_pid)
    requests0, audit0 = api.requests(), api.audit_offset()
    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, range(n)))
    say(f"{n} created in {time.monotonic() - start:.1f}s")

    def running(count: int) -> Callable[[], bool]:
        def check() -> bool:
            jobs = tracker.by_job(namespace)
            return len(jobs) >= n and all(len(pods) >= count and pods[-1][1].running is not None
                                          for pods in jobs.values())
        return check

    all_running = wait_for(f"{n} {kind} pods running", running(1), timeout=60 + n * 0.5)
    running_s = all_running - start
    say(f"all pods running after {running_s:.1f}s; evicting every pod")
    first = {job: pods[-1][0] for job, pods in tracker.by_job(namespace).items()}
    storm = time.monotonic()

    def evict(name: str) -> None:
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=namespace))
        core.create_namespaced_pod_eviction(name, namespace, body)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(evict, first.values()))
    say(f"{n} evictions in {time.monotonic() - storm:.1f}s")
    replaced = wait_for(f"{n} {kind} replacement pods", lambda: all(
        len(pods) >= 2 for pods in tracker.by_job(namespace).values()), timeout=60 + n * 0.5)
    storm_s = replaced - storm
    resubmit = []
    for pods in tracker.by_job(namespace).values():
        old, new = pods[0][1], pods[1][1]
        resubmit.append(new.seen - (old.ended if old.ended is not None else storm))
    wait_for(f"{n} {kind} replacement pods running", running(2), timeout=60 + n * 0.5)
    say(f"replacements exist after {storm_s:.1f}s; waiting until the controller is quiet")
    settled = wait_quiet(api, agent, quiet_seconds=15.0, timeout=600 + n * 0.5) - 15.0 - storm
    say(f"the controller's last request ~{settled:.0f}s after the storm began; at rest for {rest_seconds:.0f}s")
    requests1, audit1 = api.requests(), api.audit_offset()
    own, own_verbs = api.audit_count(audit0, audit1, agent)
    cpu1, rss = proc_usage(controller_pid)
    rest0 = api.audit_offset()
    time.sleep(rest_seconds)  # the measurement window itself: the controller's requests while nothing changes
    rest, rest_verbs = api.audit_count(rest0, api.audit_offset(), agent)
    return Result(running_s, storm_s, settled, resubmit, (requests1 - requests0) / n, own / n, own_verbs,
                  cpu1 - cpu0, rss, rest / n * 3600 / rest_seconds, rest_verbs)


def start_kwok(cluster: Cluster, nodes: int) -> None:
    cluster.start_kwok()
    core = client.CoreV1Api()
    for index in range(nodes):
        core.create_node(kwok_node(f"kwok-node-{index}"))

    def ready() -> bool:
        items = core.list_node(label_selector="type=kwok").items
        return len(items) == nodes and all(any(c.type == "Ready" and c.status == "True"
                                               for c in item.status.conditions or []) for item in items)

    wait_for("kwok nodes Ready", ready, timeout=120)


@dataclass
class ControlPlane:
    """One benchmark control plane: the cluster, its clients, the pod tracker and the operator (when started)."""

    cluster: Cluster
    api: ApiServer
    core: client.CoreV1Api
    tracker: Tracker
    operator_pid: int | None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=0, help="kwok nodes (default: one per 100 jobs, >= 2)")
    parser.add_argument("--qps", type=float, default=50.0, help="client QPS of both controllers")
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--rest-seconds", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=16, help="client threads creating and evicting")
    parser.add_argument("--keep", action="store_true", help="keep the cluster directory")
    parser.add_argument("--profile", metavar="FILE", help="record the operator with py-spy (collapsed stacks)")
    parser.add_argument("--ours-only", action="store_true", help="skip the Job controller (for profiling: no ratios)")
    parser.add_argument("--one-control-plane", action="store_true",
                        help="both controllers on one control plane, the Job controller first (the second then "
                             "runs beside the first's jobs and pods, on a fuller etcd)")
    parser.add_argument("--start-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="the operator's CKPT_OPERATOR_GANG_START_TIMEOUT_SECONDS (default: its own, 300): above "
                             "~5,000 jobs kwok, on the same cores, marks pods running slower than that")
    return parser.parse_args()


@contextmanager
def control_plane(args: argparse.Namespace, workdir: Path, with_operator: bool) -> Iterator[ControlPlane]:
    """Start a fresh control plane with kwok nodes (and the operator), yield it, stop everything."""
    nodes = args.nodes or max(2, args.jobs // 100)
    limits = [f"--kube-api-qps={args.qps:g}", f"--kube-api-burst={args.burst}"]
    cluster = Cluster(workdir).start(nodes=(), progress=True, extra_args={
        # kwok renews node leases less often than a kubelet: give it the default grace, not the tests' short one
        "kube-controller-manager": [*limits, "--node-monitor-grace-period=50s"],
        "kube-scheduler": ["--kube-api-qps=5000", "--kube-api-burst=5000"]})
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    try:
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
        config.load_kube_config(str(cluster.kubeconfig))
        core = client.CoreV1Api()
        cluster.install_crds()
        for namespace in (OURS_NS, BASELINE_NS):
            core.create_namespace({"metadata": {"name": namespace}})
        start_kwok(cluster, nodes)
        if with_operator:
            procs.extend(start_operator(args, cluster, workdir))
        tracker = Tracker({OURS_NS: "ckpt.dev/job", BASELINE_NS: "bench-job"})
        threading.Thread(target=tracker.run, args=(core, stop), daemon=True).start()
        print(f"[bench] {args.jobs} jobs on {nodes} kwok nodes; controllers at qps={args.qps:g} burst={args.burst}",
              file=sys.stderr, flush=True)
        if with_operator:
            time.sleep(3)  # the operator connects and lists (its start-up is not part of the measurement)
        yield ControlPlane(cluster, ApiServer(cluster), core, tracker, procs[0].pid if procs else None)
    finally:
        stop.set()
        for proc in procs:
            spying = str(cast(list[str], proc.args)[0]).endswith("py-spy")
            proc.send_signal(signal.SIGINT if spying else signal.SIGTERM)  # py-spy writes its output on SIGINT
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()


def start_operator(args: argparse.Namespace, cluster: Cluster, workdir: Path) -> list[subprocess.Popen[bytes]]:
    """The operator (and py-spy on it with --profile), at the benchmark's QPS and burst."""
    operator_log = open(workdir / "logs" / "operator.log", "ab")  # noqa: SIM115 (owned by the child)
    timeout = {"CKPT_OPERATOR_GANG_START_TIMEOUT_SECONDS": f"{args.start_timeout:g}"} if args.start_timeout else {}
    operator = subprocess.Popen([sys.executable, "-m", "ckpt_operator", "--metrics-port=0", "--health-port=0",
                                 f"--qps={args.qps:g}", f"--burst={args.burst}"], env={**cluster.env(), **timeout},
                                stdout=operator_log, stderr=subprocess.STDOUT, start_new_session=True)
    procs = [operator]
    if args.profile:
        spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(operator.pid), "--format", "raw",
               "--rate", "50", "--nonblocking", "-o", args.profile]
        procs.append(subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def run_baseline(args: argparse.Namespace, plane: ControlPlane) -> Result:
    """N batch/v1 Jobs, measured on kube-controller-manager."""
    batch = client.BatchV1Api()
    return run_case(
        "batch/v1 Job", args.jobs, BASELINE_NS,
        lambda i: batch.create_namespaced_job(BASELINE_NS, batch_job(f"job-{i:05d}")),
        plane.tracker, plane.api, plane.core, plane.cluster.procs["kube-controller-manager"].pid,
        re.compile(r"kube-controller-manager/.*job-controller|^kube-controller-manager"), args.rest_seconds,
        args.workers)


def run_ours(args: argparse.Namespace, plane: ControlPlane) -> Result:
    """N TrainingJobs, measured on the operator."""
    custom = client.CustomObjectsApi()
    assert plane.operator_pid is not None
    return run_case(
        "TrainingJob", args.jobs, OURS_NS,
        lambda i: custom.create_namespaced_custom_object("ckpt.dev", "v1alpha1", OURS_NS, "trainingjobs",
                                                         training_job(f"tj-{i:05d}")),
        plane.tracker, plane.api, plane.core, plane.operator_pid, re.compile(r"^(ckpt-operator|kopf/)"),
        args.rest_seconds, args.workers)


def main() -> int:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-bench-scale-"))
    baseline: Result | None = None
    try:
        if args.one_control_plane:
            with control_plane(args, workdir, with_operator=True) as plane:
                baseline = None if args.ours_only else run_baseline(args, plane)
                ours = run_ours(args, plane)
        else:  # each controller on a fresh control plane of its own: neither runs beside the other's leftovers
            if not args.ours_only:
                with control_plane(args, workdir / "job-controller", with_operator=False) as plane:
                    baseline = run_baseline(args, plane)
            with control_plane(args, workdir / "operator", with_operator=True) as plane:
                ours = run_ours(args, plane)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[bench] kept {workdir}", file=sys.stderr)
    report(args.jobs, baseline or ours, ours)
    return 0


def report(n: int, base: Result, ours: Result) -> None:
    rows = [
        ("all pods running (s)", base.running_s, ours.running_s),
        ("eviction storm: every replacement exists (s)", base.storm_s, ours.storm_s),
        ("eviction storm: the controller is done (s)", base.settled_s, ours.settled_s),
        ("resubmission p50 (s)", statistics.median(base.resubmit), statistics.median(ours.resubmit)),
        ("resubmission p99 (s)", percentile(base.resubmit, 0.99), percentile(ours.resubmit, 0.99)),
        ("API requests per job (all clients)", base.requests_per_job, ours.requests_per_job),
        ("the controller's own requests per job", base.own_requests_per_job, ours.own_requests_per_job),
        ("controller CPU seconds", base.cpu_s, ours.cpu_s),
        ("controller peak RSS (MB)", base.rss_mb, ours.rss_mb),
        ("controller requests per job-hour at rest", base.rest_per_job_hour, ours.rest_per_job_hour),
    ]
    print(f"{'jobs=' + str(n):<46} {'Job ctrl':>10} {'ours':>10} {'ratio':>7}")
    for label, theirs, mine in rows:
        ratio = f"{mine / theirs:.2f}" if theirs else "-"
        print(f"{label:<46} {theirs:>10.2f} {mine:>10.2f} {ratio:>7}")
    print("the Job controller's figures are kube-controller-manager's (the whole process: all its controllers)")
    print(f"our requests in the storm by verb: {dict(sorted(ours.own_verbs.items()))}")
    print(f"our requests at rest by verb: {dict(sorted(ours.rest_verbs.items())) or 'none'}")
    print(f"operator-scale: jobs={n} running_ratio={ours.running_s / base.running_s:.2f} "
          f"resubmit_p50_ratio={statistics.median(ours.resubmit) / statistics.median(base.resubmit):.2f} "
          f"resubmit_p99_s={percentile(ours.resubmit, 0.99):.2f} requests_per_job={ours.requests_per_job:.1f} "
          f"rest_requests_per_job_hour={ours.rest_per_job_hour:.2f} rss_mb={ours.rss_mb:.0f}")


if __name__ == "__main__":
    sys.exit(main())
