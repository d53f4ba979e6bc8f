"""Turns a training state into JSON plus a list of raw tensors, and back, without pickle."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from . import _tensors as T
from ._errors import UnsupportedStateError

_TAG = "__ckpt_"
TensorLoader = Callable[[str, str], Any]  # (tensor name, kind) -> array or tensor
DTENSOR = "dtensor"  # the kind of a DTensor's slice: the node also holds the global shape and the slice's offset
GLOBAL_SHAPE, OFFSET, SHAPE = "global_shape", "offset", "shape"
TENSOR_KEY = _TAG + "tensor__"


def _has_state_dict(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


class Encoder:
    """Walks a state once; JSON-able structure in `tree`, arrays collected in `tensors` by unique name."""

    def __init__(self) -> None:
        self.tensors: dict[str, T.RawTensor] = {}

    def encode_state(self, state: Any) -> Any:
        """Encode a whole state: a dict whose keys are all strings (they name what is restored in place)."""
        if not isinstance(state, dict) and not hasattr(state, "items"):
            raise UnsupportedStateError("state must be a dict of name -> value")
        bad = [k for k in state if not isinstance(k, str) or k.startswith(_TAG)]
        if bad:
            raise UnsupportedStateError(f"state keys must be strings not starting with {_TAG!r} (they name what is "
                                        f"restored in place); got {bad[0]!r} of type {type(bad[0]).__name__}")
        return self.encode(dict(state.items()))

    def encode(self, value: Any, path: str = "") -> Any:
        if value is None or type(value) in (bool, int, float, str):
            return value
        tensor = self._array(value, path)  # before subclasses of float: a numpy float64 is one
        if tensor is not None:
            return tensor
        if isinstance(value, (bool, int, float, str)):  # subclasses such as IntEnum: stored as the base value
            return value
        return self._container(value, path)

    def _array(self, value: Any, path: str) -> dict[str, Any] | None:
        if T.is_dtensor(value):
            return self._dtensor(value, path)
        if T.is_torch_tensor(value):
            return self._tensor(lambda: T.from_torch(value), path, "torch")
        if T.is_numpy_array(value):
            return self._tensor(lambda: T.from_numpy(value), path, "numpy")
        if T.is_numpy_scalar(value):
            return self._tensor(lambda: T.from_numpy(value.reshape(())), path, "numpy_scalar")
        return None

    def _container(self, value: Any, path: str) -> Any:
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith(_TAG) for k in value):
                return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
            items = [[self.encode(k, f"{path}/key{i}"), self.encode(v, f"{path}/{k}")]
                     for i, (k, v) in enumerate(value.items())]
            return {_TAG + "dict__": items}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {_TAG + "tuple__": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, (bytes, bytearray)):
            return {_TAG + "bytes__": base64.b64encode(bytes(value)).decode("ascii")}
        if _has_state_dict(value):
            return {_TAG + "stateful__": self.encode(value.state_dict(), path)}
        raise UnsupportedStateError(
            f"cannot store {type(value).__module__}.{type(value).__qualname__} at state{path or '/'}: supported are "
            "None, bool, int, float, str, bytes, list, tuple, dict, numpy arrays, torch tensors and objects "
            "with state_dict()/load_state_dict()"
        )

    def _dtensor(self, value: Any, path: str) -> dict[str, Any]:
        """This rank's slice of a DTensor, with the global shape and where the slice sits in it (so that any
        number of ranks can load it back, see _reshard)."""
        try:
            global_shape, offset, local = T.dtensor_layout(value)
        except TypeError as exc:
            raise UnsupportedStateError(f"cannot store the DTensor at state{path}: {exc}") from None
        node = self._tensor(lambda: T.from_torch(local), path, DTENSOR)
        node.update({GLOBAL_SHAPE: global_shape, OFFSET: offset, SHAPE: list(local.shape)})
        return node

    def _tensor(self, convert: Callable[[], T.RawTensor], path: str, kind: str) -> dict[str, Any]:
        try:
            raw = convert()
        except TypeError as exc:
            raise UnsupportedStateError(f"cannot store the array at state{path}: {exc}") from None
        name, n = path.lstrip("/") or "tensor", 1
        while name in self.tensors:
            n += 1
            name = f"{path.lstrip('/')}#{n}"
        self.tensors[name] = raw
        return {_TAG + "tensor__": name, "kind": kind}


def decode(node: Any, load: TensorLoader) -> Any:
    """Build fresh Python values from an encoded tree."""
    if isinstance(node, list):
        return [decode(v, load) for v in node]
    if not isinstance(node, dict):
        return node
    if _TAG + "tensor__" in node:
        value = load(node[_TAG + "tensor__"], node["kind"])
        return value[()] if node["kind"] == "numpy_scalar" else value
    for tag, build in _TAGGED.items():
        if tag in node:
            return build(node[tag], load)
    return {k: decode(v, load) for k, v in node.items()}


_TAGGED: dict[str, Callable[[Any, TensorLoader], Any]] = {
    _TAG + "dict__": lambda items, load: {decode(k, load): decode(v, load) for k, v in items},
    _TAG + "tuple__": lambda items, load: tuple(decode(v, load) for v in items),
    _TAG + "bytes__": lambda text, load: base64.b64decode(text),
    _TAG + "stateful__": decode,
}


def restore(target: Any, node: Any, load: TensorLoader) -> Any:
    """Restore `node` into `target` in place where possible; return the value the caller should hold."""
    if isinstance(node, dict) and _TAG + "stateful__" in node and _has_state_dict(target):
        target.load_state_dict(decode(node[_TAG + "stateful__"], load))
        return target
    if _has_state_dict(target) and not isinstance(target, dict):
        target.load_state_dict(decode(node, load))
        return target
    value = decode(node, load) if not isinstance(node, dict) or _is_tagged(node) else None
    if value is not None and T.copy_into(target, value):
        return target
    if isinstance(target, dict) and isinstance(node, dict) and not _is_tagged(node):
        for key, child in node.items():
            target[key] = restore(target[key], child, load) if key in target else decode(child, load)
        return target
    if isinstance(target, list) and isinstance(node, list):
        if len(target) == len(node):
            target[:] = [restore(t, n, load) for t, n in zip(target, node, strict=True)]
        else:
            target[:] = decode(node, load)
        return target
    return decode(node, load) if value is None else value


def _is_tagged(node: dict[str, Any]) -> bool:
    return any(k.startswith(_TAG) for k in node)


def tensor_targets(target: Any, node: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Map each stored tensor's name to the existing array/tensor in `target` that it will restore, so a load
    can read it straight into that memory. Stateful objects are asked for their state_dict() (a torch module's
    shares its parameters' storage)."""
    out = {} if out is None else out
    if isinstance(node, dict) and _TAG + "tensor__" in node:
        if T.is_torch_tensor(target) or T.is_numpy_array(target):
            out[node[_TAG + "tensor__"]] = target
        return out
    if _has_state_dict(target) and not isinstance(target, dict):
        inner = node[_TAG + "stateful__"] if isinstance(node, dict) and _TAG + "stateful__" in node else node
        try:
            return tensor_targets(target.state_dict(), inner, out)
        except Exception:
            return out
    if isinstance(target, dict) and isinstance(node, dict):
        _dict_targets(target, node, out)
    elif isinstance(target, (list, tuple)):
        items = node[_TAG + "tuple__"] if isinstance(node, dict) and _TAG + "tuple__" in node else node
        if isinstance(items, list) and len(items) == len(target):
            for item, child in zip(target, items, strict=True):
                tensor_targets(item, child, out)
    return out


def _dict_targets(target: dict[Any, Any], node: dict[str, Any], out: dict[str, Any]) -> None:
    if _TAG + "dict__" in node:
        for key_node, child in node[_TAG + "dict__"]:
            key = key_node if not isinstance(key_node, (dict, list)) else None
            if key is not None and key in target:
                tensor_targets(target[key], child, out)
    elif not _is_tagged(node):
        for key, child in node.items():
            if key in target:
                tensor_targets(target[key], child, out)


def tensor_kinds(tree: Any, out: dict[str, str] | None = None) -> dict[str, str]:
    """Every stored tensor's name in an encoded tree, with its kind (torch, numpy, numpy_scalar)."""
    out = {} if out is None else out
    if isinstance(tree, dict):
        if _TAG + "tensor__" in tree:
            out[str(tree[_TAG + "tensor__"])] = str(tree["kind"])
        else:
            for child in tree.values():
                tensor_kinds(child, out)
    elif isinstance(tree, list):
        for child in tree:
            tensor_kinds(child, out)
    return out


def tensor_names(tree: Any) -> set[str]:
    """The names of the tensors stored under one part of an encoded tree."""
    return set(tensor_kinds(tree))


def tensor_nodes(tree: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every stored tensor's node in an encoded tree, with its name."""
    found: list[tuple[str, dict[str, Any]]] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and TENSOR_KEY in node:
            found.append((str(node[TENSOR_KEY]), node))
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found
