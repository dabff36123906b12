"""The codec interface, its registry and errors, the encode/decode dispatch, and the helpers codecs share.

A codec turns a tensor into the `data` and `scales` bytes of an `edgeswarm.v1.Tensor`; `dtype` and
`shape` always describe the *decoded* tensor, so a receiver gets back the dtype the sender had. All
bytes are little-endian. With `rows` = product of all dimensions but the last (1 for a scalar) and
`width` = the last dimension (1 for a scalar), each codec family's module describes its byte layout.

`decode_tensor` checks everything a peer can get wrong (codec, dtype, shape, byte counts, scales,
basis) before allocating, and raises `CodecError` -- a `TensorDecodeError` -- with a message naming
the codec and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.tensors import (
    MAX_TENSOR_BYTES,
    TensorDecodeError,
    deserialize_tensor,
)

FP16_MAX = 65504.0
DEFAULT_MAX_RELATIVE_ERROR = 0.25
MAX_DIMS = 16  # far more than any activation needs; numpy cannot go beyond 64

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_FLOAT_NAMES = {dtype: name for name, dtype in _FLOAT_DTYPES.items()}

# A `semantic.SemanticBasis`. The dispatch only hands bases on to the semantic codec, and cannot name the
# class: semantic builds on this module, and the import contracts allow no cycle between the two.
Basis = Any


class CodecError(TensorDecodeError):
    """A tensor that cannot be encoded or decoded with the named codec: the text says which and why."""


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class EncodeOptions:
    """What some codecs need besides the tensor (only the semantic codec uses these)."""

    basis: Basis | None = None
    boundary: int | None = None
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR


@dataclass(frozen=True)
class WireLayout:
    """A decoded tensor's checked shape and dtype, plus the bases a semantic message may name."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    bases: Mapping[str, Basis]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def width(self) -> int:
        return self.shape[-1] if self.shape else 1


@dataclass(frozen=True)
class Codec:
    """An activation codec: its wire name, whether it is exact, and its two halves."""

    name: str
    lossless: bool
    encode: Callable[[torch.Tensor, EncodeOptions], pb.Tensor] = field(repr=False)
    decode: Callable[[pb.Tensor, WireLayout], torch.Tensor] = field(repr=False)


# Every codec by wire name, in the order nodes announce them; the package's __init__ fills it.
CODECS: dict[str, Codec] = {}


def register(*codecs: Codec) -> None:
    """Adds codecs to CODECS, in the order given."""
    for codec in codecs:
        CODECS[codec.name] = codec


def codec_names() -> list[str]:
    """Names of all codecs, in registry order."""
    return list(CODECS)


def get_codec(name: str) -> Codec:
    """The codec called `name` ("" means "none"); CodecError if there is none."""
    codec = CODECS.get(name or "none")
    if codec is None:
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(CODECS)}")
    return codec


def encoded_size(message: pb.Tensor) -> int:
    """Bytes a message spends on tensor contents: data plus scales."""
    return len(message.data) + len(message.scales)


def relative_error(original: torch.Tensor, decoded: torch.Tensor) -> float:
    """||original - decoded|| / ||original|| over the whole tensor (0 when both are zero)."""
    original, decoded = original.float(), decoded.float()
    num = torch.linalg.vector_norm(original - decoded).item()
    den = torch.linalg.vector_norm(original).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def fits_fp16(tensor: torch.Tensor) -> bool:
    """Whether every value is finite and within float16's range, so the fp16 codec can take it."""
    if tensor.numel() == 0:
        return True
    return bool(tensor.detach().float().abs().max() <= FP16_MAX)  # NaN compares False


# ---------------------------------------------------------------------------------------------
# Public entry points


def encode_tensor(
    tensor: torch.Tensor,
    codec: str,
    *,
    basis: Basis | None = None,
    boundary: int | None = None,
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR,
) -> pb.Tensor:
    """Encodes a CPU tensor with the named codec; decoding gives back a tensor of its dtype.

    The semantic codec needs `basis` and `boundary` and may fall back to "lossless" (see
    `encode_semantic`, which also reports the error it measured). Raises CodecError.
    """
    spec = get_codec(codec)
    options = EncodeOptions(basis=basis, boundary=boundary, max_relative_error=max_relative_error)
    return spec.encode(tensor.detach().cpu().contiguous(), options)


def decode_tensor(
    message: pb.Tensor,
    *,
    bases: Mapping[str, Basis] | None = None,
    max_bytes: int = MAX_TENSOR_BYTES,
) -> torch.Tensor:
    """Rebuilds a tensor from a message of any codec, checking it all; raises CodecError otherwise.

    `bases` maps semantic basis digests to the bases this node holds.
    """
    codec = get_codec(message.codec)
    name = codec.name
    if message.basis and name != "semantic":
        raise CodecError(f"codec {name!r}: unexpected basis {message.basis!r} (only 'semantic' has one)")
    if name in ("none", "lossless", "fp16", "bf16") and message.scales:
        raise CodecError(f"codec {name!r}: takes no scales, got {len(message.scales)} bytes")
    if name == "none":
        return decode_raw(message, max_bytes)
    dtype = _FLOAT_DTYPES.get(message.dtype)
    if dtype is None:
        raise CodecError(
            f"codec {name!r}: decoded dtype must be one of {sorted(_FLOAT_DTYPES)}, got {message.dtype!r}"
        )
    shape = checked_shape(name, message.shape, dtype_itemsize(dtype), max_bytes)
    return codec.decode(message, WireLayout(shape, dtype, bases or {}))


def decode_raw(message: pb.Tensor, max_bytes: int) -> torch.Tensor:
    """The "none" codec's decoding: `deserialize_tensor` within max_bytes, any wire dtype."""
    checked_shape("none", message.shape, 1, max_bytes)  # keeps numpy away from absurd shapes
    try:
        return deserialize_tensor(message, max_bytes=max_bytes)
    except TensorDecodeError as error:
        raise CodecError(f"codec 'none': {error}") from error


# ---------------------------------------------------------------------------------------------
# Shared checks and byte helpers


def dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def checked_shape(name: str, shape, itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """A shape with few, non-negative dimensions whose tensor fits in max_bytes.

    Zero dimensions count as 1 for the size bound, so [0, 2**62] is refused too: nothing here
    (or in numpy and torch) copes with dimensions that large.
    """
    shape = tuple(int(dim) for dim in shape)
    if len(shape) > MAX_DIMS:
        raise CodecError(f"codec {name!r}: shape has {len(shape)} dimensions, more than {MAX_DIMS}")
    if any(dim < 0 for dim in shape):
        raise CodecError(f"codec {name!r}: negative dimension in shape {shape}")
    needed = math.prod(max(dim, 1) for dim in shape) * itemsize
    if needed > max_bytes:
        raise CodecError(f"codec {name!r}: shape {shape} needs {needed} bytes, above the limit of {max_bytes}")
    return shape


def expect_length(name: str, what: str, actual: int, expected: int, shape: tuple[int, ...]) -> None:
    if actual != expected:
        raise CodecError(f"codec {name!r}: {what} of shape {shape} need {expected} bytes, got {actual}")


def tensor_from_bytes(data: bytes, dtype: np.dtype) -> torch.Tensor:
    """A writable 1-D tensor copied from bytes whose length is already checked."""
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).copy())


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def float_input(tensor: torch.Tensor, name: str, *, finite: bool) -> torch.Tensor:
    """Refuses tensors a float codec cannot carry: non-wire dtypes and (if asked) NaN/Inf."""
    if tensor.dtype not in _FLOAT_NAMES:
        raise CodecError(f"codec {name!r}: encodes float32/float16/bfloat16 tensors, got {tensor.dtype}")
    if finite and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise CodecError(f"codec {name!r}: input holds NaN or Inf; fix the producer or send with 'none'")
    return tensor


def encoded_message(tensor: torch.Tensor, name: str, data: bytes, scales: bytes = b"", basis: str = "") -> pb.Tensor:
    return pb.Tensor(
        data=data,
        dtype=_FLOAT_NAMES[tensor.dtype],
        shape=list(tensor.shape),
        codec=name,
        scales=scales,
        basis=basis,
    )


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as float32 [rows, width] (a scalar is one row of one value)."""
    if tensor.dim() == 0:
        return tensor.float().reshape(1, 1)
    return tensor.float().reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])
