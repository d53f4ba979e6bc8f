"""The parallel verified read: CRC-32 runs combined across threads, every byte read once, damage anywhere caught."""

from __future__ import annotations

import logging
import os
import random
import zlib

import numpy as np
import pytest

from ckpt_sdk import Checkpointer, CorruptCheckpointError, _fileio, maybe_resume
from ckpt_sdk._fileio import combine_runs, crc32_combine, read_pieces


@pytest.mark.parametrize("split", [0, 1, 7, 4096, 99_999, 100_000])
def test_crc32_combine_matches_zlib_over_the_whole(split):
    data = random.Random(split).randbytes(100_000)
    head, tail = data[:split], data[split:]
    assert crc32_combine(zlib.crc32(head), zlib.crc32(tail), len(tail)) == zlib.crc32(data)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 KiB, so a file of a few hundred KiB is read by every thread in many runs."""
    monkeypatch.setattr(_fileio, "CHUNK", 4096)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_read_pieces_fills_every_destination_and_its_runs_give_the_file_crc(tmp_path, small_chunks, threads):
    data = random.Random(threads).randbytes(300_002)
    (tmp_path / "f").write_bytes(data)
    sizes = [0, 5, 70_000, 1, 130_000, 99_995]  # uneven pieces, split across thread boundaries
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    destinations = [bytearray(size) for size in sizes]
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        pieces = [(1 + offset, memoryview(dest)) for offset, dest in zip(offsets, destinations, strict=True)]
        runs = read_pieces(fd, pieces, threads)
    finally:
        os.close(fd)
    assert b"".join(destinations) == data[1:]
    assert len({offset for offset, _, _ in runs}) == len(runs)  # no byte range read twice
    assert combine_runs(zlib.crc32(data[:1]), 1, runs, len(data)) == zlib.crc32(data)


def test_read_pieces_refuses_a_short_file_and_combine_runs_a_gap(tmp_path, small_chunks):
    (tmp_path / "f").write_bytes(b"x" * 50_000)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            read_pieces(fd, [(0, memoryview(bytearray(60_000)))], 3)
        runs = read_pieces(fd, [(0, memoryview(bytearray(10_000))), (20_000, memoryview(bytearray(30_000)))], 2)
    finally:
        os.close(fd)
    with pytest.raises(CorruptCheckpointError, match="gap at byte 10000"):
        combine_runs(0, 0, runs, 50_000)


@pytest.mark.parametrize("where", [0.02, 0.3, 0.55, 0.8, 0.999])
def test_a_flipped_byte_in_any_threads_range_is_caught_fresh_and_in_place(tmp_path, small_chunks, where, caplog):
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=5, handle_sigterm=False)
    ckpt.save(1, {"a": np.full(40_000, 1.0), "b": np.full(50_000, 1.0)})
    ckpt.save(2, {"a": np.full(40_000, 2.0), "b": np.full(50_000, 2.0)})
    tensors = tmp_path / "step-000000000002" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    tensors.write_bytes(bytes(data))
    fresh: dict = {}
    in_place = {"a": np.zeros(40_000), "b": np.zeros(50_000)}
    with caplog.at_level(logging.WARNING, logger="ckpt_sdk"):
        assert maybe_resume(fresh, Checkpointer(tmp_path, handle_sigterm=False)) == 1
        assert maybe_resume(in_place, Checkpointer(tmp_path, handle_sigterm=False)) == 1
    for state in (fresh, in_place):
        assert np.all(state["a"] == 1.0) and np.all(state["b"] == 1.0)
    assert caplog.text.count("step-000000000002") >= 2


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 5 * 4096 + 17])
def test_block_checksums_combine_into_the_whole_file_crc(tmp_path, monkeypatch, size):
    monkeypatch.setattr(_fileio, "BLOCK", 4096)
    data = random.Random(size).randbytes(size)
    entry = _fileio.write_file(tmp_path / "f", [data[: size // 3], data[size // 3 :]])
    assert entry.crc32 == f"{zlib.crc32(data):08x}"
    blocks = [data[start : start + 4096] for start in range(0, size, 4096)]
    assert entry.blocks == (tuple(f"{zlib.crc32(b):08x}" for b in blocks) if len(blocks) > 1 else ())
    assert _fileio.FileEntry.from_json(entry.to_json()) == entry


def test_verify_blocks_reads_only_the_blocks_asked_for_and_catches_a_flip_in_them(tmp_path, monkeypatch):
    monkeypatch.setattr(_fileio, "BLOCK", 4096)
    data = bytearray(random.Random(1).randbytes(10 * 4096))
    entry = _fileio.write_file(tmp_path / "f", [bytes(data)])
    want = memoryview(bytearray(5000))  # bytes 20000..25000: blocks 4, 5 and 6; the header's block 0
    data[3 * 4096 + 7] ^= 1  # a flip in block 3: never read
    (tmp_path / "f").write_bytes(bytes(data))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        _fileio.verify_blocks(fd, entry, [(20000, want)], 100, tmp_path / "f")
        assert bytes(want) == bytes(data[20000:25000])
        data[6 * 4096 + 4000] ^= 1  # in block 6, outside the wanted bytes: still checked (the scratch part)
        (tmp_path / "f").write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch in block 6"):
            _fileio.verify_blocks(fd, entry, [(20000, want)], 100, tmp_path / "f")
    finally:
        os.close(fd)


def test_a_manifest_entry_with_a_wrong_block_count_is_malformed():
    with pytest.raises(ValueError, match="block"):
        _fileio.FileEntry.from_json({"size": 9000, "crc32": "00000000", "block": 4096, "blocks": ["00000000"] * 2})
