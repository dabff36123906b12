"""Tensors on the wire: raw bytes plus dtype and shape, checked before anything trusts them."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from edgeswarm.proto import dataplane_pb2 as pb

# The largest tensor a single message may carry; gRPC's own limit is set to match.
MAX_TENSOR_BYTES = 256 * 1024 * 1024
# Nodes and clients set gRPC's message limit to this: above it, gRPC refuses a message with
# RESOURCE_EXHAUSTED before our code sees it.
MAX_MESSAGE_BYTES = MAX_TENSOR_BYTES + 1024 * 1024
# gRPC channel and server options that let data-plane messages up to MAX_MESSAGE_BYTES through, both ways
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
MAX_DIMS = 16

_WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _WIRE_DTYPES.items()}


class TensorDecodeError(ValueError):
    """A tensor message that cannot be turned back into a tensor: its text says why."""


def tensor_digest(message: pb.Tensor) -> bytes:
    """The SHA-256 of a tensor message as serialized (deterministically): two parties holding the same
    message get the same digest."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()


def serialize_tensor(tensor: torch.Tensor) -> pb.Tensor:
    """Packs a CPU tensor into a protobuf `Tensor`, bytes in native (little-endian) order."""
    if tensor.dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype {tensor.dtype} cannot travel on the wire")
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: send its 16-bit pattern
        data = tensor.view(torch.int16).numpy().tobytes()
    else:
        data = tensor.numpy().tobytes()
    return pb.Tensor(data=data, dtype=_DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape))


def deserialize_tensor(message: pb.Tensor, *, max_bytes: int = MAX_TENSOR_BYTES) -> torch.Tensor:
    """Rebuilds a tensor from a protobuf `Tensor`, raising TensorDecodeError on any inconsistency."""
    dtype = _WIRE_DTYPES.get(message.dtype)
    if dtype is None:
        raise TensorDecodeError(f"unknown dtype {message.dtype!r}; expected one of {sorted(_WIRE_DTYPES)}")
    shape = tuple(message.shape)
    if len(shape) > MAX_DIMS:
        raise TensorDecodeError(f"shape {shape} has {len(shape)} dimensions, above the limit of {MAX_DIMS}")
    if any(dim < 0 for dim in shape):
        raise TensorDecodeError(f"negative dimension in shape {shape}")
    if any(dim > max_bytes for dim in shape):  # also keeps shapes like [0, 2**62] away from numpy
        raise TensorDecodeError(f"dimension in shape {shape} exceeds the limit of {max_bytes}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected > max_bytes:
        raise TensorDecodeError(f"tensor of shape {shape} needs {expected} bytes, above the limit of {max_bytes}")
    if len(message.data) != expected:
        raise TensorDecodeError(
            f"tensor of shape {shape} and dtype {message.dtype} needs {expected} bytes, got {len(message.data)}"
        )
    if dtype == torch.bfloat16:
        array = np.frombuffer(message.data, dtype=np.int16).reshape(shape)
        return torch.from_numpy(array.copy()).view(torch.bfloat16)
    if dtype == torch.bool:
        array = np.frombuffer(message.data, dtype=np.uint8).reshape(shape)
        if array.size and array.max() > 1:
            raise TensorDecodeError("bool tensor holds bytes other than 0 and 1")
        return torch.from_numpy(array.copy()).to(torch.bool)
    array = np.frombuffer(message.data, dtype=torch.empty((), dtype=dtype).numpy().dtype).reshape(shape)
    return torch.from_numpy(array.copy())
