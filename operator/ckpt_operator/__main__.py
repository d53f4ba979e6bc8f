"""`ckpt-operator`: runs the TrainingJob operator against the current kubeconfig (or in-cluster config)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckpt-operator", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("CKPT_OPERATOR_METRICS_PORT", 9090)),
                        help="Prometheus metrics port (0 disables)")
    parser.add_argument("--health-port", type=int, default=int(os.environ.get("CKPT_OPERATOR_HEALTH_PORT", 8080)),
                        help="liveness endpoint http://0.0.0.0:PORT/healthz (0 disables)")
    parser.add_argument("--peering", default=os.environ.get("CKPT_OPERATOR_PEERING", ""),
                        help="kopf peering name (needs the kopf peering CRDs); empty: standalone")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from . import handlers, metrics  # noqa: F401 (registers the kopf handlers)

    if args.metrics_port:
        metrics.serve(args.metrics_port)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=not args.peering,
        peering_name=args.peering or None,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
