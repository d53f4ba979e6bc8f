"""The operator's client CPU per request of the kinds an eviction storm repeats, the kubernetes client's generated
methods (the baseline) against `LimitedApiClient.send` (the lean path), measured in the same run.

A local HTTP server in a child process answers every request at once (its CPU is not counted); the bodies are the
operator's own: a replacement pod built for a TrainingJob, the status write of a preemption, a finalizer release and
an Event. CPU is this process's (`time.process_time`) over `--requests` requests of each kind, best of `--repeat`.

    python benchmarks/operator_requests.py [--requests 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import http.server
import multiprocessing
import sys
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "sdk")]

from kubernetes import client  # noqa: E402

from ckpt_operator.apiclient import (  # noqa: E402
    JSON_PATCH,
    MERGE_PATCH,
    LimitedApiClient,
    api_path,
    pod_path,
    pods_path,
    unread,
)
from ckpt_operator.builders import JobRef, build_pods  # noqa: E402
from ckpt_operator.events import ObjectRef, _Pending, build_event, events_path  # noqa: E402
from ckpt_operator.models import TrainingJobSpec  # noqa: E402


class Answering(http.server.BaseHTTPRequestHandler):
    """200 with a small JSON object to every request, on a kept-alive connection."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK wait per request)

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"kind": "Status", "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "9"}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PATCH = _answer

    def log_message(self, *args: Any) -> None:
        """Quiet: no line per request."""


def serve(port: Synchronized[int]) -> None:
    """Answer on a free port of the loopback (told through `port`) until terminated."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    port.value = server.server_address[1]
    server.serve_forever()


def bodies() -> dict[str, Any]:
    """A replacement pod, a preemption's status patch, a finalizer release and an Event, as the operator sends them."""
    spec = TrainingJobSpec.model_validate({
        "template": {"metadata": {"labels": {"app": "bench"}}, "spec": {"containers": [{
            "name": "trainer", "image": "registry.invalid/train:1", "command": ["python", "train.py"],
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}},
        "checkpoint": {"nfs": {"server": "nfs.invalid", "path": "/checkpoints"}}})
    pod = build_pods(JobRef("tj-00001", "ns", "uid-1", "2026-01-01T00:00:00Z"), spec, 1, "preempted")[0]
    stamp = "2026-01-01T00:10:00Z"
    status = {"metadata": {"resourceVersion": "8"}, "status": {
        "phase": "Running", "attempt": 1, "preemptions": 1, "currentPods": ["tj-00001-1"],
        "lastOutcome": {"attempt": 0, "result": "Preempted", "reason": "EvictionByEvictionAPI", "time": stamp},
        "attempts": [{"attempt": 0, "startTime": "2026-01-01T00:00:00Z", "endTime": stamp, "result": "Preempted"},
                     {"attempt": 1, "startTime": stamp}],
        "conditions": [{"type": kind, "status": "False", "reason": "Running", "message": "attempt 1",
                        "lastTransitionTime": stamp} for kind in ("Ready", "Preempted", "Failed")]}}
    release = [{"op": "test", "path": "/metadata/finalizers", "value": ["ckpt.dev/outcome"]},
               {"op": "replace", "path": "/metadata/finalizers", "value": []}]
    ref = ObjectRef("ckpt.dev/v1alpha1", "TrainingJob", "ns", "tj-00001", "uid-1")
    event = build_event("tj-00001.1", _Pending(ref, "Normal", "Resubmitted", "pod tj-00001-1 for attempt 1"), stamp)
    return {"pod": pod, "status": status, "release": release, "event": event}


def cases(limited: LimitedApiClient) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(request, the generated method, the lean path) for each kind."""
    core, custom, body = client.CoreV1Api(limited), client.CustomObjectsApi(limited), bodies()
    status_path = api_path("apis", "ckpt.dev", "v1alpha1", "namespaces", "ns", "trainingjobs", "tj-00001", "status")
    return [
        ("create pod", lambda: unread(core.create_namespaced_pod("ns", body["pod"], _preload_content=False)),
         lambda: limited.send("POST", pods_path("ns"), body["pod"], query={"fieldValidation": "Strict"})),
        ("patch status", lambda: custom.patch_namespaced_custom_object_status(
            "ckpt.dev", "v1alpha1", "ns", "trainingjobs", "tj-00001", body["status"],
            _content_type=MERGE_PATCH),
         lambda: limited.send("PATCH", status_path, body["status"], MERGE_PATCH)),
        ("release finalizer", lambda: unread(core.patch_namespaced_pod("tj-00001-0", "ns", body["release"],
                                                                       _preload_content=False)),
         lambda: limited.send("PATCH", pod_path("ns", "tj-00001-0"), body["release"], JSON_PATCH)),
        ("create event", lambda: unread(core.create_namespaced_event("ns", body["event"], _preload_content=False)),
         lambda: limited.send("POST", events_path("ns"), body["event"])),
    ]


def cpu_per_request(request: Callable[[], object], count: int, repeat: int) -> float:
    """Microseconds of this process's CPU per request, best of `repeat` rounds."""
    best = float("inf")
    for _ in range(repeat):
        began = time.process_time()
        for _ in range(count):
            request()
        best = min(best, (time.process_time() - began) / count * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests of each kind per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (the best one counts)")
    args = parser.parse_args()
    port = multiprocessing.Value("i", 0)
    server = multiprocessing.Process(target=serve, args=(port,), daemon=True)
    server.start()
    while not port.value:
        time.sleep(0.01)
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port.value}"
    configuration.api_key, configuration.api_key_prefix = {"authorization": "token"}, {"authorization": "Bearer"}
    limited = LimitedApiClient(configuration)  # no limiter: the client's own CPU only
    print(f"{'client CPU per request (us)':32s} {'generated':>10s} {'send':>10s} {'ratio':>7s}")
    try:
        for name, generated, lean in cases(limited):
            generated(), lean()  # connect once
            before = cpu_per_request(generated, args.requests, args.repeat)
            after = cpu_per_request(lean, args.requests, args.repeat)
            print(f"{name:32s} {before:10.1f} {after:10.1f} {after / before:7.2f}")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
