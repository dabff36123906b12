"""Which activation codec a link uses: the fastest one the quality budget allows, given the link's speed.

A quality budget names the codecs it accepts (`QUALITY_CODECS`); the tiers follow the fidelity measured
on SmolLM2 by `scripts/eval_fidelity.py` (README, "Compressed links"):

- `lossless`: bit-exact only;
- `high`: top-1 agreement with float32 of at least 99% and perplexity within 1%;
- `balanced`: top-1 agreement of at least 97%;
- `max`: anything down to the semantic (low-rank) codec, about 95%.

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

QUALITY_CODECS: dict[str, tuple[str, ...]] = {
    "lossless": ("none", "lossless"),
    "high": ("none", "lossless", "fp16", "int8_outlier"),
    "balanced": ("none", "lossless", "fp16", "int8_outlier", "int8_block", "int8_token", "int4_block"),
    "max": ("none", "lossless", "fp16", "int8_outlier", "int8_block", "int8_token", "int4_block", "semantic"),
}

# Steps with more tokens than this are prefill chunks and take the prefill budget.
DECODE_TOKENS = 8


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
        return self.decode if tokens <= DECODE_TOKENS else self.prefill

    def allowed_codecs(self, tokens: int) -> tuple[str, ...]:
        """The codecs a step of `tokens` tokens may use."""
        budget = self.budget_for(tokens)
        return QUALITY_CODECS.get(budget, (budget,))


@dataclass(frozen=True)
class CodecCost:
    """What a codec costs per value of a hidden state: bytes on the wire and CPU seconds to encode+decode."""

    bytes_per_value: float
    seconds_per_value: float


@lru_cache(maxsize=8)
def measured_costs(hidden_size: int, semantic_rank: int = 0) -> dict[str, CodecCost]:
    """Bytes and encode+decode time per value of every codec, measured here on a [1, 128, hidden] tensor
    of activation-like values (about 50 ms; cached per process)."""
    from protocol import codecs  # codecs import this module's budgets indirectly; keep the import local

    sample = torch.randn(1, 128, hidden_size)
    sample[..., :2] *= 40.0  # the few huge channels real residual streams have
    values = sample.numel()
    costs: dict[str, CodecCost] = {}
    for name in QUALITY_CODECS["max"]:
        if name == "semantic":
            continue
        codecs.decode_tensor(codecs.encode_tensor(sample, name))  # warm up
        began = time.perf_counter()
        message = codecs.encode_tensor(sample, name)
        codecs.decode_tensor(message)
        costs[name] = CodecCost(codecs.encoded_size(message) / values, (time.perf_counter() - began) / values)
    if semantic_rank:
        # k int8 coefficients and a 2-byte scale per token; two small matrix products per token
        projection = 2 * semantic_rank / hidden_size * costs["int8_token"].seconds_per_value
        costs["semantic"] = CodecCost(
            (semantic_rank + 2) / hidden_size, costs["int8_token"].seconds_per_value + projection
        )
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
        cost = costs[name]
        seconds = values * (cost.bytes_per_value / bandwidth + cost.seconds_per_value)
        if seconds < best_seconds:
            best, best_seconds = name, seconds
    return best
