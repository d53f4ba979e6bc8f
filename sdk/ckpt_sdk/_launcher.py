"""ckpt-run: run a startup command in its own process group and forward SIGTERM/SIGINT to all of it.

A shell script as PID 1 does not pass SIGTERM on to Python; `ckpt-run -- bash start.sh` does. ckpt-run is a child
subreaper: it exits only after every process of the command has exited, so a trainer whose shell parent died on
SIGTERM still finishes its checkpoint. The exit code is the command's (128+N if killed by signal N); if the command
was killed by the forwarded signal, the code of the last descendant to exit is returned instead (the trainer's).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

USAGE = "usage: ckpt-run [--] COMMAND [ARG...]"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if args else 2
    _become_subreaper()
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []  # signals that arrived before the child existed

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
            return
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:  # before the child starts: a SIGTERM during its start is never lost
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(args, start_new_session=True)  # its own process group
    except OSError as exc:
        print(f"ckpt-run: cannot start {args[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    for signum in pending:
        forward(signum, None)
    code = child.wait()
    result = 128 - code if code < 0 else code  # killed by signal N -> 128 + N, like a shell
    while True:  # reap orphaned descendants until none is left
        try:
            _pid, status = os.wait()
        except ChildProcessError:
            return result
        if code < 0:
            result = os.waitstatus_to_exitcode(status)
            result = 128 - result if result < 0 else result


def _become_subreaper() -> None:
    PR_SET_CHILD_SUBREAPER = 36
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans are reaped by init instead
        pass


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
