"""Tiny Llama-family models with seeded random weights, saved as real (sharded) safetensors directories."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_config(family: str = "llama", num_layers: int = 6):
    return _CONFIGS[family](
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def save_tiny_model(directory: Path, family: str = "llama", num_layers: int = 6, seed: int = 0) -> Path:
    """Builds a seeded random model and saves it in several safetensors shards with an index."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers), dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so that tokens depend visibly on every block
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(directory, max_shard_size="150KB")
    return directory
