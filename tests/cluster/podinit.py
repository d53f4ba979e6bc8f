"""Runs one container of the local test kubelet like a container runtime would.

In a private mount namespace it bind-mounts the pod's volumes at their mountPath, then forks the container
command as PID 1 of a new PID namespace (so, as in a real container, SIGTERM reaches it only if it handles it).
It writes the child's host PID to `pidfile` and exits with the child's status (128+N when killed by signal N).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        print(f"podinit: unshare failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 126
    _mount("--make-rprivate", "/")
    for m in spec["mounts"]:
        src, dst = m["source"], m["target"]
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)  # the mount point (an empty directory) must exist on the host
        elif not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        _mount("--bind", src, dst)
        if m.get("readOnly"):
            _mount("-o", "remount,bind,ro", dst)
    if libc.unshare(CLONE_NEWPID) != 0:  # the next child is PID 1 of a new PID namespace
        print(f"podinit: unshare failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 126
    pid = os.fork()
    if pid == 0:  # PID 1 of the new PID namespace
        try:
            _mount("-t", "proc", "proc", "/proc")
            os.chdir(spec["workingDir"] or "/")
            os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as exc:
            print(f"podinit: cannot start {spec['argv'][0]!r}: {exc}", file=sys.stderr, flush=True)
            os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
        except subprocess.CalledProcessError as exc:
            print(f"podinit: {exc}", file=sys.stderr, flush=True)
            os._exit(126)
    with open(spec["pidfile"] + ".tmp", "w") as f:
        f.write(str(pid))
    os.rename(spec["pidfile"] + ".tmp", spec["pidfile"])
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main())
