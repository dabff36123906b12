"""Admission to a node's data-plane server: separate pools of call slots, so that no kind of call can take
the slots another kind needs, and health and admin calls always answer.

grpc's sync server runs each call on a thread of one pool, and its one `maximum_concurrent_rpcs` refuses
every kind of call alike once reached (128 idle sessions used to make NodeInfo and Forward fail). So each
call belongs to a pool (`pool_of`) and is admitted in its handler's thread as it starts; a call whose pool
is full is refused as busy (protocol.busy: RESOURCE_EXHAUSTED with a RetryInfo), which clients treat like any busy node:
- sessions: InferenceSession streams (node.session_slots: per-client caps; idle ones make way);
- forwards: stateless Forward calls. Not with the sessions, whose flood must not stop spot checks and
  replays; not with admin, which must not wait behind compute. A few slots are enough: the node's one
  compute thread runs steps one at a time anyway;
- tasks: TaskService calls (agent steps, runs and their event streams);
- admin: NodeInfo, Echo (link measurements) and any other call.
The server's thread pool holds the sum of the pools plus `THREAD_HEADROOM` (a refusal, or a stream just
closed to make room, holds a thread for a moment), and grpc's `maximum_concurrent_rpcs` sits
`CALLS_BEYOND_THREADS` above that, as a last backstop only.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol

import grpc

from edgeswarm.proto import dataplane_pb2, tasks_pb2
from edgeswarm.protocol.busy import Busy, abort_busy

SESSIONS, FORWARDS, TASKS, ADMIN = "sessions", "forwards", "tasks", "admin"

# Default pool sizes (ServiceLimits, `swarm-node join` flags).
SESSION_SLOTS = 128
SESSIONS_PER_CLIENT = 32  # as many as one SwarmClient runs at once (swarm.client.MAX_PARALLEL_SESSIONS)
FORWARD_SLOTS = 16
TASK_SLOTS = 32
ADMIN_SLOTS = 16
THREAD_HEADROOM = 16
CALLS_BEYOND_THREADS = 64

_BLOCK_SERVICE = "/" + dataplane_pb2.DESCRIPTOR.services_by_name["BlockService"].full_name + "/"
_TASK_SERVICE = "/" + tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name + "/"


def pool_of(method: str) -> str:
    """The pool a call of `method` (its full name, "/package.Service/Method") is admitted to."""
    if method == _BLOCK_SERVICE + "InferenceSession":
        return SESSIONS
    if method in (_BLOCK_SERVICE + "Forward", _BLOCK_SERVICE + "PushStep"):
        return FORWARDS
    if method.startswith(_TASK_SERVICE):
        return TASKS
    return ADMIN


class SlotsFull(Busy):
    """A call its pool has no slot for: a busy refusal (protocol.busy), so clients go elsewhere."""


class SlotPool(Protocol):
    """What the interceptor needs of a pool: `enter` (SlotsFull when refused) and `leave`, for each call."""

    def enter(self, context: Any) -> None: ...

    def leave(self, context: Any) -> None: ...


class CallSlots:
    """A pool of `capacity` slots for the calls of one kind; thread-safe."""

    def __init__(self, name: str, capacity: int):
        if capacity < 1:
            raise ValueError(f"the {name} pool needs at least one slot, got {capacity}")
        self.name, self.capacity = name, capacity
        self._lock = threading.Lock()
        self._taken = 0

    def enter(self, context: Any) -> None:
        with self._lock:
            if self._taken >= self.capacity:
                raise SlotsFull(f"all {self.capacity} {self.name} slots of this node are taken")
            self._taken += 1

    def leave(self, context: Any) -> None:
        with self._lock:
            self._taken -= 1

    @property
    def taken(self) -> int:
        with self._lock:
            return self._taken


class AdmissionInterceptor(grpc.ServerInterceptor):
    """A server interceptor: each call takes a slot of its pool (`pools[pool_of(method)]`) when its handler
    starts, in the handler's thread, and frees it when the handler ends; RESOURCE_EXHAUSTED when full.

    Put it after the call-authentication interceptor, so that pools see the caller's principal."""

    def __init__(self, pools: Mapping[str, SlotPool]):
        self.pools = pools

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        pool = self.pools[pool_of(handler_call_details.method)]
        kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
        behaviour = getattr(handler, kind)

        def admitted(request_or_iterator, context):
            _enter(pool, context)
            try:
                return behaviour(request_or_iterator, context)
            finally:
                pool.leave(context)

        def admitted_stream(request_or_iterator, context):  # a generator: the slot is held while it streams
            _enter(pool, context)
            try:
                yield from behaviour(request_or_iterator, context)
            finally:
                pool.leave(context)

        return handler._replace(**{kind: admitted_stream if handler.response_streaming else admitted})


def _enter(pool: SlotPool, context: grpc.ServicerContext) -> None:
    try:
        pool.enter(context)
    except SlotsFull as refusal:
        abort_busy(context, refusal)
