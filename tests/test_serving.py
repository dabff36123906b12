"""Serving many sessions: KV-cache admission ("busy" and a retry elsewhere), idle eviction, and no leaks."""

import time

import grpc
import pytest
import torch

from devtools.decoding import greedy_decode
from devtools.launcher import LocalSwarm, start_node
from devtools.reference import reference_greedy_tokens
from edgeswarm import SwarmClient
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.busy import busy_retry_after
from edgeswarm.protocol.tensors import serialize_tensor
from edgeswarm.swarm.routing import Hop
from tests.support import node_channel, node_info, swarm_member, wait_until

pytestmark = pytest.mark.slow
PROMPT = [5, 77, 300, 12, 9]


def _open_session(channel: grpc.Channel, model_id: str, max_length: int, steps: int = 1):
    """A raw session on blocks 0:6 that sends `steps` one-token steps; returns the responses."""
    requests = [pb.SessionRequest(open=pb.SessionOpen(session_id=f"raw-{time.monotonic_ns()}", model_id=model_id, start_block=0, end_block=6, max_length=max_length))]
    for step in range(steps):
        requests.append(
            pb.SessionRequest(
                step=pb.SessionStep(
                    step_id=step,
                    hidden_states=serialize_tensor(torch.randn(1, 1, 64)),
                    position_ids=serialize_tensor(torch.tensor([[step]])),
                    attention_mask=serialize_tensor(torch.ones(1, 1, dtype=torch.bool)),
                )
            )
        )
    return list(pb_grpc.BlockServiceStub(channel).InferenceSession(iter(requests), timeout=30))


def test_a_full_node_answers_busy_and_the_client_goes_elsewhere(tiny_llama_dir, tiny_llama_reference):
    model = ["--model", str(tiny_llama_dir)]
    expected = reference_greedy_tokens(tiny_llama_reference, PROMPT, 8)
    # 1 MiB holds one session of 400 tokens through 6 blocks (256 bytes per token and block), not two
    with LocalSwarm([[*model, "--blocks", "0:6", "--kv-memory", "1"]]) as swarm:
        small = swarm.nodes[0]
        # a busy node is skipped for busy_seconds: here longer than the test, however slowly it runs
        with SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir), mdns=False, busy_seconds=600) as client:
            holder = client.inference_session(max_length=400)
            holder.step(torch.tensor([PROMPT]))
            with node_channel(small) as channel, pytest.raises(grpc.RpcError) as refused:
                _open_session(channel, client.model.model_id, 400)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details().startswith("KV-cache budget exhausted")
            assert busy_retry_after(refused.value) is not None
            roomy = swarm.add_node([*model, "--blocks", "0:6"])
            wait_until(lambda: len(client.servers()) >= 2, "both nodes are announced")
            # a session routed to the full node is told "busy" and replays on the other one
            full_record = next(record for record in client.servers() if record.address == small.address)
            with client.inference_session(max_length=400, route=[Hop(full_record, 0, 6)]) as session:
                assert greedy_decode(session, PROMPT, 8) == expected
                assert [hop.record.address for hop in session.route] == [roomy.address]
                assert "is busy" in session.failovers[0].reason
            with client.inference_session(max_length=400) as session:  # the full node is skipped for a while
                assert greedy_decode(session, PROMPT, 8) == expected
                assert not session.failovers
            holder.close()


def test_idle_sessions_are_closed_and_leave_nothing_behind(tiny_llama_dir):
    node = start_node(["--model", str(tiny_llama_dir), "--blocks", "0:6", "--session-idle-timeout", "1"])
    try:
        with swarm_member(node.initial_peers):
            model_id = node_info(node).model_id
            with node_channel(node) as channel:
                requests = iter(
                    [
                        pb.SessionRequest(open=pb.SessionOpen(session_id="idle", model_id=model_id, start_block=0, end_block=6, max_length=32)),
                        pb.SessionRequest(
                            step=pb.SessionStep(
                                hidden_states=serialize_tensor(torch.randn(1, 3, 64)),
                                position_ids=serialize_tensor(torch.arange(3)[None]),
                                attention_mask=serialize_tensor(torch.ones(1, 3, dtype=torch.bool)),
                            )
                        ),
                    ]
                )
                blocking = _Blocking(requests)  # then sends nothing more, keeping the stream open
                responses = pb_grpc.BlockServiceStub(channel).InferenceSession(blocking, timeout=30)
                assert next(responses).cache_length == 3
                assert node_info(node).active_sessions == 1
                with pytest.raises(grpc.RpcError) as closed:
                    next(responses)
                assert closed.value.code() == grpc.StatusCode.CANCELLED
                blocking.release()

            def evicted() -> bool:
                info = node_info(node)
                return (info.active_sessions, info.kv_cache_bytes, info.kv_reserved_bytes, info.evicted_sessions) == (0, 0, 0, 1)

            wait_until(evicted, "the idle session is evicted and its memory freed", timeout=30)
    finally:
        node.stop()


class _Blocking:
    """A request iterator that yields some requests, then blocks until released."""

    def __init__(self, requests):
        self._requests = requests
        self._released = __import__("threading").Event()

    def __iter__(self):
        return self

    def __next__(self):
        for request in self._requests:
            return request
        self._released.wait(timeout=30)
        raise StopIteration

    def release(self) -> None:
        self._released.set()


def test_two_hundred_sessions_leave_memory_where_it_was(tiny_llama_dir):
    node = start_node(["--model", str(tiny_llama_dir), "--blocks", "0:6"])
    try:
        with swarm_member(node.initial_peers):
            model_id = node_info(node).model_id
            with node_channel(node) as channel:
                for _ in range(20):  # warm up allocators and gRPC
                    _open_session(channel, model_id, 64, steps=4)
                baseline = node_info(node).rss_bytes
                for _ in range(200):
                    assert len(_open_session(channel, model_id, 64, steps=4)) == 4

                def closed() -> pb.NodeInfoResponse | None:
                    info = node_info(node)
                    return info if (info.active_sessions, info.kv_cache_bytes, info.kv_reserved_bytes) == (0, 0, 0) else None

                info = wait_until(closed, "every session is closed and its memory freed", timeout=30, interval=0.1)
            assert info.rss_bytes - baseline < 16 * 2**20
    finally:
        node.stop()
