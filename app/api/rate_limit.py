"""Per-organization request rate limit: an in-memory token bucket per API process.

One bucket per organization, so a noisy tenant gets 429 while the others are untouched.
In memory is enough for one API process; with several replicas each enforces its own
share (set the rate per replica). The rate and burst are read on every call, so a
settings change applies at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def take(self, key: str, *, rate: float, burst: int) -> None:
        """Spend one token of `key`'s bucket, or raise RateLimited with the wait in seconds."""
        if rate <= 0:
            return  # disabled
        capacity = max(1.0, float(burst))
        now = self._clock()
        with self._lock:
            bucket = self._buckets.setdefault(key, _Bucket(tokens=capacity, updated=now))
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = (1.0 - bucket.tokens) / rate
        raise RateLimited(
            f"rate limit reached: {rate:g} requests per second per organization; "
            f"retry in {math.ceil(wait)} s",
            retry_after=math.ceil(wait),
        )
