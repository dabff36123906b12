"""The hivemind DHT as the swarm's directory: joining it, announcing spans, and reading who serves what."""

from __future__ import annotations

import faulthandler
import gc
import hashlib
import hmac
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from weakref import WeakKeyDictionary

import hivemind
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import MPFuture, ValueWithExpiration, get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from edgeswarm.protocol.channels import register_certificate
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.records import OFFLINE, ONLINE, ServerRecord, servers_key
from edgeswarm.protocol.signing import (
    ForgedRecordError,
    ReplayGuard,
    record_message,
    sign_record,
)
from edgeswarm.swarm.errors import SwarmConnectionError
from edgeswarm.swarm.mdns import LOOPBACK_HOST, WILDCARD_HOST

logger = logging.getLogger(__name__)

STORE_TIMEOUT = 10.0  # seconds a DHT store may take before it counts as failed (announcements retry at their next renewal)


@dataclass
class RecordAuth:
    """How a DHT peer signs what it stores and checks what it reads.

    Every value is a signed envelope (protocol.signing) from the node whose id is its key's
    fingerprint; forged, unsigned, expired and replayed values are skipped when read. In a private swarm
    (`swarm_key`), values must also carry an HMAC of the signed message under the swarm key, so nodes
    without the key can announce nothing that members will read.
    """

    identity: NodeIdentity | None = None  # None: a client, which reads but announces nothing
    swarm_key: bytes | None = None
    replay_guards: dict[str, ReplayGuard] = field(default_factory=dict)  # per DHT key: each has its own sequence

    def seal(self, payload: dict, ttl: float) -> dict:
        if self.identity is None:
            raise RuntimeError("this DHT peer has no identity to sign records with")
        envelope = sign_record(self.identity, payload, expires_at=get_dht_time() + ttl, sequence=time.time_ns() // 1000)
        return {"signed": envelope, "swarm_tag": self._tag(envelope)}

    def open(self, key: str, value, owner: str | None) -> tuple[dict, str]:
        """The payload of a value stored under `key` and its signer's id; ForgedRecordError if it must be ignored."""
        if not isinstance(value, dict) or set(value) != {"signed", "swarm_tag"}:
            raise ForgedRecordError("not a signed record")
        envelope = value["signed"]
        guard = self.replay_guards.setdefault(key, ReplayGuard())
        payload, signer = guard.verify(envelope, now=get_dht_time(), owner=owner)
        if self.swarm_key is not None and not hmac.compare_digest(bytes(value["swarm_tag"]), self._tag(envelope)):
            raise ForgedRecordError("the record lacks this private swarm's key")
        return payload, signer

    def _tag(self, envelope: dict) -> bytes:
        if self.swarm_key is None:
            return b""
        message = record_message(envelope["payload"], envelope["public_key"], envelope["expires_at"], envelope["sequence"])
        return hmac.new(self.swarm_key, message, hashlib.sha256).digest()


_auths: WeakKeyDictionary = WeakKeyDictionary()


def use_auth(dht: hivemind.DHT, auth: RecordAuth) -> None:
    """Makes `dht` sign and check records with `auth` (a peer without one reads only, in an open swarm)."""
    _auths[dht] = auth


def auth_of(dht: hivemind.DHT) -> RecordAuth:
    return _auths.setdefault(dht, RecordAuth())


DHT_START_TIMEOUT = 60.0  # seconds a DHT process may take to become ready (generous: a loaded 2-core machine)
DHT_START_ATTEMPTS = 3
FETCH_TIMEOUT = 30.0  # seconds a DHT read may take (generous: a loaded 2-core machine)
EXPIRY_SLACK = 5.0  # seconds a DHT expiration may exceed the signed one (clock steps between signing and storing)


class SignedRecordValidator(RecordValidatorBase):
    """Makes every DHT peer of the swarm refuse to store or return a value that is not a signed envelope
    (from the node its subkey names, and tagged with the swarm key in a private swarm), or whose DHT
    expiration is later than its signed one. Replays of older authentic values are also caught when
    reading (`RecordAuth.open`), which keeps per-node history."""

    def __init__(self, swarm_key: bytes | None = None):
        self.swarm_key = swarm_key

    def validate(self, record: DHTRecord) -> bool:
        try:
            value = MSGPackSerializer.loads(record.value)
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
            RecordAuth(swarm_key=self.swarm_key).open("", value, owner=subkey if isinstance(subkey, str) else None)
            # a value may not outlive its signature in the DHT: a replayed old record cannot be kept
            # stored past its signed expiry, where it would shadow the node's newer ones
            return record.expiration_time <= value["signed"]["expires_at"] + EXPIRY_SLACK
        except Exception as error:  # any malformed value is simply refused
            logger.debug("refusing a DHT value: %r", error)
            return False


def _free_port(host: str) -> int:
    """A TCP port free on `host` now (the kernel's pick; free until someone else binds it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _maddr_host(host: str) -> str:
    """The multiaddr prefix naming `host`: /ip4/A, /ip6/A, or /dns/NAME."""
    try:
        return f"/ip{ipaddress.ip_address(host).version}/{host}"
    except ValueError:
        return f"/dns/{host}"


def start_dht(
    initial_peers: Sequence[str],
    host: str = LOOPBACK_HOST,
    port: int = 0,
    client_mode: bool = False,
    swarm_key: bytes | None = None,
    announce_host: str | None = None,
    **p2p_options,
) -> hivemind.DHT:
    """Starts a DHT peer (a child process of hivemind's) and joins it to `initial_peers`, if any.

    The peer stores and returns only signed values (`SignedRecordValidator`, with `swarm_key` in a
    private swarm).

    `p2p_options` go to hivemind's libp2p daemon: for nodes behind NAT, `announce_maddrs` (the public
    addresses to announce), `use_relay` and `use_auto_relay` (reach and be reached through relays).
    A peer listening on every interface (`host` 0.0.0.0) without `announce_maddrs` announces
    `announce_host` alone: libp2p would otherwise announce every interface's address, loopback
    included, and peers (and mDNS) would be handed addresses that lead nowhere or to themselves. libp2p
    needs a real port to announce, so one is picked here when `port` is 0.
    """
    options = dict(p2p_options)
    if not client_mode:
        if host == WILDCARD_HOST and announce_host and not options.get("announce_maddrs"):
            port = port or _free_port(host)
            options["announce_maddrs"] = [f"{_maddr_host(announce_host)}/tcp/{port}"]
        options["host_maddrs"] = [f"/ip4/{host}/tcp/{port}"]
    for attempt in range(1, DHT_START_ATTEMPTS + 1):
        dht = _DHTProcess(
            initial_peers=list(initial_peers),
            client_mode=client_mode,
            start=False,
            record_validators=[SignedRecordValidator(swarm_key)],
            **options,
        )
        try:
            dht.run_in_background(await_ready=True, timeout=DHT_START_TIMEOUT)
            return dht
        except P2PDaemonError as error:
            _stop(dht)
            reason = str(error).split(": ", 1)[-1]
            raise SwarmConnectionError(f"cannot join the swarm through {list(initial_peers)}: {reason}") from error
        except TimeoutError:
            logger.warning("the DHT process was not ready in %.0f s (attempt %d of %d)", DHT_START_TIMEOUT, attempt, DHT_START_ATTEMPTS)
            _report_hang(dht)
            _stop(dht)
            _unblock_result_pipe()
    raise SwarmConnectionError(f"cannot join the swarm through {list(initial_peers)}: the DHT did not start in {DHT_START_ATTEMPTS} attempts")


class _DHTProcess(hivemind.DHT):
    """hivemind's DHT process, which leaves the objects it inherits to the garbage collector's permanent
    generation and prints every thread's stack on HANG_REPORT_SIGNAL.

    hivemind forks its DHT process. A fork taken while another thread holds a lock can hang in the
    child for good, and so can a child whose result pipe is held by a process that died writing to it;
    a start that is not ready in time reports where it hangs, then is killed and tried afresh."""

    def run(self) -> None:
        # the fork copied every object of the parent (a whole test run's, in a test process): collecting
        # them again and again starved the DHT's start for minutes; they are the parent's, never garbage here
        gc.freeze()
        faulthandler.register(HANG_REPORT_SIGNAL, all_threads=True)
        super().run()


HANG_REPORT_SIGNAL = signal.SIGUSR1
HANG_REPORT_WAIT = 2.0  # seconds a hung DHT process gets to print its stacks before it is killed
RESULT_LOCK_WAIT = 10.0  # seconds the lock of hivemind's result pipe may stay taken before it counts as lost


def _report_hang(dht: hivemind.DHT) -> None:
    """Makes a DHT process that did not become ready print its threads' stacks (to standard error)."""
    if dht.is_alive():
        os.kill(dht.pid, HANG_REPORT_SIGNAL)
        time.sleep(HANG_REPORT_WAIT)


def _unblock_result_pipe() -> None:
    """Resets hivemind's result pipe when its cross-process lock stays taken.

    DHT processes send every result to their parent through one pipe, under one lock shared by all of
    them; a DHT process killed while holding it (hivemind terminates one that does not shut down in 3 s)
    leaves it taken for good, and every later DHT process hangs before it can report ready. hivemind's
    `MPFuture.reset_backend` makes a fresh pipe and lock for the futures made from now on."""
    if MPFuture._update_lock.acquire(timeout=RESULT_LOCK_WAIT):
        MPFuture._update_lock.release()
        return
    logger.warning("hivemind's result pipe lock stays taken: resetting its backend")
    MPFuture.reset_backend()


def _stop(dht: hivemind.DHT) -> None:
    """Ends a DHT process that did not become ready, whatever state it hangs in."""
    if dht.is_alive():
        dht.kill()
        dht.join(timeout=DHT_START_TIMEOUT)


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The multiaddrs other peers can use as --initial-peers to reach this one."""
    return [str(maddr) for maddr in dht.get_visible_maddrs()]


def announce(dht: hivemind.DHT, record: ServerRecord, ttl: float, timeout: float = STORE_TIMEOUT) -> bool:
    """Stores `record` under its model's key for `ttl` seconds; returns whether the DHT accepted it in time."""
    return store_subkey(dht, servers_key(record.model_id), record.node_id, record.to_dict(), ttl, timeout)


def store_subkey(dht: hivemind.DHT, key: str, subkey: str, value: dict, ttl: float, timeout: float = STORE_TIMEOUT) -> bool:
    """Stores `value` signed as `subkey` of `key` (one subkey per node) for `ttl` seconds; returns whether
    it was accepted."""
    if not dht.is_alive():
        logger.warning("cannot store %s/%s: the DHT process has exited", key, subkey)
        return False
    sealed = auth_of(dht).seal(value, ttl)
    future = dht.store(key, subkey=subkey, value=sealed, expiration_time=get_dht_time() + ttl, return_future=True)
    try:
        return bool(future.result(timeout=timeout))
    except Exception as error:  # a timeout, or a DHT process that is already gone
        future.cancel()
        logger.warning("storing %s/%s failed: %r", key, subkey, error)
        return False


def read_latest(dht: hivemind.DHT, key: str) -> ValueWithExpiration | None:
    """The DHT's latest entry under `key`, or None; None too after FETCH_TIMEOUT (a DHT process that
    stopped answering reads as nothing found, and callers look again)."""
    future = dht.get(key, latest=True, return_future=True)
    try:
        return future.result(timeout=FETCH_TIMEOUT)
    except TimeoutError:
        future.cancel()
        logger.warning("reading %s from the DHT took over %.0f s", key, FETCH_TIMEOUT)
        return None


def fetch_subkeys(dht: hivemind.DHT, key: str) -> dict[str, object]:
    """The authentic unexpired values stored under `key`, by subkey (each signed by the node it names)."""
    found = read_latest(dht, key)
    if found is None or not isinstance(found.value, dict):
        return {}
    auth, values = auth_of(dht), {}
    for subkey, entry in found.value.items():
        try:
            values[str(subkey)], _ = auth.open(key, getattr(entry, "value", None), owner=str(subkey))
        except ForgedRecordError as error:
            logger.warning("ignoring the value of %s under %s: %s", subkey, key, error)
    return values


def withdraw(dht: hivemind.DHT, record: ServerRecord, ttl: float) -> bool:
    """Replaces `record` with an offline one, so readers stop routing to it before it would expire.

    `ttl` is the announcement's own: the DHT keeps whichever value expires last, so an offline record
    that outlived the announcements would hide the node's next start with the same identity."""
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
        if record.tls_cert and not register_certificate(record.node_id, record.tls_cert):
            continue
        if record.state == ONLINE:
            records.append(record)
    return sorted(records, key=lambda record: (record.start_block, record.node_id))


def store_value(dht: hivemind.DHT, key: str, value: dict, ttl: float, timeout: float = STORE_TIMEOUT) -> bool:
    """Stores a msgpack-able dict under `key` for `ttl` seconds, signed by this peer."""
    sealed = auth_of(dht).seal(value, ttl)
    future = dht.store(key, value=sealed, expiration_time=get_dht_time() + ttl, return_future=True)
    try:
        return bool(future.result(timeout=timeout))
    except Exception as error:
        future.cancel()
        logger.warning("storing %s failed: %r", key, error)
        return False


def fetch_value(dht: hivemind.DHT, key: str) -> tuple[dict, str] | None:
    """The latest unexpired authentic value under `key` and the id of the node that signed it, or None."""
    found = read_latest(dht, key)
    if found is None:
        return None
    try:
        return auth_of(dht).open(key, found.value, owner=None)
    except ForgedRecordError as error:
        logger.warning("ignoring the value under %s: %s", key, error)
        return None


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
