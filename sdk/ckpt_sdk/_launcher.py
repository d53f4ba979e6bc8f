"""ckpt-run: run a startup command in its own process group and forward SIGTERM/SIGINT to all of it.

A shell script as PID 1 does not pass SIGTERM on to Python; `ckpt-run -- bash start.sh` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

USAGE = "usage: ckpt-run [--] COMMAND [ARG...]"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if args else 2
    try:
        child = subprocess.Popen(args, start_new_session=True)  # its own process group
    except OSError as exc:
        print(f"ckpt-run: cannot start {args[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127

    def forward(signum: int, frame: FrameType | None) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, like a shell


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
