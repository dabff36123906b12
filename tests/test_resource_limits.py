"""Bounded resources on the data plane: KV reserved for the batch a session really runs, per-client session
caps, idle sessions that make way when slots are short, and separate slot pools so that NodeInfo and
Forward answer whatever the sessions do.

The server tests run a real gRPC server in this process on loopback, with real call authentication
(protocol.call_auth; every signed key counts as a member here, as no DHT runs) and a clock the test moves,
so that "idle for 10 s" needs no waiting.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import grpc
import pytest
import torch

from edgeswarm.model.sources import open_model
from edgeswarm.model.span import TransformerSpan
from edgeswarm.node.admission import (
    ADMIN,
    FORWARDS,
    SESSIONS,
    TASKS,
    CallSlots,
    SlotsFull,
    pool_of,
)
from edgeswarm.node.service import BlockServicer, ServiceLimits, start_grpc_server
from edgeswarm.node.session_slots import SessionSlots, client_of
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.busy import BUSY_RETRY_SECONDS, busy_retry_after
from edgeswarm.protocol.call_auth import CallAuthenticator, SignedCalls
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.principals import Principal
from edgeswarm.protocol.tensors import serialize_tensor
from edgeswarm.swarm.errors import NodeBusyError
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.transport import remote_error
from tests.support import wait_until

MODEL_ID = "tiny-limits"
NODE_ID = "limits-node"
HIDDEN = 64  # tests.tiny_models
BLOCKS = 2
BYTES_PER_TOKEN_AND_BLOCK = 256  # 2 kv heads x 16 dims x (key + value) x 4 bytes
DEADLINE = 30.0
POLL_SECONDS = 0.02


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- SessionSlots alone ----------------------------------------------------------------------------


class FakeContext:
    """What SessionSlots reads of a call: its principal (or peer address)."""

    def __init__(self, principal: str | None = None, peer: str = "ipv4:10.0.0.1:4242"):
        self.principal = Principal(principal) if principal else None
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def make_slots(capacity=4, per_client=3, idle_timeout=300.0, crowded_idle_timeout=10.0):
    clock, closed = FakeClock(), []
    slots = SessionSlots(capacity, per_client, idle_timeout, crowded_idle_timeout, clock, lambda context, reason: closed.append((context, reason)))
    return slots, clock, closed


def test_anonymous_callers_count_by_address_not_by_connection():
    assert client_of(FakeContext("abc")) == "abc"
    assert client_of(FakeContext(peer="ipv4:10.0.0.1:4242")) == client_of(FakeContext(peer="ipv4:10.0.0.1:5353")) == "anonymous ipv4:10.0.0.1"
    assert client_of(FakeContext(peer="ipv6:[::1]:4242")) == "anonymous ipv6:[::1]"


def test_a_client_over_its_cap_is_refused_while_others_are_served():
    slots, _, closed = make_slots(capacity=8, per_client=2)
    for _ in range(2):
        slots.enter(FakeContext(peer="ipv4:10.0.0.1:1000"))
    with pytest.raises(SlotsFull, match=r"^too many open sessions for anonymous ipv4:10.0.0.1 \(at most 2"):
        slots.enter(FakeContext(peer="ipv4:10.0.0.1:2000"))  # another connection from the same address
    slots.enter(FakeContext(peer="ipv4:10.0.0.2:1000"))
    slots.enter(FakeContext("alice"))
    assert slots.taken == 4 and not closed


def test_when_slots_are_short_the_longest_idle_session_makes_way_but_never_a_working_one():
    slots, clock, closed = make_slots(capacity=4, per_client=4, crowded_idle_timeout=10.0)
    first, second, third = FakeContext("a"), FakeContext("b"), FakeContext("c")
    slots.enter(first)
    clock.advance(1)
    slots.enter(second)
    slots.enter(third)  # 3 of 4 taken: slots are short now
    clock.advance(9)  # first idle for 10 s, the others for 9 s
    with slots.working(first):  # a working session is never closed to make room
        fourth = FakeContext("d")
        slots.enter(fourth)  # nobody idle for 10 s: it takes the last free slot
        assert not closed and slots.taken == 4
        with pytest.raises(SlotsFull, match="^all 4 session slots are taken and none has been idle for 10 s"):
            slots.enter(FakeContext("e"))
        clock.advance(5)
    # first is idle again from now; second and third have been idle for 14 s: second entered first
    newcomer = FakeContext("e")
    slots.enter(newcomer)
    assert [context for context, _ in closed] == [second]
    assert "idle for over 10 s while this node's session slots were short" in closed[0][1]
    assert slots.taken == 4 and slots.evicted == 1
    slots.leave(second)  # its stream ends later: harmless
    assert slots.taken == 4


def test_below_the_crowded_mark_idle_sessions_stay_until_the_idle_timeout():
    slots, clock, closed = make_slots(capacity=8, per_client=8, idle_timeout=300.0, crowded_idle_timeout=10.0)
    contexts = [FakeContext(f"c{index}") for index in range(3)]
    for context in contexts:
        slots.enter(context)
    clock.advance(100)
    slots.enter(FakeContext("late"))  # 4 of 8: not short, nobody makes way
    assert not closed
    assert slots.close_idle() == 0
    clock.advance(200)  # the first three have been idle for 300 s
    with slots.working(contexts[0]):
        assert slots.close_idle() == 2  # not the one working
    assert {context for context, _ in closed} == set(contexts[1:])
    assert all(reason == "session closed: no step for 300 s" for _, reason in closed)


def test_calls_go_to_their_own_pools():
    assert pool_of("/edgeswarm.v1.BlockService/InferenceSession") == SESSIONS
    assert pool_of("/edgeswarm.v1.BlockService/Forward") == FORWARDS
    assert pool_of("/edgeswarm.v1.TaskService/RunStep") == pool_of("/edgeswarm.v1.TaskService/WatchRun") == TASKS
    assert pool_of("/edgeswarm.v1.BlockService/NodeInfo") == pool_of("/edgeswarm.v1.BlockService/Echo") == ADMIN
    pool = CallSlots(TASKS, 1)
    pool.enter(None)
    with pytest.raises(SlotsFull, match="^all 1 tasks slots of this node are taken"):
        pool.enter(None)
    pool.leave(None)
    pool.enter(None)


# --- a real server ---------------------------------------------------------------------------------


class HeldStream:
    """A session stream on `channel` that sends `requests`, then keeps the stream open until `release()`."""

    def __init__(self, channel: grpc.Channel, requests: list[pb.SessionRequest]):
        self._requests = list(requests)
        self._released = threading.Event()
        self.responses = pb_grpc.BlockServiceStub(channel).InferenceSession(self._iterate(), timeout=120)

    def _iterate(self):
        yield from self._requests
        self._released.wait(timeout=120)

    def release(self) -> None:
        self._released.set()
        self.responses.cancel()


def opening(session_id: str, max_length: int = 32) -> pb.SessionRequest:
    return pb.SessionRequest(open=pb.SessionOpen(session_id=session_id, model_id=MODEL_ID, start_block=0, end_block=BLOCKS, max_length=max_length))


def step(batch: int, length: int = 1, step_id: int = 0) -> pb.SessionRequest:
    return pb.SessionRequest(
        step=pb.SessionStep(
            step_id=step_id,
            hidden_states=serialize_tensor(torch.randn(batch, length, HIDDEN)),
            position_ids=serialize_tensor(torch.arange(length).expand(batch, length)),
            attention_mask=serialize_tensor(torch.ones(batch, length, dtype=torch.bool)),
        )
    )


class Node:
    """A BlockServicer on 2 tiny blocks behind the real data-plane server, and signed channels to it."""

    def __init__(self, tiny_llama_dir, limits: ServiceLimits):
        source = open_model(tiny_llama_dir)
        span = TransformerSpan(source.config, 0, BLOCKS, [source.block_state(i) for i in range(BLOCKS)])
        self.clock = FakeClock()
        self.servicer = BlockServicer(span, MODEL_ID, NODE_ID, 1.0, limits, clock=self.clock)
        authenticator = CallAuthenticator(NODE_ID, is_member=lambda fingerprint: True)
        self.server, port = start_grpc_server(self.servicer, "127.0.0.1", 0, authenticator)
        self.address = f"127.0.0.1:{port}"
        self.streams: list[HeldStream] = []
        self.channels: list[grpc.Channel] = []

    def channel(self, identity: NodeIdentity) -> grpc.Channel:
        channel = grpc.intercept_channel(grpc.insecure_channel(self.address), SignedCalls(identity, NODE_ID))
        self.channels.append(channel)
        return channel

    def hold(self, channel: grpc.Channel, *requests: pb.SessionRequest) -> HeldStream:
        stream = HeldStream(channel, list(requests))
        self.streams.append(stream)
        return stream

    def info(self, channel: grpc.Channel) -> pb.NodeInfoResponse:
        return pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=DEADLINE)

    def close(self) -> None:
        for stream in self.streams:
            stream.release()
        for channel in self.channels:
            channel.close()
        self.server.stop(0).wait(timeout=5)
        self.servicer.batcher.stop()


@pytest.fixture
def make_node(tiny_llama_dir):
    nodes: list[Node] = []

    def make(**limits) -> Node:
        nodes.append(Node(tiny_llama_dir, ServiceLimits(max_session_length=64, **limits)))
        return nodes[-1]

    yield make
    for node in nodes:
        node.close()


def test_a_huge_first_batch_is_refused_busy_and_allocates_nothing(make_node):
    one_sequence = 32 * BLOCKS * BYTES_PER_TOKEN_AND_BLOCK  # a session of max_length 32 through both blocks
    node = make_node(kv_memory_bytes=4 * one_sequence)
    channel = node.channel(NodeIdentity.generate())
    holder = node.hold(channel, opening("holder"), step(batch=2))
    assert next(holder.responses).cache_length == 1
    info = node.info(channel)
    assert info.kv_reserved_bytes == 2 * one_sequence  # the reservation grew to the batch the session runs
    cache_bytes = info.kv_cache_bytes
    assert 0 < cache_bytes <= info.kv_reserved_bytes

    flood = node.hold(channel, opening("flood"), step(batch=48))  # 48 sequences: 24 times what is left
    with pytest.raises(grpc.RpcError) as refused:
        next(flood.responses)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details().startswith("KV-cache budget exhausted: session 'flood:0:2' asks")
    assert busy_retry_after(refused.value) == BUSY_RETRY_SECONDS  # "busy" travels in the status details
    record = SimpleNamespace(node_id=NODE_ID, address=node.address)
    assert isinstance(remote_error(Hop(record, 0, BLOCKS), refused.value), NodeBusyError)  # the client goes elsewhere
    wait_until(lambda: node.info(channel).active_sessions == 1, "the refused session is gone", timeout=DEADLINE, interval=POLL_SECONDS)
    info = node.info(channel)
    assert (info.kv_reserved_bytes, info.kv_cache_bytes) == (2 * one_sequence, cache_bytes)  # it held nothing

    absurd = node.hold(channel, opening("absurd"), step(batch=65))
    with pytest.raises(grpc.RpcError) as refused:
        next(absurd.responses)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a batch of 65 sequences is above this node's limit of 64" in refused.value.details()

    fits = node.hold(channel, opening("fits"), step(batch=2))  # exactly what is left
    assert next(fits.responses).cache_length == 1
    assert node.info(channel).kv_reserved_bytes == 4 * one_sequence == node.servicer.kv_budget.budget_bytes


def test_a_pool_full_of_idle_sessions_leaves_node_info_and_forward_answering_and_makes_way(make_node):
    node = make_node(session_slots=4, crowded_idle_timeout=10.0)
    channel = node.channel(NodeIdentity.generate())
    idle = []
    for index in range(4):
        idle.append(node.hold(channel, opening(f"idle-{index}"), step(batch=1)))
        assert next(idle[-1].responses).cache_length == 1
    assert node.servicer.session_slots.taken == 4

    refused_stream = node.hold(channel, opening("refused"), step(batch=1))
    with pytest.raises(grpc.RpcError) as refused:
        next(refused_stream.responses)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == "all 4 session slots are taken and none has been idle for 10 s"
    assert busy_retry_after(refused.value) == BUSY_RETRY_SECONDS

    info = node.info(channel)  # the admin pool answers
    assert (info.node_id, info.active_sessions) == (NODE_ID, 4)
    forward = pb.ForwardRequest(
        model_id=MODEL_ID,
        start_block=0,
        end_block=BLOCKS,
        hidden_states=serialize_tensor(torch.randn(1, 3, HIDDEN)),
        position_ids=serialize_tensor(torch.arange(3)[None]),
        attention_mask=serialize_tensor(torch.ones(1, 3, dtype=torch.bool)),
    )
    reply = pb_grpc.BlockServiceStub(channel).Forward(forward, timeout=DEADLINE)  # so does the forward pool
    assert list(reply.hidden_states.shape) == [1, 3, HIDDEN]

    node.clock.advance(10.0)  # every held session has now been idle for 10 s
    newcomer = node.hold(channel, opening("newcomer"), step(batch=1))
    assert next(newcomer.responses).cache_length == 1
    with pytest.raises(grpc.RpcError) as closed:  # the one idle longest made way
        next(idle[0].responses)
    assert closed.value.code() == grpc.StatusCode.CANCELLED
    assert "idle for over 10 s while this node's session slots were short" in closed.value.details()
    wait_until(lambda: node.info(channel).active_sessions == 4, "the closed session is gone", timeout=DEADLINE, interval=POLL_SECONDS)
    assert node.info(channel).evicted_sessions == 1
    assert node.servicer.session_slots.taken == 4


def test_a_principal_over_its_session_cap_is_refused_while_another_is_served(make_node):
    node = make_node(sessions_per_client=2)
    greedy, other = NodeIdentity.generate(), NodeIdentity.generate()
    greedy_channel, other_channel = node.channel(greedy), node.channel(other)
    held = [node.hold(greedy_channel, opening(f"greedy-{index}"), step(batch=1)) for index in range(2)]
    for stream in held:
        assert next(stream.responses).cache_length == 1

    third = node.hold(greedy_channel, opening("greedy-2"), step(batch=1))
    with pytest.raises(grpc.RpcError) as refused:
        next(third.responses)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == f"too many open sessions for {greedy.fingerprint} (at most 2 per client)"
    assert busy_retry_after(refused.value) == BUSY_RETRY_SECONDS

    served = node.hold(other_channel, opening("other-0"), step(batch=1))
    assert next(served.responses).cache_length == 1
    assert node.servicer.session_slots.held_by(other.fingerprint) == 1

    held[0].release()  # a session that ends gives its slot back
    wait_until(lambda: node.servicer.session_slots.held_by(greedy.fingerprint) == 1, "the ended session's slot is free", timeout=DEADLINE, interval=POLL_SECONDS)
    again = node.hold(greedy_channel, opening("greedy-3"), step(batch=1))
    assert next(again.responses).cache_length == 1
