"""A client inference session: the chain of hops that holds one conversation's KV caches.

Each step runs through the route's hops in order. With hop-to-hop forwarding (`SessionPolicy.forwarding`,
the default) the client sends the hidden states to the first hop only and each node pushes its output
straight to the next (node.forwarding), so a token pays hops + 1 one-way trips instead of 2 x hops; every
chunk of a long input is queued on every hop at once, so chunk k+1 enters the first node while chunk k
is on the second. Every node still replies to the client with its output, off the critical path: the
client keeps each hop's inputs for failover and spot checks exactly as when it relays, and checks that
each node got what the one before it reported (a digest), or falls back to relaying. Without forwarding
the client relays every hop's output to the next. A hop whose node dies (a stream error), stalls (no answer within a deadline derived from its measured
speed) or is caught lying is replaced as swarm.failover describes: no token is lost or repeated, and
greedy output stays that of a run without the failure.

The first step and a fraction `SessionPolicy.spot_check` of the others (by default
`DEFAULT_SPOT_CHECK`) are verified on other nodes, and a node caught returning wrong hidden states is
banned and replaced the same way (see swarm.spot_check). The time of every decode step on a hop goes to
the route manager's measured speeds, which routing trusts over what nodes announce (swarm.routes).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.constants import DECODE_STEP_TOKENS, PREFILL_CHUNK_TOKENS
from edgeswarm.protocol.tensors import tensor_digest
from edgeswarm.swarm.errors import NodeUnavailableError, PushedInputError
from edgeswarm.swarm.failover import (
    Failover,
    FailoverEvent,
    HopState,
    SentStep,
    joined,
)
from edgeswarm.swarm.head import ClientHead
from edgeswarm.swarm.links import LinkCodecs, StepCodecs
from edgeswarm.swarm.policy import SessionPolicy
from edgeswarm.swarm.routes import Misbehaviour, RouteManager
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.spot_check import (
    CheckInputs,
    NodeMisbehaved,
    SpotChecker,
    SpotCheckStats,
)
from edgeswarm.swarm.transport import SpanStream, StepReply, StepTimeout


class ForwardingMismatch(Exception):
    """A node took as input other hidden states than the hop before it replied with: one of the two lies
    (which one cannot be told), so the session rebuilds the later hop from its own copy and relays."""


@dataclass
class QueuedStep:
    """A chunk queued on a hop for forwarding: what was sent, how, and whose push it waits for."""

    sent: SentStep  # the first hop's carries its hidden states; the others' are filled in on arrival
    codecs: StepCodecs
    step_id: int
    upstream: HopState | None  # the hop that pushes this step's input (None: the first hop)

logger = logging.getLogger(__name__)


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
        self.forwarding_mismatches = 0  # steps a node took other inputs than its predecessor replied, or none
        self._forwarding = policy.forwarding  # off for good after a mismatch
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
    def route_streams(self) -> list[SpanStream]:
        """The open stream of each hop, in route order."""
        return [state.stream for state in self._hops]

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
        check = self._spot_checker is not None and self._spot_checker.wants_check(self._steps)
        chunks, tokens_seen = [], self._tokens_seen
        for begin in range(0, input_ids.shape[1], self.prefill_chunk):
            chunk_ids = input_ids[:, begin : begin + self.prefill_chunk]
            chunk_mask = mask[:, begin : begin + self.prefill_chunk]
            chunks.append(SentStep(self.head.embed(chunk_ids), positions_for(chunk_mask, tokens_seen), chunk_mask))
            tokens_seen = tokens_seen + chunk_mask.long().sum(dim=1)
        forwarded = self._forwarding and len(self._hops) > 1
        queues = [self._queue_forwarded(chunk) if forwarded else {} for chunk in chunks]  # all at once: pipelined
        outputs = [self._run_hops(chunk, check, queue) for chunk, queue in zip(chunks, queues)]
        self._tokens_seen = tokens_seen
        self.length += input_ids.shape[1]
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

    def _queue_forwarded(self, chunk: SentStep) -> dict[HopState, QueuedStep]:
        """Queues `chunk` on every hop for forwarding: the first gets its hidden states, each pushes its
        output to the next. Returns what was queued on each hop."""
        queue: dict[HopState, QueuedStep] = {}
        keep_seen = self._spot_checker is not None
        for index, state in enumerate(self._hops):
            upstream = self._hops[index - 1] if index > 0 else None
            push_to = self._hops[index + 1].stream.push_target() if index + 1 < len(self._hops) else None
            codecs = self.links.for_step(state.hop, *chunk.hidden.shape[:2])
            step_id = state.stream.next_step_id
            upstream_id = upstream.hop.record.node_id if upstream is not None else ""
            sent = state.send_forwarded(chunk, codecs, keep_seen, upstream_id, push_to)
            queue[state] = QueuedStep(sent, codecs, step_id, upstream)
        return queue

    def _run_hops(self, chunk: SentStep, check: bool = False, queue: dict[HopState, QueuedStep] | None = None) -> torch.Tensor:
        """Runs one chunk through every hop; returns the last hop's output. Hops in `queue` have the
        chunk queued for forwarding already; the others are sent it by the client."""
        queue = {} if queue is None else queue
        hidden, positions, mask = chunk.hidden, chunk.positions, chunk.mask
        index, previous = 0, None
        while index < len(self._hops):
            state = self._hops[index]
            step = SentStep(hidden, positions, mask)
            try:
                if state in queue:
                    reply = self._finish_queued(state, queue.pop(state), step, check, previous)
                else:
                    reply = self._step_hop(state, step, check)
                hidden, previous = reply.hidden, (state, reply)
                index += 1
            except ForwardingMismatch as mismatch:
                logger.warning("%s; relaying this session's steps from now on", mismatch)
                self.forwarding_mismatches += 1
                self._forwarding = False
                self._failover.rebuild(self._hops, index)  # its cache holds the step on other inputs
                self._unqueue(queue, index + 1)
            except NodeUnavailableError as error:
                self._unqueue(queue, index + 1)
                replaced, replayed = self._replace(index, step, error)
                index += replaced
                previous = None
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

    def _unqueue(self, queue: dict[HopState, QueuedStep], start: int) -> None:
        """The hops from `start` on that have this chunk queued wait for pushes that will not come as
        queued (a hop before them failed): each gets a fresh stream with its past inputs, and is sent
        this chunk by the client instead."""
        index = start
        while index < len(self._hops):
            if queue.pop(self._hops[index], None) is not None:
                before = len(self._hops)
                self._failover.rebuild(self._hops, index)
                index += len(self._hops) - before
            index += 1

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

    def _step_hop(self, state: HopState, step: SentStep, check: bool = False) -> StepReply:
        """Sends `step` to `state`'s node and waits for its output."""
        # a checked step goes out exactly as an unchecked one would (same codecs), so a node cannot tell
        # which steps are checked; the check allows for the reply codec's error instead
        codecs = self.links.for_step(state.hop, *step.hidden.shape[:2])
        began = time.monotonic()
        step = state.send(step, codecs, keep_seen=self._spot_checker is not None)
        return self._complete(state, step, codecs, check, began)

    def _finish_queued(
        self, state: HopState, queued: QueuedStep, step: SentStep, check: bool, previous: tuple[HopState, StepReply] | None
    ) -> StepReply:
        """Waits for the output of a chunk queued on `state` for forwarding. `step` holds its input as the
        hop before replied it (`previous`); the client pushes it itself if that hop could not, or is not
        the one the chunk was queued to come from (it was replaced)."""
        began = time.monotonic()
        if queued.upstream is None:
            return self._complete(state, queued.sent, queued.codecs, check, began)
        upstream, upstream_reply = previous
        late_push: tuple[int, pb.Tensor] | None = (queued.step_id, upstream_reply.message)
        if upstream is not queued.upstream or upstream_reply.push_error:
            if upstream_reply.push_error:
                logger.info("pushing for node %s: %s", upstream.hop.record.node_id, upstream_reply.push_error)
            state.stream.push(queued.step_id, upstream_reply.message, self.policy.connect_timeout)
            late_push = None
        try:
            reply = self._complete(state, step, queued.codecs, check, began, late_push)
        except PushedInputError as error:
            raise ForwardingMismatch(str(error)) from error
        if reply.input_digest != tensor_digest(upstream_reply.message):
            state.sent.pop()  # its cache holds this step on other inputs: it is rebuilt without it
            raise ForwardingMismatch(
                f"node {state.hop.record.node_id} took other hidden states than node {upstream.hop.record.node_id} replied with"
            )
        return reply

    def _complete(
        self, state: HopState, step: SentStep, codecs: StepCodecs, check: bool, began: float, late_push: tuple[int, pb.Tensor] | None = None
    ) -> StepReply:
        """Waits for the output of `step`, sent to `state`'s node: spot-checked if `check`, timed, kept.
        `late_push`: (step id, input) of a step whose input the hop before was to push; if the node does not
        answer in time, the client pushes the input itself (the push may have been lost) and waits once more."""
        tokens = step.hidden.shape[0] * step.hidden.shape[1]
        pending = inputs = None
        if check:
            history = joined([*state.sent, step], seen=True)
            inputs = CheckInputs(
                state.hop, history.hidden, history.positions, history.mask, step.hidden.shape[1],
                self._steps, history.hidden.shape[1] - step.hidden.shape[1], codecs.reply,
            )
            pending = self._spot_checker.start(inputs)
        reply, pushed_late = self._await_reply(state, state.deadline(tokens, self.policy.min_step_deadline), late_push)
        if pushed_late:  # its predecessor did not push (or the push was lost): forwarding costs more than it saves
            logger.warning("node %s got no pushed input; relaying this session's steps from now on", state.hop.record.node_id)
            self.forwarding_mismatches += 1
            self._forwarding = False
        else:  # (a step that waited for a push that never came says nothing of the node's speed)
            seconds = time.monotonic() - began
            state.observe(seconds, tokens)
            if tokens <= DECODE_STEP_TOKENS:
                self.routes.observe_step(state.hop.record.node_id, state.hop.end - state.hop.start, seconds)
        if pending is not None:
            self._spot_checker.finish(inputs, reply.hidden, pending)  # raises NodeMisbehaved if the node lied
        state.sent.append(step)
        return reply

    def _await_reply(self, state: HopState, deadline: float, late_push: tuple[int, pb.Tensor] | None) -> tuple[StepReply, bool]:
        """The node's answer within `deadline` seconds, and whether the client had to push its input: if
        `late_push` is given and the node is silent, the client pushes it itself and waits once more. A node
        that stays silent counts as stalled (StepTimeout) only if another node could take over, else it is
        waited for up to the policy's step timeout."""
        try:
            return state.stream.receive_reply(deadline), False
        except StepTimeout as silent:
            timeout = silent
        if late_push is not None:
            logger.info("no answer from node %s: pushing its input itself", state.hop.record.node_id)
            try:
                state.stream.push(*late_push, self.policy.connect_timeout)
                return state.stream.receive_reply(deadline), True
            except StepTimeout:
                pass
            except NodeUnavailableError:  # it takes no push either: it is the one that stalls
                raise timeout from None
        if self.routes.replacement(state.hop, exclude={state.hop.record.node_id}) is not None:
            raise timeout
        # nobody else could take over: a slow node is better than none
        return state.stream.receive_reply(self.policy.step_timeout), late_push is not None
