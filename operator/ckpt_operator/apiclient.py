"""The operator's Kubernetes client: a QPS/burst limit shared by every call, a request counter, and the retry
delay an API error asks for (429 and 5xx honour `Retry-After`)."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import metrics

USER_AGENT = "ckpt-operator"


class TokenBucket:
    """Client-side rate limit like client-go's: `qps` tokens per second, at most `burst` at once (thread-safe)."""

    def __init__(self, qps: float, burst: int) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError(f"qps must be > 0 and burst >= 1 (got qps={qps}, burst={burst})")
        self.qps, self.burst = qps, burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until one is available; returns the time slept."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
            self._stamp = now
            self._tokens -= 1.0
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait


class LimitedApiClient(client.ApiClient):
    """An ApiClient whose every request waits for the shared rate limiter and is counted by verb."""

    limiter: TokenBucket | None = None

    def call_api(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        if self.limiter is not None:
            self.limiter.acquire()
        metrics.API_REQUESTS.labels(str(method).upper()).inc()
        return super().call_api(method, url, *args, **kwargs)


@dataclass
class Api:
    core: client.CoreV1Api
    custom: client.CustomObjectsApi

    @classmethod
    def connect(cls, qps: float, burst: int) -> Api:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        api_client = LimitedApiClient()
        api_client.limiter = TokenBucket(qps, burst)
        api_client.user_agent = USER_AGENT
        return cls(client.CoreV1Api(api_client), client.CustomObjectsApi(api_client))

    def plain(self, obj: Any) -> Any:
        """A client model as plain JSON-like data."""
        return self.core.api_client.sanitize_for_serialization(obj)


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
