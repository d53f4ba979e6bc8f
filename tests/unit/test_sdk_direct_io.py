"""Async saves write their snapshot image with O_DIRECT, and fall back to the page cache where that is refused."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from ckpt_sdk import CheckpointConfigError, Checkpointer, _fileio, maybe_resume

TENSORS = "tensors.safetensors"


@pytest.fixture
def opens(monkeypatch):
    """The flags every tensor file was opened with, in order."""
    seen: list[int] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        if str(path).endswith(TENSORS) and flags & os.O_WRONLY:
            seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return seen


def state_of(step: int, sizes: tuple[int, ...]) -> dict:
    return {f"t{i}": np.full(size, float(step), dtype=np.float32) for i, size in enumerate(sizes)} | {"step": step}


def round_trip(tmp_path, sizes_by_step: dict[int, tuple[int, ...]], **options) -> dict[int, int]:
    """Save each step asynchronously (keep=2: the third save recycles the first one's files), check the last one
    loads back equal; return the inode of each step's tensor file."""
    ckpt = Checkpointer(tmp_path, keep=2, async_save=True, handle_sigterm=False, **options)
    inodes = {}
    for step, sizes in sizes_by_step.items():
        ckpt.save(step, state_of(step, sizes))
        ckpt.wait()
        inodes[step] = (tmp_path / f"step-{step:012d}" / TENSORS).stat().st_ino
    last = max(sizes_by_step)
    restored: dict = {}
    assert maybe_resume(restored, Checkpointer(tmp_path, handle_sigterm=False)) == last
    expected = state_of(last, sizes_by_step[last])
    assert restored.keys() == expected.keys()
    assert all(np.array_equal(restored[k], v) for k, v in expected.items() if k != "step")
    return inodes


def test_async_saves_write_with_o_direct_any_size_and_over_a_larger_recycled_file(tmp_path, opens):
    # 3 MB, then 1 byte short of 4 KiB blocks, then odd sizes written over step 1's recycled 3 MB file, which
    # must shrink to exactly the new size
    inodes = round_trip(tmp_path, {1: (750_000,), 2: (1023, 1), 3: (3, 5, 7)})
    assert inodes[3] == inodes[1]  # the same file, overwritten in place
    assert len(opens) == 3 and all(flags & os.O_DIRECT for flags in opens)
    size = (tmp_path / "step-000000000003" / TENSORS).stat().st_size
    assert size % 4096 and size < 4096


def test_an_image_of_many_direct_writes_round_trips(tmp_path, monkeypatch, opens):
    monkeypatch.setattr(_fileio, "DIRECT_CHUNK", 8192)  # 1 MB images: over a hundred direct writes each
    round_trip(tmp_path, {1: (250_000, 3), 2: (200_001,), 3: (262_144,)})
    assert len(opens) == 3 and all(flags & os.O_DIRECT for flags in opens)


def test_direct_io_false_writes_through_the_page_cache(tmp_path, opens):
    round_trip(tmp_path, {1: (1000,), 2: (10,)}, direct_io=False)
    assert opens and not any(flags & os.O_DIRECT for flags in opens)


def test_a_file_system_refusing_o_direct_at_open_gets_a_buffered_write(tmp_path, monkeypatch, opens):
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported (like tmpfs)")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    round_trip(tmp_path, {1: (100_000,), 2: (5,)})


def test_direct_writes_refused_at_write_fall_back_and_lose_nothing(tmp_path, monkeypatch, opens):
    real_write = os.write
    refused: list[int] = []

    def picky(fd, data):
        if fcntl_flags(fd) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "alignment not accepted")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", picky)
    round_trip(tmp_path, {1: (300_000,), 2: (70_000,)})
    assert len(refused) == 2  # each save tried one direct write, then wrote through the page cache
    assert [bool(flags & os.O_DIRECT) for flags in opens] == [True, False, True, False]


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_direct_io_is_validated_at_construction(tmp_path):
    with pytest.raises(CheckpointConfigError, match="direct_io"):
        Checkpointer(tmp_path, direct_io="yes", handle_sigterm=False)  # type: ignore[arg-type]
