"""Loading a checkpoint on another number of ranks than wrote it, and into DTensors (FSDP2, tensor parallel).

A DTensor is saved as the slice each rank holds, with the global shape and the slice's offset (see _tree). A load
reads, for every DTensor of the state it fills, the saved slices that overlap the part this rank holds, from
whichever ranks saved them: N ranks to M, up or down, or to full tensors on one rank. Only the rows needed are read:
straight into the DTensor's memory when they are one contiguous run of it (on the CPU, same dtype), else into fresh
memory, then copied. Every block read is verified (a file's block CRC-32s; a file without them is read and verified
whole); a part no saved slice covers is an error, and so is any other problem with the checkpoint's contents (a
CorruptCheckpointError, which every rank votes on, so none is left waiting in a collective).

What is not a DTensor cannot be split or joined, so on a change of world size:
- keys named in `replicated` come from rank 0's shard, as always;
- an `RNGState` is restored on the ranks that existed, and re-seeded from the step and the rank (logged) on new ones;
- everything else must be the same on every rank that saved it (a count of samples seen, an optimizer's step): it
  is taken from the rank's own shard, or rank 0's on a new rank; a value that differs between the saved ranks is a
  CheckpointConfigError naming it (tensor contents are not compared: that would read every rank's shard).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import _serialize
from . import _tensors as T
from ._errors import CheckpointConfigError, CorruptCheckpointError
from ._manifest import shard_prefix
from ._ranks import Ranks
from ._rng import MARKER, RESEED, derived_seed
from ._store import CheckpointInfo
from ._tree import DTENSOR, GLOBAL_SHAPE, OFFSET, SHAPE, TENSOR_KEY, tensor_kinds, tensor_nodes, tensor_targets

log = logging.getLogger("ckpt_sdk")
STATEFUL_KEY = "__ckpt_stateful__"
Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape) in the global tensor


@dataclass(frozen=True)
class Slice:
    """One saved slice of a DTensor: in which rank's file, and where it sits in the global tensor."""

    rank: int
    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass
class Destination:
    """The part of one tensor this rank fills: `local` (allocated at the first slice when None) holds global box
    `offset`+`shape`; `result` is what the restored state holds (the DTensor itself)."""

    name: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    local: Any = None
    result: Any = None
    covered: int = 0

    def overlap(self, piece: Slice) -> Box | None:
        """The global box both this destination and the slice cover, or None (an empty slice overlaps nothing)."""
        low = tuple(max(a, b) for a, b in zip(self.offset, piece.offset, strict=True))
        high = tuple(min(a + n, b + m) for a, n, b, m in zip(self.offset, self.shape, piece.offset, piece.shape,
                                                              strict=True))
        if any(lo >= hi for lo, hi in zip(low, high, strict=True)) or len(low) != len(self.shape):
            return None if self.shape or piece.shape else ((), ())
        return low, tuple(hi - lo for lo, hi in zip(low, high, strict=True))


def needs_resharding(info: CheckpointInfo, ranks: Ranks, tree: Any, targets: Mapping[str, Any]) -> bool:
    """A load goes through here when the world size changed, or DTensors are saved or to be filled (`targets`: what
    the state holds for each of the tree's tensors, see tensor_targets)."""
    if info.world_size != ranks.world_size or DTENSOR in tensor_kinds(tree).values():
        return True
    return any(T.is_dtensor(target) for target in targets.values())


def load(info: CheckpointInfo, state: Mapping[str, Any], written: set[int], ranks: Ranks) -> tuple[Any, dict[str, Any]]:
    """This rank's tree and tensors of a checkpoint saved by `info.world_size` ranks (see the module)."""
    try:
        return _load(info, state, written, ranks)
    except CheckpointConfigError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:  # shapes that do not fit, on one rank
        problem = f"{type(exc).__name__}: {exc}"
        raise CorruptCheckpointError(f"{info.path}: cannot load it on this mesh ({problem})") from None


def _load(info: CheckpointInfo, state: Mapping[str, Any], written: set[int], ranks: Ranks
          ) -> tuple[Any, dict[str, Any]]:
    saved = info.world_size
    trees = {rank: _serialize.read_tree(info, _prefix(info, rank)) for rank in range(saved)}
    own = ranks.rank if ranks.rank < saved else None
    replicated = set(info.manifest.replicated)
    if saved != ranks.world_size:
        _check_same_everywhere(info, trees, replicated, ranks.world_size)
    tree = dict(trees[0 if own is None else own])
    tree.update({key: value for key, value in trees[0].items() if key in replicated})
    if own is None:
        tree = _reseeded(tree, info.step, ranks.rank)
    targets = tensor_targets(state, tree)
    destinations = _destinations(tree, targets)
    slices = _slices(trees, destinations)
    sources = {rank for name in destinations for rank in slices_needed(destinations[name], slices.get(name, []))}
    value_source = 0 if own is None else own
    sources |= {value_source} | ({0} if replicated else set())
    values: dict[str, Any] = {}
    for rank in sorted(sources):
        wanted = _value_names(rank, value_source, trees[rank], replicated, destinations)
        loaded = _load_file(info, rank, trees[rank], destinations, slices, written,
                            {name: targets.get(name) for name in wanted})
        values.update({name: tensor for name, tensor in loaded.items() if name in wanted})
    for destination in destinations.values():
        _check_covered(info, destination)
        values[destination.name] = destination.result if destination.result is not None else destination.local
    return tree, values


def slices_needed(destination: Destination, slices: list[Slice]) -> set[int]:
    """The saved ranks whose slices overlap this destination."""
    return {piece.rank for piece in slices if destination.overlap(piece) is not None}


def _prefix(info: CheckpointInfo, rank: int) -> str:
    return shard_prefix(rank) if info.manifest.sharded else ""


def _destinations(tree: Any, targets: Mapping[str, Any]) -> dict[str, Destination]:
    """What this rank fills: each saved DTensor (into the state's DTensor, a full tensor, or a new full tensor),
    and each saved whole tensor whose target is a DTensor (a consolidated checkpoint into a sharded model)."""
    out = {}
    for name, node in tensor_nodes(tree):
        target = targets.get(name)
        if node["kind"] != DTENSOR and not T.is_dtensor(target):
            continue
        global_shape = tuple(int(d) for d in node.get(GLOBAL_SHAPE) or ())
        if T.is_dtensor(target):
            shape, offset, local = T.dtensor_layout(target)
            if node["kind"] == DTENSOR and tuple(shape) != global_shape:
                raise CheckpointConfigError(f"state/{name}: saved with global shape {list(global_shape)}, the state "
                                            f"to load holds {shape}")
            out[name] = Destination(name, tuple(offset), tuple(local.shape), local, target)
        elif target is not None and T.is_torch_tensor(target) and tuple(target.shape) == global_shape:
            out[name] = Destination(name, (0,) * len(global_shape), global_shape, target, target)
        else:
            out[name] = Destination(name, (0,) * len(global_shape), global_shape)
    return out


def _slices(trees: Mapping[int, Any], destinations: Mapping[str, Destination]) -> dict[str, list[Slice]]:
    """Every saved slice of the tensors this rank fills; a replicated DTensor's copies once (the first rank's)."""
    out: dict[str, list[Slice]] = {}
    for rank, tree in sorted(trees.items()):
        for name, node in tensor_nodes(tree):
            destination = destinations.get(name)
            if destination is None:
                continue
            if node["kind"] == DTENSOR:
                piece = Slice(rank, tuple(int(o) for o in node[OFFSET]), tuple(int(d) for d in node[SHAPE]))
            elif rank == 0 or len(trees) == 1:  # a whole tensor: it covers the global tensor
                piece = Slice(rank, (0,) * len(destination.shape), _global_shape(destination))
            else:
                continue
            known = out.setdefault(name, [])
            if all((p.offset, p.shape) != (piece.offset, piece.shape) for p in known):
                known.append(piece)
    return out


def _global_shape(destination: Destination) -> tuple[int, ...]:
    result = destination.result
    return tuple(int(d) for d in result.shape) if result is not None else destination.shape


@dataclass(frozen=True)
class _Wanted:
    """What a load reads of one saved slice: `rows` of `piece`, for `destination`, straight `into` its memory."""

    piece: Slice
    rows: Slice
    destination: Destination
    into: Any

    @property
    def request(self) -> _serialize.Rows:
        if not self.rows.shape:
            return _serialize.Rows(self.destination.name, into=self.into)
        return _serialize.Rows(self.destination.name, self.rows.offset[0] - self.piece.offset[0],
                               self.rows.shape[0], self.into)


def _load_file(info: CheckpointInfo, rank: int, tree: Any, destinations: Mapping[str, Destination],
               slices: Mapping[str, list[Slice]], written: set[int], values: dict[str, Any]) -> dict[str, Any]:
    """Read one saved rank's file: of each slice, the rows this rank needs (straight into its memory when they are
    one contiguous run of it, else into fresh memory, then copied), and the whole `values` tensors (into the given
    targets where they fit); verified block by block (whole, for a file without block checksums). Returns the value
    tensors read."""
    wanted: dict[str, _Wanted] = {}
    for name, pieces in slices.items():
        for piece in pieces:
            box = destinations[name].overlap(piece) if piece.rank == rank else None
            if box is not None:
                rows = _rows_of(piece, box)
                wanted[name] = _Wanted(piece, rows, destinations[name], _view_of(destinations[name], rows))
    # (a view is a new object: what it touches is its owner)
    written |= {id(w.destination.result) for w in wanted.values() if w.into is not None}
    written |= {id(target) for target in values.values()}
    loaded = _serialize.load_rows(info, _prefix(info, rank), tree, [w.request for w in wanted.values()] +
                                  [_serialize.Rows(name, into=target) for name, target in values.items()])
    if loaded is None:  # no block checksums: the whole file, verified whole (slices into fresh memory)
        _, whole = _serialize.load(info, lambda _tree: values, set(), _prefix(info, rank), tree)
        loaded = {name: _rows_in(tensor, wanted[name]) if name in wanted else tensor for name, tensor in whole.items()}
    for name, want in wanted.items():
        if tuple(loaded[name].shape) != want.rows.shape:
            raise CorruptCheckpointError(f"{info.path}: rank {rank}'s slice of {name} does not have the shape its "
                                         f"state says ({list(want.piece.shape)})")
        box = want.destination.overlap(want.rows)
        if loaded[name] is not want.into and box is not None:  # (not read in place: another device or dtype)
            _copy_overlap(want.destination, want.rows, loaded[name], box)
        want.destination.covered += math.prod(box[1]) if box is not None else 0
    return {name: tensor for name, tensor in loaded.items() if name not in wanted}


def _rows_of(piece: Slice, box: Box) -> Slice:
    """The rows of a saved slice that hold `box` (all of a 0-d one): what a load reads of it."""
    if not piece.shape:
        return piece
    return Slice(piece.rank, (box[0][0], *piece.offset[1:]), (box[1][0], *piece.shape[1:]))


def _rows_in(whole: Any, want: _Wanted) -> Any:
    """The wanted rows of a whole saved slice."""
    if not want.piece.shape:
        return whole
    return whole.narrow(0, want.rows.offset[0] - want.piece.offset[0], want.rows.shape[0])


def _view_of(destination: Destination, rows: Slice) -> Any:
    """The part of the destination's memory that these saved rows fill whole, if it is one contiguous run of it (the
    rows span every other dimension, as FSDP's row shards do)."""
    local = destination.local
    box = destination.overlap(rows)
    if local is None or box is None or box[1] != rows.shape or not rows.shape or not local.is_contiguous() \
            or rows.shape[1:] != destination.shape[1:]:
        return None
    return local.narrow(0, rows.offset[0] - destination.offset[0], rows.shape[0])


def _copy_overlap(destination: Destination, piece: Slice, loaded: Any, box: Box) -> None:
    """Copy the overlap of loaded rows into the destination (allocated now, with their dtype, if new)."""
    import torch

    if destination.local is None:
        destination.local = torch.empty(destination.shape, dtype=loaded.dtype)
    low, shape = box
    source = loaded[tuple(slice(lo - o, lo - o + n) for lo, o, n in zip(low, piece.offset, shape, strict=True))]
    target = destination.local[tuple(slice(lo - o, lo - o + n)
                                     for lo, o, n in zip(low, destination.offset, shape, strict=True))]
    with torch.no_grad():
        target.copy_(source)


def _check_covered(info: CheckpointInfo, destination: Destination) -> None:
    needed = math.prod(destination.shape)
    if destination.covered != needed:
        raise CorruptCheckpointError(
            f"{info.path}: the saved slices of {destination.name} cover {destination.covered} of the {needed} "
            f"elements this rank holds (box at {list(destination.offset)}, shape {list(destination.shape)}): a slice "
            "is missing")
    if destination.local is None:  # nothing to read (an empty part): still a tensor of the right shape
        import torch

        destination.local = torch.empty(destination.shape)


def _value_names(rank: int, value_source: int, tree: Any, replicated: set[str],
                 destinations: Mapping[str, Destination]) -> set[str]:
    """The tensors of one file that the restored state keeps whole: the value source's, and rank 0's replicated
    keys."""
    keep: set[str] = set()
    if rank == value_source:
        keep |= set(tensor_kinds(tree))
    if rank == 0 and replicated:
        keep |= {name for key in replicated if key in tree for name in tensor_kinds(tree[key])}
    return keep - set(destinations)


def _reseeded(tree: dict[str, Any], step: int, rank: int) -> dict[str, Any]:
    """A new rank's copy of rank 0's tree, with every RNGState re-seeded from the step and this rank."""
    seed = derived_seed(step, rank)
    found: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict) and isinstance(node.get(STATEFUL_KEY), dict) and MARKER in node[STATEFUL_KEY]:
            found.append(path or "/")
            return {STATEFUL_KEY: {MARKER: 1, RESEED: seed}}
        if isinstance(node, dict) and TENSOR_KEY not in node:
            return {key: walk(value, f"{path}/{key}") for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, f"{path}/{index}") for index, value in enumerate(node)]
        return node

    result = walk(tree, "")
    if found:
        log.warning("ckpt: rank %d did not exist when step %d was saved: its random state at %s is seeded "
                    "from (step, rank) = seed %d", rank, step, ", ".join(found), seed)
    return dict(result)


def _check_same_everywhere(info: CheckpointInfo, trees: Mapping[int, Any], replicated: set[str],
                           world_size: int) -> None:
    """Values that are neither DTensors, RNGStates nor replicated keys must be alike on every saved rank."""
    first = {key: _comparable(value) for key, value in trees[0].items() if key not in replicated}
    for rank, tree in sorted(trees.items())[1:]:
        other = {key: _comparable(value) for key, value in tree.items() if key not in replicated}
        where = _difference(first, other, "")
        if where is not None:
            raise CheckpointConfigError(
                f"{info.path} was saved by {info.world_size} ranks and this job runs {world_size}, but state{where} "
                f"differs between rank 0 and rank {rank}: it cannot be resharded. Make it a DTensor, keep it the "
                "same on every rank (a data position as a global sample count), name its key in replicated=, or "
                "hold per-rank random state in an RNGState")


def _comparable(node: Any) -> Any:
    """A tree with what may differ between ranks taken out: DTensor slices, tensor names, RNG states."""
    if isinstance(node, dict) and TENSOR_KEY in node:
        return ("tensor", node["kind"], node.get(GLOBAL_SHAPE))
    if isinstance(node, dict) and isinstance(node.get(STATEFUL_KEY), dict) and MARKER in node[STATEFUL_KEY]:
        return "rng"
    if isinstance(node, dict):
        return {key: _comparable(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_comparable(value) for value in node]
    return node


def _difference(left: Any, right: Any, path: str) -> str | None:
    """The path of the first place two comparable trees differ, or None."""
    if isinstance(left, dict) and isinstance(right, dict):
        for key in sorted(set(left) | set(right), key=str):
            if key not in left or key not in right:
                return f"{path}/{key}"
            found = _difference(left[key], right[key], f"{path}/{key}")
            if found is not None:
                return found
        return None
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        return next((found for index, (a, b) in enumerate(zip(left, right, strict=True))
                     if (found := _difference(a, b, f"{path}/{index}")) is not None), None)
    return None if left == right else path or "/"
