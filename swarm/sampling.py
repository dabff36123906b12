"""Choosing the next token from logits (greedy, or temperature and nucleus (top-p) sampling), and where
generated text stops."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def next_tokens(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[batch, vocab] logits to [batch] token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError("temperature must be positive when sampling")
    if not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to its first stop string, and whether it had one."""
    cut = min((text.find(marker) for marker in stop if marker in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
