"""The GGUF cache: what it returns equals a fresh read, a changed file is read afresh, and a broken or
unwritable cache only costs time."""

import os
import shutil

import gguf
import pytest
import torch
from transformers import AutoTokenizer

from edgeswarm.model.cache_dir import CACHE_ENV
from edgeswarm.model.sources import default_model_path, open_model
from edgeswarm.model import gguf_cache

PROMPT = [{"role": "user", "content": "Ünïcode, 日本語 and 1234 * 5678?\n\n  spaces"}]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(directory))
    return directory


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    """A copy of the embedded GGUF that a test may touch."""
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    shutil.copyfile(default_model_path(), path)
    return path


def refuse_parsing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the file was parsed although its cache entry exists")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)


def test_a_cached_model_equals_a_freshly_read_one(cache_dir, model_copy, monkeypatch):
    fresh = open_model(model_copy)
    fresh_tokenizer = fresh.tokenizer()
    assert (gguf_cache.entry_dir(model_copy) / "index.json").is_file()
    refuse_parsing(monkeypatch)
    loads = []
    original = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: loads.append(kwargs) or original(*args, **kwargs))
    cached = open_model(model_copy)
    assert cached.model_id == fresh.model_id
    assert cached.config.to_dict() == fresh.config.to_dict()
    for block in (0, 29):
        ours, theirs = cached.block_state(block), fresh.block_state(block)
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    tokenizer = cached.tokenizer()
    assert loads == [{}]  # the saved tokenizer, not one built from the GGUF file again
    assert tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True) == fresh_tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True
    )
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id, len(tokenizer)) == (
        fresh_tokenizer.eos_token_id,
        fresh_tokenizer.bos_token_id,
        len(fresh_tokenizer),
    )


def test_a_changed_file_is_read_afresh(cache_dir, model_copy, monkeypatch):
    open_model(model_copy)
    before = gguf_cache.entry_dir(model_copy)
    stat = model_copy.stat()
    os.utime(model_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_cache.entry_dir(model_copy) != before
    parsed = []
    original = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args: parsed.append(args) or original(*args))
    assert open_model(model_copy).num_blocks == 30
    assert len(parsed) == 1


def test_an_unusable_cache_entry_is_replaced(cache_dir, model_copy):
    index_file = gguf_cache.entry_dir(model_copy) / "index.json"
    index_file.parent.mkdir(parents=True)
    index_file.write_text('{"format": 1, "fields": {}')  # cut short
    assert open_model(model_copy).num_blocks == 30
    assert gguf_cache.GGUFIndex.from_json(index_file.read_text()).tensors


def test_an_unwritable_cache_costs_only_time(tmp_path, model_copy, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    model = open_model(model_copy)
    assert model.num_blocks == 30 and model.block_state(3)
    assert model.tokenizer()("hello").input_ids
