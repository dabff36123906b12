"""The ends of the model the client keeps for itself: token embeddings in, final norm and LM head out."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from edgeswarm.model.architectures import architecture_of
from edgeswarm.model.sources import HeadWeights


class ClientHead:
    """Turns token ids into the first block's input and the last block's output into logits."""

    def __init__(self, config: PretrainedConfig, weights: HeadWeights):
        self.embed_tokens = weights.embed_tokens
        self.lm_head = weights.lm_head
        self.norm = architecture_of(config).rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm.weight.data = weights.norm
        self.vocab_size = weights.embed_tokens.shape[0]

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        return torch.nn.functional.embedding(input_ids, self.embed_tokens)

    @torch.inference_mode()
    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states) @ self.lm_head.T
