"""Heterogeneity-aware planners: which nodes serve which contiguous span of blocks, and in what order.

Cost model (`evaluate_plan`), for one decode step of one token through a pipeline of stages:

* compute of a stage = its blocks * the node's decode_seconds_per_block;
* a hop = rtt + activation_bytes_per_token / bandwidth, from the client into the first stage, between
  consecutive stages, and from the last stage back to the client;
* predicted_token_seconds = the sum of every compute and hop time (one session, nothing overlaps);
* predicted_throughput = 1 / the slowest stage compute or hop wire time (bytes / bandwidth, without RTT):
  with many sessions in flight the stages and links work in parallel and the slowest one sets the rate.

Planners: `plan_pipeline` (exact search over nodes, order and spans), `plan_ring` (every node in a ring,
spans proportional to memory and speed) and `memory_proportional_plan` (the naive memory-only baseline).
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

CLIENT = "client"
"""The pseudo node id of the client in a `NetworkProfile`."""

EXACT_NODE_LIMIT = 10
"""`plan_pipeline` searches exactly over at most this many nodes."""

OBJECTIVES = ("latency", "throughput")

_TOLERANCE = 1e-9  # relative slack when comparing against the optimal bottleneck


@dataclass(frozen=True)
class NodeProfile:
    """What a node announces for planning: its speed, how many blocks fit, and its free memory."""

    node_id: str
    decode_seconds_per_block: float
    prefill_seconds_per_token_block: float
    max_blocks: int
    memory_bytes: int

    def __post_init__(self) -> None:
        if not self.node_id or self.node_id == CLIENT:
            raise ValueError(f"invalid node id {self.node_id!r}")
        if self.decode_seconds_per_block <= 0 or self.prefill_seconds_per_token_block < 0:
            raise ValueError(f"node {self.node_id}: decode time must be positive and prefill time non-negative")
        if self.max_blocks < 1 or self.memory_bytes <= 0:
            raise ValueError(f"node {self.node_id}: needs room for at least one block and positive free memory")


@dataclass(frozen=True)
class Link:
    """A network path between two endpoints."""

    bandwidth_bytes_per_s: float
    rtt_s: float

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s <= 0 or self.rtt_s < 0:
            raise ValueError(f"invalid link {self}: bandwidth must be positive and RTT non-negative")

    def wire_seconds(self, num_bytes: float) -> float:
        """Seconds to push `num_bytes` through the link, without the round trip."""
        return num_bytes / self.bandwidth_bytes_per_s

    def transfer_seconds(self, num_bytes: float) -> float:
        """Seconds for one message of `num_bytes`: the round trip plus the wire time."""
        return self.rtt_s + self.wire_seconds(num_bytes)


class NetworkProfile:
    """Symmetric links between nodes and between the client (`CLIENT`) and nodes, with a default for missing pairs."""

    def __init__(self, links: Mapping[tuple[str, str], Link], default: Link) -> None:
        self._links = dict(links)
        self.default = default

    def link(self, a: str, b: str) -> Link:
        """The link between `a` and `b`, looked up in both directions, else the default."""
        for pair in ((a, b), (b, a)):
            if pair in self._links:
                return self._links[pair]
        return self.default


@dataclass(frozen=True)
class Stage:
    """Node `node_id` serves blocks [start, end)."""

    node_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"stage {self}: needs 0 <= start < end")

    @property
    def num_blocks(self) -> int:
        """How many blocks the stage serves."""
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order covering every block, with the cost model's predictions."""

    stages: tuple[Stage, ...]
    predicted_token_seconds: float
    predicted_throughput: float

    def to_dict(self) -> dict:
        """Plain dicts, lists, strings and numbers (msgpack- and JSON-friendly)."""
        return {
            "stages": [{"node_id": s.node_id, "start": s.start, "end": s.end} for s in self.stages],
            "predicted_token_seconds": self.predicted_token_seconds,
            "predicted_throughput": self.predicted_throughput,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        """The inverse of `to_dict`."""
        stages = tuple(Stage(str(s["node_id"]), int(s["start"]), int(s["end"])) for s in d["stages"])
        return cls(stages, float(d["predicted_token_seconds"]), float(d["predicted_throughput"]))


def evaluate_plan(
    stages: Iterable[Stage],
    profiles: Sequence[NodeProfile],
    network: NetworkProfile,
    activation_bytes_per_token: float,
    *,
    num_blocks: int | None = None,
) -> Plan:
    """Validates `stages` and predicts their per-token latency and throughput with the module's cost model.

    Raises ValueError unless the stages are contiguous from block 0 (to `num_blocks`, when given), use known
    nodes at most once each, and stay within every node's max_blocks.
    """
    stages = tuple(stages)
    by_id = _by_node_id(profiles)
    _validate_stages(stages, by_id, num_blocks)
    if activation_bytes_per_token < 0:
        raise ValueError("activation_bytes_per_token must be non-negative")
    computes = [stage.num_blocks * by_id[stage.node_id].decode_seconds_per_block for stage in stages]
    route = [CLIENT, *(stage.node_id for stage in stages), CLIENT]
    links = [network.link(a, b) for a, b in zip(route, route[1:])]
    token_seconds = sum(computes) + sum(link.transfer_seconds(activation_bytes_per_token) for link in links)
    slowest = max(computes + [link.wire_seconds(activation_bytes_per_token) for link in links])
    return Plan(stages, token_seconds, 1.0 / slowest)


def plan_pipeline(
    profiles: Sequence[NodeProfile],
    network: NetworkProfile,
    num_blocks: int,
    activation_bytes_per_token: float,
    objective: str = "latency",
) -> Plan:
    """The best pipeline: which nodes to use, in which order, and how many blocks each serves.

    "latency" minimises one session's per-token latency; "throughput" maximises tokens/s over many sessions
    and, among the plans that reach it, takes the one with the lowest latency. Nodes may be left out.

    The cost model splits into two independent parts: hop costs depend only on the order of the used nodes,
    compute costs only on how many blocks each used node serves. So for every set of nodes (a bitmask) the
    search takes the best order from a Held-Karp DP over (set, last node) and the best spans from a greedy
    allocation, then keeps the best set; see `_PipelineSearch`. This is exact and costs O(2^n * n^2 + 2^n * B log n)
    for n nodes and B blocks. With more than EXACT_NODE_LIMIT nodes it is a heuristic: only the
    EXACT_NODE_LIMIT fastest nodes (by decode time, links ignored) are searched, the smallest of them being
    swapped for the largest left-out nodes while they cannot hold the whole model.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    _check_capacity(profiles, num_blocks)
    candidates = sorted(_candidates(profiles, num_blocks, EXACT_NODE_LIMIT), key=lambda p: p.node_id)
    search = _PipelineSearch(candidates, network, num_blocks, activation_bytes_per_token)
    limit = search.best_bottleneck() if objective == "throughput" else math.inf
    stages = search.fastest_stages(limit)
    return evaluate_plan(stages, profiles, network, activation_bytes_per_token, num_blocks=num_blocks)


def plan_ring(
    profiles: Sequence[NodeProfile],
    num_blocks: int,
    network: NetworkProfile,
    activation_bytes_per_token: float,
    memory_weight: float = 0.5,
) -> Plan:
    """Every node in one ring (LinguaLinked/exo style), in node_id order, spans proportional to a weight.

    weight = memory_weight * the node's share of total memory + (1 - memory_weight) * its share of total speed
    (1 / decode_seconds_per_block); exo uses memory alone (memory_weight=1). Spans follow Hamilton's
    largest-remainder method: every node gets at least one block when there are at least as many blocks as
    nodes, none gets more than max_blocks (the excess goes to the others in proportion to their weights),
    and remainder ties go to the node earlier in the ring. Nodes left with no block have no stage.
    """
    if not 0 <= memory_weight <= 1:
        raise ValueError(f"memory_weight must be within [0, 1], not {memory_weight}")
    _check_capacity(profiles, num_blocks)
    ring = sorted(profiles, key=lambda p: p.node_id)
    memory = _shares([Fraction(p.memory_bytes) for p in ring])
    speed = _shares([1 / Fraction(p.decode_seconds_per_block) for p in ring])
    mix = Fraction(memory_weight)
    weights = [mix * m + (1 - mix) * s for m, s in zip(memory, speed)]
    counts = _largest_remainder(weights, num_blocks, [p.max_blocks for p in ring])
    stages = _consecutive_stages([p.node_id for p in ring], counts)
    return evaluate_plan(stages, profiles, network, activation_bytes_per_token, num_blocks=num_blocks)


def memory_proportional_plan(
    profiles: Sequence[NodeProfile], num_blocks: int, network: NetworkProfile, activation_bytes_per_token: float
) -> Plan:
    """The naive baseline: all nodes in node_id order, spans proportional to free memory alone (within max_blocks)."""
    return plan_ring(profiles, num_blocks, network, activation_bytes_per_token, memory_weight=1.0)


def ring_route(plan: Plan, entry_node_id: str) -> list[Stage]:
    """The stages of `plan`'s ring rotated so that a session entering at `entry_node_id` starts there.

    A session must run blocks 0..N-1 in order, so it cannot start at whatever span its entry node holds
    mid-ring. Instead the ring is rotated: the entry node takes block 0 and the other nodes follow it in
    ring order (wrapping around), each keeping its span length, so max_blocks still holds and the last
    stage is the entry node's predecessor, which closes the ring back to the entry. Because a node keeps a
    span once it has loaded its weights, this is a placement for a known entry node (e.g. the device the user
    is at), applied when the ring is (re)partitioned, not a per-request detour. Pass the result to
    `evaluate_plan` for its predictions.
    """
    node_ids = [stage.node_id for stage in plan.stages]
    if entry_node_id not in node_ids:
        raise ValueError(f"node {entry_node_id} holds no blocks in this plan")
    first = node_ids.index(entry_node_id)
    rotated = plan.stages[first:] + plan.stages[:first]
    return _consecutive_stages([s.node_id for s in rotated], [s.num_blocks for s in rotated])


class _PipelineSearch:
    """Precomputed costs for a set of candidate nodes, and the exact searches over them.

    Index i < n is candidate i and index n is the client, in the hop matrices.
    """

    def __init__(
        self, nodes: Sequence[NodeProfile], network: NetworkProfile, num_blocks: int, activation_bytes: float
    ) -> None:
        self.nodes = list(nodes)
        self.num_blocks = num_blocks
        self.decode = [p.decode_seconds_per_block for p in nodes]
        self.caps = [min(p.max_blocks, num_blocks) for p in nodes]
        self.by_speed = sorted(range(len(nodes)), key=lambda i: self.decode[i])
        ids = [p.node_id for p in nodes] + [CLIENT]
        links = [[network.link(a, b) for b in ids] for a in ids]
        self.hop_seconds = [[link.transfer_seconds(activation_bytes) for link in row] for row in links]
        self.hop_wire = [[link.wire_seconds(activation_bytes) for link in row] for row in links]

    def best_bottleneck(self) -> float:
        """The smallest achievable slowest-stage-or-hop time, i.e. 1 / the best throughput."""
        orders = _best_orders(self.hop_wire, max)
        return min(
            (max(route_cost, self._min_slowest_compute(mask)) for mask, (route_cost, _) in orders.items()),
            default=math.inf,
        )

    def fastest_stages(self, limit: float) -> list[Stage]:
        """The lowest-latency stages whose every stage compute and hop wire time is within `limit`."""
        slack = limit * (1 + _TOLERANCE)
        caps = [_blocks_within(slack, d, cap) for d, cap in zip(self.decode, self.caps)]
        hops = [
            [seconds if wire <= slack else math.inf for seconds, wire in zip(row_seconds, row_wire)]
            for row_seconds, row_wire in zip(self.hop_seconds, self.hop_wire)
        ]
        best: tuple[float, list[int], dict[int, int]] | None = None
        for mask, (route_cost, order) in _best_orders(hops, operator.add).items():
            counts = self._min_total_compute(mask, caps)
            if counts is not None:
                latency = route_cost + sum(count * self.decode[i] for i, count in counts.items())
                if best is None or latency < best[0]:
                    best = (latency, order, counts)
        if best is None:
            raise ValueError(f"no pipeline of nodes {[p.node_id for p in self.nodes]} can hold the model")
        _, order, counts = best
        return _consecutive_stages([self.nodes[i].node_id for i in order], [counts[i] for i in order])

    def _members(self, mask: int) -> list[int]:
        return [i for i in self.by_speed if mask >> i & 1]

    def _min_total_compute(self, mask: int, caps: Sequence[int]) -> dict[int, int] | None:
        """Blocks per member minimising total compute (one each, then fastest first up to caps); None if impossible."""
        members = self._members(mask)
        if any(caps[i] < 1 for i in members) or len(members) > self.num_blocks:
            return None
        counts = dict.fromkeys(members, 1)
        remaining = self.num_blocks - len(members)
        for i in members:
            extra = min(caps[i] - 1, remaining)
            counts[i] += extra
            remaining -= extra
        return counts if remaining == 0 else None

    def _min_slowest_compute(self, mask: int) -> float:
        """The smallest possible slowest-stage compute time of the members (inf if they cannot hold the model).

        Greedy: one block each, then every further block to the member that would finish it soonest; since
        each member's times grow with its blocks, this picks the smallest possible times and is optimal.
        """
        members = self._members(mask)
        if len(members) > self.num_blocks or sum(self.caps[i] for i in members) < self.num_blocks:
            return math.inf
        counts = dict.fromkeys(members, 1)
        slowest = max(self.decode[i] for i in members)
        heap = [(2 * self.decode[i], i) for i in members if self.caps[i] > 1]
        heapq.heapify(heap)
        for _ in range(self.num_blocks - len(members)):
            seconds, i = heapq.heappop(heap)
            counts[i] += 1
            slowest = max(slowest, seconds)
            if counts[i] < self.caps[i]:
                heapq.heappush(heap, ((counts[i] + 1) * self.decode[i], i))
        return slowest


def _best_orders(
    hops: Sequence[Sequence[float]], combine: Callable[[float, float], float]
) -> dict[int, tuple[float, list[int]]]:
    """Held-Karp: for every set of nodes (bitmask), the cheapest order visiting all of them, client to client.

    `hops[a][b]` is the cost of the hop a -> b, the last index being the client; a route's cost folds its
    hops with `combine` (operator.add for latency, max for the bottleneck). Sets with no finite route are absent.
    """
    n = len(hops) - 1
    cost = [[math.inf] * n for _ in range(1 << n)]
    previous = [[-1] * n for _ in range(1 << n)]
    for i in range(n):
        cost[1 << i][i] = hops[n][i]
    for mask in range(1, 1 << n):  # every set comes before its supersets
        for last in range(n):
            here = cost[mask][last]
            if here == math.inf:
                continue
            for following in range(n):
                if mask >> following & 1:
                    continue
                grown = mask | 1 << following
                candidate = combine(here, hops[last][following])
                if candidate < cost[grown][following]:
                    cost[grown][following] = candidate
                    previous[grown][following] = last
    orders = {}
    for mask in range(1, 1 << n):
        total, last = min((combine(cost[mask][i], hops[i][n]), i) for i in range(n) if mask >> i & 1)
        if total < math.inf:
            orders[mask] = (total, _walk_back(previous, mask, last))
    return orders


def _walk_back(previous: Sequence[Sequence[int]], mask: int, last: int) -> list[int]:
    order = []
    while last != -1:
        order.append(last)
        mask, last = mask ^ (1 << last), previous[mask][last]
    return order[::-1]


def _blocks_within(seconds: float, decode_seconds_per_block: float, cap: int) -> int:
    """How many blocks (at most `cap`) a node computes within `seconds`."""
    if seconds == math.inf:
        return cap
    return min(cap, math.floor(seconds / decode_seconds_per_block))


def _candidates(profiles: Sequence[NodeProfile], num_blocks: int, limit: int) -> list[NodeProfile]:
    """All nodes if at most `limit`, else the `limit` fastest, larger ones swapped in until they can hold the model."""
    ranked = sorted(profiles, key=lambda p: (p.decode_seconds_per_block, p.node_id))
    chosen = ranked[:limit]
    spare = sorted(ranked[limit:], key=lambda p: p.max_blocks)
    while spare and sum(min(p.max_blocks, num_blocks) for p in chosen) < num_blocks:
        smallest = min(chosen, key=lambda p: p.max_blocks)
        if spare[-1].max_blocks <= smallest.max_blocks:
            break
        chosen[chosen.index(smallest)] = spare.pop()
    return chosen


def _by_node_id(profiles: Iterable[NodeProfile]) -> dict[str, NodeProfile]:
    by_id: dict[str, NodeProfile] = {}
    for profile in profiles:
        if profile.node_id in by_id:
            raise ValueError(f"node {profile.node_id} is profiled twice")
        by_id[profile.node_id] = profile
    return by_id


def _check_capacity(profiles: Sequence[NodeProfile], num_blocks: int) -> None:
    _by_node_id(profiles)
    if num_blocks < 1:
        raise ValueError(f"a model needs at least one block, not {num_blocks}")
    capacity = sum(p.max_blocks for p in profiles)
    if capacity < num_blocks:
        raise ValueError(f"the nodes can hold {capacity} blocks in total, the model has {num_blocks}")


def _validate_stages(stages: Sequence[Stage], by_id: Mapping[str, NodeProfile], num_blocks: int | None) -> None:
    if not stages:
        raise ValueError("a plan needs at least one stage")
    covered = 0
    used: set[str] = set()
    for stage in stages:
        if stage.node_id not in by_id:
            raise ValueError(f"stage {stage}: unknown node")
        if stage.node_id in used:
            raise ValueError(f"node {stage.node_id} serves more than one stage")
        if stage.start != covered:
            raise ValueError(f"stage {stage} starts at block {stage.start}, expected {covered} (a gap or an overlap)")
        if stage.num_blocks > by_id[stage.node_id].max_blocks:
            raise ValueError(f"stage {stage} exceeds the node's max_blocks {by_id[stage.node_id].max_blocks}")
        used.add(stage.node_id)
        covered = stage.end
    if num_blocks is not None and covered != num_blocks:
        raise ValueError(f"the stages cover blocks 0:{covered}, the model has {num_blocks}")


def _consecutive_stages(node_ids: Sequence[str], counts: Sequence[int]) -> list[Stage]:
    """Stages taking `counts` blocks in turn from block 0; nodes with no block get no stage."""
    stages = []
    start = 0
    for node_id, count in zip(node_ids, counts):
        if count:
            stages.append(Stage(node_id, start, start + count))
            start += count
    return stages


def _shares(values: Sequence[Fraction]) -> list[Fraction]:
    total = sum(values)
    return [value / total for value in values]


def _largest_remainder(weights: Sequence[Fraction], total: int, caps: Sequence[int]) -> list[int]:
    """Splits `total` in proportion to `weights` within [1 (if total >= len(weights), else 0), cap] (Hamilton's method).

    Quotas are clamped into the bounds with the excess shared in proportion, rounded down, and the leftover
    units go to the largest remainders (ties to the lower index). Requires sum(caps) >= total.
    """
    low = 1 if total >= len(weights) else 0
    quotas = _clamped_quotas(weights, total, low, [min(cap, total) for cap in caps])
    counts = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])  # stable: ties keep index order
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _clamped_quotas(weights: Sequence[Fraction], total: int, low: int, caps: Sequence[int]) -> list[Fraction]:
    """Quotas scale * weight clamped into [low, cap], with the scale chosen (exactly) so that they sum to `total`.

    The clamped sum grows piecewise linearly with the scale, bending where a quota reaches a bound, so the
    scale is interpolated between the two breakpoints around `total`.
    """

    def clamped(scale: Fraction) -> list[Fraction]:
        return [min(max(scale * weight, Fraction(low)), Fraction(cap)) for weight, cap in zip(weights, caps)]

    breakpoints = sorted({Fraction(0), *(bound / w for w, cap in zip(weights, caps) for bound in (low, cap))})
    upper = next(scale for scale in breakpoints if sum(clamped(scale)) >= total)
    reached = sum(clamped(upper))
    if reached == total:
        return clamped(upper)
    lower = max(scale for scale in breakpoints if scale < upper)
    below = sum(clamped(lower))
    return clamped(lower + (upper - lower) * (total - below) / (reached - below))
