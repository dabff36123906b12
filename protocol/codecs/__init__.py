"""Activation codecs: how hidden states are squeezed onto the links between nodes.

One module per codec family, each describing its byte layout:

- `base`: the `Codec` interface, `CodecError`, the registry (`CODECS`), `encode_tensor` /
  `decode_tensor` / `encoded_size` and the checks and byte helpers codecs share;
- `casts`: ``none``, ``lossless`` (byte-shuffled zlib), ``fp16`` and ``bf16``;
- `blockwise`: ``int8_token``, ``int8_block`` and ``int4_block``, and the block quantization they share;
- `outliers`: ``int8_outlier``;
- `semantic`: ``semantic``, with the `SemanticBasis` it encodes and decodes with (fitting a basis and
  basis files are in `edgeswarm.model.semantic_basis`).

Everything other modules use is imported from here.
"""

from edgeswarm.protocol.codecs.base import (
    CODECS,
    DEFAULT_MAX_RELATIVE_ERROR,
    FP16_MAX,
    MAX_DIMS,
    Codec,
    CodecError,
    EncodeOptions,
    codec_names,
    decode_tensor,
    encode_tensor,
    encoded_size,
    fits_fp16,
    get_codec,
    register,
    relative_error,
)
from edgeswarm.protocol.codecs.blockwise import (
    INT4_BLOCK,
    INT4_BLOCK_SIZE,
    INT4_QMAX,
    INT8_BLOCK,
    INT8_BLOCK_SIZE,
    INT8_QMAX,
    INT8_TOKEN,
)
from edgeswarm.protocol.codecs.casts import BF16, FP16, LOSSLESS, NONE
from edgeswarm.protocol.codecs.outliers import INT8_OUTLIER, OUTLIER_CHANNELS
from edgeswarm.protocol.codecs.semantic import (
    SEMANTIC,
    SemanticBasis,
    SemanticEncoding,
    encode_semantic,
)
from edgeswarm.protocol.tensors import MAX_TENSOR_BYTES

# The order nodes announce their codecs in.
register(NONE, LOSSLESS, FP16, BF16, INT8_TOKEN, INT8_BLOCK, INT8_OUTLIER, INT4_BLOCK, SEMANTIC)
LOSSLESS_CODECS: frozenset[str] = frozenset(name for name, codec in CODECS.items() if codec.lossless)

__all__ = [
    "CODECS",
    "DEFAULT_MAX_RELATIVE_ERROR",
    "FP16_MAX",
    "INT4_BLOCK_SIZE",
    "INT4_QMAX",
    "INT8_BLOCK_SIZE",
    "INT8_QMAX",
    "LOSSLESS_CODECS",
    "MAX_DIMS",
    "MAX_TENSOR_BYTES",
    "OUTLIER_CHANNELS",
    "Codec",
    "CodecError",
    "EncodeOptions",
    "SemanticBasis",
    "SemanticEncoding",
    "codec_names",
    "decode_tensor",
    "encode_semantic",
    "encode_tensor",
    "encoded_size",
    "fits_fp16",
    "get_codec",
    "relative_error",
]
