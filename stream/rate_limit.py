"""An in-process rate limit: a token bucket per key (one API process serves a host).

Each key may make ``per_minute`` requests a minute on average, in bursts of up to that many:
its bucket holds ``per_minute`` tokens and refills at ``per_minute / 60`` a second.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

# Past this many keys, full buckets (keys idle for a while) are forgotten: a flood of client
# addresses must not grow the table without bound.
MAX_KEYS = 10_000


class RateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        if per_minute < 1:
            raise ValueError(f"a rate limit is at least 1 a minute, not {per_minute}")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens a second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key: (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str) -> float | None:
        """Spend one of ``key``'s requests: None if it may go ahead, else the seconds until
        it may (``Retry-After``)."""
        with self._lock:
            tokens = self._tokens(key)
            if tokens < 1.0:
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, self.clock())
            if len(self._buckets) > MAX_KEYS:
                self._forget_full()
            return None

    def wait(self, key: str) -> float | None:
        """What ``take`` would answer, spending nothing."""
        with self._lock:
            tokens = self._tokens(key)
            return None if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _tokens(self, key: str) -> float:
        tokens, when = self._buckets.get(key, (self.capacity, 0.0))
        return min(self.capacity, tokens + (self.clock() - when) * self.rate)

    def _forget_full(self) -> None:
        full = [key for key in self._buckets if self._tokens(key) >= self.capacity]
        for key in full:
            del self._buckets[key]


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up."""
    return str(max(1, math.ceil(seconds)))
