"""Activation codecs: how hidden states are squeezed onto the links between nodes.

A codec turns a tensor into the `data` and `scales` bytes of an `edgeswarm.v1.Tensor`; `dtype`
and `shape` always describe the *decoded* tensor, so a receiver gets back the dtype the sender had.
All bytes are little-endian. With `rows` = product of all dimensions but the last (1 for a scalar)
and `width` = the last dimension (1 for a scalar), the codecs lay out their bytes as follows:

- ``none`` (or an empty codec field): raw values in `dtype`, exactly `serialize_tensor`'s format.
  No scales. Any wire dtype; the only codec that carries integer or bool tensors.
- ``lossless``: the tensor's own bytes (itemsize bytes per value, e.g. 4 for float32) byte-shuffled
  -- all first bytes, then all second bytes, ... -- and compressed with zlib level 1. Exact.
- ``fp16`` / ``bf16``: the values cast to float16 / bfloat16, 2 bytes each. Encoding refuses
  values beyond float16's range (|x| > 65504) rather than turning them into infinities.
- ``int8_token``: one int8 in -127..127 per value, row-major; `scales` holds one float16 scale
  per row (x = q * scale, scale = max|row| / 127).
- ``int8_block``: one int8 in -127..127 per value, row-major; every row is cut into blocks of 64
  consecutive values (the last block of a row may be shorter), and `scales` holds one float16
  scale per block, row-major ([rows, ceil(width / 64)]).
- ``int8_outlier``: int8_block with the message's 3 outlier channels (largest |x| over all its rows)
  taken out first: `scales` holds their 3 int16 column indices, then their float16 values [rows, 3],
  then the int8_block scales [rows, ceil(width / 64)]; `data` is int8_block's, with 0 in those columns.
  Residual streams of LLMs carry a few channels ~50x larger than the rest ("massive activations");
  without them, the 64-value blocks they sit in keep 6 more bits of precision.
- ``int4_block``: values in -7..7 over blocks of 32 (scales laid out as for int8_block), stored
  as the nibble q + 8 (1..15), two per byte over the flattened tensor: value 2i in the low nibble
  of byte i, value 2i+1 in the high nibble; an odd count is padded with the nibble 8 (zero).
- ``semantic``: transform coding (a KLT) with a `SemanticBasis` fitted offline. `basis` is
  "<basis digest>/<block boundary>". Per boundary the basis holds a mean, a full orthonormal rotation
  sorted by decreasing calibration variance, the per-component calibration stds, and an allocation
  (k8, k4, k4 even): the normalized coefficients z = ((x - mean) @ components) / std of the leading k8
  components are sent as int8 (-127..127), the next k4 as int4 (-7..7), the rest are dropped. `data`
  holds, per row, the k8 int8 values then the k4 values packed as int4_block does (k4 / 2 bytes);
  `scales` holds, per row, one float16 absmax scale per non-empty group (8-bit first). Decoding computes
  (dequant(z) * std) @ components[:, :k8 + k4].T + mean. When some token would come back with a relative
  error above `max_relative_error`, the encoder sends the message with the ``lossless`` codec instead.

Quantization scales are rounded *up* to float16, so no value is clipped and the error of every
quantized value is at most half its block's scale. `decode_tensor` checks everything a peer can
get wrong (codec, dtype, shape, byte counts, scales, basis) before allocating, and raises
`CodecError` -- a `TensorDecodeError` -- with a message naming the codec and the problem.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from proto import dataplane_pb2 as pb
from protocol.tensors import (
    MAX_TENSOR_BYTES,
    TensorDecodeError,
    deserialize_tensor,
    serialize_tensor,
)

FP16_MAX = 65504.0
DEFAULT_MAX_RELATIVE_ERROR = 0.25
INT8_BLOCK_SIZE = 64
INT4_BLOCK_SIZE = 32
OUTLIER_CHANNELS = 3  # int8_outlier: channels per message sent apart in float16
DEFAULT_SEMANTIC_BYTES = 272  # semantic: wire bytes per token a fitted basis may spend (8.5x at hidden 576)
MAX_DIMS = 16  # far more than any activation needs; numpy cannot go beyond 64

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_FLOAT_NAMES = {dtype: name for name, dtype in _FLOAT_DTYPES.items()}
_BASIS_FORMAT = "edgeswarm-semantic-basis/2"


class CodecError(TensorDecodeError):
    """A tensor that cannot be encoded or decoded with the named codec: the text says which and why."""


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class EncodeOptions:
    """What some codecs need besides the tensor (only the semantic codec uses these)."""

    basis: SemanticBasis | None = None
    boundary: int | None = None
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR


@dataclass(frozen=True)
class _Layout:
    """A decoded tensor's checked shape and dtype, plus the bases a semantic message may name."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    bases: Mapping[str, SemanticBasis]

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
    decode: Callable[[pb.Tensor, _Layout], torch.Tensor] = field(repr=False)


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
    basis: SemanticBasis | None = None,
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
    bases: Mapping[str, SemanticBasis] | None = None,
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
        return _decode_raw(message, max_bytes)
    dtype = _FLOAT_DTYPES.get(message.dtype)
    if dtype is None:
        raise CodecError(
            f"codec {name!r}: decoded dtype must be one of {sorted(_FLOAT_DTYPES)}, got {message.dtype!r}"
        )
    shape = _checked_shape(name, message.shape, _itemsize(dtype), max_bytes)
    return codec.decode(message, _Layout(shape, dtype, bases or {}))


# ---------------------------------------------------------------------------------------------
# Shared checks and byte helpers


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _checked_shape(name: str, shape, itemsize: int, max_bytes: int) -> tuple[int, ...]:
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


def _expect_length(name: str, what: str, actual: int, expected: int, shape: tuple[int, ...]) -> None:
    if actual != expected:
        raise CodecError(f"codec {name!r}: {what} of shape {shape} need {expected} bytes, got {actual}")


def _from_bytes(data: bytes, dtype: np.dtype) -> torch.Tensor:
    """A writable 1-D tensor copied from bytes whose length is already checked."""
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).copy())


def _to_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def _float_input(tensor: torch.Tensor, name: str, *, finite: bool) -> torch.Tensor:
    """Refuses tensors a float codec cannot carry: non-wire dtypes and (if asked) NaN/Inf."""
    if tensor.dtype not in _FLOAT_NAMES:
        raise CodecError(f"codec {name!r}: encodes float32/float16/bfloat16 tensors, got {tensor.dtype}")
    if finite and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise CodecError(f"codec {name!r}: input holds NaN or Inf; fix the producer or send with 'none'")
    return tensor


def _message(tensor: torch.Tensor, name: str, data: bytes, scales: bytes = b"", basis: str = "") -> pb.Tensor:
    return pb.Tensor(
        data=data,
        dtype=_FLOAT_NAMES[tensor.dtype],
        shape=list(tensor.shape),
        codec=name,
        scales=scales,
        basis=basis,
    )


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as float32 [rows, width] (a scalar is one row of one value)."""
    if tensor.dim() == 0:
        return tensor.float().reshape(1, 1)
    return tensor.float().reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


# ---------------------------------------------------------------------------------------------
# none


def _encode_none(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
    try:
        return serialize_tensor(tensor)
    except TypeError as error:
        raise CodecError(f"codec 'none': {error}") from error


def _decode_none(message: pb.Tensor, layout: _Layout) -> torch.Tensor:
    return _decode_raw(message, MAX_TENSOR_BYTES)  # decode_tensor takes the raw path itself


def _decode_raw(message: pb.Tensor, max_bytes: int) -> torch.Tensor:
    _checked_shape("none", message.shape, 1, max_bytes)  # keeps numpy away from absurd shapes
    try:
        return deserialize_tensor(message, max_bytes=max_bytes)
    except TensorDecodeError as error:
        raise CodecError(f"codec 'none': {error}") from error


# ---------------------------------------------------------------------------------------------
# lossless: byte-shuffle + zlib


def _encode_lossless(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
    _float_input(tensor, "lossless", finite=False)
    planes = tensor.reshape(-1).view(torch.uint8).reshape(-1, tensor.element_size()).T.contiguous()
    return _message(tensor, "lossless", zlib.compress(planes.numpy().tobytes(), 1))


def _decode_lossless(message: pb.Tensor, layout: _Layout) -> torch.Tensor:
    itemsize = _itemsize(layout.dtype)
    expected = layout.numel * itemsize
    raw = _bounded_inflate(message.data, expected)
    planes = _from_bytes(raw, np.uint8).reshape(itemsize, layout.numel)
    values = planes.T.reshape(-1).view(layout.dtype)
    return values.reshape(layout.shape)


def _bounded_inflate(data: bytes, expected: int) -> bytes:
    """zlib-decompresses exactly `expected` bytes, never holding more than one byte beyond."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, expected + 1)  # max_length 0 would mean "no limit"
    except zlib.error as error:
        raise CodecError(f"codec 'lossless': data is not a zlib stream ({error})") from error
    if len(raw) > expected or inflater.unconsumed_tail:
        raise CodecError(f"codec 'lossless': data decompresses to more than the {expected} bytes the shape needs")
    if not inflater.eof:
        raise CodecError(f"codec 'lossless': zlib stream is truncated ({len(raw)} of {expected} bytes)")
    if inflater.unused_data:
        raise CodecError(f"codec 'lossless': {len(inflater.unused_data)} bytes follow the zlib stream")
    if len(raw) != expected:
        raise CodecError(f"codec 'lossless': data decompresses to {len(raw)} bytes, the shape needs {expected}")
    return raw


# ---------------------------------------------------------------------------------------------
# fp16 / bf16: casts


def _cast_codec(name: str, wire: torch.dtype) -> Codec:
    def encode(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
        _float_input(tensor, name, finite=True)
        if wire == torch.float16 and not fits_fp16(tensor):
            raise CodecError(
                f"codec {name!r}: values up to {tensor.float().abs().max().item():.4g} exceed float16's "
                f"range (±{FP16_MAX:g}); use 'bf16' or another codec"
            )
        return _message(tensor, name, _to_bytes(tensor.to(wire)))

    def decode(message: pb.Tensor, layout: _Layout) -> torch.Tensor:
        _expect_length(name, "data", len(message.data), layout.numel * 2, layout.shape)
        values = _from_bytes(message.data, np.float16 if wire == torch.float16 else np.int16)
        return values.view(wire).reshape(layout.shape).to(layout.dtype)

    return Codec(name, lossless=False, encode=encode, decode=decode)


# ---------------------------------------------------------------------------------------------
# Block quantization (int8_token, int8_block, int4_block)


def _blocks_per_row(width: int, block: int | None) -> int:
    """Number of scales per row: blocks of `block` values, or one per row when block is None."""
    if width == 0:
        return 0
    return 1 if block is None else -(-width // block)


def _block_index(width: int, block: int | None) -> torch.Tensor:
    """For every column, the block it belongs to."""
    return torch.arange(width) // (block or max(width, 1))


def _block_absmax(rows: torch.Tensor, block: int | None) -> torch.Tensor:
    """max |x| per block of each row, [rows, blocks]; the last block of a row may be shorter."""
    count, width = rows.shape
    block = block or max(width, 1)
    full, tail = divmod(width, block)
    parts = []
    if full:
        parts.append(rows[:, : full * block].reshape(count, full, block).abs().amax(dim=-1))
    if tail:
        parts.append(rows[:, full * block :].abs().amax(dim=-1, keepdim=True))
    return torch.cat(parts, dim=1) if parts else rows.new_zeros(count, 0)


def _fp16_scales(absmax: torch.Tensor, qmax: int, name: str) -> torch.Tensor:
    """absmax / qmax as float16, rounded up so that no value quantizes beyond ±qmax."""
    scales = (absmax / qmax).to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise CodecError(
            f"codec {name!r}: values up to {absmax.max().item():.4g} need scales beyond float16's range; "
            "use 'bf16' or 'lossless'"
        )
    too_small = scales.float() * qmax < absmax
    return torch.where(too_small, torch.nextafter(scales, torch.tensor(math.inf, dtype=torch.float16)), scales)


def _quantize(rows: torch.Tensor, block: int | None, qmax: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of [rows, width] float32: (int8 values, float16 scales [rows, blocks])."""
    scales = _fp16_scales(_block_absmax(rows, block), qmax, name)
    per_value = scales.float()[:, _block_index(rows.shape[1], block)]
    # an all-zero block has scale 0: dividing its zeros by `tiny` keeps them zero
    values = torch.round(rows / per_value.clamp_min(torch.finfo(torch.float32).tiny))
    values = values.clamp_(-qmax, qmax).to(torch.int8)
    return values, scales


def _dequantize(values: torch.Tensor, scales: torch.Tensor, block: int | None) -> torch.Tensor:
    """float32 [rows, width] from int8 values [rows, width] and float scales [rows, blocks]."""
    return values.float() * scales[:, _block_index(values.shape[1], block)]


def _decode_scales(name: str, message: pb.Tensor, count: int, per_row: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The float16 scales of a message as float32 [count, per_row], checked finite and non-negative."""
    _expect_length(name, "scales", len(message.scales), count * per_row * 2, shape)
    scales = _from_bytes(message.scales, np.float16).float().reshape(count, per_row)
    if not bool(torch.isfinite(scales).all()):
        raise CodecError(f"codec {name!r}: scales hold NaN or Inf")
    if bool((scales < 0).any()):
        raise CodecError(f"codec {name!r}: scales hold negative values")
    return scales


def _pack_int4(values: torch.Tensor) -> bytes:
    """Values in -7..7 as nibbles q + 8, two per byte, low nibble first."""
    nibbles = (values.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
    pairs = nibbles.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()


def _unpack_int4(data: bytes, count: int, name: str) -> torch.Tensor:
    packed = _from_bytes(data, np.uint8)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    if nibbles.numel() > count and int(nibbles[-1]) != 8:
        raise CodecError(f"codec {name!r}: the padding nibble after an odd number of values must be 8 (zero)")
    nibbles = nibbles[:count]
    if bool((nibbles == 0).any()):
        raise CodecError(f"codec {name!r}: nibble 0 (value -8) is outside -7..7")
    return (nibbles.to(torch.int16) - 8).to(torch.int8)


def _quantized_codec(name: str, bits: int, block: int | None) -> Codec:
    qmax = 127 if bits == 8 else 7

    def encode(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
        _float_input(tensor, name, finite=True)
        values, scales = _quantize(_rows(tensor), block, qmax, name)
        data = values.numpy().tobytes() if bits == 8 else _pack_int4(values)
        return _message(tensor, name, data, _to_bytes(scales))

    def decode(message: pb.Tensor, layout: _Layout) -> torch.Tensor:
        count, width = layout.rows, layout.width
        expected = layout.numel if bits == 8 else -(-layout.numel // 2)
        _expect_length(name, "data", len(message.data), expected, layout.shape)
        scales = _decode_scales(name, message, count, _blocks_per_row(width, block), layout.shape)
        if bits == 8:
            values = _from_bytes(message.data, np.int8)
            if bool((values == -128).any()):
                raise CodecError(f"codec {name!r}: value -128 is outside -127..127")
        else:
            values = _unpack_int4(message.data, layout.numel, name)
        rows = _dequantize(values.reshape(count, width), scales, block)
        return rows.reshape(layout.shape).to(layout.dtype)

    return Codec(name, lossless=False, encode=encode, decode=decode)


# ---------------------------------------------------------------------------------------------
# int8_outlier: int8 blocks of 64 with the message's few outlier channels kept apart in float16


def _outlier_channels(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` channels with the largest |x| anywhere in the message, ascending."""
    count = min(count, rows.shape[1]) if rows.numel() else 0
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    return rows.abs().amax(dim=0).topk(count).indices.sort().values


def _encode_int8_outlier(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
    name = "int8_outlier"
    _float_input(tensor, name, finite=True)
    rows = _rows(tensor)
    channels = _outlier_channels(rows, OUTLIER_CHANNELS)
    outliers = rows[:, channels]
    if outliers.numel() and not fits_fp16(outliers):
        raise CodecError(f"codec {name!r}: outlier values beyond float16's range; use 'bf16' or 'lossless'")
    inliers = rows.clone()
    inliers[:, channels] = 0.0
    values, scales = _quantize(inliers, INT8_BLOCK_SIZE, 127, name)
    side = _to_bytes(channels.to(torch.int16)) + _to_bytes(outliers.to(torch.float16)) + _to_bytes(scales)
    return _message(tensor, name, values.numpy().tobytes(), side)


def _decode_int8_outlier(message: pb.Tensor, layout: _Layout) -> torch.Tensor:
    name = "int8_outlier"
    count, width = layout.rows, layout.width
    _expect_length(name, "data", len(message.data), layout.numel, layout.shape)
    kept = min(OUTLIER_CHANNELS, width) if layout.numel else 0
    blocks = _blocks_per_row(width, INT8_BLOCK_SIZE)
    _expect_length(name, "scales", len(message.scales), 2 * kept + 2 * count * kept + 2 * count * blocks, layout.shape)
    channels = _from_bytes(message.scales[: 2 * kept], np.int16).long()
    if bool((channels < 0).any() or (channels >= width).any()) or channels.unique().numel() != channels.numel():
        raise CodecError(f"codec {name!r}: outlier channels {channels.tolist()} are not distinct columns of width {width}")
    outliers = _from_bytes(message.scales[2 * kept : 2 * kept + 2 * count * kept], np.float16).float().reshape(count, kept)
    if not bool(torch.isfinite(outliers).all()):
        raise CodecError(f"codec {name!r}: outlier values hold NaN or Inf")
    scales_message = pb.Tensor(scales=message.scales[2 * kept + 2 * count * kept :])
    scales = _decode_scales(name, scales_message, count, blocks, layout.shape)
    values = _from_bytes(message.data, np.int8)
    if bool((values == -128).any()):
        raise CodecError(f"codec {name!r}: value -128 is outside -127..127")
    rows = _dequantize(values.reshape(count, width), scales, INT8_BLOCK_SIZE)
    rows[:, channels] = outliers
    return rows.reshape(layout.shape).to(layout.dtype)


# ---------------------------------------------------------------------------------------------
# semantic: low-rank projection onto a fitted basis


class SemanticBasis:
    """Per block boundary, a KLT codebook for the hidden states there (see `fit_semantic_basis`).

    `means[b]` is float32 [hidden]; `components[b]` float32 [hidden, hidden], an orthonormal rotation whose
    columns are sorted by decreasing calibration variance; `stds[b]` float32 [hidden] the calibration
    standard deviation of each component (non-increasing); `allocations[b]` = (k8, k4): the leading k8
    components are sent at 8 bits, the next k4 (even) at 4 bits, the rest dropped.
    `predicted_errors[b]` is the calibration relative error the fit predicted (informative only).
    `digest` (16 hex chars of sha256 over format, boundaries, allocations and tensor bytes) names the basis
    on the wire.
    """

    FORMAT = _BASIS_FORMAT  # saved files of another format are refused

    def __init__(
        self,
        means: Mapping[int, torch.Tensor],
        components: Mapping[int, torch.Tensor],
        stds: Mapping[int, torch.Tensor],
        allocations: Mapping[int, tuple[int, int]],
        predicted_errors: Mapping[int, float] | None = None,
    ):
        if not means or not (set(means) == set(components) == set(stds) == set(allocations)):
            raise CodecError(
                "semantic basis: needs a mean, components, stds and an allocation for the same, non-empty set "
                "of boundaries"
            )
        self.means: dict[int, torch.Tensor] = {}
        self.components: dict[int, torch.Tensor] = {}
        self.stds: dict[int, torch.Tensor] = {}
        self.allocations: dict[int, tuple[int, int]] = {}
        for boundary in sorted(means):
            b = int(boundary)
            mean, comps, std = (
                t[boundary].detach().cpu().to(torch.float32).contiguous().clone() for t in (means, components, stds)
            )
            k8, k4 = (int(k) for k in allocations[boundary])
            _check_basis_entry(b, mean, comps, std, k8, k4)
            self.means[b], self.components[b], self.stds[b], self.allocations[b] = mean, comps, std, (k8, k4)
        hidden = {mean.numel() for mean in self.means.values()}
        if len(hidden) != 1:
            raise CodecError(f"semantic basis: boundaries disagree on the hidden size: {sorted(hidden)}")
        self.hidden_size: int = hidden.pop()
        self.predicted_errors: dict[int, float] = {int(b): float(e) for b, e in (predicted_errors or {}).items()}
        self.digest: str = self._compute_digest()

    @property
    def boundaries(self) -> list[int]:
        return list(self.means)

    def rank(self, boundary: int) -> int:
        """Number of coefficients sent per token at a boundary (k8 + k4)."""
        return sum(self.allocations[boundary])

    def bytes_per_token(self, boundary: int) -> int:
        """Wire bytes per token at a boundary: k8 int8 values, k4 packed nibbles and the float16 scales."""
        k8, k4 = self.allocations[boundary]
        return _semantic_bytes(k8, k4)

    def _compute_digest(self) -> str:
        digest = hashlib.sha256(_BASIS_FORMAT.encode())
        for boundary, mean in self.means.items():
            digest.update(struct.pack("<qqq", boundary, *self.allocations[boundary]))
            for tensor in (mean, self.components[boundary], self.stds[boundary]):
                digest.update(struct.pack("<q", tensor.numel()))
                digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Writes the basis as safetensors ("mean.<b>", "components.<b>", "std.<b>", int64 "allocation.<b>")
        with its digest in the metadata."""
        tensors: dict[str, torch.Tensor] = {}
        for b in self.boundaries:
            tensors[f"mean.{b}"] = self.means[b]
            tensors[f"components.{b}"] = self.components[b]
            tensors[f"std.{b}"] = self.stds[b]
            tensors[f"allocation.{b}"] = torch.tensor(self.allocations[b], dtype=torch.int64)
        metadata = {
            "format": _BASIS_FORMAT,
            "digest": self.digest,
            "boundaries": ",".join(map(str, self.boundaries)),
            "bytes_per_token": ",".join(str(self.bytes_per_token(b)) for b in self.boundaries),
            "predicted_errors": ",".join(f"{b}:{e:.6g}" for b, e in self.predicted_errors.items()),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> SemanticBasis:
        """Reads a saved basis, refusing (CodecError) another format or a file whose contents do not hash
        to its digest."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except SafetensorError as error:
            raise CodecError(f"semantic basis {path}: not a readable safetensors file ({error})") from error
        if metadata.get("format") != _BASIS_FORMAT:
            raise CodecError(f"semantic basis {path}: format is {metadata.get('format')!r}, expected {_BASIS_FORMAT!r}")
        parts: dict[str, dict[int, torch.Tensor]] = {"mean": {}, "components": {}, "std": {}, "allocation": {}}
        for name, tensor in tensors.items():
            match = re.fullmatch(r"(mean|components|std|allocation)\.(\d{1,9})", name)
            if match is None:
                raise CodecError(f"semantic basis {path}: unexpected tensor {name!r}")
            parts[match[1]][int(match[2])] = tensor
        allocations = {}
        for boundary, allocation in parts["allocation"].items():
            if allocation.dtype != torch.int64 or allocation.shape != (2,):
                raise CodecError(f"semantic basis {path}: allocation.{boundary} is not two int64 values")
            allocations[boundary] = (int(allocation[0]), int(allocation[1]))
        predicted = {}
        try:
            for item in filter(None, metadata.get("predicted_errors", "").split(",")):
                boundary, error = item.split(":")
                predicted[int(boundary)] = float(error)
        except ValueError:
            predicted = {}  # informative only
        basis = cls(parts["mean"], parts["components"], parts["std"], allocations, predicted)
        if basis.digest != metadata.get("digest"):
            raise CodecError(
                f"semantic basis {path}: contents hash to {basis.digest}, the file claims "
                f"{metadata.get('digest')!r}: the file was altered or corrupted"
            )
        return basis


def _semantic_bytes(k8: int, k4: int) -> int:
    """Bytes per token of a (k8, k4) allocation: k8 int8s, k4 / 2 packed bytes, a float16 scale per group."""
    return k8 + k4 // 2 + 2 * ((k8 > 0) + (k4 > 0))


def _check_basis_entry(boundary: int, mean: torch.Tensor, comps: torch.Tensor, std: torch.Tensor, k8: int, k4: int) -> None:
    where = f"semantic basis, boundary {boundary}"
    if boundary < 0:
        raise CodecError(f"{where}: boundary must be non-negative")
    hidden = mean.shape[0] if mean.dim() == 1 else -1
    if hidden < 1 or tuple(comps.shape) != (hidden, hidden) or tuple(std.shape) != (hidden,):
        raise CodecError(
            f"{where}: mean {tuple(mean.shape)}, components {tuple(comps.shape)} and std {tuple(std.shape)} "
            "are not [hidden], [hidden, hidden] and [hidden]"
        )
    if k8 < 0 or k4 < 0 or k4 % 2 or not 1 <= k8 + k4 <= hidden:
        raise CodecError(f"{where}: allocation ({k8}, {k4}) must be k8 >= 0, even k4 >= 0, 1 <= k8 + k4 <= {hidden}")
    if not all(bool(torch.isfinite(t).all()) for t in (mean, comps, std)):
        raise CodecError(f"{where}: holds NaN or Inf")
    if bool((std < 0).any()) or bool((std[: k8 + k4] <= 0).any()):
        raise CodecError(f"{where}: stds must be non-negative, and positive for the components sent")
    gram = comps.T.double() @ comps.double()
    if not torch.allclose(gram, torch.eye(hidden, dtype=torch.float64), atol=1e-3):
        raise CodecError(f"{where}: components are not orthonormal")


def _allocate(variances: torch.Tensor, max_bytes: int, max_rank: int, d8: float, d4: float) -> tuple[int, int]:
    """Reverse water-filling on the {8, 4, 0}-bit menu: with distortion d_b * var per component coded at b
    bits (d_0 = 1) and a Lagrange multiplier lam (bisected to the byte budget), a component goes at 4 bits
    when var * (1 - d4) >= lam / 2 and at 8 bits when var * (d4 - d8) >= lam / 2 -- for d_b ~ 2^-2b that is
    bits ~ log2(sigma / theta) rounded to the menu. Returns (k8, k4), k4 even."""
    var = variances.double()

    def allocation(lam: float) -> tuple[int, int]:
        k8 = min(int((var * (d4 - d8) >= lam / 2).sum()), max_rank)
        k4 = min(int((var * (1 - d4) >= lam / 2).sum()), max_rank) - k8
        return k8, max(k4, 0) // 2 * 2

    low, high = 0.0, float(var[0]) * 4 + 1e-30
    for _ in range(200):
        middle = (low + high) / 2
        if _semantic_bytes(*allocation(middle)) <= max_bytes:
            high = middle
        else:
            low = middle
    k8, k4 = allocation(high)
    if k8 + k4 == 0:  # budget below one group: at least one 8-bit component
        k8 = 1
    return k8, k4


def fit_semantic_basis(
    activations: Mapping[int, torch.Tensor],
    max_bytes_per_token: int = DEFAULT_SEMANTIC_BYTES,
    max_rank: int | None = None,
) -> SemanticBasis:
    """A KLT codebook per boundary: activations[b] is [tokens, hidden] calibration states.

    Each token is weighted by 1 / ||x||^2 (the codec is judged by per-token relative error, and a few
    attention-sink tokens with huge norms would otherwise decide the whole basis); the weighted mean and
    covariance give the rotation (eigenvectors, sorted by decreasing variance, signs fixed so the largest
    entry is positive: the same data always gives the same digest) and the per-component stds. The
    allocation (k8, k4) is chosen by `_allocate` within `max_bytes_per_token` (scales included) and at most
    `max_rank` coefficients, with the 8- and 4-bit distortions measured on the calibration data itself
    (two refinement rounds).
    """
    if max_bytes_per_token < 3:
        raise ValueError(f"max_bytes_per_token must be at least 3, got {max_bytes_per_token}")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    means, components, stds, allocations, predicted = {}, {}, {}, {}, {}
    for boundary, states in activations.items():
        states = states.detach().cpu().to(torch.float64)
        if states.dim() != 2 or states.shape[0] == 0:
            raise ValueError(f"boundary {boundary}: activations must be [tokens, hidden], got {tuple(states.shape)}")
        if not bool(torch.isfinite(states).all()):
            raise ValueError(f"boundary {boundary}: activations hold NaN or Inf")
        norms = torch.linalg.vector_norm(states, dim=1)
        weights = torch.where(norms > 0, norms.clamp_min(1e-30).pow(-2), 0.0)
        weights = weights / weights.sum() if bool(weights.sum() > 0) else torch.full_like(norms, 1 / len(norms))
        mean = weights @ states
        centred = states - mean
        covariance = (centred * weights[:, None]).T @ centred
        variances, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
        order = torch.argsort(variances, descending=True, stable=True)
        variances, vectors = variances[order].clamp_min(0), vectors[:, order]
        peak = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
        vectors = vectors * torch.where(peak < 0, -1.0, 1.0)
        hidden = states.shape[1]
        positive = int((variances > variances[0] * 1e-12).sum()) if bool(variances[0] > 0) else 0
        limit = max(1, min(max_rank or hidden, positive or 1))
        std = variances.sqrt().to(torch.float32)
        std = torch.where(std > 0, std, torch.zeros_like(std))
        if not bool(std[0] > 0):
            std[0] = 1.0  # constant data: any positive std will do
        comps = vectors.to(torch.float32)
        mean = mean.to(torch.float32)
        rows = states.to(torch.float32)
        d8, d4 = 2.0**-16 * 4, 2.0**-8 * 4  # first guess; refined on the data below
        for _ in range(3):
            k8, k4 = _allocate(std.double().pow(2), max_bytes_per_token, limit, d8, d4)
            codes, scales = _semantic_quantize(rows, mean, comps, std, k8, k4)
            z = ((rows - mean) @ comps[:, : k8 + k4]) / std[: k8 + k4]
            zq = _semantic_dequantize(codes, scales, k8, k4)
            err = ((z - zq).pow(2) * weights[:, None].float()).sum(0).double()
            d8 = float(err[:k8].mean()) if k8 else d8
            d4 = float(err[k8:].mean()) if k4 else d4
        decoded = _semantic_reconstruct(codes, scales, mean, comps, std, k8, k4)
        predicted[boundary] = float((_token_errors(rows, decoded).pow(2) * weights.float()).sum().sqrt())
        means[boundary], components[boundary], stds[boundary], allocations[boundary] = mean, comps, std, (k8, k4)
    return SemanticBasis(means, components, stds, allocations, predicted)


@dataclass(frozen=True)
class SemanticEncoding:
    """A semantic encode's message, the worst per-token relative error it measured, and whether it fell back."""

    message: pb.Tensor
    worst_error: float
    fell_back: bool


def _semantic_quantize(
    rows: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor, std: torch.Tensor, k8: int, k4: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients z = ((x - mean) @ components) / std of the k8 + k4 components sent, quantized with one
    absmax scale per token per group: (int8 codes [rows, k8 + k4], float16 scales [rows, groups])."""
    z = ((rows - mean) @ comps[:, : k8 + k4]) / std[: k8 + k4]
    parts, scales = [], []
    for qmax, part in ((127, z[:, :k8]), (7, z[:, k8:])):
        if part.shape[1]:
            values, scale = _quantize(part, None, qmax, "semantic")
            parts.append(values)
            scales.append(scale)
    return torch.cat(parts, dim=1), torch.cat(scales, dim=1)


def _semantic_dequantize(codes: torch.Tensor, scales: torch.Tensor, k8: int, k4: int) -> torch.Tensor:
    """Normalized coefficients [rows, k8 + k4] from codes and float scales [rows, groups]."""
    per_value = torch.cat([scales[:, i : i + 1].expand(-1, k) for i, k in enumerate(k for k in (k8, k4) if k)], dim=1)
    return codes.float() * per_value.float()


def _semantic_reconstruct(
    codes: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor, std: torch.Tensor, k8: int, k4: int
) -> torch.Tensor:
    """(dequantized z * std) @ components.T + mean: the dropped components come back as the mean."""
    coefficients = _semantic_dequantize(codes, scales, k8, k4) * std[: k8 + k4]
    return torch.addmm(mean, coefficients, comps[:, : k8 + k4].T)


def _token_errors(rows: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """||x - x̂|| / ||x|| per row; inf where x is zero but x̂ is not."""
    num = torch.linalg.vector_norm(rows - decoded, dim=1)
    den = torch.linalg.vector_norm(rows, dim=1)
    zero_row = torch.where(num > 0, math.inf, 0.0)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), zero_row)


def encode_semantic(
    tensor: torch.Tensor,
    basis: SemanticBasis,
    boundary: int,
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR,
) -> SemanticEncoding:
    """KLT-codes `tensor` with the basis at `boundary`; falls back to "lossless" if any token's error is too high."""
    tensor = _float_input(tensor.detach().cpu().contiguous(), "semantic", finite=True)
    if boundary not in basis.means:
        raise CodecError(
            f"codec 'semantic': basis {basis.digest} has no boundary {boundary} (it has {basis.boundaries})"
        )
    rows = _rows(tensor)
    if rows.shape[1] != basis.hidden_size:
        raise CodecError(
            f"codec 'semantic': hidden size {rows.shape[1]} does not match the basis's {basis.hidden_size}"
        )
    (k8, k4), mean, comps, std = basis.allocations[boundary], basis.means[boundary], basis.components[boundary], basis.stds[boundary]
    try:
        codes, scales = _semantic_quantize(rows, mean, comps, std, k8, k4)
    except CodecError:  # coefficients beyond float16 scales: far off the basis
        return SemanticEncoding(_encode_lossless(tensor, EncodeOptions()), math.inf, fell_back=True)
    decoded = _semantic_reconstruct(codes, scales, mean, comps, std, k8, k4)
    errors = _token_errors(rows, decoded)
    worst = float(errors.max()) if errors.numel() else 0.0
    if worst > max_relative_error:
        return SemanticEncoding(_encode_lossless(tensor, EncodeOptions()), worst, fell_back=True)
    eight = codes[:, :k8].numpy().view(np.uint8)
    four = np.frombuffer(_pack_int4(codes[:, k8:]), dtype=np.uint8).reshape(len(codes), k4 // 2)
    data = np.ascontiguousarray(np.concatenate([eight, four], axis=1)).tobytes()
    message = _message(tensor, "semantic", data, _to_bytes(scales), f"{basis.digest}/{boundary}")
    return SemanticEncoding(message, worst, fell_back=False)


def _encode_semantic_codec(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
    if options.basis is None or options.boundary is None:
        raise CodecError("codec 'semantic': encoding needs a basis and a block boundary")
    return encode_semantic(tensor, options.basis, options.boundary, options.max_relative_error).message


def _decode_semantic(message: pb.Tensor, layout: _Layout) -> torch.Tensor:
    match = re.fullmatch(r"([0-9a-f]{16})/(\d{1,9})", message.basis)
    if match is None:
        raise CodecError(f"codec 'semantic': basis field {message.basis!r} is not '<16 hex digest>/<boundary>'")
    basis = layout.bases.get(match[1])
    if basis is None:
        held = ", ".join(sorted(layout.bases)) or "none"
        raise CodecError(f"codec 'semantic': unknown basis {match[1]} (this node holds: {held})")
    boundary = int(match[2])
    if boundary not in basis.means:
        raise CodecError(f"codec 'semantic': basis {basis.digest} has no boundary {boundary}")
    if layout.width != basis.hidden_size or not layout.shape:
        raise CodecError(
            f"codec 'semantic': shape {layout.shape} does not end in the basis's hidden size {basis.hidden_size}"
        )
    count, (k8, k4) = layout.rows, basis.allocations[boundary]
    groups = (k8 > 0) + (k4 > 0)
    _expect_length("semantic", "data", len(message.data), count * (k8 + k4 // 2), layout.shape)
    scales = _decode_scales("semantic", message, count, groups, layout.shape)
    raw = _from_bytes(message.data, np.uint8).reshape(count, k8 + k4 // 2)
    eight = raw[:, :k8].contiguous().view(torch.int8)
    if bool((eight == -128).any()):
        raise CodecError("codec 'semantic': coefficient -128 is outside -127..127")
    four = _unpack_int4(raw[:, k8:].contiguous().numpy().tobytes(), count * k4, "semantic").reshape(count, k4)
    codes = torch.cat([eight, four], dim=1)
    mean, comps, std = basis.means[boundary], basis.components[boundary], basis.stds[boundary]
    decoded = _semantic_reconstruct(codes, scales, mean, comps, std, k8, k4)
    if not bool(torch.isfinite(decoded).all()):
        raise CodecError("codec 'semantic': the scales decode to values beyond float32's range")
    return decoded.reshape(layout.shape).to(layout.dtype)


# ---------------------------------------------------------------------------------------------

CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Codec("none", lossless=True, encode=_encode_none, decode=_decode_none),
        Codec("lossless", lossless=True, encode=_encode_lossless, decode=_decode_lossless),
        _cast_codec("fp16", torch.float16),
        _cast_codec("bf16", torch.bfloat16),
        _quantized_codec("int8_token", bits=8, block=None),
        _quantized_codec("int8_block", bits=8, block=INT8_BLOCK_SIZE),
        Codec("int8_outlier", lossless=False, encode=_encode_int8_outlier, decode=_decode_int8_outlier),
        _quantized_codec("int4_block", bits=4, block=INT4_BLOCK_SIZE),
        Codec("semantic", lossless=False, encode=_encode_semantic_codec, decode=_decode_semantic),
    )
}
LOSSLESS_CODECS: frozenset[str] = frozenset(name for name, codec in CODECS.items() if codec.lossless)
