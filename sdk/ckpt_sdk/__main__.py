"""`python -m ckpt_sdk ls|verify DIR`: list checkpoints, or verify every checksum (exit 1 on a corrupt one)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from ._errors import CorruptCheckpointError
from ._storage import Store, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt_sdk", description=__doc__)
    parser.add_argument("command", choices=["ls", "verify"])
    parser.add_argument("directory")
    parser.add_argument("--output", "-o", help="write the listing to this file instead of stdout")
    args = parser.parse_args(argv)
    if args.output:
        with open(args.output, "w") as out:
            return _run(args.command, args.directory, out)
    return _run(args.command, args.directory, sys.stdout)


def _run(command: str, directory: str, out: TextIO) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    found = Store(directory).list()
    incomplete = _incomplete(Path(directory), {c.path.name for c in found})
    if not found and not incomplete:
        print(f"no checkpoints in {directory}", file=out)
        return 0
    bad = 0
    print(f"{'STEP':>10}  {'SIZE':>12}  {'ATTEMPT':>7}  {'TIME (UTC)':<20}  STATUS", file=out)
    for info in found:
        status = "-"
        if command == "verify":
            try:
                verify(info)
                status = "ok"
            except CorruptCheckpointError as exc:
                status, bad = f"CORRUPT: {exc}", bad + 1
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.time))
        print(f"{info.step:>10}  {info.size:>12}  {info.manifest.get('attempt', '-')!s:>7}  {stamp:<20}  {status}",
              file=out)
    for name in incomplete:
        print(f"{name:>10}  {'-':>12}  {'-':>7}  {'-':<20}  INCOMPLETE: no valid manifest (never loaded)", file=out)
    return 1 if bad or (incomplete and command == "verify") else 0


def _incomplete(directory: Path, valid: set[str]) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step-") and p.name not in valid)


if __name__ == "__main__":
    sys.exit(main())
