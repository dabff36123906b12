"""Speculative greedy decoding by prompt lookup (swarm.speculation): drafts, and rollback on the nodes.
On real weights, where drafts are accepted, tests/test_swarm_smollm.py checks the tokens, the saving and
a node dying in the middle of a speculative step."""


import grpc
import pytest
import torch

from devtools.reference import reference_greedy_tokens
from edgeswarm import SwarmClient
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.tensors import serialize_tensor
from edgeswarm.swarm.policy import SessionPolicy
from edgeswarm.swarm.speculation import (
    prompt_lookup_draft,
)
from tests.support import node_channel, swarm_member

PROMPT = [5, 77, 300, 12, 9, 401] * 3  # repeats itself: prompt lookup finds drafts
TOKENS = 24


def test_a_draft_is_what_followed_the_latest_match_of_the_longest_tail():
    context = [1, 2, 3, 4, 9, 1, 2, 3, 4, 7, 8, 2, 3, 4]
    assert prompt_lookup_draft(context, 3) == [7, 8, 2]  # no earlier "8 2 3 4"; the latest "2 3 4" came before 7 8 2
    assert prompt_lookup_draft([1, 2, 3, 1, 2], 5) == [3, 1, 2]
    assert prompt_lookup_draft([1, 2, 3, 4], 5) == []  # nothing repeats
    assert prompt_lookup_draft([1, 2, 1, 2], 0) == []


@pytest.fixture(scope="module")
def client(tiny_pipeline, tiny_llama_dir):
    with SwarmClient(tiny_pipeline.initial_peers, model=str(tiny_llama_dir), policy=SessionPolicy(replacement_wait=20)) as swarm_client:
        yield swarm_client


@pytest.fixture(scope="module")
def expected(tiny_llama_reference):
    return reference_greedy_tokens(tiny_llama_reference, PROMPT, TOKENS)


@pytest.mark.slow
def test_speculation_on_or_off_gives_the_same_greedy_tokens(client, expected):
    assert client.generate(PROMPT, max_new_tokens=TOKENS).token_ids == expected[: TOKENS]
    assert client.generate(PROMPT, max_new_tokens=TOKENS, speculate=False).token_ids == expected[: TOKENS]


@pytest.mark.slow
def test_a_node_refuses_a_truncation_beyond_its_cache(tiny_pipeline, tiny_llama_dir):
    node = tiny_pipeline.nodes[0]
    hidden = serialize_tensor(torch.zeros(1, 3, 64))
    positions, mask = serialize_tensor(torch.arange(3)[None]), serialize_tensor(torch.ones(1, 3, dtype=torch.bool))
    opening = pb.SessionOpen(session_id="truncate", model_id=node.info["model_id"], start_block=0, end_block=2, max_length=16)
    steps = [
        pb.SessionRequest(open=opening),
        pb.SessionRequest(step=pb.SessionStep(step_id=0, hidden_states=hidden, position_ids=positions, attention_mask=mask)),
        pb.SessionRequest(step=pb.SessionStep(step_id=1, hidden_states=hidden, position_ids=positions, attention_mask=mask, truncate_to=1)),
        pb.SessionRequest(step=pb.SessionStep(step_id=2, hidden_states=hidden, position_ids=positions, attention_mask=mask, truncate_to=9)),
    ]
    with swarm_member(tiny_pipeline.initial_peers), node_channel(node) as channel:
        replies = pb_grpc.BlockServiceStub(channel).InferenceSession(iter(steps), timeout=60)
        assert [next(replies).cache_length for _ in range(2)] == [3, 4]  # 3, then rolled back to 1 and 3 more
        with pytest.raises(grpc.RpcError) as refused:
            next(replies)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncate_to 9" in refused.value.details()
