"""Hop-to-hop forwarding (swarm.session, node.forwarding) on real nodes of the tiny Llama over gRPC:
the tokens are those of the reference whether nodes push to each other or the client relays, with
prefill chunks pipelined; a node that does not push, or pushes other states than it replies, changes no
token; a push is taken only from the hop a step names or from the session's own client."""

from dataclasses import dataclass

import grpc
import pytest
import torch

from devtools.decoding import greedy_decode
from devtools.launcher import LocalSwarm
from devtools.lying_node import Lies
from edgeswarm import SessionPolicy, SwarmClient
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.tensors import serialize_tensor
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.transport import StepTimeout
from tests.support import node_channel, reference_continuation, wait_until

pytestmark = pytest.mark.slow

PROMPT = [5, 77, 300, 12, 9, 401, 33, 250, 8, 61, 7, 19, 444]
NEW_TOKENS = 10
RELAY = SessionPolicy(forwarding=False, spot_check=0.0)
FORWARD = SessionPolicy(forwarding=True, spot_check=0.0)


@pytest.fixture(scope="module")
def expected(tiny_llama_reference):
    return reference_continuation(tiny_llama_reference, torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS)[0].tolist()


@pytest.fixture(scope="module")
def client(tiny_pipeline, tiny_llama_dir):
    with SwarmClient(tiny_pipeline.initial_peers, model=str(tiny_llama_dir)) as client:
        wait_until(lambda: len(client.route()) == 3, "the three nodes are announced", interval=0.5)
        yield client


@dataclass
class Decoded:
    tokens: list[int]
    hops: int
    failovers: int
    mismatches: int
    link_bytes: int


def decode(client, policy, route=None) -> Decoded:
    """Greedy tokens of PROMPT through one session, in 4-token prefill chunks, and what the session saw."""
    with client.inference_session(64, prefill_chunk=4, route=route, policy=policy) as session:
        tokens = greedy_decode(session, PROMPT, NEW_TOKENS)
        return Decoded(tokens, len(session.route), len(session.failovers), session.forwarding_mismatches, session.link_bytes)


def test_forwarded_and_relayed_sessions_give_the_reference_tokens(client, expected):
    forwarded, relayed = decode(client, FORWARD), decode(client, RELAY)
    assert forwarded.tokens == relayed.tokens == expected
    assert (forwarded.hops, forwarded.failovers, forwarded.mismatches) == (3, 0, 0)
    # the client sends hidden states to the first hop only (and gets every hop's output): 4 transfers a step, not 6
    assert forwarded.link_bytes < 0.8 * relayed.link_bytes


def test_a_push_is_taken_only_from_the_named_hop_or_the_sessions_client(tiny_pipeline, tiny_llama_dir, client):
    first, second = tiny_pipeline.nodes[0], tiny_pipeline.nodes[1]
    hidden = serialize_tensor(torch.zeros(1, 1, client.model.config.hidden_size))
    push = pb.PushRequest(session_id="nobody-opened-this", start_block=2, end_block=4, step_id=0, hidden_states=hidden)
    with node_channel(second) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.BlockServiceStub(channel).PushStep(push, timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    # a session of another client, whose step waits for node `first`: a push from a member that is neither
    # (this process, a member through `client`) is not taken, but the session's own client may push
    with SwarmClient(tiny_pipeline.initial_peers, model=str(tiny_llama_dir), identity=NodeIdentity.generate()) as owner:
        [record] = [r for r in owner.servers() if r.start_block == 2]
        with owner.inference_session(16, route=[Hop(record, 2, 4)], policy=RELAY) as session:
            stream = session.route_streams[0]
            positions, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
            stream.send(None, positions, mask, upstream=first.info["node_id"])
            stranger = pb.PushRequest(session_id=stream.session_id, start_block=2, end_block=4, step_id=0, hidden_states=hidden)
            with node_channel(second) as channel:  # taken into the mailbox once the session is open there
                wait_until(lambda: pushed(channel, stranger), "the session is open on the node", interval=0.2)
            with pytest.raises(StepTimeout):
                stream.receive(timeout=3.0)  # the stranger's input was not taken
            stream.push(0, hidden, timeout=30)  # the session's client stands in for the hop
            reply = stream.receive_reply(timeout=60)
    assert reply.hidden.shape == (1, 1, client.model.config.hidden_size)


def pushed(channel, request: pb.PushRequest) -> bool:
    """Whether the node took the push (False: no such session yet)."""
    try:
        pb_grpc.BlockServiceStub(channel).PushStep(request, timeout=30)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return False
    return True


@pytest.fixture(scope="module")
def liars(tiny_llama_dir):
    """Blocks 3:6 on an honest node; 0:3 on a node that refuses to push, one that says it pushes and does
    not, and one that pushes corrupted states."""
    with LocalSwarm([["--model", str(tiny_llama_dir), "--blocks", "3:6"]]) as swarm:
        for push in ("refuse", "drop", "corrupt"):
            swarm.add_node(["--model", str(tiny_llama_dir), "--blocks", "0:3"], lies=Lies(push=push))
        yield swarm


@pytest.fixture(scope="module")
def liars_client(liars, tiny_llama_dir):
    with SwarmClient(liars.initial_peers, model=str(tiny_llama_dir)) as client:
        wait_until(lambda: len(client.servers()) == 4, "the four nodes are announced", interval=0.5)
        yield client


def route_from(client, liar, honest) -> list[Hop]:
    by_address = {record.address: record for record in client.servers()}
    return [Hop(by_address[liar.address], 0, 3), Hop(by_address[honest.address], 3, 6)]


PREFILL_CHUNKS = -(-len(PROMPT) // 4)  # all queued before the first one's answer


@pytest.mark.parametrize("lie, mismatches", [("refuse", 0), ("drop", PREFILL_CHUNKS)])
def test_a_node_that_does_not_push_changes_no_token(liars, liars_client, expected, lie, mismatches):
    honest, liar = liars.nodes[0], liars.nodes[1 + ["refuse", "drop"].index(lie)]
    decoded = decode(liars_client, FORWARD, route_from(liars_client, liar, honest))
    assert decoded.tokens == expected
    # the client pushes in its place: at once for a node that says it did not push; after a deadline for
    # one that says it did, for each prefill chunk already queued, and then the session relays
    assert (decoded.failovers, decoded.mismatches) == (0, mismatches)


def test_a_node_that_pushes_other_states_than_it_replies_is_caught_and_the_session_relays(liars, liars_client, expected):
    honest, corrupter = liars.nodes[0], liars.nodes[3]
    decoded = decode(liars_client, FORWARD, route_from(liars_client, corrupter, honest))
    assert decoded.tokens == expected
    assert (decoded.failovers, decoded.mismatches) == (0, 1)
