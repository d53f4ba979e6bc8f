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


def is_dtensor(value: object) -> bool:
    """A torch.distributed DTensor (FSDP2 parameters and their optimizer state): sharded over a device mesh."""
    module = _module("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def dtensor_layout(value: Any) -> tuple[list[int], list[int], Any]:
    """A DTensor's global shape, the global offset of the slice this rank holds, and that slice (a local tensor
    sharing the DTensor's memory)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = value.to_local()
    shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    if list(shape) != list(local.shape):  # padded or strided layouts: not a plain box of the global tensor
        raise TypeError(f"a DTensor slice of shape {list(local.shape)} is not the box {list(shape)} its placements "
                        f"{value.placements} describe")
    return list(value.shape), [int(o) for o in offset], local


class RawTensor:
    """One array as dtype code, shape and contiguous host bytes; zero-copy for host arrays.

    A device (GPU) tensor keeps no host copy: `host()` copies it when the bytes are written, one tensor at a
    time, and `Snapshot.detach` copies it straight into the async arena, so host memory never holds it twice."""

    __slots__ = ("_keepalive", "_nbytes", "data", "device_source", "dtype", "shape")

    def __init__(self, dtype: str, shape: list[int], data: memoryview | None, keepalive: object,
                 device_source: Any = None, nbytes: int | None = None) -> None:
        self.dtype, self.shape, self.data, self._keepalive = dtype, shape, data, keepalive
        self.device_source = device_source
        self._nbytes = data.nbytes if data is not None else int(nbytes or 0)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def host(self) -> memoryview:
        """The bytes in host memory (a device tensor is copied now)."""
        if self.data is not None:
            return self.data
        return _torch_bytes(self.device_source.cpu().contiguous())

    def copy_to(self, destination: memoryview) -> None:
        """Copy the bytes into `destination` (a device tensor goes there directly, with no host copy between)."""
        if self.data is not None:
            destination[:] = self.data
            return
        torch = _module("torch")
        staged = torch.frombuffer(destination, dtype=torch.uint8) if self.nbytes else None
        if staged is not None:
            staged.view(self.device_source.dtype).view(self.device_source.shape).copy_(self.device_source)


def _torch_bytes(host: Any) -> memoryview:
    nbytes = host.numel() * host.element_size()
    # A ctypes view of the tensor's memory: zero-copy and needs no numpy.
    return memoryview((ctypes.c_char * nbytes).from_address(host.data_ptr())).cast("B") if nbytes else memoryview(b"")


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
    source = tensor.detach()
    if source.device.type != "cpu":
        return RawTensor(code, list(source.shape), None, None, device_source=source,
                         nbytes=source.numel() * source.element_size())
    host = source.contiguous()
    return RawTensor(code, list(host.shape), _torch_bytes(host), host)


def writable_view(target: Any, dtype: str, shape: list[int]) -> memoryview | None:
    """The memory of an existing host array/tensor with exactly this dtype and shape, to read a checkpoint
    straight into it; None if it cannot take the bytes in place."""
    if is_dtensor(target):
        return None  # its memory is its local slice's (see _reshard)
    if is_torch_tensor(target):
        if (str(target.dtype).removeprefix("torch.") != DTYPES[dtype][2] or list(target.shape) != shape
                or target.device.type != "cpu" or not target.is_contiguous()):
            return None
        return _torch_bytes(target)
    if is_numpy_array(target):
        np = _module("numpy")
        if (target.dtype.name != DTYPES[dtype][1] or list(target.shape) != shape or not target.flags.c_contiguous
                or not target.flags.writeable):
            return None
        return memoryview(target.reshape(-1).view(np.uint8)) if target.size else memoryview(bytearray())
    return None


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
    if target is loaded:
        return True
    if is_dtensor(target) or is_dtensor(loaded):
        return False
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
