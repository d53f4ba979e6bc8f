"""`ckpt-operator`: runs the TrainingJob operator against the current kubeconfig (or in-cluster config)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import http.server
import logging
import os
import re
import sys
import threading
from collections.abc import Callable

import kopf

from .models import DNS1123

log = logging.getLogger("ckpt_operator")


class _Health(http.server.BaseHTTPRequestHandler):
    """/healthz: the process serves requests (liveness). /readyz: it leads and kopf is watching (readiness)."""

    ready: threading.Event = threading.Event()

    def do_GET(self) -> None:
        ok = self.path == "/healthz" or (self.path == "/readyz" and self.ready.is_set())
        body = b"ok\n" if ok else b"not ready\n"
        self.send_response(200 if ok else 503 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_health(port: int, ready: threading.Event) -> None:
    _Health.ready = ready
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), _Health)  # noqa: S104 (probes come from the kubelet)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena; with the reconcile threads that multiplies the
    resident memory kept after a burst. Two arenas are plenty for a process that is mostly one event loop."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return
    libc.mallopt(-8, arenas)  # M_ARENA_MAX


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-operator", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only this namespace, an exact name (repeatable); default: all namespaces")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("CKPT_OPERATOR_METRICS_PORT", 9090)),
                        help="Prometheus metrics port (0 disables)")
    parser.add_argument("--health-port", type=int, default=int(os.environ.get("CKPT_OPERATOR_HEALTH_PORT", 8080)),
                        help="http://0.0.0.0:PORT/healthz (alive) and /readyz (leading and watching); 0 disables")
    parser.add_argument("--leader-elect", action="store_true",
                        default=os.environ.get("CKPT_OPERATOR_LEADER_ELECT", "") in ("1", "true"),
                        help="run several replicas: only the holder of a coordination.k8s.io Lease acts")
    parser.add_argument("--leader-election-namespace",
                        default=os.environ.get("CKPT_OPERATOR_LEADER_ELECTION_NAMESPACE", ""),
                        help="where the Lease lives (default: the pod's namespace, else 'default')")
    parser.add_argument("--lease-seconds", type=float,
                        default=float(os.environ.get("CKPT_OPERATOR_LEASE_SECONDS", "15")),
                        help="Lease duration: how long a dead leader blocks a standby")
    parser.add_argument("--qps", type=float, default=float(os.environ.get("CKPT_OPERATOR_QPS", "50")),
                        help="client-side limit on API requests per second (watches excluded)")
    parser.add_argument("--burst", type=int, default=int(os.environ.get("CKPT_OPERATOR_BURST", "100")),
                        help="requests allowed at once above --qps")
    parser.add_argument("--notice-taints", default=os.environ.get("CKPT_OPERATOR_NOTICE_TAINTS"),
                        help="node taints that announce a node's end, as key=seconds-of-notice,...: a trainer on such "
                             "a node is asked for a checkpoint, then moved (default: the AWS, GKE, Karpenter and "
                             "cluster-autoscaler taints; '' disables)")
    parser.add_argument("--kueue", action="store_true",
                        default=os.environ.get("CKPT_OPERATOR_KUEUE", "") in ("1", "true"),
                        help="queue TrainingJobs labelled kueue.x-k8s.io/queue-name through Kueue (v0.17, with "
                             "TrainingJob.v1alpha1.ckpt.dev in its integrations.externalFrameworks)")
    parser.add_argument("--verbose", "-v", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for namespace in args.namespace:
        if not exact_namespace(namespace):
            parser.error(f"--namespace takes exact namespace names (the pod watch lists each one), not kopf's "
                         f"patterns or an empty one: {namespace!r} is not a namespace name")
    if args.notice_taints is not None:
        from .context import parse_notice_taints

        try:
            parse_notice_taints(args.notice_taints)
        except ValueError as exc:
            parser.error(str(exc))
        os.environ["CKPT_OPERATOR_NOTICE_TAINTS"] = args.notice_taints  # read with the other settings at startup
    _limit_malloc_arenas()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from . import handlers, metrics  # registers the kopf handlers
    from .context import OperatorContext

    if args.kueue:
        handlers.enable_kueue()

    ready = threading.Event()
    if args.health_port:
        serve_health(args.health_port, ready)
    if args.leader_elect:
        _lead(args)
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(kopf.operator(clusterwide=not args.namespace, namespaces=args.namespace, standalone=True,
                                 ready_flag=ready, memo=OperatorContext(qps=args.qps, burst=args.burst,
                                                                        namespaces=list(args.namespace))))
    return 0


def exact_namespace(text: str) -> bool:
    """A namespace name: a DNS-1123 label, the pattern the CRD's names use, at most 63 characters."""
    return len(text) <= 63 and re.fullmatch(DNS1123, text) is not None


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (`kopf[uvloop]`, as kopf's own CLI runs), else asyncio's: the loop
    carries every watch event, thread hand-off and timer, and in a storm its own overhead was 14 % of the GIL."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _lead(args: argparse.Namespace) -> None:
    """Block until this replica holds the Lease; exit the process the moment it stops holding it."""
    from kubernetes import config

    from .leader import LeaderElector, LeaseConfig

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    namespace = args.leader_election_namespace or _pod_namespace()
    lease = LeaseConfig(namespace=namespace, lease_seconds=args.lease_seconds,
                        renew_deadline_seconds=max(1.0, args.lease_seconds * 2 / 3),
                        retry_seconds=max(0.5, args.lease_seconds / 7.5))
    elector = LeaderElector(lease)
    elector.acquire()

    def lost() -> None:
        log.critical("leader election: lost the lease; exiting so that only one replica acts")
        os._exit(1)

    elector.keep(lost)


def _pod_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


if __name__ == "__main__":
    sys.exit(main())
