"""How well the swarm covers the model's blocks, counted in one place: per block, how many online nodes
serve it and how much throughput they announce, and which runs of blocks no online node serves.

Offline records (withdrawn announcements) never count: a node that said it is leaving serves nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from edgeswarm.protocol.records import ONLINE, ServerRecord


def _online(records: Iterable[ServerRecord]) -> Iterator[ServerRecord]:
    return (record for record in records if record.state == ONLINE)


def block_coverage(records: Iterable[ServerRecord], num_blocks: int) -> list[int]:
    """How many online nodes serve each of the `num_blocks` blocks."""
    counts = [0] * num_blocks
    for record in _online(records):
        for block in range(record.start_block, record.end_block):
            counts[block] += 1
    return counts


def block_throughputs(records: Iterable[ServerRecord], num_blocks: int) -> list[float]:
    """Total announced throughput serving each block, over the online nodes."""
    totals = [0.0] * num_blocks
    for record in _online(records):
        for block in range(record.start_block, record.end_block):
            totals[block] += record.throughput
    return totals


def min_coverage(records: Iterable[ServerRecord], num_blocks: int) -> int:
    """The fewest online nodes serving any block (0 if some block is unserved, or the model has none)."""
    return min(block_coverage(records, num_blocks), default=0)


def coverage_gaps(records: Iterable[ServerRecord], num_blocks: int) -> list[tuple[int, int]]:
    """Maximal runs of blocks that no online node serves, as [start, end) pairs."""
    gaps, start = [], None
    for block, count in enumerate([*block_coverage(records, num_blocks), 1]):  # the sentinel closes a trailing gap
        if count == 0 and start is None:
            start = block
        elif count > 0 and start is not None:
            gaps.append((start, block))
            start = None
    return gaps
