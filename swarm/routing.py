"""Choosing a chain of nodes that together run every block of the model, in order."""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from protocol.records import ServerRecord
from swarm.errors import NoRouteError

# Fixed cost of one more hop (request, serialization, network), in seconds; measured on loopback it is
# about a millisecond, on a LAN several. It makes the route prefer fewer, longer hops.
DEFAULT_HOP_COST = 0.005


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run on the node of `record` (a sub-span of what it serves)."""

    record: ServerRecord
    start: int
    end: int

    def describe(self) -> str:
        return f"{self.start}:{self.end} on {self.record.node_id[-8:]} ({self.record.address})"


def coverage_gaps(records: Sequence[ServerRecord], num_blocks: int) -> list[tuple[int, int]]:
    """Maximal runs of blocks that no record serves, as [start, end) pairs."""
    covered = [False] * num_blocks
    for record in records:
        for block in range(record.start_block, record.end_block):
            covered[block] = True
    gaps, start = [], None
    for block, is_covered in enumerate(covered + [True]):
        if not is_covered and start is None:
            start = block
        elif is_covered and start is not None:
            gaps.append((start, block))
            start = None
    return gaps


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
