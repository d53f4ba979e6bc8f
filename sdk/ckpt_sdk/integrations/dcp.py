"""ckpt_sdk checkpoints read by `torch.distributed.checkpoint.load` (DCP), on any number of ranks:

    import torch.distributed.checkpoint as dcp
    from ckpt_sdk.integrations.dcp import CheckpointReader
    dcp.load({"model": model_state}, storage_reader=CheckpointReader(os.environ["CKPT_DIR"]))

The reader serves every tensor of the newest complete checkpoint (or the step directory given): DTensor slices with
their global shapes and offsets, so DCP's own planner reshards them onto the current mesh; whole tensors as one
chunk. Keys are the state's paths joined by dots, as DCP flattens them (`model.0.weight`). Every file is verified
whole (its CRC-32) before any of its bytes reach a tensor. Values that are not tensors are not served (DCP would
unpickle them): load those with the Checkpointer. Nothing here unpickles anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .. import _serialize
from .. import _tensors as T
from .._errors import CheckpointError
from .._manifest import MANIFEST, read_manifest, shard_prefix
from .._ranks import Ranks
from .._store import CheckpointInfo, Store
from .._tree import DTENSOR, GLOBAL_SHAPE, OFFSET, SHAPE, tensor_nodes

__all__ = ["CheckpointReader"]


@dataclass(frozen=True)
class _Stored:
    """Where one served chunk is: the saved rank whose file holds it, and its name there."""

    rank: int
    name: str


class CheckpointReader(StorageReader):
    """A DCP `StorageReader` over a ckpt_sdk checkpoint directory (a job's directory: its newest complete
    checkpoint; or one `step-N` directory)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self.info: CheckpointInfo | None = None
        self.storage: dict[MetadataIndex, _Stored] = {}
        self._header_cache: dict[int, dict[str, tuple[str, list[int]]]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self.info, self.storage, self._header_cache = None, {}, {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        path = Path(checkpoint_id)
        return (path / MANIFEST).is_file() or bool(Store(path).list())

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every tensor's global size, dtype and saved chunks, from the checkpoint's state trees."""
        info = self._checkpoint()
        entries: dict[str, TensorStorageMetadata] = {}
        for rank in range(info.world_size):
            tree = _serialize.read_tree(info, self._prefix(rank))
            for name, node in tensor_nodes(tree):
                self._add(entries, rank, name, node)
        return Metadata(state_dict_metadata=dict(entries), storage_data=dict(self.storage))

    def _add(self, entries: dict[str, TensorStorageMetadata], rank: int, name: str, node: Mapping[str, Any]) -> None:
        """One saved chunk: a DTensor slice, or rank 0's whole tensor (DCP keeps one copy of replicated data)."""
        if node["kind"] == DTENSOR:
            size, offset, shape = list(node[GLOBAL_SHAPE]), list(node[OFFSET]), list(node[SHAPE])
        elif rank == 0 and "#" not in name:  # ("#": a second tensor under one path, which DCP cannot name)
            size = shape = self._headers(rank)[name][1]
            offset = [0] * len(size)
        else:
            return
        fqn = name.replace("/", ".")
        if fqn not in entries:
            dtype = getattr(torch, T.DTYPES[self._headers(rank)[name][0]][2])
            entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size), [])
        index = MetadataIndex(fqn, torch.Size(offset))
        if index not in self.storage:  # a replicated DTensor's copies: the first rank's
            entries[fqn].chunks.append(ChunkStorageMetadata(torch.Size(offset), torch.Size(shape)))
            self.storage[index] = _Stored(rank, name)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Each file the plan needs, read and verified whole, then the requested slices copied into place."""
        info = self._checkpoint()
        by_rank: dict[int, list[ReadItem]] = {}
        for item in plan.items:
            by_rank.setdefault(self.storage[item.storage_index].rank, []).append(item)
        for rank, items in sorted(by_rank.items()):
            _, tensors = _serialize.load(info, prefix=self._prefix(rank))
            for item in items:
                source = torch.as_tensor(tensors[self.storage[item.storage_index].name])  # (numpy arrays too)
                for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                    source = source.narrow(dim, start, length)
                target = planner.resolve_tensor(item).detach()
                target.copy_(source)
                planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    # -- the checkpoint ------------------------------------------------------------------------------
    def _checkpoint(self) -> CheckpointInfo:
        if self.info is None:
            if (self.path / MANIFEST).is_file():
                manifest = read_manifest(self.path)
                self.info = CheckpointInfo(manifest.step, self.path, manifest)
            else:
                self.info = self._newest_everywhere()
        return self.info

    def _newest_everywhere(self) -> CheckpointInfo:
        """The newest complete checkpoint that every rank sees (a save committed between two ranks' listings must
        not make them read different steps): the oldest of the ranks' newest."""
        found = {info.step: info for info in Store(self.path).list()}
        newest = max(found, default=-1)
        agreed = -Ranks.detect().reduce_max([-newest])[0]
        if agreed < 0 or agreed not in found:
            raise CheckpointError(f"{self.path}: no complete checkpoint every rank sees (newest here: {newest})")
        return found[agreed]

    def _prefix(self, rank: int) -> str:
        return shard_prefix(rank) if self._checkpoint().manifest.sharded else ""

    def _headers(self, rank: int) -> dict[str, tuple[str, list[int]]]:
        if rank not in self._header_cache:
            self._header_cache[rank] = _serialize.header(self._checkpoint(), self._prefix(rank))
        return self._header_cache[rank]
