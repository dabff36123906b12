"""What a node announces in the DHT about the blocks it serves, and how that is checked on the way in."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ONLINE = "online"
OFFLINE = "offline"
PARTITIONS = ("auto", "pipeline", "ring")
MAX_LINKS = 256  # a record lists at most this many measured links
MAX_CODECS = 32
MAX_CERT_CHARS = 8192


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
    # the node's profile, for the planners (0 means not measured)
    prefill_throughput: float = 0.0  # prefill tokens/s through one of its blocks
    max_blocks: int = 0  # how many blocks fit in its memory
    memory_bytes: int = 0  # free memory when it joined
    partition: str = "auto"  # how it is placed: least-covered ("auto") or by a swarm-wide plan
    links: dict[str, list[float]] = field(default_factory=dict)  # peer node id -> [bytes/s, RTT seconds]
    codecs: tuple[str, ...] = ("none",)  # activation codecs it reads and writes (see protocol.codecs)
    semantic_basis: str = ""  # digest of its semantic codec basis, if it holds one
    weight_quant: str = "none"  # how it holds its weights (see model.quantization)
    tls_cert: str = ""  # PEM certificate of its TLS endpoint, bound to its identity ("" : plaintext gRPC)

    @property
    def num_blocks(self) -> int:
        return self.end_block - self.start_block

    def to_dict(self) -> dict[str, Any]:
        value = asdict(self)
        value["codecs"] = list(self.codecs)
        return value

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
                prefill_throughput=float(value.get("prefill_throughput", 0.0)),
                max_blocks=int(value.get("max_blocks", 0)),
                memory_bytes=int(value.get("memory_bytes", 0)),
                partition=str(value.get("partition", "auto")),
                links=_parse_links(value.get("links", {})),
                codecs=_parse_names(value.get("codecs", ["none"])),
                semantic_basis=str(value.get("semantic_basis", "")),
                weight_quant=str(value.get("weight_quant", "none")),
                tls_cert=str(value.get("tls_cert", "")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:  # OverflowError: int(inf), float(10**400)
            raise ValueError(f"malformed record: {error!r}") from error
        if not 0 <= record.start_block < record.end_block <= num_blocks:
            raise ValueError(f"span {record.start_block}:{record.end_block} outside a model of {num_blocks} blocks")
        if record.state not in (ONLINE, OFFLINE):
            raise ValueError(f"unknown state {record.state!r}")
        if not record.throughput > 0:
            raise ValueError(f"throughput {record.throughput} is not positive")
        if record.partition not in PARTITIONS:
            raise ValueError(f"unknown partition {record.partition!r}")
        if len(record.tls_cert) > MAX_CERT_CHARS:
            raise ValueError(f"tls_cert longer than {MAX_CERT_CHARS} characters")
        if record.prefill_throughput < 0 or record.max_blocks < 0 or record.memory_bytes < 0:
            raise ValueError("negative profile value")
        return record


def _parse_links(value: Any) -> dict[str, list[float]]:
    if not isinstance(value, dict) or len(value) > MAX_LINKS:
        raise ValueError(f"links must be a dict of at most {MAX_LINKS} entries")
    links = {}
    for peer, measured in value.items():
        bandwidth, rtt = (float(number) for number in measured)
        if not (bandwidth > 0 and rtt >= 0):
            raise ValueError(f"link to {peer} has bandwidth {bandwidth} and RTT {rtt}")
        links[str(peer)] = [bandwidth, rtt]
    return links


def _parse_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_CODECS:
        raise ValueError(f"codecs must be a list of at most {MAX_CODECS} names")
    return tuple(str(name)[:32] for name in value)
