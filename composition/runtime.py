"""Process-level settings for a long-running gateway (the CLI's ``run`` and ``edge``)."""

from __future__ import annotations

import gc
from typing import Final

YOUNG_GC_THRESHOLD: Final = 10_000
"""Allocations between young collections (CPython's default is 700)."""


def settle_heap() -> None:
    """Keep the cyclic garbage collector off what the gateway built at start.

    A gateway holds thousands of long-lived objects per thousand devices (config, registry,
    adapters, supervisors, pydantic models). CPython's full collections walk all of them, and
    a dispatch fanning out to thousands of devices allocates enough to trigger many: measured
    with ``python -m bench.mqtt_devices`` at 2,000 devices, the collector took most of the
    gateway's CPU during fan-out. Collect once, freeze what is alive (it is never collected,
    and never walked again), and collect the young generation less often.

    Call it once, after the gateway is built and before it runs; not from library code or
    tests (frozen objects are never freed).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)
