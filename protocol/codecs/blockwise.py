"""Block quantization: int8 per token or per block of 64 values, int4 per block of 32.

- ``int8_token``: one int8 in -127..127 per value, row-major; `scales` holds one float16 scale
  per row (x = q * scale, scale = max|row| / 127).
- ``int8_block``: one int8 in -127..127 per value, row-major; every row is cut into blocks of 64
  consecutive values (the last block of a row may be shorter), and `scales` holds one float16
  scale per block, row-major ([rows, ceil(width / 64)]).
- ``int4_block``: values in -7..7 over blocks of 32 (scales laid out as for int8_block), stored
  as the nibble q + 8 (1..15), two per byte over the flattened tensor: value 2i in the low nibble
  of byte i, value 2i+1 in the high nibble; an odd count is padded with the nibble 8 (zero).

Quantization scales are rounded *up* to float16, so no value is clipped and the error of every
quantized value is at most half its block's scale. The int8_outlier and semantic codecs quantize,
pack and check scales with the helpers here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.codecs.base import (
    Codec,
    CodecError,
    EncodeOptions,
    WireLayout,
    as_rows,
    encoded_message,
    expect_length,
    float_input,
    tensor_from_bytes,
    tensor_to_bytes,
)

INT8_BLOCK_SIZE = 64
INT4_BLOCK_SIZE = 32
INT8_QMAX = 127  # int8 values are -127..127 (never -128), symmetric around 0
INT4_QMAX = 7  # int4 values are -7..7 (never -8)


def blocks_per_row(width: int, block: int | None) -> int:
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


def quantize(rows: torch.Tensor, block: int | None, qmax: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of [rows, width] float32: (int8 values, float16 scales [rows, blocks])."""
    scales = _fp16_scales(_block_absmax(rows, block), qmax, name)
    per_value = scales.float()[:, _block_index(rows.shape[1], block)]
    # an all-zero block has scale 0: dividing its zeros by `tiny` keeps them zero
    values = torch.round(rows / per_value.clamp_min(torch.finfo(torch.float32).tiny))
    values = values.clamp_(-qmax, qmax).to(torch.int8)
    return values, scales


def dequantize(values: torch.Tensor, scales: torch.Tensor, block: int | None) -> torch.Tensor:
    """float32 [rows, width] from int8 values [rows, width] and float scales [rows, blocks]."""
    return values.float() * scales[:, _block_index(values.shape[1], block)]


def decode_scales(name: str, message: pb.Tensor, count: int, per_row: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The float16 scales of a message as float32 [count, per_row], checked finite and non-negative."""
    expect_length(name, "scales", len(message.scales), count * per_row * 2, shape)
    scales = tensor_from_bytes(message.scales, np.float16).float().reshape(count, per_row)
    if not bool(torch.isfinite(scales).all()):
        raise CodecError(f"codec {name!r}: scales hold NaN or Inf")
    if bool((scales < 0).any()):
        raise CodecError(f"codec {name!r}: scales hold negative values")
    return scales


def pack_int4(values: torch.Tensor) -> bytes:
    """Values in -7..7 as nibbles q + 8, two per byte, low nibble first."""
    nibbles = (values.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
    pairs = nibbles.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()


def unpack_int4(data: bytes, count: int, name: str) -> torch.Tensor:
    packed = tensor_from_bytes(data, np.uint8)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    if nibbles.numel() > count and int(nibbles[-1]) != 8:
        raise CodecError(f"codec {name!r}: the padding nibble after an odd number of values must be 8 (zero)")
    nibbles = nibbles[:count]
    if bool((nibbles == 0).any()):
        raise CodecError(f"codec {name!r}: nibble 0 (value -8) is outside -7..7")
    return (nibbles.to(torch.int16) - 8).to(torch.int8)


def _quantized_codec(name: str, bits: int, block: int | None) -> Codec:
    qmax = INT8_QMAX if bits == 8 else INT4_QMAX

    def encode(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
        float_input(tensor, name, finite=True)
        values, scales = quantize(as_rows(tensor), block, qmax, name)
        data = values.numpy().tobytes() if bits == 8 else pack_int4(values)
        return encoded_message(tensor, name, data, tensor_to_bytes(scales))

    def decode(message: pb.Tensor, layout: WireLayout) -> torch.Tensor:
        count, width = layout.rows, layout.width
        expected = layout.numel if bits == 8 else -(-layout.numel // 2)
        expect_length(name, "data", len(message.data), expected, layout.shape)
        scales = decode_scales(name, message, count, blocks_per_row(width, block), layout.shape)
        if bits == 8:
            values = tensor_from_bytes(message.data, np.int8)
            if bool((values == -128).any()):
                raise CodecError(f"codec {name!r}: value -128 is outside -127..127")
        else:
            values = unpack_int4(message.data, layout.numel, name)
        rows = dequantize(values.reshape(count, width), scales, block)
        return rows.reshape(layout.shape).to(layout.dtype)

    return Codec(name, lossless=False, encode=encode, decode=decode)


INT8_TOKEN = _quantized_codec("int8_token", bits=8, block=None)
INT8_BLOCK = _quantized_codec("int8_block", bits=8, block=INT8_BLOCK_SIZE)
INT4_BLOCK = _quantized_codec("int4_block", bits=4, block=INT4_BLOCK_SIZE)
