"""A swarm of a tiny random Llama saved as sharded safetensors: equality, joining, leaving and dead peers."""

import os
import signal

import pytest

from edgeswarm import SwarmClient
from devtools.launcher import start_node
from edgeswarm.swarm.errors import SwarmConnectionError
from tests.support import announced, reference_continuation, until_eos, wait_until

pytestmark = pytest.mark.slow
EOS = {2}


@pytest.fixture(scope="module")
def tiny_client(tiny_pipeline, tiny_llama_dir):
    with SwarmClient(tiny_pipeline.initial_peers, model=str(tiny_llama_dir)) as client:
        yield client


def test_greedy_tokens_equal_transformers(tiny_client, tiny_llama_reference):
    import torch

    prompt = torch.tensor([[5, 77, 300, 12, 9, 401]])
    expected = reference_continuation(tiny_llama_reference, prompt, max_new_tokens=16)[0]
    result = tiny_client.generate(prompt[0].tolist(), max_new_tokens=16)
    assert result.token_ids == until_eos(expected, EOS)
    assert result.text is None  # the tiny model has no tokenizer
    assert len(result.route) == 3


def test_left_padded_batch_of_ids_equals_transformers(tiny_client, tiny_llama_reference):
    import torch

    rows = [[5, 77, 300, 12, 9, 401, 33], [250, 8]]
    ids = torch.tensor([rows[0], [0] * 5 + rows[1]])
    mask = torch.tensor([[1] * 7, [0] * 5 + [1] * 2])
    expected = reference_continuation(tiny_llama_reference, ids, mask, max_new_tokens=12)
    results = tiny_client.generate(rows, max_new_tokens=12, micro_batch=2)  # one padded session
    assert [result.token_ids for result in results] == [until_eos(row, EOS) for row in expected]


def test_graceful_leave_withdraws_the_announcement(tiny_pipeline, tiny_client, tiny_llama_dir):
    extra = start_node(["--model", str(tiny_llama_dir), "--blocks", "0:6"], tiny_pipeline.initial_peers)
    try:
        wait_until(lambda: announced(tiny_client, extra), "the new node is announced", interval=0.5)
        assert [hop.record.address for hop in tiny_client.route()] == [extra.address]  # one hop beats three
    finally:
        assert extra.stop(signal.SIGTERM) == 0
    wait_until(lambda: not announced(tiny_client, extra), "the stopped node is no longer announced", timeout=30, interval=0.5)


def test_a_node_that_stopped_answering_is_routed_around(tiny_pipeline, tiny_client, tiny_llama_dir):
    extra = start_node(["--model", str(tiny_llama_dir), "--blocks", "0:6"], tiny_pipeline.initial_peers)
    wait_until(lambda: announced(tiny_client, extra), "the new node is announced", interval=0.5)
    os.killpg(extra.process.pid, signal.SIGKILL)  # the device dies: no withdrawal, its record stays until it expires
    extra.process.wait(timeout=30)
    assert announced(tiny_client, extra)
    result = tiny_client.generate([5, 77, 300], max_new_tokens=4)
    assert extra.address not in [hop.record.address for hop in result.route]


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True  # no process of the group is left
    return False


def wait_until_group_is_gone(pgid: int) -> None:
    wait_until(lambda: group_is_gone(pgid), "every child of the node is gone with it", timeout=30, interval=0.5)


def test_signalling_the_whole_process_group_stops_every_process(tiny_pipeline, tiny_llama_dir):
    # as `timeout` or a terminal does: the DHT child and p2pd get the signal too, and nothing may hang
    extra = start_node(["--model", str(tiny_llama_dir), "--blocks", "0:6"], tiny_pipeline.initial_peers)
    os.killpg(extra.process.pid, signal.SIGTERM)
    assert extra.process.wait(timeout=30) == 0
    wait_until_group_is_gone(extra.process.pid)


def test_a_node_killed_alone_leaves_no_orphan_dht_process(tiny_pipeline, tiny_llama_dir):
    extra = start_node(["--model", str(tiny_llama_dir), "--blocks", "0:6"], tiny_pipeline.initial_peers)
    extra.process.send_signal(signal.SIGKILL)  # only the main process, as the OOM killer would
    extra.process.wait(timeout=30)
    wait_until_group_is_gone(extra.process.pid)


def test_client_with_a_dead_initial_peer_gets_a_clear_error(tiny_llama_dir):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCNNaFmPVdm3z1HQ5GfUo7QN21nXsHSr9nqna6cdsi1hq"
    with pytest.raises(SwarmConnectionError, match="cannot join the swarm through"):
        SwarmClient([dead], model=str(tiny_llama_dir))
    with pytest.raises(SwarmConnectionError, match="no initial peers given, and mDNS is off"):
        SwarmClient([], model=str(tiny_llama_dir), mdns=False)  # discovery itself is tested on the testbed


def test_status_command_shows_nodes_coverage_and_a_plot(tiny_pipeline, tiny_llama_dir, tmp_path):
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "edgeswarm.node.cli", "status", "--model", str(tiny_llama_dir), "--initial-peers", *tiny_pipeline.initial_peers]
    table = subprocess.run(command + ["--plot", str(tmp_path / "swarm.png")], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    for node in tiny_pipeline.nodes:
        assert node.address in table.stdout and f"{node.blocks[0]}:{node.blocks[1]}" in table.stdout
    assert "gaps: none" in table.stdout and "GAP" not in table.stdout
    assert (tmp_path / "swarm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = json.loads(subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=120).stdout)
    # earlier tests in this module add and kill nodes of their own: the three of the fixture must be there
    assert as_json["gaps"] == [] and len(as_json["coverage"]) == 6 and min(as_json["coverage"]) >= 1
    listed = {node["address"]: node for node in as_json["nodes"]}
    for node in tiny_pipeline.nodes:
        assert listed[node.address]["reachable"] and [listed[node.address]["start_block"], listed[node.address]["end_block"]] == list(node.blocks)
