"""Shared fixtures: the embedded model, its independent transformers reference, and tiny saved models."""

from __future__ import annotations

import pytest
import torch

from edgeswarm.model.sources import open_model
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="session")
def smollm():
    return open_model("default")


@pytest.fixture(scope="session")
def smollm_reference(smollm):
    """SmolLM2 loaded by transformers' own GGUF reader: independent of our loader, so it checks it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm.path.parent), gguf_file=smollm.path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
