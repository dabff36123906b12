"""A thread-safe token-bucket rate limiter keyed by client (an API token, a peer address, ...).

Each key has a bucket holding up to `burst` tokens that refills at `rate_per_second`; a request takes
one token (or `cost`). Memory is bounded: at most `max_keys` buckets are kept, the least recently used
one is dropped first (a dropped key starts again with a full bucket, which only ever errs towards
letting a request through).

>>> limiter = RateLimiter(rate_per_second=2, burst=5)
>>> limiter.allow("peer-a")
True
>>> wait = limiter.acquire("peer-a")  # 0.0 when allowed, else the seconds until it would be
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class RateLimiter:
    """Token buckets per key: `burst` requests at once, then `rate_per_second` on average."""

    def __init__(
        self,
        rate_per_second: float,
        burst: float,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        if rate_per_second <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_second must be positive, burst at least 1 and max_keys at least 1")
        self.rate = float(rate_per_second)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, time)
        self._lock = threading.Lock()

    def acquire(self, key: Hashable, cost: float = 1.0) -> float:
        """Takes `cost` tokens from `key`'s bucket and returns 0.0, or, when it holds too few, takes
        nothing and returns the seconds until it will hold enough (inf if `cost` exceeds `burst`)."""
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            wait = 0.0
            if tokens >= cost:
                tokens -= cost
            else:
                wait = float("inf") if cost > self.burst else (cost - tokens) / self.rate
            self._buckets[key] = (tokens, now)  # most recently used last
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait

    def allow(self, key: Hashable, cost: float = 1.0) -> bool:
        """Whether a request of `key` may go ahead now (and, if so, counts it)."""
        return self.acquire(key, cost) == 0.0

    def __len__(self) -> int:
        """How many keys have a bucket."""
        with self._lock:
            return len(self._buckets)
