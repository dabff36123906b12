"""The semantic codec: transform coding of hidden states with a basis fitted offline.

- ``semantic``: transform coding (a KLT) with a `SemanticBasis` fitted offline. `basis` is
  "<basis digest>/<block boundary>". Per boundary the basis holds a mean, a full orthonormal rotation
  sorted by decreasing calibration variance, the per-component calibration stds, and an allocation
  (k8, k4, k4 even): the normalized coefficients z = ((x - mean) @ components) / std of the leading k8
  components are sent as int8 (-127..127), the next k4 as int4 (-7..7), the rest are dropped. `data`
  holds, per row, the k8 int8 values then the k4 values packed as int4_block does (k4 / 2 bytes);
  `scales` holds, per row, one float16 absmax scale per non-empty group (8-bit first). Decoding computes
  (dequant(z) * std) @ components[:, :k8 + k4].T + mean. When some token would come back with a relative
  error above `max_relative_error`, the encoder sends the message with the ``lossless`` codec instead.

Fitting a basis and reading or writing basis files live in `edgeswarm.model.semantic_basis`.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.codecs.base import (
    DEFAULT_MAX_RELATIVE_ERROR,
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
from edgeswarm.protocol.codecs.blockwise import (
    INT4_QMAX,
    INT8_QMAX,
    decode_scales,
    pack_int4,
    quantize,
    unpack_int4,
)
from edgeswarm.protocol.codecs.casts import LOSSLESS


class SemanticBasis:
    """Per block boundary, a KLT codebook for the hidden states there (see `model.semantic_basis`).

    `means[b]` is float32 [hidden]; `components[b]` float32 [hidden, hidden], an orthonormal rotation whose
    columns are sorted by decreasing calibration variance; `stds[b]` float32 [hidden] the calibration
    standard deviation of each component (non-increasing); `allocations[b]` = (k8, k4): the leading k8
    components are sent at 8 bits, the next k4 (even) at 4 bits, the rest dropped.
    `predicted_errors[b]` is the calibration relative error the fit predicted (informative only).
    `digest` (16 hex chars of sha256 over format, boundaries, allocations and tensor bytes) names the basis
    on the wire.
    """

    FORMAT = "edgeswarm-semantic-basis/2"  # hashed into the digest; saved files of another format are refused

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
        """The block boundaries the basis covers, ascending."""
        return list(self.means)

    def rank(self, boundary: int) -> int:
        """Number of coefficients sent per token at a boundary (k8 + k4)."""
        return sum(self.allocations[boundary])

    def bytes_per_token(self, boundary: int) -> int:
        """Wire bytes per token at a boundary: k8 int8 values, k4 packed nibbles and the float16 scales."""
        k8, k4 = self.allocations[boundary]
        return semantic_bytes(k8, k4)

    def _compute_digest(self) -> str:
        digest = hashlib.sha256(self.FORMAT.encode())
        for boundary, mean in self.means.items():
            digest.update(struct.pack("<qqq", boundary, *self.allocations[boundary]))
            for tensor in (mean, self.components[boundary], self.stds[boundary]):
                digest.update(struct.pack("<q", tensor.numel()))
                digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]


def semantic_bytes(k8: int, k4: int) -> int:
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


@dataclass(frozen=True)
class SemanticEncoding:
    """A semantic encode's message, the worst per-token relative error it measured, and whether it fell back."""

    message: pb.Tensor
    worst_error: float
    fell_back: bool


def semantic_coefficients(
    rows: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor, std: torch.Tensor, count: int
) -> torch.Tensor:
    """The normalized coefficients z = ((x - mean) @ components) / std of the leading `count` components."""
    return ((rows - mean) @ comps[:, :count]) / std[:count]


def semantic_quantize(
    rows: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor, std: torch.Tensor, k8: int, k4: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients z = ((x - mean) @ components) / std of the k8 + k4 components sent, quantized with one
    absmax scale per token per group: (int8 codes [rows, k8 + k4], float16 scales [rows, groups])."""
    z = semantic_coefficients(rows, mean, comps, std, k8 + k4)
    parts, scales = [], []
    for qmax, part in ((INT8_QMAX, z[:, :k8]), (INT4_QMAX, z[:, k8:])):
        if part.shape[1]:
            values, scale = quantize(part, None, qmax, "semantic")
            parts.append(values)
            scales.append(scale)
    return torch.cat(parts, dim=1), torch.cat(scales, dim=1)


def semantic_dequantize(codes: torch.Tensor, scales: torch.Tensor, k8: int, k4: int) -> torch.Tensor:
    """Normalized coefficients [rows, k8 + k4] from codes and float scales [rows, groups]."""
    per_value = torch.cat([scales[:, i : i + 1].expand(-1, k) for i, k in enumerate(k for k in (k8, k4) if k)], dim=1)
    return codes.float() * per_value.float()


def semantic_reconstruct(
    codes: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor, std: torch.Tensor, k8: int, k4: int
) -> torch.Tensor:
    """(dequantized z * std) @ components.T + mean: the dropped components come back as the mean."""
    coefficients = semantic_dequantize(codes, scales, k8, k4) * std[: k8 + k4]
    return torch.addmm(mean, coefficients, comps[:, : k8 + k4].T)


def token_errors(rows: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
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
    tensor = float_input(tensor.detach().cpu().contiguous(), "semantic", finite=True)
    if boundary not in basis.means:
        raise CodecError(
            f"codec 'semantic': basis {basis.digest} has no boundary {boundary} (it has {basis.boundaries})"
        )
    rows = as_rows(tensor)
    if rows.shape[1] != basis.hidden_size:
        raise CodecError(
            f"codec 'semantic': hidden size {rows.shape[1]} does not match the basis's {basis.hidden_size}"
        )
    (k8, k4), mean, comps, std = basis.allocations[boundary], basis.means[boundary], basis.components[boundary], basis.stds[boundary]
    try:
        codes, scales = semantic_quantize(rows, mean, comps, std, k8, k4)
    except CodecError:  # coefficients beyond float16 scales: far off the basis
        return SemanticEncoding(LOSSLESS.encode(tensor, EncodeOptions()), math.inf, fell_back=True)
    decoded = semantic_reconstruct(codes, scales, mean, comps, std, k8, k4)
    errors = token_errors(rows, decoded)
    worst = float(errors.max()) if errors.numel() else 0.0
    if worst > max_relative_error:
        return SemanticEncoding(LOSSLESS.encode(tensor, EncodeOptions()), worst, fell_back=True)
    eight = codes[:, :k8].numpy().view(np.uint8)
    four = np.frombuffer(pack_int4(codes[:, k8:]), dtype=np.uint8).reshape(len(codes), k4 // 2)
    data = np.ascontiguousarray(np.concatenate([eight, four], axis=1)).tobytes()
    message = encoded_message(tensor, "semantic", data, tensor_to_bytes(scales), f"{basis.digest}/{boundary}")
    return SemanticEncoding(message, worst, fell_back=False)


def _encode_semantic_codec(tensor: torch.Tensor, options: EncodeOptions) -> pb.Tensor:
    if options.basis is None or options.boundary is None:
        raise CodecError("codec 'semantic': encoding needs a basis and a block boundary")
    return encode_semantic(tensor, options.basis, options.boundary, options.max_relative_error).message


def _decode_semantic(message: pb.Tensor, layout: WireLayout) -> torch.Tensor:
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
    expect_length("semantic", "data", len(message.data), count * (k8 + k4 // 2), layout.shape)
    scales = decode_scales("semantic", message, count, groups, layout.shape)
    raw = tensor_from_bytes(message.data, np.uint8).reshape(count, k8 + k4 // 2)
    eight = raw[:, :k8].contiguous().view(torch.int8)
    if bool((eight == -128).any()):
        raise CodecError("codec 'semantic': coefficient -128 is outside -127..127")
    four = unpack_int4(raw[:, k8:].contiguous().numpy().tobytes(), count * k4, "semantic").reshape(count, k4)
    codes = torch.cat([eight, four], dim=1)
    mean, comps, std = basis.means[boundary], basis.components[boundary], basis.stds[boundary]
    decoded = semantic_reconstruct(codes, scales, mean, comps, std, k8, k4)
    if not bool(torch.isfinite(decoded).all()):
        raise CodecError("codec 'semantic': the scales decode to values beyond float32's range")
    return decoded.reshape(layout.shape).to(layout.dtype)


SEMANTIC = Codec("semantic", lossless=False, encode=_encode_semantic_codec, decode=_decode_semantic)
