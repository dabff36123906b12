"""Greedy decoding of a swarm session token by token, for tests and benchmarks."""

from __future__ import annotations

import torch

from edgeswarm.swarm.session import InferenceSession


def greedy_decode(session: InferenceSession, prompt: list[int], count: int, after_token=None) -> list[int]:
    """`count` greedy tokens through `session`, one step each (no EOS stop); `after_token(i)` runs after
    token i is chosen and before it is fed back: the place to inject a failure in tests and benchmarks."""
    logits = session.step(torch.tensor([prompt]))
    tokens: list[int] = []
    for index in range(count):
        tokens.append(int(logits[0].argmax()))
        if after_token is not None:
            after_token(index)
        logits = session.step(torch.tensor([[tokens[-1]]]))
    return tokens
