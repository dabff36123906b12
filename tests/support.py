"""Helpers for the tests: plain functions, imported by name (`from tests.support import wait_until`).

The split: every shared *fixture* (the models, their references, identities, swarms) is in
tests/conftest.py, where pytest finds it; every shared *function* is here. Nothing here starts or
stops anything on its own: these are helpers for tests that run real node processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import grpc

from devtools.waiting import POLL_INTERVAL, poll
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.channels import open_channel
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.membership import join_as_client
from edgeswarm.swarm.transport import SpanStream

if TYPE_CHECKING:
    from devtools.launcher import NodeProcess

T = TypeVar("T")


# --- waiting ---------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], T], what: str = "", timeout: float = 60.0, interval: float = POLL_INTERVAL) -> T:
    """Polls `condition` until it returns something true, and returns that; fails the test after `timeout`
    seconds (generous bounds: tests wait on conditions, never on the machine's speed)."""
    value = poll(condition, timeout, interval)
    if not value:
        raise AssertionError(f"not reached within {timeout:.0f} s: {what or condition}")
    return value


# --- talking to nodes ------------------------------------------------------------------------------


@contextmanager
def swarm_member(initial_peers: Sequence[str], swarm_key: bytes | None = None) -> Iterator[None]:
    """Makes this test process a client member of the swarm (as a SwarmClient does), so that nodes
    accept its signed calls, for tests that talk to nodes without a client."""
    dht = swarm_dht.start_dht(list(initial_peers), client_mode=True, swarm_key=swarm_key)
    member = join_as_client(dht, swarm_key)
    try:
        yield
    finally:
        member.close()
        dht.shutdown()


def node_channel(node: NodeProcess) -> grpc.Channel:
    """A channel whose calls are signed for `node` by this process's identity."""
    return open_channel(node.address, node.info["node_id"])


def node_info(node: NodeProcess) -> pb.NodeInfoResponse:
    """NodeInfo of `node`; this process must be a member of its swarm (a SwarmClient or swarm_member)."""
    with node_channel(node) as channel:
        return pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=10)


def announced(client, node: NodeProcess) -> bool:
    """Whether `client` sees a record of `node` (by its address) in the DHT."""
    return any(record.address == node.address for record in client.servers())


# --- comparing with the reference model ------------------------------------------------------------


def reference_continuation(model, input_ids, attention_mask=None, max_new_tokens: int = 24):
    """The greedy tokens a whole transformers model appends to each row of `input_ids` (no EOS cut)."""
    output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False)
    return output[:, input_ids.shape[1] :]


def until_eos(token_ids, eos_ids) -> list[int]:
    """Token ids up to (not including) the first end-of-sequence token, as the client reports them."""
    result = []
    for token in [int(token) for token in token_ids]:
        if token in eos_ids:
            break
        result.append(token)
    return result


def one_step(stream: SpanStream, hidden, positions, mask, timeout: float = 10.0):
    """Sends one step on a hop's stream and returns the node's output (or raises its error)."""
    stream.send(hidden, positions, mask)
    return stream.receive(timeout)


class GatedWorker:
    """A node's worker whose steps wait for `release`; counts the steps it started."""

    def __init__(self, node_id):
        self.node_id, self.running_steps, self.started = node_id, 0, 0
        self.release, self.entered = threading.Event(), threading.Event()

    def authorize(self, kind, args, caller):
        """Lets every step in (tool steps need no owner)."""

    def execute(self, run_id, kind, args, on_text=None):
        self.started += 1
        self.entered.set()
        self.release.wait(timeout=30)
        return {"ran_on": self.node_id}
