"""Named fault points on the save path, like etcd's gofail: a no-op unless a test harness installs a hook.

Every write, fsync, close, manifest, rename, recycle, prune and fence step calls `point(name)` first, so a
harness can crash the process (SIGKILL), or raise EIO or ENOSPC, exactly between two syscalls of a save.
"""

from __future__ import annotations

from collections.abc import Callable

POINTS = (
    "fence.write", "fence.rename", "temp.mkdir", "recycle.rename", "file.open", "file.write", "file.fsync",
    "file.close", "manifest.write", "dir.fsync", "commit.check", "commit.rename", "resave.rename", "prune.rename",
    "shard.marker",
)

_hook: Callable[[str], None] | None = None


def point(name: str) -> None:
    """Called before the step `name` of a save; raises or kills only under a harness."""
    if _hook is not None:
        _hook(name)


def install(hook: Callable[[str], None] | None) -> None:
    """Install (or with None remove) the harness hook."""
    global _hook
    _hook = hook
