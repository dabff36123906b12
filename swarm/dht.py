"""The hivemind DHT as the swarm's directory: joining it, announcing spans, and reading who serves what."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import hivemind
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import get_dht_time

from protocol.records import OFFLINE, ONLINE, ServerRecord, servers_key
from swarm.errors import SwarmConnectionError

logger = logging.getLogger(__name__)


def start_dht(
    initial_peers: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
    **p2p_options,
) -> hivemind.DHT:
    """Starts a DHT peer (a child process of hivemind's) and joins it to `initial_peers`, if any.

    `p2p_options` go to hivemind's libp2p daemon: for nodes behind NAT, `announce_maddrs` (the public
    addresses to announce), `use_relay` and `use_auto_relay` (reach and be reached through relays).
    """
    options = dict(p2p_options) if client_mode else {"host_maddrs": [f"/ip4/{host}/tcp/{port}"], **p2p_options}
    try:
        return hivemind.DHT(initial_peers=list(initial_peers), client_mode=client_mode, start=True, **options)
    except P2PDaemonError as error:
        reason = str(error).split(": ", 1)[-1]
        raise SwarmConnectionError(f"cannot join the swarm through {list(initial_peers)}: {reason}") from error


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The multiaddrs other peers can use as --initial-peers to reach this one."""
    return [str(maddr) for maddr in dht.get_visible_maddrs()]


def announce(dht: hivemind.DHT, record: ServerRecord, ttl: float, timeout: float = 10.0) -> bool:
    """Stores `record` under its model's key for `ttl` seconds; returns whether the DHT accepted it in time."""
    return store_subkey(dht, servers_key(record.model_id), record.node_id, record.to_dict(), ttl, timeout)


def store_subkey(dht: hivemind.DHT, key: str, subkey: str, value, ttl: float, timeout: float = 10.0) -> bool:
    """Stores `value` as `subkey` of `key` (one subkey per node) for `ttl` seconds; returns whether it was accepted."""
    if not dht.is_alive():
        logger.warning("cannot store %s/%s: the DHT process has exited", key, subkey)
        return False
    future = dht.store(key, subkey=subkey, value=value, expiration_time=get_dht_time() + ttl, return_future=True)
    try:
        return bool(future.result(timeout=timeout))
    except Exception as error:  # a timeout, or a DHT process that is already gone
        future.cancel()
        logger.warning("storing %s/%s failed: %r", key, subkey, error)
        return False


def fetch_subkeys(dht: hivemind.DHT, key: str) -> dict[str, object]:
    """The unexpired values stored under `key`, by subkey (empty if none)."""
    found = dht.get(key, latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    return {str(subkey): getattr(entry, "value", None) for subkey, entry in found.value.items()}


def withdraw(dht: hivemind.DHT, record: ServerRecord, ttl: float = 60.0) -> bool:
    """Replaces `record` with an offline one, so readers stop routing to it before it would expire."""
    offline = replace(record, state=OFFLINE)
    return announce(dht, offline, ttl, timeout=5.0)


def fetch_servers(dht: hivemind.DHT, model_id: str, num_blocks: int) -> list[ServerRecord]:
    """The online, unexpired, well-formed records for `model_id`; malformed ones are logged and skipped."""
    records = []
    for subkey, value in fetch_subkeys(dht, servers_key(model_id)).items():
        try:
            record = ServerRecord.from_dict(value, num_blocks)
        except ValueError as error:
            logger.warning("ignoring record %r for %s: %s", subkey, model_id, error)
            continue
        if record.model_id != model_id or record.node_id != subkey:
            logger.warning("ignoring record %r: it names another model or node", subkey)
            continue
        if record.state == ONLINE:
            records.append(record)
    return sorted(records, key=lambda record: (record.start_block, record.node_id))


def store_value(dht: hivemind.DHT, key: str, value, ttl: float, timeout: float = 10.0) -> bool:
    """Stores a plain msgpack-able value under `key` for `ttl` seconds."""
    future = dht.store(key, value=value, expiration_time=get_dht_time() + ttl, return_future=True)
    try:
        return bool(future.result(timeout=timeout))
    except Exception as error:
        future.cancel()
        logger.warning("storing %s failed: %r", key, error)
        return False


def fetch_value(dht: hivemind.DHT, key: str):
    """The latest unexpired value under `key`, or None."""
    found = dht.get(key, latest=True)
    return None if found is None else found.value


async def _ping_peers(maddrs: Sequence[str], dht: hivemind.DHT, node) -> int:
    """Runs inside the DHT process: connects to each peer, pings it into the routing table, then looks
    up this node's own neighbours so that both sides learn each other's part of the DHT."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    reached = 0
    for maddr in maddrs:
        address = Multiaddr(maddr)
        peer_id = PeerID.from_base58(address["p2p"])
        transport = address.decapsulate(Multiaddr(f"/p2p/{address['p2p']}"))  # the daemon dials transports
        try:
            await node.p2p._client.connect(peer_id, [transport])
            reached += await node.protocol.call_ping(peer_id) is not None
        except Exception as error:  # an unreachable peer is skipped; the others may still answer
            logger.info("could not reach %s: %r", maddr, error)
    if reached:
        await node.find_nearest_nodes([node.node_id])
    return reached


def connect_peers(dht: hivemind.DHT, maddrs: Sequence[str], timeout: float = 15.0) -> int:
    """Adds peers found after start-up (e.g. on the LAN) to a running DHT; returns how many answered.

    Two nodes that started at the same moment on a LAN each bootstrap a DHT of their own; this merges them.
    """
    try:
        return int(dht.run_coroutine(partial(_ping_peers, list(maddrs)), return_future=True).result(timeout=timeout))
    except Exception as error:
        logger.warning("could not add peers %s: %r", list(maddrs), error)
        return 0
