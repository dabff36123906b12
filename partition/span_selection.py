"""Which blocks a joining node takes when it is not told: the least-covered window (as Petals does),
with claims so that nodes starting at the same moment do not all take the same one.

Nodes that start together all read a DHT where none of them is announced yet, and the least-covered
window is the same for each: without more, all would load the first blocks and leave the rest to
rebalancing, which is slow (a period of a minute) and collides again when two nodes move into the
same gap at once. So before loading its weights a node *claims* its window: it stores a `SpanClaim`
(signed, with a short TTL) under `claims_key`, after a short random delay that spreads the choices,
and counts the claims of the nodes still loading as (thin) coverage when it chooses. Two nodes that
chose at the same instant both claim; each re-reads the claims a moment later, and the claim that
came first (`claim_order`) keeps its window while the other chooses again with it counted. Once a node
announces its record, its claim no longer counts. Claims are coordination only: a node that cannot
see a claim (a DHT not joined yet) still starts, and rebalancing repairs what is left.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgeswarm.partition.coverage import block_throughputs
from edgeswarm.protocol.records import ServerRecord


def claims_key(model_id: str) -> str:
    """The DHT key under which nodes about to load blocks of `model_id` claim them (one subkey per node)."""
    return f"edgeswarm.v1.{model_id}.claims"


@dataclass(frozen=True)
class SpanClaim:
    """A node's word that it is loading blocks [start_block, end_block), made at `claimed_at` (DHT time)."""

    node_id: str
    start_block: int
    end_block: int
    claimed_at: float

    @property
    def span(self) -> tuple[int, int]:
        return self.start_block, self.end_block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any, num_blocks: int) -> SpanClaim:
        """Parses a DHT value, raising ValueError if it is malformed or names blocks the model lacks."""
        try:
            claim = cls(str(value["node_id"]), int(value["start_block"]), int(value["end_block"]), float(value["claimed_at"]))
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"malformed claim: {error!r}") from error
        if not 0 <= claim.start_block < claim.end_block <= num_blocks:
            raise ValueError(f"claim of blocks {claim.start_block}:{claim.end_block} outside the model's 0:{num_blocks}")
        return claim


def claim_order(claim: SpanClaim) -> tuple[float, str]:
    """The order in which claims hold: earliest first, the node id breaking ties (every node agrees on it)."""
    return claim.claimed_at, claim.node_id


def _standing_claims(claims: Iterable[SpanClaim], records: Iterable[ServerRecord], me: str, mine: SpanClaim | None) -> list[SpanClaim]:
    """The claims node `me` must respect: other nodes' that are not announced yet (an announced node's
    record counts instead) and, once `me` has claimed (`mine`), only those made before its own."""
    announced = {record.node_id for record in records}
    return [
        claim for claim in claims
        if claim.node_id != me and claim.node_id not in announced and (mine is None or claim_order(claim) < claim_order(mine))
    ]


def settle_claim(
    records: Sequence[ServerRecord], claims: Iterable[SpanClaim], me: str, mine: SpanClaim | None, num_blocks: int, span_length: int
) -> tuple[int, int] | None:
    """One round of claiming for node `me`, which has claimed `mine` so far (None: nothing yet): the window
    to claim now, or None when `mine` stands (no earlier claim makes another window the least covered)."""
    span = choose_least_covered_span(records, num_blocks, span_length, _standing_claims(claims, records, me, mine))
    return None if mine is not None and span == mine.span else span


def choose_least_covered_span(
    records: Iterable[ServerRecord], num_blocks: int, span_length: int, claims: Sequence[SpanClaim] = ()
) -> tuple[int, int]:
    """The window of `span_length` blocks whose weakest blocks are weakest.

    Each block is weighed by (announced throughput, claims on it), and windows are compared on their
    sorted weights: gaps (zero throughput) come first, unclaimed gaps before claimed ones, then the
    thinnest coverage; among equal windows the earliest wins, so an empty swarm fills from block 0 upward.
    """
    if not 0 < span_length <= num_blocks:
        raise ValueError(f"cannot take {span_length} blocks of a model with {num_blocks}")
    claimed = [0] * num_blocks
    for claim in claims:
        for block in range(claim.start_block, claim.end_block):
            claimed[block] += 1
    weights = list(zip(block_throughputs(records, num_blocks), claimed))
    windows = ((sorted(weights[start : start + span_length]), start) for start in range(num_blocks - span_length + 1))
    start = min(windows)[1]
    return start, start + span_length

