"""A TCP relay that adds one-way delay, for the testbed (scripts/testbed.sh), whose kernel has no netem.

It runs inside a testbed host, in front of a node that listens on 127.0.0.1 only: it listens on the
host's address at port P and forwards every connection to 127.0.0.1:P. Each chunk is delayed the way
netem on each host's eth0 would delay it: bytes from a client on host A towards the node by delay(A)
(the relay knows A from the connection's peer address), bytes from the node back by delay(this host),
so that a round trip gains delay(A) + delay(this host). A connection from this host itself is not
delayed (its traffic never leaves the host). Chunks keep their order and are timestamped: one read at t
is written at t + delay, so many are in flight at once and the delay does not cut throughput; reading
pauses while MAX_QUEUED_BYTES wait in one direction of one connection. Timers fire late (0.1-0.3 ms on
a VM, on each delayed chunk); the relay learns by how much and starts its waits that much earlier, so
chunks are written on time on average and never more than MAX_LEAD early.

Delays live in files DIRECTORY/<host address> holding milliseconds (`testbed.sh delay` writes them); a
missing file is no delay. They are re-read every REFRESH_SECONDS, so changes reach running connections.
A second, plain port (--plain-port, for the node's DHT) is forwarded the same way without delay.

    python -m devtools.delay_relay 10.213.0.3 --port 7000 --plain-port 7001
        relays 10.213.0.3:7000 (delayed) and :7001 (plain) to 127.0.0.1; prints {"port": .., "plain_port": ..}
    python devtools/delay_relay.py 10.213.0.3 --port 0 --plain-port 0 -- CMD ...
        binds both (0: a free port), then relays in a child process and runs CMD in this one, with
        every "{port}" and "{plain_port}" in CMD's arguments replaced by the bound ports; the relay
        dies with CMD (and with CMD's process group)

Only the standard library: it runs by path, from any working directory.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

DELAY_DIR = Path("/run/edgeswarm-testbed/delay")  # scripts/testbed.sh writes the same directory
REFRESH_SECONDS = 0.5  # a delay read from its file is used this long before the file is read again
CHUNK_BYTES = 64 * 1024  # most bytes read at once
MAX_QUEUED_BYTES = 4 * 1024 * 1024  # per direction of a connection: 1.6 Gbit/s at 20 ms delay
MAX_LEAD = 0.001  # seconds: the most a wait starts early to make up for late timers
LEAD_WEIGHT = 0.1  # weight of the latest lateness in the moving average of the timers' lateness
BACKLOG = 128
_PR_SET_PDEATHSIG = 1


class DelayTable:
    """One-way delays of hosts by address, in seconds, from the files DIRECTORY/<address>."""

    def __init__(self, directory: Path, refresh: float = REFRESH_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory)
        self._refresh = refresh
        self._clock = clock
        self._cache: dict[str, tuple[float, float]] = {}  # address -> (delay, when it was read)

    def delay(self, address: str) -> float:
        """Seconds that bytes sent by the host at `address` are held (0 without a readable file)."""
        now = self._clock()
        cached = self._cache.get(address)
        if cached is not None and now - cached[1] < self._refresh:
            return cached[0]
        try:
            delay = max(0.0, float((self.directory / address).read_text()) / 1000)
        except (OSError, ValueError):
            delay = 0.0
        self._cache[address] = (delay, now)
        return delay


async def _together(*steps: Awaitable[None]) -> None:
    """Runs `steps` until all have ended; the first to fail cancels the others, and its error is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [task.exception() for task in done if not task.cancelled() and task.exception() is not None]
        if errors:
            raise errors[0]
    finally:
        for task in tasks:
            task.cancel()


def _no_delay() -> float:
    return 0.0


class Clock:
    """Waits until a time of the event loop's clock, starting early by how late the loop's timers have
    fired lately (a moving average, at most MAX_LEAD)."""

    def __init__(self) -> None:
        self.lead = 0.0

    async def wait_until(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        target = when - self.lead
        wait = target - loop.time()
        if wait <= 0:
            return
        await asyncio.sleep(wait)
        late = min(MAX_LEAD, loop.time() - target)
        self.lead = max(0.0, self.lead + LEAD_WEIGHT * (late - self.lead))


class _DelayLine:
    """One direction of a relayed connection: each chunk read at t is written at t + delay(), in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Callable[[], float], clock: Clock) -> None:
        self._reader = reader
        self._writer = writer
        self._delay = delay
        self._clock = clock
        self._chunks: deque[tuple[float, bytes]] = deque()  # (when to write it, chunk); b"" is the end
        self._queued = 0
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        """Relays until the reader's end of stream has been passed on (as a half-close)."""
        await _together(self._read(), self._write())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._queued < MAX_QUEUED_BYTES)
            data = await self._reader.read(CHUNK_BYTES)
            due = loop.time() + self._delay()
            async with self._changed:
                self._chunks.append((due, data))
                self._queued += len(data)
                self._changed.notify_all()
            if not data:
                return

    async def _write(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._chunks)
                due, data = self._chunks.popleft()
                self._queued -= len(data)
                self._changed.notify_all()
            await self._clock.wait_until(due)
            if not data:
                self._writer.write_eof()
                return
            self._writer.write(data)
            await self._writer.drain()


class DelayRelay:
    """Forwards ports of `listen_host` to the same ports of `target_host`, delayed per DelayTable."""

    def __init__(self, listen_host: str, table: DelayTable, target_host: str = "127.0.0.1") -> None:
        self.listen_host = listen_host
        self.table = table
        self.target_host = target_host
        self.clock = Clock()

    async def serve(self, sock: socket.socket, delayed: bool) -> asyncio.Server:
        """Relays connections accepted on the bound, listening `sock` to the same port of the target."""
        port = sock.getsockname()[1]

        async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            await self._relay(client_reader, client_writer, port, delayed)

        return await asyncio.start_server(relay, sock=sock)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, port: int, delayed: bool) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, port)
        except OSError:
            client_writer.close()  # nothing listens there (yet): the client sees the connection end
            return
        writers = (client_writer, target_writer)
        peer = client_writer.get_extra_info("peername")[0]
        upstream: Callable[[], float] = _no_delay
        downstream: Callable[[], float] = _no_delay
        if delayed and peer != self.listen_host:
            upstream, downstream = partial(self.table.delay, peer), partial(self.table.delay, self.listen_host)
        try:
            await _together(
                _DelayLine(client_reader, target_writer, upstream, self.clock).run(),
                _DelayLine(target_reader, client_writer, downstream, self.clock).run(),
            )
        except OSError:
            for writer in writers:
                writer.transport.abort()  # one side failed: reset the other rather than leave it hanging
        finally:
            for writer in writers:
                writer.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port)."""
    return socket.create_server((host, port), backlog=BACKLOG)


async def _serve_forever(relay: DelayRelay, socks: Sequence[tuple[socket.socket, bool]]) -> None:
    servers = [await relay.serve(sock, delayed) for sock, delayed in socks]
    await asyncio.gather(*(server.serve_forever() for server in servers))


def run(relay: DelayRelay, socks: Sequence[tuple[socket.socket, bool]]) -> None:
    """Relays connections on `socks` ((listening socket, delayed?) pairs) until the process ends.

    The event loop waits in select(), whose timeout has microseconds, not in epoll, whose timeout is
    rounded up to the next millisecond (0.5 ms late per delayed chunk on average); select() handles
    file descriptors below 1024, enough for some 500 connections.
    """
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(_serve_forever(relay, socks))
    finally:
        loop.close()


def _die_with_parent(parent: int) -> None:
    """The kernel kills this process when its parent ends (even by SIGKILL); if it has ended already, exit."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def _substitute(command: Sequence[str], ports: dict[str, int]) -> list[str]:
    result = []
    for arg in command:
        for name, port in ports.items():
            arg = arg.replace("{" + name + "}", str(port))
        result.append(arg)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    options = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="delay_relay", description=__doc__.split("\n\n")[0], usage="%(prog)s LISTEN_HOST [options] [-- CMD ...]")
    parser.add_argument("listen_host", help="this host's address: the relay listens there; delays are looked up by address")
    parser.add_argument("--port", type=int, required=True, help="delayed port, forwarded to the same port of --target (0: a free one)")
    parser.add_argument("--plain-port", type=int, help="a port forwarded without delay, e.g. the node's DHT (0: a free one)")
    parser.add_argument("--target", default="127.0.0.1", help="where the node listens (default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=DELAY_DIR, help="directory of the delay files (default: %(default)s)")
    args = parser.parse_args(options)

    socks = [(bind(args.listen_host, args.port), True)]
    if args.plain_port is not None:
        socks.append((bind(args.listen_host, args.plain_port), False))
    ports = dict(zip(("port", "plain_port"), (sock.getsockname()[1] for sock, _ in socks)))
    relay = DelayRelay(args.listen_host, DelayTable(args.state_dir), args.target)
    if command:
        parent = os.getpid()
        if os.fork() == 0:
            _die_with_parent(parent)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1):  # keep CMD's output pipe to itself (stderr stays, for errors)
                os.dup2(devnull, fd)
            run(relay, socks)
            return
        for sock, _ in socks:
            sock.close()  # the child relays; CMD inherits none of them
        command = _substitute(command, ports)
        os.execvp(command[0], command)
    print(json.dumps(ports), flush=True)
    run(relay, socks)


if __name__ == "__main__":
    main()
