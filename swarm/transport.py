"""gRPC plumbing on the client side: channels to nodes and a stream per hop with per-step deadlines."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import grpc
import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol import channels
from edgeswarm.protocol.busy import busy_retry_after
from edgeswarm.protocol.codecs import decode_tensor, encode_tensor, encoded_size
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.protocol.tensors import (
    MESSAGE_SIZE_OPTIONS,
    TensorDecodeError,
    serialize_tensor,
)
from edgeswarm.swarm.errors import (
    NodeBusyError,
    NodeUnavailableError,
    PushedInputError,
    RemoteError,
)
from edgeswarm.swarm.links import RAW, StepCodecs
from edgeswarm.swarm.routing import Hop

_END = object()


# Statuses that say the request itself is wrong: any other node would refuse it too.
_CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def open_channel(record: ServerRecord, connect_timeout: float, identity: NodeIdentity | None = None) -> grpc.Channel:
    """A channel to the node of `record` that is known to answer, or NodeUnavailableError within
    `connect_timeout` (calls signed by `identity`, over TLS as protocol.channels decides)."""
    address = record.address
    channel = channels.open_channel(address, record.node_id, options=MESSAGE_SIZE_OPTIONS, identity=identity)
    try:
        grpc.channel_ready_future(channel).result(timeout=connect_timeout)
    except grpc.FutureTimeoutError as error:
        channel.close()
        raise NodeUnavailableError(f"node at {address} did not answer within {connect_timeout:.1f}s", record.node_id) from error
    return channel


def remote_error(hop: Hop, error: grpc.RpcError) -> Exception:
    """Turns a gRPC failure into a client error naming the node, its blocks, the status and the reason."""
    where = f"node {hop.record.node_id} at {hop.record.address} (blocks {hop.start}:{hop.end})"
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "error"
    if code == grpc.StatusCode.DATA_LOSS:
        return PushedInputError(f"{where} refused its pushed input: {details}", hop.record.node_id)
    if code in _CALLER_ERRORS:
        return RemoteError(f"{where} refused the request: {name}: {details}", hop.record.node_id)
    retry_after = busy_retry_after(error)
    if retry_after is not None:
        return NodeBusyError(f"{where} is busy: {details}", hop.record.node_id, retry_after)
    return NodeUnavailableError(f"{where} failed: {name}: {details}", hop.record.node_id)


def encode_hidden(hidden: torch.Tensor, codecs: StepCodecs, boundary: int) -> pb.Tensor:
    """Hidden states entering block `boundary`, in the step's request codec."""
    if not codecs.compressed:
        return serialize_tensor(hidden)
    return encode_tensor(hidden, codecs.request, basis=codecs.basis, boundary=boundary)


def decode_hidden(hop: Hop, message: pb.Tensor, codecs: StepCodecs) -> torch.Tensor:
    """A node's output hidden states, whatever codec it used; RemoteError if they do not decode."""
    bases = {codecs.basis.digest: codecs.basis} if codecs.basis is not None else None
    try:
        return decode_tensor(message, bases=bases)
    except TensorDecodeError as error:
        raise RemoteError(f"node {hop.record.node_id} sent a malformed tensor: {error}", hop.record.node_id) from error


def forward_hop(
    hop: Hop,
    model_id: str,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    timeout: float,
    connect_timeout: float,
    codecs: StepCodecs = RAW,
    channel: grpc.Channel | None = None,
    identity: NodeIdentity | None = None,
) -> torch.Tensor:
    """One stateless Forward of blocks [hop.start, hop.end) on hop's node over whole sequences (no KV cache);
    returns the output hidden states of every position. NodeUnavailableError or RemoteError on failure.

    `channel`: an open channel to the node, kept open; without one, a channel is opened and closed, and
    closing a channel just opened waits for grpc's connectivity poller (up to 0.2 s): callers that make
    several calls to a node should keep a channel. `identity` signs the calls (default: this process's).
    """
    own_channel = channel is None
    if own_channel:
        channel = open_channel(hop.record, connect_timeout, identity)
    try:
        request = pb.ForwardRequest(
            model_id=model_id,
            start_block=hop.start,
            end_block=hop.end,
            hidden_states=encode_hidden(hidden, codecs, hop.start),
            position_ids=serialize_tensor(positions),
            attention_mask=serialize_tensor(mask),
            reply_codec=codecs.reply,
        )
        response = pb_grpc.BlockServiceStub(channel).Forward(request, timeout=timeout)
    except grpc.RpcError as error:
        raise remote_error(hop, error) from error
    finally:
        if own_channel:
            channel.close()
    return decode_hidden(hop, response.hidden_states, codecs)


class StepTimeout(NodeUnavailableError):
    """A node has not answered a step within its deadline; it may still answer later."""


@dataclass
class StepReply:
    """A node's answer to one session step."""

    hidden: torch.Tensor  # its output, decoded
    message: pb.Tensor  # its output as it came on the link (and as the node pushed it to the next hop)
    input_digest: bytes  # for a step whose input was pushed: the digest of that input as the node got it
    push_error: str  # for a step with a push target: why the push failed, if it did


class SpanStream:
    """One hop of an inference session: a bidirectional stream whose server keeps this hop's KV cache.

    Responses are read by a background thread into a queue, so that each step can wait with a deadline
    instead of blocking forever on a node that stopped answering.
    """

    def __init__(
        self, hop: Hop, session_id: str, model_id: str, max_length: int, connect_timeout: float, identity: NodeIdentity | None = None
    ):
        self.hop, self.session_id = hop, session_id
        self._channel = open_channel(hop.record, connect_timeout, identity)
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        opening = pb.SessionOpen(
            session_id=session_id, model_id=model_id, start_block=hop.start, end_block=hop.end, max_length=max_length
        )
        self._requests.put(pb.SessionRequest(open=opening))
        stub = pb_grpc.BlockServiceStub(self._channel)
        self._call = stub.InferenceSession(iter(self._requests.get, _END))
        self._reader = threading.Thread(target=self._read_responses, daemon=True, name=f"hop-{hop.start}")
        self._reader.start()
        self._next_step_id = 0
        self._codecs: list[StepCodecs] = []  # of each step not answered yet, oldest first
        self.bytes_sent = 0  # hidden-state bytes on the link, as encoded
        self.bytes_received = 0

    def _read_responses(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(_END)
        except grpc.RpcError as error:
            self._responses.put(error)

    @property
    def next_step_id(self) -> int:
        """The id the next step sent on this stream will carry."""
        return self._next_step_id

    def send(
        self,
        hidden: torch.Tensor | None,
        positions: torch.Tensor,
        mask: torch.Tensor,
        codecs: StepCodecs = RAW,
        truncate_to: int | None = None,
        push_to: pb.PushTarget | None = None,
        upstream: str = "",
    ) -> pb.Tensor | None:
        """Queues one step for the node, its hidden states in `codecs.request`, its reply asked in `codecs.reply`;
        with `truncate_to`, the node first forgets its cached positions from that one on. With `push_to`,
        the node also pushes its output to that next hop. With `upstream` (and no `hidden`), the hidden
        states come as a push from that node (or from `push`). Returns the hidden states as encoded on the
        link (what the node will decode), if the step carries them."""
        encoded = None if hidden is None else encode_hidden(hidden, codecs, self.hop.start)
        if encoded is not None:
            self.bytes_sent += encoded_size(encoded)
        step = pb.SessionStep(
            step_id=self._next_step_id,
            hidden_states=encoded,
            position_ids=serialize_tensor(positions),
            attention_mask=serialize_tensor(mask),
            reply_codec=codecs.reply,
            truncate_to=truncate_to,
            push_to=push_to,
            upstream=upstream,
        )
        self._requests.put(pb.SessionRequest(step=step))
        self._codecs.append(codecs)
        self._next_step_id += 1
        return encoded

    def push_target(self) -> pb.PushTarget:
        """Where the previous hop pushes the input of the next step sent on this stream."""
        return pb.PushTarget(
            node_id=self.hop.record.node_id, session_id=self.session_id, start_block=self.hop.start, end_block=self.hop.end,
            step_id=self._next_step_id,
        )

    def push(self, step_id: int, hidden: pb.Tensor, timeout: float) -> None:
        """Hands the node the input of a step sent with an `upstream` that did not push it (the client
        standing in for a hop); NodeUnavailableError or RemoteError if the node does not take it."""
        request = pb.PushRequest(
            session_id=self.session_id, start_block=self.hop.start, end_block=self.hop.end, step_id=step_id, hidden_states=hidden
        )
        try:
            pb_grpc.BlockServiceStub(self._channel).PushStep(request, timeout=timeout)
        except grpc.RpcError as error:
            raise remote_error(self.hop, error) from error
        self.bytes_sent += encoded_size(hidden)

    def receive(self, timeout: float) -> torch.Tensor:
        """The output of the oldest unanswered step; StepTimeout if it takes longer than `timeout` seconds."""
        return self.receive_reply(timeout).hidden

    def receive_reply(self, timeout: float) -> StepReply:
        """The answer to the oldest unanswered step; StepTimeout if it takes longer than `timeout` seconds."""
        step_id = self._next_step_id - len(self._codecs)
        try:
            response = self._responses.get(timeout=timeout)
        except queue.Empty:
            where = f"node {self.hop.record.node_id} at {self.hop.record.address}"
            raise StepTimeout(f"{where} gave no answer to step {step_id} within {timeout:.2f}s", self.hop.record.node_id) from None
        if isinstance(response, grpc.RpcError):
            raise remote_error(self.hop, response)
        if response is _END or response.step_id != step_id:
            raise NodeUnavailableError(f"node {self.hop.record.node_id} ended the session or answered out of order", self.hop.record.node_id)
        self.bytes_received += encoded_size(response.hidden_states)
        hidden = decode_hidden(self.hop, response.hidden_states, self._codecs.pop(0))
        return StepReply(hidden, response.hidden_states, response.input_digest, response.push_error)

    def close(self) -> None:
        """Ends the stream (the server frees the session's cache) and the channel."""
        self._requests.put(_END)
        self._call.cancel()
        self._channel.close()
