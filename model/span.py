"""A contiguous span of decoder blocks, built from transformers' own layers and fed explicit masks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache

from edgeswarm.model.architectures import architecture_of
from edgeswarm.model.batched_attention import BatchedDecodeCache
from edgeswarm.model.quantization import quantize_block, weight_bytes


class SpanCache:
    """One session's state on one span: the KV cache of its layers and the padding mask seen so far."""

    def __init__(self) -> None:
        self.kv = DynamicCache()
        self.padding_mask: torch.Tensor | None = None  # [batch, cached length], True for real tokens

    @property
    def length(self) -> int:
        return 0 if self.padding_mask is None else self.padding_mask.shape[1]

    @property
    def batch_size(self) -> int | None:
        return None if self.padding_mask is None else self.padding_mask.shape[0]

    @property
    def batchable(self) -> bool:
        """Whether its decode steps may join other sessions' (one sequence, no padding so far)."""
        return self.padding_mask is not None and self.padding_mask.shape[0] == 1 and bool(self.padding_mask.all())

    def truncate(self, length: int) -> None:
        """Forgets every position from `length` on (0 <= length <= self.length): speculative tokens that
        were not accepted."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if length < self.length:
            self.kv.crop(length - self.length)
            self.padding_mask = self.padding_mask[:, :length]

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer."""
        return sum(
            tensor.numel() * tensor.element_size()
            for layer in self.kv.layers
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(tensor, torch.Tensor)
        )


def attention_mask_for(padding_mask: torch.Tensor, query_length: int) -> torch.Tensor | None:
    """The boolean [batch, 1, query, key] mask for the last `query_length` positions of `padding_mask`.

    `padding_mask` is [batch, key length], True for real tokens, covering cached and new positions.
    Returns None when plain causal attention is exact, which lets SDPA take the same fast kernel as a
    single-process transformers run (and so give bit-identical results): no padding, and either one
    query token or no cache. A chunk appended to a cache must have an explicit mask, because SDPA's
    `is_causal` aligns the triangle to the top-left corner, not to the end of the cache.
    """
    key_length = padding_mask.shape[1]
    past_length = key_length - query_length
    if bool(padding_mask.all()) and (query_length == 1 or past_length == 0):
        return None
    query_index = torch.arange(past_length, key_length).view(-1, 1)
    causal = torch.arange(key_length).view(1, -1) <= query_index  # [query, key]
    mask = causal.unsqueeze(0) & padding_mask[:, None, :]
    # A padding query would see no key at all, and SDPA turns an all-masked row into NaN; letting it
    # see itself keeps its (ignored) output finite without touching any real token's attention.
    mask[:, torch.arange(query_length), torch.arange(past_length, key_length)] = True
    return mask.unsqueeze(1)


class TransformerSpan(nn.Module):
    """Blocks [start, end) of a model, with the rotary embedding they need."""

    def __init__(
        self,
        config: PretrainedConfig,
        start: int,
        end: int,
        block_states: Iterable[dict[str, torch.Tensor]],
        quant: str = "none",
    ):
        """`block_states` may be a generator: each block is loaded, then quantized (`quant`, see
        model.quantization) before the next is read, so float32 weights of only one block exist at a time."""
        super().__init__()
        architecture = architecture_of(config)
        self.config, self.start, self.end, self.quant = config, start, end, quant
        # Layers are created on the meta device (no memory) and receive the loaded tensors by assignment.
        # Pitfall: layer_idx must be relative to the span. It indexes this span's own KV cache; absolute
        # indices would make the cache grow empty layers 0..start-1, and transformers' mask helpers read
        # the cached length from layer 0, so left-padded batches would silently decode wrong tokens.
        with torch.device("meta"):
            layers = [architecture.decoder_layer(config, layer_idx=i) for i in range(end - start)]
        self.layers = nn.ModuleList(layers)
        loaded = 0
        for layer, state in zip(self.layers, block_states):
            layer.load_state_dict(state, strict=True, assign=True)
            quantize_block(layer, quant)
            loaded += 1
        if loaded != end - start:
            raise ValueError(f"got {loaded} block states for span {start}:{end}")
        # Pitfall: rotary `inv_freq` is a non-persistent buffer, absent from any state dict, so after a
        # meta-device build it must be created for real; building the module outside `meta` does that.
        self.rotary_emb = architecture.rotary_embedding(config=config)
        self.eval()

    @property
    def num_parameters(self) -> int:
        """Values held by the blocks: weights (quantized ones included) and quantization scales."""
        return sum(tensor.numel() for tensor in [*self.layers.parameters(), *self.layers.buffers()])

    @property
    def weight_bytes(self) -> int:
        """Bytes the blocks' weights take as held (after quantization)."""
        return weight_bytes(self.layers)

    @torch.inference_mode()
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor,
        cache: SpanCache | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Runs blocks [start, end) of the span (all of it by default) over new tokens.

        hidden_states: [batch, length, hidden]; position_ids: [batch, length] rotary positions;
        padding_mask: [batch, length], True for real tokens. With a cache, the new tokens attend to
        everything cached before them, and are appended to it.
        """
        padding_mask = padding_mask.to(torch.bool)
        if cache is not None:
            if cache.padding_mask is not None:
                padding_mask = torch.cat([cache.padding_mask, padding_mask], dim=1)
            cache.padding_mask = padding_mask
        mask = attention_mask_for(padding_mask, hidden_states.shape[1])
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        first = self.start if start is None else start
        last = self.end if end is None else end
        for layer in self.layers[first - self.start : last - self.start]:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=None if cache is None else cache.kv,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden_states

    @torch.inference_mode()
    def forward_batched_decode(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, caches: list[SpanCache], start: int, end: int
    ) -> torch.Tensor:
        """One decode token for each of several sessions at once: hidden_states [sessions, 1, hidden],
        position_ids [sessions, 1], caches[i] the i-th session's (each `batchable`). Linear layers run once
        for all rows; attention runs per session over its own cache (node.batched_attention)."""
        for cache in caches:
            cache.padding_mask = torch.cat([cache.padding_mask, torch.ones(1, 1, dtype=torch.bool)], dim=1)
        batch_cache = BatchedDecodeCache([cache.kv for cache in caches])
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers[start - self.start : end - self.start]:
            hidden_states = layer(
                hidden_states,
                attention_mask=None,
                position_ids=position_ids,
                past_key_values=batch_cache,
                use_cache=True,
                position_embeddings=position_embeddings,
                batch_cache=batch_cache,
            )
        return hidden_states
