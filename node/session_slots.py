"""The session slots of a node: how many InferenceSession streams it holds open, per client and in all,
and which of them are idle, so that idle ones make way when slots are short.

A stream holds a slot from its first moment (before its `open` message) to its end. It is *working* while
one of its steps runs, and *idle* otherwise: while it waits for its client's next message, or for its
client to read a reply. Then:
- a client (the caller's principal; an anonymous caller is counted by its network address) holds at most
  `per_client` slots: one more is refused as busy ("too many open sessions for ...", protocol.busy);
- when a stream arrives and slots are short (at least CROWDED_FRACTION of them taken), the stream idle
  longest is closed to make room, if it has been idle for `crowded_idle_timeout`; a working stream never is;
- when all slots are taken and none is idle for that long, a new stream is refused with "busy";
- `close_idle()`, which the node calls periodically, closes every stream idle for `idle_timeout`.
A closed stream's client sees CANCELLED with the reason.

>>> slots = SessionSlots(capacity=128, per_client=32, idle_timeout=300, crowded_idle_timeout=10)
>>> slots.enter(context)          # when the stream starts (SlotsFull when refused)
>>> with slots.working(context):  # around each step
...     ...
>>> slots.leave(context)          # when it ends (twice is harmless)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc._cython import cygrpc

from edgeswarm.node.admission import SlotsFull
from edgeswarm.protocol.principals import principal_of

logger = logging.getLogger(__name__)

# Slots are short once this fraction of them is taken: a newcomer then closes the longest-idle stream
# if it has been idle for CROWDED_IDLE_TIMEOUT seconds (the default; ServiceLimits.crowded_idle_timeout).
CROWDED_FRACTION = 0.75
CROWDED_IDLE_TIMEOUT = 10.0


def client_of(context: grpc.ServicerContext) -> str:
    """Who a call counts against: its authenticated principal, or for an anonymous call the caller's
    network address (without the port, so that opening more connections does not help)."""
    principal = principal_of(context)
    if principal is not None:
        return principal.id
    peer = context.peer() or "unknown"
    host = peer.rpartition(":")[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return f"anonymous {host}"


def close_call(context: grpc.ServicerContext, reason: str) -> None:
    """Ends a call from any thread with CANCELLED and `reason`. grpc's public `context.cancel()` sends no
    reason, so this cancels grpcio's core call with a status (its sync server's context holds it)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is None:
        context.cancel()
    else:
        call.cancel(cygrpc.StatusCode.cancelled, reason)


@dataclass
class _Stream:
    context: Any
    client: str
    idle_since: float | None  # None while a step of it runs


class SessionSlots:
    """A node's session streams, within `capacity` slots (see the module docstring); thread-safe.
    `clock` is injectable for tests; `close` ends a stream's call with a reason (close_call)."""

    def __init__(
        self,
        capacity: int,
        per_client: int,
        idle_timeout: float,
        crowded_idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        close: Callable[[Any, str], None] = close_call,
    ):
        if capacity < 1 or per_client < 1:
            raise ValueError(f"capacity and per_client must be at least 1, got {capacity}, {per_client}")
        if idle_timeout <= 0 or crowded_idle_timeout < 0:
            raise ValueError(f"idle_timeout must be positive and crowded_idle_timeout not negative, got {idle_timeout}, {crowded_idle_timeout}")
        self.capacity, self.per_client = capacity, per_client
        self.idle_timeout, self.crowded_idle_timeout = idle_timeout, crowded_idle_timeout
        self._clock, self._close = clock, close
        self._lock = threading.Lock()
        self._streams: dict[Any, _Stream] = {}  # by the call's context
        self.evicted = 0  # streams closed for being idle, by either timeout

    # --- the pool protocol of node.admission ---------------------------------------------------------

    def enter(self, context: Any) -> None:
        """Gives the stream of `context` a slot, closing the longest-idle stream first when slots are short;
        SlotsFull when its client holds `per_client` slots or every slot is taken by a stream not idle long enough."""
        client = client_of(context)
        with self._lock:
            held = sum(1 for stream in self._streams.values() if stream.client == client)
            if held >= self.per_client:
                raise SlotsFull(f"too many open sessions for {client} (at most {self.per_client} per client)")
            victim = self._crowded_victim() if len(self._streams) >= CROWDED_FRACTION * self.capacity else None
            if victim is not None:
                del self._streams[victim.context]
                self.evicted += 1
            if len(self._streams) >= self.capacity:
                raise SlotsFull(
                    f"all {self.capacity} session slots are taken and none has been idle for "
                    f"{self.crowded_idle_timeout:g} s"
                )
            self._streams[context] = _Stream(context, client, idle_since=self._clock())
        if victim is not None:
            logger.info("closing a session of %s idle for over %gs to make room", victim.client, self.crowded_idle_timeout)
            self._close(
                victim.context,
                f"session closed: it was idle for over {self.crowded_idle_timeout:g} s while this node's session "
                f"slots were short (over {CROWDED_FRACTION:.0%} of {self.capacity} taken)",
            )

    def leave(self, context: Any) -> None:
        """Frees the slot of `context`'s stream (a no-op when it holds none, e.g. once closed for room)."""
        with self._lock:
            self._streams.pop(context, None)

    # --- activity ----------------------------------------------------------------------------------

    @contextmanager
    def working(self, context: Any) -> Iterator[None]:
        """Marks `context`'s stream as working for the duration (around each step); it is idle from the end."""
        self._set_idle_since(context, None)
        try:
            yield
        finally:
            self._set_idle_since(context, self._clock())

    def _set_idle_since(self, context: Any, since: float | None) -> None:
        with self._lock:
            stream = self._streams.get(context)
            if stream is not None:
                stream.idle_since = since

    def _crowded_victim(self) -> _Stream | None:
        """The stream idle longest, if it has been idle for `crowded_idle_timeout` (called with the lock held)."""
        now = self._clock()
        idle = [stream for stream in self._streams.values() if stream.idle_since is not None]
        oldest = min(idle, key=lambda stream: stream.idle_since, default=None)
        return oldest if oldest is not None and now - oldest.idle_since >= self.crowded_idle_timeout else None

    def close_idle(self) -> int:
        """Closes every stream idle for `idle_timeout`; returns how many."""
        with self._lock:
            now = self._clock()
            idle = [s for s in self._streams.values() if s.idle_since is not None and now - s.idle_since >= self.idle_timeout]
            for stream in idle:
                del self._streams[stream.context]
            self.evicted += len(idle)
        for stream in idle:
            logger.info("closing a session of %s idle for over %gs", stream.client, self.idle_timeout)
            self._close(stream.context, f"session closed: no step for {self.idle_timeout:g} s")
        return len(idle)

    # --- state -------------------------------------------------------------------------------------

    @property
    def taken(self) -> int:
        """How many slots are taken."""
        with self._lock:
            return len(self._streams)

    def held_by(self, client: str) -> int:
        """How many slots `client` holds."""
        with self._lock:
            return sum(1 for stream in self._streams.values() if stream.client == client)
