"""Run a training script with a fault hook installed: `with_faults.py POINT N SCRIPT` SIGKILLs the process at the
N-th hit of the SDK fault point POINT (see ckpt_sdk._faults), e.g. between a framework's save and its commit."""

from __future__ import annotations

import os
import runpy
import signal
import sys

from ckpt_sdk import _faults


def main() -> None:
    point, nth, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    hits = [0]

    def hook(name: str) -> None:
        if name == point:
            hits[0] += 1
            if hits[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    _faults.install(hook)
    sys.argv = [script, *sys.argv[4:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
