"""Waiting on a condition, not on the clock: tests and scripts poll until something holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.2  # seconds between two looks at a condition


def poll(condition: Callable[[], T], timeout: float, interval: float = POLL_INTERVAL) -> T:
    """Calls `condition` until it returns something true and returns that, or returns its last (false)
    value once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value
