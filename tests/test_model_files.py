import pytest
import torch

from edgeswarm.model.architectures import UnsupportedModelError
from edgeswarm.model.sources import (
    GGUFModelSource,
    ModelNotFoundError,
    SafetensorsModelSource,
    open_model,
)
from tests.tiny_models import save_tiny_model


def test_default_model_is_the_embedded_smollm2(smollm):
    assert isinstance(smollm, GGUFModelSource)
    assert smollm.num_blocks == 30
    assert smollm.config.model_type == "llama" and smollm.config.hidden_size == 576
    assert smollm.model_id.startswith("SmolLM2-135M-Instruct.Q4_1-")


@pytest.mark.parametrize("block", [0, 17, 29])
def test_gguf_blocks_equal_what_transformers_reads_from_the_same_file(smollm, smollm_reference, block):
    ours = smollm.block_state(block)
    theirs = smollm_reference.model.layers[block].state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_gguf_head_equals_transformers(smollm, smollm_reference):
    head = smollm.head_weights()
    assert torch.equal(head.embed_tokens, smollm_reference.model.embed_tokens.weight)
    assert torch.equal(head.norm, smollm_reference.model.norm.weight)
    assert head.lm_head is head.embed_tokens  # SmolLM2 ties its LM head to the embeddings


def test_gguf_reads_only_the_requested_block(smollm, monkeypatch):
    read = []
    original = smollm._dequantized
    monkeypatch.setattr(smollm, "_dequantized", lambda name: read.append(name) or original(name))
    smollm.block_state(12)
    assert read and all(name.startswith("blk.12.") for name in read)


def test_sharded_safetensors_reads_only_the_requested_block(tmp_path, monkeypatch):
    source = open_model(save_tiny_model(tmp_path, "llama", num_layers=6))
    assert isinstance(source, SafetensorsModelSource)
    assert len(set(source._weight_map.values())) > 1, "the tiny model should be sharded"
    requested = []
    original = source._read
    monkeypatch.setattr(source, "_read", lambda keys: requested.extend(keys) or original(keys))
    state = source.block_state(4)
    assert requested and all(key.startswith("model.layers.4.") for key in requested)
    assert state["self_attn.q_proj.weight"].shape == (64, 64)


def test_model_id_is_stable_and_tells_models_apart(tmp_path):
    first = save_tiny_model(tmp_path / "a", seed=0)
    other_shape = save_tiny_model(tmp_path / "b", num_layers=4)
    assert open_model(first).model_id == open_model(first).model_id
    assert open_model(first).model_id != open_model(other_shape).model_id


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model at"):
        open_model(tmp_path / "nowhere.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="neither a .gguf file"):
        open_model(tmp_path / "notes.txt")


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelNotFoundError, match="not a readable GGUF file"):
        open_model(bad)


def test_unsupported_family_is_a_clear_error(tmp_path):
    model_dir = save_tiny_model(tmp_path, "llama")
    config = (model_dir / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt2"')
    (model_dir / "config.json").write_text(config)
    with pytest.raises((UnsupportedModelError, ValueError)):
        open_model(model_dir).config


def test_span_outside_the_model_is_refused(smollm):
    with pytest.raises(ValueError, match="outside the model, which has blocks 0:30"):
        smollm.check_span(25, 40)
    with pytest.raises(ValueError):
        smollm.block_state(30)
