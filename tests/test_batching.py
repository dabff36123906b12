"""Continuous batching: merged decode steps give every session exactly its unbatched numbers; long
prefills run in chunks with other sessions' decodes in between; concurrent swarm sessions stay greedy-exact."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from edgeswarm import SwarmClient
from edgeswarm.model.sources import open_model
from edgeswarm.model.span import SpanCache, TransformerSpan
from edgeswarm.node.batching import StepBatcher
from edgeswarm.swarm.spot_check import difference
from devtools.launcher import LocalSwarm
from devtools.reference import reference_greedy_tokens
from devtools.decoding import greedy_decode
from tests.support import node_info, wait_until

HONEST_DIFFERENCE = 1e-4  # relative, per position: float32 summation order gives ~1e-6


@pytest.fixture(scope="module")
def tiny_span(tiny_llama_dir):
    source = open_model(tiny_llama_dir)
    return TransformerSpan(source.config, 0, 6, [source.block_state(i) for i in range(6)])


def _prefill(span: TransformerSpan, length: int, seed: int) -> tuple[SpanCache, torch.Tensor]:
    hidden = torch.randn(1, length, span.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    cache = SpanCache()
    span(hidden, torch.arange(length)[None], torch.ones(1, length, dtype=torch.bool), cache)
    return cache, hidden


def _decode_inputs(span, seed: int, steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(1, 1, span.config.hidden_size, generator=generator) for _ in range(steps)]


def _run_sessions(batcher: StepBatcher, span, lengths: list[int], concurrent: bool) -> list[torch.Tensor]:
    """Prefills sessions of `lengths` tokens, then decodes 3 tokens in each, one session after another or
    all at once; returns each session's decode outputs."""
    caches = [_prefill(span, length, index)[0] for index, length in enumerate(lengths)]
    inputs = [_decode_inputs(span, index, 3) for index in range(len(lengths))]

    def session(index: int) -> torch.Tensor:
        outputs = []
        for step, x in enumerate(inputs[index]):
            position = torch.tensor([[lengths[index] + step]])
            outputs.append(batcher.run(span, x, position, torch.ones(1, 1, dtype=torch.bool), 0, 6, caches[index]))
        return torch.cat(outputs, dim=1)

    if not concurrent:
        return [session(index) for index in range(len(lengths))]
    with ThreadPoolExecutor(len(lengths)) as pool:
        return list(pool.map(session, range(len(lengths))))


@pytest.mark.parametrize("quant", ["none", "bf16", "int8"])
def test_batched_decode_is_bit_identical_to_each_session_alone(tiny_llama_dir, quant):
    source = open_model(tiny_llama_dir)
    span = TransformerSpan(source.config, 0, 6, [source.block_state(i) for i in range(6)], quant=quant)
    lengths = [3, 9, 17, 4, 30, 11, 6, 22, 5, 13]  # sessions of different lengths and positions
    batcher = StepBatcher(max_batch=32)
    try:
        alone = _run_sessions(batcher, span, lengths, concurrent=False)
        assert batcher.batched_steps == 0
        together = _run_sessions(batcher, span, lengths, concurrent=True)
    finally:
        batcher.stop()
    assert batcher.batched_steps >= len(lengths)  # steps really ran together
    for expected, output in zip(alone, together):
        assert torch.equal(expected, output)


def test_a_long_prefill_runs_in_chunks_with_decodes_in_between(tiny_span):
    batcher = StepBatcher(prefill_chunk=16)
    ran: list[str] = []  # what the compute thread ran, in order: "prefill" chunks and "decode" steps
    prefilling = threading.Event()
    long_hidden = torch.randn(1, 200, 64, generator=torch.Generator().manual_seed(7))
    long_cache = SpanCache()
    decode_cache, _ = _prefill(tiny_span, 5, 0)

    def span(hidden, *args, **kwargs):  # the span as the batcher sees it, logging each call
        kind = "decode" if hidden.shape[1] == 1 else "prefill"
        if kind == "prefill" and not prefilling.is_set():
            # the first chunk finishes once a decode step is queued, however slowly either thread runs
            prefilling.set()
            wait_until(lambda: batcher._queue, "a decode step is queued during the long prefill", interval=0.01)
        ran.append(kind)
        return tiny_span(hidden, *args, **kwargs)

    def decodes():
        assert prefilling.wait(timeout=60), "the long prefill never started"
        for step in range(3):
            batcher.run(span, torch.randn(1, 1, 64), torch.tensor([[5 + step]]), torch.ones(1, 1, dtype=torch.bool), 0, 6, decode_cache)

    try:
        with ThreadPoolExecutor(2) as pool:
            prefill = pool.submit(batcher.run, span, long_hidden, torch.arange(200)[None], torch.ones(1, 200, dtype=torch.bool), 0, 6, long_cache)
            pool.submit(decodes).result(timeout=120)
            chunked = prefill.result(timeout=120)
    finally:
        batcher.stop()
    assert ran.count("prefill") == 13  # 200 tokens in chunks of at most 16
    first, last = ran.index("prefill"), len(ran) - 1 - ran[::-1].index("prefill")
    assert "decode" in ran[first:last]  # decodes did not wait for all 200 tokens
    assert long_cache.length == 200
    whole = tiny_span(long_hidden, torch.arange(200)[None], torch.ones(1, 200, dtype=torch.bool))
    # the same up to summation order: per position, as spot checks compare honest nodes (swarm.spot_check)
    assert difference(chunked, whole, torch.ones(1, 200, dtype=torch.bool)) <= HONEST_DIFFERENCE


def test_a_failing_step_fails_only_its_caller(tiny_span):
    batcher = StepBatcher()
    try:
        with pytest.raises(RuntimeError):
            batcher.run(tiny_span, torch.randn(1, 3, 65), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), 0, 6, None)
        output = batcher.run(tiny_span, torch.randn(1, 3, 64), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), 0, 6, None)
        assert output.shape == (1, 3, 64)
    finally:
        batcher.stop()


@pytest.mark.slow
def test_concurrent_swarm_sessions_are_batched_and_stay_greedy_exact(tiny_llama_dir, tiny_llama_reference):
    model = ["--model", str(tiny_llama_dir)]
    prompts = [[5, 77, 300, 12, 9, 401][: 2 + index % 5] + [index + 20] for index in range(12)]
    expected = [reference_greedy_tokens(tiny_llama_reference, prompt, 12) for prompt in prompts]
    with LocalSwarm([[*model, "--blocks", "0:3"], [*model, "--blocks", "3:6"]]) as swarm:
        with SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir), mdns=False) as client:
            def generate(prompt: list[int]) -> list[int]:
                with client.inference_session(max_length=64) as session:
                    return greedy_decode(session, prompt, 12)

            with ThreadPoolExecutor(len(prompts)) as pool:
                produced = list(pool.map(generate, prompts))
            batched = [node_info(node).batched_decode_steps for node in swarm.nodes]
    assert produced == expected
    assert all(count > 0 for count in batched)
