"""Quotas: how much one source may send, so that one chattering or hostile peer cannot crowd
out the rest. Time is an argument (monotonic seconds): pure, and tested without sleeping."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Quotas", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    """``rate_per_s`` on average, ``burst`` at once."""

    rate_per_s: float
    burst: int
    _tokens: float | None = None
    _at: float = 0.0

    def take(self, now: float) -> bool:
        if self._tokens is None:
            self._tokens, self._at = float(self.burst), now
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass(slots=True)
class Quotas:
    """One :class:`TokenBucket` per source (a device, a charger, a client), and a count of what
    each had refused. Beyond ``max_sources`` the longest-known source's bucket is forgotten
    (it starts again full), so a stream of new identities cannot grow the table."""

    rate_per_s: float
    burst: int
    max_sources: int = 100_000
    refused: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def take(self, source: str, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[source] = TokenBucket(self.rate_per_s, self.burst)
        if bucket.take(now):
            return True
        if source in self.refused or len(self.refused) < self.max_sources:
            self.refused[source] = self.refused.get(source, 0) + 1
        return False

    def forget(self, source: str) -> None:
        self._buckets.pop(source, None)
