"""A `TokenStepper` (agent.constrained) whose tokens run through the swarm's model pipeline."""

from __future__ import annotations

import torch

from edgeswarm.swarm.session import InferenceSession


class SessionStepper:
    """Feeds tokens to a swarm `InferenceSession`; the nodes on its route keep the KV cache.

    `fed` lists every token fed so far, so that a later call whose prompt extends them can reuse the
    cache (the KV prefix) and feed only the new tokens.
    """

    def __init__(self, session: InferenceSession):
        self.session = session
        self.fed: list[int] = []

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[1, n] token ids -> [1, vocab] logits of the last position."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        logits = self.session.step(ids)
        self.fed.extend(int(token) for token in ids[0])
        return logits

    @property
    def room(self) -> int:
        """How many more tokens the session can take."""
        return self.session.max_length - self.session.length
