"""A client inference session: the chain of hops that holds one conversation's KV caches, and its failover.

Every input a hop was sent is kept. When a node dies (a stream error) or stalls (no answer within a
deadline derived from its measured speed), the session finds other nodes for that hop's blocks (one or
several), replays the kept inputs there to rebuild the KV cache, and goes on from the step that failed.
No token is lost or repeated, and greedy output stays that of a run without the failure.

The first step and a fraction `SessionPolicy.spot_check` of the others (by default
`DEFAULT_SPOT_CHECK`) are verified on other nodes, and a node caught returning wrong hidden states is
banned and replaced the same way (see swarm.spot_check). The time of every decode step on a hop goes to
the client's measured speeds, which routing trusts over what nodes announce (swarm.routing).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace

import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.swarm.errors import NodeBusyError, NodeUnavailableError, NoRouteError
from edgeswarm.swarm.links import StepCodecs
from edgeswarm.swarm.routing import Hop, plan_route
from edgeswarm.swarm.spot_check import (
    CheckInputs,
    Misbehaviour,
    NodeMisbehaved,
    SpotChecker,
    SpotCheckStats,
    difference,
    tolerance_for,
)
from edgeswarm.swarm.transport import SpanStream, StepTimeout, decode_hidden

logger = logging.getLogger(__name__)

# Steps of at most this many tokens are decode steps, timed apart from prefill chunks.
_DECODE_TOKENS = 8
# A step may take this many times its expected duration before the node counts as stalled.
_DEADLINE_FACTOR = 4.0
# The fraction of steps spot-checked by default (besides the first, always checked): about 1% of decode
# speed with a 128-token prompt, against 7% for 0.05 and 33% for 0.1; a check recomputes the whole
# sequence, so with a 512-token prompt it costs 28% (`python -m scripts.bench_spot_check`; README, "Lying peers").
DEFAULT_SPOT_CHECK = 0.02


def positions_for(padding_mask: torch.Tensor, tokens_before: torch.Tensor) -> torch.Tensor:
    """Rotary positions of new tokens: each row counts only its real tokens, as transformers does.

    padding_mask: [batch, length] bool for the new tokens; tokens_before: [batch] real tokens already seen.
    Padding gets position 0 (it is never attended to, so its position only needs to be valid).
    """
    counts = tokens_before[:, None] + padding_mask.long().cumsum(dim=1)
    return torch.where(padding_mask, counts - 1, torch.zeros_like(counts))


@dataclass(frozen=True)
class SessionPolicy:
    """How patient a session is with nodes, and how it replaces them.

    A step that takes longer than `min_step_deadline` seconds, or several times the node's measured step
    time, counts as a stall when another node could take over; otherwise the session waits up to
    `step_timeout`. When no node serves a failed hop's blocks, it waits up to `replacement_wait` for one.

    `spot_check`: the fraction of steps (besides the first, always checked when it is above 0) on which
    every hop's output is verified on another node serving the same blocks; 0 turns spot checks off.
    Outputs may differ by `spot_check_tolerance` (float32 nodes) or `spot_check_quantized_tolerance`
    (bf16/int8 nodes), relative to their norm, per position, plus the error bound of the reply's link
    codec; a node judged lying is banned for `spot_check_ban_seconds`. `spot_check_seed` fixes which steps
    and verifiers are chosen. See swarm.spot_check for what is compared and who is judged lying.
    """

    connect_timeout: float = 3.0
    step_timeout: float = 60.0
    min_step_deadline: float = 0.5
    replacement_wait: float = 30.0
    max_failover_attempts: int = 3
    spot_check: float = DEFAULT_SPOT_CHECK
    spot_check_tolerance: float = 1e-3
    spot_check_quantized_tolerance: float = 0.2
    spot_check_ban_seconds: float = 24 * 3600.0
    spot_check_seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.spot_check <= 1.0:
            raise ValueError(f"spot_check must be a fraction in [0, 1], got {self.spot_check}")


@dataclass
class SentStep:
    """One step's inputs to a hop, kept so they can be replayed on a replacement node."""

    hidden: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    # the hidden states as the node decoded them, when a lossy codec carried them and spot checks are on
    # (a verifier must get exactly what the node got); None when that is `hidden` itself
    seen: torch.Tensor | None = None


def _joined(steps: list[SentStep], seen: bool = False) -> SentStep:
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


class _HopState:
    """A hop in use: its stream, every input it was sent, and how fast it has been."""

    def __init__(self, stream: SpanStream):
        self.stream = stream
        self.sent: list[SentStep] = []
        self._decode_seconds: float | None = None
        self._prefill_seconds_per_token: float | None = None

    @property
    def hop(self) -> Hop:
        return self.stream.hop

    def deadline(self, tokens: int, floor: float) -> float:
        """How long a step of `tokens` tokens may take before this node counts as stalled."""
        if tokens <= _DECODE_TOKENS and self._decode_seconds is not None:
            expected = self._decode_seconds
        elif tokens > _DECODE_TOKENS and self._prefill_seconds_per_token is not None:
            expected = self._prefill_seconds_per_token * tokens
        else:  # nothing measured yet: trust the node's announced decode speed
            expected = tokens * (self.hop.end - self.hop.start) / self.hop.record.throughput
        return max(floor, _DEADLINE_FACTOR * expected)

    def observe(self, seconds: float, tokens: int) -> None:
        if tokens <= _DECODE_TOKENS:
            previous = self._decode_seconds
            self._decode_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        else:
            per_token, previous = seconds / tokens, self._prefill_seconds_per_token
            self._prefill_seconds_per_token = per_token if previous is None else 0.8 * previous + 0.2 * per_token


class InferenceSession:
    """Step-by-step inference through the swarm. Use as a context manager, or call `close()`.

    Each `step(input_ids)` appends tokens to every hop's KV cache and returns the logits of the last
    position of every row. Long inputs are sent in chunks of `prefill_chunk` tokens.
    """

    def __init__(
        self,
        client,  # swarm.client.SwarmClient; not annotated to avoid an import cycle
        route: list[Hop],
        max_length: int,
        prefill_chunk: int = 256,
        policy: SessionPolicy | None = None,
    ):
        self.client = client
        self.max_length = max_length
        self.prefill_chunk = prefill_chunk
        self.policy = policy or client.policy
        self.session_id = uuid.uuid4().hex
        self.length = 0  # positions appended so far (padding included)
        self.failovers: list[FailoverEvent] = []
        self.misbehaviours: list[Misbehaviour] = []  # nodes caught lying by spot checks
        self.spot_checks = SpotCheckStats()
        self._spot_checker = (
            SpotChecker(client, self.policy, self.session_id, self.spot_checks, self.misbehaviours)
            if self.policy.spot_check > 0
            else None
        )
        self._steps = 0  # step() calls so far
        self._streams_opened = 0
        self._tokens_seen: torch.Tensor | None = None  # [batch] real tokens so far
        self._hops: list[_HopState] = []
        try:
            for hop in route:
                self._hops.append(_HopState(self._open_stream(hop)))
        except Exception:
            self.close()
            raise

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def route(self) -> list[Hop]:
        """The hops this session runs through now (it changes when a node is replaced)."""
        return [state.hop for state in self._hops]

    @property
    def link_bytes(self) -> int:
        """Hidden-state bytes sent to and received from the current hops so far, as encoded on the links."""
        return sum(state.stream.bytes_sent + state.stream.bytes_received for state in self._hops)

    def close(self) -> None:
        for state in self._hops:
            state.stream.close()
        self._hops = []
        if self._spot_checker is not None:
            self._spot_checker.close()

    def _open_stream(self, hop: Hop, fresh: bool = False) -> SpanStream:
        """A stream for `hop`; `fresh`: under a new session id, for a node this session already has a stream to."""
        self._streams_opened += 1
        session_id = f"{self.session_id}.{self._streams_opened}" if fresh else self.session_id
        return SpanStream(hop, session_id, self.client.model.model_id, self.max_length, self.policy.connect_timeout, self.client.identity)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feeds [batch, length] token ids (0 in attention_mask marks left padding); returns [batch, vocab] logits."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(mask.shape)} does not match input_ids {list(input_ids.shape)}")
        if self._tokens_seen is None:
            self._tokens_seen = torch.zeros(input_ids.shape[0], dtype=torch.long)
        elif input_ids.shape[0] != self._tokens_seen.shape[0]:
            raise ValueError(f"this session has batch size {self._tokens_seen.shape[0]}, got {input_ids.shape[0]}")
        if self.length + input_ids.shape[1] > self.max_length:
            raise ValueError(f"session would grow to {self.length + input_ids.shape[1]} tokens, above max_length {self.max_length}")
        hidden = None
        check = self._spot_checker is not None and self._spot_checker.wants_check(self._steps)
        for begin in range(0, input_ids.shape[1], self.prefill_chunk):
            chunk_ids = input_ids[:, begin : begin + self.prefill_chunk]
            chunk_mask = mask[:, begin : begin + self.prefill_chunk]
            positions = positions_for(chunk_mask, self._tokens_seen)
            hidden = self._run_hops(self.client.head.embed(chunk_ids), positions, chunk_mask, check)
            self._tokens_seen = self._tokens_seen + chunk_mask.long().sum(dim=1)
            self.length += chunk_ids.shape[1]
        self._steps += 1
        return self.client.head.logits(hidden[:, -1])

    # --- running the chain, and replacing hops that fail -------------------------------------------

    def _run_hops(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, check: bool = False) -> torch.Tensor:
        index = 0
        while index < len(self._hops):
            step = SentStep(hidden, positions, mask)
            try:
                hidden = self._step_hop(self._hops[index], step, check)
                index += 1
            except NodeUnavailableError as error:
                replacements, replayed = self._fail_over(index, step, error)
                self._hops[index : index + 1] = replacements
                index += len(replacements)
                length = step.hidden.shape[1]
                hidden = replayed[:, replayed.shape[1] - length :]
                if isinstance(error, NodeMisbehaved):  # its past outputs may have been lies too
                    self._repair_downstream(index, replayed[:, : replayed.shape[1] - length], self._tolerance(replacements))
        # a node judged lying during this step (as a verifier, or by another session of the client) may
        # run another hop of this session: it is replaced before this step's output is used
        while (found := self._convicted_hop()) is not None:
            index, misbehaviour = found
            length = hidden.shape[1]
            replacements, replayed = self._fail_over(index, None, NodeMisbehaved(misbehaviour))
            self._hops[index : index + 1] = replacements
            after = index + len(replacements)
            rebuilt = self._repair_downstream(after, replayed, self._tolerance(replacements))
            if after == len(self._hops):
                hidden = replayed[:, replayed.shape[1] - length :]
            elif rebuilt is not None:
                hidden = rebuilt[:, rebuilt.shape[1] - length :]
        return hidden

    def _tolerance(self, states: list[_HopState]) -> float:
        return max(tolerance_for(self.policy, state.hop.record) for state in states)

    def _convicted(self) -> dict[str, Misbehaviour]:
        """Nodes judged lying (by this session, or by any other of the client's) within
        `spot_check_ban_seconds`, and the judgement."""
        judged = [*self.misbehaviours, *self.client.misbehaviours]
        now = time.time()
        return {m.node_id: m for m in judged if now - m.time < self.policy.spot_check_ban_seconds}

    def _convicted_hop(self) -> tuple[int, Misbehaviour] | None:
        """The first hop whose node was judged lying (see `_convicted`), and that judgement."""
        recent = self._convicted()
        if not recent:
            return None
        for index, state in enumerate(self._hops):
            if state.hop.record.node_id in recent:
                return index, recent[state.hop.record.node_id]
        return None

    def _send(self, state: _HopState, step: SentStep, codecs: StepCodecs) -> SentStep:
        """Queues `step` on the hop's stream; returns it with what the node will decode, if spot checks need it."""
        encoded: pb.Tensor = state.stream.send(step.hidden, step.positions, step.mask, codecs)
        if self._spot_checker is None or not codecs.compressed:
            return step
        return replace(step, seen=decode_hidden(state.hop, encoded, codecs))

    def _step_hop(self, state: _HopState, step: SentStep, check: bool = False) -> torch.Tensor:
        tokens = step.hidden.shape[0] * step.hidden.shape[1]
        # a checked step goes out exactly as an unchecked one would (same codecs), so a node cannot tell
        # which steps are checked; the check allows for the reply codec's error instead
        codecs = self.client.links.for_step(state.hop, *step.hidden.shape[:2])
        began = time.monotonic()
        step = self._send(state, step, codecs)
        pending = inputs = None
        if check:
            history = _joined([*state.sent, step], seen=True)
            inputs = CheckInputs(
                state.hop, history.hidden, history.positions, history.mask, step.hidden.shape[1],
                self._steps, history.hidden.shape[1] - step.hidden.shape[1], codecs.reply,
            )
            pending = self._spot_checker.start(inputs)
        try:
            output = state.stream.receive(state.deadline(tokens, self.policy.min_step_deadline))
        except StepTimeout:
            if self._replacement_route(state.hop, extra_exclude=state.hop.record.node_id) is not None:
                raise
            # nobody else could take over: a slow node is better than none
            output = state.stream.receive(self.policy.step_timeout)
        seconds = time.monotonic() - began
        state.observe(seconds, tokens)
        if tokens <= _DECODE_TOKENS:
            self.client.speeds.observe(state.hop.record.node_id, state.hop.end - state.hop.start, seconds)
        if pending is not None:
            self._spot_checker.finish(inputs, output, pending)  # raises NodeMisbehaved if the node lied
        state.sent.append(step)
        return output

    def _replacement_route(self, hop: Hop, extra_exclude: str | None = None) -> list[Hop] | None:
        exclude = {extra_exclude, *self._convicted()} - {None}
        try:
            return plan_route(
                self.client.trusted_servers(),
                self.client.model.num_blocks,
                start_block=hop.start,
                end_block=hop.end,
                exclude=exclude,
            )
        except NoRouteError:
            return None

    def _fail_over(
        self, index: int, current: SentStep | None, error: NodeUnavailableError
    ) -> tuple[list[_HopState], torch.Tensor]:
        """Replaces hop `index` after `error`; returns the new hops and their outputs for every input it had
        been sent and then `current` (if any)."""
        began = time.monotonic()
        failed = self._hops[index]
        failed.stream.close()
        replay = _joined([*failed.sent, *([current] if current is not None else [])])
        blamed, reason, busy = failed.hop.record.node_id, str(error), isinstance(error, NodeBusyError)
        # a node caught lying is already banned, for longer than a failed one
        misbehaved = isinstance(error, NodeMisbehaved)
        for _ in range(self.policy.max_failover_attempts):
            if not misbehaved:
                self.client.ban(blamed, self.client.busy_seconds if busy else None)
            misbehaved = False
            logger.warning("replacing blocks %d:%d after: %s", failed.hop.start, failed.hop.end, reason)
            route = self._wait_for_replacement(failed.hop)
            if route is None:
                raise NoRouteError(
                    f"blocks {failed.hop.start}:{failed.hop.end} lost their node ({reason}) and no other node "
                    f"served them within {self.policy.replacement_wait:.0f}s"
                ) from error
            replacements: list[_HopState] = []
            try:
                output = replay.hidden
                for hop in route:
                    blamed = hop.record.node_id
                    replacements.append(_HopState(self._open_stream(hop)))
                    output = self._replay(replacements[-1], SentStep(output, replay.positions, replay.mask))
            except NodeUnavailableError as replacement_error:
                for state in replacements:
                    state.stream.close()
                reason, busy = str(replacement_error), isinstance(replacement_error, NodeBusyError)
                continue
            self.failovers.append(
                FailoverEvent(failed.hop.record.node_id, str(error), route, replay.hidden.shape[1], time.monotonic() - began)
            )
            return replacements, output
        raise NodeUnavailableError(f"blocks {failed.hop.start}:{failed.hop.end} could not be replaced: {reason}") from error

    def _wait_for_replacement(self, hop: Hop) -> list[Hop] | None:
        """A route for `hop`'s blocks, waiting up to `replacement_wait` for a node to take them (a joining or
        rebalancing node may be on its way)."""
        deadline = time.monotonic() + self.policy.replacement_wait
        while (route := self._replacement_route(hop)) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        return route

    def _replay(self, state: _HopState, inputs: SentStep) -> torch.Tensor:
        """Sends a hop everything its predecessor had been sent, in prefill-sized chunks; returns all outputs."""
        outputs = []
        for begin in range(0, inputs.hidden.shape[1], self.prefill_chunk):
            chunk = SentStep(*(tensor[:, begin : begin + self.prefill_chunk] for tensor in (inputs.hidden, inputs.positions, inputs.mask)))
            codecs = self.client.links.for_step(state.hop, *chunk.hidden.shape[:2])
            chunk = self._send(state, chunk, codecs)
            outputs.append(state.stream.receive(self.policy.step_timeout))
            state.sent.append(chunk)
        return torch.cat(outputs, dim=1)

    def _repair_downstream(self, index: int, corrected: torch.Tensor, tolerance: float) -> torch.Tensor | None:
        """After a lying hop was replaced: `corrected` are the right outputs of the inputs it had been sent.
        If its lies had reached hop `index` (steps that were not checked), that hop's cache and those after
        it were built on wrong states: each is rebuilt on its node from corrected inputs (or replaced, if
        that fails). Returns the last hop's outputs if every hop from `index` on was rebuilt, else None."""
        while index < len(self._hops):
            stale = self._hops[index]
            was_sent = _joined(stale.sent) if stale.sent else None
            if was_sent is None or was_sent.hidden.shape != corrected.shape:
                return None  # nothing it was sent (or not the same positions) to repair
            if difference(was_sent.hidden, corrected, was_sent.mask) <= tolerance:
                return None  # it got the right states: so did every hop after it
            logger.warning("rebuilding blocks %d:%d, whose cache holds states from a lying node", stale.hop.start, stale.hop.end)
            inputs = SentStep(corrected, was_sent.positions, was_sent.mask)
            stale.stream.close()
            rebuilt = None
            try:
                rebuilt = _HopState(self._open_stream(stale.hop, fresh=True))
                corrected = self._replay(rebuilt, inputs)
                self._hops[index] = rebuilt
                index += 1
            except NodeUnavailableError as error:
                if rebuilt is not None:
                    rebuilt.stream.close()
                stale.sent = [inputs]  # a failover replays the corrected states
                replacements, corrected = self._fail_over(index, None, error)
                self._hops[index : index + 1] = replacements
                index += len(replacements)
            tolerance = max(tolerance, tolerance_for(self.policy, stale.hop.record))
        return corrected
