"""What a node announces in the DHT about the blocks it serves, and how that is checked on the way in."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ONLINE = "online"
OFFLINE = "offline"


def servers_key(model_id: str) -> str:
    """The DHT key under which every node serving `model_id` announces itself (one subkey per node)."""
    return f"edgeswarm.v1.{model_id}.servers"


@dataclass(frozen=True)
class ServerRecord:
    """One node's announcement: where it listens and which blocks [start_block, end_block) it serves."""

    node_id: str
    address: str  # host:port of the node's gRPC data plane
    model_id: str
    start_block: int
    end_block: int
    throughput: float  # measured decode tokens/s through one of its blocks
    kv_free_bytes: int
    state: str = ONLINE

    @property
    def num_blocks(self) -> int:
        return self.end_block - self.start_block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any, num_blocks: int) -> ServerRecord:
        """Parses a DHT value, raising ValueError if it is malformed or names blocks the model lacks."""
        if not isinstance(value, dict):
            raise ValueError(f"record is a {type(value).__name__}, not a dict")
        try:
            record = cls(
                node_id=str(value["node_id"]),
                address=str(value["address"]),
                model_id=str(value["model_id"]),
                start_block=int(value["start_block"]),
                end_block=int(value["end_block"]),
                throughput=float(value["throughput"]),
                kv_free_bytes=int(value["kv_free_bytes"]),
                state=str(value.get("state", ONLINE)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed record: {error!r}") from error
        if not 0 <= record.start_block < record.end_block <= num_blocks:
            raise ValueError(f"span {record.start_block}:{record.end_block} outside a model of {num_blocks} blocks")
        if record.state not in (ONLINE, OFFLINE):
            raise ValueError(f"unknown state {record.state!r}")
        if not record.throughput > 0:
            raise ValueError(f"throughput {record.throughput} is not positive")
        return record
