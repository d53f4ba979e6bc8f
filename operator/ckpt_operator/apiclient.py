"""The operator's Kubernetes client: a QPS/burst limit shared by every call, a request counter, and the retry
delay an API error asks for (429 and 5xx honour `Retry-After`)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import quote, urlsplit

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.client.rest import should_bypass_proxies
from pydantic_core import from_json, to_json

from . import metrics

T = TypeVar("T")
USER_AGENT = "ckpt-operator"
EVENT_QPS_SHARE = 0.5  # Events get a bucket of their own: half the operator's qps, a burst of 25
RECONCILE_THREADS = 16  # passes run in threads (the client is synchronous); one waiting for the limiter holds one
REQUEST_TIMEOUT = 60.0  # seconds a lean request waits to connect, and for each part of the answer
JSON, MERGE_PATCH, JSON_PATCH = "application/json", "application/merge-patch+json", "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


# request priorities: pod creates and deletes; status writes; the status write after a create (in a storm, every
# replacement pod first: the write can wait, a crash before it only means the next pass adopts the pods it made);
# finalizer releases
URGENT, NORMAL, DEFERRED, BACKGROUND = 0, 1, 2, 3
_lane = threading.local()


@contextlib.contextmanager
def priority(level: int) -> Iterator[None]:
    """Requests made by this thread inside the block take the rate limiter's `level` lane."""
    previous = getattr(_lane, "level", NORMAL)
    _lane.level = level
    try:
        yield
    finally:
        _lane.level = previous


class TokenBucket:
    """Client-side rate limit like client-go's: `qps` tokens per second, at most `burst` at once (thread-safe).
    A waiting request of a more urgent lane goes first, so in an eviction storm replacement pods are created
    before the status writes and finalizer releases of the jobs already handled."""

    def __init__(self, qps: float, burst: int) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError(f"qps must be > 0 and burst >= 1 (got qps={qps}, burst={burst})")
        self.qps, self.burst = qps, burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._cond = threading.Condition()
        self._waiting = [0, 0, 0, 0]
        self._gates: dict[int, asyncio.Lock] = {}  # async takers wait in line per lane, one polls the bucket
        self._thread_gates = [threading.Lock() for _ in self._waiting]  # the same for threads

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
        self._stamp = now

    def _take(self, level: int) -> float | None:
        """Take a token if one is free and no more urgent request waits (None); else the seconds to wait before
        trying again. Call holding `_cond`."""
        self._refill()
        if self._tokens >= 1 and not any(self._waiting[:level]):
            self._tokens -= 1
            return None
        return max(0.001, (1 - self._tokens) / self.qps)

    async def take_async(self, level: int = NORMAL) -> None:
        """Take one token on the event loop without holding a thread: coroutines of one lane queue (FIFO) behind
        one that sleeps until the bucket has a token and no more urgent request waits."""
        async with self._gates.setdefault(level, asyncio.Lock()):
            with self._cond:
                self._waiting[level] += 1
            try:
                while True:
                    with self._cond:
                        wait = self._take(level)
                    if wait is None:
                        return
                    await asyncio.sleep(wait)
            finally:
                with self._cond:
                    self._waiting[level] -= 1
                    self._cond.notify_all()

    def contended(self) -> bool:
        """Whether the budget is under pressure: half the burst spent, or a request waiting for a token."""
        with self._cond:
            self._refill()
            return self._tokens < self.burst / 2 or any(self._waiting)

    def refund(self) -> None:
        """Give back a token taken for requests that were not made."""
        with self._cond:
            self._refill()
            self._tokens = min(self.burst, self._tokens + 1)
            self._cond.notify_all()

    def acquire(self, level: int = NORMAL) -> None:
        """Take one token, waiting until one is free and no more urgent request is waiting. Threads of one lane
        queue on the lane's gate and only the first polls the bucket: a token wakes one thread, not every waiter."""
        with self._cond:
            self._waiting[level] += 1
        try:
            with self._thread_gates[level], self._cond:
                while (wait := self._take(level)) is not None:
                    self._cond.wait(wait)
        finally:
            with self._cond:
                self._waiting[level] -= 1
                self._cond.notify_all()


def run_prepaid(limiter: TokenBucket, prepaid: bool, function: Callable[..., T], *args: Any) -> T:
    """Run `function` in this thread; if `prepaid`, one token was already taken (on the event loop,
    `take_async`): its first request spends it, and a token left unspent goes back to the bucket."""
    _lane.prepaid = int(prepaid)
    try:
        return function(*args)
    finally:
        if _lane.prepaid:
            _lane.prepaid = 0
            limiter.refund()


def tls_context(configuration: client.Configuration) -> ssl.SSLContext:
    """The TLS settings of `configuration` as its REST client applies them: its CA (file or data), its client
    certificate, the server's certificate and name checked unless `verify_ssl` is off."""
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert, cadata=configuration.ca_cert_data)
    if not configuration.verify_ssl:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context


@dataclass(frozen=True)
class Answer:
    """An API server's answer to one lean request (shaped like the response `ApiException` reads)."""

    status: int
    reason: str
    headers: Message
    data: bytes


class Connections:
    """`send`'s transport: one kept-alive HTTP/1.1 connection to the API server per thread, http.client without
    urllib3's pool and per-request layers (half the client's CPU per request, benchmarks/operator_requests.py)."""

    def __init__(self, configuration: client.Configuration, timeout: float = REQUEST_TIMEOUT) -> None:
        address = urlsplit(configuration.host)
        self.prefix, self.base = configuration.host, address.path.rstrip("/")
        self.host, self.timeout = address.hostname or "localhost", timeout
        self.context = tls_context(configuration) if address.scheme == "https" else None
        self.port = address.port or (443 if self.context is not None else 80)
        self._local = threading.local()

    @staticmethod
    def usable(configuration: client.Configuration) -> bool:
        """Whether `configuration` asks for nothing these connections leave out (a proxy, another TLS server name
        or host name to check, socket options); if it does, `send` takes the REST client's urllib3 pool."""
        proxied = bool(configuration.proxy) and not should_bypass_proxies(configuration.host,
                                                                          configuration.no_proxy or "")
        return not (proxied or configuration.tls_server_name or configuration.assert_hostname is not None
                    or configuration.socket_options is not None or getattr(configuration, "keep_alive", False))

    def request(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> Answer:
        """One request (`url` as the client builds it: the configured host, the path, the query) on this thread's
        connection. A kept-alive connection the server closed while it was idle is replaced first; one it closes
        as the request goes out, without a byte of answer (it read nothing), takes the request again on a new one."""
        target = self.base + url.removeprefix(self.prefix)  # the host's own path (a proxying front), then ours
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and (connection.sock is None or _readable(connection.sock)):
            connection.close()  # closed meanwhile (readable while idle: its end of stream), or never opened
        elif connection is not None:
            try:
                return self._exchange(connection, method, target, body, headers)
            except http.client.RemoteDisconnected:
                pass
        connection = self._local.connection = self._open()
        return self._exchange(connection, method, target, body, headers)

    def _open(self) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _exchange(self, connection: http.client.HTTPConnection, method: str, target: str, body: bytes | None,
                  headers: Mapping[str, str]) -> Answer:
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
            return Answer(response.status, response.reason, response.headers, response.read())
        except BaseException:
            connection.close()  # the next request opens a new one: this one's state is unknown
            self._local.connection = None
            raise


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has something to read right now (poll, not select: any descriptor number)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class LimitedApiClient(client.ApiClient):
    """An ApiClient whose every request waits for the shared rate limiter and is counted by verb; `send` is its
    lean path for the requests a storm repeats thousands of times."""

    limiter: TokenBucket | None = None

    def __init__(self, configuration: client.Configuration | None = None) -> None:
        super().__init__(configuration)
        self.connections = Connections(self.configuration) if Connections.usable(self.configuration) else None

    def _admit(self, method: str) -> None:
        """Wait for the rate limiter (unless this thread's pass paid ahead) and count the request by verb."""
        if getattr(_lane, "prepaid", 0):  # a token taken before the pass took this thread
            _lane.prepaid -= 1
        elif self.limiter is not None:
            self.limiter.acquire(getattr(_lane, "level", NORMAL))
        metrics.API_REQUESTS.labels(method.upper()).inc()

    def call_api(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        self._admit(str(method))
        return super().call_api(method, url, *args, **kwargs)

    def send(self, method: str, path: str, body: object = None, content_type: str = JSON,
             query: Mapping[str, str] | None = None) -> bytes:
        """One request with a JSON body (plain data), its answer's bytes; the ApiException the generated methods
        raise on an error status or a TLS failure. Skips what they do per call (validate the arguments, copy the body
        to sanitize it) and urllib3 (see `Connections`): 49-76 % less client CPU, by kind (operator_requests.py)."""
        url, headers = request_parts(self, method, path, query, content_type if body is not None else None)
        self._admit(method)
        payload = None if body is None else to_json(body)
        try:
            if self.connections is not None:
                response: Answer | urllib3.BaseHTTPResponse = self.connections.request(method, url, payload, headers)
            else:
                response = self.rest_client.pool_manager.request(method, url, body=payload, headers=headers,
                                                                 preload_content=True)
        except (ssl.SSLError, urllib3.exceptions.SSLError) as exc:
            raise ApiException(status=0, reason=f"{type(exc).__name__}: {exc}") from exc
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.data


def request_parts(api_client: client.ApiClient, method: str, path: str, query: Mapping[str, str] | None,
                  content_type: str | None) -> tuple[str, dict[str, str]]:
    """The URL and headers of one request as `api_client` makes it: its server, the bearer token (refreshed by its
    hook), its user agent; JSON accepted, and the body's content type if there is a body."""
    wanted = {"Accept": JSON, **({"Content-Type": content_type} if content_type is not None else {})}
    _, url, headers, _, _ = api_client.param_serialize(method, path, query_params=list((query or {}).items()),
                                                       header_params=wanted, auth_settings=["BearerToken"])
    return url, headers


class Sender(Protocol):
    """`LimitedApiClient.send`: one request, the answer's bytes."""

    def __call__(self, method: str, path: str, body: object = None, content_type: str = JSON,
                 query: Mapping[str, str] | None = None) -> bytes: ...


def api_path(*segments: str) -> str:
    """A URL path of the API from its segments (names quoted)."""
    return "/" + "/".join(quote(segment, safe="") for segment in segments)


def pods_path(namespace: str) -> str:
    """The path of a namespace's pods (where one is created)."""
    return api_path("api", "v1", "namespaces", namespace, "pods")


def pod_path(namespace: str, name: str) -> str:
    """The path of one pod."""
    return api_path("api", "v1", "namespaces", namespace, "pods", name)


@dataclass
class Api:
    """The clients: `core` and `custom` share one rate limiter (`limiter`); `events` has none of its own (the
    Event recorder takes tokens of `event_limiter` before each request); `watch` has none (watches are excluded from
    the budget, as in client-go) and a connection pool of its own."""

    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    limiter: TokenBucket
    events: client.CoreV1Api
    event_limiter: TokenBucket
    watch: client.CoreV1Api

    @classmethod
    def connect(cls, qps: float, burst: int) -> Api:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = RECONCILE_THREADS  # one connection per reconcile thread
        limiter = TokenBucket(qps, burst)
        api_client = LimitedApiClient(configuration)
        api_client.limiter, api_client.user_agent = limiter, USER_AGENT
        event_client, watch_client = LimitedApiClient(configuration), LimitedApiClient(configuration)
        event_client.user_agent = watch_client.user_agent = USER_AGENT
        return cls(client.CoreV1Api(api_client), client.CustomObjectsApi(api_client), limiter,
                   client.CoreV1Api(event_client), TokenBucket(max(1.0, qps * EVENT_QPS_SHARE), 25),
                   client.CoreV1Api(watch_client))

    @property
    def sender(self) -> LimitedApiClient:
        """The lean request path of `core` and `custom` (see `LimitedApiClient.send`)."""
        return cast(LimitedApiClient, self.core.api_client)

    @property
    def event_sender(self) -> Sender:
        """The lean request path of `events` (no limiter of its own: the recorder takes `event_limiter`'s tokens)."""
        return cast(LimitedApiClient, self.events.api_client).send

    def create_pod(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a pod; the API's answer as plain data (not parsed into client models: that costs more CPU than
        the request itself). A field the API server does not know (a typo in the template) is refused (400), not
        dropped."""
        with priority(URGENT):
            answer = self.sender.send("POST", pods_path(namespace), body, query={"fieldValidation": "Strict"})
        return cast(dict[str, Any], from_json(answer))

    def read_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """Read a pod as plain data (unparsed, like `create_pod`)."""
        return cast(dict[str, Any], from_json(self.sender.send("GET", pod_path(namespace, name))))

    def patch_pod(self, namespace: str, name: str, patch: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Patch a pod: a list is a JSON patch, a dict a strategic merge patch; the answer is not parsed."""
        self.sender.send("PATCH", pod_path(namespace, name), patch,
                         JSON_PATCH if isinstance(patch, list) else STRATEGIC_MERGE_PATCH)

    def patch_status(self, group: str, version: str, plural: str, namespace: str, name: str,
                     patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch a custom object's status subresource; the object as the API server kept it."""
        path = api_path("apis", group, version, "namespaces", namespace, plural, name, "status")
        return cast(dict[str, Any], from_json(self.sender.send("PATCH", path, patch, MERGE_PATCH)))

    def plain(self, obj: Any) -> Any:
        """A client model as plain JSON-like data."""
        return self.core.api_client.sanitize_for_serialization(obj)


def unread(response: Any) -> None:
    """Drop an answer that is not read (`_preload_content=False`), handing its connection back to the pool: an
    unread answer keeps the connection, and the next request would open a new one (a TLS handshake each)."""
    response.drain_conn()
    response.release_conn()


def retry_after(exc: ApiException) -> float | None:
    """The server's `Retry-After` in seconds, if it sent one."""
    headers = exc.headers or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def error_backoff(failures: int, exc: BaseException, base: float = 0.5, cap: float = 60.0) -> float:
    """Seconds to wait after the n-th consecutive failure (1-based): exponential with jitter, never sooner than
    the server's `Retry-After` on 429/5xx."""
    delay: float = min(cap, base * 2 ** max(0, failures - 1)) * random.uniform(0.8, 1.2)  # noqa: S311 (jitter)
    if isinstance(exc, ApiException) and (exc.status == 429 or (exc.status or 0) >= 500):
        delay = max(delay, retry_after(exc) or 0.0)
    return delay
