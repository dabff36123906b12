"""The KV-cache memory budget of a node: which sessions it has room for.

A session reserves room for its whole `max_length` when it opens, for one sequence; its first step
shows how many sequences it really runs (its batch), and the reservation grows to that batch before the
step runs, or the step is refused. So a node that admitted a step can always serve the session to the
end: memory is refused up front (`BusyError`, which the client treats like any busy node and routes
elsewhere) instead of running out in the middle of a conversation. Reservations are the accounting;
the bytes the caches actually hold at a given moment are not needed.

>>> budget = KVBudget(budget_bytes=1 << 30, bytes_per_token=kv_bytes_per_token(config))
>>> budget.admit("session-1", max_length=2048, blocks=10)
>>> budget.grow("session-1", batch_size=4)   # before every step, with the step's batch
>>> budget.release("session-1")  # when the stream ends (twice is harmless)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from edgeswarm.protocol.busy import Busy

# A session of more sequences than this is refused outright, whatever the budget (ServiceLimits.max_session_batch).
MAX_SESSION_BATCH = 64


class BusyError(Busy):
    """A session does not fit in what is left of the node's KV-cache budget."""


@dataclass(frozen=True)
class Reservation:
    """The room one session holds: `nbytes` = max_length * batch_size * blocks * bytes per token."""

    session_id: str
    max_length: int
    batch_size: int
    blocks: int
    nbytes: int


def _format_bytes(count: int) -> str:
    """`count` bytes for a message: MiB above one MiB, else plain bytes."""
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count} bytes"


class KVBudget:
    """Reserves KV-cache room per session, within `budget_bytes`; thread-safe.

    `bytes_per_token` is the cost of one token of one sequence in one block (partition.profiling's
    `kv_bytes_per_token`); a session reserves it for each of the blocks it runs through here.
    """

    def __init__(self, budget_bytes: int, bytes_per_token: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be non-negative, got {budget_bytes}")
        if bytes_per_token <= 0:
            raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self._lock = threading.Lock()
        self._reservations: dict[str, Reservation] = {}
        self._used = 0

    # --- admission ---------------------------------------------------------------------------------

    def cost(self, max_length: int, batch_size: int = 1, blocks: int = 1) -> int:
        """Bytes a session of `batch_size` sequences of up to `max_length` tokens through `blocks` blocks reserves."""
        return max_length * batch_size * blocks * self.bytes_per_token

    def admit(self, session_id: str, max_length: int, batch_size: int = 1, blocks: int = 1) -> Reservation:
        """Reserves room for `session_id`; raises BusyError if it does not fit, ValueError if it is open already."""
        if max_length < 1 or batch_size < 1 or blocks < 1:
            raise ValueError(f"max_length, batch_size and blocks must be at least 1, got {max_length}, {batch_size}, {blocks}")
        asked = self.cost(max_length, batch_size, blocks)
        with self._lock:
            if session_id in self._reservations:
                raise ValueError(f"session {session_id!r} already holds a KV-cache reservation")
            if self._used + asked > self.budget_bytes:
                raise BusyError(self._busy_message(session_id, max_length * blocks, batch_size, asked))
            reservation = Reservation(session_id, max_length, batch_size, blocks, asked)
            self._reservations[session_id] = reservation
            self._used += asked
            return reservation

    def grow(self, session_id: str, batch_size: int) -> Reservation:
        """Makes `session_id`'s reservation cover `batch_size` sequences (call before every step, with the
        step's batch); a no-op when it does already. BusyError if the growth does not fit (the reservation
        stays as it was), KeyError if the session holds no reservation."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        with self._lock:
            held = self._reservations[session_id]
            if batch_size <= held.batch_size:
                return held
            asked = self.cost(held.max_length, batch_size, held.blocks)
            if self._used - held.nbytes + asked > self.budget_bytes:
                raise BusyError(self._busy_message(session_id, held.max_length * held.blocks, batch_size, asked, held.nbytes))
            grown = replace(held, batch_size=batch_size, nbytes=asked)
            self._reservations[session_id] = grown
            self._used += asked - held.nbytes
            return grown

    def _busy_message(self, session_id: str, max_length: int, batch_size: int, asked: int, held: int = 0) -> str:
        """Why `session_id` was refused: what it asked (and held), what is used by how many sessions, and the budget."""
        sequences = f"{batch_size} x {max_length}" if batch_size > 1 else f"{max_length}"
        holding = f" (it holds {_format_bytes(held)})" if held else ""
        return (
            f"KV-cache budget exhausted: session {session_id!r} asks {_format_bytes(asked)} "
            f"({sequences} token-blocks x {self.bytes_per_token} bytes){holding}, {_format_bytes(self._used)} is used by "
            f"{len(self._reservations)} session(s), {_format_bytes(self.budget_bytes - self._used)} is free "
            f"of a {_format_bytes(self.budget_bytes)} budget"
        )

    def release(self, session_id: str) -> Reservation | None:
        """Frees a session's room; returns its reservation, or None if it held none (release is idempotent)."""
        with self._lock:
            reservation = self._reservations.pop(session_id, None)
            if reservation is not None:
                self._used -= reservation.nbytes
            return reservation

    # --- state -------------------------------------------------------------------------------------

    def reservation(self, session_id: str) -> Reservation | None:
        """The reservation `session_id` holds, if any."""
        with self._lock:
            return self._reservations.get(session_id)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self.budget_bytes - self._used

    @property
    def sessions(self) -> int:
        """How many sessions hold a reservation."""
        with self._lock:
            return len(self._reservations)
