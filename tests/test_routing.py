import pytest

from edgeswarm.partition.coverage import block_throughputs, coverage_gaps
from edgeswarm.partition.span_selection import choose_least_covered_span
from edgeswarm.protocol.records import OFFLINE, ServerRecord
from edgeswarm.swarm.errors import NoRouteError
from edgeswarm.swarm.routing import (
    MeasuredSpeeds,
    plan_route,
    trusted_throughputs,
)


def record(node: str, start: int, end: int, throughput: float = 100.0, state: str = "online") -> ServerRecord:
    return ServerRecord(node, f"127.0.0.1:{1000 + start}", "m", start, end, throughput, 0, state)


def spans(route):
    return [(hop.record.node_id, hop.start, hop.end) for hop in route]


def test_route_chains_contiguous_spans_in_order():
    records = [record("c", 20, 30), record("a", 0, 10), record("b", 10, 20)]
    assert spans(plan_route(records, 30)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_route_prefers_one_fast_node_over_several_hops():
    records = [record("a", 0, 15), record("b", 15, 30), record("whole", 0, 30, throughput=100.0)]
    assert spans(plan_route(records, 30)) == [("whole", 0, 30)]


def test_route_uses_part_of_an_overlapping_span():
    records = [record("a", 0, 20), record("b", 10, 30, throughput=1000.0)]
    # b is ten times faster, so the route leaves a's blocks 10:20 to b
    assert spans(plan_route(records, 30)) == [("a", 0, 10), ("b", 10, 30)]


def test_route_skips_excluded_nodes():
    records = [record("a", 0, 30), record("b", 0, 15), record("c", 15, 30)]
    assert spans(plan_route(records, 30, exclude={"a"})) == [("b", 0, 15), ("c", 15, 30)]


def test_route_over_a_sub_range_replaces_one_lost_hop():
    records = [record("a", 0, 10), record("b", 10, 20), record("c", 20, 30), record("d", 10, 15), record("e", 15, 30)]
    assert spans(plan_route(records, 30, start_block=10, end_block=20, exclude={"b"})) == [("d", 10, 15), ("e", 15, 20)]


def test_missing_blocks_are_named_in_the_error():
    records = [record("a", 0, 10), record("c", 20, 30)]
    assert coverage_gaps(records, 30) == [(10, 20)]
    with pytest.raises(NoRouteError, match="blocks served by none: 10:20"):
        plan_route(records, 30)


def test_empty_swarm_has_no_route():
    with pytest.raises(NoRouteError, match="0 usable nodes"):
        plan_route([], 30)


def test_new_node_fills_the_first_gap():
    assert choose_least_covered_span([], 30, 10) == (0, 10)
    assert choose_least_covered_span([record("a", 0, 10)], 30, 10) == (10, 20)
    assert choose_least_covered_span([record("a", 0, 10), record("b", 10, 20)], 30, 10) == (20, 30)


def test_new_node_reinforces_the_weakest_coverage():
    records = [record("a", 0, 30, throughput=50.0), record("b", 0, 15, throughput=200.0)]
    assert choose_least_covered_span(records, 30, 15) == (15, 30)


def test_offline_records_do_not_count_as_coverage():
    records = [record("a", 0, 10, state=OFFLINE), record("b", 10, 30)]
    assert block_throughputs(records, 30)[:10] == [0.0] * 10
    assert choose_least_covered_span(records, 30, 10) == (0, 10)


@pytest.mark.parametrize(
    "value, reason",
    [
        ("not a dict", "not a dict"),
        ({"node_id": "a"}, "malformed"),
        ({**record("a", 0, 10).to_dict(), "end_block": 31}, "outside a model"),
        ({**record("a", 5, 5).to_dict()}, "outside a model"),
        ({**record("a", 0, 10).to_dict(), "throughput": -1.0}, "not positive"),
        ({**record("a", 0, 10).to_dict(), "state": "zombie"}, "unknown state"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(value, reason):
    with pytest.raises(ValueError, match=reason):
        ServerRecord.from_dict(value, num_blocks=30)


def test_record_round_trips_through_a_dict():
    original = record("a", 3, 9)
    assert ServerRecord.from_dict(original.to_dict(), num_blocks=30) == original


def test_node_moves_into_a_gap_left_by_a_crash():
    from edgeswarm.partition.rebalancing import choose_move

    me = record("me", 0, 10)
    records = [record("a", 0, 10), record("b", 10, 20), me]  # blocks 20:30 lost their only node
    assert choose_move(records, me, 30) == (20, 30)


def test_nodes_that_all_took_the_same_blocks_spread_out():
    from edgeswarm.partition.rebalancing import choose_move

    # four nodes started at once all saw an empty swarm and took 0:8; moving still leaves gaps, but fewer
    crowd = [record(name, 0, 8) for name in "abcd"]
    assert choose_move(crowd, crowd[0], 30) == (8, 16)


def test_node_stays_when_moving_gains_too_little():
    from edgeswarm.partition.rebalancing import choose_move

    me = record("me", 0, 10, throughput=100.0)
    records = [record("a", 0, 10, throughput=100.0), record("b", 10, 20, throughput=110.0), record("c", 20, 30, throughput=105.0), me]
    # without this node, blocks 0:10 would be the thinnest: its own span is already the best place
    assert choose_move(records, me, 30) is None


def test_node_moves_to_reach_the_redundancy_target():
    from edgeswarm.partition.rebalancing import choose_move

    me = record("me", 0, 10)
    records = [record("a", 0, 10), record("x", 0, 10), record("b", 10, 20), record("y", 10, 20), record("c", 20, 30), me]
    assert choose_move(records, me, 30, redundancy=2) == (20, 30)
    assert choose_move(records, me, 30, redundancy=1, min_gain=10.0) is None


def throughputs(records) -> dict[str, float]:
    return {record.node_id: record.throughput for record in records}


def test_routing_believes_no_node_faster_than_the_client_measured():
    honest, braggart, slow = record("honest", 0, 30, 100.0), record("braggart", 0, 30, 1e6), record("slow", 0, 30, 80.0)
    assert spans(plan_route([honest, braggart], 30)) == [("braggart", 0, 30)]  # announcements alone: it wins
    # nothing measured: no node counts as more than twice the median announcement (a minority cannot raise it)
    assert throughputs(trusted_throughputs([honest, braggart, slow], {})) == {"honest": 100.0, "braggart": 200.0, "slow": 80.0}
    # a measured node counts at min(announced, measured); an unmeasured one at most twice the best of those
    trusted = trusted_throughputs([braggart, honest, slow], {"honest": 90.0, "slow": 80.0})
    assert throughputs(trusted) == {"honest": 90.0, "braggart": 180.0, "slow": 80.0}
    # once measured, the braggart counts at what the client saw, whatever it announces; a node measured
    # above its announcement keeps its announcement
    trusted = trusted_throughputs([braggart, honest], {"honest": 150.0, "braggart": 60.0})
    assert throughputs(trusted) == {"honest": 100.0, "braggart": 60.0}
    assert spans(plan_route(trusted, 30)) == [("honest", 0, 30)]
    assert trusted_throughputs([], {}) == []


def test_measured_speeds_follow_recent_steps():
    speeds = MeasuredSpeeds()
    assert speeds.measured("a") is None
    speeds.observe("a", blocks=10, seconds=0.1)
    assert speeds.measured("a") == pytest.approx(100.0)
    for _ in range(40):  # the node slowed down: its measured speed follows
        speeds.observe("a", blocks=10, seconds=1.0)
    assert speeds.measured("a") == pytest.approx(10.0, rel=1e-2)
    assert throughputs(speeds.trusted([record("a", 0, 30, 1e6), record("b", 0, 30, 1e6)])) == pytest.approx({"a": 10.0, "b": 20.0}, rel=1e-2)
