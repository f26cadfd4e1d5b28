"""Report requests a VTN may make of a VEN, as pure functions (no I/O, no clock).

A VEN's METADATA report offers each data point with an ``oadrSamplingRate``: the shortest and
longest period it can sample at. 2.0b lets the VEN refuse a request whose granularity lies
outside that range (openleadr's VEN does: it logs an error, drops the rID and sends nothing), so
the VTN must ask for a period inside it. We ask for the period we would like, moved into the
range the VEN offered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["SamplingRate", "SamplingRateError", "granularity_for", "read_sampling_rate"]


class SamplingRateError(ValueError):
    """An ``oadrSamplingRate`` that cannot be honoured (e.g. its minimum above its maximum)."""


@dataclass(frozen=True, slots=True)
class SamplingRate:
    """What a VEN offered for one data point."""

    min_period: timedelta
    max_period: timedelta
    on_change: bool = False


def read_sampling_rate(description: Mapping[str, object]) -> SamplingRate | None:
    """The sampling rate of one decoded ``oadrReportDescription`` (None when it offers none)."""
    offered = description.get("sampling_rate")
    if offered is None:
        return None
    if not isinstance(offered, Mapping):
        raise SamplingRateError("oadrSamplingRate is not an element")
    low, high = offered.get("min_period"), offered.get("max_period")
    if not isinstance(low, timedelta) or not isinstance(high, timedelta):
        raise SamplingRateError("oadrSamplingRate needs oadrMinPeriod and oadrMaxPeriod")
    if low < timedelta(0) or high < timedelta(0):
        raise SamplingRateError("oadrSamplingRate periods must not be negative")
    if low > high:
        raise SamplingRateError(f"oadrMinPeriod {low} is above oadrMaxPeriod {high}")
    return SamplingRate(low, high, bool(offered.get("on_change")))


def granularity_for(wanted: timedelta, offered: SamplingRate | None) -> timedelta:
    """The report period to request: ``wanted``, moved into the range the VEN offered.

    A maximum of zero means the VEN set no upper bound. Whole seconds only: openleadr's VEN
    schedules its report job with a cron expression built from whole seconds.
    """
    if offered is None:
        return wanted
    low = offered.min_period
    high = offered.max_period if offered.max_period > timedelta(0) else max(low, wanted)
    chosen = min(max(wanted, low), high)
    whole = timedelta(seconds=math.ceil(chosen.total_seconds()))
    return whole if whole <= high else chosen
