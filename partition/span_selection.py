"""Which blocks a joining node takes when it is not told: the least-covered window (as Petals does)."""

from __future__ import annotations

from collections.abc import Iterable

from edgeswarm.partition.coverage import block_throughputs
from edgeswarm.protocol.records import ServerRecord


def choose_least_covered_span(records: Iterable[ServerRecord], num_blocks: int, span_length: int) -> tuple[int, int]:
    """The window of `span_length` blocks whose weakest blocks are weakest (lexicographic on sorted throughput).

    Comparing sorted windows first fills gaps (zero throughput), then the thinnest coverage; among
    equal windows the earliest wins, so an empty swarm fills from block 0 upward.
    """
    if not 0 < span_length <= num_blocks:
        raise ValueError(f"cannot take {span_length} blocks of a model with {num_blocks}")
    throughputs = block_throughputs(records, num_blocks)
    windows = ((sorted(throughputs[start : start + span_length]), start) for start in range(num_blocks - span_length + 1))
    start = min(windows)[1]
    return start, start + span_length
