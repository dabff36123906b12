"""Claims before loading (partition.span_selection): nodes that start together spread over the model
instead of all taking its first blocks, whatever order they read and claim in."""

import pytest

from edgeswarm.partition.span_selection import (
    SpanClaim,
    choose_least_covered_span,
    settle_claim,
)
from edgeswarm.protocol.records import ServerRecord


def record(node: str, start: int, end: int) -> ServerRecord:
    return ServerRecord(node, f"{node}:1", "m", start, end, throughput=100.0, kv_free_bytes=0)


def claim(node: str, start: int, end: int, at: float = 1.0) -> SpanClaim:
    return SpanClaim(node, start, end, claimed_at=at)


def test_claimed_blocks_are_left_to_their_claimant():
    assert choose_least_covered_span([], 30, 10, [claim("a", 0, 10)]) == (10, 20)
    assert choose_least_covered_span([], 30, 10, [claim("a", 0, 10), claim("b", 10, 20)]) == (20, 30)


def test_unclaimed_gaps_come_first_then_claimed_gaps_then_served_blocks():
    assert choose_least_covered_span([record("a", 0, 10)], 30, 10, [claim("b", 10, 20)]) == (20, 30)
    served = [record("a", 0, 10), record("b", 10, 20)]
    assert choose_least_covered_span(served, 30, 10, [claim("c", 20, 30)]) == (20, 30)  # nothing serves them yet
    assert choose_least_covered_span(served, 30, 15, [claim("c", 20, 30)]) == (15, 30)  # 5 served blocks at most


def lockstep(nodes: list[str], rounds: int, records=()) -> dict[str, tuple[int, int]]:
    """Nodes that claim in rounds, all reading at the same instant and claiming at the same time, as the
    daemon does (settle, then claim again where displaced); returns the span each ends on."""
    mine: dict[str, SpanClaim | None] = dict.fromkeys(nodes)
    for round_ in range(rounds):
        visible = [c for c in mine.values() if c is not None]  # everyone reads before anyone claims anew
        for node in nodes:
            span = settle_claim(list(records), visible, node, mine[node], 30, 10)
            if span is not None:
                mine[node] = SpanClaim(node, *span, claimed_at=float(round_))
    return {node: claim.span for node, claim in mine.items()}


def test_nodes_claiming_at_the_same_instant_end_on_different_spans():
    assert sorted(lockstep(["c", "a", "b"], rounds=4).values()) == [(0, 10), (10, 20), (20, 30)]


def test_a_standing_claim_is_kept():
    assert settle_claim([], [claim("a", 0, 10, at=2.0), claim("b", 0, 10, at=3.0)], "a", claim("a", 0, 10, at=2.0), 30, 10) is None
    # b claimed after a: it moves on, counting a's claim
    assert settle_claim([], [claim("a", 0, 10, at=2.0), claim("b", 0, 10, at=3.0)], "b", claim("b", 0, 10, at=3.0), 30, 10) == (10, 20)


def test_an_announced_node_counts_by_its_record_not_its_claim():
    records = [record("a", 10, 20)]  # a claimed 0:10, then moved before announcing
    assert settle_claim(records, [claim("a", 0, 10)], "b", None, 30, 10) == (0, 10)


@pytest.mark.parametrize(
    "value",
    [
        {"node_id": "a", "start_block": 0, "end_block": 40, "claimed_at": 1.0},
        {"node_id": "a", "start_block": 5, "end_block": 5, "claimed_at": 1.0},
        {"node_id": "a", "start_block": 0, "claimed_at": 1.0},
        {"node_id": "a", "start_block": "x", "end_block": 10, "claimed_at": 1.0},
        [0, 10],
    ],
)
def test_malformed_claims_are_refused(value):
    with pytest.raises(ValueError):
        SpanClaim.from_dict(value, 30)


def test_a_claim_round_trips_through_a_dict():
    assert SpanClaim.from_dict(claim("a", 3, 9, at=7.5).to_dict(), 30) == claim("a", 3, 9, at=7.5)
