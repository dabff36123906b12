"""Where a node listens and which address it announces: loopback with --no-mdns; with mDNS (the default)
every interface, announcing the address of the interface that reaches its peers, in its record and in
the DHT multiaddrs it hands out, never 127.0.0.1 or 0.0.0.0 to LAN peers. Routes are faked where the
choice depends on them; the kernel's own lookup and a real DHT peer are used where it does not."""

import socket
from collections import namedtuple

import pytest

from edgeswarm.node.config import NetworkConfig
from edgeswarm.node.daemon import reachable_host
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm import mdns
from edgeswarm.swarm.mdns import MDNS_GROUP, lan_address, route_source

PEER = "/ip4/10.0.0.5/tcp/4000/p2p/12D3KooWCNNaFmPVdm3z1HQ5GfUo7QN21nXsHSr9nqna6cdsi1hq"
OTHER_PEER = "/ip4/10.0.1.6/tcp/4000/p2p/12D3KooWCNNaFmPVdm3z1HQ5GfUo7QN21nXsHSr9nqna6cdsi1hq"
Address = namedtuple("Address", "family address")


@pytest.fixture
def routes(monkeypatch):
    """Fakes the kernel's routing table: `routes({destination: source})`; other destinations have no route."""

    def install(table: dict[str, str]) -> None:
        monkeypatch.setattr(mdns, "route_source", table.get)

    return install


@pytest.fixture
def interfaces(monkeypatch):
    """Fakes this device's interfaces: `interfaces({name: [ipv4 addresses]})`."""

    def install(table: dict[str, list[str]]) -> None:
        addresses = {name: [Address(socket.AF_INET6, "fe80::1")] + [Address(socket.AF_INET, ip) for ip in ips] for name, ips in table.items()}
        monkeypatch.setattr(mdns.psutil, "net_if_addrs", lambda: addresses)

    return install


def test_a_node_listens_everywhere_with_mdns_and_on_loopback_without():
    assert NetworkConfig().listen_host == "0.0.0.0"
    assert NetworkConfig(mdns=False).listen_host == "127.0.0.1"
    assert NetworkConfig(host="10.1.2.3").listen_host == "10.1.2.3"
    assert NetworkConfig(host="0.0.0.0", mdns=False).listen_host == "0.0.0.0"


def test_the_route_to_the_first_initial_peer_gives_the_lan_address(routes):
    routes({"10.0.0.5": "10.0.0.2", MDNS_GROUP: "192.168.1.7"})
    assert lan_address([PEER]) == "10.0.0.2"  # the swarm's interface, not the mDNS (default route) one


def test_peers_without_a_route_are_passed_over(routes):
    routes({"10.0.1.6": "10.0.1.2", MDNS_GROUP: "192.168.1.7"})
    assert lan_address([PEER, OTHER_PEER]) == "10.0.1.2"


def test_without_peers_the_route_to_the_mdns_group_gives_it(routes):
    routes({MDNS_GROUP: "192.168.1.7"})
    assert lan_address([]) == "192.168.1.7"
    assert lan_address(["/dns/example.org/tcp/4000"]) == "192.168.1.7"  # not an IPv4 peer: no route to look up


def test_without_any_route_the_first_lan_interface_gives_it(routes, interfaces):
    routes({})
    interfaces({"lo": ["127.0.0.1"], "eth1": ["172.16.0.9"], "eth2": ["172.17.0.9"]})
    assert lan_address([PEER]) == "172.16.0.9"
    interfaces({"lo": ["127.0.0.1"]})
    assert lan_address([PEER]) == "127.0.0.1"  # no LAN at all


def test_the_kernel_routes_loopback_through_loopback():
    assert route_source("127.0.0.1") == "127.0.0.1"
    assert lan_address(["/ip4/127.0.0.1/tcp/4000/p2p/x"]) == "127.0.0.1"  # a swarm on this machine


def test_the_announced_host_is_the_lan_address_unless_told(routes):
    routes({"10.0.0.5": "10.0.0.2", MDNS_GROUP: "192.168.1.7"})
    assert reachable_host(NetworkConfig(), [PEER]) == "10.0.0.2"
    assert reachable_host(NetworkConfig(), []) == "192.168.1.7"
    assert reachable_host(NetworkConfig(host="0.0.0.0", mdns=False), [PEER]) == "10.0.0.2"
    assert reachable_host(NetworkConfig(mdns=False), [PEER]) == "127.0.0.1"
    assert reachable_host(NetworkConfig(host="10.9.9.9"), [PEER]) == "10.9.9.9"
    assert reachable_host(NetworkConfig(announce_host="node7.example.org"), [PEER]) == "node7.example.org"


def test_a_dht_peer_on_every_interface_announces_only_the_lan_address():
    address = lan_address()  # this machine's real one (loopback only where it has no other interface)
    dht = swarm_dht.start_dht([], host="0.0.0.0", announce_host=address)
    try:
        maddrs = swarm_dht.visible_maddrs(dht)
        assert [maddr.split("/")[1:3] for maddr in maddrs] == [["ip4", address]], maddrs
        # and it answers there: joining through a multiaddr that does not answer fails (SwarmConnectionError)
        swarm_dht.start_dht(maddrs, client_mode=True).shutdown()
    finally:
        dht.shutdown()
