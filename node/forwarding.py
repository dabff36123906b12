"""Hop-to-hop forwarding on the node side: pushing a step's output to the next hop, and taking pushed inputs.

In a forwarded session the client sends its hidden states to the first hop only. Each hop's step names
the next hop (`PushTarget`); once it has computed the step, the node pushes the output into that hop's
session (`PushStep`) as well as replying to the client, which keeps every hop's input for failover and
spot checks. A token then pays hops + 1 one-way trips instead of 2 × hops.

A node pushes only to a node announced in the DHT, at the address of its record (`PeerDirectory`),
never to an address a client names, so a client cannot make it send traffic anywhere else. A pushed
input waits in its session's `Mailbox` until the step that names its sender arrives; it is taken only
from the sender that step names (`upstream`) or from the session's own client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol import channels
from edgeswarm.protocol.busy import Busy
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.protocol.tensors import MESSAGE_SIZE_OPTIONS

logger = logging.getLogger(__name__)

UPSTREAM_WAIT = 60.0  # seconds a forwarded step waits for its pushed input before the session fails
PUSH_TIMEOUT = 10.0  # seconds a push may take (it only hands the input over; the next hop computes later)
PUSH_THREADS = 8  # pushes under way at once
MAX_PUSHES_IN_FLIGHT = 64  # pushes under way or waiting for a thread; beyond, a step's push is refused
MAX_WAITING_PUSHES = 4  # pushed inputs one session holds before its steps name them (a bounded mailbox)
MAX_WAITING_PUSH_BYTES = 64 * 2**20  # and the bytes they may take together
DIRECTORY_REFRESH = 5.0  # seconds between re-reads of the DHT when a pushed-to node is not known yet


class PushRefused(Exception):
    """A push that cannot be taken: `code` says why, as the gRPC status the pushing node gets."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code


class MailboxFull(Busy):
    """A push refused because the session already holds as many waiting inputs as it may."""


class Mailbox:
    """The pushed inputs of one forwarded session, by step id, with who pushed each; thread-safe."""

    def __init__(self, client: str | None):
        self.client = client  # the session's own caller, who may push in place of a failed hop
        self._inputs: dict[tuple[int, str], pb.Tensor] = {}  # (step id, sender) -> input
        self._done_through = -1  # step ids up to this one were taken or skipped
        self._closed = False
        self._changed = threading.Condition()

    def put(self, step_id: int, sender: str, tensor: pb.Tensor) -> None:
        """Keeps a pushed input until its step comes; PushRefused if the session ended or the step is past,
        MailboxFull if enough inputs wait already (the session's client is always heard: it stands in for
        failed hops)."""
        with self._changed:
            if self._closed:
                raise PushRefused(grpc.StatusCode.NOT_FOUND, "this session has ended")
            if step_id <= self._done_through:
                raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT, f"step {step_id} is past: the session is at step {self._done_through + 1}")
            key = (step_id, sender)
            from_hops = [held for (_, held_sender), held in self._inputs.items() if held_sender != self.client]
            held_bytes = sum(held.ByteSize() for held in from_hops) + tensor.ByteSize()
            if sender != self.client and key not in self._inputs and (len(from_hops) >= MAX_WAITING_PUSHES or held_bytes > MAX_WAITING_PUSH_BYTES):
                raise MailboxFull("this session's pushed inputs waiting for their steps are at their limit")
            self._inputs[key] = tensor
            self._changed.notify_all()

    def take(self, step_id: int, upstream: str, timeout: float) -> pb.Tensor | None:
        """The input of `step_id` pushed by the session's client or else by `upstream`, once there is one;
        None if none came within `timeout` seconds or the session ended. Inputs of this step and earlier
        ones are then dropped, whoever pushed them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := self._inputs.get((step_id, self.client)) or self._inputs.get((step_id, upstream))) is None:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._changed.wait(remaining)
            self._forget_through(step_id)
            return found

    def skip_through(self, step_id: int) -> None:
        """Steps up to `step_id` carried their own input: pushes for them are no longer wanted."""
        with self._changed:
            self._forget_through(step_id)

    def _forget_through(self, step_id: int) -> None:
        self._done_through = max(self._done_through, step_id)
        for key in [key for key in self._inputs if key[0] <= step_id]:
            del self._inputs[key]

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._inputs.clear()
            self._changed.notify_all()


class PeerDirectory:
    """The announced records of the swarm's nodes, by node id: where a node may push (thread-safe).

    `read_records()` reads the DHT; it runs at most every DIRECTORY_REFRESH seconds, when a node is asked
    for that the last read did not have."""

    def __init__(self, read_records: Callable[[], list[ServerRecord]], clock: Callable[[], float] = time.monotonic):
        self._read_records, self._clock = read_records, clock
        self._records: dict[str, ServerRecord] = {}
        self._read_at: float | None = None
        self._lock = threading.Lock()

    def record(self, node_id: str) -> ServerRecord | None:
        with self._lock:
            found = self._records.get(node_id)
            if found is None and (self._read_at is None or self._clock() - self._read_at >= DIRECTORY_REFRESH):
                self._records = {record.node_id: record for record in self._read_records()}
                self._read_at = self._clock()
                found = self._records.get(node_id)
            return found


class Pusher:
    """Pushes step outputs to the next hops of forwarded sessions, over channels kept per node.

    A push goes out on a thread of its own, so the node's reply to the client does not wait for the next
    hop: a next hop that does not take it leaves that hop waiting, and the client, which has the input
    from this node's reply, pushes it itself."""

    def __init__(self, directory: PeerDirectory):
        self.directory = directory
        self._channels: dict[str, tuple[str, grpc.Channel]] = {}  # node id -> (address, channel)
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=PUSH_THREADS, thread_name_prefix="push")
        self._in_flight = threading.BoundedSemaphore(MAX_PUSHES_IN_FLIGHT)

    def push(self, target: pb.PushTarget, hidden: pb.Tensor) -> str:
        """Starts pushing `hidden` into `target`'s session; returns why it cannot, or "" once it is under way."""
        record = self.directory.record(target.node_id)
        if record is None:
            return f"node {target.node_id} is not announced in the swarm"
        if not self._in_flight.acquire(blocking=False):
            return f"{MAX_PUSHES_IN_FLIGHT} pushes are under way already"
        request = pb.PushRequest(
            session_id=target.session_id, start_block=target.start_block, end_block=target.end_block,
            step_id=target.step_id, hidden_states=hidden,
        )
        self._threads.submit(self._send, record, request)
        return ""

    def _send(self, record: ServerRecord, request: pb.PushRequest) -> None:
        try:
            pb_grpc.BlockServiceStub(self._channel(record)).PushStep(request, timeout=PUSH_TIMEOUT)
        except grpc.RpcError as error:
            logger.info("pushing step %d to node %s failed: %s: %s", request.step_id, record.node_id, error.code().name, error.details())
            self._drop(record.node_id)
        finally:
            self._in_flight.release()

    def _channel(self, record: ServerRecord) -> grpc.Channel:
        with self._lock:
            known = self._channels.get(record.node_id)
            if known is not None and known[0] == record.address:
                return known[1]
            if known is not None:
                known[1].close()
            channel = channels.open_channel(record.address, record.node_id, options=MESSAGE_SIZE_OPTIONS)
            self._channels[record.node_id] = (record.address, channel)
            return channel

    def _drop(self, node_id: str) -> None:
        with self._lock:
            known = self._channels.pop(node_id, None)
        if known is not None:
            known[1].close()

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for _, channel in self._channels.values():
                channel.close()
            self._channels.clear()
