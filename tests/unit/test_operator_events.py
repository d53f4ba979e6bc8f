"""The operator's Event recorder (client-go's correlation, aggregation and spam filter; a queue with a bound and a
rate limit of its own), the limiter's tokens taken before a pass, and what the storm's profile took out."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import select
import socket
import threading
import time
from collections.abc import Mapping
from email.message import Message
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic_core import from_json

from ckpt_operator import apiclient, metrics
from ckpt_operator.actuator import capacity
from ckpt_operator.apiclient import (
    JSON,
    JSON_PATCH,
    MERGE_PATCH,
    NORMAL,
    STRATEGIC_MERGE_PATCH,
    URGENT,
    Api,
    LimitedApiClient,
    TokenBucket,
    retry_after,
    run_prepaid,
)
from ckpt_operator.cache import Cache
from ckpt_operator.classify import NodeInfo
from ckpt_operator.events import COMBINED, Correlator, EventRecorder, ObjectRef, event_path, events_path
from ckpt_operator.models import TrainingJobSpec

JOB = ObjectRef("ckpt.dev/v1alpha1", "TrainingJob", "ns", "demo", "uid-1")
OTHER = ObjectRef("ckpt.dev/v1alpha1", "TrainingJob", "ns", "other", "uid-2")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_event_correlates_to_one_key_and_similar_ones_are_combined_after_ten():
    clock = Clock()
    correlator = Correlator(clock=clock)
    first = correlator.correlate(JOB, "Warning", "Preempted", "attempt 0 preempted")
    assert first is not None and first == correlator.correlate(JOB, "Warning", "Preempted", "attempt 0 preempted")
    keys = {correlator.correlate(JOB, "Normal", "Resubmitted", f"attempt {n}") for n in range(10)}
    assert len(keys) == 10 and all(key is not None and not key[1].startswith(COMBINED) for key in keys)
    eleventh = correlator.correlate(JOB, "Normal", "Resubmitted", "attempt 10")
    twelfth = correlator.correlate(JOB, "Normal", "Resubmitted", "attempt 11")
    assert eleventh is not None and twelfth is not None
    assert eleventh[1] == COMBINED + "attempt 10" and eleventh[0] == twelfth[0]  # one Event, counted up
    assert correlator.correlate(OTHER, "Normal", "Resubmitted", "attempt 10") == (
        ("uid-2", "Normal", "Resubmitted", "attempt 10"), "attempt 10")  # another object is not combined
    clock.now += 601  # a new window: messages stand alone again
    again = correlator.correlate(JOB, "Normal", "Resubmitted", "attempt 12")
    assert again is not None and again[1] == "attempt 12"


def test_the_spam_filter_lets_25_through_then_one_per_five_minutes_per_object():
    clock = Clock()
    correlator = Correlator(clock=clock)
    passed = [correlator.correlate(JOB, "Normal", "Reason", "same") is not None for _ in range(30)]
    assert passed == [True] * 25 + [False] * 5
    assert correlator.correlate(OTHER, "Normal", "Reason", "same") is not None  # per object
    clock.now += 300
    assert correlator.correlate(JOB, "Normal", "Reason", "same") is not None
    assert correlator.correlate(JOB, "Normal", "Reason", "same") is None


def test_the_correlator_refuses_bad_options():
    with pytest.raises(ValueError, match="window"):
        Correlator(window=0)


class FakeEvents:
    """The Event requests (`Sender`), recorded: a POST creates, a merge PATCH raises the count."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.gone: set[str] = set()

    def __call__(self, method: str, path: str, body: object = None, content_type: str = JSON,
                 query: Mapping[str, str] | None = None) -> bytes:
        assert isinstance(body, dict)
        if method == "POST":
            assert path == events_path(body["metadata"]["namespace"]) and content_type == JSON
            self.calls.append(("create", body["metadata"]["name"], body))
            return b"{}"
        name = path.rsplit("/", 1)[1]
        assert (method, path, content_type) == ("PATCH", event_path("ns", name), MERGE_PATCH)
        if name in self.gone:
            raise ApiException(status=404)
        self.calls.append(("patch", name, body))
        return b"{}"


async def _drain(recorder: EventRecorder, events: FakeEvents, calls: int) -> None:
    task = asyncio.create_task(recorder.run())
    deadline = time.monotonic() + 5
    while len(events.calls) < calls and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()


def test_an_event_repeated_while_queued_is_posted_once_with_its_count_and_later_patched():
    async def scenario() -> FakeEvents:
        events = FakeEvents()
        recorder = EventRecorder(events, TokenBucket(100, 10))
        for _ in range(3):
            recorder.record(JOB, "Warning", "Preempted", "attempt 0 preempted")
        await _drain(recorder, events, 1)
        recorder.record(JOB, "Warning", "Preempted", "attempt 0 preempted")
        await _drain(recorder, events, 2)
        return events

    events = asyncio.run(scenario())
    (verb, name, body), (verb2, name2, patch) = events.calls
    assert verb == "create" and body["count"] == 3 and body["involvedObject"]["uid"] == "uid-1"
    assert body["reason"] == "Preempted" and body["type"] == "Warning" and body["source"]["component"]
    assert verb2 == "patch" and name2 == name and patch["count"] == 4  # one Event object, its count raised


def test_a_patched_event_that_expired_is_posted_again():
    async def scenario() -> FakeEvents:
        events = FakeEvents()
        recorder = EventRecorder(events, TokenBucket(100, 10))
        recorder.record(JOB, "Normal", "PodRunning", "running")
        await _drain(recorder, events, 1)
        events.gone.add(events.calls[0][1])
        recorder.record(JOB, "Normal", "PodRunning", "running")
        await _drain(recorder, events, 2)
        return events

    calls = asyncio.run(scenario()).calls
    assert [verb for verb, _, _ in calls] == ["create", "create"] and calls[1][2]["count"] == 1


def test_a_full_queue_drops_events_and_counts_them():
    async def scenario() -> tuple[FakeEvents, float]:
        events = FakeEvents()
        recorder = EventRecorder(events, TokenBucket(100, 10), max_queued=2)
        before = metrics.EVENTS_DROPPED.labels("queue full")._value.get()
        for index in range(3):
            recorder.record(JOB, "Normal", "Resubmitted", f"attempt {index}")
        dropped = metrics.EVENTS_DROPPED.labels("queue full")._value.get() - before
        await _drain(recorder, events, 2)
        return events, dropped

    events, dropped = asyncio.run(scenario())
    assert dropped == 1 and [body["message"] for _, _, body in events.calls] == ["attempt 0", "attempt 1"]


def test_events_are_posted_at_the_recorders_own_rate():
    async def scenario() -> float:
        events = FakeEvents()
        recorder = EventRecorder(events, TokenBucket(20, 1))
        for index in range(6):
            recorder.record(ObjectRef("v1", "Pod", "ns", f"p{index}", f"u{index}"), "Normal", "R", "m")
        start = time.monotonic()
        await _drain(recorder, events, 6)
        assert len(events.calls) == 6
        return time.monotonic() - start

    assert asyncio.run(scenario()) >= 5 / 20 * 0.9  # one at once, five more at 20 per second


def test_an_async_token_waits_behind_urgent_requests_and_holds_no_thread():
    bucket = TokenBucket(qps=4, burst=1)
    bucket.acquire()  # spent: the next token in 250 ms
    order: list[str] = []

    def urgent() -> None:
        bucket.acquire(URGENT)
        order.append("urgent")

    async def scenario() -> None:
        waiter = asyncio.create_task(bucket.take_async(NORMAL))
        await asyncio.sleep(0.02)
        thread = threading.Thread(target=urgent)
        thread.start()
        await waiter
        order.append("async")
        thread.join(5)

    asyncio.run(scenario())
    assert order == ["urgent", "async"]


def test_a_prepaid_token_pays_the_first_request_and_an_unspent_one_goes_back(monkeypatch):
    bucket = TokenBucket(qps=1, burst=1)
    taken: list[int] = []
    monkeypatch.setattr(bucket, "acquire", lambda level=NORMAL: taken.append(level))
    monkeypatch.setattr(apiclient.client.ApiClient, "call_api", lambda self, *args, **kwargs: "answer")
    limited = LimitedApiClient()
    limited.limiter = bucket

    def two_requests() -> str:
        limited.call_api("GET", "/a")
        return str(limited.call_api("PATCH", "/b"))

    assert run_prepaid(bucket, True, two_requests) == "answer" and taken == [NORMAL]  # the second one waited its turn
    bucket._tokens = 0.0
    run_prepaid(bucket, True, lambda: None)  # a pass that made no request
    assert bucket._tokens >= 1.0 and getattr(apiclient._lane, "prepaid", 0) == 0


def test_elastic_capacity_is_computed_once_per_node_change(monkeypatch):
    calls: list[int] = []
    from ckpt_operator import actuator

    def counting(nodes: Any, spec: TrainingJobSpec, taints: Any) -> int:
        calls.append(1)
        return len(list(nodes))

    monkeypatch.setattr(actuator, "rank_slots", counting)
    nodes = {"a": [NodeInfo("a")], "b": [NodeInfo("b")]}
    cache = Cache(jobs={}, pods={}, nodes=nodes)
    spec = TrainingJobSpec.model_validate({"workers": {"min": 1, "max": 4}, "template": {"spec": {"containers": [
        {"name": "t", "image": "i", "command": ["python", "train.py"]}]}}, "checkpoint": {
        "persistentVolumeClaim": {"claimName": "c"}}})
    assert [capacity(cache, spec, {}) for _ in range(50)] == [2] * 50 and len(calls) == 1
    nodes["c"] = [NodeInfo("c")]
    cache.node_generation += 1  # node_event saw a change
    assert capacity(cache, spec, {}) == 3 and len(calls) == 2 and len(cache.capacity_memo) == 1


def _recording_server() -> tuple[http.server.ThreadingHTTPServer, list[tuple[str, str, Message, bytes, int]]]:
    """A real HTTP/1.1 server on the loopback that answers like an API server (201 to a POST, 200 to a GET, 409 with
    Retry-After to a PATCH of a path ending in /conflict, else 200) and keeps each request with the client's port."""
    seen: list[tuple[str, str, Message, bytes, int]] = []  # headers as a Message: looked up case-insensitively

    class Recording(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # connections kept alive: a connection handed back is used again

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path, self.headers, body, self.client_address[1]))
            code, answer = (409, b'{"message": "the object has been modified"}') if self.path.endswith(
                "/conflict") else (201 if self.command == "POST" else 200, b'{"metadata": {"name": "p"}}')
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            if code == 409:
                self.send_header("Retry-After", "3")
            self.end_headers()
            self.wfile.write(answer)

        do_POST = do_GET = do_PATCH = _answer

        def log_message(self, *args: Any) -> None:
            """Quiet: no line per request."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_the_lean_request_path_sends_json_with_the_clients_auth_and_fails_like_the_generated_methods():
    """`Api`'s storm requests (creates, status writes, releases) over `send`, against a real HTTP server: the
    client's address, token and user agent, each body as JSON with its content type, creates validated strictly by
    the server, one limiter token per request, one kept-alive connection, and an error status raised as the
    ApiException the rest of the operator reads (status, body, Retry-After)."""
    server, seen = _recording_server()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    configuration.api_key, configuration.api_key_prefix = {"authorization": "secret"}, {"authorization": "Bearer"}
    limited = LimitedApiClient(configuration)
    limited.user_agent, limited.limiter = "ckpt-operator", TokenBucket(qps=0.01, burst=6)
    core = client.CoreV1Api(limited)
    api = Api(core, client.CustomObjectsApi(limited), limited.limiter, core, TokenBucket(1, 1), core)
    release = [{"op": "test", "path": "/metadata/finalizers", "value": ["f"]}]
    try:
        assert api.create_pod("ns", {"metadata": {"name": "p"}}) == {"metadata": {"name": "p"}}
        assert api.read_pod("ns", "p") == {"metadata": {"name": "p"}}
        api.patch_pod("ns", "p", release)
        api.patch_pod("ns", "p", {"metadata": {"annotations": {"a": "b"}}})
        assert api.patch_status("ckpt.dev", "v1alpha1", "trainingjobs", "ns", "j", {"status": {}}) == {
            "metadata": {"name": "p"}}
        with pytest.raises(ApiException) as caught:
            api.patch_pod("ns", "conflict", release)
    finally:
        server.shutdown()
        server.server_close()
    assert caught.value.status == 409 and "modified" in str(caught.value.body) and retry_after(caught.value) == 3
    assert [(method, path, headers.get("Content-Type")) for method, path, headers, _, _ in seen] == [
        ("POST", "/api/v1/namespaces/ns/pods?fieldValidation=Strict", JSON),
        ("GET", "/api/v1/namespaces/ns/pods/p", None),
        ("PATCH", "/api/v1/namespaces/ns/pods/p", JSON_PATCH),
        ("PATCH", "/api/v1/namespaces/ns/pods/p", STRATEGIC_MERGE_PATCH),
        ("PATCH", "/apis/ckpt.dev/v1alpha1/namespaces/ns/trainingjobs/j/status", MERGE_PATCH),
        ("PATCH", "/api/v1/namespaces/ns/pods/conflict", JSON_PATCH)]
    assert all(headers["Authorization"] == "Bearer secret" and headers["User-Agent"] == "ckpt-operator"
               and headers["Accept"] == JSON for _, _, headers, _, _ in seen)
    assert [from_json(body) if body else None for _, _, _, body, _ in seen[:3]] == [
        {"metadata": {"name": "p"}}, None, release]
    assert len({port for *_, port in seen}) == 1  # every answer handed its connection back to the pool
    assert limited.limiter._tokens < 1  # six requests, six tokens of a burst of six


def _scripted_server(script: list[str]) -> tuple[socket.socket, list[tuple[int, bytes]]]:
    """A raw HTTP/1.1 server on the loopback that treats the n-th request it reads (on any connection) as `script`
    says: "answer" (200, kept alive), "close" (the connection closed after the answer, as an idle timeout would),
    "drop" (the connection closed without a byte of answer). Keeps (connection number, request line) of each."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[tuple[int, bytes]] = []

    def serve(conn: socket.socket, number: int) -> None:
        with conn, conn.makefile("rb") as stream:
            while line := stream.readline():
                length = 0
                while (header := stream.readline()) not in (b"\r\n", b""):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                stream.read(length)
                seen.append((number, line.strip()))
                step = script[len(seen) - 1] if len(seen) <= len(script) else "answer"
                if step == "drop":
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                if step == "close":
                    conn.shutdown(socket.SHUT_RDWR)
                    return

    def accept() -> None:
        number = 0
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            number += 1
            threading.Thread(target=serve, args=(conn, number), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, seen


def _plain_client(port: int) -> LimitedApiClient:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    return LimitedApiClient(configuration)


def _closed_by_server(limited: LimitedApiClient) -> bool:
    """Wait (at most 5 s) until the server's end of this thread's kept-alive connection has arrived."""
    connection = limited.connections._local.connection if limited.connections is not None else None
    return connection is not None and bool(select.select([connection.sock], [], [], 5)[0])


def test_the_lean_path_replaces_a_connection_the_server_closed_and_sends_a_dropped_request_again_once():
    """A kept-alive connection the API server closed while idle is not written to; a reused one closed as the
    request went out, with no answer, takes the request again on a new connection; a new connection that answers
    nothing is an error (the request is not sent a third time). A proxy leaves the lean transport to urllib3."""
    listener, seen = _scripted_server(["answer", "close", "answer", "drop", "close", "drop", "answer"])
    limited = _plain_client(listener.getsockname()[1])
    try:
        assert limited.send("GET", "/r0") == limited.send("GET", "/r1") == b"{}" and _closed_by_server(limited)
        assert limited.send("GET", "/r2") == b"{}"
        assert limited.send("GET", "/r3") == b"{}" and _closed_by_server(limited)
        with pytest.raises(http.client.RemoteDisconnected):
            limited.send("GET", "/fresh")
        assert limited.send("GET", "/again") == b"{}"
        fronted = client.Configuration()
        fronted.host = f"http://127.0.0.1:{listener.getsockname()[1]}/front"  # an API server behind a path
        assert LimitedApiClient(fronted).send("GET", "/api/v1/x", query={"a": "b"}) == b"{}"
    finally:
        listener.close()
    assert seen == [(1, b"GET /r0 HTTP/1.1"), (1, b"GET /r1 HTTP/1.1"),  # closed after its answer: not reused
                    (2, b"GET /r2 HTTP/1.1"), (2, b"GET /r3 HTTP/1.1"),  # dropped on a reused connection: again
                    (3, b"GET /r3 HTTP/1.1"), (4, b"GET /fresh HTTP/1.1"), (5, b"GET /again HTTP/1.1"),
                    (6, b"GET /front/api/v1/x?a=b HTTP/1.1")]
    proxied = client.Configuration()
    proxied.host, proxied.proxy = "https://10.0.0.1:6443", "http://proxy.invalid:3128"
    assert LimitedApiClient(proxied).connections is None and _plain_client(1).connections is not None
