"""The watch-driven operator's pure parts: expectations, the index reader, the rate limiter, the error back-off."""

from __future__ import annotations

import json
import threading
import time

import pytest
from kubernetes.client.exceptions import ApiException

from ckpt_operator import metrics
from ckpt_operator import reasons as R
from ckpt_operator.apiclient import BACKGROUND, NORMAL, URGENT, TokenBucket, error_backoff
from ckpt_operator.cache import Cache, Expectations, name_key, node_info, owned_by_job, trim_job, trim_pod
from ckpt_operator.classify import NodeInfo, classify


def pod(name: str, uid: str = "job-uid", owner: str | None = "job-uid", rv: str = "5") -> dict:
    refs = [{"uid": owner, "controller": True}] if owner else []
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"{name}-uid", "resourceVersion": rv,
                         "labels": {R.LABEL_JOB_UID: uid}, "ownerReferences": refs, "managedFields": [{"big": 1}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "trainer"}]}, "status": {"phase": "Running"}}


def test_a_pod_belongs_to_a_job_only_if_labelled_and_controlled_by_it():
    assert owned_by_job(pod("a")) == "job-uid"
    assert owned_by_job(pod("a", owner="someone-else")) is None  # a copied label does not make it ours
    assert owned_by_job(pod("a", owner=None)) is None


def test_trimmed_pods_keep_what_the_planner_reads_and_drop_the_rest():
    trimmed = trim_pod(pod("a"))
    assert trimmed["spec"] == {"nodeName": "n1"} and "managedFields" not in trimmed["metadata"]
    assert trimmed["status"]["phase"] == "Running" and trimmed["metadata"]["ownerReferences"]


def test_a_created_pod_stands_in_until_the_watch_reports_it():
    expect = Expectations()
    expect.created(pod("job-1"))
    assert [p["metadata"]["name"] for p in expect.merge_pods([])] == ["job-1"]  # the index lags: still there
    watched = [trim_pod(pod("job-1", rv="9"))]
    assert expect.merge_pods(watched) == watched and expect.pods == {}  # reported: the watch's copy wins


def test_a_created_pod_the_watch_long_does_not_report_is_read_not_dropped(monkeypatch):
    expect = Expectations()
    expect.created(pod("job-1"))
    assert not expect.unconfirmed("job-1")
    later = time.monotonic() + 31
    monkeypatch.setattr(time, "monotonic", lambda: later)
    # a lagging watch is not a deleted pod: it stays (the 5,000-job storm showed a 10-minute lag) until a read
    assert len(expect.merge_pods([])) == 1 and expect.unconfirmed("job-1")
    expect.confirm("job-1", pod("job-1", rv="20"))
    assert not expect.unconfirmed("job-1") and expect.merge_pods([])[0]["metadata"]["resourceVersion"] == "20"
    expect.confirm("job-1", None)  # the read found nothing: now it is gone
    assert expect.merge_pods([]) == []


def test_our_own_status_write_wins_until_the_watch_catches_up():
    expect = Expectations()
    expect.job = {"metadata": {"resourceVersion": "12"}, "status": {"attempt": 1}}
    stale = {"metadata": {"resourceVersion": "10"}, "status": {"attempt": 0}}
    assert expect.newest_job(stale) is expect.job
    fresh = {"metadata": {"resourceVersion": "13"}, "status": {"attempt": 1}}
    assert expect.newest_job(fresh) is fresh and expect.job is None
    assert expect.newest_job(None) is None  # deleted: nothing stands in


def test_the_cache_reads_kopf_style_indexes():
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}, "spec": {}, "status": {}}
    nodes = {"n1": [node_info({"metadata": {"name": "n1"}, "status": {"conditions": [
        {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})]}
    cache = Cache(jobs={"u": [job], name_key("ns", "j"): [job]}, pods={"u": [trim_pod(pod("j-0"))]}, nodes=nodes)
    assert cache.job("u") is job and cache.job("gone") is None and cache.job_by_name("ns", "j") is job
    assert [p["metadata"]["name"] for p in cache.job_pods("u")] == ["j-0"] and cache.job_pods("x") == []
    assert cache.node("n1") is not None and not cache.node("n1").ready and cache.node("n9") is None
    assert cache.job_uids_on("n1") == {"u"} and cache.job_uids_on("n9") == set()
    cache.deleted_nodes.add("n9")  # its DELETED event came: known gone, never read again
    assert cache.node("n9") == NodeInfo("n9", exists=False, ready=False)


def test_urgent_requests_overtake_waiting_ones():
    bucket = TokenBucket(qps=4, burst=1)
    bucket.acquire()  # the burst is spent: the next token comes in 250 ms
    order: list[str] = []

    def take(label: str, level: int) -> None:
        bucket.acquire(level)
        order.append(label)

    normals = [threading.Thread(target=take, args=(f"normal-{i}", NORMAL)) for i in range(2)]
    for thread in normals:
        thread.start()
    deadline = time.monotonic() + 5
    while bucket._waiting[NORMAL] < 2 and time.monotonic() < deadline:  # both wait before the urgent one comes
        time.sleep(0.005)
    urgent = threading.Thread(target=take, args=("urgent", URGENT))
    urgent.start()
    for thread in [*normals, urgent]:
        thread.join(5)
    assert order[0] == "urgent" and sorted(order[1:]) == ["normal-0", "normal-1"]


class _CountingCondition(threading.Condition):
    """A Condition that records how many threads sleep in `wait` at once."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = self.most = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.sleeping += 1  # (under the condition's lock)
        self.most = max(self.most, self.sleeping)
        try:
            return super().wait(timeout)
        finally:
            self.sleeping -= 1


def test_one_thread_per_lane_polls_the_bucket_the_rest_queue_without_waking():
    """16 creates in a storm used to sleep in the bucket together, and every token and every release woke them all."""
    bucket = TokenBucket(qps=50, burst=1)
    bucket._cond = counting = _CountingCondition()
    threads = [threading.Thread(target=bucket.acquire, args=(level,))
               for level in [NORMAL] * 8 + [BACKGROUND] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert not any(thread.is_alive() for thread in threads)
    assert 1 <= counting.most <= 2, f"{counting.most} threads slept in the bucket at once (one per lane at most)"
    assert bucket._waiting == [0, 0, 0, 0]


def test_the_rate_limit_holds_after_the_burst():
    bucket = TokenBucket(qps=20, burst=5)
    start = time.monotonic()
    for _ in range(15):
        bucket.acquire()
    assert time.monotonic() - start >= 10 / 20 * 0.9  # 5 at once, then 10 more at 20/s


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError, match="qps"):
        TokenBucket(qps=0, burst=1)


def test_errors_back_off_exponentially_and_honour_retry_after():
    plain = RuntimeError("boom")
    assert 0.4 <= error_backoff(1, plain) <= 0.6 and 3.2 <= error_backoff(4, plain) <= 4.8
    assert error_backoff(30, plain) <= 72  # capped
    throttled = ApiException(status=429)
    throttled.headers = {"Retry-After": "7"}
    assert error_backoff(1, throttled) >= 7
    unavailable = ApiException(status=503)
    unavailable.headers = {"Retry-After": "3"}
    assert error_backoff(1, unavailable) >= 3
    conflict = ApiException(status=409)
    conflict.headers = {"Retry-After": "30"}
    assert error_backoff(1, conflict) < 1  # only 429 and 5xx ask us to wait


def test_the_phase_gauge_moves_by_one_on_each_change():
    def value(phase: str) -> float:
        return metrics.JOBS.labels("gauge-ns", phase)._value.get()

    metrics.set_phase("g1", "gauge-ns", "Running")
    metrics.set_phase("g2", "gauge-ns", "Running")
    metrics.set_phase("g1", "gauge-ns", "Running")  # no change: no move
    assert value("Running") == 2
    metrics.set_phase("g1", "gauge-ns", "Succeeded")
    metrics.set_phase("g2", "gauge-ns", None)
    assert (value("Running"), value("Succeeded")) == (0, 1)


def test_elastic_gangs_below_their_most_ranks_are_indexed_as_growable():
    from ckpt_operator.cache import GROWABLE, growable

    def job(uid: str, workers: object, size: int | None) -> dict:
        return {"metadata": {"uid": uid}, "spec": {"workers": workers},
                "status": {"worldSize": size} if size is not None else {}}

    small, full, fixed = job("a", {"min": 1, "max": 4}, 2), job("b", {"min": 1, "max": 2}, 2), job("c", 2, 1)
    assert [growable(j) for j in (small, full, fixed, job("d", {"min": 1, "max": 2}, None))] == [
        True, False, False, False]
    cache = Cache(jobs={"a": [small], GROWABLE: [small]}, pods={}, nodes={})
    assert cache.growable() == {"a"} and Cache(jobs={}, pods={}, nodes={}).growable() == set()


def _status(phase: str, state: dict, conditions: list[dict], **extra: str) -> dict:
    container = {"name": "trainer", "state": state, "image": "registry.invalid/t:1", "imageID": "sha256:0",
                 "containerID": "containerd://1", "ready": False, "restartCount": 0, "lastState": {},
                 "volumeMounts": [{"name": "ckpt", "mountPath": "/checkpoints"}], "resources": {}}
    return {"phase": phase, "conditions": [{**c, "lastProbeTime": None} for c in conditions], "hostIP": "10.0.0.1",
            "podIP": "10.1.0.1", "podIPs": [{"ip": "10.1.0.1"}], "qosClass": "BestEffort", "startTime": "t0",
            "containerStatuses": [container], **extra}


def test_a_trimmed_pod_classifies_as_the_whole_pod_does():
    """The pods index keeps only what the planner reads of a pod's status (most of it is images, IDs, mounts)."""
    disrupted = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                 "message": "Eviction API: evicting", "lastTransitionTime": "t1"}
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes",
                 "lastTransitionTime": "t0"}
    statuses = [
        _status("Running", {"running": {"startedAt": "t0"}}, [disrupted]),
        _status("Failed", {"terminated": {"exitCode": 143, "reason": "Error", "message": '{"reason": "preempted"}',
                                          "startedAt": "t0", "finishedAt": "t2"}}, [disrupted]),
        _status("Failed", {"terminated": {"exitCode": 1, "reason": "Error"}}, [], reason="Evicted",
                message="The node was low on resource: memory."),
        _status("Pending", {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}, [scheduled]),
        _status("Pending", {}, [scheduled]),
    ]
    for status in statuses:
        whole = {**pod("a"), "status": status}
        trimmed = trim_pod(whole)
        assert classify(trimmed, "trainer") == classify(whole, "trainer")
        assert not {"hostIP", "podIP", "podIPs", "qosClass", "startTime"} & set(trimmed["status"])
        assert set(trimmed["status"]["containerStatuses"][0]) == {"name", "state"}
        assert all("lastProbeTime" not in c for c in trimmed["status"].get("conditions", []))


def test_indexed_objects_parsed_apart_share_their_strings():
    """Each watch event is parsed on its own: trimmed copies share keys and repeated values (the indexes' memory)."""
    raw = json.dumps(pod("a"))
    first, second = trim_pod(json.loads(raw)), trim_pod(json.loads(raw))
    assert first == second
    assert next(iter(first["metadata"])) is next(iter(second["metadata"]))  # one "name" key for every pod
    assert first["status"]["phase"] is second["status"]["phase"]
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}, "spec": {"template": {}},
           "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    jobs = [trim_job(json.loads(json.dumps(job))) for _ in range(2)]
    assert jobs[0]["status"]["conditions"][0]["status"] is jobs[1]["status"]["conditions"][0]["status"]
    assert trim_job(job)["spec"] is not job["spec"]  # a copy: kopf's bodies are live views
