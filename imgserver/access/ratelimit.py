"""Rate limits: a token bucket per principal (``--rate N``: N requests a second on average,
bursts of up to N).

A bucket holds up to N tokens and gains N a second; a request takes one, or is refused with
how long until one is there (its Retry-After). Twenty lines, so no library: what ``limits``
adds (storage backends, moving windows) is not needed by one process.
"""

from __future__ import annotations

import math
import threading
import time


class RateLimits:
    """The buckets of every principal that has a rate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, as of when)

    def take(self, name: str, rate: float) -> float | None:
        """Take a token of ``name``'s bucket (``rate`` a second, as many at most); None if
        there was one, else the seconds until there is."""
        moment = time.monotonic()
        with self._lock:
            tokens, since = self._buckets.get(name, (rate, moment))
            tokens = min(rate, tokens + (moment - since) * rate)
            if tokens >= 1:
                self._buckets[name] = (tokens - 1, moment)
                return None
            self._buckets[name] = (tokens, moment)
            return (1 - tokens) / rate

    @staticmethod
    def retry_after(wait: float) -> int:
        """``wait`` as a Retry-After header says it: whole seconds, at least 1."""
        return max(1, math.ceil(wait))
