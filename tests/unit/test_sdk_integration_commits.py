"""Commits of directories a framework writes (ckpt_sdk.integrations._commit): complete only with a valid marker
whose every file matches; rotation never deletes the newest complete one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ckpt_sdk import CorruptCheckpointError, FencedError
from ckpt_sdk._store import Fence, Store
from ckpt_sdk.integrations._commit import MARKER, commit, fsync_tree, newest_complete, rotate, verify

PATTERN = re.compile(r"checkpoint-(\d+)")
ME = Fence("uid", 1.0, 0)


def written(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    (path / "sub").mkdir(parents=True)
    (path / "model.bin").write_bytes(bytes([step % 256]) * 1000)
    (path / "sub" / "optimizer.bin").write_bytes(b"o" * (100 + step))
    fsync_tree(path)
    if complete:
        commit(path, step, Store(root), ME)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    Store(tmp_path).claim(ME)
    return tmp_path


def test_only_a_complete_checkpoint_is_resumed_and_damage_is_skipped(root, caplog):
    written(root, 10)
    newest = written(root, 20)
    written(root, 30, complete=False)  # a save killed before its commit
    assert newest_complete(root, PATTERN) == newest and "checkpoint-30: no ckpt-commit.json" in caplog.text
    (newest / "sub" / "optimizer.bin").write_bytes(b"x" * 120)  # same size, other bytes
    assert newest_complete(root, PATTERN) == root / "checkpoint-10"
    assert newest_complete(root, PATTERN, full=False) == newest  # sizes only: not seen
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        verify(newest)
    data = json.loads((newest / MARKER).read_text())
    data["files"]["../outside"] = {"size": 1, "crc32": "00000000"}
    (newest / MARKER).write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint"):
        verify(newest)


def test_rotation_keeps_the_newest_complete_and_removes_dead_saves_older_than_it(root):
    for step in (10, 20):
        written(root, step)
    written(root, 25, complete=False)  # died
    written(root, 30)
    written(root, 40, complete=False)  # maybe still being written: newer than the newest complete
    gone = rotate(root, PATTERN, keep=1, protect=root / "checkpoint-10")
    assert sorted(p.name for p in gone) == ["checkpoint-20", "checkpoint-25"]
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-30", "checkpoint-40"]


def test_a_fenced_out_writer_never_commits(root):
    Store(root).claim(Fence("uid", 1.0, 1))  # the next attempt took over
    path = written(root, 10, complete=False)
    with pytest.raises(FencedError):
        commit(path, 10, Store(root), ME)
    assert not (path / MARKER).exists()
