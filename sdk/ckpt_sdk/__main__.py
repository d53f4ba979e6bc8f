"""`python -m ckpt_sdk ls|verify|set-aside DIR`: list checkpoints, verify every checksum (exit 1 on a corrupt one),
or move checkpoints aside (never deleted) so that a run starts over, or continues from an older step."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from ._errors import CorruptCheckpointError
from ._store import Listing, Store, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt_sdk", description=__doc__)
    parser.add_argument("command", choices=["ls", "verify", "set-aside"])
    parser.add_argument("directory")
    parser.add_argument("--output", "-o", help="write the listing to this file instead of stdout")
    parser.add_argument("--after", type=int, default=None,
                        help="set-aside: only the checkpoints newer than this step (default: all of them)")
    args = parser.parse_args(argv)
    if args.output:
        with open(args.output, "w") as out:
            return _command(args, out)
    return _command(args, sys.stdout)


def _command(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "set-aside":
        return set_aside(Path(args.directory), args.after, out)
    return _run(args.command, args.directory, out)


def _run(command: str, directory: str, out: TextIO) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(message)s", stream=sys.stderr)
    listing = Store(directory).scan()
    listed = {c.path.name for c in listing.good} | {n for n, _ in listing.damaged} | {n for n, _ in listing.newer}
    incomplete = [name for name in _step_dirs(Path(directory)) if name not in listed | set(listing.superseded)]
    if listing.empty and not incomplete:
        print(f"no checkpoints in {directory}", file=out)
        return 0
    print(f"{'STEP':>10}  {'SIZE':>12}  {'RANKS':>5}  {'ATTEMPT':>7}  {'TIME (UTC)':<20}  STATUS", file=out)
    bad = sum(_print_good(listing, command == "verify", out))
    _print_problems(listing, incomplete, out)
    return 1 if bad or ((listing.damaged or incomplete) and command == "verify") else 0


def _print_good(listing: Listing, check: bool, out: TextIO) -> list[int]:
    """One row per loadable-looking checkpoint (verified with `check`); 1 for each found corrupt."""
    corrupt = []
    for info in listing.good:
        status = "-"
        if check:
            try:
                verify(info)
                status = "ok"
            except CorruptCheckpointError as exc:
                status = f"CORRUPT: {exc}"
                corrupt.append(1)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.time))
        attempt = "-" if info.manifest.attempt is None else str(info.manifest.attempt)
        print(f"{info.step:>10}  {info.size:>12}  {info.world_size:>5}  {attempt:>7}  {stamp:<20}  {status}", file=out)
    return corrupt


def _print_problems(listing: Listing, incomplete: list[str], out: TextIO) -> None:
    dash = "-"
    rows = [(name, f"NEWER FORMAT: {why}") for name, why in listing.newer]
    rows += [(name, f"INCOMPLETE OR DAMAGED (never loaded): {why}") for name, why in listing.damaged]
    rows += [(name, "INCOMPLETE: no valid manifest (never loaded)") for name in incomplete]
    rows += [(name, "superseded copy of a re-saved step (removed at the next save)") for name in listing.superseded]
    for name, status in rows:
        print(f"{name:>10}  {dash:>12}  {dash:>5}  {dash:>7}  {dash:<20}  {status}", file=out)


def set_aside(directory: Path, after: int | None, out: TextIO) -> int:
    """Move `step-*` directories (all, or those newer than `after`) into `set-aside-<UTC time>/` in the same
    directory: invisible to every resume, never deleted. With `after`, that step must exist and load-check."""
    listing = Store(directory).scan()
    if after is not None and not any(info.step == after for info in listing.good):
        steps = ", ".join(str(info.step) for info in listing.good) or "none"
        print(f"error: no complete checkpoint of step {after} in {directory} (complete: {steps})", file=sys.stderr)
        return 1
    moving = [name for name in _step_dirs(directory)
              if after is None or _step_of(name) is None or (_step_of(name) or 0) > after]
    if not moving:
        print(f"nothing to set aside in {directory}", file=out)
        return 0
    stem = time.strftime("set-aside-%Y%m%dT%H%M%SZ", time.gmtime())
    target, number = directory / stem, 1
    while target.exists():
        number += 1
        target = directory / f"{stem}-{number}"
    target.mkdir()
    for name in moving:
        (directory / name).rename(target / name)
    print(f"moved {len(moving)} checkpoint(s) to {target}: {', '.join(moving)}", file=out)
    return 0


def _step_of(name: str) -> int | None:
    digits = name.removeprefix("step-").split(".")[0]
    return int(digits) if digits.isdigit() else None


def _step_dirs(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step-"))


if __name__ == "__main__":
    sys.exit(main())
