"""Swarm membership: who may call the swarm's nodes.

Every participant, node or client, announces a signed member record under `edgeswarm.v1.member.<id>`
and keeps it fresh; nodes accept calls (protocol.call_auth) only from keys announced this way (or, in a
private swarm, from holders of the swarm key). In an open swarm anyone can announce, so membership does
not make a stranger trustworthy: it makes each caller a key that limits, ownership and bans apply to.
"""

from __future__ import annotations

import logging
import threading
import time

import hivemind

from edgeswarm.protocol.channels import process_identity, use_swarm_key
from edgeswarm.protocol.constants import REFRESHES_PER_TTL
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.swarm import dht as swarm_dht

logger = logging.getLogger(__name__)

MEMBER_TTL = 60.0  # seconds a member record lives
MEMBER_REFRESH = MEMBER_TTL / REFRESHES_PER_TTL  # how often a participant renews it
KNOWN_MEMBER_SECONDS = 30.0  # how long a node trusts a member record it read before reading it again
UNKNOWN_MEMBER_SECONDS = 1.0  # how long a node remembers that a key had no member record
MAX_LOOKUPS_PER_SECOND = 20.0  # DHT reads a node makes for callers it does not know yet
MAX_REMEMBERED_MEMBERS = 100_000


def member_key(fingerprint: str) -> str:
    return f"edgeswarm.v1.member.{fingerprint}"


def announce_member(dht: hivemind.DHT, fingerprint: str, kind: str, ttl: float = MEMBER_TTL) -> bool:
    """Stores this participant's member record (`kind`: "node" or "client"), signed by its identity."""
    return swarm_dht.store_value(dht, member_key(fingerprint), {"member": fingerprint, "kind": kind}, ttl)


class MemberAnnouncer:
    """Keeps a participant's member record fresh until `close()`; the first announcement is made before
    the constructor returns, so the participant's calls are accepted at once."""

    def __init__(self, dht: hivemind.DHT, fingerprint: str, kind: str):
        self._dht, self._fingerprint, self._kind = dht, fingerprint, kind
        self._stopped = threading.Event()
        if not announce_member(dht, fingerprint, kind):
            logger.warning("the DHT did not accept this %s's member record; nodes may refuse its calls until it does", kind)
        threading.Thread(target=self._refresh, name="member-announce", daemon=True).start()

    def _refresh(self) -> None:
        while not self._stopped.wait(MEMBER_REFRESH):
            announce_member(self._dht, self._fingerprint, self._kind)

    def close(self) -> None:
        self._stopped.set()


def join_as_client(dht: hivemind.DHT, swarm_key: bytes | None, identity: NodeIdentity | None = None) -> MemberAnnouncer:
    """Makes `identity` (by default this process's: protocol.channels.process_identity) a client member of
    the swarm on `dht`: the DHT peer signs its records with it, and it is announced until the announcer
    is closed."""
    identity = identity or process_identity()
    swarm_dht.use_auth(dht, swarm_dht.RecordAuth(identity, swarm_key=swarm_key))
    use_swarm_key(swarm_key)
    return MemberAnnouncer(dht, identity.fingerprint, "client")


class MemberDirectory:
    """Answers `is_member(fingerprint)` for a node's call authentication, from the DHT, with a cache and a
    bounded rate of lookups, so that a flood of unknown keys cannot turn into a flood of DHT reads."""

    def __init__(self, dht: hivemind.DHT, clock=time.monotonic):
        self._dht = dht
        self._clock = clock
        self._known: dict[str, float] = {}  # fingerprint -> until when the answer `True` holds
        self._unknown: dict[str, float] = {}  # fingerprint -> until when the answer `False` holds
        self._lock = threading.Lock()
        self._allowance = MAX_LOOKUPS_PER_SECOND
        self._last_refill = clock()

    def is_member(self, fingerprint: str) -> bool:
        now = self._clock()
        with self._lock:
            if self._known.get(fingerprint, 0.0) > now:
                return True
            if self._unknown.get(fingerprint, 0.0) > now or not self._take_lookup(now):
                return False
        found = swarm_dht.fetch_value(self._dht, member_key(fingerprint))
        member = found is not None and found[1] == fingerprint and found[0].get("member") == fingerprint
        with self._lock:
            table, seconds = (self._known, KNOWN_MEMBER_SECONDS) if member else (self._unknown, UNKNOWN_MEMBER_SECONDS)
            if len(table) >= MAX_REMEMBERED_MEMBERS:
                table.clear()
            table[fingerprint] = self._clock() + seconds
        return member

    def _take_lookup(self, now: float) -> bool:
        self._allowance = min(MAX_LOOKUPS_PER_SECOND, self._allowance + (now - self._last_refill) * MAX_LOOKUPS_PER_SECOND)
        self._last_refill = now
        if self._allowance < 1.0:
            return False
        self._allowance -= 1.0
        return True
