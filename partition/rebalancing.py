"""Whether a node should move to other blocks: Petals-style, judged on the whole swarm's coverage.

A swarm is scored by (a) how many nodes serve each block, counted up to the redundancy target and
compared as a sorted list (so covering some of several gaps already counts as progress), then (b) its
bottleneck throughput: the lowest total throughput of any block. A node moves only if taking the
least-covered window instead of its current span raises (a), or keeps (a) and raises (b) by `min_gain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from edgeswarm.partition.coverage import block_coverage, block_throughputs
from edgeswarm.partition.span_selection import choose_least_covered_span
from edgeswarm.protocol.records import ServerRecord


def swarm_score(records: Sequence[ServerRecord], num_blocks: int, redundancy: int) -> tuple[tuple[int, ...], float]:
    """(servers of each block capped at `redundancy`, sorted ascending; lowest total throughput of any block)."""
    counts = block_coverage(records, num_blocks)
    return tuple(sorted(min(count, redundancy) for count in counts)), min(block_throughputs(records, num_blocks))


def choose_move(
    records: Sequence[ServerRecord], me: ServerRecord, num_blocks: int, redundancy: int = 2, min_gain: float = 1.2
) -> tuple[int, int] | None:
    """The span `me` should move to, or None if staying is as good (within `min_gain`)."""
    others = [record for record in records if record.node_id != me.node_id]
    target = choose_least_covered_span(others, num_blocks, me.num_blocks)
    if target == (me.start_block, me.end_block):
        return None
    moved = replace(me, start_block=target[0], end_block=target[1])
    now_count, now_bottleneck = swarm_score([*others, me], num_blocks, redundancy)
    new_count, new_bottleneck = swarm_score([*others, moved], num_blocks, redundancy)
    if new_count > now_count:
        return target
    if new_count == now_count and new_bottleneck > now_bottleneck * min_gain:
        return target
    return None
