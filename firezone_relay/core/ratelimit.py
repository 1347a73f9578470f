"""Token buckets: the reflection guard and ``--max-bps``.

``ReflectionGuard`` bounds what the relay sends to a source IP that has not
authenticated (SPEC §5): one bucket per IP of ``burst`` tokens refilled at
``rate`` per second, a reply costs one token, and the table is pruned at
65536 entries so spoofed sources cannot grow it without bound.

``over_budget`` is the per-allocation ``--max-bps`` bucket, kept in the
allocation's shared ``meter`` list so that the per-packet path reads it
without another lookup.
"""

from __future__ import annotations

MAX_BUCKETS = 65536


class ReflectionGuard:
    """Per source IP token buckets; ``rate <= 0`` admits everything."""

    __slots__ = ("burst", "rate", "buckets")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = float(burst)
        self.rate = rate
        #: ip -> [tokens, last refill]
        self.buckets: dict[str, list[float]] = {}

    def allow(self, ip: str, now: float) -> bool:
        """Take a token from ``ip``'s bucket; False when it is empty."""
        rate = self.rate
        if rate <= 0:
            return True
        burst = self.burst
        bucket = self.buckets.get(ip)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._prune(now)
            self.buckets[ip] = [burst - 1.0, now]
            return True
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled; if none has, forget the oldest half."""
        rate, burst, buckets = self.rate, self.burst, self.buckets
        for ip in [ip for ip, (tokens, last) in buckets.items() if tokens + (now - last) * rate >= burst]:
            del buckets[ip]
        if len(buckets) >= MAX_BUCKETS:
            for ip in list(buckets)[: len(buckets) // 2]:
                del buckets[ip]


def over_budget(meter: list[float], at: int, size: int, now: float, rate: float) -> bool:
    """--max-bps: a token bucket of one second's bytes (at least one largest
    datagram) per direction; ``meter[at]`` holds the tokens and
    ``meter[at + 1]`` the last refill.  True when ``size`` bytes do not fit:
    the datagram is to be dropped."""
    capacity = max(rate, 65535.0)
    last = meter[at + 1]
    tokens = capacity if last == 0.0 else min(capacity, meter[at] + (now - last) * rate)
    meter[at + 1] = now
    if tokens < size:
        meter[at] = tokens
        return True
    meter[at] = tokens - size
    return False
