"""The client's links to nodes: their measured speed, and the activation codec each step takes on them.

Activations travel between the client and each node of the route. For every step the client picks one
codec for the hidden states it sends and the same codec for the node's reply (both cross the same link,
and are the same size): the fastest codec the step's quality budget allows and both ends support
(protocol.link_policy). Links are measured once per node address with the Echo RPC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.channels import open_channel
from edgeswarm.protocol.codecs import SemanticBasis
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.link_policy import LinkQuality, choose_codec, measured_costs
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm.routing import Hop

logger = logging.getLogger(__name__)

# Echo probes of this size each way measure a link (0.4 s each way at 5 Mbit/s; once per node).
_PROBE_BYTES = 256 * 1024
# A link that could not be measured is taken to be this fast (so it stays uncompressed).
_UNMEASURED_BANDWIDTH = 1e9


def measure_link(
    address: str, node_id: str, probe_bytes: int = 1024 * 1024, timeout: float = 10.0, identity: NodeIdentity | None = None
) -> tuple[float, float]:
    """(bandwidth in bytes/s, round-trip seconds) to a node, from its Echo RPC.

    RTT is the best of three empty echoes; bandwidth comes from one echo of `probe_bytes` each way,
    less that round trip.
    """
    with open_channel(address, node_id, identity=identity) as channel:
        echo = pb_grpc.BlockServiceStub(channel).Echo
        echo(pb.EchoRequest(), timeout=timeout)  # connect outside the timings
        rtt = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            echo(pb.EchoRequest(), timeout=timeout)
            rtt = min(rtt, time.perf_counter() - began)
        began = time.perf_counter()
        echo(pb.EchoRequest(payload=bytes(probe_bytes), reply_bytes=probe_bytes), timeout=timeout)
        transfer = max(time.perf_counter() - began - rtt, 1e-6)
    return 2 * probe_bytes / transfer, rtt


@dataclass(frozen=True)
class StepCodecs:
    """The codec of one step on one hop: for the request and the reply, and the basis if semantic."""

    request: str
    reply: str
    basis: SemanticBasis | None = None

    @property
    def compressed(self) -> bool:
        return self.request not in ("", "none")


RAW = StepCodecs("", "")


class LinkCodecs:
    """Chooses codecs per hop and step for one client, from its quality budget and measured links."""

    def __init__(
        self, quality: LinkQuality, hidden_size: int, semantic_basis: Callable[[], SemanticBasis | None], identity: NodeIdentity | None = None
    ):
        """`identity` signs the link probes (default: this process's)."""
        self.quality = quality
        self._identity = identity
        self.hidden_size = hidden_size
        self._semantic_basis = semantic_basis
        self._bandwidth: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """False when every budget is lossless and compression is off altogether."""
        return self.quality != LinkQuality("lossless", "lossless")

    def bandwidth(self, record: ServerRecord) -> float:
        """Bytes/s to a node, measured on first use."""
        with self._lock:
            if record.address not in self._bandwidth:
                try:
                    self._bandwidth[record.address], _ = measure_link(record.address, record.node_id, probe_bytes=_PROBE_BYTES, identity=self._identity)
                except Exception as error:  # a node that cannot be probed now is probed again next time
                    logger.info("could not measure the link to %s: %r", record.address, error)
                    return _UNMEASURED_BANDWIDTH
            return self._bandwidth[record.address]

    def for_step(self, hop: Hop, batch: int, tokens: int) -> StepCodecs:
        """The codecs for a step of [batch, tokens] hidden states on `hop`."""
        if not self.active:
            return RAW
        allowed = self.quality.allowed_codecs(batch * tokens)
        supported = set(hop.record.codecs)
        basis = None
        if "semantic" in allowed and "semantic" in supported:
            basis = self._semantic_basis()
            if basis is None or basis.digest != hop.record.semantic_basis:
                supported.discard("semantic")
                basis = None
        costs = measured_costs(self.hidden_size, basis.bytes_per_token(hop.start) if basis is not None else 0)
        values = batch * tokens * self.hidden_size
        codec = choose_codec(allowed, supported, values, self.bandwidth(hop.record), costs)
        if codec == "none":
            return RAW
        return StepCodecs(codec, codec, basis if codec == "semantic" else None)
