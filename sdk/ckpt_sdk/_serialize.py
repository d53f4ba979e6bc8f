"""Checkpoint file format: `state.json` (structure and scalars) and `tensors.safetensors` (raw arrays).

The tensor file follows the safetensors layout (u64 header length, JSON header, contiguous data), so it can be
inspected with the `safetensors` package, but it is written and read here with the standard library only.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from . import _tensors as T
from ._errors import CorruptCheckpointError
from ._storage import CheckpointInfo, _Checksum, read_exact, write_file
from ._tree import Encoder

STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
MAX_HEADER = 100 << 20


class Snapshot:
    """An encoded state: the JSON tree plus host-memory views of every tensor."""

    def __init__(self, state: Any) -> None:
        encoder = Encoder()
        self.tree = encoder.encode(state)
        # Largest item size first keeps every tensor aligned to its element size in the file.
        self.tensors = sorted(encoder.tensors.items(), key=lambda kv: -T.DTYPES[kv[1].dtype][0])

    @property
    def nbytes(self) -> int:
        return sum(raw.nbytes for _, raw in self.tensors)

    def detach(self, arena: bytearray | None = None) -> bytearray:
        """Copy tensor bytes into `arena` (reused across saves when large enough) so training may continue."""
        size = self.nbytes
        if arena is None or len(arena) < size:
            arena = bytearray(size)
        view, offset = memoryview(arena), 0
        copied = []
        for name, raw in self.tensors:
            dst = view[offset : offset + raw.nbytes]
            dst[:] = raw.data
            copied.append((name, T.RawTensor(raw.dtype, raw.shape, dst, arena)))
            offset += raw.nbytes
        self.tensors = copied
        return arena

    def write(self, directory: Path) -> dict[str, Any]:
        """Write both files durably; return their manifest entries."""
        header: dict[str, Any] = {"__metadata__": {"format": "ckpt-sdk"}}
        offset = 0
        for name, raw in self.tensors:
            header[name] = {"dtype": raw.dtype, "shape": raw.shape, "data_offsets": [offset, offset + raw.nbytes]}
            offset += raw.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        files = {STATE_FILE: write_file(directory / STATE_FILE, [json.dumps(self.tree).encode()])}
        parts: list[memoryview | bytes] = [struct.pack("<Q", len(head)), head]
        parts += [raw.data for _, raw in self.tensors]
        files[TENSOR_FILE] = write_file(directory / TENSOR_FILE, parts)
        return files


def _allocate(dtype: str, shape: list[int], kind: str) -> tuple[Any, memoryview]:
    """A fresh, owned array for one tensor and a writable byte view of it."""
    if kind == "torch":
        import torch

        tensor = torch.empty(shape, dtype=getattr(torch, T.DTYPES[dtype][2]))
        raw = T.from_torch(tensor)
        return tensor, raw.data
    import numpy as np

    np_name = T.DTYPES[dtype][1]
    if np_name is None:
        raise CorruptCheckpointError(f"dtype {dtype} stored as numpy")
    array = np.empty(shape, dtype=np_name)
    return array, memoryview(array.reshape(-1).view(np.uint8).data) if array.size else memoryview(bytearray())


def _tensor_kinds(tree: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(tree, dict):
        if "__ckpt_tensor__" in tree:
            out[tree["__ckpt_tensor__"]] = tree["kind"]
        else:
            for v in tree.values():
                _tensor_kinds(v, out)
    elif isinstance(tree, list):
        for v in tree:
            _tensor_kinds(v, out)
    return out


def load(info: CheckpointInfo) -> tuple[Any, dict[str, Any]]:
    """Read and verify a checkpoint: (tree, tensors by name). Nothing is returned unless every checksum matches."""
    files = info.manifest["files"]
    if set(files) != {STATE_FILE, TENSOR_FILE}:
        raise CorruptCheckpointError(f"{info.path}: unexpected files {sorted(files)}")
    tree = json.loads(_read_small(info.path / STATE_FILE, files[STATE_FILE]))
    kinds = _tensor_kinds(tree, {})
    meta = files[TENSOR_FILE]
    path = info.path / TENSOR_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing") from None
    try:
        if os.fstat(fd).st_size != meta["size"]:
            raise CorruptCheckpointError(f"{path}: size {os.fstat(fd).st_size} != manifest {meta['size']}")
        checksum = _Checksum()
        try:
            prefix = bytearray(8)
            read_exact(fd, memoryview(prefix), checksum)
            (head_len,) = struct.unpack("<Q", prefix)
            if head_len > min(MAX_HEADER, meta["size"] - 8):
                raise CorruptCheckpointError(f"{path}: bad header length")
            head = bytearray(head_len)
            read_exact(fd, memoryview(head), checksum)
            header = json.loads(head)
            header.pop("__metadata__", None)
            tensors = {}
            expected = 0
            for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = spec["data_offsets"]
                dtype, shape = spec["dtype"], [int(d) for d in spec["shape"]]
                count = 1
                for d in shape:
                    count *= d
                if dtype not in T.DTYPES or start != expected or end - start != count * T.DTYPES[dtype][0]:
                    raise CorruptCheckpointError(f"{path}: bad header entry {name!r}")
                value, view = _allocate(dtype, shape, kinds.get(name, "numpy"))
                read_exact(fd, view, checksum)
                tensors[name] = value
                expected = end
            if 8 + head_len + expected != meta["size"]:
                raise CorruptCheckpointError(f"{path}: data size does not match its header")
        finally:
            crc = checksum.result()
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{path}: unreadable header ({exc})") from None
    finally:
        os.close(fd)
    if crc != meta["crc32"]:
        raise CorruptCheckpointError(f"{path}: checksum mismatch")
    missing = set(kinds) - set(tensors)
    if missing:
        raise CorruptCheckpointError(f"{path}: tensors missing: {sorted(missing)[:5]}")
    return tree, tensors


def _read_small(path: Path, meta: dict[str, Any]) -> bytes:
    import zlib

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing") from None
    if len(data) != meta["size"] or f"{zlib.crc32(data):08x}" != meta["crc32"]:
        raise CorruptCheckpointError(f"{path}: size or checksum mismatch")
    return data
