"""A thread-safe token-bucket rate limiter keyed by client (an API token, a peer address, ...).

Each key has a bucket holding up to `burst` tokens that refills at `rate_per_second`; a request takes
one token (or `cost`). `charge` takes tokens already spent, even into debt: for costs known only
afterwards, such as generated tokens. Memory is bounded: at most `max_keys` buckets are kept, the least
recently used one is dropped first (a dropped key starts again with a full bucket, which only ever errs
towards letting a request through).

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
            tokens, now = self._refilled(key)
            wait = self._wait(tokens, cost)
            self._store(key, tokens - cost if wait == 0.0 else tokens, now)
            return wait

    def wait_for(self, key: Hashable, cost: float) -> float:
        """The seconds until `key`'s bucket holds `cost` tokens (0.0: it does now; inf if `cost` exceeds
        `burst`), taking nothing."""
        with self._lock:
            tokens, now = self._refilled(key)
            self._store(key, tokens, now)
            return self._wait(tokens, cost)

    def charge(self, key: Hashable, cost: float) -> None:
        """Takes `cost` tokens from `key`'s bucket even when it holds fewer: the debt delays the key's
        next requests until the refill has paid it."""
        with self._lock:
            tokens, now = self._refilled(key)
            self._store(key, tokens - cost, now)

    def allow(self, key: Hashable, cost: float = 1.0) -> bool:
        """Whether a request of `key` may go ahead now (and, if so, counts it)."""
        return self.acquire(key, cost) == 0.0

    def __len__(self) -> int:
        """How many keys have a bucket."""
        with self._lock:
            return len(self._buckets)

    def _refilled(self, key: Hashable) -> tuple[float, float]:
        """The tokens in `key`'s bucket, and the time (its entry is removed; `_store` puts it back)."""
        now = self._clock()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate), now

    def _wait(self, tokens: float, cost: float) -> float:
        if tokens >= cost:
            return 0.0
        return float("inf") if cost > self.burst else (cost - tokens) / self.rate

    def _store(self, key: Hashable, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)  # most recently used last
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
