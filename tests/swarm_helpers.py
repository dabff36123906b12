"""Helpers for tests that run real node processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import grpc

from devtools.launcher import NodeProcess
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.channels import open_channel
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.membership import join_as_client

T = TypeVar("T")


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


def wait_until(condition: Callable[[], T], what: str = "", timeout: float = 60.0, interval: float = 0.2) -> T:
    """Polls `condition` until it returns something true, and returns that; fails the test after `timeout`
    seconds (generous bounds: tests wait on conditions, never on the machine's speed)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:.0f} s: {what or condition}")
        time.sleep(interval)
    return value


def until_eos(token_ids, eos_ids) -> list[int]:
    """Token ids up to (not including) the first end-of-sequence token, as the client reports them."""
    result = []
    for token in [int(token) for token in token_ids]:
        if token in eos_ids:
            break
        result.append(token)
    return result
