from edgeswarm.partition.coverage import (
    block_coverage,
    block_throughputs,
    coverage_gaps,
    min_coverage,
)
from edgeswarm.protocol.records import OFFLINE, ONLINE, ServerRecord

NUM_BLOCKS = 10


def record(node: str, start: int, end: int, throughput: float = 100.0, state: str = ONLINE) -> ServerRecord:
    return ServerRecord(node, f"10.0.0.1:{7000 + start}", "m", start, end, throughput, 0, state)


def test_coverage_counts_online_servers_per_block():
    records = [record("a", 0, 6), record("b", 4, 10), record("c", 0, 2)]
    assert block_coverage(records, NUM_BLOCKS) == [2, 2, 1, 1, 2, 2, 1, 1, 1, 1]


def test_offline_records_serve_nothing():
    records = [record("a", 0, 10), record("gone", 0, 5, state=OFFLINE)]
    assert block_coverage(records, NUM_BLOCKS) == [1] * 10
    assert block_throughputs(records, NUM_BLOCKS) == [100.0] * 10
    assert coverage_gaps([record("gone", 0, 5, state=OFFLINE), record("b", 5, 10)], NUM_BLOCKS) == [(0, 5)]


def test_throughputs_add_up_per_block():
    records = [record("a", 0, 5, throughput=30.0), record("b", 3, 10, throughput=12.5)]
    assert block_throughputs(records, NUM_BLOCKS) == [30.0] * 3 + [42.5] * 2 + [12.5] * 5


def test_gaps_are_maximal_runs_of_unserved_blocks():
    records = [record("a", 2, 4), record("b", 3, 6), record("c", 8, 9)]
    assert coverage_gaps(records, NUM_BLOCKS) == [(0, 2), (6, 8), (9, 10)]
    assert coverage_gaps([record("whole", 0, 10)], NUM_BLOCKS) == []
    assert coverage_gaps([], NUM_BLOCKS) == [(0, NUM_BLOCKS)]


def test_min_coverage_is_the_thinnest_block():
    assert min_coverage([record("a", 0, 10), record("b", 0, 10), record("c", 0, 7)], NUM_BLOCKS) == 2
    assert min_coverage([record("a", 0, 9)], NUM_BLOCKS) == 0  # block 9 is served by nobody
    assert min_coverage([record("a", 0, 10), record("b", 0, 10, state=OFFLINE)], NUM_BLOCKS) == 1
    assert min_coverage([], 0) == 0  # a model without blocks
