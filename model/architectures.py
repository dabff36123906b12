"""The model families a node can serve, and the transformers classes that implement each one's blocks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

from edgeswarm.model.batched_attention import ATTENTION_IMPLEMENTATION


@dataclass(frozen=True)
class Architecture:
    """The building blocks of one Llama-shaped family."""

    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    rms_norm: type[nn.Module]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding, modeling_llama.LlamaRMSNorm
    ),
    "mistral": Architecture(
        modeling_mistral.MistralDecoderLayer, modeling_mistral.MistralRotaryEmbedding, modeling_mistral.MistralRMSNorm
    ),
    "qwen2": Architecture(
        modeling_qwen2.Qwen2DecoderLayer, modeling_qwen2.Qwen2RotaryEmbedding, modeling_qwen2.Qwen2RMSNorm
    ),
}


class UnsupportedModelError(ValueError):
    """The model exists but is of a family this node cannot serve."""


def architecture_of(config: PretrainedConfig) -> Architecture:
    """Returns the family of `config`, and prepares the config for running slices of it.

    Pitfall: a config built by hand or by `AutoConfig` leaves `_attn_implementation` unset. Decoder
    layers then fall back to a code path that ignores the causal mask we pass, silently giving wrong
    hidden states for every prompt longer than one token. We pin it to SDPA here, once, for every span
    (our registered variant of it, which also runs batched decode steps: see node.batched_attention).
    """
    architecture = ARCHITECTURES.get(config.model_type)
    if architecture is None:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    config._attn_implementation = ATTENTION_IMPLEMENTATION
    return architecture
