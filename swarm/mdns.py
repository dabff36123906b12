"""Zero-configuration discovery on a LAN: nodes advertise their DHT addresses over mDNS (`zeroconf`).

Each node registers a `_edgeswarm._tcp.local.` service whose TXT record carries its swarm id and its
DHT multiaddrs (one per key, as a TXT entry holds at most 255 bytes). A node or client with no initial
peers browses for a few seconds, keeps the services of its own swarm id, and drops addresses that do
not accept a TCP connection (a host that vanished leaves its advertisement in caches for a while).
A running node keeps browsing and hands every new peer of its swarm to a callback: nodes that started
at the same moment, each bootstrapping a DHT of its own, are joined that way.

A node that listens on every interface (0.0.0.0) announces one address, `lan_address`: the source
address the kernel picks for the route towards its peers (see there).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence

import psutil
from zeroconf import (
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_edgeswarm._tcp.local."
DEFAULT_SWARM_ID = "edgeswarm"
_MAX_MADDRS = 8
MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353  # where mDNS queries and answers go (RFC 6762)
WILDCARD_HOST = "0.0.0.0"  # listen on every IPv4 interface
LOOPBACK_HOST = "127.0.0.1"
REGISTER_TIMEOUT = 10.0  # seconds probing the LAN for a node's service name may take (a loaded device)


def _tcp_endpoint(maddr: str) -> tuple[str, int] | None:
    """(ip, port) of an /ip4/IP/tcp/PORT/... multiaddr, or None for any other kind."""
    parts = maddr.split("/")
    try:
        return socket.inet_ntoa(socket.inet_aton(parts[parts.index("ip4") + 1])), int(parts[parts.index("tcp") + 1])
    except (ValueError, IndexError, OSError):
        return None


def route_source(destination: str) -> str | None:
    """The source address the kernel picks to reach the IPv4 address `destination`, or None without a route.

    Connecting a UDP socket only looks the route up: nothing is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((destination, MDNS_PORT))
        except OSError:  # no route to it (ENETUNREACH)
            return None
        return probe.getsockname()[0]


def lan_address(initial_peers: Sequence[str] = ()) -> str:
    """The address of this device that its peers can dial, for a node listening on every interface.

    In order: the source address of the route to the first initial peer that has one (the interface the
    swarm is actually reached through; a loopback peer gives loopback, which is right for a swarm on
    one machine); else of the route to the mDNS multicast group (the interface mDNS advertises on by
    default: a multicast route if the LAN has one, else the default route's); else the first
    non-loopback IPv4 address of any interface (a LAN without a gateway); else loopback.
    """
    destinations = [endpoint[0] for endpoint in map(_tcp_endpoint, initial_peers) if endpoint]
    for destination in [*destinations, MDNS_GROUP]:
        if (source := route_source(destination)) is not None:
            return source
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return LOOPBACK_HOST


def answers_tcp(maddr: str, timeout: float = 0.5) -> bool:
    """Whether the multiaddr's host accepts a TCP connection now."""
    endpoint = _tcp_endpoint(maddr)
    if endpoint is None:
        return False
    try:
        with socket.create_connection(endpoint, timeout=timeout):
            return True
    except OSError:
        return False


def _advertised_maddrs(zeroconf: Zeroconf, name: str, swarm_id: str) -> list[str]:
    """The multiaddrs a service advertises, if it belongs to `swarm_id` (else, or if it does not answer, [])."""
    info = zeroconf.get_service_info(SERVICE_TYPE, name, timeout=1000)
    if info is None:
        return []
    properties = {key.decode(): (value or b"").decode() for key, value in info.properties.items()}
    if properties.get("swarm") != swarm_id:
        return []
    return [value for key, value in sorted(properties.items()) if key.startswith("m") and key[1:].isdigit()]


class LanPresence:
    """Advertises one node's DHT multiaddrs on the LAN, and reports peers of its swarm that appear later.

    `on_peer(maddrs)` runs on a worker thread for each new live peer; `wait_joined` waits for the peers
    seen so far to have been handed to it. `close()` sends a goodbye.
    """

    def __init__(self, node_id: str, swarm_id: str, maddrs: Sequence[str], on_peer: Callable[[list[str]], None]):
        endpoints = [endpoint for endpoint in map(_tcp_endpoint, maddrs) if endpoint and not endpoint[0].startswith("127.")]
        if not endpoints:
            raise ValueError(f"no LAN address to advertise among {list(maddrs)}")
        properties = {"swarm": swarm_id, **{f"m{i}": maddr for i, maddr in enumerate(list(maddrs)[:_MAX_MADDRS])}}
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{node_id[-16:]}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip) for ip, _ in endpoints],
            port=endpoints[0][1],
            properties=properties,
            server=f"edgeswarm-{node_id[-16:]}.local.",
        )
        self.swarm_id, self.on_peer = swarm_id, on_peer
        self._own = set(maddrs)
        self._seen: set[str] = set()
        self._names: queue.Queue = queue.Queue()
        self._pending = 0  # services seen and not yet resolved and handed to on_peer
        self._handled = threading.Condition()
        self._zeroconf = Zeroconf(ip_version=IPVersion.V4Only)
        # Browse first, so that peers already on the LAN are found while this node probes for its name;
        # then wait for the probing only: from then on the node answers queries, and its announcements go
        # out in the background (waiting for them too adds half a second or more to a node's start-up).
        self._browser = ServiceBrowser(self._zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        threading.Thread(target=self._resolve_names, name="mdns-peers", daemon=True).start()
        registering = asyncio.run_coroutine_threadsafe(self._zeroconf.async_register_service(self.info), self._zeroconf.loop)
        registering.result(timeout=REGISTER_TIMEOUT)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added and name != self.info.name:
            with self._handled:
                self._pending += 1
            self._names.put(name)  # resolving blocks: not on zeroconf's own thread

    def _resolve_names(self) -> None:
        while (name := self._names.get()) is not None:
            try:
                maddrs = [m for m in _advertised_maddrs(self._zeroconf, name, self.swarm_id) if m not in self._own]
                new = [maddr for maddr in maddrs if maddr not in self._seen and answers_tcp(maddr)]
                if new:
                    self._seen.update(new)
                    self.on_peer(new)
            except Exception:
                logger.exception("handling the LAN peer %s failed", name)
            finally:
                with self._handled:
                    self._pending -= 1
                    self._handled.notify_all()

    def wait_joined(self, timeout: float) -> bool:
        """Waits until every peer seen so far has been handed to `on_peer` (or found dead or foreign);
        False if some still is not after `timeout` seconds."""
        with self._handled:
            return self._handled.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._names.put(None)
        self._browser.cancel()
        self._zeroconf.unregister_service(self.info)
        self._zeroconf.close()


def discover_peers(swarm_id: str = DEFAULT_SWARM_ID, timeout: float = 3.0, exclude: Sequence[str] = ()) -> list[str]:
    """DHT multiaddrs of live nodes of `swarm_id` advertised on the LAN, found within about `timeout` seconds."""
    names: set[str] = set()
    lock = threading.Lock()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            with lock:
                names.add(name)

    zeroconf = Zeroconf(ip_version=IPVersion.V4Only)
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[on_change])
        time.sleep(timeout)
        browser.cancel()
        with lock:
            found = sorted(names)
        maddrs = [maddr for name in found for maddr in _advertised_maddrs(zeroconf, name, swarm_id)]
    finally:
        zeroconf.close()
    live = [maddr for maddr in dict.fromkeys(maddrs) if maddr not in exclude and answers_tcp(maddr)]
    dropped = len(set(maddrs)) - len(live)
    if dropped:
        logger.info("dropped %d advertised addresses that did not answer", dropped)
    return live
