"""A real 3-node swarm of SmolLM2-135M-Instruct on loopback, checked against transformers in one process."""

import os
import signal

import grpc
import pytest
import torch

from devtools.decoding import greedy_decode
from devtools.launcher import LocalSwarm, start_node
from devtools.reference import reference_greedy_tokens
from edgeswarm import SwarmClient
from edgeswarm.model.profiling import block_parameter_bytes
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.tensors import serialize_tensor
from edgeswarm.swarm.errors import RemoteError
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.speculation import SpeculationStats, speculative_greedy
from edgeswarm.swarm.transport import SpanStream
from tests.support import (
    announced,
    node_channel,
    node_info,
    one_step,
    reference_continuation,
    swarm_member,
    until_eos,
    wait_until,
)

pytestmark = pytest.mark.slow
EOS = {2}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def swarm():
    with LocalSwarm([["--num-blocks", "10"]] * 3) as local_swarm, swarm_member(local_swarm.initial_peers):
        yield local_swarm


@pytest.fixture(scope="module")
def client(swarm):
    with SwarmClient(swarm.initial_peers) as swarm_client:
        yield swarm_client


def test_nodes_choose_the_least_covered_spans_in_turn(swarm, client):
    assert [node.blocks for node in swarm.nodes] == [(0, 10), (10, 20), (20, 30)]
    assert sorted((r.start_block, r.end_block) for r in client.servers()) == [(0, 10), (10, 20), (20, 30)]


def test_greedy_chat_equals_single_process_transformers(client, smollm_reference):
    prompt = client.apply_chat_template(CHAT)
    input_ids = client.tokenizer(prompt, return_tensors="pt").input_ids
    expected = until_eos(reference_continuation(smollm_reference, input_ids, max_new_tokens=40)[0], EOS)
    result = client.generate(prompt, max_new_tokens=40)
    assert result.token_ids == expected
    assert "Paris" in result.text and result.finish_reason == "eos"
    assert [(hop.start, hop.end) for hop in result.route] == [(0, 10), (10, 20), (20, 30)]


def test_left_padded_batch_equals_transformers_batch(client, smollm_reference):
    prompts = ["The capital of France is", "Hi", "def fibonacci(n):"]
    encoded = client.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert not encoded.attention_mask.all(), "the batch must contain padding"
    expected = reference_continuation(smollm_reference, encoded.input_ids, encoded.attention_mask, 20)
    results = client.generate(prompts, max_new_tokens=20, micro_batch=len(prompts))  # one padded session
    assert [result.token_ids for result in results] == [until_eos(row, EOS) for row in expected]


def test_micro_batches_run_at_once_and_equal_each_prompt_alone(swarm, client, smollm_reference):
    prompts = ["The capital of France is", "Hi", "def fibonacci(n):", "Water boils at", "The moon is"]
    expected = [
        until_eos(reference_continuation(smollm_reference, client.tokenizer(prompt, return_tensors="pt").input_ids, None, 16)[0], EOS)
        for prompt in prompts
    ]
    batched_before = sum(node_info(node).batched_decode_steps for node in swarm.nodes)
    results = client.generate(prompts, max_new_tokens=16)  # one session per prompt, all at once
    assert [result.token_ids for result in results] == expected
    assert sum(node_info(node).batched_decode_steps for node in swarm.nodes) > batched_before


def test_streaming_yields_the_tokens_of_generate(client):
    events = list(client.stream("Once upon a time", max_new_tokens=12))
    result = client.generate("Once upon a time", max_new_tokens=12)
    assert [event.token_id for event in events] == result.token_ids
    assert "".join(event.text for event in events) == result.text


def test_stop_string_ends_generation_and_is_cut_from_the_text(client):
    full = client.generate("1, 2, 3, 4,", max_new_tokens=12)
    assert " 6" in full.text
    stopped = client.generate("1, 2, 3, 4,", max_new_tokens=12, stop=[" 6"])
    assert stopped.finish_reason == "stop" and " 6" not in stopped.text
    assert full.text.startswith(stopped.text) and len(stopped.token_ids) < len(full.token_ids)


def test_sampling_follows_its_seed(client):
    def sample(seed):
        return client.generate("My favourite animal is", max_new_tokens=10, do_sample=True, temperature=1.5, seed=seed)

    assert sample(1).token_ids == sample(1).token_ids
    assert len({tuple(sample(seed).token_ids) for seed in range(4)}) > 1


def test_inference_session_steps_give_the_reference_logits(client, smollm_reference):
    input_ids = client.tokenizer("The quick brown fox jumps over", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = smollm_reference(input_ids=input_ids).logits[0]
    with client.inference_session(max_length=32, prefill_chunk=3) as session:
        first = session.step(input_ids[:, :4])  # two chunks of 3 and 1 tokens
        rest = [session.step(input_ids[:, i : i + 1]) for i in range(4, input_ids.shape[1])]
        assert session.length == input_ids.shape[1]
    torch.testing.assert_close(torch.cat([first, *rest]), expected[3:], atol=2e-3, rtol=1e-3)


def test_stateless_forward_gives_the_reference_logits(client, smollm_reference):
    input_ids = client.tokenizer("Edge devices can run language models", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = smollm_reference(input_ids=input_ids).logits
    torch.testing.assert_close(client.forward(input_ids), expected, atol=2e-3, rtol=1e-3)


def test_each_node_holds_only_its_own_blocks(swarm, smollm):
    block_bytes = block_parameter_bytes(smollm.config)
    for node in swarm.nodes:
        info = node_info(node)
        assert (info.start_block, info.end_block) == node.blocks
        assert info.num_parameters * 4 == 10 * block_bytes
        # loading 10 blocks grows the process by about 10 blocks' fp32 weights, far from all 30
        assert 0.9 * 10 * block_bytes < info.load_rss_growth_bytes < 0.45 * 30 * block_bytes


def test_wrong_hidden_size_is_refused_and_the_node_keeps_serving(swarm, client):
    first = swarm.nodes[0]
    record = next(r for r in client.servers() if r.address == first.address)
    stream = SpanStream(Hop(record, 0, 10), "bad-hidden", client.model.model_id, 16, connect_timeout=5)
    with pytest.raises(RemoteError, match=r"INVALID_ARGUMENT: hidden_states must be \[batch, length, 576\], got \[1, 1, 100\]"):
        one_step(stream, torch.zeros(1, 1, 100), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), 10)
    stream.close()
    assert client.generate("Hi", max_new_tokens=3).token_ids  # everyone else is still served


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: setattr(r, "start_block", 5) or setattr(r, "end_block", 15), "not within this node's span 0:10"),
        (lambda r: setattr(r, "model_id", "another-model"), "serves model"),
        (lambda r: r.hidden_states.CopyFrom(serialize_tensor(torch.full((1, 2, 576), float("nan")))), "NaN or Inf"),
        (lambda r: r.position_ids.CopyFrom(serialize_tensor(torch.zeros(1, 3, dtype=torch.long))), "position_ids must be"),
        (lambda r: setattr(r.hidden_states, "dtype", "float64"), "unknown dtype"),
    ],
)
def test_bad_forward_requests_get_invalid_argument(swarm, client, change, message):
    request = pb.ForwardRequest(
        model_id=client.model.model_id,
        start_block=0,
        end_block=10,
        hidden_states=serialize_tensor(torch.zeros(1, 2, 576)),
        position_ids=serialize_tensor(torch.arange(2)[None]),
        attention_mask=serialize_tensor(torch.ones(1, 2, dtype=torch.bool)),
    )
    change(request)
    with node_channel(swarm.nodes[0]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.BlockServiceStub(channel).Forward(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_session_cannot_grow_past_its_max_length(client):
    with client.inference_session(max_length=4) as session:
        with pytest.raises(ValueError, match="above max_length 4"):
            session.step(torch.tensor([[1, 2, 3, 4, 5]]))
    record = client.servers()[0]
    stream = SpanStream(Hop(record, 0, 10), "too-long", client.model.model_id, 4, connect_timeout=5)
    with pytest.raises(RemoteError, match="grow the session to 5 tokens, above its max_length 4"):
        one_step(stream, torch.zeros(1, 5, 576), torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool), 10)
    stream.close()


def route_through_a_victim(swarm, client) -> tuple:
    """A new node serving blocks 10:20, and a route through it between the swarm's first and last nodes."""
    victim = start_node(["--blocks", "10:20"], swarm.initial_peers)
    wait_until(lambda: announced(client, victim), "the new node is announced", interval=0.5)
    records = {record.address: record for record in client.servers()}
    route = [Hop(records[swarm.nodes[0].address], 0, 10), Hop(records[victim.address], 10, 20), Hop(records[swarm.nodes[2].address], 20, 30)]
    return victim, route


def test_killing_the_middle_node_mid_generation_changes_no_token(swarm, client, smollm_reference):
    prompt = client.tokenizer(client.apply_chat_template(CHAT)).input_ids
    expected = reference_greedy_tokens(smollm_reference, prompt, 20)
    victim, route = route_through_a_victim(swarm, client)
    with client.inference_session(max_length=128, route=route) as session:
        kill = lambda i: i == 7 and os.killpg(victim.process.pid, signal.SIGKILL)  # noqa: E731
        assert greedy_decode(session, prompt, 20, after_token=kill) == expected
        [event] = session.failovers
        assert event.failed_node == victim.info["node_id"]
        assert [hop.record.address for hop in session.route] == [node.address for node in swarm.nodes]


REPEAT = [{"role": "user", "content": "Repeat this sentence exactly: The old lighthouse keeper counted forty-two ships passing the northern cape before the storm."}]


def test_speculation_repeats_text_in_fewer_steps_with_the_greedy_tokens(client, smollm_reference):
    prompt = client.tokenizer(client.apply_chat_template(REPEAT)).input_ids
    expected = until_eos(reference_greedy_tokens(smollm_reference, prompt, 40), EOS)
    result = client.generate(prompt, max_new_tokens=40)
    assert result.token_ids == expected
    assert result.speculation.accepted > 0 and result.speculation.steps < len(result.token_ids)  # several tokens a trip


def test_a_node_killed_in_the_middle_of_speculation_changes_no_token(swarm, client, smollm_reference):
    prompt = client.tokenizer(client.apply_chat_template(REPEAT)).input_ids
    expected = reference_greedy_tokens(smollm_reference, prompt, 24)
    victim, route = route_through_a_victim(swarm, client)
    stats, tokens = SpeculationStats(), []
    with client.inference_session(max_length=len(prompt) + 24, route=route) as session:
        for token in speculative_greedy(session, session.step(torch.tensor([prompt])), list(prompt), stats):
            tokens.append(token)
            if len(tokens) == 6:
                drafted_before = stats.drafted
                os.killpg(victim.process.pid, signal.SIGKILL)  # the next step finds it dead
            if len(tokens) == 24:
                break
        assert [event.failed_node for event in session.failovers] == [victim.info["node_id"]]
    assert tokens == expected
    assert stats.drafted > drafted_before  # speculation went on across the failover
