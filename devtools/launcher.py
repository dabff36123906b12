"""Starting `swarm-node join` processes on this machine and stopping them: for demos, tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devtools.lying_node import Lies
from edgeswarm.node.daemon import READY_PREFIX

ROOT = Path(__file__).resolve().parent.parent  # holds `devtools`, which a lying node's process imports
START_TIMEOUT = 120.0  # seconds a node may take to report ready (it loads its weights and joins the DHT first)


class NodeStartError(RuntimeError):
    """A node process exited, or did not report ready in time; the message carries its output."""


@dataclass
class NodeProcess:
    """A running node process and what it reported when it became ready."""

    process: subprocess.Popen
    info: dict
    output: list[str] = field(default_factory=list)

    @property
    def initial_peers(self) -> list[str]:
        return self.info["initial_peers"]

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def blocks(self) -> tuple[int, int]:
        return tuple(self.info["blocks"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        """Sends `sig` to the node and waits for it to exit; after `timeout`, or once it has exited, every
        process left in its group (its DHT process, p2pd) is killed. Returns the node's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group is gone already
        return self.process.wait()


def _pump(stream, lines: list[str], ready: threading.Event) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        if line.startswith(READY_PREFIX):
            ready.set()
    ready.set()  # the process ended: wake the waiter


def start_node(
    args: Sequence[str],
    initial_peers: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
    prefix: Sequence[str] = (),
    host: str = "127.0.0.1",
    mdns: bool = False,
    lies: Lies | None = None,
) -> NodeProcess:
    """Runs `swarm-node join ARGS --initial-peers ...` on `host` and waits until it reports ready.

    `prefix` goes before the command: a shell that first puts itself in a CPU-limited cgroup, or
    `ip netns exec HOST` for a testbed host. mDNS is off unless asked for, so that loopback swarms
    never join (or get joined by) a LAN swarm running on the same machine. The semantic codec is off
    unless `--semantic-basis` is among `args`, so that no node spends its first seconds fitting a basis.
    With `lies`, the node is a lying one (devtools.lying_node), for tests of spot checks and routing.
    """
    env = {**os.environ, **(env or {})}
    if lies is None:
        program = ["-m", "edgeswarm.node.cli"]
    else:
        program = ["-m", "devtools.lying_node", *lies.to_args()]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [*prefix, sys.executable, *program, "join", "--host", host, *args]
    if not mdns:
        command.append("--no-mdns")
    if "--semantic-basis" not in args:
        command += ["--semantic-basis", "off"]
    if initial_peers:
        command += ["--initial-peers", *initial_peers]
    stderr = open(log_file, "a") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a terminal's Ctrl-C reaches only the launcher
    )
    lines: list[str] = []
    ready = threading.Event()
    threading.Thread(target=_pump, args=(process.stdout, lines, ready), daemon=True).start()
    if not ready.wait(timeout=timeout):  # set by the ready line, or when the process ends
        process.kill()
        raise NodeStartError(f"node did not become ready within {timeout:.0f}s: {' '.join(command)}")
    ready_lines = [line for line in lines if line.startswith(READY_PREFIX)]
    if not ready_lines:
        process.wait(timeout=10)
        raise NodeStartError(f"node exited with code {process.returncode}: " + "\n".join(lines[-20:]))
    return NodeProcess(process, json.loads(ready_lines[0][len(READY_PREFIX) :]), lines)


class LocalSwarm:
    """Several nodes on loopback, started one after another so each sees the previous ones' spans."""

    def __init__(self, node_args: Sequence[Sequence[str]], timeout: float = START_TIMEOUT, log_dir: Path | None = None):
        self.node_args = [list(args) for args in node_args]
        self.timeout = timeout
        self.log_dir = log_dir
        self.nodes: list[NodeProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return self.nodes[0].initial_peers

    def add_node(self, args: Sequence[str], lies: Lies | None = None) -> NodeProcess:
        """Starts one more node, joined to the others (a lying one with `lies`); it stops with the swarm."""
        log_file = self.log_dir / f"node{len(self.nodes)}.log" if self.log_dir else None
        peers = self.initial_peers if self.nodes else ()
        node = start_node(args, peers, timeout=self.timeout, log_file=log_file, lies=lies)
        self.nodes.append(node)
        return node

    def __enter__(self) -> LocalSwarm:
        try:
            for args in self.node_args:
                self.add_node(args)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> list[int]:
        """Stops every node (SIGTERM, so each withdraws its announcement); returns their exit codes."""
        return [node.stop() for node in self.nodes]
