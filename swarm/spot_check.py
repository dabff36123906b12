"""Spot checks: catching nodes that return wrong hidden states (on by default: `SessionPolicy.spot_check`).

What is checked. The first step of a session and then a random fraction `f` of its steps are verified,
every hop of the route on each of them. The hop's work for the step (its output hidden states at the
step's positions) is redone by a *verifier*: another node, picked at random, that serves all of the hop's
blocks and holds its weights the same way (`weight_quant`). The verifier runs one stateless Forward of
those blocks over the whole sequence so far, built from the inputs the session kept for the hop, so it
needs no state of its own; its outputs at the step's positions are compared with the hop's. The Forward
starts as the step is sent, so it runs alongside the hop's own step. A hop no other node fully serves is
"unverified". The first step is always checked: it is no more costly to check than any later step (each
check recomputes the whole sequence), it guards the whole KV cache, and it guarantees that every session
checks every verifiable hop at least once, so a node that is simply wrong (broken weights, wrong
quantization) is caught on its first session. A node that behaves during the first step and lies later
is caught by the random checks: after k lies with probability 1 - (1 - f)^k.

Why stateless Forwards rather than a shadow session on the verifier: the verifier keeps no KV cache (no
memory to reserve, nothing to evict or to keep in step across failovers), each check can go to a
different, unpredictable node, and it recomputes the hop's whole history from the client's own copy of
the inputs, so a node that corrupts its cache is caught as soon as that shows in an output. The price
is that a check at position t costs a forward over t tokens: about f * T^2 / 2 token-blocks over a
session of T tokens, against T for a shadow session.

Tolerance. The difference of two answers is the largest, over the step's real (non-padding) positions,
of |a - b| / max(|a|, |b|), with |.| the L2 norm of a position's hidden state. Honest float32 nodes
differ only by summation order (a batched decode against a whole-sequence Forward, one thread against
two): measured at most 5e-6 on SmolLM2-135M (30 blocks) and on the tiny test models, so the default
`spot_check_tolerance` 1e-3 leaves a factor of 200. bf16 and int8 nodes run decode-sized inputs through
low-precision kernels and longer ones in float32, and those differ by up to 6e-2 (same measurement), so
quantized hops are compared with `spot_check_quantized_tolerance` (0.2); lies smaller than that go
unnoticed on them.

Compressed links. A checked step goes out exactly as an unchecked one: same request and reply codecs,
same message, so a node cannot tell which of its steps are checked (when checked steps asked for an
uncompressed reply, a node that lied only on compressed replies was never caught). The verifier gets
exactly the hidden states the node decoded, and answers uncompressed; the node's reply carries its
codec's error, so the tolerance grows by that codec's worst-case error (`codec_error_bound`), proven
from the codec's definition (protocol.codecs) as a relative L2 error per position, so that it never
flags an honest node. Measured on SmolLM2's hidden states at every block boundary (29,160 positions
of real text, `difference` against the exact states), the largest honest errors are about half the
bounds: fp16 4.2e-4 (bound 4.9e-4), bf16 3.2e-3 (3.9e-3), int8_outlier 1.7e-2 and int8_block 2.0e-2
(3.2e-2), int8_token 5.5e-2 (9.4e-2 at hidden size 576), int4_block 0.20 (0.40); the semantic codec's
encoder keeps every position within 0.25 (else it sends the message losslessly). Lies smaller than the
bound go unnoticed on such a link, so a hard codec (int4_block, semantic) lets a liar hide more.

Who is lying. When the hop's answer and the verifier's differ beyond the tolerance:
1. Majority: up to two more nodes serving those blocks (referees) are asked in turn. A node whose answer
   differs from two other nodes' answers that agree with each other is judged lying. A referee that
   agrees with neither side is passed over (and the next one asked).
2. With no referee available (or none decisive), self-consistency: the hop's node and the verifier are
   each asked again, by stateless Forward. An honest node answers the same question the same way up to
   float noise, so a node whose two answers differ beyond the tolerance is judged lying, whatever the
   other says (this catches random corruption with only two nodes).
3. Otherwise the dispute stays unresolved: nobody is banned (with two opinions and no tie-break, a ban
   would let any single liar evict an honest node by accusing it) and the session goes on as it was; it
   is counted in `SpotCheckStats.unresolved` and logged.
A node judged lying is banned for `spot_check_ban_seconds`, a `Misbehaviour` is recorded on the session
and on the client's route manager (`client.routes.misbehaviours`), and if it ran the hop, the hop is replaced as
in a failover: its kept inputs are replayed on other nodes, and the step's output comes from them. If
lies had already passed on to later hops unchecked (f < 1), those hops' caches are rebuilt from the
corrected states (`swarm.failover.Failover.repair_downstream`); tokens already returned stay as they were.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
import torch

from edgeswarm.protocol.codecs import (
    DEFAULT_MAX_RELATIVE_ERROR,
    INT4_BLOCK_SIZE,
    INT4_QMAX,
    INT8_BLOCK_SIZE,
    INT8_QMAX,
)
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm.errors import NodeUnavailableError, SwarmError
from edgeswarm.swarm.policy import SessionPolicy
from edgeswarm.swarm.routes import Misbehaviour, RouteManager
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.transport import forward_hop, open_channel

logger = logging.getLogger(__name__)

# How many referees at most are asked to settle one dispute.
MAX_REFEREES = 2
# The usable nodes are looked up in the DHT at most this often by one session's checks.
_SERVERS_TTL = 2.0
# Quantization scales are float16 rounded up: at most this much above max|block| / qmax (protocol.codecs).
_SCALE_ROUNDING = 1 + 2.0**-10
# Round to nearest keeps every value within half a unit in the last place: 2^-11 of it for float16 (10
# stored mantissa bits), 2^-8 for bfloat16 (7).
_HALF_ULP = {"fp16": 2.0**-11, "bf16": 2.0**-8}


@dataclass
class SpotCheckStats:
    """Counts of one session's spot checks, each for one hop at one step (chunk)."""

    checks: int = 0  # hop-steps chosen for a check
    agreed: int = 0  # the verifier agreed with the hop
    unverified: int = 0  # no other node serving those blocks answered
    disputes: int = 0  # the verifier disagreed
    unresolved: int = 0  # disputes that convicted nobody


class NodeMisbehaved(NodeUnavailableError):
    """A hop's node was judged to have returned wrong outputs; the session replaces it."""

    def __init__(self, misbehaviour: Misbehaviour):
        super().__init__(
            f"node {misbehaviour.node_id} at {misbehaviour.address} (blocks {misbehaviour.start_block}:"
            f"{misbehaviour.end_block}) returned wrong hidden states: {misbehaviour.reason}",
            misbehaviour.node_id,
        )
        self.misbehaviour = misbehaviour


def difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max over real positions of |a - b| / max(|a|, |b|), |.| the L2 norm over the hidden dimension.

    a, b: [batch, length, hidden]; mask: [batch, length], True for real tokens (default: all). Inf when
    the shapes differ or either holds NaN/Inf; 0 when there is no real position.
    """
    if a.shape != b.shape:
        return float("inf")
    a, b = a.float(), b.float()
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    if a.numel() == 0:
        return 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(torch.finfo(torch.float32).tiny)
    return float(((a - b).norm(dim=-1) / scale).max())


def tolerance_for(policy: SessionPolicy, record: ServerRecord) -> float:
    """The largest difference honest nodes holding weights as `record` does may show (module docstring)."""
    return policy.spot_check_tolerance if record.weight_quant == "none" else policy.spot_check_quantized_tolerance


def _block_error_bound(block: int, levels: int) -> float:
    """Each value is within half a scale, max|block| / levels, of the truth: over a position, the error is
    at most sqrt(sum over blocks of block * (max|block| / (2 levels))^2) <= sqrt(block) / (2 levels) of its
    norm (the norm holds every block's largest value)."""
    return block**0.5 / (2 * levels) * _SCALE_ROUNDING


def codec_error_bound(codec: str, width: int) -> float:
    """The largest relative L2 error, per position of `width` values, that `codec` puts on an honest reply
    (module docstring, "Compressed links"); 0 for the exact codecs."""
    if codec in ("", "none", "lossless"):
        return 0.0
    if codec in _HALF_ULP:
        return _HALF_ULP[codec]
    if codec in ("int8_block", "int8_outlier"):  # int8_outlier: int8_block, with its outliers in float16
        return _block_error_bound(INT8_BLOCK_SIZE, INT8_QMAX)
    if codec == "int8_token":  # one block: the whole position
        return _block_error_bound(width, INT8_QMAX)
    if codec == "int4_block":
        return _block_error_bound(INT4_BLOCK_SIZE, INT4_QMAX)
    if codec == "semantic":  # the encoder sends a message losslessly rather than exceed this
        return DEFAULT_MAX_RELATIVE_ERROR
    raise ValueError(f"no error bound known for codec {codec!r}")


@dataclass
class Verdict:
    """The outcome of a dispute: node id -> (difference, reason) of each node judged lying."""

    liars: dict[str, tuple[float, str]]


def judge(
    hop_node: ServerRecord,
    hop_answer: torch.Tensor,
    verifier: ServerRecord,
    verifier_answer: torch.Tensor,
    referees: list[ServerRecord],
    ask: Callable[[ServerRecord], torch.Tensor | None],
    mask: torch.Tensor,
    tolerance: float,
) -> Verdict:
    """Settles a disagreement between the hop's node and a verifier (the rule in the module docstring).

    `ask(record)` is that node's answer by stateless Forward, or None if it could not give one.
    """

    def agree(x: torch.Tensor, y: torch.Tensor) -> bool:
        return difference(x, y, mask) <= tolerance

    for referee in referees[:MAX_REFEREES]:
        answer = ask(referee)
        if answer is None:
            continue
        with_hop, with_verifier = agree(answer, hop_answer), agree(answer, verifier_answer)
        if with_verifier and not with_hop:
            why = f"outvoted: nodes {verifier.node_id} and {referee.node_id} agree with each other, not with it"
            return Verdict({hop_node.node_id: (difference(hop_answer, answer, mask), why)})
        if with_hop and not with_verifier:
            why = f"outvoted: nodes {hop_node.node_id} and {referee.node_id} agree with each other, not with it"
            return Verdict({verifier.node_id: (difference(verifier_answer, answer, mask), why)})
    liars = {}
    for node, first in ((hop_node, hop_answer), (verifier, verifier_answer)):
        again = ask(node)
        if again is not None and not agree(first, again):
            gap = difference(first, again, mask)
            liars[node.node_id] = (gap, f"inconsistent: two answers of its own to the same inputs differ by {gap:.3g}")
    return Verdict(liars)


@dataclass
class CheckInputs:
    """What a check needs: the hop, every input it was sent (as it decoded them) up to and including the
    step being checked, and that step's length and padding mask."""

    hop: Hop
    hidden: torch.Tensor  # [batch, positions so far, hidden]
    positions: torch.Tensor
    mask: torch.Tensor
    step_length: int
    step: int
    position: int
    reply_codec: str  # the codec the hop's reply came in ("" for none)

    @property
    def step_mask(self) -> torch.Tensor:
        return self.mask[:, -self.step_length :]


class SpotChecker:
    """One session's spot checks: which steps, which verifiers, and the verdicts (module docstring)."""

    def __init__(self, routes: RouteManager, policy: SessionPolicy, session_id: str, stats: SpotCheckStats, misbehaviours: list[Misbehaviour]):
        self.routes, self.policy, self.session_id = routes, policy, session_id
        self.stats, self.misbehaviours = stats, misbehaviours
        self.rng = random.Random(policy.spot_check_seed)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._servers: list[ServerRecord] | None = None
        self._servers_at = 0.0
        self._channels: dict[str, grpc.Channel] = {}  # address -> channel, kept for the session's checks

    def wants_check(self, step: int) -> bool:
        """Whether session step `step` is checked: the first always, then a random fraction."""
        return step == 0 or self.rng.random() < self.policy.spot_check

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:  # on this thread: a grpc close racing a fork (hivemind's DHT) can hang
            channel.close()

    def _channel(self, record: ServerRecord) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(record.node_id)
        if channel is None:
            opened = open_channel(record, self.policy.connect_timeout, self.routes.identity)
            with self._lock:
                channel = self._channels.setdefault(record.node_id, opened)
            if channel is not opened:
                opened.close()
        return channel

    def _drop_channel(self, record: ServerRecord) -> None:
        with self._lock:
            channel = self._channels.pop(record.node_id, None)
        if channel is not None:
            channel.close()

    # --- verifiers -------------------------------------------------------------------------------

    def _usable(self) -> list[ServerRecord]:
        with self._lock:
            if self._servers is None or time.monotonic() - self._servers_at > _SERVERS_TTL:
                self._servers, self._servers_at = self.routes.usable_servers(), time.monotonic()
            return self._servers

    def candidates(self, hop: Hop) -> list[ServerRecord]:
        """Other nodes that could redo `hop`'s work exactly, in random order."""
        found = [
            record
            for record in self._usable()
            if record.node_id != hop.record.node_id
            and record.start_block <= hop.start
            and hop.end <= record.end_block
            and record.weight_quant == hop.record.weight_quant
        ]
        self.rng.shuffle(found)
        return found

    def _ask(self, record: ServerRecord, inputs: CheckInputs) -> torch.Tensor | None:
        """`record`'s outputs at the checked step's positions, by stateless Forward; None if it failed."""
        hop = Hop(record, inputs.hop.start, inputs.hop.end)
        try:
            output = forward_hop(
                hop,
                self.routes.model_id,
                inputs.hidden,
                inputs.positions,
                inputs.mask,
                self.policy.step_timeout,
                self.policy.connect_timeout,
                channel=self._channel(record),
            )
        except (SwarmError, ValueError) as error:
            logger.info("spot check: node %s gave no answer: %s", record.node_id, error)
            self._drop_channel(record)
            return None
        return output[:, -inputs.step_length :]

    def _first_answer(self, candidates: list[ServerRecord], inputs: CheckInputs):
        for index, record in enumerate(candidates):
            answer = self._ask(record, inputs)
            if answer is not None:
                return record, answer, candidates[index + 1 :]
        return None

    def start(self, inputs: CheckInputs) -> Future | None:
        """Starts the verifier's Forward for a step just sent to the hop; None if no node could verify it."""
        self.stats.checks += 1
        candidates = self.candidates(inputs.hop)
        if not candidates:
            self.stats.unverified += 1
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spot-check")
        return self._pool.submit(self._first_answer, candidates, inputs)

    # --- verdicts --------------------------------------------------------------------------------

    def finish(self, inputs: CheckInputs, output: torch.Tensor, pending: Future) -> None:
        """Compares the hop's `output` with the verifier's; raises NodeMisbehaved if the hop's node lied."""
        try:
            result = pending.result(timeout=self.policy.step_timeout + self.policy.connect_timeout)
        except FutureTimeout:
            result = None
        if result is None:
            self.stats.unverified += 1
            return
        verifier, answer, referees = result
        hop = inputs.hop
        tolerance = tolerance_for(self.policy, hop.record) + codec_error_bound(inputs.reply_codec, output.shape[-1])
        mask = inputs.step_mask
        measured = difference(output, answer, mask)
        if measured <= tolerance:
            self.stats.agreed += 1
            return
        self.stats.disputes += 1
        logger.warning(
            "spot check: blocks %d:%d on node %s and verifier %s differ by %.3g (tolerance %.3g) at step %d",
            hop.start, hop.end, hop.record.node_id, verifier.node_id, measured, tolerance, inputs.step,
        )
        verdict = judge(hop.record, output, verifier, answer, referees, lambda record: self._ask(record, inputs), mask, tolerance)
        if not verdict.liars:
            self.stats.unresolved += 1
            logger.warning("spot check: unresolved dispute between %s and %s: nobody banned", hop.record.node_id, verifier.node_id)
            return
        records = {hop.record.node_id: hop.record, verifier.node_id: verifier}
        convicted = None
        for node_id, (gap, reason) in verdict.liars.items():
            record = records[node_id]
            misbehaviour = Misbehaviour(
                node_id, record.address, hop.start, hop.end, self.session_id, inputs.step, inputs.position,
                gap, tolerance, reason, time.time(),
            )
            self.record(misbehaviour)
            if node_id == hop.record.node_id:
                convicted = misbehaviour
        if convicted is not None:
            raise NodeMisbehaved(convicted)

    def record(self, misbehaviour: Misbehaviour) -> None:
        """Bans the node for `spot_check_ban_seconds` and logs the misbehaviour on the session and the route manager."""
        logger.warning(
            "spot check: node %s (blocks %d:%d) judged lying and banned for %.0fs: %s",
            misbehaviour.node_id, misbehaviour.start_block, misbehaviour.end_block,
            self.policy.spot_check_ban_seconds, misbehaviour.reason,
        )
        self.routes.convict(misbehaviour, self.policy.spot_check_ban_seconds)
        with self._lock:
            self._servers = None
        self.misbehaviours.append(misbehaviour)
