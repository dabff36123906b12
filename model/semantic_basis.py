"""Fitting the semantic codec's basis from calibration states, and reading and writing basis files.

The wire format -- what a `SemanticBasis` holds and how messages are encoded and decoded with it -- is
`edgeswarm.protocol.codecs.semantic`; `model.calibration` runs the model to get the calibration states and
caches the basis it fits here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from edgeswarm.protocol.codecs import CodecError, SemanticBasis
from edgeswarm.protocol.codecs.semantic import (
    semantic_bytes,
    semantic_coefficients,
    semantic_dequantize,
    semantic_quantize,
    semantic_reconstruct,
    token_errors,
)

DEFAULT_SEMANTIC_BYTES = 272  # wire bytes per token a fitted basis may spend (8.5x at hidden 576)


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
        if semantic_bytes(*allocation(middle)) <= max_bytes:
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
            codes, scales = semantic_quantize(rows, mean, comps, std, k8, k4)
            z = semantic_coefficients(rows, mean, comps, std, k8 + k4)
            zq = semantic_dequantize(codes, scales, k8, k4)
            err = ((z - zq).pow(2) * weights[:, None].float()).sum(0).double()
            d8 = float(err[:k8].mean()) if k8 else d8
            d4 = float(err[k8:].mean()) if k4 else d4
        decoded = semantic_reconstruct(codes, scales, mean, comps, std, k8, k4)
        predicted[boundary] = float((token_errors(rows, decoded).pow(2) * weights.float()).sum().sqrt())
        means[boundary], components[boundary], stds[boundary], allocations[boundary] = mean, comps, std, (k8, k4)
    return SemanticBasis(means, components, stds, allocations, predicted)


def save_basis(basis: SemanticBasis, path: str | Path) -> None:
    """Writes a basis as safetensors ("mean.<b>", "components.<b>", "std.<b>", int64 "allocation.<b>")
    with its format and digest in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for b in basis.boundaries:
        tensors[f"mean.{b}"] = basis.means[b]
        tensors[f"components.{b}"] = basis.components[b]
        tensors[f"std.{b}"] = basis.stds[b]
        tensors[f"allocation.{b}"] = torch.tensor(basis.allocations[b], dtype=torch.int64)
    metadata = {
        "format": SemanticBasis.FORMAT,
        "digest": basis.digest,
        "boundaries": ",".join(map(str, basis.boundaries)),
        "bytes_per_token": ",".join(str(basis.bytes_per_token(b)) for b in basis.boundaries),
        "predicted_errors": ",".join(f"{b}:{e:.6g}" for b, e in basis.predicted_errors.items()),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_basis(path: str | Path) -> SemanticBasis:
    """Reads a saved basis, refusing (CodecError) another format or a file whose contents do not hash to
    its digest."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise CodecError(f"semantic basis {path}: not a readable safetensors file ({error})") from error
    if metadata.get("format") != SemanticBasis.FORMAT:
        raise CodecError(f"semantic basis {path}: format is {metadata.get('format')!r}, expected {SemanticBasis.FORMAT!r}")
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
    basis = SemanticBasis(parts["mean"], parts["components"], parts["std"], allocations, predicted)
    if basis.digest != metadata.get("digest"):
        raise CodecError(
            f"semantic basis {path}: contents hash to {basis.digest}, the file claims "
            f"{metadata.get('digest')!r}: the file was altered or corrupted"
        )
    return basis
