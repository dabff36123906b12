"""Latency on the testbed: the delay relay (devtools/delay_relay.py) and `testbed.sh delay`.

The relay's own tests run on loopback anywhere (a "host" is a loopback address: clients connect from
127.0.0.2 to a relay on 127.0.0.3); timings are checked from below, where a relay can never do better
than its delays (less MAX_LEAD, the most it starts a wait early for late timers), and with generous
bounds above. The testbed tests need root and network namespaces (skipped otherwise) and refuse to run
over a testbed that exists already (tests/test_testbed.py's `testbed_ok`); each tears down what it made.
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.delay_relay import CHUNK_BYTES, MAX_LEAD, MAX_QUEUED_BYTES, DelayTable
from devtools.testbed import RELAY, Testbed
from tests.support import wait_until
from tests.test_testbed import _script, testbed_ok  # noqa: F401  (a fixture, used by name)

ROOT = Path(__file__).resolve().parent.parent  # the working directory of programs run in a host, for `tests.support`
CLIENT_HOST, RELAY_HOST, TARGET_HOST = "127.0.0.2", "127.0.0.3", "127.0.0.1"
TIMEOUT = 30.0  # seconds any one exchange may take, however loaded the machine
PINGS = 21  # echoes per median
PING_GAP = 0.05  # seconds between two echoes, delayed or not: each starts from the same idle machine
ROUNDS = 3  # undelayed and delayed measurements alternate this many times, so load hits both alike
TOLERANCE_MS = 2.0  # how far a median round trip may be from the undelayed one plus the delays added


# --- the relay on loopback ---------------------------------------------------------------------------


class EchoServer:
    """Echoes every connection on TARGET_HOST, noting when each chunk arrived; or, with `reads=False`,
    accepts connections and never reads them."""

    def __init__(self, reads: bool = True) -> None:
        self.sock = socket.create_server((TARGET_HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.reads = reads
        self.arrivals: list[float] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            if self.reads:
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()
            else:
                self.held.append(conn)

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                self.arrivals.append(time.monotonic())
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def set_delay(state_dir: Path, host: str, ms: float | None) -> None:
    """What `testbed.sh delay` does: the host's file holds its one-way delay in ms (none: no file)."""
    path = state_dir / host
    if ms is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(f"{ms}\n")


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[EchoServer, Path]]:
    """An echo server on TARGET_HOST behind a relay on RELAY_HOST (same port), delays in a fresh directory."""
    server = EchoServer()
    process = subprocess.Popen(
        [sys.executable, str(RELAY), RELAY_HOST, "--port", str(server.port), "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert json.loads(process.stdout.readline()) == {"port": server.port}
        yield server, tmp_path
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT)
        server.close()


def connect(port: int, source: str = CLIENT_HOST) -> socket.socket:
    """A connection from `source` to the relay."""
    conn = socket.create_connection((RELAY_HOST, port), timeout=TIMEOUT, source_address=(source, 0))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def round_trip(conn: socket.socket) -> float:
    began = time.monotonic()
    conn.sendall(b"x")
    assert conn.recv(16) == b"x"
    return time.monotonic() - began


def test_each_direction_is_delayed_by_its_senders_delay(relay):
    server, state = relay
    set_delay(state, CLIENT_HOST, 30)
    set_delay(state, RELAY_HOST, 20)
    with connect(server.port) as conn:
        for _ in range(3):
            server.arrivals.clear()
            sent = time.monotonic()
            conn.sendall(b"x")
            assert conn.recv(16) == b"x"
            received = time.monotonic()
            [arrived] = server.arrivals
            assert arrived - sent >= 0.030 - MAX_LEAD  # towards the node: the client's host's delay
            assert received - arrived >= 0.020 - MAX_LEAD  # back: the relay's host's delay
            assert received - sent < TIMEOUT


def test_a_bulk_transfer_arrives_intact_and_many_chunks_are_in_flight(relay):
    server, state = relay
    delay = 0.2  # seconds, each way
    set_delay(state, CLIENT_HOST, delay * 1000)
    set_delay(state, RELAY_HOST, delay * 1000)
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB, every chunk different from its neighbours
    received = bytearray()
    with connect(server.port) as conn:
        began = time.monotonic()
        sender = threading.Thread(target=lambda: (conn.sendall(data), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        while chunk := conn.recv(1 << 20):
            received += chunk
        elapsed = time.monotonic() - began
        sender.join(TIMEOUT)
    assert received == data  # in order, nothing lost or doubled; and the half-close went through both ways
    assert elapsed >= 2 * (delay - MAX_LEAD)
    # one chunk at a time would take at least (chunks) x (round trip); timestamped, they overlap
    assert elapsed < len(data) / CHUNK_BYTES * 2 * delay / 4


def test_reading_stops_while_too_many_bytes_wait(relay):
    server, state = relay
    server.reads = False  # the node stops reading: queued bytes pile up in the relay, up to its bound
    set_delay(state, CLIENT_HOST, 50)
    kernel = sum(int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2]) for name in ("tcp_rmem", "tcp_wmem"))
    # the relay's queue, plus what the kernel buffers at both of its sockets and at both ends (and asyncio's)
    bound = MAX_QUEUED_BYTES + 2 * kernel + 4 * CHUNK_BYTES
    pushed = 0
    with connect(server.port) as conn:
        conn.setblocking(False)
        block = bytes(CHUNK_BYTES)
        while pushed < 4 * bound:
            _, writable, _ = select.select([], [conn], [], 2.0)
            if not writable:
                break  # stalled: backpressure reached the client
            try:
                pushed += conn.send(block)
            except BlockingIOError:
                continue
    assert pushed < bound


def test_a_new_delay_reaches_a_running_connection(relay):
    server, state = relay
    slow = 0.3  # seconds
    with connect(server.port) as conn:
        assert round_trip(conn) < TIMEOUT
        set_delay(state, RELAY_HOST, slow * 1000)
        wait_until(lambda: round_trip(conn) >= slow - MAX_LEAD, "the relay applies the new delay", timeout=TIMEOUT)
        set_delay(state, RELAY_HOST, None)
        wait_until(lambda: round_trip(conn) < slow, "the relay drops the delay", timeout=TIMEOUT)


def test_a_connection_from_the_relays_own_host_is_not_delayed(relay):
    server, state = relay
    set_delay(state, RELAY_HOST, 2 * TIMEOUT * 1000)  # were it applied, the exchange would time out
    with connect(server.port, source=RELAY_HOST) as conn:
        assert round_trip(conn) < TIMEOUT


def test_a_connection_ends_when_nothing_listens_behind_the_relay(tmp_path):
    with socket.create_server((TARGET_HOST, 0)) as unused:
        port = unused.getsockname()[1]  # free again once closed
    process = subprocess.Popen([sys.executable, str(RELAY), RELAY_HOST, "--port", str(port), "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(process.stdout.readline()) == {"port": port}
        with connect(port) as conn:
            assert conn.recv(16) == b""
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT)


def test_delays_are_read_from_their_files_and_cached_briefly(tmp_path):
    now = [0.0]
    table = DelayTable(tmp_path, refresh=1.0, clock=lambda: now[0])
    assert table.delay("10.213.0.2") == 0.0  # no file: no delay
    (tmp_path / "10.213.0.2").write_text("20\n")
    now[0] = 1.0
    assert table.delay("10.213.0.2") == pytest.approx(0.020)
    (tmp_path / "10.213.0.2").write_text("2.5")
    now[0] = 1.5
    assert table.delay("10.213.0.2") == pytest.approx(0.020)  # read less than `refresh` ago
    now[0] = 2.0
    assert table.delay("10.213.0.2") == pytest.approx(0.0025)
    (tmp_path / "10.213.0.2").write_text("soon")
    now[0] = 3.0
    assert table.delay("10.213.0.2") == 0.0  # unreadable: no delay


# --- on the testbed ----------------------------------------------------------------------------------


def _delay_column(status: str, host: int) -> str:
    """The DELAY column of a host's row in `testbed.sh status`."""
    [row] = [line.split() for line in status.splitlines() if line.startswith(f"host{host} ")]
    return row[4]


@pytest.mark.usefixtures("testbed_ok")
def test_delay_command_sets_shows_and_removes_delays():
    state = Path("/run/edgeswarm-testbed/delay")
    with Testbed(2, delay="15ms") as tb:
        assert "15ms" in tb.summary
        status = tb.status()
        assert [_delay_column(status, i) for i in tb.hosts()] == ["15ms", "15ms"]
        assert (state / tb.host_ip(2)).read_text().strip() == "15"

        tb.set_delay(1, "2.5ms")
        tb.set_delay(2, "0.1s")
        assert [_delay_column(tb.status(), i) for i in tb.hosts()] == ["2.5ms", "100ms"]
        tb.set_delay(1, "0ms")
        tb.set_delay(2, None)
        assert [_delay_column(tb.status(), i) for i in tb.hosts()] == ["-", "-"]
        assert not (state / tb.host_ip(1)).exists()

        for bad in ("fast", "20", "-5ms", "20000ms"):
            out = _script("delay", "1", bad)
            assert out.returncode != 0 and "bad delay" in out.stderr, bad
        assert _script("delay", "3", "10ms").returncode != 0  # no such host
    assert not state.exists()  # `down` removes the delays with the testbed

    bad = _script("up", "2", "--delay", "soon")
    assert bad.returncode != 0 and "bad delay" in bad.stderr


# Runs inside a testbed host (from ROOT): joins the swarm as a client, then for every number N read on
# stdin prints the median of N Echo round trips to the node, in ms, one every GAP seconds.
PINGER = """
import json, statistics, sys, time
import grpc
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.channels import open_channel
from tests.support import swarm_member, wait_until
peers, address, node_id, timeout, gap = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
with swarm_member(peers), open_channel(address, node_id) as channel:
    echo = pb_grpc.BlockServiceStub(channel).Echo
    def answers():
        try:
            return echo(pb.EchoRequest(), timeout=timeout) is not None
        except grpc.RpcError:
            return False  # the node does not know this client as a member yet
    wait_until(answers, "the node answers", timeout=timeout)
    print("ready", flush=True)
    for line in sys.stdin:
        rtts = []
        for _ in range(int(line)):
            time.sleep(gap)
            began = time.perf_counter()
            echo(pb.EchoRequest(), timeout=timeout)
            rtts.append(time.perf_counter() - began)
        print(statistics.median(rtts) * 1000, flush=True)
"""


@pytest.mark.slow
@pytest.mark.usefixtures("testbed_ok")
def test_an_echo_round_trip_gains_the_delays_of_both_hosts(tiny_llama_dir, tmp_path):
    """A client on host 1 echoes through the gRPC data plane of a node on host 2: with host delays of
    10 and 20 ms the median round trip is 30 ms longer than undelayed; a change reaches the open connection."""
    with Testbed(2) as tb:
        node = tb.start_node(2, ["--model", str(tiny_llama_dir), "--blocks", "0:6"], timeout=180)
        try:
            assert node.address.startswith(f"{tb.host_ip(2)}:")  # the relay's address, not 127.0.0.1
            argv = [sys.executable, "-c", PINGER, json.dumps(node.initial_peers), node.address, node.info["node_id"], str(TIMEOUT), str(PING_GAP)]
            with open(tmp_path / "pinger.log", "w") as log:
                pinger = tb.popen(1, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
            try:

                def ping() -> float:
                    pinger.stdin.write(f"{PINGS}\n")
                    pinger.stdin.flush()
                    line = pinger.stdout.readline()
                    assert line, (tmp_path / "pinger.log").read_text()[-3000:]
                    return float(line)

                assert pinger.stdout.readline().strip() == "ready", (tmp_path / "pinger.log").read_text()[-3000:]
                first = ping()
                undelayed, delayed = [first], []
                for _ in range(ROUNDS):
                    tb.set_delay(1, "10ms")
                    tb.set_delay(2, "20ms")
                    wait_until(lambda: ping() > first + 20, "the relay reads the new delays", timeout=TIMEOUT)
                    delayed.append(ping())
                    tb.set_delay(1, None)
                    tb.set_delay(2, None)
                    wait_until(lambda: ping() < first + 10, "the relay drops the delays", timeout=TIMEOUT)
                    undelayed.append(ping())
                base, added = statistics.median(undelayed), statistics.median(delayed)
                assert abs(added - base - 30) <= TOLERANCE_MS, (undelayed, delayed)

                tb.set_delay(1, "10ms")
                tb.set_delay(2, "40ms")  # on the running relay, the open connection

                def near(expected: float) -> float | None:
                    rtt = ping()
                    return rtt if abs(rtt - expected) <= TOLERANCE_MS else None

                changed = wait_until(lambda: near(base + 50), "the relay applies the changed delay", timeout=TIMEOUT)
                print(f"median Echo round trip host1 -> host2: undelayed {base:.2f} ms, 10 + 20 ms {added:.2f} ms, 10 + 40 ms {changed:.2f} ms")
            finally:
                pinger.kill()
                pinger.wait(timeout=TIMEOUT)
        finally:
            node.stop()
