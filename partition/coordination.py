"""A swarm-wide placement plan: computed by one node from everyone's profile, recorded in the DHT, followed by all.

Nodes started with `--partition pipeline` or `--partition ring` take part. The coordinator is the one
with the smallest node id among them (no election is needed: every node reads the same records), and
each participant accepts a plan only when the coordinator of its own view signed it. Each
rebalancing period it plans from the announced profiles and stores the plan under
`edgeswarm.v1.<model>.plan`, keeping the previous plan unless the nodes changed or the new one is
clearly better; every participant moves to the stage the plan gives it. `coordination_round` is one
node's part in a period, given what it read from the DHT; node.plan_coordination does the reading and
the storing.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import NamedTuple

from edgeswarm.partition.planner import (
    CLIENT,
    Link,
    NetworkProfile,
    NodeProfile,
    Plan,
    evaluate_plan,
    plan_pipeline,
    plan_ring,
)
from edgeswarm.protocol.records import ServerRecord

logger = logging.getLogger(__name__)

# Keep the recorded plan unless a new one predicts at least this much improvement (avoids churn from
# measurement noise: every move costs loading weights).
MIN_PLAN_GAIN = 1.2
# Assumed client link when nothing is measured: a LAN.
DEFAULT_LINK = Link(bandwidth_bytes_per_s=100e6 / 8, rtt_s=0.002)


def plan_key(model_id: str) -> str:
    """The DHT key the plan of `model_id`'s swarm is recorded under."""
    return f"edgeswarm.v1.{model_id}.plan"


def participants(records: Sequence[ServerRecord], partition: str) -> list[ServerRecord]:
    """The online nodes placed by a plan of kind `partition`, with a complete profile."""
    return sorted(
        (r for r in records if r.partition == partition and r.max_blocks > 0 and r.memory_bytes > 0),
        key=lambda record: record.node_id,
    )


def profiles_from_records(records: Sequence[ServerRecord]) -> tuple[list[NodeProfile], NetworkProfile]:
    """Planner inputs from announced records; the client's links are assumed to be the median measured one."""
    profiles = [
        NodeProfile(
            node_id=record.node_id,
            decode_seconds_per_block=1.0 / record.throughput,
            prefill_seconds_per_token_block=1.0 / record.prefill_throughput if record.prefill_throughput else 0.0,
            max_blocks=record.max_blocks,
            memory_bytes=record.memory_bytes,
        )
        for record in records
    ]
    links = {
        (record.node_id, peer): Link(bandwidth_bytes_per_s=bandwidth, rtt_s=rtt)
        for record in records
        for peer, (bandwidth, rtt) in record.links.items()
    }
    default = DEFAULT_LINK
    if links:
        default = Link(
            bandwidth_bytes_per_s=statistics.median(link.bandwidth_bytes_per_s for link in links.values()),
            rtt_s=statistics.median(link.rtt_s for link in links.values()),
        )
    for record in records:
        links.setdefault((CLIENT, record.node_id), default)
    return profiles, NetworkProfile(links, default)


def make_plan(
    records: Sequence[ServerRecord], partition: str, num_blocks: int, activation_bytes: int, objective: str = "throughput"
) -> Plan:
    """The plan of kind `partition` ("pipeline" or "ring") for the nodes of `records`."""
    profiles, network = profiles_from_records(records)
    if partition == "pipeline":
        return plan_pipeline(profiles, network, num_blocks, activation_bytes, objective)
    if partition == "ring":
        return plan_ring(profiles, num_blocks, network, activation_bytes)
    raise ValueError(f"no plan for partition {partition!r}")


def plan_record(partition: str, plan: Plan, members: Sequence[str]) -> dict:
    """The DHT value recording `plan` of kind `partition`, made for the participants `members` (node ids)."""
    return {"partition": partition, "plan": plan.to_dict(), "members": list(members)}


def plan_from_record(value: dict, signer: str, partition: str, members: Sequence[ServerRecord]) -> tuple[Plan, list[str]] | None:
    """The plan in a recorded DHT value and the node ids it was made for, if it is of `partition` and was
    signed by the coordinator that `members` (the participants this node sees) elect; else None."""
    if not members or signer != members[0].node_id or value.get("partition") != partition:
        return None
    try:
        return Plan.from_dict(value["plan"]), [str(member) for member in value["members"]]
    except (KeyError, TypeError, ValueError):
        return None


def keep_recorded_plan(
    recorded: Plan | None,
    recorded_members: Sequence[str],
    new: Plan,
    records: Sequence[ServerRecord],
    num_blocks: int,
    activation_bytes: int,
    objective: str,
) -> bool:
    """Whether the recorded plan should stay: made for the same participants (`records`), still valid, and
    not clearly worse than `new`. A node joining or leaving always brings a new plan."""
    if recorded is None or sorted(recorded_members) != sorted(r.node_id for r in records):
        return False
    profiles, network = profiles_from_records(records)
    try:
        current = evaluate_plan(recorded.stages, profiles, network, activation_bytes, num_blocks=num_blocks)
    except ValueError:
        return False
    if objective == "latency":
        return current.predicted_token_seconds <= new.predicted_token_seconds * MIN_PLAN_GAIN
    return current.predicted_throughput * MIN_PLAN_GAIN >= new.predicted_throughput


class PlanRound(NamedTuple):
    """What one node does in a round of coordination."""

    record: dict | None  # the value to store under plan_key: only the coordinator records one
    span: tuple[int, int] | None  # the blocks (start, end) the followed plan gives this node; None: none


def coordination_round(
    records: Sequence[ServerRecord],
    node_id: str,
    found: tuple[dict, str] | None,
    partition: str,
    num_blocks: int,
    activation_bytes: int,
    objective: str,
) -> PlanRound:
    """Node `node_id`'s round, from the announced `records` and `found`, the recorded plan value and its
    signer (None: nothing recorded). A recorded plan counts only if the coordinator that the participants
    elect signed it. The coordinator (the participant with the smallest id) makes a plan and records it,
    or the recorded one again while that one stays (`keep_recorded_plan`); every node follows its stage
    in the plan that counts."""
    members = participants(records, partition)
    recorded = found and plan_from_record(found[0], found[1], partition, members)
    if found and not recorded:
        logger.warning(
            "ignoring the recorded plan signed by %s: not a well-formed %s plan of the elected coordinator", found[1], partition
        )
    plan, plan_members = recorded or (None, [])
    record = None
    if members and members[0].node_id == node_id:
        new = make_plan(members, partition, num_blocks, activation_bytes, objective)
        if not keep_recorded_plan(plan, plan_members, new, members, num_blocks, activation_bytes, objective):
            plan, plan_members = new, [member.node_id for member in members]
            logger.info("recording a new %s plan: %s", partition, new.to_dict())
        record = plan_record(partition, plan, plan_members)
    stage = next((stage for stage in plan.stages if stage.node_id == node_id), None) if plan else None
    return PlanRound(record, None if stage is None else (stage.start, stage.end))
