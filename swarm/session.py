"""A client inference session: the chain of hops that holds one conversation's KV caches.

Each step runs through the route's hops in order; the client relays every hop's output to the next.
A hop whose node dies (a stream error), stalls (no answer within a deadline derived from its measured
speed) or is caught lying is replaced as swarm.failover describes: no token is lost or repeated, and
greedy output stays that of a run without the failure.

The first step and a fraction `SessionPolicy.spot_check` of the others (by default
`DEFAULT_SPOT_CHECK`) are verified on other nodes, and a node caught returning wrong hidden states is
banned and replaced the same way (see swarm.spot_check). The time of every decode step on a hop goes to
the route manager's measured speeds, which routing trusts over what nodes announce (swarm.routes).
"""

from __future__ import annotations

import time
import uuid

import torch

from edgeswarm.protocol.constants import DECODE_STEP_TOKENS, PREFILL_CHUNK_TOKENS
from edgeswarm.swarm.errors import NodeUnavailableError
from edgeswarm.swarm.failover import (
    Failover,
    FailoverEvent,
    HopState,
    SentStep,
    joined,
)
from edgeswarm.swarm.head import ClientHead
from edgeswarm.swarm.links import LinkCodecs
from edgeswarm.swarm.policy import SessionPolicy
from edgeswarm.swarm.routes import Misbehaviour, RouteManager
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.spot_check import (
    CheckInputs,
    NodeMisbehaved,
    SpotChecker,
    SpotCheckStats,
)
from edgeswarm.swarm.transport import SpanStream, StepTimeout


def positions_for(padding_mask: torch.Tensor, tokens_before: torch.Tensor) -> torch.Tensor:
    """Rotary positions of new tokens: each row counts only its real tokens, as transformers does.

    padding_mask: [batch, length] bool for the new tokens; tokens_before: [batch] real tokens already seen.
    Padding gets position 0 (it is never attended to, so its position only needs to be valid).
    """
    counts = tokens_before[:, None] + padding_mask.long().cumsum(dim=1)
    return torch.where(padding_mask, counts - 1, torch.zeros_like(counts))


class InferenceSession:
    """Step-by-step inference through the swarm. Use as a context manager, or call `close()`.

    Each `step(input_ids)` appends tokens to every hop's KV cache and returns the logits of the last
    position of every row. Long inputs are sent in chunks of `prefill_chunk` tokens. The session runs
    `route` (default: the route manager's best) with the client's `head` (embeddings and LM head) and
    link codecs (`links`).
    """

    def __init__(
        self,
        routes: RouteManager,
        head: ClientHead,
        links: LinkCodecs,
        policy: SessionPolicy,
        max_length: int,
        route: list[Hop] | None = None,
        prefill_chunk: int = PREFILL_CHUNK_TOKENS,
    ):
        self.routes, self.head, self.links, self.policy = routes, head, links, policy
        self.max_length = max_length
        self.prefill_chunk = prefill_chunk
        self.session_id = uuid.uuid4().hex
        self.length = 0  # positions appended so far (padding included)
        self.misbehaviours: list[Misbehaviour] = []  # nodes caught lying by this session's spot checks
        self.spot_checks = SpotCheckStats()
        self._spot_checker = (
            SpotChecker(routes, policy, self.session_id, self.spot_checks, self.misbehaviours) if policy.spot_check > 0 else None
        )
        self._failover = Failover(routes, links, policy, self._open_stream, prefill_chunk, keep_seen=self._spot_checker is not None)
        self._steps = 0  # step() calls so far
        self._streams_opened = 0
        self._tokens_seen: torch.Tensor | None = None  # [batch] real tokens so far
        self._hops: list[HopState] = []
        try:
            for hop in routes.route() if route is None else route:
                self._hops.append(HopState(self._open_stream(hop)))
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
    def failovers(self) -> list[FailoverEvent]:
        """Every hop replacement so far."""
        return self._failover.events

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
        return SpanStream(hop, session_id, self.routes.model_id, self.max_length, self.policy.connect_timeout, self.routes.identity)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
        """Feeds [batch, length] token ids (0 in attention_mask marks left padding); returns the [batch, vocab]
        logits of the last position, or with `all_logits` the [batch, length, vocab] logits of every one."""
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
        outputs = []
        check = self._spot_checker is not None and self._spot_checker.wants_check(self._steps)
        for begin in range(0, input_ids.shape[1], self.prefill_chunk):
            chunk_ids = input_ids[:, begin : begin + self.prefill_chunk]
            chunk_mask = mask[:, begin : begin + self.prefill_chunk]
            positions = positions_for(chunk_mask, self._tokens_seen)
            outputs.append(self._run_hops(self.head.embed(chunk_ids), positions, chunk_mask, check))
            self._tokens_seen = self._tokens_seen + chunk_mask.long().sum(dim=1)
            self.length += chunk_ids.shape[1]
        self._steps += 1
        return self.head.logits(torch.cat(outputs, dim=1)) if all_logits else self.head.logits(outputs[-1][:, -1])

    def roll_back(self, length: int) -> None:
        """Forgets every position from `length` on, as if they had never been fed (speculative tokens that
        were not accepted); every node drops them from its KV cache with the next step."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll a session of {self.length} positions back to {length}")
        if length == self.length:
            return
        dropped = joined(self._hops[0].sent).mask[:, length:] if self._hops else None
        if dropped is not None:
            self._tokens_seen = self._tokens_seen - dropped.long().sum(dim=1)
        for state in self._hops:
            state.roll_back(length)
        self.length = length

    # --- running the chain -------------------------------------------------------------------------

    def _run_hops(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, check: bool = False) -> torch.Tensor:
        index = 0
        while index < len(self._hops):
            step = SentStep(hidden, positions, mask)
            try:
                hidden = self._step_hop(self._hops[index], step, check)
                index += 1
            except NodeUnavailableError as error:
                replaced, replayed = self._replace(index, step, error)
                index += replaced
                length = step.hidden.shape[1]
                hidden = replayed[:, replayed.shape[1] - length :]
                if isinstance(error, NodeMisbehaved):  # its past outputs may have been lies too
                    corrected = replayed[:, : replayed.shape[1] - length]
                    self._failover.repair_downstream(self._hops, index, corrected, self._failover.tolerance(self._hops[index - replaced : index]))
        # a node judged lying during this step (as a verifier, or by another session of the client) may
        # run another hop of this session: it is replaced before this step's output is used
        while (found := self._convicted_hop()) is not None:
            index, misbehaviour = found
            length = hidden.shape[1]
            replaced, replayed = self._replace(index, None, NodeMisbehaved(misbehaviour))
            after = index + replaced
            tolerance = self._failover.tolerance(self._hops[index:after])
            rebuilt = self._failover.repair_downstream(self._hops, after, replayed, tolerance)
            if after == len(self._hops):
                hidden = replayed[:, replayed.shape[1] - length :]
            elif rebuilt is not None:
                hidden = rebuilt[:, rebuilt.shape[1] - length :]
        return hidden

    def _replace(self, index: int, current: SentStep | None, error: NodeUnavailableError) -> tuple[int, torch.Tensor]:
        """Replaces hop `index` (swarm.failover); returns how many hops took its place and their outputs."""
        before = len(self._hops)
        replayed = self._failover.replace(self._hops, index, current, error)
        return len(self._hops) - before + 1, replayed

    def _convicted_hop(self) -> tuple[int, Misbehaviour] | None:
        """The first hop whose node was judged lying (by any session of the client) within
        `spot_check_ban_seconds`, and that judgement."""
        recent = self.routes.convicted(self.policy.spot_check_ban_seconds)
        for index, state in enumerate(self._hops):
            if state.hop.record.node_id in recent:
                return index, recent[state.hop.record.node_id]
        return None

    def _step_hop(self, state: HopState, step: SentStep, check: bool = False) -> torch.Tensor:
        tokens = step.hidden.shape[0] * step.hidden.shape[1]
        # a checked step goes out exactly as an unchecked one would (same codecs), so a node cannot tell
        # which steps are checked; the check allows for the reply codec's error instead
        codecs = self.links.for_step(state.hop, *step.hidden.shape[:2])
        began = time.monotonic()
        step = state.send(step, codecs, keep_seen=self._spot_checker is not None)
        pending = inputs = None
        if check:
            history = joined([*state.sent, step], seen=True)
            inputs = CheckInputs(
                state.hop, history.hidden, history.positions, history.mask, step.hidden.shape[1],
                self._steps, history.hidden.shape[1] - step.hidden.shape[1], codecs.reply,
            )
            pending = self._spot_checker.start(inputs)
        try:
            output = state.stream.receive(state.deadline(tokens, self.policy.min_step_deadline))
        except StepTimeout:
            if self.routes.replacement(state.hop, exclude={state.hop.record.node_id}) is not None:
                raise
            # nobody else could take over: a slow node is better than none
            output = state.stream.receive(self.policy.step_timeout)
        seconds = time.monotonic() - began
        state.observe(seconds, tokens)
        if tokens <= DECODE_STEP_TOKENS:
            self.routes.observe_step(state.hop.record.node_id, state.hop.end - state.hop.start, seconds)
        if pending is not None:
            self._spot_checker.finish(inputs, output, pending)  # raises NodeMisbehaved if the node lied
        state.sent.append(step)
        return output
