"""How the core's periodic loops keep time: what each cycle took, and when the last one ended.

Plain numbers, recorded by the loop itself at the cost of two clock reads and a few additions per
cycle; whoever exports them (the operator endpoint's metrics, its liveness and readiness checks)
reads them when asked. The core knows no metrics library.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

__all__ = ["CYCLE_BUCKETS_S", "CycleStats"]

CYCLE_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds of the duration histogram, s: from a 10-device control cycle (~1 ms) to a
10,000-device one under load (~0.3 s), and beyond, where something is wrong."""


class CycleStats:
    """Durations of one loop's cycles (a cumulative-free histogram over ``buckets``, their sum
    and count), the failed ones, and when the last cycle ended (monotonic seconds)."""

    def __init__(
        self,
        period_s: float,
        buckets: tuple[float, ...] = CYCLE_BUCKETS_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.period_s = period_s
        self.buckets = buckets
        self._monotonic = monotonic
        self.counts = [0] * (len(buckets) + 1)
        """Cycles per bucket, the last one for those longer than every bound."""
        self.count = 0
        self.sum_s = 0.0
        self.failed = 0
        self.last_s: float | None = None
        """Duration of the last cycle."""
        self.last_end: float | None = None
        """Monotonic time the last cycle ended (None: none has yet)."""

    def observe(self, duration_s: float, *, failed: bool = False) -> None:
        self.counts[bisect.bisect_left(self.buckets, duration_s)] += 1
        self.count += 1
        self.sum_s += duration_s
        self.last_s = duration_s
        self.last_end = self._monotonic()
        if failed:
            self.failed += 1

    def age_s(self) -> float | None:
        """Seconds since the last cycle ended (None: none has yet)."""
        if self.last_end is None:
            return None
        return self._monotonic() - self.last_end
