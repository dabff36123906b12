"""A swarm-wide plan made from announced profiles, recorded in the DHT and followed by real nodes."""

import pytest
from transformers import AutoModelForCausalLM

from edgeswarm import SwarmClient
from devtools.launcher import LocalSwarm
from edgeswarm.partition.coordination import (
    coordination_round,
    keep_recorded_plan,
    make_plan,
    participants,
    plan_from_record,
    plan_key,
    plan_record,
    profiles_from_records,
)
from edgeswarm.partition.planner import Plan
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm import dht as swarm_dht
from tests.support import until_eos, wait_until


def profiled(node, throughput, max_blocks=30, links=None, partition="pipeline"):
    return ServerRecord(
        node, f"127.0.0.1:{hash(node) % 1000 + 1000}", "m", 0, 10, throughput, 0,
        prefill_throughput=throughput * 20, max_blocks=max_blocks, memory_bytes=10**9, partition=partition,
        links=links or {},
    )


def test_profiles_carry_speeds_caps_and_measured_links():
    records = [profiled("a", 100.0, links={"b": [1e6, 0.01]}), profiled("b", 50.0, max_blocks=12)]
    profiles, network = profiles_from_records(records)
    assert [(p.node_id, p.decode_seconds_per_block, p.max_blocks) for p in profiles] == [("a", 0.01, 30), ("b", 0.02, 12)]
    assert network.link("b", "a").bandwidth_bytes_per_s == 1e6  # measured by a, used both ways
    assert network.link("client", "a").rtt_s == 0.01  # the client is assumed to see the median link


def test_only_nodes_of_the_same_partition_with_a_profile_take_part():
    records = [profiled("b", 10.0), profiled("a", 10.0, partition="ring"), profiled("c", 10.0, max_blocks=0)]
    assert [r.node_id for r in participants(records, "pipeline")] == ["b"]


def test_faster_nodes_get_more_blocks_in_a_throughput_plan():
    records = [profiled("fast", 300.0), profiled("slow", 100.0)]
    plan = make_plan(records, "pipeline", 30, 576 * 4)
    blocks = {stage.node_id: stage.num_blocks for stage in plan.stages}
    assert blocks["fast"] > blocks["slow"] and sum(blocks.values()) == 30


def test_recorded_plan_is_kept_unless_clearly_worse_or_stale():
    records = [profiled("a", 100.0), profiled("b", 100.0)]
    best = make_plan(records, "pipeline", 30, 2304)
    nearly = Plan.from_dict({**best.to_dict(), "stages": [{"node_id": "a", "start": 0, "end": 16}, {"node_id": "b", "start": 16, "end": 30}]})
    lopsided = Plan.from_dict({**best.to_dict(), "stages": [{"node_id": "a", "start": 0, "end": 28}, {"node_id": "b", "start": 28, "end": 30}]})
    members = ["a", "b"]
    assert keep_recorded_plan(nearly, members, best, records, 30, 2304, "throughput")
    assert not keep_recorded_plan(lopsided, members, best, records, 30, 2304, "throughput")
    assert not keep_recorded_plan(nearly, members, best, records[:1], 30, 2304, "throughput")  # b has left
    assert not keep_recorded_plan(nearly, ["a"], best, records, 30, 2304, "throughput")  # b has joined
    assert not keep_recorded_plan(None, [], best, records, 30, 2304, "throughput")


def test_only_the_coordinator_the_members_elect_may_record_a_plan():
    members = participants([profiled("b", 100.0), profiled("a", 100.0)], "pipeline")
    plan = make_plan(members, "pipeline", 30, 2304)
    value = {"partition": "pipeline", "plan": plan.to_dict(), "members": ["a", "b"]}
    assert plan_from_record(value, "a", "pipeline", members) == (plan, ["a", "b"])
    assert plan_from_record(value, "b", "pipeline", members) is None  # a participant, but not the elected one
    # an outsider that signs a plan naming itself first is not elected by the members' own ordering
    assert plan_from_record({**value, "members": ["0-outsider", "a", "b"]}, "0-outsider", "pipeline", members) is None
    assert plan_from_record(value, "a", "ring", members) is None  # a plan of another kind
    assert plan_from_record({**value, "plan": {"stages": "x"}}, "a", "pipeline", members) is None  # malformed


def test_the_coordinator_records_a_plan_of_every_participant_and_follows_it():
    records = [profiled("b", 100.0), profiled("a", 300.0), profiled("c", 100.0, partition="ring")]
    round_ = coordination_round(records, "a", None, "pipeline", 30, 2304, "throughput")
    plan = make_plan(participants(records, "pipeline"), "pipeline", 30, 2304)
    assert round_.record == plan_record("pipeline", plan, ["a", "b"])
    [stage] = [stage for stage in plan.stages if stage.node_id == "a"]
    assert round_.span == (stage.start, stage.end)


def test_a_participant_follows_the_coordinators_plan_and_records_none():
    records = [profiled("a", 100.0), profiled("b", 100.0)]
    plan = Plan.from_dict({**make_plan(records, "pipeline", 30, 2304).to_dict(), "stages": [
        {"node_id": "a", "start": 0, "end": 12}, {"node_id": "b", "start": 12, "end": 30},
    ]})
    value = plan_record("pipeline", plan, ["a", "b"])
    assert coordination_round(records, "b", (value, "a"), "pipeline", 30, 2304, "throughput") == (None, (12, 30))
    assert coordination_round(records, "b", None, "pipeline", 30, 2304, "throughput") == (None, None)  # nothing recorded yet
    assert coordination_round(records, "b", (value, "b"), "pipeline", 30, 2304, "throughput") == (None, None)  # not the coordinator's


def test_the_coordinator_keeps_a_good_enough_plan_and_replaces_a_foreign_one():
    records = [profiled("a", 100.0), profiled("b", 100.0)]
    nearly = Plan.from_dict({**make_plan(records, "pipeline", 30, 2304).to_dict(), "stages": [
        {"node_id": "a", "start": 0, "end": 16}, {"node_id": "b", "start": 16, "end": 30},
    ]})
    value = plan_record("pipeline", nearly, ["a", "b"])
    assert coordination_round(records, "a", (value, "a"), "pipeline", 30, 2304, "throughput") == (value, (0, 16))
    best = plan_record("pipeline", make_plan(records, "pipeline", 30, 2304), ["a", "b"])
    assert best != value
    assert coordination_round(records, "a", (value, "b"), "pipeline", 30, 2304, "throughput").record == best  # b may not record


@pytest.mark.slow
@pytest.mark.parametrize("partition", ["pipeline", "ring"])
def test_nodes_follow_the_plan_recorded_in_the_dht(tiny_llama_dir, partition):
    args = ["--model", str(tiny_llama_dir), "--partition", partition, "--rebalance-period", "1"]
    with LocalSwarm([args] * 3) as swarm, SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir)) as client:

        def followed_plan() -> tuple[dict, Plan] | None:
            found = swarm_dht.fetch_value(client.dht, plan_key(client.model.model_id))
            value = found[0] if found else None
            plan = Plan.from_dict(value["plan"]) if value else None
            spans = {(r.node_id, r.start_block, r.end_block) for r in client.servers()}
            # a plan made before the last node announced itself is replaced: wait for one with all three
            if plan and len(value["members"]) == 3 and {(s.node_id, s.start, s.end) for s in plan.stages} <= spans:
                return value, plan
            return None

        value, plan = wait_until(followed_plan, "the nodes serve the spans of a recorded plan of all three", interval=0.5)
        assert value["partition"] == partition
        assert [(s.start, s.end) for s in plan.stages][0][0] == 0 and plan.stages[-1].end == 6
        if partition == "ring":
            assert len(plan.stages) == 3  # a ring uses every node
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        import torch

        prompt = [5, 77, 300, 12]
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, 4:]
        assert client.generate(prompt, max_new_tokens=8).token_ids == until_eos(expected, {2})
