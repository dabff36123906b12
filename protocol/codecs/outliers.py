"""int8 blocks of 64 with the message's few outlier channels kept apart in float16.

- ``int8_outlier``: int8_block with the message's 3 outlier channels (largest |x| over all its rows)
  taken out first: `scales` holds their 3 int16 column indices, then their float16 values [rows, 3],
  then the int8_block scales [rows, ceil(width / 64)]; `data` is int8_block's, with 0 in those columns.
  Residual streams of LLMs carry a few channels ~50x larger than the rest ("massive activations");
  without them, the 64-value blocks they sit in keep 6 more bits of precision.
"""

from __future__ import annotations

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
    fits_fp16,
    float_input,
    tensor_from_bytes,
    tensor_to_bytes,
)
from edgeswarm.protocol.codecs.blockwise import (
    INT8_BLOCK_SIZE,
    INT8_QMAX,
    blocks_per_row,
    decode_scales,
    dequantize,
    quantize,
)

OUTLIER_CHANNELS = 3  # int8_outlier: channels per message sent apart in float16


def _outlier_channels(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` channels with the largest |x| anywhere in the message, ascending."""
    count = min(count, rows.shape[1]) if rows.numel() else 0
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    return rows.abs().amax(dim=0).topk(count).indices.sort().values


def _encode_int8_outlier(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
    name = "int8_outlier"
    float_input(tensor, name, finite=True)
    rows = as_rows(tensor)
    channels = _outlier_channels(rows, OUTLIER_CHANNELS)
    outliers = rows[:, channels]
    if outliers.numel() and not fits_fp16(outliers):
        raise CodecError(f"codec {name!r}: outlier values beyond float16's range; use 'bf16' or 'lossless'")
    inliers = rows.clone()
    inliers[:, channels] = 0.0
    values, scales = quantize(inliers, INT8_BLOCK_SIZE, INT8_QMAX, name)
    side = tensor_to_bytes(channels.to(torch.int16)) + tensor_to_bytes(outliers.to(torch.float16)) + tensor_to_bytes(scales)
    return encoded_message(tensor, name, values.numpy().tobytes(), side)


def _decode_int8_outlier(message: pb.Tensor, layout: WireLayout) -> torch.Tensor:
    name = "int8_outlier"
    count, width = layout.rows, layout.width
    expect_length(name, "data", len(message.data), layout.numel, layout.shape)
    kept = min(OUTLIER_CHANNELS, width) if layout.numel else 0
    blocks = blocks_per_row(width, INT8_BLOCK_SIZE)
    expect_length(name, "scales", len(message.scales), 2 * kept + 2 * count * kept + 2 * count * blocks, layout.shape)
    channels = tensor_from_bytes(message.scales[: 2 * kept], np.int16).long()
    if bool((channels < 0).any() or (channels >= width).any()) or channels.unique().numel() != channels.numel():
        raise CodecError(f"codec {name!r}: outlier channels {channels.tolist()} are not distinct columns of width {width}")
    outliers = tensor_from_bytes(message.scales[2 * kept : 2 * kept + 2 * count * kept], np.float16).float().reshape(count, kept)
    if not bool(torch.isfinite(outliers).all()):
        raise CodecError(f"codec {name!r}: outlier values hold NaN or Inf")
    scales_message = pb.Tensor(scales=message.scales[2 * kept + 2 * count * kept :])
    scales = decode_scales(name, scales_message, count, blocks, layout.shape)
    values = tensor_from_bytes(message.data, np.int8)
    if bool((values == -128).any()):
        raise CodecError(f"codec {name!r}: value -128 is outside -127..127")
    rows = dequantize(values.reshape(count, width), scales, INT8_BLOCK_SIZE)
    rows[:, channels] = outliers
    return rows.reshape(layout.shape).to(layout.dtype)


INT8_OUTLIER = Codec("int8_outlier", lossless=False, encode=_encode_int8_outlier, decode=_decode_int8_outlier)
