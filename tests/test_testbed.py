"""The network-namespace edge testbed (scripts/testbed.sh, devtools/testbed.py); delays: test_testbed_latency.py.

Needs root and working network namespaces; skipped otherwise. All traffic stays on the testbed's own
subnet 10.213.0.0/24 (and loopback). Tests must run one at a time: the testbed has fixed names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from devtools.testbed import BRIDGE, SCRIPT, Testbed, TestbedError
from devtools.testbed import testbed_available as _testbed_available
from tests.support import wait_until

PY = sys.executable

# TCP echo server: listens on ADDR:PORT, prints "ready", echoes every connection until DEADLINE s pass.
ECHO_SERVER = r"""
import socket, sys, time
addr, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen(16)
print("ready", flush=True)
while time.monotonic() < deadline:
    srv.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        conn, _ = srv.accept()
    except OSError:
        continue
    with conn:
        conn.settimeout(2)
        try:
            conn.sendall(conn.recv(1024))
        except OSError:
            pass
"""

# TCP probe: connects to ADDR:PORT within TIMEOUT s, sends a token and expects it echoed; exit 0 if so.
PROBE = r"""
import socket, sys
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
token = ("hello from " + socket.gethostname()).encode()
try:
    with socket.create_connection((addr, port), timeout=timeout) as c:
        c.sendall(token)
        got = c.recv(1024)
except OSError as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
sys.exit(0 if got == token else 2)
"""

# Sink: accepts one connection, reads to EOF, answers "ok" (timeout: DEADLINE s).
SINK = r"""
import socket, sys
addr, port, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen(1)
srv.settimeout(deadline)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(deadline)
n = 0
while True:
    b = conn.recv(1 << 16)
    if not b:
        break
    n += len(b)
conn.sendall(b"ok")
print(n, flush=True)
"""

# Source: sends NBYTES to ADDR:PORT, waits for "ok", prints {"seconds", "mbit_s"}.
SOURCE = r"""
import json, socket, sys, time
addr, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = b"\x5a" * nbytes
c = socket.create_connection((addr, port), timeout=timeout)
t0 = time.monotonic()
c.sendall(data)
c.shutdown(socket.SHUT_WR)
assert c.recv(16) == b"ok"
dt = time.monotonic() - t0
print(json.dumps({"seconds": dt, "mbit_s": nbytes * 8 / dt / 1e6}))
"""

# Multicast receiver: joins GROUP on PORT, prints the first datagram's payload and sender as JSON.
MCAST_RECV = r"""
import json, socket, struct, sys
group, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0")))
s.settimeout(timeout)
print("ready", flush=True)
data, sender = s.recvfrom(2048)
print(json.dumps({"data": data.decode(), "sender": sender[0]}), flush=True)
"""

# Multicast sender: sends PAYLOAD to GROUP:PORT every 0.2 s, COUNT times (TTL 255, like mDNS).
MCAST_SEND = r"""
import socket, sys, time
group, port, payload, count = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
for _ in range(count):
    s.sendto(payload, (group, port))
    time.sleep(0.2)
"""


# --- helpers ----------------------------------------------------------------------------------------


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False)


def _leftovers() -> list[str]:
    """Testbed objects present now: es-host* namespaces, es-veth* links, the bridge."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split("\n")
    found = [line.split()[0] for line in names if line.startswith("es-host")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    for line in links.splitlines():
        name = line.split(": ")[1].split("@")[0]
        if name == BRIDGE or name.startswith("es-veth"):
            found.append(name)
    return found


def _start(tb: Testbed, i: int, code: str, *args: object) -> subprocess.Popen[str]:
    """Start a Python snippet in host i and wait for its "ready" line."""
    proc = tb.popen(i, [PY, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"snippet in host {i} did not start: {line!r} {err}")
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=5)


def _probe(tb: Testbed, src: int, dst_ip: str, port: int, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
    return tb.run(src, [PY, "-c", PROBE, dst_ip, str(port), str(timeout)], timeout=timeout + 10)


def _transfer(tb: Testbed, src: int, dst: int, nbytes: int, port: int) -> float:
    """Send nbytes over TCP from host src to host dst; the measured rate in Mbit/s."""
    sink = _start(tb, dst, SINK, tb.host_ip(dst), port, 20)
    try:
        out = tb.run(src, [PY, "-c", SOURCE, tb.host_ip(dst), str(port), str(nbytes), "20"], timeout=25)
        assert out.returncode == 0, out.stderr
        received, _ = sink.communicate(timeout=10)
        assert int(received.split()[-1]) == nbytes
        return float(json.loads(out.stdout)["mbit_s"])
    finally:
        _stop(sink)


@pytest.fixture
def testbed_ok():
    """Skip without root / namespaces; refuse to run over a testbed that is already up."""
    ok, reason = _testbed_available()
    if not ok:
        pytest.skip(f"testbed unavailable: {reason}")
    leftovers = _leftovers()
    if leftovers:
        pytest.fail(f"a testbed already exists ({', '.join(leftovers)}); run 'bash scripts/testbed.sh down'")
    yield
    assert _leftovers() == [], "the test left testbed objects behind"


# --- tests ------------------------------------------------------------------------------------------


def test_help_documents_commands_and_no_netem():
    out = _script("--help")
    assert out.returncode == 0
    for word in ("up N", "--rate", "--delay", "down", "exec HOST", "status", "cut HOST", "restore HOST", "rate HOST RATE", "delay HOST DELAY"):
        assert word in out.stdout
    assert "netem delay is NOT available" in out.stdout
    assert _script("help").stdout == out.stdout
    assert _script("frobnicate").returncode != 0


def test_up_three_hosts_addresses_and_reachability(testbed_ok):
    with Testbed(3) as tb:
        assert "10.213.0.4/24" in tb.summary
        for i in tb.hosts():
            addr = tb.run(i, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
            assert f"inet 10.213.0.{1 + i}/24" in addr
            assert tb.host_ip(i) == f"10.213.0.{1 + i}"
            route = tb.run(i, ["ip", "route", "show", "default"]).stdout
            assert "via 10.213.0.1 dev eth0" in route
            assert "UP" in tb.run(i, ["ip", "-o", "link", "show", "dev", "lo"]).stdout

        # The script's exec accepts 2, host2 and es-host2.
        for form in ("2", "host2", "es-host2"):
            out = _script("exec", form, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
            assert out.returncode == 0 and "10.213.0.3/24" in out.stdout, out.stderr
        assert _script("exec", "9", "true").returncode != 0  # no such host

        status = tb.status()
        for i in tb.hosts():
            assert f"es-host{i}" in status and f"10.213.0.{1 + i}/24" in status

        servers = {i: _start(tb, i, ECHO_SERVER, tb.host_ip(i), 5601, 120) for i in tb.hosts()}  # stopped below
        try:
            for src in tb.hosts():
                for dst in tb.hosts():
                    if src != dst:
                        out = _probe(tb, src, tb.host_ip(dst), 5601)
                        assert out.returncode == 0, f"host{src} -> host{dst}: {out.stdout} {out.stderr}"
            # Hosts are isolated from each other's loopback: host1 has nothing on 5601 at 127.0.0.1.
            assert _probe(tb, 1, "127.0.0.1", 5601, timeout=1).returncode != 0
        finally:
            for proc in servers.values():
                _stop(proc)


def test_multicast_between_hosts(testbed_ok):
    """An mDNS-style datagram to 224.0.0.251 (port 5454, not 5353) from host1 reaches hosts 2 and 3."""
    with Testbed(3) as tb:
        receivers = [_start(tb, i, MCAST_RECV, "224.0.0.251", 5454, 60) for i in (2, 3)]  # each ends at its datagram
        try:
            sender = tb.run(1, [PY, "-c", MCAST_SEND, "224.0.0.251", "5454", "edgeswarm-mdns-test", "10"], timeout=15)
            assert sender.returncode == 0, sender.stderr
            for proc in receivers:
                out, err = proc.communicate(timeout=10)
                assert proc.returncode == 0, err
                got = json.loads(out)
                assert got == {"data": "edgeswarm-mdns-test", "sender": "10.213.0.2"}
        finally:
            for proc in receivers:
                _stop(proc)


def test_rate_caps_throughput_both_directions(testbed_ok):
    cap = 5.0  # Mbit/s
    with Testbed(2, rate="5mbit") as tb:
        status = tb.status()
        assert status.count("tbf rate 5Mbit") == 4  # two hosts x (upload, download)

        capped = _transfer(tb, 1, 2, 2 * 1024 * 1024, 5611)
        assert 0.5 * cap <= capped <= 1.5 * cap, capped

        tb.set_rate(1, None)
        tb.set_rate(2, None)
        assert "tbf" not in tb.status()
        uncapped = _transfer(tb, 1, 2, 2 * 1024 * 1024, 5612)
        assert uncapped > 5 * capped, (uncapped, capped)

        # Only host2 capped: its download (bridge-side veth) and its upload (eth0) are both limited.
        tb.set_rate(2, "5mbit")
        download = _transfer(tb, 1, 2, 1024 * 1024, 5613)
        upload = _transfer(tb, 2, 1, 1024 * 1024, 5614)
        assert 0.5 * cap <= download <= 1.5 * cap, download
        assert 0.5 * cap <= upload <= 1.5 * cap, upload


def test_cut_makes_host_unreachable_and_restore_brings_it_back(testbed_ok):
    with Testbed(2) as tb:
        server = _start(tb, 2, ECHO_SERVER, tb.host_ip(2), 5621, 120)  # stopped below
        try:
            assert _probe(tb, 1, tb.host_ip(2), 5621).returncode == 0

            tb.cut(2)
            assert "CUT" in tb.status()
            out = _probe(tb, 1, tb.host_ip(2), 5621, timeout=1.5)
            assert out.returncode != 0, "host2 still reachable after cut"

            tb.restore(2)
            wait_until(lambda: _probe(tb, 1, tb.host_ip(2), 5621, timeout=1.0).returncode == 0, "host2 is reachable after restore", timeout=30)
            assert "CUT" not in tb.status()
        finally:
            _stop(server)


def test_up_refuses_an_existing_testbed_unless_forced(testbed_ok):
    with Testbed(1) as tb:
        with pytest.raises(TestbedError, match="already exists"):
            Testbed(2).up()
        assert _leftovers().count(BRIDGE) == 1 and "es-host2" not in _leftovers()  # untouched

        forced = _script("up", "2", "--force")
        assert forced.returncode == 0, forced.stderr
        assert {"es-host1", "es-host2"} <= set(_leftovers())
        addr = _script("exec", "2", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert addr.count("10.213.0.3/24") == 1
        assert tb.host_ip(1) == "10.213.0.2"

    bad = _script("up", "2", "--rate", "fast")
    assert bad.returncode != 0 and "bad rate" in bad.stderr
    assert _leftovers() == []


def test_down_removes_everything_even_when_the_body_raises(testbed_ok):
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed(3, rate="20mbit") as tb:
            sleeper = tb.popen(1, ["sleep", "60"])
            assert len(_leftovers()) == 3 + 3 + 1  # namespaces, veths, bridge
            raise RuntimeError("boom")
    assert _leftovers() == []
    assert sleeper.wait(timeout=5) is not None  # processes left in a namespace are terminated
    # down when nothing exists succeeds; status says so
    again = _script("down")
    assert again.returncode == 0, again.stderr
    assert "no testbed" in _script("status").stdout


def test_failed_up_removes_what_it_created(testbed_ok, tmp_path):
    """If a step of 'up' fails (here: a 'tc' that always fails), the half-built testbed is removed."""
    fake = tmp_path / "tc"
    fake.write_text("#!/bin/sh\necho fake tc failure >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", str(SCRIPT), "up", "2", "--rate", "5mbit"], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode != 0
    assert "fake tc failure" in out.stderr and "removing what was created" in out.stderr
    assert _leftovers() == []
