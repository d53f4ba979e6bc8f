"""`python -m ckpt_sdk ls|verify DIR`: list checkpoints, or verify every checksum (exit 1 on a corrupt one)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from ._errors import CorruptCheckpointError
from ._storage import Store, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt_sdk", description=__doc__)
    parser.add_argument("command", choices=["ls", "verify"])
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    found = Store(args.directory).list()
    if not found:
        print(f"no checkpoints in {args.directory}")
        return 0
    bad = 0
    print(f"{'STEP':>10}  {'SIZE':>12}  {'ATTEMPT':>7}  {'TIME (UTC)':<20}  STATUS")
    for info in found:
        status = "-"
        if args.command == "verify":
            try:
                verify(info)
                status = "ok"
            except CorruptCheckpointError as exc:
                status, bad = f"CORRUPT: {exc}", bad + 1
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.time))
        print(f"{info.step:>10}  {info.size:>12}  {info.manifest.get('attempt', '-')!s:>7}  {stamp:<20}  {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
