"""Restoring a state from the newest checkpoint that verifies: its own directory's, or a warm start's.

Both go through one candidate listing (`Store.scan().candidates()`): newest first, damaged ones skipped with a log
line and never loaded, a newer format an error. Damage with nothing to fall back to is an error, never a silent
start from step 0.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _reshard, _serialize, _tree
from ._coordinate import Coordinator
from ._errors import CheckpointError, CorruptCheckpointError
from ._manifest import MANIFEST, read_manifest, shard_prefix
from ._ranks import Ranks
from ._store import CheckpointInfo, Store

log = logging.getLogger("ckpt_sdk")

State = MutableMapping[str, Any]


@dataclass(frozen=True)
class Source:
    """Where a resume reads from: the checkpoints to try (newest first), and how to name them in errors."""

    candidates: list[CheckpointInfo]
    where: str
    explicit: bool = False  # one checkpoint the user named: its damage is an error, not a fallback
    own: bool = True  # this job's own directory (damage found is remembered, so it is never recycled)


def own_directory(store: Store) -> Source | None:
    """This job's checkpoints; None if it has none at all (then a warm start may happen)."""
    listing = store.scan()
    if listing.empty:
        return None
    return Source(listing.candidates(), f"{store.root} ({listing.names()})")


def warm_start(source: Path) -> Source:
    """CKPT_RESUME_FROM: one step directory, or another job's directory (its newest complete checkpoint)."""
    where = f"CKPT_RESUME_FROM={source}"
    if (source / MANIFEST).exists() or source.name.startswith("step-"):
        if not source.is_dir():
            raise CheckpointError(f"{where}: no such checkpoint (was it pruned?)")
        try:
            manifest = read_manifest(source)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"CKPT_RESUME_FROM: {exc}") from None
        return Source([CheckpointInfo(manifest.step, source, manifest)], where, explicit=True, own=False)
    listing = Store(source).scan()
    if listing.empty:
        raise CheckpointError(f"{where} has no checkpoint to warm-start from")
    return Source(listing.candidates(), where, own=False)


def restore_from(source: Source, state: State, coordinator: Coordinator, bad: set[int]) -> CheckpointInfo:
    """Load the first candidate that verifies on every rank into `state`; steps found damaged are added to `bad`
    (own directory only). Raises CorruptCheckpointError if none does."""
    clobbered: set[int] = set()  # targets a damaged file was read into before its checksum failed
    problems: list[str] = []
    ranks = coordinator.ranks
    for info in source.candidates:
        written: set[int] = set()
        problem = _try_load(info, state, written, coordinator)
        if problem is None:
            if clobbered - written:
                raise CorruptCheckpointError(
                    f"a damaged checkpoint was partly read into the state and {info.path.name} does not overwrite "
                    f"all of it; restart the process to load {info.path.name} ({'; '.join(problems)})")
            return info
        if ranks.sharded and not ranks.torch:
            raise CorruptCheckpointError(
                f"rank {ranks.rank} cannot load its shard of {info.path} ({problem}); without torch.distributed "
                "the ranks cannot agree on an older checkpoint: move it aside to resume from the one before "
                "(`python -m ckpt_sdk verify DIR` shows the damage)")
        clobbered |= written
        problems.append(f"{info.path.name}: {problem}")
        if source.own and isinstance(problem, CorruptCheckpointError):
            bad.add(info.step)
        if not source.explicit:
            log.warning("ckpt: checkpoint %s is unusable (%s); falling back to an older one", info.path, problem)
    raise CorruptCheckpointError(
        f"no loadable checkpoint in {source.where}: {'; '.join(problems) or 'none'}. Refusing to start over and lose "
        "that training; `python -m ckpt_sdk verify DIR` shows the damage. Move the damaged checkpoints aside "
        "to resume from an older one, or start fresh on purpose (kubectl ckpt restart --fresh).")


def _try_load(info: CheckpointInfo, state: State, written: set[int], coordinator: Coordinator
              ) -> BaseException | None:
    """Load one candidate into `state` if every rank can; the problem that prevented it, or None."""
    problem: BaseException | None = None
    tree: Any = None
    tensors: dict[str, Any] = {}
    try:
        tree, tensors = _load_part(info, state, written, coordinator.ranks)
        if not isinstance(tree, dict):
            raise CorruptCheckpointError(f"{info.path}: holds no state dict")
    except (CorruptCheckpointError, OSError) as exc:
        problem = exc
    if not coordinator.loaded_everywhere(problem is None) and problem is None:
        problem = CorruptCheckpointError(f"{info.path}: another rank's shard of it is unusable")
    if problem is None:
        _tree.restore(state, tree, functools.partial(_loaded_tensor, tensors))
    return problem


def _loaded_tensor(tensors: dict[str, Any], name: str, kind: str) -> Any:
    return tensors[name]


def _load_part(info: CheckpointInfo, state: State, written: set[int], ranks: Ranks) -> tuple[Any, dict[str, Any]]:
    """This rank's part of a checkpoint: the whole of an unsharded one, else its own shard plus the replicated keys
    from rank 0's (matched by whole top-level key: `model` is not `model/ema`); resharded (see _reshard) when the
    world size changed or DTensors are involved."""
    own = shard_prefix(ranks.rank) if info.manifest.sharded and ranks.rank < info.world_size else ""
    tree = _serialize.read_tree(info, own) if ranks.rank < info.world_size else None
    found = _tree.tensor_targets(state, tree) if tree is not None else {}
    if tree is None or _reshard.needs_resharding(info, ranks, tree, found):
        return _reshard.load(info, state, written, ranks)

    def targets(_tree: Any) -> dict[str, Any]:
        return found  # (computed once: a Stateful's state_dict() is asked for once per load)

    if info.world_size == 1:
        return _serialize.load(info, targets, written, tree=tree)
    tree, tensors = _serialize.load(info, targets, written, own, tree)
    shared = set(info.manifest.replicated)
    if not shared or ranks.rank == 0:
        return tree, tensors

    def shared_targets(tree0: Any) -> dict[str, Any]:
        return _tree.tensor_targets({k: state[k] for k in shared if k in state},
                                    {k: v for k, v in tree0.items() if k in shared})

    tree0, tensors0 = _serialize.load(info, shared_targets, written, shard_prefix(0))
    names = {name for key in shared if key in tree0 for name in _tree.tensor_names(tree0[key])}
    tree = {**{key: value for key, value in tree0.items() if key in shared}, **tree}
    return tree, {**{name: t for name, t in tensors0.items() if name in names}, **tensors}
