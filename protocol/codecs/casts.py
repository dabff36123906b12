"""Codecs that keep every value: raw bytes, byte-shuffled zlib, and the 16-bit float casts.

- ``none`` (or an empty codec field): raw values in `dtype`, exactly `serialize_tensor`'s format.
  No scales. Any wire dtype; the only codec that carries integer or bool tensors.
- ``lossless``: the tensor's own bytes (itemsize bytes per value, e.g. 4 for float32) byte-shuffled
  -- all first bytes, then all second bytes, ... -- and compressed with zlib level 1. Exact.
- ``fp16`` / ``bf16``: the values cast to float16 / bfloat16, 2 bytes each. Encoding refuses
  values beyond float16's range (|x| > 65504) rather than turning them into infinities.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.codecs.base import (
    FP16_MAX,
    Codec,
    CodecError,
    EncodeOptions,
    WireLayout,
    decode_raw,
    dtype_itemsize,
    encoded_message,
    expect_length,
    fits_fp16,
    float_input,
    tensor_from_bytes,
    tensor_to_bytes,
)
from edgeswarm.protocol.tensors import MAX_TENSOR_BYTES, serialize_tensor

# ---------------------------------------------------------------------------------------------
# none


def _encode_none(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
    try:
        return serialize_tensor(tensor)
    except TypeError as error:
        raise CodecError(f"codec 'none': {error}") from error


def _decode_none(message: pb.Tensor, layout: WireLayout) -> torch.Tensor:
    return decode_raw(message, MAX_TENSOR_BYTES)  # decode_tensor takes the raw path itself


# ---------------------------------------------------------------------------------------------
# lossless: byte-shuffle + zlib


def _encode_lossless(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
    float_input(tensor, "lossless", finite=False)
    planes = tensor.reshape(-1).view(torch.uint8).reshape(-1, tensor.element_size()).T.contiguous()
    return encoded_message(tensor, "lossless", zlib.compress(planes.numpy().tobytes(), 1))


def _decode_lossless(message: pb.Tensor, layout: WireLayout) -> torch.Tensor:
    itemsize = dtype_itemsize(layout.dtype)
    expected = layout.numel * itemsize
    raw = _bounded_inflate(message.data, expected)
    planes = tensor_from_bytes(raw, np.uint8).reshape(itemsize, layout.numel)
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
        float_input(tensor, name, finite=True)
        if wire == torch.float16 and not fits_fp16(tensor):
            raise CodecError(
                f"codec {name!r}: values up to {tensor.float().abs().max().item():.4g} exceed float16's "
                f"range (±{FP16_MAX:g}); use 'bf16' or another codec"
            )
        return encoded_message(tensor, name, tensor_to_bytes(tensor.to(wire)))

    def decode(message: pb.Tensor, layout: WireLayout) -> torch.Tensor:
        expect_length(name, "data", len(message.data), layout.numel * 2, layout.shape)
        values = tensor_from_bytes(message.data, np.float16 if wire == torch.float16 else np.int16)
        return values.view(wire).reshape(layout.shape).to(layout.dtype)

    return Codec(name, lossless=False, encode=encode, decode=decode)


NONE = Codec("none", lossless=True, encode=_encode_none, decode=_decode_none)
LOSSLESS = Codec("lossless", lossless=True, encode=_encode_lossless, decode=_decode_lossless)
FP16 = _cast_codec("fp16", torch.float16)
BF16 = _cast_codec("bf16", torch.bfloat16)
