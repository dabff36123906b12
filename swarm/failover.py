"""Replacing a session's hops: after a node dies, stalls or lies, and when lies reached the hops after it.

Every input a hop was sent is kept (`HopState.sent`). When a hop fails, `Failover.replace` finds other
nodes for its blocks (one or several: swarm.routes), replays the kept inputs there to rebuild the KV
cache, and returns their outputs, so the session goes on from the step that failed with no token lost or
repeated. When the failed node was caught lying, the hops after it may have cached states built on its
lies: `Failover.repair_downstream` rebuilds them from the corrected states.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.constants import DECODE_STEP_TOKENS
from edgeswarm.swarm.errors import NodeBusyError, NodeUnavailableError, NoRouteError
from edgeswarm.swarm.links import LinkCodecs, StepCodecs
from edgeswarm.swarm.policy import SessionPolicy
from edgeswarm.swarm.routes import RouteManager
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.spot_check import NodeMisbehaved, difference, tolerance_for
from edgeswarm.swarm.transport import SpanStream, decode_hidden

logger = logging.getLogger(__name__)

# A step may take this many times its expected duration before the node counts as stalled.
STALL_FACTOR = 4.0
# Each new step's duration weighs this much in a hop's expected step time.
STEP_TIME_SMOOTHING = 0.2

StreamOpener = Callable[[Hop, bool], SpanStream]  # (hop, fresh: under a new session id) -> an open stream


@dataclass
class SentStep:
    """One step's inputs to a hop, kept so they can be replayed on a replacement node."""

    hidden: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    # the hidden states as the node decoded them, when a lossy codec carried them and spot checks are on
    # (a verifier must get exactly what the node got); None when that is `hidden` itself
    seen: torch.Tensor | None = None


def joined(steps: list[SentStep], seen: bool = False) -> SentStep:
    """Steps concatenated along positions (`seen`: the hidden states as the node decoded them)."""
    hidden = [step.seen if seen and step.seen is not None else step.hidden for step in steps]
    return SentStep(torch.cat(hidden, dim=1), *(torch.cat([getattr(step, name) for step in steps], dim=1) for name in ("positions", "mask")))


@dataclass
class FailoverEvent:
    """What happened when a hop was replaced."""

    failed_node: str
    reason: str
    replacement: list[Hop]
    replayed_tokens: int
    seconds: float  # from the failure being noticed to the step's output being ready again


def cut(steps: list[SentStep], length: int) -> list[SentStep]:
    """The first `length` positions of `steps`, as one step."""
    whole = joined(steps)
    seen = joined(steps, seen=True).hidden[:, :length] if any(step.seen is not None for step in steps) else None
    return [SentStep(whole.hidden[:, :length], whole.positions[:, :length], whole.mask[:, :length], seen)]


class HopState:
    """A hop in use: its stream, every input it was sent, and how fast it has been."""

    def __init__(self, stream: SpanStream):
        self.stream = stream
        self.sent: list[SentStep] = []
        self.truncate_to: int | None = None  # a rollback its node has not been told of yet
        self._decode_seconds: float | None = None
        self._prefill_seconds_per_token: float | None = None

    @property
    def hop(self) -> Hop:
        return self.stream.hop

    def send(self, step: SentStep, codecs: StepCodecs, keep_seen: bool) -> SentStep:
        """Queues `step` on the stream; returns it with what the node will decode when `keep_seen` (spot
        checks need it) and a lossy codec carries it."""
        encoded: pb.Tensor = self.stream.send(step.hidden, step.positions, step.mask, codecs, self.truncate_to)
        self.truncate_to = None
        if not keep_seen or not codecs.compressed:
            return step
        return replace(step, seen=decode_hidden(self.hop, encoded, codecs))

    def send_forwarded(self, step: SentStep, codecs: StepCodecs, keep_seen: bool, upstream: str, push_to: pb.PushTarget | None) -> SentStep:
        """Queues `step` for hop-to-hop forwarding: its hidden states go with it when `upstream` is empty
        (the first hop), else they come as a push from node `upstream`; with `push_to`, the node pushes
        its output on. Returns the step as `send` does."""
        if not upstream:
            encoded = self.stream.send(step.hidden, step.positions, step.mask, codecs, self.truncate_to, push_to)
        else:
            encoded = self.stream.send(None, step.positions, step.mask, codecs, self.truncate_to, push_to, upstream)
        self.truncate_to = None
        if encoded is None or not keep_seen or not codecs.compressed:
            return step
        return replace(step, seen=decode_hidden(self.hop, encoded, codecs))

    def roll_back(self, length: int) -> None:
        """Forgets the inputs from position `length` on; the node is told with the next step."""
        self.sent = cut(self.sent, length) if self.sent else []
        self.truncate_to = length if self.truncate_to is None else min(self.truncate_to, length)

    def deadline(self, tokens: int, floor: float) -> float:
        """How long a step of `tokens` tokens may take before this node counts as stalled."""
        if tokens <= DECODE_STEP_TOKENS and self._decode_seconds is not None:
            expected = self._decode_seconds
        elif tokens > DECODE_STEP_TOKENS and self._prefill_seconds_per_token is not None:
            expected = self._prefill_seconds_per_token * tokens
        else:  # nothing measured yet: trust the node's announced decode speed
            expected = tokens * (self.hop.end - self.hop.start) / self.hop.record.throughput
        return max(floor, STALL_FACTOR * expected)

    def observe(self, seconds: float, tokens: int) -> None:
        """A step of `tokens` tokens took `seconds` on this hop."""
        if tokens <= DECODE_STEP_TOKENS:
            self._decode_seconds = _smoothed(self._decode_seconds, seconds)
        else:
            self._prefill_seconds_per_token = _smoothed(self._prefill_seconds_per_token, seconds / tokens)


def _smoothed(previous: float | None, new: float) -> float:
    return new if previous is None else (1 - STEP_TIME_SMOOTHING) * previous + STEP_TIME_SMOOTHING * new


class Failover:
    """Replaces the failed hops of one session (module docstring); `events` lists every replacement."""

    def __init__(
        self,
        routes: RouteManager,
        links: LinkCodecs,
        policy: SessionPolicy,
        open_stream: StreamOpener,
        prefill_chunk: int,
        keep_seen: bool,
    ):
        self.routes, self.links, self.policy = routes, links, policy
        self.open_stream, self.prefill_chunk, self.keep_seen = open_stream, prefill_chunk, keep_seen
        self.events: list[FailoverEvent] = []

    def tolerance(self, states: list[HopState]) -> float:
        """The spot-check tolerance of the least exact of `states`' nodes."""
        return max(tolerance_for(self.policy, state.hop.record) for state in states)

    def replace(self, hops: list[HopState], index: int, current: SentStep | None, error: NodeUnavailableError) -> torch.Tensor:
        """Replaces `hops[index]` (in place, by one or several hops) after `error`; returns the new hops'
        outputs for every input the failed hop had been sent and then `current` (if any)."""
        began = time.monotonic()
        failed = hops[index]
        failed.stream.close()
        replay = joined([*failed.sent, *([current] if current is not None else [])])
        reason, last_error = str(error), error
        if not isinstance(error, NodeMisbehaved):  # a node caught lying is already banned, for longer
            self.routes.report_failure(error)
        for _ in range(self.policy.max_failover_attempts):
            logger.warning("replacing blocks %d:%d after: %s", failed.hop.start, failed.hop.end, reason)
            route = self.routes.wait_for_replacement(failed.hop, self.policy.replacement_wait)
            if route is None:
                raise NoRouteError(
                    f"blocks {failed.hop.start}:{failed.hop.end} lost their node ({reason}) and no other node "
                    f"served them within {self.policy.replacement_wait:.0f}s"
                ) from error
            replacements: list[HopState] = []
            try:
                output = replay.hidden
                for hop in route:
                    replacements.append(HopState(self.open_stream(hop, False)))
                    output = self.replay(replacements[-1], SentStep(output, replay.positions, replay.mask))
            except NodeUnavailableError as replacement_error:
                for state in replacements:
                    state.stream.close()
                reason, last_error = str(replacement_error), replacement_error
                self.routes.report_failure(replacement_error)
                continue
            hops[index : index + 1] = replacements
            self.events.append(FailoverEvent(failed.hop.record.node_id, str(error), route, replay.hidden.shape[1], time.monotonic() - began))
            return output
        busy = " (busy)" if isinstance(last_error, NodeBusyError) else ""
        raise NodeUnavailableError(f"blocks {failed.hop.start}:{failed.hop.end} could not be replaced{busy}: {reason}") from error

    def rebuild(self, hops: list[HopState], index: int) -> None:
        """Gives `hops[index]` a fresh stream on the same node with every input it had been sent (its old
        stream had steps queued that will not be completed as queued); replaces it if that fails."""
        stale = hops[index]
        stale.stream.close()
        rebuilt = None
        try:
            rebuilt = HopState(self.open_stream(stale.hop, True))
            if stale.sent:
                self.replay(rebuilt, joined(stale.sent))
            hops[index] = rebuilt
        except NodeUnavailableError as error:
            if rebuilt is not None:
                rebuilt.stream.close()
            self.replace(hops, index, None, error)

    def replay(self, state: HopState, inputs: SentStep) -> torch.Tensor:
        """Sends a hop everything its predecessor had been sent, in prefill-sized chunks; returns all outputs."""
        outputs = []
        for begin in range(0, inputs.hidden.shape[1], self.prefill_chunk):
            chunk = SentStep(*(tensor[:, begin : begin + self.prefill_chunk] for tensor in (inputs.hidden, inputs.positions, inputs.mask)))
            chunk = state.send(chunk, self.links.for_step(state.hop, *chunk.hidden.shape[:2]), self.keep_seen)
            outputs.append(state.stream.receive(self.policy.step_timeout))
            state.sent.append(chunk)
        return torch.cat(outputs, dim=1)

    def repair_downstream(self, hops: list[HopState], index: int, corrected: torch.Tensor, tolerance: float) -> torch.Tensor | None:
        """After a lying hop was replaced: `corrected` are the right outputs of the inputs it had been sent.
        If its lies had reached `hops[index]` (steps that were not checked), that hop's cache and those
        after it were built on wrong states: each is rebuilt on its node from corrected inputs (or
        replaced, if that fails). Returns the last hop's outputs if every hop from `index` on was
        rebuilt, else None."""
        while index < len(hops):
            stale = hops[index]
            was_sent = joined(stale.sent) if stale.sent else None
            if was_sent is None or was_sent.hidden.shape != corrected.shape:
                return None  # nothing it was sent (or not the same positions) to repair
            if difference(was_sent.hidden, corrected, was_sent.mask) <= tolerance:
                return None  # it got the right states: so did every hop after it
            logger.warning("rebuilding blocks %d:%d, whose cache holds states from a lying node", stale.hop.start, stale.hop.end)
            inputs = SentStep(corrected, was_sent.positions, was_sent.mask)
            stale.stream.close()
            rebuilt = None
            try:
                rebuilt = HopState(self.open_stream(stale.hop, True))
                corrected = self.replay(rebuilt, inputs)
                hops[index] = rebuilt
                index += 1
            except NodeUnavailableError as error:
                if rebuilt is not None:
                    rebuilt.stream.close()
                stale.sent = [inputs]  # a failover replays the corrected states
                before = len(hops)
                corrected = self.replace(hops, index, None, error)
                index += len(hops) - before + 1
            tolerance = max(tolerance, tolerance_for(self.policy, stale.hop.record))
        return corrected
