"""Attention for a decode step that several sessions take together (Orca-style selective batching).

A batched decode step stacks one new token of each of several sessions into one [sessions, 1, hidden]
tensor, so that every linear layer of a block runs once for all of them. Attention cannot be batched that
way, because every session has its own KV cache of its own length. Decoder layers therefore get a
`BatchedDecodeCache` in place of a KV cache: it appends row i's key and value to session i's cache, and
attention then runs for each session over its own cache, exactly as in an unbatched decode step.

Our spans pin transformers' attention implementation to "edgeswarm_sdpa" (model.architectures): that is
transformers' SDPA attention, except when a `BatchedDecodeCache` comes along as `batch_cache`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_IMPLEMENTATION = "edgeswarm_sdpa"


class BatchedDecodeCache:
    """Stands in for the KV cache of a batched decode step: row i of the batch belongs to `caches[i]`."""

    def __init__(self, caches: list[DynamicCache]):
        self.caches = caches
        self._keys_and_values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Appends each row's key and value to its own session's cache (called by the attention layer)."""
        self._keys_and_values = [
            cache.update(key_states[row : row + 1], value_states[row : row + 1], layer_idx)
            for row, cache in enumerate(self.caches)
        ]
        return key_states, value_states  # not used: attention reads each session's own cache

    def attend(self, module: nn.Module, query: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        """Each session's query row over its own keys and values, as an unbatched decode step would do."""
        outputs = [
            sdpa_attention_forward(module, query[row : row + 1], keys, values, None, **kwargs)[0]
            for row, (keys, values) in enumerate(self._keys_and_values)
        ]
        return torch.cat(outputs, dim=0), None


def _edgeswarm_sdpa(module, query, key, value, attention_mask, batch_cache: BatchedDecodeCache | None = None, **kwargs):
    if batch_cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return batch_cache.attend(module, query, **kwargs)


AttentionInterface.register(ATTENTION_IMPLEMENTATION, _edgeswarm_sdpa)
# whole models built with this config (node.reference) need SDPA's masks too
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
