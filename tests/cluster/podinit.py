"""Runs one container of the local test kubelet like a container runtime would.

In a private mount and UTS namespace (the pod's hostname) it bind-mounts the pod's volumes at their mountPath and
the pod's /etc/hosts, then forks the container
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
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _shadow(directory: str, stash: str) -> None:
    """Replace `directory`, in this mount namespace only, by a tmpfs holding bind mounts of its entries, so a
    mount point can be created in it without touching the host's directory (a runtime gives each container its
    own /dev the same way)."""
    os.makedirs(stash, exist_ok=True)
    _mount("--rbind", directory, stash)
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", directory)
    for entry in os.scandir(stash):
        target = os.path.join(directory, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(target)
            _mount("--rbind", entry.path, target)
        else:
            open(target, "a").close()
            _mount("--bind", entry.path, target)


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS | CLONE_NEWUTS) != 0:
        print(f"podinit: unshare failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 126
    hostname = spec.get("hostname", "").encode()
    if hostname and libc.sethostname(hostname, len(hostname)) != 0:  # the pod's own hostname, as in a container
        print(f"podinit: sethostname failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 126
    _mount("--make-rprivate", "/")
    for m in spec["mounts"]:
        src, dst = m["source"], m["target"]
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)  # the mount point (an empty directory) must exist on the host
        elif not os.path.exists(dst):
            parent = os.path.dirname(dst)
            if os.path.isdir(parent):  # e.g. /dev/termination-log: never create it in the host's /dev
                _shadow(parent, os.path.join(spec["dir"], "shadow" + parent.replace("/", "_")))
            else:
                os.makedirs(parent, exist_ok=True)
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
