"""Spans of blocks in one process against transformers' whole model, including the three known pitfalls."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeswarm.model.batched_attention import ATTENTION_IMPLEMENTATION
from edgeswarm.model.sources import open_model
from edgeswarm.model.span import SpanCache, TransformerSpan, attention_mask_for
from edgeswarm.swarm.head import ClientHead
from edgeswarm.swarm.session import positions_for
from tests.tiny_models import save_tiny_model


def load_spans(source, cuts):
    bounds = list(zip(cuts[:-1], cuts[1:]))
    return [TransformerSpan(source.config, a, b, [source.block_state(i) for i in range(a, b)]) for a, b in bounds]


def chained_logits(spans, head, input_ids, mask, caches, seen):
    """Runs new tokens through the spans, as a client and its nodes would, and returns all logits."""
    positions = positions_for(mask, seen)
    hidden = head.embed(input_ids)
    for span, cache in zip(spans, caches):
        hidden = span(hidden, positions, mask, cache)
    return head.logits(hidden)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_chained_spans_match_the_whole_model_with_padding_chunks_and_decoding(tmp_path, family):
    model_dir = save_tiny_model(tmp_path, family)
    source = open_model(model_dir)
    spans = load_spans(source, [0, 2, 3, 6])
    head = ClientHead(source.config, source.head_weights())
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    input_ids = torch.tensor([[0, 0, 0, 5, 17, 42, 99, 7, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19]])
    mask = input_ids != 0
    mask[1] = True
    expected = reference.generate(input_ids, attention_mask=mask.long(), max_new_tokens=8, do_sample=False)

    caches = [SpanCache() for _ in spans]
    seen = torch.zeros(2, dtype=torch.long)
    logits = None
    for chunk in (slice(0, 4), slice(4, 9)):  # a chunked prefill: the second chunk attends to the cache
        logits = chained_logits(spans, head, input_ids[:, chunk], mask[:, chunk], caches, seen)
        seen = seen + mask[:, chunk].sum(dim=1)
    with torch.inference_mode():
        full = reference(input_ids=input_ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)

    generated = []
    for _ in range(8):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(token)
        logits = chained_logits(spans, head, token, torch.ones_like(token, dtype=torch.bool), caches, seen)
        seen = seen + 1
    assert torch.equal(torch.cat(generated, dim=1), expected[:, input_ids.shape[1] :])


def test_pitfall_layer_idx_is_relative_to_the_span(tiny_llama_dir):
    source = open_model(tiny_llama_dir)
    span = TransformerSpan(source.config, 3, 6, [source.block_state(i) for i in range(3, 6)])
    assert [layer.self_attn.layer_idx for layer in span.layers] == [0, 1, 2]
    cache = SpanCache()
    span(torch.randn(1, 4, 64), torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool), cache)
    assert len(cache.kv.layers) == 3  # no empty layers 0..2 for blocks this span does not hold
    assert cache.length == 4 and cache.nbytes() == 3 * 2 * (1 * 2 * 4 * 16) * 4


def test_pitfall_unset_attention_implementation_is_pinned_so_the_mask_holds(tiny_llama_dir):
    source = open_model(tiny_llama_dir)
    config = source.config
    config._attn_implementation = None  # as a hand-made or AutoConfig config may leave it
    span = TransformerSpan(config, 0, 2, [source.block_state(i) for i in range(2)])
    assert config._attn_implementation == ATTENTION_IMPLEMENTATION
    hidden = torch.randn(1, 6, 64)
    mask = torch.tensor([[False, True, True, True, True, True]])  # padding forces an explicit mask
    full = span(hidden, positions_for(mask, torch.zeros(1, dtype=torch.long)), mask)
    prefix = span(hidden[:, :3], positions_for(mask[:, :3], torch.zeros(1, dtype=torch.long)), mask[:, :3])
    # causal: the first tokens cannot see the later ones
    torch.testing.assert_close(full[:, 1:3], prefix[:, 1:3], atol=1e-4, rtol=1e-4)


def test_pitfall_rotary_buffers_exist_after_a_meta_device_build(smollm):
    span = TransformerSpan(smollm.config, 0, 1, [smollm.block_state(0)])
    inv_freq = span.rotary_emb.inv_freq
    assert not inv_freq.is_meta
    expected = 1.0 / (100000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    torch.testing.assert_close(inv_freq, expected)
    assert not any(parameter.is_meta for parameter in span.parameters())


def test_smollm_span_chain_matches_transformers_logits(smollm, smollm_reference):
    spans = load_spans(smollm, [0, 10, 20, 30])
    head = ClientHead(smollm.config, smollm.head_weights())
    input_ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    logits = chained_logits(spans, head, input_ids, mask, [None] * 3, torch.zeros(1, dtype=torch.long))
    with torch.inference_mode():
        expected = smollm_reference(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-3)


def test_mask_is_left_to_sdpa_only_when_plain_causal_attention_is_exact():
    assert attention_mask_for(torch.ones(2, 5, dtype=torch.bool), 5) is None  # prefill, no padding
    assert attention_mask_for(torch.ones(2, 9, dtype=torch.bool), 1) is None  # one decode step
    chunk = attention_mask_for(torch.ones(1, 6, dtype=torch.bool), 2)  # a chunk after 4 cached tokens
    assert chunk.shape == (1, 1, 2, 6)
    assert chunk[0, 0].tolist() == [[True] * 5 + [False], [True] * 6]


def test_padding_never_attended_and_padding_queries_stay_finite():
    padding = torch.tensor([[False, False, True, True]])
    mask = attention_mask_for(padding, 4)[0, 0]
    assert not mask[2:, :2].any()  # real tokens ignore the padding
    assert mask.any(dim=-1).all()  # every row sees something, so SDPA gives no NaN
