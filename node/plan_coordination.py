"""A node's part in the swarm-wide plan (`--partition pipeline|ring`): it reads the recorded plan from the
DHT, records one when it is the elected coordinator, and learns its stage. What to record and follow is
decided by partition.coordination; this module reads and writes the DHT."""

from __future__ import annotations

import hivemind

from edgeswarm.model.sources import ModelSource
from edgeswarm.node.config import PlacementConfig
from edgeswarm.partition.coordination import coordination_round, plan_key
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm import dht as swarm_dht

PLAN_TTL_PERIODS = 3  # a recorded plan lives this many rebalancing periods, so it outlasts a round its coordinator misses
ACTIVATION_VALUE_BYTES = 4  # the planner prices activations as float32 values on the links


def planned_span(dht: hivemind.DHT, model: ModelSource, placement: PlacementConfig, own: ServerRecord) -> tuple[int, int] | None:
    """This node's stage (start, end) in the recorded plan, after recording a plan if this node coordinates;
    None when no plan gives it one. `own` is this node's current record (its latest profile and links)."""
    records = swarm_dht.fetch_servers(dht, model.model_id, model.num_blocks)
    records = [own if record.node_id == own.node_id else record for record in records]
    key = plan_key(model.model_id)
    round_ = coordination_round(
        records,
        own.node_id,
        swarm_dht.fetch_value(dht, key),
        placement.partition,
        model.num_blocks,
        model.config.hidden_size * ACTIVATION_VALUE_BYTES,
        placement.plan_objective,
    )
    if round_.record is not None:
        swarm_dht.store_value(dht, key, round_.record, PLAN_TTL_PERIODS * placement.rebalance_period)
    return round_.span
