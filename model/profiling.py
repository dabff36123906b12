"""What a node measures about itself before it announces: compute speed and memory per block."""

from __future__ import annotations

import time

import psutil
import torch
from transformers import PretrainedConfig

from edgeswarm.model.architectures import architecture_of
from edgeswarm.model.quantization import quantize_block, weight_bytes
from edgeswarm.model.span import SpanCache, TransformerSpan


def block_parameter_bytes(config: PretrainedConfig, quant: str = "none") -> int:
    """Bytes of one decoder block's weights held as `quant` (see model.quantization), counted on a layer
    built on the meta device (no memory used)."""
    architecture = architecture_of(config)
    with torch.device("meta"):
        layer = quantize_block(architecture.decoder_layer(config, layer_idx=0), quant)
    return weight_bytes(layer)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> int:
    """KV-cache bytes that one token of one sequence costs in one block."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * dtype.itemsize


def blocks_that_fit(
    config: PretrainedConfig, memory_fraction: float = 0.5, reserved_tokens: int = 8192, quant: str = "none"
) -> int:
    """How many blocks fit in `memory_fraction` of available memory, with KV room for `reserved_tokens`."""
    per_block = block_parameter_bytes(config, quant) + reserved_tokens * kv_bytes_per_token(config)
    budget = psutil.virtual_memory().available * memory_fraction
    return max(1, min(int(config.num_hidden_layers), int(budget // per_block)))


def measure_decode_throughput(span: TransformerSpan, context_tokens: int = 32, steps: int = 8) -> float:
    """Decode tokens/s through ONE block of `span`, timed on real decode steps with a warm KV cache."""
    hidden_size = span.config.hidden_size
    cache = SpanCache()
    prompt = torch.randn(1, context_tokens, hidden_size)
    span(prompt, torch.arange(context_tokens)[None], torch.ones(1, context_tokens, dtype=torch.bool), cache)
    token = torch.randn(1, 1, hidden_size)
    mask = torch.ones(1, 1, dtype=torch.bool)
    timings = []
    for step in range(steps):
        position = torch.tensor([[context_tokens + step]])
        began = time.perf_counter()
        span(token, position, mask, cache)
        timings.append(time.perf_counter() - began)
    median_step = sorted(timings)[len(timings) // 2]
    return (span.end - span.start) / median_step


def measure_prefill_throughput(span: TransformerSpan, tokens: int = 64) -> float:
    """Prefill tokens/s through ONE block of `span`, from the best of three timed prompts."""
    hidden = torch.randn(1, tokens, span.config.hidden_size)
    positions, mask = torch.arange(tokens)[None], torch.ones(1, tokens, dtype=torch.bool)
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        span(hidden, positions, mask)
        best = min(best, time.perf_counter() - began)
    return tokens * (span.end - span.start) / best
