"""The gRPC data plane of a node: stateless forwards, inference sessions with a KV cache, and node info."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import psutil
import torch

from edgeswarm.model.profiling import kv_bytes_per_token
from edgeswarm.model.span import SpanCache, TransformerSpan
from edgeswarm.node.admission import (
    ADMIN,
    ADMIN_SLOTS,
    CALLS_BEYOND_THREADS,
    FORWARD_SLOTS,
    FORWARDS,
    SESSION_SLOTS,
    SESSIONS,
    SESSIONS_PER_CLIENT,
    TASK_SLOTS,
    TASKS,
    THREAD_HEADROOM,
    AdmissionInterceptor,
    CallSlots,
)
from edgeswarm.node.batching import MAX_BATCH, StepBatcher
from edgeswarm.node.forwarding import (
    UPSTREAM_WAIT,
    Mailbox,
    MailboxFull,
    Pusher,
    PushRefused,
)
from edgeswarm.node.kv_budget import MAX_SESSION_BATCH, BusyError, KVBudget
from edgeswarm.node.session_slots import CROWDED_IDLE_TIMEOUT, SessionSlots
from edgeswarm.node.validation import (
    InvalidRequest,
    StepInputs,
    check_reply_codec,
    decode_step_inputs,
)
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.busy import abort_busy
from edgeswarm.protocol.call_auth import CallAuthenticator, CallAuthInterceptor
from edgeswarm.protocol.codecs import CODECS, CodecError, SemanticBasis, encode_tensor
from edgeswarm.protocol.constants import PREFILL_CHUNK_TOKENS
from edgeswarm.protocol.principals import principal_of
from edgeswarm.protocol.request_parsing import add_servicer
from edgeswarm.protocol.tensors import (
    MESSAGE_SIZE_OPTIONS,
    serialize_tensor,
    tensor_digest,
)

logger = logging.getLogger(__name__)

MAX_ECHO_BYTES = 8 * 1024 * 1024


@dataclass
class ServiceLimits:
    """Bounds a node puts on what one client may ask of it."""

    max_session_length: int = 8192
    max_session_batch: int = MAX_SESSION_BATCH  # sequences one session (or Forward) may carry
    max_batch: int = MAX_BATCH  # decode steps of this many sessions at most run as one forward
    prefill_chunk: int = PREFILL_CHUNK_TOKENS  # longer steps run in chunks of this many tokens, with other sessions' decodes between
    kv_memory_bytes: int = 1 << 30  # KV-cache room all open sessions may reserve together
    session_idle_timeout: float = 300.0  # a session with no step for this long is closed and its cache freed
    # call slots per pool (node.admission), and how sessions share theirs (node.session_slots)
    session_slots: int = SESSION_SLOTS
    sessions_per_client: int = SESSIONS_PER_CLIENT
    crowded_idle_timeout: float = CROWDED_IDLE_TIMEOUT  # when slots are short, a session idle this long makes way
    forward_slots: int = FORWARD_SLOTS
    task_slots: int = TASK_SLOTS
    admin_slots: int = ADMIN_SLOTS

    def __post_init__(self) -> None:  # the pools check their own sizes (node.admission, node.session_slots)
        if self.max_session_batch < 1:
            raise ValueError(f"max_session_batch must be at least 1, got {self.max_session_batch}")

    @property
    def worker_threads(self) -> int:
        """Threads of the gRPC server: one per slot of every pool, and headroom for refusals."""
        return self.session_slots + self.forward_slots + self.task_slots + self.admin_slots + THREAD_HEADROOM

    @property
    def max_concurrent_rpcs(self) -> int:
        """grpc's own limit on calls in flight: above the pools, as a last backstop only."""
        return self.worker_threads + CALLS_BEYOND_THREADS


class BlockServicer(pb_grpc.BlockServiceServicer):
    """Serves one span of blocks. All compute runs on one thread, which batches the decode steps of
    concurrent sessions (node.batching); torch uses every core for large steps.

    Each request keeps the span it started with, so `replace_span` (a rebalancing move) never breaks
    a session in flight: old sessions finish on the old blocks while new ones get the new blocks.
    After `stop_accepting` (a node leaving), new requests are refused as UNAVAILABLE.
    """

    def __init__(
        self,
        span: TransformerSpan,
        model_id: str,
        node_id: str,
        throughput: float,
        limits: ServiceLimits,
        load_rss_growth: int = 0,
        clock: Callable[[], float] = time.monotonic,
        pusher: Pusher | None = None,
    ):
        self.span, self.model_id, self.node_id = span, model_id, node_id
        self.pusher = pusher  # pushes outputs to the next hops of forwarded sessions (None: this node does not)
        self.throughput = throughput
        self.load_rss_growth = load_rss_growth
        self.limits = limits
        self.batcher = StepBatcher(max_batch=limits.max_batch, prefill_chunk=limits.prefill_chunk)
        self.kv_budget = KVBudget(limits.kv_memory_bytes, kv_bytes_per_token(span.config))
        # the session pool of node.admission; `clock` measures how long sessions have been idle
        self.session_slots = SessionSlots(
            limits.session_slots, limits.sessions_per_client, limits.session_idle_timeout, limits.crowded_idle_timeout, clock
        )
        self._sessions: dict[str, SpanCache] = {}
        self._mailboxes: dict[str, Mailbox] = {}  # pushed inputs of each open session (node.forwarding)
        self._sessions_lock = threading.Lock()
        self.accepting = True
        self.semantic_basis: SemanticBasis | None = None  # set once fitted or loaded (see model.calibration)
        threading.Thread(target=self._evict_idle_sessions, name="idle-sessions", daemon=True).start()

    @property
    def announced_throughput(self) -> float:
        """The decode throughput this node announces: the one it measured."""
        return self.throughput

    @property
    def bases(self) -> dict[str, SemanticBasis]:
        basis = self.semantic_basis
        return {} if basis is None else {basis.digest: basis}

    # --- helpers ---------------------------------------------------------------------------------

    def _admit(self, context: grpc.ServicerContext, model_id: str, start: int, end: int) -> TransformerSpan:
        """The span a new request will use, after checking that it may be served here."""
        span = self.span
        if not self.accepting:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this node is leaving the swarm and takes no new requests")
        if model_id != self.model_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"this node serves model {self.model_id!r}, not {model_id!r}")
        if not span.start <= start < end <= span.end:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"blocks {start}:{end} are not within this node's span {span.start}:{span.end}",
            )
        return span

    def _decode(
        self, span: TransformerSpan, hidden: pb.Tensor, positions: pb.Tensor, mask: pb.Tensor, reply_codec: str
    ) -> StepInputs:
        bases = self.bases
        check_reply_codec(reply_codec, bases)
        inputs = decode_step_inputs(
            hidden,
            positions,
            mask,
            hidden_size=span.config.hidden_size,
            max_position=self.limits.max_session_length,
            bases=bases,
        )
        if inputs.hidden_states.shape[0] > self.limits.max_session_batch:
            raise InvalidRequest(
                f"a batch of {inputs.hidden_states.shape[0]} sequences is above this node's limit of "
                f"{self.limits.max_session_batch}"
            )
        return inputs

    def _run(
        self,
        span: TransformerSpan,
        inputs: StepInputs,
        start: int,
        end: int,
        cache: SpanCache | None,
        reply_codec: str,
    ) -> pb.Tensor:
        output = self.batcher.run(span, inputs.hidden_states, inputs.position_ids, inputs.padding_mask, start, end, cache)
        return self._encode_reply(output.to(inputs.wire_dtype), reply_codec, boundary=end)

    def _encode_reply(self, output: torch.Tensor, codec: str, boundary: int) -> pb.Tensor:
        """The output in the codec the client asked for; the lossless codec when that codec cannot carry it
        (e.g. values beyond float16's range). The message names the codec used, so the client can tell."""
        if not codec:
            return serialize_tensor(output)
        try:
            return encode_tensor(output, codec, basis=self.semantic_basis, boundary=boundary)
        except CodecError as error:
            logger.info("reply codec %s cannot carry this output (%s); sending it lossless", codec, error)
            return encode_tensor(output, "lossless")

    @property
    def kv_cache_bytes(self) -> int:
        with self._sessions_lock:
            return sum(cache.nbytes() for cache in self._sessions.values())

    @property
    def active_sessions(self) -> int:
        with self._sessions_lock:
            return len(self._sessions)

    def _evict_idle_sessions(self) -> None:
        """Closes sessions that sent no step for `session_idle_timeout` seconds; their caches are freed
        when their streams end (the client sees CANCELLED and fails over if it comes back)."""
        period = max(0.5, min(30.0, self.limits.session_idle_timeout / 4))
        while True:
            time.sleep(period)
            self.session_slots.close_idle()

    def replace_span(self, span: TransformerSpan, throughput: float) -> None:
        """Serves `span` to new requests from now on; requests in flight keep the span they started with."""
        self.span, self.throughput = span, throughput

    def stop_accepting(self) -> None:
        self.accepting = False

    # --- RPCs ------------------------------------------------------------------------------------

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        span = self._admit(context, request.model_id, request.start_block, request.end_block)
        try:
            inputs = self._decode(
                span, request.hidden_states, request.position_ids, request.attention_mask, request.reply_codec
            )
        except InvalidRequest as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        output = self._run(span, inputs, request.start_block, request.end_block, None, request.reply_codec)
        return pb.ForwardResponse(hidden_states=output)

    def InferenceSession(
        self, request_iterator: Iterator[pb.SessionRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SessionResponse]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("open"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a session must start with an `open` message")
        opening = first.open
        span = self._admit(context, opening.model_id, opening.start_block, opening.end_block)
        if not 0 < opening.max_length <= self.limits.max_session_length:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_length must be in [1, {self.limits.max_session_length}]")
        # one client session may pass through this node twice (e.g. after a move), once per span
        session_id = _session_key(opening.session_id or str(id(context)), opening.start_block, opening.end_block)
        cache = SpanCache()
        caller = principal_of(context)
        mailbox = Mailbox(caller.id if caller is not None else None)
        context.add_callback(mailbox.close)  # a step waiting for its pushed input ends with the stream
        with self._sessions_lock:
            if session_id in self._sessions:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"session {session_id!r} is already open here")
            try:
                self.kv_budget.admit(session_id, opening.max_length, blocks=opening.end_block - opening.start_block)
            except BusyError as error:
                abort_busy(context, error)
            self._sessions[session_id] = cache
            self._mailboxes[session_id] = mailbox
        try:
            yield from self._serve_session(request_iterator, context, opening, span, cache, session_id, mailbox)
        finally:
            mailbox.close()
            with self._sessions_lock:
                self._sessions.pop(session_id, None)
                self._mailboxes.pop(session_id, None)
                self.kv_budget.release(session_id)

    def _serve_session(
        self,
        request_iterator: Iterator[pb.SessionRequest],
        context: grpc.ServicerContext,
        opening: pb.SessionOpen,
        span: TransformerSpan,
        cache: SpanCache,
        session_id: str,
        mailbox: Mailbox,
    ) -> Iterator[pb.SessionResponse]:
        last_step_id = -1
        for request in request_iterator:
            with self.session_slots.working(context):  # idle again once the reply is handed to the client
                if not request.HasField("step"):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only `step` messages may follow `open`")
                step = request.step
                if step.step_id <= last_step_id:  # a replayed or reordered step would append its tokens twice
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"step {step.step_id} is replayed: this session is past step {last_step_id}"
                    )
                last_step_id = step.step_id
                if step.HasField("truncate_to"):  # speculative tokens the client did not accept
                    if not 0 <= step.truncate_to <= cache.length:
                        context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"truncate_to {step.truncate_to} is outside this session's cache of {cache.length} positions",
                        )
                    cache.truncate(step.truncate_to)
                hidden, input_digest = self._step_input(step, mailbox, context)
                try:
                    inputs = self._decode(span, hidden, step.position_ids, step.attention_mask, step.reply_codec)
                except InvalidRequest as error:
                    # a pushed input that does not fit is not (only) the caller's fault: DATA_LOSS tells it apart
                    code = grpc.StatusCode.DATA_LOSS if step.upstream else grpc.StatusCode.INVALID_ARGUMENT
                    context.abort(code, f"the pushed input of step {step.step_id} does not fit: {error}" if step.upstream else str(error))
                try:
                    batch, length = inputs.hidden_states.shape[:2]
                    if cache.batch_size is not None and batch != cache.batch_size:
                        raise InvalidRequest(f"session has batch size {cache.batch_size}, step has {batch}")
                    if cache.length + length > opening.max_length:
                        raise InvalidRequest(
                            f"step would grow the session to {cache.length + length} tokens, above its max_length "
                            f"{opening.max_length}"
                        )
                except InvalidRequest as error:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                try:  # the session reserved room for one sequence: its first step shows how many it runs
                    self.kv_budget.grow(session_id, batch)
                except BusyError as error:
                    abort_busy(context, error)
                output = self._run(span, inputs, opening.start_block, opening.end_block, cache, step.reply_codec)
                push_error = self._push(step.push_to, output) if step.HasField("push_to") else ""
            yield pb.SessionResponse(
                step_id=step.step_id, hidden_states=output, cache_length=cache.length, input_digest=input_digest, push_error=push_error
            )

    def _step_input(self, step: pb.SessionStep, mailbox: Mailbox, context: grpc.ServicerContext) -> tuple[pb.Tensor, bytes]:
        """A step's input hidden states: in the step, or for a forwarded step (`upstream`) pushed into the
        session (node.forwarding), with the digest of what was pushed."""
        if not step.upstream:
            mailbox.skip_through(step.step_id)
            return step.hidden_states, b""
        if step.HasField("hidden_states"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a step that names its upstream carries no hidden states")
        pushed = mailbox.take(step.step_id, step.upstream, UPSTREAM_WAIT)
        if pushed is None:
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the input of step {step.step_id} did not come from node {step.upstream} within {UPSTREAM_WAIT:.0f}s",
            )
        return pushed, tensor_digest(pushed)

    def _push(self, target: pb.PushTarget, output: pb.Tensor) -> str:
        """Pushes a step's output to the next hop; why it could not, or ""."""
        if self.pusher is None:
            return "this node does not push to other nodes"
        if not target.node_id or target.node_id == self.node_id:
            return "the next hop must be another node"
        return self.pusher.push(target, output)

    def NodeInfo(self, request: pb.NodeInfoRequest, context: grpc.ServicerContext) -> pb.NodeInfoResponse:
        return pb.NodeInfoResponse(
            node_id=self.node_id,
            model_id=self.model_id,
            start_block=self.span.start,
            end_block=self.span.end,
            num_parameters=self.span.num_parameters,
            rss_bytes=psutil.Process().memory_info().rss,
            active_sessions=self.active_sessions,
            kv_cache_bytes=self.kv_cache_bytes,
            throughput=self.throughput,
            load_rss_growth_bytes=self.load_rss_growth,
            codecs=self.codecs,
            semantic_basis=self.semantic_basis.digest if self.semantic_basis else "",
            weight_quant=self.span.quant,
            weight_bytes=self.span.weight_bytes,
            batched_decode_steps=self.batcher.batched_steps,
            kv_reserved_bytes=self.kv_budget.used_bytes,
            evicted_sessions=self.session_slots.evicted,
        )

    @property
    def codecs(self) -> list[str]:
        """The activation codecs this node reads and writes now (semantic only once it holds a basis)."""
        return [name for name in CODECS if name != "semantic" or self.semantic_basis is not None]

    def PushStep(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushReply:
        """Takes a step's input for a forwarded session open here, from its previous hop or its client."""
        key = _session_key(request.session_id, request.start_block, request.end_block)
        with self._sessions_lock:
            mailbox = self._mailboxes.get(key)
        if mailbox is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r} on blocks {request.start_block}:{request.end_block} is open here")
        caller = principal_of(context)
        try:
            mailbox.put(request.step_id, caller.id if caller is not None else context.peer(), request.hidden_states)
        except MailboxFull as full:
            abort_busy(context, full)
        except PushRefused as refused:
            context.abort(refused.code, str(refused))
        return pb.PushReply()

    def Echo(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoResponse:
        if not 0 <= request.reply_bytes <= MAX_ECHO_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"reply_bytes must be in [0, {MAX_ECHO_BYTES}]")
        return pb.EchoResponse(payload=bytes(request.reply_bytes))


def _session_key(session_id: str, start: int, end: int) -> str:
    """How a node names a session: a client's session may pass through one node twice, once per span."""
    return f"{session_id}:{start}:{end}"


def start_grpc_server(
    servicer: BlockServicer,
    host: str,
    port: int,
    authenticator: CallAuthenticator,
    add_services: Callable[[grpc.Server, int], None] | None = None,
    tls: tuple[bytes, bytes] | None = None,
) -> tuple[grpc.Server, int]:
    """Starts the data plane on host:port (port 0 picks a free one) and returns the server and its port.

    Every call must pass `authenticator` (protocol.call_auth: a member's signed credential, and the swarm
    key in a private swarm). `add_services(server, port)` may add more services once the port is known,
    before the server starts. With `tls` (certificate PEM, key PEM), it serves over TLS only. Calls are
    admitted to separate slot pools sized by `servicer.limits` (node.admission).
    """
    options = [*MESSAGE_SIZE_OPTIONS, ("grpc.so_reuseport", 0)]
    limits = servicer.limits
    pools = {
        SESSIONS: servicer.session_slots,
        FORWARDS: CallSlots(FORWARDS, limits.forward_slots),
        TASKS: CallSlots(TASKS, limits.task_slots),
        ADMIN: CallSlots(ADMIN, limits.admin_slots),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.worker_threads),
        options=options,
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        # admission after authentication: the pools count calls by their caller's principal
        interceptors=[CallAuthInterceptor(authenticator), AdmissionInterceptor(pools)],
    )
    add_servicer(pb_grpc.add_BlockServiceServicer_to_server, servicer, server)  # unparsable bytes: INVALID_ARGUMENT
    bound_port = bind(server, f"{host}:{port}", tls)
    if bound_port == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    if add_services is not None:
        add_services(server, bound_port)
    server.start()
    return server, bound_port



def bind(server: grpc.Server, address: str, tls: tuple[bytes, bytes] | None) -> int:
    """Adds a plaintext port, or a TLS one with `tls` = (certificate PEM, key PEM); returns the port (0: failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    certificate, key = tls
    return server.add_secure_port(address, grpc.ssl_server_credentials([(key, certificate)]))
