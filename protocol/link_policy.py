"""Which activation codec a link uses: the fastest one the quality budget allows, given the link's speed.

A quality budget names the codecs it accepts (`QUALITY_CODECS`); the tiers follow the fidelity measured
on SmolLM2 by `scripts/eval_fidelity.py` (README, "Quantized weights and compressed links"), as top-1
agreement with float32 over all 6 crossings of a 3-stage pipeline:

- `lossless`: bit-exact only;
- `high`: fp16 (99.9%) and int8_outlier (98.7%), perplexity within +0.2%;
- `balanced`: adds int8_block (97.4%), int8_token (92.4%) and int4_block (72%): for starved links,
  where answers may change;
- `max`: adds the semantic codec (82%).

Among the accepted codecs that both ends support, the link takes the one with the smallest expected time
for a message: encode and decode time (measured once per process on this CPU) plus bytes over the link's
measured bandwidth. A fast link therefore stays uncompressed, and a slow one compresses hard.
Prefill and decode have separate budgets (`LinkQuality.parse("prefill=max,decode=high")`). A budget may
also name one codec (`int8_block`), which pins it wherever both ends support it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from edgeswarm.protocol.constants import DECODE_STEP_TOKENS

QUALITY_CODECS: dict[str, tuple[str, ...]] = {
    "lossless": ("none", "lossless"),
    "high": ("none", "lossless", "fp16", "int8_outlier"),
    "balanced": ("none", "lossless", "fp16", "int8_outlier", "int8_block", "int8_token", "int4_block"),
    "max": ("none", "lossless", "fp16", "int8_outlier", "int8_block", "int8_token", "int4_block", "semantic"),
}


@dataclass(frozen=True)
class LinkQuality:
    """The quality budgets of a link, one for prefill chunks and one for decode steps."""

    prefill: str = "lossless"
    decode: str = "lossless"

    def __post_init__(self) -> None:
        for budget in (self.prefill, self.decode):
            if budget not in QUALITY_CODECS and budget not in QUALITY_CODECS["max"]:
                raise ValueError(
                    f"unknown link quality {budget!r}; expected one of {', '.join(QUALITY_CODECS)} or a codec name "
                    f"({', '.join(QUALITY_CODECS['max'])})"
                )

    @classmethod
    def parse(cls, text: str) -> LinkQuality:
        """`high` (both phases) or `prefill=max,decode=high` (either part may be left out: lossless)."""
        if "=" not in text:
            return cls(prefill=text.strip(), decode=text.strip())
        parts: dict[str, str] = {}
        for item in text.split(","):
            phase, _, budget = item.partition("=")
            if phase.strip() not in ("prefill", "decode"):
                raise ValueError(f"link quality {text!r}: phase must be prefill or decode, got {phase!r}")
            parts[phase.strip()] = budget.strip()
        return cls(**parts)

    def budget_for(self, tokens: int) -> str:
        """The budget of a step of `tokens` rows: decode up to DECODE_STEP_TOKENS, prefill above."""
        return self.decode if tokens <= DECODE_STEP_TOKENS else self.prefill

    def allowed_codecs(self, tokens: int) -> tuple[str, ...]:
        """The codecs a step of `tokens` tokens may use."""
        budget = self.budget_for(tokens)
        return QUALITY_CODECS.get(budget, (budget,))


@dataclass(frozen=True)
class CodecCost:
    """What a codec costs: bytes on the wire per value, and CPU seconds to encode+decode per value and per
    message (the fixed part dominates decode steps of one token)."""

    bytes_per_value: float
    seconds_per_value: float
    seconds_per_message: float = 0.0

    def seconds(self, values: int, bandwidth: float) -> float:
        """Expected time of one message of `values` values over a link of `bandwidth` bytes/s."""
        return self.seconds_per_message + values * (self.bytes_per_value / bandwidth + self.seconds_per_value)


def _round_trip_seconds(codecs, sample: torch.Tensor, name: str, repeats: int = 5) -> tuple[float, int]:
    """Median encode+decode seconds of `sample`, and its encoded size."""
    codecs.decode_tensor(codecs.encode_tensor(sample, name))  # warm up
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        message = codecs.encode_tensor(sample, name)
        codecs.decode_tensor(message)
        timings.append(time.perf_counter() - began)
    return sorted(timings)[repeats // 2], codecs.encoded_size(message)


@lru_cache(maxsize=8)
def measured_costs(hidden_size: int, semantic_bytes_per_token: int = 0) -> dict[str, CodecCost]:
    """Bytes and encode+decode time of every codec, measured here on activation-like values of 1 and of
    128 tokens (the difference separates the per-value from the per-message cost; about 0.1 s, cached)."""
    from edgeswarm.protocol import (
        codecs,  # imported here: measuring needs the codecs, choosing does not
    )

    sample = torch.randn(1, 128, hidden_size)
    sample[..., :2] *= 40.0  # the few huge channels real residual streams have
    costs: dict[str, CodecCost] = {}
    for name in QUALITY_CODECS["max"]:
        if name == "semantic":
            continue
        long_seconds, long_bytes = _round_trip_seconds(codecs, sample, name)
        short_seconds, _ = _round_trip_seconds(codecs, sample[:, :1], name)
        per_value = max(long_seconds - short_seconds, 0.0) / (127 * hidden_size)
        costs[name] = CodecCost(long_bytes / sample.numel(), per_value, max(short_seconds - per_value * hidden_size, 0.0))
    if semantic_bytes_per_token:
        # a rotation into the basis and back (two [hidden, hidden] products per token) on top of quantizing
        base = costs["int8_token"]
        rotation = 2 * base.seconds_per_value
        costs["semantic"] = CodecCost(semantic_bytes_per_token / hidden_size, base.seconds_per_value + rotation, base.seconds_per_message)
    return costs


def choose_codec(
    allowed: tuple[str, ...] | list[str],
    supported: set[str],
    values: int,
    bandwidth: float,
    costs: dict[str, CodecCost],
) -> str:
    """The codec among `allowed` ∩ `supported` with the least expected time for `values` values over a
    link of `bandwidth` bytes/s ("none" if nothing else qualifies)."""
    best, best_seconds = "none", float("inf")
    for name in allowed:
        if name not in supported or name not in costs:
            continue
        seconds = costs[name].seconds(values, bandwidth)
        if seconds < best_seconds:
            best, best_seconds = name, seconds
    return best
