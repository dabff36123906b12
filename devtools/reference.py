"""The whole model in one process, as transformers runs it: the baseline that swarm output must equal."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import DynamicCache

from edgeswarm.model.sources import ModelSource


def load_reference_model(source: ModelSource) -> PreTrainedModel:
    """A transformers causal LM with every block of `source`, loaded through the same readers nodes use."""
    config = source.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head = source.head_weights()
    state = {"model.embed_tokens.weight": head.embed_tokens, "model.norm.weight": head.norm}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = head.lm_head
    for index in range(source.num_blocks):
        state.update({f"model.layers.{index}.{key}": value for key, value in source.block_state(index).items()})
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # non-persistent rotary buffers are not in the state dict: rebuild them off the meta device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if missing:
        raise ValueError(f"the model files lack weights for: {missing[:5]}")
    return model.eval()


def reference_greedy_tokens(model: PreTrainedModel, prompt: list[int], count: int) -> list[int]:
    """`count` greedy tokens from a whole model with its own KV cache, one step at a time (no EOS stop)."""
    cache, tokens = DynamicCache(), []
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(count):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens
