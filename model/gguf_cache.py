"""What is slow to read from a GGUF file, read once and cached: its metadata and tensor table, and the
tokenizer transformers builds from it.

gguf's reader parses every string of the embedded vocabulary one at a time (about 3 s for SmolLM2), and
transformers takes about 4 s more to turn that vocabulary into a fast tokenizer. Every node and client
used to pay both on start. The cache holds the scalar metadata and where each tensor's bytes lie (as
JSON), and the tokenizer as transformers saves it.

Entries live in `EDGESWARM_CACHE` (default `~/.cache/edgeswarm`, see model.cache_dir) under a key made of
the file's resolved path, size and modification time, so a changed file is read afresh. Entries are written to a
temporary name and renamed, so processes starting together never see half an entry. A cache that
cannot be written is skipped with a log line: everything still works, only slower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from edgeswarm.model.cache_dir import cache_dir

logger = logging.getLogger(__name__)

_INDEX_FORMAT = 1
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}


class GGUFReadError(ValueError):
    """The file is not a GGUF file that gguf's reader can parse."""


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes lie in the file, and how to read them."""

    ggml_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy order (the reverse of GGUF's)
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFIndex:
    """A GGUF file's scalar metadata (arrays such as the vocabulary are left out) and tensor table."""

    fields: dict[str, int | float | bool | str]
    tensors: dict[str, GGUFTensor]

    def to_json(self) -> str:
        tensors = {name: [t.ggml_type, list(t.shape), t.offset, t.n_bytes] for name, t in self.tensors.items()}
        return json.dumps({"format": _INDEX_FORMAT, "fields": self.fields, "tensors": tensors})

    @classmethod
    def from_json(cls, text: str) -> GGUFIndex:
        data = json.loads(text)
        if data.get("format") != _INDEX_FORMAT:
            raise ValueError(f"cache format {data.get('format')!r}, expected {_INDEX_FORMAT}")
        tensors = {name: GGUFTensor(kind, tuple(shape), offset, size) for name, (kind, shape, offset, size) in data["tensors"].items()}
        return cls(fields=data["fields"], tensors=tensors)


def entry_dir(path: Path) -> Path:
    """The cache directory of this version of the file."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(f"{resolved}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{resolved.stem}-{key}"


def read_index(path: Path) -> GGUFIndex:
    """The file's metadata and tensor table: from the cache, else parsed with gguf and then cached."""
    index_file = entry_dir(path) / "index.json"
    try:
        return GGUFIndex.from_json(index_file.read_text())
    except OSError:
        pass  # not cached yet, or the cache cannot be read
    except (ValueError, KeyError, TypeError) as error:
        logger.info("re-reading %s: its cache entry is unusable (%s)", path, error)
    index = _parse(path)
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=index_file.parent, suffix=".tmp", delete=False) as handle:
            handle.write(index.to_json())
        os.replace(handle.name, index_file)
    except OSError as error:
        logger.info("not caching the metadata of %s: %s", path, error)
    return index


def _parse(path: Path) -> GGUFIndex:
    import gguf  # imported here: only GGUF users pay for it

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # the gguf package raises bare ValueError/struct errors on bad files
        raise GGUFReadError(f"{path} is not a readable GGUF file: {error}") from error
    fields = {
        key: field.contents()
        for key, field in reader.fields.items()
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    tensors = {
        tensor.name: GGUFTensor(
            ggml_type=int(tensor.tensor_type),
            shape=tuple(int(size) for size in reversed(tensor.shape.tolist())),
            offset=int(tensor.data_offset),
            n_bytes=int(tensor.n_bytes),
        )
        for tensor in reader.tensors
    }
    return GGUFIndex(fields=fields, tensors=tensors)


def dequantize(file_bytes: np.ndarray, tensor: GGUFTensor) -> np.ndarray:
    """The tensor as float32, read from `file_bytes` (the whole file, memory-mapped as uint8)."""
    import gguf

    kind = gguf.GGMLQuantizationType(tensor.ggml_type)
    raw = file_bytes[tensor.offset : tensor.offset + tensor.n_bytes]
    if kind.name in _FLOAT_TYPES:
        return raw.view(_FLOAT_TYPES[kind.name]).astype(np.float32).reshape(tensor.shape)
    quantized = raw.reshape(gguf.quant_shape_to_byte_shape(tensor.shape, kind))
    return np.asarray(gguf.quants.dequantize(quantized, kind), dtype=np.float32).reshape(tensor.shape)


def cached_tokenizer(path: Path, build: Callable[[], PreTrainedTokenizerBase]) -> PreTrainedTokenizerBase:
    """The tokenizer saved for this file, else `build()`, saved for next time."""
    saved = entry_dir(path) / "tokenizer"
    if saved.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except (OSError, ValueError) as error:
            logger.info("rebuilding the tokenizer of %s: its cache entry is unusable (%s)", path, error)
            shutil.rmtree(saved, ignore_errors=True)
    tokenizer = build()
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=saved.parent, prefix="tokenizer-"))
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(saved)
        except OSError:  # another process saved it first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        logger.info("not caching the tokenizer of %s: %s", path, error)
    return tokenizer
