import json
import select
import socket
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from dataclasses import replace
from types import SimpleNamespace

import grpc
import pytest

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.records import OFFLINE, ServerRecord, servers_key
from edgeswarm.swarm.dht import RecordAuth
from edgeswarm.swarm.status import (
    SwarmStatus,
    collect_status,
    fetch_node_infos,
    plot_status,
    render_table,
)
from tests.support import wait_until

NUM_BLOCKS = 30
NOW = 1000.0
TTL = 15.0


def record(node: str, start: int, end: int, throughput: float, state: str = "online", address: str = "") -> ServerRecord:
    return ServerRecord(f"peer-{node * 8}", address or f"10.0.0.{start + 1}:{7000 + end}", "m", start, end, throughput, 0, state)


RECORDS = [
    record("a", 0, 10, 100.0),
    record("b", 0, 15, 200.0),
    record("c", 15, 20, 50.0),
    record("e", 20, 25, 500.0, state=OFFLINE),  # withdrawn: it must not fill the gap 20:25
    record("d", 25, 30, 80.0),
]


@pytest.fixture
def status() -> SwarmStatus:
    infos = {
        "peer-aaaaaaaa": pb.NodeInfoResponse(active_sessions=2, kv_cache_bytes=5_000_000, rss_bytes=300_000_000),
        "peer-bbbbbbbb": None,  # did not answer
        "peer-cccccccc": SimpleNamespace(active_sessions=0, kv_cache_bytes=0, rss_bytes=100),
    }  # d was not asked
    expirations = {"peer-aaaaaaaa": NOW + TTL - 3.0}  # announced 3 s ago
    return SwarmStatus.from_records(RECORDS, NUM_BLOCKS, "m", infos, expirations=expirations, ttl=TTL, now=NOW)


def test_from_records_counts_coverage_throughput_and_gaps(status):
    assert [node.record.node_id[-1] for node in status.nodes] == ["a", "b", "c", "d"]  # the offline e is left out
    assert status.coverage == [2] * 10 + [1] * 5 + [1] * 5 + [0] * 5 + [1] * 5
    assert status.block_throughput == [300.0] * 10 + [200.0] * 5 + [50.0] * 5 + [0.0] * 5 + [80.0] * 5
    assert status.gaps == [(20, 25)]
    assert status.min_coverage == 0


def test_from_records_takes_live_data_and_last_seen(status):
    a, b, c, d = status.nodes
    assert (a.reachable, a.active_sessions, a.kv_cache_bytes, a.rss_bytes) == (True, 2, 5_000_000, 300_000_000)
    assert a.last_seen == pytest.approx(3.0)
    assert (b.reachable, b.active_sessions, b.kv_cache_bytes, b.last_seen) == (False, None, None, None)
    assert c.reachable and c.active_sessions == 0
    assert not d.reachable


def test_to_json_is_serialisable_and_has_nodes_and_gaps(status):
    decoded = json.loads(json.dumps(status.to_json()))
    assert [node["short_id"] for node in decoded["nodes"]] == ["aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd"]
    assert decoded["nodes"][0]["active_sessions"] == 2 and decoded["nodes"][1]["reachable"] is False
    assert decoded["gaps"] == [[20, 25]]
    assert decoded["coverage"][0] == 2 and decoded["num_blocks"] == NUM_BLOCKS


def test_render_table_lists_nodes_coverage_and_gaps(status):
    table = render_table(status)
    for short_id, span in [("aaaaaaaa", "0:10"), ("bbbbbbbb", "0:15"), ("cccccccc", "15:20"), ("dddddddd", "25:30")]:
        row = next(line for line in table.splitlines() if line.startswith(short_id))
        assert span in row
    assert "eeeeeeee" not in table
    assert "GAP blocks 20:25 served by no node" in table
    assert "blocks 0:10  x2  (throughput 300 tok/s)" in table
    assert "blocks 10:15  x1  (throughput 200 tok/s)  bbbbbbbb  (no node answers)" in table  # b is unreachable
    assert "blocks 15:20  x1  (throughput 50 tok/s)  cccccccc\n" in table
    assert "3s ago" in table
    assert table.splitlines()[-1] == "4 nodes, 30 blocks, min coverage 0, gaps: 20:25, unreachable: 2"


def test_render_table_of_a_fully_covered_swarm_reports_no_gaps():
    full = SwarmStatus.from_records([record("a", 0, 30, 100.0)], NUM_BLOCKS, "m", {}, now=NOW)
    table = render_table(full)
    assert "GAP" not in table
    assert table.splitlines()[-1] == "1 nodes, 30 blocks, min coverage 1, gaps: none, unreachable: 1"


def test_plot_status_writes_a_png(status, tmp_path):
    path = tmp_path / "swarm.png"
    plot_status(status, str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fetch_node_infos_returns_none_for_a_closed_port():
    dead = record("a", 0, 10, 100.0, address=f"127.0.0.1:{free_port()}")
    assert fetch_node_infos([dead], timeout=2.0) == {dead.node_id: None}


def test_fetch_node_infos_waits_for_silent_nodes_concurrently():
    """Nodes that accept connections but never answer are all asked at once: they cost one timeout in all,
    not one each."""
    listeners, records = [], []
    for index in range(6):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # the kernel accepts connections; nobody answers on them
        listeners.append(listener)
        records.append(record(str(index), 0, 10, 100.0, address=f"127.0.0.1:{listener.getsockname()[1]}"))
    fetched = {}
    fetching = threading.Thread(target=lambda: fetched.update(fetch_node_infos(records, timeout=600)))
    fetching.start()
    try:
        # asked one after another, no second node would be asked before the first one's 600 s had passed
        wait_until(lambda: all(select.select([listener], [], [], 0)[0] for listener in listeners), "every node is asked at once")
    finally:
        for listener in listeners:
            listener.close()  # resets the connections: the queries end at once
        fetching.join(timeout=60)
    assert fetched == {r.node_id: None for r in records}


class FakeNode(pb_grpc.BlockServiceServicer):
    def NodeInfo(self, request, context):
        return pb.NodeInfoResponse(node_id="peer-aaaaaaaa", active_sessions=3, kv_cache_bytes=42, rss_bytes=7)


@pytest.fixture
def live_address():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_BlockServiceServicer_to_server(FakeNode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_fetch_node_infos_mixes_live_and_dead_nodes(live_address):
    live = record("a", 0, 10, 100.0, address=live_address)
    dead = record("b", 10, 20, 100.0, address=f"127.0.0.1:{free_port()}")
    infos = fetch_node_infos([live, dead], timeout=2.0)
    assert infos[dead.node_id] is None
    assert (infos[live.node_id].active_sessions, infos[live.node_id].kv_cache_bytes) == (3, 42)


def test_collect_status_reads_records_and_expirations_from_the_dht(live_address):
    identity = NodeIdentity.generate()
    live = replace(record("a", 0, 10, 100.0, address=live_address), node_id=identity.fingerprint)
    signed = RecordAuth(identity).seal(live.to_dict(), TTL)  # records are read only when signed by their node
    entries = {live.node_id: SimpleNamespace(value=signed, expiration_time=time.time() + TTL - 2.0)}

    class FakeDHT:
        def get(self, key, latest, return_future):
            assert key == servers_key("m") and latest and return_future
            answered = Future()
            answered.set_result(SimpleNamespace(value=entries))
            return answered

    status = collect_status(FakeDHT(), "m", NUM_BLOCKS, ttl=TTL)
    (node,) = status.nodes
    assert node.reachable and node.active_sessions == 3
    assert node.last_seen == pytest.approx(2.0, abs=1.0)
    assert status.gaps == [(10, 30)]
