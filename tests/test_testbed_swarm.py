"""Swarms on real separate hosts: network namespaces on a bridge (scripts/testbed.sh), mDNS and all.

Skipped, with the reason, where namespaces cannot be made (not root, no `ip netns`). Every test tears
its testbed down, and the processes inside it, even when it fails.
"""

import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devtools import testbed as edge_testbed
from devtools.decoding import greedy_decode
from devtools.launcher import NodeProcess, NodeStartError, start_node
from devtools.reference import reference_greedy_tokens
from devtools.testbed import Testbed
from edgeswarm import SwarmClient
from edgeswarm.node.daemon import READY_PREFIX
from edgeswarm.swarm.routing import Hop
from tests.support import until_eos, wait_until

AVAILABLE, WHY_NOT = edge_testbed.testbed_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not AVAILABLE, reason=f"no testbed here: {WHY_NOT}")]
PROMPT = [5, 77, 300, 12, 9, 401]
ROOT = Path(__file__).resolve().parent.parent  # the working directory of programs run in a host, for `tests.support`
START_TIMEOUT = 180.0  # seconds a node on a (loaded) testbed host may take to report ready

# Runs inside a testbed host (from ROOT): a client given no address at all finds the swarm by mDNS, and
# waits for every node and for every block to be served (after rebalancing, at worst: a generous bound).
ZERO_CONFIG_CLIENT = """
import json, sys
from edgeswarm import SwarmClient
from edgeswarm.partition.coverage import coverage_gaps
from tests.support import wait_until
with SwarmClient(model=sys.argv[1]) as client:
    full = lambda servers: len(servers) >= int(sys.argv[2]) and not coverage_gaps(servers, client.model.num_blocks)
    wait_until(lambda: full(client.servers()), "every node is announced and every block served", timeout=300, interval=0.5)
    spans = sorted([r.start_block, r.end_block] for r in client.servers())
    print(json.dumps({"spans": spans, "tokens": client.generate(json.loads(sys.argv[3]), max_new_tokens=8).token_ids}))
"""


def node_on(testbed: Testbed, host: int, args: list[str]) -> NodeProcess:
    """A node on a testbed host, told no peer: it finds the others over mDNS."""
    return start_node(args, prefix=testbed.exec_args(host, []), host=testbed.host_ip(host), mdns=True, timeout=START_TIMEOUT)


def bare_node(testbed: Testbed, host: int, args: list[str]) -> NodeProcess:
    """`swarm-node join ARGS` on a testbed host with no network option at all, as a person on a LAN types it."""
    command = testbed.exec_args(host, [sys.executable, "-m", "edgeswarm.node.cli", "join", *args])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    ready = lambda: [line for line in lines if line.startswith(READY_PREFIX)] or process.poll() is not None  # noqa: E731
    try:
        wait_until(ready, f"the node on host {host} reports ready", timeout=START_TIMEOUT)
        info = [line for line in lines if line.startswith(READY_PREFIX)]
        if not info:
            raise NodeStartError(f"node on host {host} exited with code {process.poll()}: " + "\n".join(lines[-20:]))
    except BaseException:
        NodeProcess(process, {}, lines).stop()
        raise
    return NodeProcess(process, json.loads(info[0][len(READY_PREFIX) :]), lines)


def bare_swarm(testbed: Testbed, args: list[list[str]]) -> list[NodeProcess]:
    """Bare nodes on hosts 1, 2, ... started at the same moment, one for each of `args`."""
    with ThreadPoolExecutor(len(args)) as pool:
        launches = [pool.submit(bare_node, testbed, host, node_args) for host, node_args in enumerate(args, start=1)]
    nodes = [launch.result() for launch in launches if launch.exception() is None]
    if len(nodes) < len(args):
        for node in nodes:
            node.stop()
        raise next(launch.exception() for launch in launches if launch.exception() is not None)
    return nodes


def zero_config_generation(testbed: Testbed, host: int, model_dir: Path, nodes: int) -> dict:
    """Runs ZERO_CONFIG_CLIENT on `host`: the spans it found once every block was served, and its tokens."""
    finished = testbed.run(host, [sys.executable, "-c", ZERO_CONFIG_CLIENT, str(model_dir), str(nodes), json.dumps(PROMPT)], timeout=420, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def expected(tiny_llama_reference):
    return reference_greedy_tokens(tiny_llama_reference, PROMPT, 16)


@pytest.fixture(scope="module")
def lan(tiny_llama_dir):
    """Five hosts: 1 to 4 serve the tiny model of swarm `edgeswarm` (blocks 0:2, 2:4, 2:4, 4:6), found by
    one another over mDNS; host 5 serves all of it in another swarm on the same LAN, which must stay apart."""
    model = ["--model", str(tiny_llama_dir)]
    with Testbed(5, force=True) as testbed:
        nodes = []
        try:
            for host, span in ((1, "0:2"), (2, "2:4"), (3, "2:4"), (4, "4:6")):
                nodes.append(node_on(testbed, host, [*model, "--blocks", span]))
            nodes.append(node_on(testbed, 5, [*model, "--blocks", "0:6", "--swarm-id", "another-swarm"]))
            yield testbed, nodes
        finally:
            for node in nodes:
                node.stop()


def test_hosts_find_each_other_over_mdns_and_serve_a_generation(lan, tiny_llama_dir, expected):
    testbed, _ = lan
    result = zero_config_generation(testbed, 5, tiny_llama_dir, 4)
    assert result["spans"] == [[0, 2], [2, 4], [2, 4], [4, 6]]  # all four hosts, and not the other swarm
    assert result["tokens"] == until_eos(expected[:8], {2})


def test_a_cut_link_mid_generation_fails_over_to_another_host(lan, tiny_llama_dir, expected):
    testbed, nodes = lan
    # the test process is the client, in the root namespace, reaching the hosts over the bridge
    with SwarmClient(nodes[0].initial_peers, model=str(tiny_llama_dir), mdns=False) as client:
        records = {record.address: record for record in client.servers()}
        route = [Hop(records[nodes[0].address], 0, 2), Hop(records[nodes[1].address], 2, 4), Hop(records[nodes[3].address], 4, 6)]
        with client.inference_session(max_length=64, route=route) as session:
            cut = lambda i: i == 4 and testbed.cut(2)  # noqa: E731
            assert greedy_decode(session, PROMPT, 16, after_token=cut) == expected
            [event] = session.failovers
            assert event.failed_node == nodes[1].info["node_id"]
            assert [hop.record.address for hop in event.replacement] == [nodes[2].address]
    # the cut host is gone for good: a SIGTERM would wait out its drain timeout for a session nobody can close
    nodes[1].stop(signal.SIGKILL)


def test_nodes_given_no_network_options_are_found_on_their_lan_addresses(tiny_llama_dir, expected):
    with Testbed(4, force=True) as testbed:
        nodes = bare_swarm(testbed, [["--model", str(tiny_llama_dir), "--blocks", span] for span in ("0:2", "2:4", "4:6")])
        try:
            for host, node in enumerate(nodes, start=1):  # listening everywhere, each announces its LAN address
                assert node.address.rsplit(":", 1)[0] == testbed.host_ip(host)
                assert [peer.split("/")[1:3] for peer in node.initial_peers] == [["ip4", testbed.host_ip(host)]]
            result = zero_config_generation(testbed, 4, tiny_llama_dir, 3)
            assert result["spans"] == [[0, 2], [2, 4], [4, 6]]
            assert result["tokens"] == until_eos(expected[:8], {2})
        finally:
            for node in nodes:
                node.stop()


def test_hosts_started_at_the_same_moment_cover_every_block(tiny_llama_dir, expected):
    with Testbed(4, force=True) as testbed:
        nodes = bare_swarm(testbed, [["--model", str(tiny_llama_dir), "--num-blocks", "2"]] * 3)
        try:
            result = zero_config_generation(testbed, 4, tiny_llama_dir, 3)  # waits for full coverage
            assert result["spans"] == [[0, 2], [2, 4], [4, 6]]
            assert result["tokens"] == until_eos(expected[:8], {2})
        finally:
            for node in nodes:
                node.stop()


ADVERTISE = """
import socket, sys, time
from edgeswarm.swarm.mdns import LanPresence
listener = socket.socket()
listener.bind((sys.argv[1], 0))
port = listener.getsockname()[1]
if sys.argv[2] == "closed":
    listener.close()  # the advertised address no longer answers: a host whose node vanished
else:
    listener.listen()
presence = LanPresence("12D3KooWfake" + sys.argv[2], "edgeswarm", [f"/ip4/{sys.argv[1]}/tcp/{port}/p2p/12D3KooWfake"], lambda maddrs: None)
print("advertising", flush=True)
time.sleep(30)
"""

DISCOVER = """
import json
from edgeswarm.swarm.mdns import discover_peers
print(json.dumps({"peers": discover_peers("edgeswarm", timeout=3.0)}))
"""


def test_stale_advertisements_are_dropped_without_hanging():
    import subprocess

    with Testbed(3, force=True) as testbed:
        advertisers = [
            testbed.popen(host, [sys.executable, "-c", ADVERTISE, testbed.host_ip(host), state], stdout=subprocess.PIPE, text=True)
            for host, state in ((1, "closed"), (2, "open"))
        ]
        for advertiser in advertisers:
            assert advertiser.stdout.readline().strip() == "advertising"
        # a discovery that hung on the stale address would outlast the run's (generous) timeout and fail
        finished = testbed.run(3, [sys.executable, "-c", DISCOVER], timeout=60)
        found = json.loads(finished.stdout.strip().splitlines()[-1])
        assert [peer.split("/")[2] for peer in found["peers"]] == [testbed.host_ip(2)]  # host 1's is dropped
