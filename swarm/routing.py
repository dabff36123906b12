"""Choosing a chain of nodes that together run every block of the model, in order, and how fast the client
believes each node to be."""

from __future__ import annotations

import heapq
import statistics
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from edgeswarm.partition.coverage import coverage_gaps
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm.errors import NoRouteError

# Fixed cost of one more hop (request, serialization, network), in seconds; measured on loopback it is
# about a millisecond, on a LAN several. It makes the route prefer fewer, longer hops.
DEFAULT_HOP_COST = 0.005
# A node's measured speed follows its recent decode steps: each new step weighs this much.
SPEED_SMOOTHING = 0.2
# A node the client has not measured counts at most this many times as fast as the fastest one it has
# (or, before it has measured any, as the median announcement): enough to try a node that may really be
# faster, and a node is routed to on its word only until its first decode step is measured.
UNMEASURED_CEILING_FACTOR = 2.0


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run on the node of `record` (a sub-span of what it serves)."""

    record: ServerRecord
    start: int
    end: int

    def describe(self) -> str:
        return f"{self.start}:{self.end} on {self.record.node_id[-8:]} ({self.record.address})"


def plan_route(
    records: Sequence[ServerRecord],
    num_blocks: int,
    *,
    start_block: int = 0,
    end_block: int | None = None,
    hop_cost: float = DEFAULT_HOP_COST,
    exclude: Collection[str] = (),
) -> list[Hop]:
    """The fastest chain over blocks [start_block, end_block) (default: to the last block): Dijkstra over
    block boundaries.

    An edge runs blocks [a, b) on one node serving them, costing `hop_cost` plus (b - a) / throughput.
    Nodes whose id is in `exclude` are not used.
    """
    target = num_blocks if end_block is None else end_block
    usable = [record for record in records if record.node_id not in exclude]
    best = {start_block: 0.0}
    came_from: dict[int, Hop] = {}
    frontier = [(0.0, start_block)]
    while frontier:
        cost, block = heapq.heappop(frontier)
        if block == target:
            break
        if cost > best.get(block, float("inf")):
            continue
        for record in usable:
            if not record.start_block <= block < record.end_block:
                continue
            for end in range(block + 1, min(record.end_block, target) + 1):
                new_cost = cost + hop_cost + (end - block) / record.throughput
                if new_cost < best.get(end, float("inf")):
                    best[end] = new_cost
                    came_from[end] = Hop(record, block, end)
                    heapq.heappush(frontier, (new_cost, end))
    if target not in best:
        gaps = coverage_gaps(usable, num_blocks)
        described = ", ".join(f"{a}:{b}" for a, b in gaps if b > start_block and a < target) or "none"
        raise NoRouteError(
            f"no chain of online nodes covers blocks {start_block}:{target} "
            f"({len(usable)} usable nodes; blocks served by none: {described})"
        )
    route, block = [], target
    while block != start_block:
        hop = came_from[block]
        route.append(hop)
        block = hop.start
    return route[::-1]


def trusted_throughputs(records: Sequence[ServerRecord], measured: Mapping[str, float]) -> list[ServerRecord]:
    """`records` with the throughput routing may believe: a node's announcement is only its own word.

    A node the client has measured (`measured`: node id -> blocks/s of its decode steps) counts at
    min(announced, measured). Any other node counts at most `UNMEASURED_CEILING_FACTOR` times as fast as
    the fastest measured node among `records` (as believed: min(announced, measured)), or, while none is
    measured, as the median announcement (median_low: a minority of braggarts cannot raise it). So a node
    announcing 1e6 may be tried once, like any node that may be faster, and from its first measured step
    on counts at the speed the client saw.
    """
    if not records:
        return []
    believed = {record.node_id: min(record.throughput, measured[record.node_id]) for record in records if record.node_id in measured}
    reference = max(believed.values()) if believed else statistics.median_low(record.throughput for record in records)
    ceiling = UNMEASURED_CEILING_FACTOR * reference
    return [replace(record, throughput=believed.get(record.node_id, min(record.throughput, ceiling))) for record in records]


class MeasuredSpeeds:
    """The decode throughput (blocks/s) one client has measured of each node, from its sessions' steps."""

    def __init__(self) -> None:
        self._speeds: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, node_id: str, blocks: int, seconds: float) -> None:
        """A decode step over `blocks` blocks on the node took `seconds`, as the client saw it."""
        if seconds <= 0:
            return
        speed = blocks / seconds
        with self._lock:
            previous = self._speeds.get(node_id)
            self._speeds[node_id] = speed if previous is None else (1 - SPEED_SMOOTHING) * previous + SPEED_SMOOTHING * speed

    def measured(self, node_id: str) -> float | None:
        with self._lock:
            return self._speeds.get(node_id)

    def trusted(self, records: Sequence[ServerRecord]) -> list[ServerRecord]:
        """`records` with the throughput routing may believe (`trusted_throughputs`)."""
        with self._lock:
            measured = dict(self._speeds)
        return trusted_throughputs(records, measured)
