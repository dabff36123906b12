"""Python handle on the edge testbed of `scripts/testbed.sh`: N hosts as network namespaces on a bridge.

Host i (1-based) is the namespace ``es-host{i}`` with address ``10.213.0.{1+i}/24`` on its ``eth0``; the
bridge ``esbr0`` holds ``10.213.0.1``. Links may be capped in bandwidth (tc tbf, both directions) and
hosts given a one-way delay. netem is not available on these machines, so delays are applied by a relay
(devtools/delay_relay.py) in front of a node's gRPC port: nodes started with ``start_node(i, args)``
sit behind one, and a round trip from host A to such a node on host B gains delay(A) + delay(B). Their
DHT (libp2p) traffic and every other connection are not delayed.

    ok, reason = testbed_available()
    with Testbed(3, rate="20mbit", delay="10ms") as tb:
        node = tb.start_node(2, ["--model", "default", "--blocks", "0:30"])  # behind host 2's delay relay
        server = subprocess.Popen(tb.exec_args(3, ["python3", "-m", "http.server", "--bind", tb.host_ip(3)]))
        ...
        tb.set_delay(2, "40ms")  # reaches running connections within a second
        tb.cut(2)      # bridge-side link of host 2 down
        tb.restore(2)
        node.stop()
    # always torn down here, even if the body raised

The testbed uses fixed names, so only one can exist at a time on a machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devtools.launcher import NodeProcess

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "testbed.sh"
RELAY = Path(__file__).resolve().parent / "delay_relay.py"
BRIDGE = "esbr0"
NS_PREFIX = "es-host"
SUBNET = "10.213.0.0/24"
GATEWAY = "10.213.0.1"
MAX_HOSTS = 253

_PROBE_NS = f"es-probe{os.getpid()}"


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def testbed_available() -> tuple[bool, str]:
    """Whether a testbed can be created here: (True, "") or (False, why not).

    Checks root, iproute2 (`ip`, `tc`), bash and the script, and that a network namespace can actually be
    created and deleted (a throwaway ``es-probe<pid>``).
    """
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "testbed needs root (network namespaces, bridges, tc)"
    for tool in ("ip", "tc", "bash"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' not found on PATH"
    if not SCRIPT.is_file():
        return False, f"{SCRIPT} is missing"
    try:
        added = _run(["ip", "netns", "add", _PROBE_NS], timeout=10)
        if added.returncode != 0:
            return False, f"'ip netns add' failed: {added.stderr.strip() or added.returncode}"
        probe = _run(["ip", "netns", "exec", _PROBE_NS, "ip", "link", "set", "lo", "up"], timeout=10)
        if probe.returncode != 0:
            return False, f"'ip netns exec' failed: {probe.stderr.strip() or probe.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"network namespaces unavailable: {exc}"
    finally:
        try:
            _run(["ip", "netns", "del", _PROBE_NS], timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return True, ""


class TestbedError(RuntimeError):
    """A testbed.sh command failed; the message carries its output."""

    __test__ = False  # not a pytest test class


class Testbed:
    """Context manager over ``testbed.sh``: ``up`` on enter, ``down`` on exit (always, even on errors).

    Host indices are 1-based. ``rate`` caps and ``delay`` (one way, e.g. "20ms") delays every host. With
    ``force=True`` an existing testbed (say, left by a killed run) is torn down by ``up``; without it
    ``up`` fails when one exists.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, n: int, rate: str | None = None, *, delay: str | None = None, force: bool = False, script: Path = SCRIPT
    ) -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"n must be 1..{MAX_HOSTS}, got {n}")
        self.n = n
        self.rate = rate
        self.delay = delay
        self.force = force
        self.script = Path(script)
        self.summary = ""

    # --- lifecycle --------------------------------------------------------------------------------

    def _script(self, *args: str, timeout: float = 120.0) -> str:
        proc = _run(["bash", str(self.script), *args], timeout=timeout)
        if proc.returncode != 0:
            raise TestbedError(f"testbed.sh {' '.join(args)} failed ({proc.returncode}): {(proc.stderr + proc.stdout).strip()}")
        return proc.stdout

    def up(self) -> None:
        """Create the testbed (the script removes a half-built one itself if this fails)."""
        args = ["up", str(self.n)]
        if self.rate is not None:
            args += ["--rate", self.rate]
        if self.delay is not None:
            args += ["--delay", self.delay]
        if self.force:
            args.append("--force")
        self.summary = self._script(*args)

    def down(self) -> None:
        """Remove the testbed; also kills processes still running inside its namespaces."""
        self._script("down")

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.down()
        except TestbedError:
            if exc_type is None:
                raise  # otherwise keep the body's exception

    # --- hosts ------------------------------------------------------------------------------------

    def _check(self, i: int) -> int:
        if not 1 <= i <= self.n:
            raise ValueError(f"host index must be 1..{self.n}, got {i}")
        return i

    @staticmethod
    def namespace(i: int) -> str:
        """Namespace name of host i."""
        return f"{NS_PREFIX}{i}"

    def host_ip(self, i: int) -> str:
        """IPv4 address of host i (on its eth0)."""
        return f"10.213.0.{1 + self._check(i)}"

    def hosts(self) -> list[int]:
        """Host indices 1..n."""
        return list(range(1, self.n + 1))

    def exec_args(self, i: int, argv: list[str]) -> list[str]:
        """argv that runs ``argv`` inside host i: ``ip netns exec es-host{i} ...``."""
        return ["ip", "netns", "exec", self.namespace(self._check(i)), *argv]

    def run(self, i: int, argv: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run argv in host i to completion (text output captured; not checked)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.exec_args(i, argv), timeout=timeout, check=False, **kwargs)

    def popen(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv in host i in the background."""
        return subprocess.Popen(self.exec_args(i, argv), **kwargs)

    def start_node(
        self, i: int, args: Sequence[str], initial_peers: Sequence[str] = (), *, delayed: bool = True, **options: Any
    ) -> NodeProcess:
        """A `swarm-node join ARGS` process in host i, ready (devtools.launcher.start_node, `options` go there).

        Delayed (the default), the node listens on 127.0.0.1 in its host behind a delay relay on the host's
        address, which forwards its gRPC port with the testbed's delays and its DHT port without; it announces
        the relay's ports, and the relay dies with it. Such a node has no LAN to advertise on over mDNS: give
        it `initial_peers`. Not delayed, it listens on the host's address itself.
        """
        from devtools.launcher import start_node  # loads the node daemon's imports: only where nodes start

        ip = self.host_ip(i)
        if not delayed:
            return start_node(args, initial_peers, prefix=self.exec_args(i, []), host=ip, **options)
        relay = [sys.executable, str(RELAY), ip, "--port", "0", "--plain-port", "0", "--"]  # ports fill {port}, {plain_port}
        relayed = ["--port", "{port}", "--dht-port", "{plain_port}", "--announce-host", ip, "--announce-maddrs", f"/ip4/{ip}/tcp/{{plain_port}}"]
        return start_node([*args, *relayed], initial_peers, prefix=self.exec_args(i, relay), host="127.0.0.1", **options)

    # --- links ------------------------------------------------------------------------------------

    def cut(self, i: int) -> None:
        """Take host i's link down (its bridge-side veth)."""
        self._script("cut", str(self._check(i)))

    def restore(self, i: int) -> None:
        """Bring host i's link back up."""
        self._script("restore", str(self._check(i)))

    def set_rate(self, i: int, rate: str | None) -> None:
        """Cap host i at rate (tc syntax, e.g. "5mbit") in both directions; None removes the cap."""
        self._script("rate", str(self._check(i)), rate if rate is not None else "none")

    def set_delay(self, i: int, delay: str | None) -> None:
        """Delay what host i sends by `delay` (e.g. "20ms", one way) through delay relays; None removes it."""
        self._script("delay", str(self._check(i)), delay if delay is not None else "none")

    def status(self) -> str:
        """The script's status table."""
        return self._script("status")
