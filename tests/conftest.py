"""Shared fixtures: the models, their references, identities and the swarms several test files start.

The split: every shared *fixture* is here, where pytest finds it; shared *functions* (waiting, talking
to nodes, comparing with a reference) are in tests/support.py, imported by name.

- Models and references are session-scoped: each loads once per test session, whichever files run.
  `smollm_reference` is transformers' own reading of the SmolLM2 GGUF file, independent of our loader
  (tests/test_model_files.py checks our loader against it); `tiny_llama_reference` is transformers'
  reading of the tiny saved Llama. Tests only run them: nobody may change their weights or config.
- Identities are session-scoped: `identity` and `other`, two fixed keys for tests that need a key and
  another one. A test that registers a key process-wide (a certificate pin, the process's identity),
  makes it a member of a swarm, or needs a key nobody has seen yet makes its own (NodeIdentity.generate()).
- Swarms are module-scoped: the tests of a module add, kill, ban and drain nodes of their swarm, so a
  swarm shared by several files would carry one file's leftovers into the next; and node processes
  should not outlive the module that uses them. Each module that asks gets its own.
"""

from __future__ import annotations

import pytest
import torch

from edgeswarm.model.sources import open_model
from edgeswarm.protocol.identity import NodeIdentity
from tests.tiny_models import save_tiny_model

# --- models and their references (session) ---------------------------------------------------------


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct, as nodes open it."""
    return open_model("default")


@pytest.fixture(scope="session")
def smollm_reference(smollm):
    """SmolLM2 loaded by transformers' own GGUF reader: independent of our loader, so it checks it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm.path.parent), gguf_file=smollm.path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (6 blocks, hidden size 64, vocabulary 512) saved as sharded safetensors."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_reference(tiny_llama_dir):
    """The tiny Llama as transformers loads it from its directory, in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


# --- identities (session) --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def identity() -> NodeIdentity:
    """A key for tests of signing, certificates and credentials."""
    return NodeIdentity.generate()


@pytest.fixture(scope="session")
def other() -> NodeIdentity:
    """Another key, distinct from `identity`."""
    return NodeIdentity.generate()


# --- swarms several files start (per module) -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_node(tiny_llama_dir):
    """One node serving every block (0:6) of the tiny Llama."""
    from devtools.launcher import LocalSwarm  # the node daemon's imports, only for tests that start nodes

    with LocalSwarm([["--model", str(tiny_llama_dir), "--blocks", "0:6"]]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_llama_dir):
    """Three nodes serving the tiny Llama in a pipeline: blocks 0:2, 2:4 and 4:6, in that order."""
    from devtools.launcher import LocalSwarm

    with LocalSwarm([["--model", str(tiny_llama_dir), "--blocks", span] for span in ("0:2", "2:4", "4:6")]) as swarm:
        yield swarm
