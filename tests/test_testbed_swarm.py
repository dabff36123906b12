"""Swarms on real separate hosts: network namespaces on a bridge (scripts/testbed.sh), mDNS and all.

Skipped, with the reason, where namespaces cannot be made (not root, no `ip netns`). Every test tears
its testbed down, and the processes inside it, even when it fails.
"""

import json
import signal
import sys
from pathlib import Path

import pytest

from edgeswarm import SwarmClient
from devtools.launcher import NodeProcess, start_node
from devtools.reference import reference_greedy_tokens
from devtools import testbed as edge_testbed
from edgeswarm.swarm.routing import Hop
from devtools.decoding import greedy_decode
from devtools.testbed import Testbed
from tests.support import until_eos

AVAILABLE, WHY_NOT = edge_testbed.testbed_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not AVAILABLE, reason=f"no testbed here: {WHY_NOT}")]
PROMPT = [5, 77, 300, 12, 9, 401]
ROOT = Path(__file__).resolve().parent.parent  # the working directory of programs run in a host, for `tests.support`

# Runs inside a testbed host (from ROOT): a client given no address at all finds the swarm by mDNS.
ZERO_CONFIG_CLIENT = """
import json, sys
from edgeswarm import SwarmClient
from tests.support import wait_until
with SwarmClient(model=sys.argv[1]) as client:
    wait_until(lambda: len(client.servers()) >= int(sys.argv[2]), "every node is announced", interval=0.5)
    spans = sorted([r.start_block, r.end_block] for r in client.servers())
    print(json.dumps({"spans": spans, "tokens": client.generate(json.loads(sys.argv[3]), max_new_tokens=8).token_ids}))
"""


def node_on(testbed: Testbed, host: int, args: list[str]) -> NodeProcess:
    """A node on a testbed host, told no peer: it finds the others over mDNS."""
    return start_node(args, prefix=testbed.exec_args(host, []), host=testbed.host_ip(host), mdns=True, timeout=180)


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
    finished = testbed.run(5, [sys.executable, "-c", ZERO_CONFIG_CLIENT, str(tiny_llama_dir), "4", json.dumps(PROMPT)], timeout=180, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
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
presence = LanPresence("12D3KooWfake" + sys.argv[2], "edgeswarm", [f"/ip4/{sys.argv[1]}/tcp/{port}/p2p/12D3KooWfake"], print)
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
