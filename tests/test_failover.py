"""Nodes that die, stall, leave, join or move in the middle of a session: no token lost or altered."""

import os
import signal

import pytest

from edgeswarm import SwarmClient
from devtools.launcher import LocalSwarm, start_node
from devtools.reference import reference_greedy_tokens
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.policy import SessionPolicy
from edgeswarm.swarm.session import InferenceSession
from devtools.decoding import greedy_decode
from tests.support import announced, wait_until

pytestmark = pytest.mark.slow
PROMPT = [5, 77, 300, 12, 9, 401]
TOKENS = 16


@pytest.fixture(scope="module")
def client(tiny_pipeline, tiny_llama_dir):
    with SwarmClient(tiny_pipeline.initial_peers, model=str(tiny_llama_dir), policy=SessionPolicy(replacement_wait=20)) as swarm_client:
        yield swarm_client


@pytest.fixture(scope="module")
def expected(tiny_llama_reference):
    return reference_greedy_tokens(tiny_llama_reference, PROMPT, TOKENS)


def session_through(client, nodes_by_span: dict[tuple[int, int], str]) -> InferenceSession:
    """A session whose route uses the node at the given address for each span, once all are announced."""

    def all_announced() -> dict | None:
        records = {record.address: record for record in client.servers()}
        return records if set(nodes_by_span.values()) <= records.keys() else None

    records = wait_until(all_announced, f"the nodes at {sorted(set(nodes_by_span.values()))} are announced", interval=0.5)
    route = [Hop(records[address], start, end) for (start, end), address in sorted(nodes_by_span.items())]
    return client.inference_session(max_length=64, route=route)


def start_victim(tiny_pipeline, tiny_llama_dir, *extra_args):
    return start_node(["--model", str(tiny_llama_dir), "--blocks", "2:4", *extra_args], tiny_pipeline.initial_peers)


def route_with(tiny_pipeline, middle_address: str) -> dict:
    return {(0, 2): tiny_pipeline.nodes[0].address, (2, 4): middle_address, (4, 6): tiny_pipeline.nodes[2].address}


def test_a_killed_middle_node_is_replaced_without_losing_a_token(tiny_pipeline, client, expected, tiny_llama_dir):
    victim = start_victim(tiny_pipeline, tiny_llama_dir)
    with session_through(client, route_with(tiny_pipeline, victim.address)) as session:
        kill = lambda i: i == 4 and os.killpg(victim.process.pid, signal.SIGKILL)  # noqa: E731
        assert greedy_decode(session, PROMPT, TOKENS, after_token=kill) == expected
        [event] = session.failovers
        assert event.failed_node == victim.info["node_id"]
        assert [hop.record.address for hop in event.replacement] == [tiny_pipeline.nodes[1].address]
        assert event.replayed_tokens == len(PROMPT) + 5
        assert session.route[1].record.address == tiny_pipeline.nodes[1].address


def test_a_stalled_node_is_detected_and_the_session_rerouted(tiny_pipeline, client, expected, tiny_llama_dir):
    victim = start_victim(tiny_pipeline, tiny_llama_dir)
    stall = lambda i: i == 4 and victim.process.send_signal(signal.SIGSTOP)  # noqa: E731

    try:
        with session_through(client, route_with(tiny_pipeline, victim.address)) as session:
            assert greedy_decode(session, PROMPT, TOKENS, after_token=stall) == expected
            [event] = session.failovers
            assert event.failed_node == victim.info["node_id"] and "no answer" in event.reason  # its stream stayed open
    finally:
        victim.process.send_signal(signal.SIGCONT)
        victim.stop()


def test_a_graceful_leave_drains_the_session_first(tiny_pipeline, client, expected, tiny_llama_dir):
    victim = start_victim(tiny_pipeline, tiny_llama_dir, "--drain-timeout", "600")  # it drains however slowly the session runs
    with session_through(client, route_with(tiny_pipeline, victim.address)) as session:
        leave = lambda i: i == 4 and victim.process.send_signal(signal.SIGTERM)  # noqa: E731
        assert greedy_decode(session, PROMPT, TOKENS, after_token=leave) == expected
        assert session.failovers == []  # the leaving node kept serving its open session
        assert victim.process.poll() is None
        # while draining it is withdrawn, and takes no new sessions
        wait_until(lambda: not announced(client, victim), "the leaving node is withdrawn", interval=0.5)
        assert victim.process.poll() is None  # still draining: the session is open
    assert victim.process.wait(timeout=60) == 0  # once the session closed, it left


def test_a_leave_that_outlasts_its_drain_timeout_fails_over(tiny_pipeline, client, expected, tiny_llama_dir):
    victim = start_victim(tiny_pipeline, tiny_llama_dir, "--drain-timeout", "1")

    def leave(index):
        if index == 4:
            victim.process.send_signal(signal.SIGTERM)
            victim.process.wait(timeout=20)

    with session_through(client, route_with(tiny_pipeline, victim.address)) as session:
        assert greedy_decode(session, PROMPT, TOKENS, after_token=leave) == expected
        assert [event.failed_node for event in session.failovers] == [victim.info["node_id"]]


def test_a_node_joining_mid_session_raises_coverage_and_breaks_nothing(tiny_pipeline, client, expected, tiny_llama_dir):
    joined = []

    def join(index):
        if index == 4:
            joined.append(start_node(["--model", str(tiny_llama_dir), "--num-blocks", "2"], tiny_pipeline.initial_peers))

    try:
        with client.inference_session(max_length=64) as session:
            assert greedy_decode(session, PROMPT, TOKENS, after_token=join) == expected
            assert session.failovers == []
        [node] = joined
        wait_until(lambda: announced(client, node), "the joined node is announced", interval=0.5)
    finally:
        for node in joined:
            node.stop()


def test_a_gap_left_by_a_crash_is_filled_by_a_rebalancing_node(tiny_llama_dir, expected):
    model = ["--model", str(tiny_llama_dir)]
    pinned = [[*model, "--blocks", span, "--announce-ttl", "3"] for span in ("0:2", "2:4", "4:6")]
    with LocalSwarm(pinned) as swarm, SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir), policy=SessionPolicy(replacement_wait=30)) as client:
        mover = swarm.add_node([*model, "--num-blocks", "2", "--rebalance-period", "1"])
        by_span = {node.blocks: node.address for node in swarm.nodes[:3]}
        by_span[mover.blocks] = mover.address  # the session uses the mover for the blocks it took first
        victim = next(node for node in swarm.nodes[:3] if node.blocks != mover.blocks)
        with session_through(client, by_span) as session:
            crash = lambda i: i == 4 and os.killpg(victim.process.pid, signal.SIGKILL)  # noqa: E731
            assert greedy_decode(session, PROMPT, TOKENS, after_token=crash) == expected
            [event] = session.failovers
            # the only node that could take the lost blocks is the mover, after moving to them; its old
            # blocks kept serving this same session meanwhile
            assert [hop.record.address for hop in event.replacement] == [mover.address]
            assert [hop.record.address for hop in session.route].count(mover.address) == 2
        moved = f"moved from blocks {mover.blocks[0]}:{mover.blocks[1]} to {victim.blocks[0]}:{victim.blocks[1]}"
        wait_until(lambda: any(line.startswith(moved) for line in mover.output), f"the mover logs {moved!r}")
