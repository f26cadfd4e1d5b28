"""Event performance for settlement: what each device and group delivered against its baseline.

Sign convention (the model's load convention throughout): ``delivered_kw = metered − baseline``
is the change in net import the event caused, so a load *reduction* is negative, exactly like the
``kw`` of the :class:`unified.model.Dispatch` that asked for it ("reduce by 2 MW" is ``-2000``).
``percent_of_request = 100 × delivered / requested`` is then positive when the device moved the
way it was asked, whichever way that was, and above 100 when it over-delivered.

Missing and estimated meter data are not hidden:

* an interval with **no meter data** earns no credit: its metered value is taken to equal the
  baseline (delivered 0), it is counted in ``intervals_missing`` and the result's quality is
  ``substituted``. Crediting it with the device's average would pay for a response nobody saw;
* an interval whose value was **estimated** upstream (telemetry gap-filling) is used as is,
  counted in ``intervals_estimated``, and the quality is ``estimated``;
* a device with **no data at all** in the window is ``invalid``; one whose baseline used the
  event-day fallback inherits the baseline's ``suspect``.

The group result sums its devices per interval, and counts devices per quality, so an operator
can see at a glance whether a shortfall is real or an artefact of missing data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from gateway.flex.baseline import (
    DeviceBaseline,
    DeviceHistory,
    ExcludedDevice,
    GroupBaseline,
    interval_starts,
)
from unified.model import SCHEMA_VERSION, Frozen, Quality, UtcDatetime

#: Worse qualities later: a combined result takes the worst of its parts.
_SEVERITY: dict[Quality, int] = {
    Quality.GOOD: 0,
    Quality.ESTIMATED: 1,
    Quality.SUBSTITUTED: 2,
    Quality.SUSPECT: 3,
    Quality.STALE: 4,
    Quality.INVALID: 5,
}


def worst(qualities: Iterable[Quality]) -> Quality:
    return max(qualities, key=_SEVERITY.__getitem__, default=Quality.GOOD)


def _percent(delivered_kw: float, requested_kw: float | None) -> float | None:
    if requested_kw is None or abs(requested_kw) < 1e-12:
        return None
    return 100.0 * delivered_kw / requested_kw


class DevicePerformance(Frozen):
    """One device's response over an event window."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    device_id: str
    start: UtcDatetime
    end: UtcDatetime
    interval_s: int
    baseline_kw: tuple[float, ...]
    metered_kw: tuple[float | None, ...] = Field(description="None: no meter data")
    delivered_kw: tuple[float, ...] = Field(
        description="metered - baseline per interval (negative: load reduced); 0 when missing"
    )
    baseline_kwh: float
    metered_kwh: float = Field(description="Energy over the window, missing intervals at baseline")
    delivered_kwh: float
    mean_delivered_kw: float = Field(description="Average delivered kW over the window")
    requested_kw: float | None = Field(default=None, description="What was asked, load convention")
    percent_of_request: float | None = None
    intervals_total: int
    intervals_measured: int
    intervals_estimated: int
    intervals_missing: int
    quality: Quality


class GroupPerformance(Frozen):
    """A group's response: the sum of its devices', with data-quality counts."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    group_id: str
    start: UtcDatetime
    end: UtcDatetime
    interval_s: int
    baseline_kw: tuple[float, ...]
    metered_kw: tuple[float, ...]
    delivered_kw: tuple[float, ...]
    baseline_kwh: float
    metered_kwh: float
    delivered_kwh: float
    mean_delivered_kw: float
    requested_kw: float | None = None
    percent_of_request: float | None = None
    devices: tuple[DevicePerformance, ...]
    devices_by_quality: dict[Quality, int]
    excluded: tuple[ExcludedDevice, ...] = Field(
        default=(), description="Members without a baseline or meter data: not in the sums"
    )
    quality: Quality


def device_performance(
    baseline: DeviceBaseline, metered: DeviceHistory, requested_kw: float | None = None
) -> DevicePerformance:
    """Compare a device's metered load with its baseline over the baseline's event window.

    ``metered`` may be on a finer grid than the baseline (e.g. 5-min meter data, 1-h baseline)
    as long as the baseline interval is a multiple of it; an interval is *missing* when less
    than half of it has data, and *estimated* when any of its data was estimated.
    """
    if baseline.device_id != metered.device_id:
        raise ValueError(f"baseline of {baseline.device_id} with meter data of {metered.device_id}")
    starts = interval_starts(baseline.start, baseline.end, baseline.interval_s)
    values, coverage, est_share = metered.window(starts, baseline.interval_s)
    base = np.array(baseline.kw)
    missing = (coverage < 0.5) | np.isnan(values)
    estimated = ~missing & (est_share > 0)
    used = np.where(missing, base, values)
    delivered = used - base
    hours = baseline.interval_s / 3600.0
    n = len(starts)
    delivered_kwh = float(delivered.sum() * hours)
    mean_delivered = float(delivered.mean()) if n else 0.0
    n_missing = int(missing.sum())
    n_estimated = int(estimated.sum())
    if n_missing == n:
        quality = Quality.INVALID
    elif n_missing:
        quality = Quality.SUBSTITUTED
    elif n_estimated:
        quality = Quality.ESTIMATED
    else:
        quality = Quality.GOOD
    quality = worst([quality, baseline.quality])
    return DevicePerformance(
        device_id=baseline.device_id,
        start=baseline.start,
        end=baseline.end,
        interval_s=baseline.interval_s,
        baseline_kw=baseline.kw,
        metered_kw=tuple(None if m else float(v) for m, v in zip(missing, values, strict=True)),
        delivered_kw=tuple(float(v) for v in delivered),
        baseline_kwh=float(base.sum() * hours),
        metered_kwh=float(used.sum() * hours),
        delivered_kwh=delivered_kwh,
        mean_delivered_kw=mean_delivered,
        requested_kw=requested_kw,
        percent_of_request=_percent(mean_delivered, requested_kw),
        intervals_total=n,
        intervals_measured=n - n_missing - n_estimated,
        intervals_estimated=n_estimated,
        intervals_missing=n_missing,
        quality=quality,
    )


def group_performance(
    group_id: str,
    devices: Sequence[DevicePerformance],
    requested_kw: float | None = None,
    excluded: Sequence[ExcludedDevice] = (),
) -> GroupPerformance:
    """Sum device performances (all over the same window and interval) into a group's."""
    if not devices:
        raise ValueError(f"{group_id}: no device performance to aggregate")
    first = devices[0]
    for d in devices[1:]:
        if (d.start, d.end, d.interval_s) != (first.start, first.end, first.interval_s):
            raise ValueError(f"{group_id}: {d.device_id} is on a different window or interval")
    base = np.sum([d.baseline_kw for d in devices], axis=0)
    delivered = np.sum([d.delivered_kw for d in devices], axis=0)
    metered = base + delivered
    hours = first.interval_s / 3600.0
    mean_delivered = float(delivered.mean())
    counts: dict[Quality, int] = {}
    for d in devices:
        counts[d.quality] = counts.get(d.quality, 0) + 1
    quality = worst(d.quality for d in devices)
    if excluded:
        quality = worst([quality, Quality.SUBSTITUTED])
    return GroupPerformance(
        group_id=group_id,
        start=first.start,
        end=first.end,
        interval_s=first.interval_s,
        baseline_kw=tuple(float(v) for v in base),
        metered_kw=tuple(float(v) for v in metered),
        delivered_kw=tuple(float(v) for v in delivered),
        baseline_kwh=float(base.sum() * hours),
        metered_kwh=float(metered.sum() * hours),
        delivered_kwh=float(delivered.sum() * hours),
        mean_delivered_kw=mean_delivered,
        requested_kw=requested_kw,
        percent_of_request=_percent(mean_delivered, requested_kw),
        devices=tuple(devices),
        devices_by_quality=counts,
        excluded=tuple(excluded),
        quality=quality,
    )


def event_performance(
    baseline: GroupBaseline,
    metered: Mapping[str, DeviceHistory],
    requested_kw: float | None = None,
    device_requests: Mapping[str, float] | None = None,
) -> GroupPerformance:
    """Per-device and group performance of an event from a group baseline and meter data.

    ``requested_kw`` is the group request (the dispatch's ``kw``); ``device_requests`` the
    per-device allocations (``Allocation.commanded_kw``), when known. Devices excluded from the
    baseline, or without meter data, are carried into ``excluded``.
    """
    device_requests = device_requests or {}
    excluded = list(baseline.excluded)
    results: list[DevicePerformance] = []
    for b in baseline.devices:
        history = metered.get(b.device_id)
        if history is None:
            excluded.append(ExcludedDevice(device_id=b.device_id, reason="no meter data"))
            continue
        results.append(device_performance(b, history, device_requests.get(b.device_id)))
    if not results:
        raise ValueError(f"{baseline.group_id}: no device has both a baseline and meter data")
    return group_performance(baseline.group_id, results, requested_kw, excluded)


__all__ = [
    "DevicePerformance",
    "GroupPerformance",
    "device_performance",
    "event_performance",
    "group_performance",
    "worst",
]
