"""Planners: the cost model by hand, exactness against brute force, heterogeneous swarms, the ring's apportionment."""

import itertools
import random

import msgpack
import pytest

from edgeswarm.partition.planner import (
    CLIENT,
    Link,
    NetworkProfile,
    NodeProfile,
    Plan,
    Stage,
    evaluate_plan,
    memory_proportional_plan,
    plan_pipeline,
    plan_ring,
    ring_route,
)

GIB = 1 << 30
FAST_LINK = Link(bandwidth_bytes_per_s=1e9, rtt_s=1e-4)


def node(node_id, decode=0.01, max_blocks=1000, memory=GIB):
    return NodeProfile(node_id, decode, decode / 10, max_blocks=max_blocks, memory_bytes=memory)


def fast_network(links=None):
    return NetworkProfile(links or {}, default=FAST_LINK)


def blocks_of(plan):
    return {stage.node_id: stage.num_blocks for stage in plan.stages}


def all_plans(profiles, network, num_blocks, activation_bytes):
    """Every valid plan: each subset of nodes, in each order, with each split into non-empty spans."""
    for size in range(1, len(profiles) + 1):
        for order in itertools.permutations(profiles, size):
            for cuts in itertools.combinations(range(1, num_blocks), size - 1):
                bounds = (0, *cuts, num_blocks)
                stages = [Stage(p.node_id, a, b) for p, a, b in zip(order, bounds, bounds[1:])]
                if all(stage.num_blocks <= p.max_blocks for stage, p in zip(stages, order)):
                    yield evaluate_plan(stages, profiles, network, activation_bytes, num_blocks=num_blocks)


def random_swarm(rng, num_nodes, num_blocks):
    """Nodes of random speed and capacity (together able to hold the model) behind random links."""
    while True:
        profiles = [
            node(f"n{i}", rng.uniform(0.005, 0.05), max_blocks=rng.randint(1, num_blocks), memory=rng.randint(1, 8) * GIB)
            for i in range(num_nodes)
        ]
        if sum(p.max_blocks for p in profiles) >= num_blocks:
            break
    ids = [p.node_id for p in profiles] + [CLIENT]
    links = {pair: Link(rng.uniform(1e4, 1e7), rng.uniform(0, 0.02)) for pair in itertools.combinations(ids, 2)}
    return profiles, NetworkProfile(links, default=FAST_LINK)


# --- the cost model ---


def test_network_profile_looks_links_up_in_both_directions_then_falls_back_to_the_default():
    ab, default = Link(10.0, 0.1), Link(20.0, 0.2)
    network = NetworkProfile({("a", "b"): ab}, default=default)
    assert network.link("a", "b") is ab
    assert network.link("b", "a") is ab
    assert network.link("a", "c") is default


def test_evaluate_plan_matches_a_hand_computed_two_node_example():
    profiles = [node("a", decode=0.01, max_blocks=3), node("b", decode=0.02, max_blocks=2)]
    network = NetworkProfile(
        {
            (CLIENT, "a"): Link(1e6, 0.002),
            ("a", "b"): Link(5e5, 0.004),
            (CLIENT, "b"): Link(2e6, 0.001),  # stored client -> b, used for b -> client
        },
        default=Link(1.0, 10.0),  # absurd, so using it by mistake shows
    )
    stages = [Stage("a", 0, 3), Stage("b", 3, 5)]

    plan = evaluate_plan(stages, profiles, network, 10_000, num_blocks=5)
    # compute: a 3 * 0.01 = 0.03, b 2 * 0.02 = 0.04
    # hops: client->a 0.002 + 1e4/1e6 = 0.012, a->b 0.004 + 1e4/5e5 = 0.024, b->client 0.001 + 1e4/2e6 = 0.006
    assert plan.stages == tuple(stages)
    assert plan.predicted_token_seconds == pytest.approx(0.03 + 0.04 + 0.012 + 0.024 + 0.006)
    # slowest of computes 0.03, 0.04 and wire times 0.01, 0.02, 0.005 is b's compute
    assert plan.predicted_throughput == pytest.approx(1 / 0.04)

    heavy = evaluate_plan(stages, profiles, network, 100_000, num_blocks=5)
    # wire times grow tenfold to 0.1, 0.2, 0.05: the a->b link (0.2 s) is now the bottleneck, RTT excluded
    assert heavy.predicted_throughput == pytest.approx(1 / 0.2)
    assert heavy.predicted_token_seconds == pytest.approx(0.07 + (0.002 + 0.1) + (0.004 + 0.2) + (0.001 + 0.05))


@pytest.mark.parametrize(
    "stages, match",
    [
        ([Stage("a", 0, 2), Stage("b", 3, 6)], "gap or an overlap"),
        ([Stage("a", 0, 4), Stage("b", 3, 6)], "gap or an overlap"),
        ([Stage("a", 1, 6)], "expected 0"),
        ([Stage("a", 0, 2), Stage("b", 2, 4), Stage("a", 4, 6)], "more than one stage"),
        ([Stage("a", 0, 1), Stage("small", 1, 6)], "max_blocks"),
        ([Stage("a", 0, 3), Stage("b", 3, 5)], "cover blocks 0:5"),
        ([Stage("a", 0, 3), Stage("nobody", 3, 6)], "unknown node"),
        ([], "at least one stage"),
    ],
)
def test_invalid_stages_are_rejected(stages, match):
    profiles = [node("a"), node("b"), node("small", max_blocks=2)]
    with pytest.raises(ValueError, match=match):
        evaluate_plan(stages, profiles, fast_network(), 1000, num_blocks=6)


def test_empty_stage_and_duplicate_profiles_are_rejected():
    with pytest.raises(ValueError, match="start < end"):
        Stage("a", 3, 3)
    with pytest.raises(ValueError, match="profiled twice"):
        evaluate_plan([Stage("a", 0, 1)], [node("a"), node("a")], fast_network(), 1000)


# --- the pipeline planner ---


def test_pipeline_on_homogeneous_nodes_with_fast_links():
    profiles = [node(name) for name in "abc"]
    # equal nodes, negligible wire times: the slowest stage is smallest with an even split
    by_throughput = plan_pipeline(profiles, fast_network(), 6, 1000, objective="throughput")
    assert sorted(blocks_of(by_throughput).values()) == [2, 2, 2]
    assert by_throughput.predicted_throughput == pytest.approx(1 / (2 * 0.01))
    # total compute is the same however blocks are split, and every extra stage adds a hop: one node is fastest
    by_latency = plan_pipeline(profiles, fast_network(), 6, 1000, objective="latency")
    assert len(by_latency.stages) == 1


def test_a_single_node_takes_the_whole_model_for_both_objectives():
    # 29 * 0.01 / 0.01 rounds below 29 in floating point: the optimal bottleneck must still admit 29 blocks
    profiles = [node("only", decode=0.01)]
    for objective in ["latency", "throughput"]:
        plan = plan_pipeline(profiles, fast_network(), 29, 1000, objective=objective)
        assert plan.stages == (Stage("only", 0, 29),)
    assert plan.predicted_throughput == pytest.approx(1 / 0.29)


@pytest.mark.parametrize("seed", range(12))
def test_pipeline_finds_the_brute_force_optimum_for_both_objectives(seed):
    rng = random.Random(seed)
    num_blocks = 6 if seed < 6 else 7
    profiles, network = random_swarm(rng, 3 if seed < 6 else 4, num_blocks)
    activation_bytes = 10_000  # wire times from 1 ms to 1 s: links matter as much as compute
    plans = list(all_plans(profiles, network, num_blocks, activation_bytes))

    by_latency = plan_pipeline(profiles, network, num_blocks, activation_bytes, objective="latency")
    assert by_latency.predicted_token_seconds == pytest.approx(min(p.predicted_token_seconds for p in plans))

    by_throughput = plan_pipeline(profiles, network, num_blocks, activation_bytes, objective="throughput")
    best_rate = max(p.predicted_throughput for p in plans)
    assert by_throughput.predicted_throughput == pytest.approx(best_rate)
    # ties on throughput are broken by latency
    at_best_rate = [p for p in plans if p.predicted_throughput >= best_rate * (1 - 1e-9)]
    assert by_throughput.predicted_token_seconds == pytest.approx(min(p.predicted_token_seconds for p in at_best_rate))


def heterogeneous_swarm():
    """A big node with slow compute, and two fast small nodes, one of them behind a slow link."""
    profiles = [
        node("big-slow", decode=0.05, max_blocks=32, memory=16 * GIB),
        node("fast-near", decode=0.005, max_blocks=20, memory=2 * GIB),
        node("fast-far", decode=0.005, max_blocks=20, memory=2 * GIB),
    ]
    slow_link = Link(bandwidth_bytes_per_s=8_000, rtt_s=0.05)  # 1 s per 8 kB activation
    links = {("fast-far", other): slow_link for other in ["big-slow", "fast-near", CLIENT]}
    return profiles, NetworkProfile(links, default=Link(1e8, 0.001))


def test_pipeline_beats_a_memory_proportional_split_on_a_heterogeneous_swarm():
    profiles, network = heterogeneous_swarm()
    naive = memory_proportional_plan(profiles, 32, network, 8_000)
    by_throughput = plan_pipeline(profiles, network, 32, 8_000, objective="throughput")

    # any stage on fast-far costs a 1 s hop; without it fast-near holds at most 20 blocks and big-slow
    # the other 12, at 0.6 s: the best bottleneck is 0.6 s
    assert "fast-far" not in blocks_of(by_throughput)
    assert blocks_of(by_throughput) == {"fast-near": 20, "big-slow": 12}
    assert by_throughput.predicted_throughput == pytest.approx(1 / 0.6)
    assert by_throughput.predicted_throughput >= 1.3 * naive.predicted_throughput

    by_latency = plan_pipeline(profiles, network, 32, 8_000, objective="latency")
    assert "fast-far" not in blocks_of(by_latency)
    assert by_latency.predicted_token_seconds < naive.predicted_token_seconds


def test_memory_caps_force_a_slow_node_to_take_the_remainder():
    profiles = [node("a", max_blocks=10), node("b", max_blocks=10), node("slow", decode=0.1, max_blocks=30)]
    for objective in ["latency", "throughput"]:
        plan = plan_pipeline(profiles, fast_network(), 24, 1000, objective=objective)
        # the fast nodes hold 20 blocks at most, so the slow one must take 4, and any more only costs time
        assert blocks_of(plan) == {"a": 10, "b": 10, "slow": 4}
    assert plan.predicted_throughput == pytest.approx(1 / (4 * 0.1))


def test_infeasible_models_and_bad_arguments_raise():
    profiles = [node("a", max_blocks=3), node("b", max_blocks=3)]
    with pytest.raises(ValueError, match="can hold 6 blocks"):
        plan_pipeline(profiles, fast_network(), 10, 1000)
    with pytest.raises(ValueError, match="can hold 6 blocks"):
        plan_ring(profiles, 10, fast_network(), 1000)
    with pytest.raises(ValueError, match="can hold 6 blocks"):
        memory_proportional_plan(profiles, 10, fast_network(), 1000)
    with pytest.raises(ValueError, match="objective"):
        plan_pipeline(profiles, fast_network(), 4, 1000, objective="speed")
    with pytest.raises(ValueError, match="memory_weight"):
        plan_ring(profiles, 4, fast_network(), 1000, memory_weight=1.5)


def test_more_nodes_than_the_exact_limit_search_only_the_fastest():
    profiles = [node(f"n{i:02d}", decode=0.01 * (1 + i / 100)) for i in range(12)]
    plan = plan_pipeline(profiles, fast_network(), 120, 1000, objective="throughput")
    # with near-equal nodes every extra stage lowers the slowest one, so an exact search over all 12 would use
    # all 12 (10 blocks each); the fallback searches only the 10 fastest, and uses them all
    assert set(blocks_of(plan)) == {f"n{i:02d}" for i in range(10)}


def test_more_nodes_than_the_exact_limit_swap_in_large_nodes_when_the_fastest_cannot_hold_the_model():
    tiny = [node(f"tiny{i}", decode=0.01, max_blocks=1) for i in range(10)]
    profiles = [*tiny, node("roomy", decode=0.1, max_blocks=50)]
    plan = plan_pipeline(profiles, fast_network(), 30, 1000)
    assert plan.stages[-1].end == 30
    assert blocks_of(plan)["roomy"] >= 21  # at most nine 1-block nodes remain besides it


# how long planning takes is measured by scripts/bench_planner.py, not asserted here


def test_planning_six_nodes_and_thirty_blocks_covers_every_block():
    profiles, network = random_swarm(random.Random(7), 6, 30)
    for objective in ["latency", "throughput"]:
        plan = plan_pipeline(profiles, network, 30, 10_000, objective=objective)
        assert plan.stages[0].start == 0 and plan.stages[-1].end == 30


def test_planning_ten_nodes_and_a_hundred_blocks_covers_every_block():
    profiles, network = random_swarm(random.Random(8), 10, 100)
    plan = plan_pipeline(profiles, network, 100, 10_000, objective="throughput")
    assert plan.stages[0].start == 0 and plan.stages[-1].end == 100


# --- the ring planner ---


def test_ring_with_memory_weight_one_is_a_memory_only_split():
    # speeds differ wildly, but only memory counts: 1:2:5 of 16 blocks is 2, 4, 10
    profiles = [
        node("a", decode=0.001, memory=1 * GIB),
        node("b", decode=0.5, memory=2 * GIB),
        node("c", decode=0.01, memory=5 * GIB),
    ]
    ring = plan_ring(profiles, 16, fast_network(), 1000, memory_weight=1.0)
    assert [(s.node_id, s.start, s.end) for s in ring.stages] == [("a", 0, 2), ("b", 2, 6), ("c", 6, 16)]
    assert memory_proportional_plan(profiles, 16, fast_network(), 1000) == ring


def test_ring_mixes_memory_and_speed_shares():
    # equal memory (shares 1/2, 1/2), speeds 1/0.03 and 1/0.01 (shares 1/4, 3/4):
    # weights 0.5 * 1/2 + 0.5 * 1/4 = 3/8 and 0.5 * 1/2 + 0.5 * 3/4 = 5/8, of 8 blocks: 3 and 5
    profiles = [node("a", decode=0.03), node("b", decode=0.01)]
    assert blocks_of(plan_ring(profiles, 8, fast_network(), 1000)) == {"a": 3, "b": 5}
    # speed alone: 1/4 and 3/4 of 8
    assert blocks_of(plan_ring(profiles, 8, fast_network(), 1000, memory_weight=0.0)) == {"a": 2, "b": 6}


def test_ring_rounds_by_largest_remainder():
    profiles = [node("a", memory=2 * GIB), node("b", memory=3 * GIB), node("c", memory=5 * GIB)]
    # quotas 1.4, 2.1, 3.5: floors 1, 2, 3 leave one block, for c's remainder 0.5
    assert blocks_of(plan_ring(profiles, 7, fast_network(), 1000, memory_weight=1.0)) == {"a": 1, "b": 2, "c": 4}
    equal = [node(name) for name in "abc"]
    # quotas 10/3 each: the one leftover block goes to the first in the ring
    assert blocks_of(plan_ring(equal, 10, fast_network(), 1000)) == {"a": 4, "b": 3, "c": 3}


def test_ring_respects_max_blocks_and_gives_every_node_a_block():
    capped = [node("a", memory=GIB), node("b", memory=GIB), node("c", memory=8 * GIB, max_blocks=4)]
    # c's quota 9.6 is capped at 4; the other 8 blocks split evenly between the equal a and b
    assert blocks_of(plan_ring(capped, 12, fast_network(), 1000, memory_weight=1.0)) == {"a": 4, "b": 4, "c": 4}
    lopsided = [node("a", memory=GIB), node("b", memory=1000 * GIB)]
    # a's quota is below one block, but with enough blocks every node gets one
    assert blocks_of(plan_ring(lopsided, 10, fast_network(), 1000, memory_weight=1.0)) == {"a": 1, "b": 9}
    few_blocks = [node(name) for name in "abc"]
    assert sum(blocks_of(plan_ring(few_blocks, 2, fast_network(), 1000)).values()) == 2


@pytest.mark.parametrize("seed", range(20))
def test_ring_shares_track_weights(seed):
    rng = random.Random(seed)
    num_blocks = rng.randint(8, 60)
    profiles = [
        node(f"n{i}", rng.uniform(0.005, 0.05), max_blocks=num_blocks, memory=rng.randint(1, 16) * GIB)
        for i in range(rng.randint(2, 6))
    ]
    plan = plan_ring(profiles, num_blocks, fast_network(), 1000)
    counts = blocks_of(plan)
    assert sum(counts.values()) == num_blocks and plan.stages[-1].end == num_blocks
    assert [s.node_id for s in plan.stages] == sorted(p.node_id for p in profiles)

    total_memory = sum(p.memory_bytes for p in profiles)
    total_speed = sum(1 / p.decode_seconds_per_block for p in profiles)
    weight = {
        p.node_id: 0.5 * p.memory_bytes / total_memory + 0.5 / p.decode_seconds_per_block / total_speed for p in profiles
    }
    for a, b in itertools.permutations(profiles, 2):
        if weight[a.node_id] > weight[b.node_id]:
            assert counts[a.node_id] >= counts[b.node_id]
    if all(num_blocks * w >= 1 for w in weight.values()):  # no minimum of one block in play: plain Hamilton rounding
        for node_id, w in weight.items():
            assert abs(counts[node_id] - num_blocks * w) < 1

    shuffled = profiles[:]
    rng.shuffle(shuffled)
    assert plan_ring(shuffled, num_blocks, fast_network(), 1000) == plan


def test_ring_route_rotates_the_ring_so_the_entry_node_holds_block_zero():
    stages = [Stage("a", 0, 3), Stage("b", 3, 5), Stage("c", 5, 10)]
    plan = evaluate_plan(stages, [node(n) for n in "abc"], fast_network(), 1000)
    assert ring_route(plan, "a") == list(plan.stages)
    # b first, then around the ring: c, a; each keeps its span length (2, 5, 3)
    assert ring_route(plan, "b") == [Stage("b", 0, 2), Stage("c", 2, 7), Stage("a", 7, 10)]
    assert ring_route(plan, "c") == [Stage("c", 0, 5), Stage("a", 5, 8), Stage("b", 8, 10)]
    with pytest.raises(ValueError, match="holds no blocks"):
        ring_route(plan, "d")


def test_ring_route_of_a_capped_ring_is_still_a_valid_plan():
    profiles = [node("a", max_blocks=2), node("b", memory=4 * GIB), node("c")]
    plan = plan_ring(profiles, 9, fast_network(), 1000)
    for entry in "abc":
        route = ring_route(plan, entry)
        evaluate_plan(route, profiles, fast_network(), 1000, num_blocks=9)  # raises if invalid
        assert route[0].node_id == entry and route[0].start == 0


# --- serialisation ---


def test_plan_round_trips_through_plain_dicts_and_msgpack():
    profiles, network = heterogeneous_swarm()
    plan = plan_pipeline(profiles, network, 32, 8_000, objective="throughput")
    as_dict = plan.to_dict()
    assert Plan.from_dict(as_dict) == plan
    assert Plan.from_dict(msgpack.unpackb(msgpack.packb(as_dict))) == plan
