"""Array adapters: numpy and torch are optional and imported only when a value needs them."""

from __future__ import annotations

import ctypes
import sys
from typing import Any

# safetensors dtype name <-> (itemsize, numpy name or None, torch attribute name)
DTYPES: dict[str, tuple[int, str | None, str]] = {
    "F64": (8, "float64", "float64"),
    "F32": (4, "float32", "float32"),
    "F16": (2, "float16", "float16"),
    "BF16": (2, None, "bfloat16"),
    "I64": (8, "int64", "int64"),
    "I32": (4, "int32", "int32"),
    "I16": (2, "int16", "int16"),
    "I8": (1, "int8", "int8"),
    "U64": (8, "uint64", "uint64"),
    "U32": (4, "uint32", "uint32"),
    "U16": (2, "uint16", "uint16"),
    "U8": (1, "uint8", "uint8"),
    "BOOL": (1, "bool", "bool"),
}
_BY_NUMPY = {np_name: code for code, (_, np_name, _) in DTYPES.items() if np_name}
_BY_TORCH = {torch_name: code for code, (_, _, torch_name) in DTYPES.items()}


def _module(name: str) -> Any:
    """Return an already-imported module (values of its types can only exist if it was imported)."""
    return sys.modules.get(name)


def is_numpy_array(value: object) -> bool:
    np = _module("numpy")
    return np is not None and isinstance(value, np.ndarray)


def is_numpy_scalar(value: object) -> bool:
    np = _module("numpy")
    return np is not None and isinstance(value, np.generic)


def is_torch_tensor(value: object) -> bool:
    torch = _module("torch")
    return torch is not None and isinstance(value, torch.Tensor)


class RawTensor:
    """A contiguous host-memory view of one array: dtype code, shape and a byte view, zero-copy."""

    __slots__ = ("_keepalive", "data", "dtype", "shape")

    def __init__(self, dtype: str, shape: list[int], data: memoryview, keepalive: object) -> None:
        self.dtype, self.shape, self.data, self._keepalive = dtype, shape, data, keepalive

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def from_numpy(array: Any) -> RawTensor:
    np = _module("numpy")
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        array = array.copy(order="C")
    code = _BY_NUMPY.get(array.dtype.name)
    if code is None:
        raise TypeError(f"numpy dtype {array.dtype} is not supported (supported: {sorted(_BY_NUMPY)})")
    data = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    return RawTensor(code, list(array.shape), data, array)


def from_torch(tensor: Any) -> RawTensor:
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    code = _BY_TORCH.get(dtype_name)
    if code is None:
        raise TypeError(f"torch dtype {tensor.dtype} is not supported (supported: {sorted(_BY_TORCH)})")
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    host = host.contiguous()
    nbytes = host.numel() * host.element_size()
    # A ctypes view of the tensor's memory: zero-copy and needs no numpy.
    data = memoryview((ctypes.c_char * nbytes).from_address(host.data_ptr())).cast("B") if nbytes else memoryview(b"")
    return RawTensor(code, list(host.shape), data, host)


def to_numpy(buffer: memoryview, dtype: str, shape: list[int]) -> Any:
    import numpy as np

    np_name = DTYPES[dtype][1]
    if np_name is None:
        raise TypeError(f"dtype {dtype} needs torch to load")
    return np.frombuffer(buffer, dtype=np_name).reshape(shape)


def to_torch(buffer: memoryview, dtype: str, shape: list[int]) -> Any:
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype][2])
    if buffer.nbytes == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(buffer, dtype=torch_dtype).reshape(shape)


def copy_into(target: Any, loaded: Any) -> bool:
    """Copy `loaded` into an existing array/tensor in place when shapes and dtypes agree."""
    if is_torch_tensor(target) and is_torch_tensor(loaded):
        if target.shape == loaded.shape and target.dtype == loaded.dtype:
            with _module("torch").no_grad():
                target.copy_(loaded)
            return True
    elif (is_numpy_array(target) and is_numpy_array(loaded) and target.shape == loaded.shape
          and target.dtype == loaded.dtype and target.flags.writeable):
        target[...] = loaded
        return True
    return False
