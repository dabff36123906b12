"""A view of the swarm: who serves which blocks, how loaded each node is, and which blocks nobody serves."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import hivemind
from hivemind.utils import get_dht_time

from edgeswarm.partition.coverage import (
    block_coverage,
    block_throughputs,
    coverage_gaps,
)
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.channels import open_channel
from edgeswarm.protocol.constants import ANNOUNCE_TTL
from edgeswarm.protocol.records import ONLINE, ServerRecord, servers_key
from edgeswarm.swarm.dht import fetch_servers, read_latest

logger = logging.getLogger(__name__)

MAX_PARALLEL_QUERIES = 32
NODE_INFO_TIMEOUT = 2.0  # seconds a node may take to answer NodeInfo before it shows as unreachable


class NodeInfoLike(Protocol):
    """The live fields of a `pb.NodeInfoResponse` that the status uses."""

    active_sessions: int
    kv_cache_bytes: int
    rss_bytes: int


@dataclass
class NodeStatus:
    """One node's announcement plus what it reported over NodeInfo (None where it did not answer)."""

    record: ServerRecord
    reachable: bool
    active_sessions: int | None = None
    kv_cache_bytes: int | None = None
    rss_bytes: int | None = None
    last_seen: float | None = None  # seconds since the record was last announced, if known

    @property
    def short_id(self) -> str:
        return self.record.node_id[-8:]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.record.to_dict(),
            "short_id": self.short_id,
            "reachable": self.reachable,
            "active_sessions": self.active_sessions,
            "kv_cache_bytes": self.kv_cache_bytes,
            "rss_bytes": self.rss_bytes,
            "last_seen": self.last_seen,
        }


@dataclass
class SwarmStatus:
    """The swarm serving one model: its online nodes, and per block how many serve it and how fast."""

    model_id: str
    num_blocks: int
    nodes: list[NodeStatus]
    coverage: list[int]  # online nodes serving each block
    block_throughput: list[float]  # their total decode tokens/s through each block
    gaps: list[tuple[int, int]]  # [start, end) runs of blocks served by no online node

    @classmethod
    def from_records(
        cls,
        records: Iterable[ServerRecord],
        num_blocks: int,
        model_id: str,
        node_infos: Mapping[str, NodeInfoLike | None],
        *,
        expirations: Mapping[str, float] | None = None,
        ttl: float | None = None,
        now: float | None = None,
    ) -> SwarmStatus:
        """Builds the status from announced records (offline ones are left out) and their NodeInfo answers.

        `last_seen` is computed when both a record's DHT `expirations` entry and the announcement `ttl` are
        given: the record was stored at expiration - ttl. `now` defaults to the DHT clock.
        """
        online = sorted((r for r in records if r.state == ONLINE), key=lambda r: (r.start_block, r.node_id))
        now = get_dht_time() if now is None else now
        nodes = []
        for record in online:
            expiration = (expirations or {}).get(record.node_id)
            last_seen = None if expiration is None or ttl is None else max(0.0, now - (expiration - ttl))
            nodes.append(_node_status(record, node_infos.get(record.node_id), last_seen))
        return cls(
            model_id=model_id,
            num_blocks=num_blocks,
            nodes=nodes,
            coverage=block_coverage(online, num_blocks),
            block_throughput=block_throughputs(online, num_blocks),
            gaps=coverage_gaps(online, num_blocks),
        )

    @property
    def min_coverage(self) -> int:
        return min(self.coverage, default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "num_blocks": self.num_blocks,
            "nodes": [node.to_json() for node in self.nodes],
            "coverage": list(self.coverage),
            "block_throughput": list(self.block_throughput),
            "gaps": [list(gap) for gap in self.gaps],
            "min_coverage": self.min_coverage,
        }


def _node_status(record: ServerRecord, info: NodeInfoLike | None, last_seen: float | None) -> NodeStatus:
    if info is None:
        return NodeStatus(record, reachable=False, last_seen=last_seen)
    return NodeStatus(
        record,
        reachable=True,
        active_sessions=int(info.active_sessions),
        kv_cache_bytes=int(info.kv_cache_bytes),
        rss_bytes=int(info.rss_bytes),
        last_seen=last_seen,
    )


def query_node_info(record: ServerRecord, timeout: float = NODE_INFO_TIMEOUT) -> pb.NodeInfoResponse | None:
    """The node's NodeInfo answer, or None if it is unreachable or does not answer within `timeout` seconds."""
    try:
        with open_channel(record.address, record.node_id) as channel:
            return pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=timeout)
    except grpc.RpcError as error:
        logger.debug("NodeInfo from %s failed: %r", record.address, error)
        return None


def fetch_node_infos(records: Sequence[ServerRecord], timeout: float = NODE_INFO_TIMEOUT) -> dict[str, pb.NodeInfoResponse | None]:
    """NodeInfo of every record's node, queried concurrently: node id -> answer, or None for a dead node."""
    if not records:
        return {}
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_QUERIES, len(records))) as pool:
        answers = pool.map(lambda record: query_node_info(record, timeout), records)
        return {record.node_id: answer for record, answer in zip(records, answers)}


def fetch_expirations(dht: hivemind.DHT, model_id: str) -> dict[str, float]:
    """DHT expiration time of each node's record for `model_id` (node id -> DHT time)."""
    found = read_latest(dht, servers_key(model_id))
    if found is None or not isinstance(found.value, dict):
        return {}
    return {str(subkey): float(entry.expiration_time) for subkey, entry in found.value.items()}


def collect_status(
    dht: hivemind.DHT, model_id: str, num_blocks: int, ttl: float | None = ANNOUNCE_TTL, timeout: float = NODE_INFO_TIMEOUT
) -> SwarmStatus:
    """Reads the swarm's records from the DHT and asks every node for its live state.

    `ttl` is the nodes' --announce-ttl (ANNOUNCE_TTL unless they were told otherwise), from which `last_seen` is derived.
    """
    records = fetch_servers(dht, model_id, num_blocks)
    return SwarmStatus.from_records(
        records,
        num_blocks,
        model_id,
        fetch_node_infos(records, timeout),
        expirations=fetch_expirations(dht, model_id),
        ttl=ttl,
    )


def coverage_runs(status: SwarmStatus) -> list[tuple[int, int, list[NodeStatus]]]:
    """Maximal runs [start, end) of blocks served by the same nodes, with those nodes (none in a gap)."""
    runs: list[tuple[int, int, list[NodeStatus]]] = []
    for block in range(status.num_blocks):
        nodes = [node for node in status.nodes if node.record.start_block <= block < node.record.end_block]
        if runs and runs[-1][2] == nodes:
            runs[-1] = (runs[-1][0], block + 1, nodes)
        else:
            runs.append((block, block + 1, nodes))
    return runs


def _format_ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}s ago"


def _format_optional(value: int | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.0f}"


def _spans(spans: Iterable[tuple[int, int]]) -> str:
    return ", ".join(f"{start}:{end}" for start, end in spans) or "none"


def render_table(status: SwarmStatus) -> str:
    """A human-readable report: one row per node, the block coverage by run, and a one-line summary."""
    header = ("node", "address", "span", "tok/s", "load", "KV MB", "last seen", "reachable")
    rows = [
        (
            node.short_id,
            node.record.address,
            f"{node.record.start_block}:{node.record.end_block}",
            f"{node.record.throughput:.0f}",
            _format_optional(node.active_sessions),
            _format_optional(node.kv_cache_bytes, 1e6),
            _format_ago(node.last_seen),
            "yes" if node.reachable else "NO",
        )
        for node in status.nodes
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = [f"swarm of {status.model_id} ({status.num_blocks} blocks)", ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines += ["", "block coverage:"]
    for start, end, nodes in coverage_runs(status):
        if not nodes:
            lines.append(f"  GAP blocks {start}:{end} served by no node")
            continue
        names = " ".join(node.short_id for node in nodes)
        throughput = status.block_throughput[start]  # the same over the run, which has the same nodes
        warning = "" if any(node.reachable for node in nodes) else "  (no node answers)"
        lines.append(f"  blocks {start}:{end}  x{len(nodes)}  (throughput {throughput:.0f} tok/s)  {names}{warning}")
    unreachable = sum(not node.reachable for node in status.nodes)
    summary = (
        f"{len(status.nodes)} nodes, {status.num_blocks} blocks, min coverage {status.min_coverage}, "
        f"gaps: {_spans(status.gaps)}, unreachable: {unreachable}"
    )
    lines += ["", summary]
    return "\n".join(lines)


def plot_status(status: SwarmStatus, path: str) -> None:
    """Draws each node's span over the blocks and the coverage per block (gaps in red), as a PNG at `path`."""
    from matplotlib.figure import (
        Figure,  # renders with Agg, without pyplot's global state
    )

    rows = max(len(status.nodes), 1)
    figure = Figure(figsize=(10, 2.5 + 0.45 * rows))
    spans_axis, coverage_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [rows, 2.5]})
    for row, node in enumerate(status.nodes):
        color = "tab:blue" if node.reachable else "tab:gray"
        spans_axis.barh(row, node.record.num_blocks, left=node.record.start_block, height=0.6, color=color, edgecolor="black")
    labels = [f"{node.short_id} {node.record.address}\n{node.record.throughput:.0f} tok/s" for node in status.nodes]
    spans_axis.set_yticks(range(len(status.nodes)), labels, fontsize=8)
    spans_axis.set_ylim(rows - 0.5, -0.5)
    spans_axis.set_title(
        f"{status.model_id}: {len(status.nodes)} nodes, min coverage {status.min_coverage}, gaps: {_spans(status.gaps)}"
        "  (gray: unreachable)"
    )
    coverage_axis.bar(range(status.num_blocks), status.coverage, width=1.0, align="edge", color="tab:green", edgecolor="black")
    coverage_axis.set_ylabel("nodes per block")
    coverage_axis.set_xlabel("block")
    coverage_axis.set_ylim(0, max(status.coverage, default=0) + 1)
    coverage_axis.yaxis.get_major_locator().set_params(integer=True)
    for axis in (spans_axis, coverage_axis):
        for start, end in status.gaps:
            axis.axvspan(start, end, color="red", alpha=0.3)
        axis.set_xlim(0, status.num_blocks)
        axis.grid(axis="x", alpha=0.3)
    for start, end in status.gaps:
        coverage_axis.text((start + end) / 2, 0.5, "GAP", color="red", ha="center", va="center", fontweight="bold")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
