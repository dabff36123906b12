"""The semantic codec's basis: fitted on real text with the real model, and cached on disk.

The basis holds, for every block boundary, the mean and the top principal directions of the hidden
states there. It is fitted by streaming the model one block at a time over calibration text (the
docstrings of a fixed set of Python standard library modules), so fitting needs the memory of one block,
not of the whole model. The fit is deterministic for a given model file and Python version, so nodes and
clients that fit it apart end with the same digest; peers whose digests differ simply do not use the
semantic codec between them.
"""

from __future__ import annotations

import fcntl
import importlib
import inspect
import logging
import os
from pathlib import Path

import torch

from edgeswarm.model.cache_dir import cache_dir
from edgeswarm.model.semantic_basis import fit_semantic_basis, load_basis, save_basis
from edgeswarm.model.sources import ModelSource
from edgeswarm.model.span import TransformerSpan
from edgeswarm.protocol.codecs import CodecError, SemanticBasis

logger = logging.getLogger(__name__)

# Calibration text comes from these modules; scripts/eval_fidelity.py evaluates on other ones.
CALIBRATION_MODULES = ("collections", "itertools", "functools", "pathlib", "argparse", "logging", "threading", "subprocess")
DEFAULT_RANK = 576  # cap on coefficients sent per token; the byte budget (DEFAULT_SEMANTIC_BYTES) decides
CALIBRATION_TOKENS = 8192  # about 570 MB of activations while fitting; 2048 fit noticeably worse
_CHUNK_TOKENS = 256


def module_docs_text(module_names: tuple[str, ...] | list[str]) -> str:
    """The docstrings of some standard library modules and of their public classes and functions."""
    parts: list[str] = []
    for name in module_names:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for member_name, member in sorted(vars(module).items()):
            if member_name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(member)
            if doc:
                parts.append(f"{member_name}: {doc}")
    return "\n\n".join(part for part in parts if part)


def calibration_chunks(source: ModelSource, tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """[chunks, _CHUNK_TOKENS] token ids of calibration text."""
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise ValueError(f"model {source.model_id} has no tokenizer to read calibration text with")
    ids = tokenizer(module_docs_text(CALIBRATION_MODULES), return_tensors="pt").input_ids[0]
    usable = min(tokens, ids.numel()) // _CHUNK_TOKENS * _CHUNK_TOKENS
    if usable == 0:
        raise ValueError("the calibration text is shorter than one chunk")
    return ids[:usable].view(-1, _CHUNK_TOKENS)


@torch.inference_mode()
def fit_model_basis(source: ModelSource, rank: int = DEFAULT_RANK, tokens: int = CALIBRATION_TOKENS) -> SemanticBasis:
    """Fits a basis for every boundary 0..num_blocks, loading one block at a time."""
    config = source.config
    chunks = calibration_chunks(source, tokens)
    head = source.head_weights()
    hidden = torch.nn.functional.embedding(chunks, head.embed_tokens)
    positions = torch.arange(chunks.shape[1]).expand_as(chunks)
    mask = torch.ones_like(chunks, dtype=torch.bool)
    activations = {0: hidden.reshape(-1, config.hidden_size).clone()}
    for block in range(source.num_blocks):
        span = TransformerSpan(config, block, block + 1, [source.block_state(block)])
        hidden = span(hidden, positions, mask)
        activations[block + 1] = hidden.reshape(-1, config.hidden_size).clone()
    return fit_semantic_basis(activations, max_rank=rank)


def basis_path(source: ModelSource, rank: int = DEFAULT_RANK) -> Path:
    """Where the basis of `source` is cached. The name holds everything the fit depends on, so files of an
    older format or another calibration are never even opened."""
    version = SemanticBasis.FORMAT.rsplit("/", 1)[-1]
    return cache_dir() / "semantic" / f"{source.model_id}-v{version}-r{rank}-c{CALIBRATION_TOKENS}.safetensors"


def load_or_fit_basis(source: ModelSource, rank: int = DEFAULT_RANK) -> SemanticBasis:
    """The cached basis for `source`, fitting and caching it first if there is none (or it is damaged).

    Processes on one machine take turns (a file lock), so the basis is fitted once, not once per node.
    """
    path = basis_path(source, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                return load_basis(path)
            except (CodecError, OSError) as error:
                logger.warning("refitting the semantic basis: the cached one is unusable (%s)", error)
        logger.info("fitting the semantic codec basis for %s (rank %d)", source.model_id, rank)
        basis = fit_model_basis(source, rank)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        save_basis(basis, temporary)
        temporary.replace(path)
        return basis
