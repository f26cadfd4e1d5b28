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

**Exact window.** Baselines come in whole intervals (1 h by default), but an event of
16:10-18:50 lasted 2 h 40, not 3 h. Performance is computed over the event's exact window:
each interval carries its ``weight`` (the share of it inside the event: 5/6, 1, 5/6), its metered
kW is the mean over the part inside the event where the meter data is fine enough to tell (5-min
history buckets inside an hourly baseline), else the whole interval's mean, and energies are
summed with the weights; ``mean_delivered_kw`` is the energy over the event's duration, and
``percent_of_request`` compares that with the request. Averaging over the widened 3 h would
dilute a 2 h 40 response by the 20 minutes nobody was asked for. The figures over the whole
intervals are kept as supporting detail (``widened``), never as the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Literal

import numpy as np
from pydantic import Field

from gateway.flex.baseline import (
    DeviceBaseline,
    DeviceHistory,
    ExcludedDevice,
    FloatArray,
    GroupBaseline,
    epoch_s,
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


class WidenedFigures(Frozen):
    """The same figures over the whole baseline intervals around the event: supporting detail
    (they average over time outside the event, so they are not the settled result)."""

    start: UtcDatetime
    end: UtcDatetime
    baseline_kwh: float
    metered_kwh: float
    delivered_kwh: float
    mean_delivered_kw: float
    percent_of_request: float | None = None


class DevicePerformance(Frozen):
    """One device's response over an event window."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    device_id: str
    start: UtcDatetime
    end: UtcDatetime
    interval_s: int
    baseline_kw: tuple[float, ...]
    weights: tuple[float, ...] = Field(
        description="Share of each interval inside the event (1: whole; less at a partial edge)"
    )
    metered_kw: tuple[float | None, ...] = Field(
        description="Mean over the part of each interval inside the event; None: no meter data"
    )
    delivered_kw: tuple[float, ...] = Field(
        description="metered - baseline per interval (negative: load reduced); 0 when missing"
    )
    event_hours: float = Field(description="Duration of the event window, h")
    baseline_kwh: float = Field(description="Over the exact event window (weights applied)")
    metered_kwh: float = Field(description="Energy over the window, missing intervals at baseline")
    delivered_kwh: float
    mean_delivered_kw: float = Field(description="delivered_kwh / event_hours")
    requested_kw: float | None = Field(default=None, description="What was asked, load convention")
    percent_of_request: float | None = None
    widened: WidenedFigures | None = Field(
        default=None, description="Over the whole intervals, when the event does not fill them"
    )
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
    weights: tuple[float, ...]
    metered_kw: tuple[float, ...]
    delivered_kw: tuple[float, ...]
    event_hours: float
    baseline_kwh: float
    metered_kwh: float
    delivered_kwh: float
    mean_delivered_kw: float
    requested_kw: float | None = None
    percent_of_request: float | None = None
    widened: WidenedFigures | None = None
    devices: tuple[DevicePerformance, ...]
    devices_by_quality: dict[Quality, int]
    excluded: tuple[ExcludedDevice, ...] = Field(
        default=(), description="Members without a baseline or meter data: not in the sums"
    )
    quality: Quality


def _part_means(
    metered: DeviceHistory, starts: FloatArray, seg0: FloatArray, seg1: FloatArray, width_s: int
) -> tuple[FloatArray, FloatArray, FloatArray, bool]:
    """Mean, coverage and estimated share of the meter data over ``[seg0, seg1)`` within each
    interval; where a segment is not on the meter's grid (hourly data, an event at 16:10), the
    whole interval's. The flag says whether every partial segment was metered exactly."""
    whole = metered.window(starts, width_s)
    mean, cov, est = (np.array(a, dtype=np.float64) for a in whole)
    exact = True
    t0, step = epoch_s(metered.start), metered.interval_s
    for i, (a, b, s) in enumerate(zip(seg0, seg1, starts, strict=True)):
        if b <= a or (a == s and b == s + width_s):
            continue
        lo, hi = (a - t0) / step, (b - t0) / step
        if abs(lo - round(lo)) > 1e-6 or abs(hi - round(hi)) > 1e-6:
            exact = False
            continue
        j0, j1 = max(0, round(lo)), min(len(metered.kw), round(hi))
        k = max(1, round(hi) - round(lo))
        values = metered.kw[j0:j1] if j1 > j0 else np.empty(0)
        have = ~np.isnan(values)
        mean[i] = float(values[have].mean()) if have.any() else np.nan
        cov[i] = have.sum() / k
        flags = metered.estimated
        est[i] = (flags[j0:j1][have].sum() / k) if flags is not None and j1 > j0 else 0.0
    return mean, cov, est, exact


def device_performance(
    baseline: DeviceBaseline,
    metered: DeviceHistory,
    requested_kw: float | None = None,
    *,
    event_start: datetime | None = None,
    event_end: datetime | None = None,
) -> DevicePerformance:
    """Compare a device's metered load with its baseline over the event window.

    ``[event_start, event_end)`` (default: the baseline's whole window) is the event's exact
    window inside the baseline's intervals (see the module docstring). ``metered`` may be on a
    finer grid than the baseline (e.g. 5-min meter data, 1-h baseline) as long as the baseline
    interval is a multiple of it; an interval is *missing* when less than half of its part in
    the event has data, and *estimated* when any of that data was estimated.
    """
    if baseline.device_id != metered.device_id:
        raise ValueError(f"baseline of {baseline.device_id} with meter data of {metered.device_id}")
    width = baseline.interval_s
    starts = interval_starts(baseline.start, baseline.end, width)
    lo = epoch_s(event_start) if event_start is not None else starts[0]
    hi = epoch_s(event_end) if event_end is not None else starts[-1] + width
    seg0 = np.clip(lo, starts, starts + width)
    seg1 = np.clip(hi, starts, starts + width)
    weights = (seg1 - seg0) / width
    if not (weights > 0).any():
        raise ValueError(f"{baseline.device_id}: the event lies outside the baseline's window")
    values, coverage, est_share, _ = _part_means(metered, starts, seg0, seg1, width)
    base = np.array(baseline.kw)
    inside = weights > 0
    missing = inside & ((coverage < 0.5) | np.isnan(values))
    estimated = inside & ~missing & (est_share > 0)
    used = np.where(missing | ~inside, base, values)
    delivered = np.where(inside, used - base, 0.0)
    hours = width / 3600.0
    event_hours = float(weights.sum() * hours)
    delivered_kwh = float((delivered * weights).sum() * hours)
    mean_delivered = delivered_kwh / event_hours
    n = int(inside.sum())
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
    widened = None
    if not np.allclose(weights, 1.0):
        w_values, w_cov, _ = metered.window(starts, width)
        w_used = np.where((w_cov < 0.5) | np.isnan(w_values), base, w_values)
        w_mean = float((w_used - base).mean())
        widened = WidenedFigures(
            start=baseline.start,
            end=baseline.end,
            baseline_kwh=float(base.sum() * hours),
            metered_kwh=float(w_used.sum() * hours),
            delivered_kwh=float((w_used - base).sum() * hours),
            mean_delivered_kw=w_mean,
            percent_of_request=_percent(w_mean, requested_kw),
        )
    return DevicePerformance(
        device_id=baseline.device_id,
        start=baseline.start,
        end=baseline.end,
        interval_s=width,
        baseline_kw=baseline.kw,
        weights=tuple(float(w) for w in weights),
        metered_kw=tuple(
            None if m or not i else float(v)
            for m, i, v in zip(missing, inside, values, strict=True)
        ),
        delivered_kw=tuple(float(v) for v in delivered),
        event_hours=event_hours,
        baseline_kwh=float((base * weights).sum() * hours),
        metered_kwh=float((used * weights).sum() * hours),
        delivered_kwh=delivered_kwh,
        mean_delivered_kw=mean_delivered,
        requested_kw=requested_kw,
        percent_of_request=_percent(mean_delivered, requested_kw),
        widened=widened,
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
    for d in devices[1:]:
        if d.weights != first.weights:
            raise ValueError(f"{group_id}: {d.device_id} is settled over a different event window")
    base = np.sum([d.baseline_kw for d in devices], axis=0)
    delivered = np.sum([d.delivered_kw for d in devices], axis=0)
    metered = base + delivered
    weights = np.array(first.weights)
    hours = first.interval_s / 3600.0
    delivered_kwh = float((delivered * weights).sum() * hours)
    mean_delivered = delivered_kwh / first.event_hours
    counts: dict[Quality, int] = {}
    for d in devices:
        counts[d.quality] = counts.get(d.quality, 0) + 1
    quality = worst(d.quality for d in devices)
    if excluded:
        quality = worst([quality, Quality.SUBSTITUTED])
    widened = None
    parts = [d.widened for d in devices]
    if all(p is not None for p in parts):
        known = [p for p in parts if p is not None]
        w_mean = sum(p.mean_delivered_kw for p in known)
        widened = WidenedFigures(
            start=first.start,
            end=first.end,
            baseline_kwh=sum(p.baseline_kwh for p in known),
            metered_kwh=sum(p.metered_kwh for p in known),
            delivered_kwh=sum(p.delivered_kwh for p in known),
            mean_delivered_kw=w_mean,
            percent_of_request=_percent(w_mean, requested_kw),
        )
    return GroupPerformance(
        group_id=group_id,
        start=first.start,
        end=first.end,
        interval_s=first.interval_s,
        baseline_kw=tuple(float(v) for v in base),
        weights=first.weights,
        metered_kw=tuple(float(v) for v in metered),
        delivered_kw=tuple(float(v) for v in delivered),
        event_hours=first.event_hours,
        baseline_kwh=float((base * weights).sum() * hours),
        metered_kwh=float((metered * weights).sum() * hours),
        delivered_kwh=delivered_kwh,
        mean_delivered_kw=mean_delivered,
        requested_kw=requested_kw,
        percent_of_request=_percent(mean_delivered, requested_kw),
        widened=widened,
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
    *,
    event_start: datetime | None = None,
    event_end: datetime | None = None,
) -> GroupPerformance:
    """Per-device and group performance of an event from a group baseline and meter data.

    ``requested_kw`` is the group request (the dispatch's ``kw``); ``device_requests`` the
    per-device allocations (``Allocation.commanded_kw``), when known; ``[event_start,
    event_end)`` the exact event window (default: the baseline's). Devices excluded from the
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
        results.append(
            device_performance(
                b,
                history,
                device_requests.get(b.device_id),
                event_start=event_start,
                event_end=event_end,
            )
        )
    if not results:
        raise ValueError(f"{baseline.group_id}: no device has both a baseline and meter data")
    return group_performance(baseline.group_id, results, requested_kw, excluded)


__all__ = [
    "DevicePerformance",
    "GroupPerformance",
    "WidenedFigures",
    "device_performance",
    "event_performance",
    "group_performance",
    "worst",
]
