"""How a node holds its weights: fp32, bf16, or int8 weight-only, chosen with `swarm-node join --quant`.

Only the linear layers of the attention and MLP are quantized; norms, rotary tables and the residual
stream stay float32, so the hidden states a node sends and receives are float32 whatever it holds.

- `bf16` keeps each weight in bfloat16 (half the memory). Decode-sized inputs multiply in bfloat16,
  which is faster than float32 on this kind of CPU; longer inputs upcast the weight and multiply in float32,
  because bfloat16 matrix products of many rows are slower here than float32 ones.
- `int8` keeps each weight as int8 with one bfloat16 scale per output channel (a quarter of the memory).
  Decode-sized inputs use torch's int8 weight-only kernel (`_weight_int8pack_mm`, bfloat16 activations);
  longer inputs dequantize the weight to float32 first.

Every linear layer of a span is replaced by one of the classes here (float32 ones too), because they
also know how to multiply "row-exactly": inside `row_exact_products()`, each row of a batch is computed
with the same kernel and summation order as a single-row product. A batched decode step of several
sessions (node.batching) runs in that mode, so batching never changes any session's numbers, and greedy
output stays identical to an unbatched run.

`scripts/eval_fidelity.py` measures speed and agreement with float32 for each mode on SmolLM2.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from edgeswarm.protocol.constants import DECODE_STEP_TOKENS

WeightQuant = Literal["none", "bf16", "int8"]
WEIGHT_QUANT_MODES: tuple[str, ...] = ("none", "bf16", "int8")

_mode = threading.local()


@contextmanager
def row_exact_products() -> Iterator[None]:
    """Within this block (on this thread), linear layers give every row of a batch exactly the result it
    would get alone."""
    previous = getattr(_mode, "row_exact", False)
    _mode.row_exact = True
    try:
        yield
    finally:
        _mode.row_exact = previous


def _row_exact() -> bool:
    return getattr(_mode, "row_exact", False)


def _rowwise_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [n, in] @ weight.T, each row through the single-row kernel: a batched matrix-vector product
    over a broadcast weight, which also reads the weight from memory once for all rows."""
    count, width = rows.shape
    return torch.bmm(rows[:, None, :], weight.T.expand(count, width, weight.shape[0])).squeeze(1)


class _SpanLinear(nn.Module):
    """A linear layer of a span. Its bias (Qwen2's q/k/v have one) stays float32, added after the product."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)

    def _add_bias(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.bias is None else output + self.bias

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])


class FP32Linear(_SpanLinear):
    """A linear layer with its float32 weight, as transformers' own, plus row-exact batching."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.register_buffer("weight", linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _row_exact():
            return self._add_bias(_rowwise_product(self._flat(x), self.weight).reshape(*x.shape[:-1], -1))
        return nn.functional.linear(x, self.weight, self.bias)  # exactly what transformers' own layer computes


class BF16Linear(_SpanLinear):
    """A linear layer whose weight is held in bfloat16."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if _row_exact():
            output = _rowwise_product(self._flat(x).to(torch.bfloat16), self.weight).reshape(*x.shape[:-1], -1).to(x.dtype)
        elif rows <= DECODE_STEP_TOKENS:  # a decode step takes the low-precision kernel
            output = nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        else:
            output = nn.functional.linear(x, self.weight.to(x.dtype))
        return self._add_bias(output)


class Int8Linear(_SpanLinear):
    """A linear layer whose weight is held as int8 with a bfloat16 scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= DECODE_STEP_TOKENS or _row_exact():  # the int8 kernel is row-exact at any batch size
            flat = self._flat(x).to(torch.bfloat16)
            output = torch._weight_int8pack_mm(flat, self.weight, self.scale)
            output = output.reshape(*x.shape[:-1], -1).to(x.dtype)
        else:
            weight = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
            output = nn.functional.linear(x, weight)
        return self._add_bias(output)


_SPAN_LINEAR = {"none": FP32Linear, "bf16": BF16Linear, "int8": Int8Linear}


def quantize_block(block: nn.Module, mode: str) -> nn.Module:
    """Replaces every nn.Linear inside `block` by its `mode` version, in place; returns `block`."""
    if mode not in WEIGHT_QUANT_MODES:
        raise ValueError(f"unknown weight quantization {mode!r}; expected one of {', '.join(WEIGHT_QUANT_MODES)}")
    replacement = _SPAN_LINEAR[mode]
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, replacement(child))
    return block


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (weights, scales, rotary tables)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)
