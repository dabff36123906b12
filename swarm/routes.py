"""The client's view of the servers: who serves which blocks, who is banned, how fast each one really is,
and who was caught lying. Sessions ask it for routes and report failures to it; they never see the client.

One `RouteManager` per client (as Petals' RemoteSequenceManager): every session of the client shares its
bans, measured speeds and misbehaviour log, so a node that failed or lied in one session is avoided by
all. Its `Banlist` may also be shared with the agent step scheduler (agent.scheduler), so a node that
fails an agent step is not routed to for inference either, and the other way round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import hivemind

from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.errors import NodeBusyError, NodeUnavailableError, NoRouteError
from edgeswarm.swarm.routing import Hop, MeasuredSpeeds, plan_route

DEFAULT_BAN_SECONDS = 60.0  # a failed node's ban: longer than a dead node's record lives in the DHT
REPLACEMENT_POLL_SECONDS = 0.5  # how often a session waiting for a replacement looks at the DHT again


@dataclass(frozen=True)
class Misbehaviour:
    """A node judged to have returned wrong hidden states (swarm.spot_check)."""

    node_id: str
    address: str
    start_block: int
    end_block: int
    session_id: str
    step: int  # the session's step (0: the first, the prompt)
    position: int  # positions the session had before that step
    difference: float  # between its answer and the one it was judged against (swarm.spot_check.difference)
    tolerance: float
    reason: str
    time: float  # time.time() when it was judged

    @property
    def blocks(self) -> tuple[int, int]:
        return self.start_block, self.end_block


class Banlist:
    """Nodes not to use for a while, and until when. Thread-safe; a ban is never shortened."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def ban(self, node_id: str, seconds: float) -> None:
        """Skips `node_id` for `seconds`, unless a longer ban is already in force (a node caught lying)."""
        until = self._clock() + seconds
        with self._lock:
            self._until[node_id] = max(self._until.get(node_id, 0.0), until)

    def is_banned(self, node_id: str) -> bool:
        with self._lock:
            return self._until.get(node_id, 0.0) > self._clock()

    def banned(self) -> set[str]:
        """The nodes banned now."""
        now = self._clock()
        with self._lock:
            return {node_id for node_id, until in self._until.items() if until > now}


class RouteManager:
    """Routes over the servers of one model, for one client (module docstring).

    `ban_seconds`: how long a node that failed is skipped; `busy_seconds`: the least a busy node is
    skipped (it may ask for longer: protocol.busy). Misbehaviours stay on the log, and their node stays
    banned for the ban the spot checker gave it.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        model_id: str,
        num_blocks: int,
        identity: NodeIdentity,
        banlist: Banlist | None = None,
        ban_seconds: float = DEFAULT_BAN_SECONDS,
        busy_seconds: float = 0.0,
    ):
        self.dht, self.model_id, self.num_blocks, self.identity = dht, model_id, num_blocks, identity
        self.banlist = banlist or Banlist()
        self.ban_seconds, self.busy_seconds = ban_seconds, busy_seconds
        self.speeds = MeasuredSpeeds()  # each node's decode speed as this client's sessions measured it
        self.misbehaviours: list[Misbehaviour] = []  # nodes spot checks caught lying, in every session
        self._lock = threading.Lock()

    # --- who serves ------------------------------------------------------------------------------

    def servers(self) -> list[ServerRecord]:
        """The online nodes announced for this model."""
        return swarm_dht.fetch_servers(self.dht, self.model_id, self.num_blocks)

    def usable_servers(self) -> list[ServerRecord]:
        """The announced nodes minus the banned ones."""
        banned = self.banlist.banned()
        return [record for record in self.servers() if record.node_id not in banned]

    def trusted_servers(self) -> list[ServerRecord]:
        """The usable nodes, each with the throughput routing may believe (swarm.routing.trusted_throughputs):
        no faster than this client measured it, and an unmeasured one no faster than the best measured."""
        return self.speeds.trusted(self.usable_servers())

    # --- routes ----------------------------------------------------------------------------------

    def route(self, start_block: int = 0, end_block: int | None = None, exclude: Collection[str] = ()) -> list[Hop]:
        """The fastest chain of usable nodes over blocks [start_block, end_block); NoRouteError if none."""
        return plan_route(self.trusted_servers(), self.num_blocks, start_block=start_block, end_block=end_block, exclude=exclude)

    def replacement(self, hop: Hop, exclude: Collection[str] = ()) -> list[Hop] | None:
        """A chain of other nodes for `hop`'s blocks (one or several), or None if there is none now."""
        try:
            return self.route(hop.start, hop.end, exclude=exclude)
        except NoRouteError:
            return None

    def wait_for_replacement(self, hop: Hop, wait: float) -> list[Hop] | None:
        """`replacement(hop)`, waiting up to `wait` seconds for a node to take the blocks (a joining or
        rebalancing node may be on its way)."""
        deadline = time.monotonic() + wait
        while (route := self.replacement(hop)) is None and time.monotonic() < deadline:
            time.sleep(REPLACEMENT_POLL_SECONDS)
        return route

    # --- what sessions report --------------------------------------------------------------------

    def ban(self, node_id: str, seconds: float | None = None) -> None:
        """Stops routing to a node for `seconds` (default `ban_seconds`); a longer ban is never shortened."""
        self.banlist.ban(node_id, self.ban_seconds if seconds is None else seconds)

    def report_failure(self, error: NodeUnavailableError) -> None:
        """Bans the node an error is about: a busy node for as long as it asked (at least `busy_seconds`),
        any other for `ban_seconds`."""
        if error.node_id is None:
            return
        if isinstance(error, NodeBusyError):
            self.ban(error.node_id, max(self.busy_seconds, error.retry_after))
        else:
            self.ban(error.node_id)

    def observe_step(self, node_id: str, blocks: int, seconds: float) -> None:
        """A decode step over `blocks` blocks took `seconds` on the node, as a session saw it."""
        self.speeds.observe(node_id, blocks, seconds)

    def convict(self, misbehaviour: Misbehaviour, ban_seconds: float) -> None:
        """Logs a node caught lying and bans it for `ban_seconds`."""
        self.ban(misbehaviour.node_id, ban_seconds)
        with self._lock:
            self.misbehaviours.append(misbehaviour)

    def convicted(self, within: float) -> dict[str, Misbehaviour]:
        """Nodes caught lying (by any session) within the last `within` seconds, and the judgement."""
        now = time.time()
        with self._lock:
            return {m.node_id: m for m in self.misbehaviours if now - m.time < within}
