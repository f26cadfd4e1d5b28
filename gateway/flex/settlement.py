"""Event settlement: the performance report of one dispatch, from baselines and meter history.

After a dispatch has run, Grid DERMS wants to know what it got (use case 6): for the targeted
group and for every device in it, the baseline it would have drawn, what it drew, what that
delivered against the request, and how far each number can be trusted. This module turns a
finished event and the devices' histories into a :class:`PerformanceReport`; the core reads the
histories from :mod:`gateway.history`, publishes the report on ``performance/{command_id}`` and
keeps it.

* **Window.** Baselines work on whole intervals (``BaselineConfig.interval_s``, 1 h by
  default), so baselines cover the event widened to the interval grid (epoch-aligned). The
  *performance* is over the event's exact window (:mod:`gateway.flex.performance`: partial
  intervals weighted by their share inside the event, metered over that share where the meter
  data is fine enough); the figures over the whole intervals are kept as supporting detail
  (``widened``) and the flag ``window_widened`` says so. An event cancelled early is settled up
  to when it was cancelled.
* **Baseline.** By ``config.method`` (:mod:`gateway.flex.methods`): CAISO 10-in-10 / 4-in-4
  with the day-of adjustment capped at ±20 % by default, PJM High 4 of 5, NYISO CBL,
  weather-matched, or a control group (then the held-out devices are not settled: they are
  the baseline, listed in ``control_devices``). The group's baseline is the sum of the device
  baselines, or with ``group = "aggregate_load"`` the rule applied to the group's summed load,
  shared out to the device rows pro rata (``GroupBaselineMode`` says why each).
* **Fallback.** A device with too few similar days (a new customer) gets the mean of its own
  load on the event day over ``fallback_window_s`` ending ``adjustment_offset_s`` before the
  start of the first settlement interval (like the day-of adjustment window: the event's start
  rounded down to the interval grid), as a flat profile of quality ``suspect`` and the flag
  ``fallback_pre_event_mean``
  (the hour just before is skipped for the same reason the adjustment skips it: customers who
  know about an event pre-charge or pre-cool then). Without even that, the device has no
  baseline, is listed in ``excluded`` and contributes nothing.
* **Performance.** :func:`gateway.flex.performance.event_performance` over every device the
  event concerned (the target group's members and every device allocated to it), with each
  device's request its last allocation. Load convention throughout: a reduction is negative,
  and ``performance_ratio = delivered / requested`` is 1.0 for exactly what was asked.

Pure: no I/O and no clock (``generated_at`` is a parameter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Literal

import numpy as np
from pydantic import Field

from gateway.flex.baseline import (
    BaselineConfig,
    BaselineMethod,
    DeviceBaseline,
    DeviceHistory,
    EventCalendar,
    ExcludedDevice,
    GroupBaseline,
    GroupBaselineMode,
    InsufficientHistory,
    epoch_s,
    from_epoch,
    interval_starts,
)
from gateway.flex.methods import (
    Temperatures,
    control_group,
    control_group_baseline,
    method_baseline,
    method_description,
    reach,
)
from gateway.flex.performance import (
    DevicePerformance,
    WidenedFigures,
    event_performance,
    worst,
)
from unified.model import (
    SCHEMA_VERSION,
    AckState,
    DispatchMode,
    Frozen,
    Identifier,
    Quality,
    UtcDatetime,
)


class FlagCode(StrEnum):
    WINDOW_WIDENED = "window_widened"
    """The event does not fill whole baseline intervals: baselines cover the whole intervals,
    performance the exact event (partial intervals weighted); ``widened`` has the figures over
    the whole intervals, as supporting detail."""
    FALLBACK_PRE_EVENT_MEAN = "fallback_pre_event_mean"
    """Too few similar days: the baseline is the same-day pre-event mean (suspect)."""
    EVENT_DAY_FALLBACK = "event_day_fallback"
    """The 10-in-10 was topped up with earlier event days (``BaselineConfig.fallback``)."""
    NO_BASELINE = "no_baseline"
    NO_METER_DATA = "no_meter_data"
    MISSING_INTERVALS = "missing_intervals"
    """Intervals without meter data: credited as baseline (delivered 0)."""
    ESTIMATED_INTERVALS = "estimated_intervals"
    """Intervals whose meter data includes questionable readings."""
    ADJUSTMENT_CAPPED = "adjustment_capped"
    NO_ADJUSTMENT = "no_adjustment"
    """No day-of adjustment could be computed (missing event-day data or a tiny baseline)."""
    NO_AGGREGATE_BASELINE = "no_aggregate_baseline"
    """``group = "aggregate_load"`` but the summed load has no baseline: devices summed."""
    CONTROL_DEVICE_CALLED = "control_device_called"
    """A device the control-group draw held out was allocated anyway: it is settled as a
    treated device, and the control group is smaller by it."""


class SettlementFlag(Frozen):
    code: FlagCode
    device_id: str | None = Field(default=None, description="None: the whole event")
    detail: str


class DeviceSettlement(Frozen):
    """One device's row: how its baseline was made and what it delivered."""

    device_id: str
    allocated: bool = Field(description="The planner gave it a share of the event")
    requested_kw: float | None = Field(
        default=None, description="Its last allocation, load convention"
    )
    baseline: DeviceBaseline | None = Field(
        default=None,
        description="Method, similar days, adjustment factor, per-interval kW; None: no baseline",
    )
    performance: DevicePerformance | None = Field(
        default=None,
        description="Per-interval baseline vs metered, delivered kWh / mean kW, quality",
    )
    flags: tuple[SettlementFlag, ...] = ()


class GroupSettlement(Frozen):
    """The event's total over its devices, interval by interval."""

    group_id: str
    interval_s: int
    baseline_kw: tuple[float, ...]
    weights: tuple[float, ...] = Field(description="Share of each interval inside the event")
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
    devices_settled: int
    devices_by_quality: dict[Quality, int]
    excluded: tuple[ExcludedDevice, ...] = ()
    quality: Quality


class PerformanceReport(Frozen):
    """Published, retained, on ``derms/v1/{gw}/performance/{command_id}`` after an event."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    command_id: str
    program: str
    group_id: str | None = Field(
        default=None, description="The dispatch's target group; None: device list"
    )
    final_state: AckState
    mode: DispatchMode
    dispatch_kw: float = Field(description="The dispatch's kw, load convention")
    requested_kw: float = Field(
        description="Requested change: dispatch_kw (delta), or dispatch_kw - baseline (target)"
    )
    event_start: UtcDatetime
    event_end: UtcDatetime = Field(description="End of the window, or when it was cancelled")
    start: UtcDatetime = Field(description="Baseline window (whole baseline intervals)")
    end: UtcDatetime
    interval_s: int
    generated_at: UtcDatetime
    baseline_method: str = Field(description="The rule in words, naming the method")
    method: BaselineMethod = BaselineMethod.CAISO_10_IN_10
    group_baseline: GroupBaselineMode = GroupBaselineMode.SUM_OF_DEVICES
    control_devices: tuple[str, ...] = Field(
        default=(), description="control_group: the held-out devices whose load is the baseline"
    )
    adjustment_cap: float
    delivered_kwh: float | None = Field(
        default=None,
        description="metered - baseline energy over the exact event window (negative: shed)",
    )
    mean_delivered_kw: float | None = Field(
        default=None, description="delivered_kwh / the event's duration"
    )
    performance_ratio: float | None = Field(
        default=None, description="mean delivered / requested: 1.0 is exactly what was asked"
    )
    widened: WidenedFigures | None = Field(
        default=None,
        description="The figures over the whole baseline intervals (start - end) when the "
        "event does not fill them: supporting detail, not the settled result",
    )
    group: GroupSettlement | None = None
    devices: tuple[DeviceSettlement, ...]
    flags: tuple[SettlementFlag, ...] = ()
    quality: Quality


class PerformanceRequest(Frozen):
    """What Grid DERMS asks on ``derms/v1/{gw}/requests/performance``."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    command_id: Identifier


@dataclass(frozen=True, slots=True)
class EventToSettle:
    """A finished dispatch as settlement needs it (the core builds it from the command book)."""

    command_id: str
    program: str
    group_id: str | None
    mode: DispatchMode
    kw: float
    start: datetime
    end: datetime
    final_state: AckState
    devices: tuple[str, ...]
    """Everything the event concerned: the target's members and every allocated device."""
    allocations: Mapping[str, float] = field(default_factory=dict)
    """Last commanded kW of each allocated device."""


def settlement_window(start: datetime, end: datetime, interval_s: int) -> tuple[datetime, datetime]:
    """``[start, end)`` widened to whole ``interval_s`` intervals of the epoch grid."""
    t0 = math.floor(epoch_s(start) / interval_s) * interval_s
    t1 = max(t0 + interval_s, math.ceil(epoch_s(end) / interval_s - 1e-9) * interval_s)
    return from_epoch(t0), from_epoch(t1)


def history_span(start: datetime, config: BaselineConfig, fallback_window_s: int) -> datetime:
    """The earliest time a settlement of a window starting at ``start`` reads history from."""
    lookback_days, adjustment_s = reach(config)
    before = max(adjustment_s, config.adjustment_offset_s + fallback_window_s)
    return from_epoch(epoch_s(start) - (lookback_days + 1) * 86_400 - before)


def pre_event_baseline(
    history: DeviceHistory,
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    config: BaselineConfig,
    window_s: int,
    reason: str,
) -> DeviceBaseline | None:
    """The documented fallback: a flat profile at the device's mean load before the event.

    The mean is over ``[start - offset - window_s, start - offset)`` of the event day, where
    ``offset`` is the adjustment offset; None if less than half of that span has data.
    """
    w1 = epoch_s(start) - config.adjustment_offset_s
    w0 = w1 - window_s
    t0 = epoch_s(history.start)
    lo = max(0, math.ceil((w0 - t0) / history.interval_s - 1e-9))
    hi = min(len(history.kw), math.floor((w1 - t0) / history.interval_s + 1e-9))
    expected = max(1, round(window_s / history.interval_s))
    values = history.kw[lo:hi] if hi > lo else np.empty(0)
    have = values[~np.isnan(values)]
    if len(have) < 0.5 * expected:
        return None
    mean = float(have.mean())
    n = len(interval_starts(start, end, config.interval_s))
    event_day = calendar.local_day(start)
    return DeviceBaseline(
        device_id=history.device_id,
        event_day=event_day,
        day_type=calendar.day_type(event_day),
        start=start,
        end=end,
        interval_s=config.interval_s,
        kw=(mean,) * n,
        unadjusted_kw=(mean,) * n,
        adjustment_factor=1.0,
        raw_adjustment_factor=None,
        adjustment_capped=False,
        selected_days=(),
        quality=Quality.SUSPECT,
        method=(
            f"same-day pre-event mean over {window_s} s ending {config.adjustment_offset_s} s "
            f"before the start (fallback: {reason})"
        ),
    )


def _baseline_flags(device_id: str, baseline: DeviceBaseline) -> list[SettlementFlag]:
    flags = []
    if baseline.fallback_days:
        flags.append(
            SettlementFlag(
                code=FlagCode.EVENT_DAY_FALLBACK,
                device_id=device_id,
                detail=f"{len(baseline.fallback_days)} earlier event day(s) in the baseline",
            )
        )
    if baseline.adjustment_capped:
        flags.append(
            SettlementFlag(
                code=FlagCode.ADJUSTMENT_CAPPED,
                device_id=device_id,
                detail=f"day-of ratio {baseline.raw_adjustment_factor:.3f} capped to "
                f"{baseline.adjustment_factor:.3f}",
            )
        )
    elif (
        baseline.selected_days
        and baseline.raw_adjustment_factor is None
        and baseline.adjustment_kw is None
    ):
        note = baseline.method.rsplit("; ", 1)[-1]
        flags.append(SettlementFlag(code=FlagCode.NO_ADJUSTMENT, device_id=device_id, detail=note))
    return flags


def _performance_flags(perf: DevicePerformance) -> list[SettlementFlag]:
    flags = []
    if perf.intervals_missing:
        flags.append(
            SettlementFlag(
                code=FlagCode.MISSING_INTERVALS,
                device_id=perf.device_id,
                detail=f"{perf.intervals_missing} of {perf.intervals_total} interval(s) without "
                "meter data, credited at baseline",
            )
        )
    if perf.intervals_estimated:
        flags.append(
            SettlementFlag(
                code=FlagCode.ESTIMATED_INTERVALS,
                device_id=perf.device_id,
                detail=f"{perf.intervals_estimated} of {perf.intervals_total} interval(s) with "
                "questionable readings",
            )
        )
    return flags


def settle_event(
    event: EventToSettle,
    histories: Mapping[str, DeviceHistory],
    calendar: EventCalendar,
    *,
    generated_at: datetime,
    config: BaselineConfig | None = None,
    fallback_window_s: int = 3600,
    metered: Mapping[str, DeviceHistory] | None = None,
    temperatures: Mapping[str, Temperatures] | None = None,
) -> PerformanceReport:
    """The performance report of one finished dispatch (see the module docstring).

    ``metered`` is meter data over the settlement window on a grid finer than the baseline's
    (so the part of a partial interval inside the event is metered exactly); default: the
    ``histories``, on the baseline's grid. ``temperatures``: each device's outdoor temperature
    series, for the weather-matched rule."""
    config = config or BaselineConfig()
    start, end = settlement_window(event.start, event.end, config.interval_s)
    exact_start = event.start
    exact_end = max(event.end, event.start + timedelta(seconds=1))
    flags: list[SettlementFlag] = []
    metered = metered or histories
    temperatures = temperatures or {}
    baselines: dict[str, DeviceBaseline] = {}
    excluded: list[ExcludedDevice] = []
    settled = event.devices
    control: tuple[str, ...] = ()
    control_flags: list[SettlementFlag] = []
    if config.method is BaselineMethod.CONTROL_GROUP:
        drawn = control_group(event.devices, config.control_share, config.control_seed)
        for device_id in sorted(drawn & set(event.allocations)):
            control_flags.append(
                SettlementFlag(
                    code=FlagCode.CONTROL_DEVICE_CALLED,
                    device_id=device_id,
                    detail="held out as control but allocated: settled as treated",
                )
            )
        control = tuple(sorted(drawn - set(event.allocations)))
        settled = tuple(d for d in event.devices if d not in control)
    device_flags: dict[str, list[SettlementFlag]] = {d: [] for d in settled}
    for flag in control_flags:
        device_flags[str(flag.device_id)].append(flag)
    control_histories = {d: histories[d] for d in control if d in histories}
    for device_id in settled:
        history = histories.get(device_id)
        if history is None or np.isnan(history.kw).all():
            reason = "no history"
            excluded.append(ExcludedDevice(device_id=device_id, reason=reason))
            device_flags[device_id].append(
                SettlementFlag(code=FlagCode.NO_METER_DATA, device_id=device_id, detail=reason)
            )
            continue
        try:
            if config.method is BaselineMethod.CONTROL_GROUP:
                baseline = control_group_baseline(
                    device_id,
                    control_histories,
                    calendar,
                    start,
                    end,
                    config,
                    treated={d: histories[d] for d in settled if d in histories},
                )
            else:
                baseline = method_baseline(
                    history, calendar, start, end, config, temperatures=temperatures.get(device_id)
                )
            device_flags[device_id].extend(_baseline_flags(device_id, baseline))
        except InsufficientHistory as exc:
            fallback = pre_event_baseline(
                history, calendar, start, end, config, fallback_window_s, str(exc)
            )
            if fallback is None:
                reason = f"{exc}; no event-day data before the event either"
                excluded.append(ExcludedDevice(device_id=device_id, reason=reason))
                device_flags[device_id].append(
                    SettlementFlag(code=FlagCode.NO_BASELINE, device_id=device_id, detail=reason)
                )
                continue
            baseline = fallback
            device_flags[device_id].append(
                SettlementFlag(
                    code=FlagCode.FALLBACK_PRE_EVENT_MEAN, device_id=device_id, detail=str(exc)
                )
            )
        except ValueError as exc:
            excluded.append(ExcludedDevice(device_id=device_id, reason=str(exc)))
            device_flags[device_id].append(
                SettlementFlag(code=FlagCode.NO_BASELINE, device_id=device_id, detail=str(exc))
            )
            continue
        baselines[device_id] = baseline

    if config.group is GroupBaselineMode.AGGREGATE_LOAD and baselines:
        try:
            baselines = _aggregate_shares(
                group_id_of(event), baselines, histories, calendar, start, end, config, temperatures
            )
        except ValueError as exc:  # InsufficientHistory included
            flags.append(
                SettlementFlag(
                    code=FlagCode.NO_AGGREGATE_BASELINE,
                    detail=f"no baseline of the summed load ({exc}): sum of device baselines",
                )
            )
    starts = interval_starts(start, end, config.interval_s)
    lo, hi = epoch_s(exact_start), epoch_s(exact_end)
    weights = (
        np.clip(hi, starts, starts + config.interval_s)
        - np.clip(lo, starts, starts + config.interval_s)
    ) / config.interval_s
    total = np.zeros(len(starts))
    for b in baselines.values():
        total += np.array(b.kw)

    def over_event(kw: np.ndarray) -> float:  # the baseline's mean over the exact window
        return float((kw * weights).sum() / weights.sum())

    base_mean = over_event(total) if baselines else 0.0
    requested = event.kw if event.mode is DispatchMode.DELTA else event.kw - base_mean
    device_requests = dict(event.allocations)
    if event.mode is DispatchMode.TARGET:
        device_requests = {
            d: kw - over_event(np.array(baselines[d].kw)) if d in baselines else kw
            for d, kw in device_requests.items()
        }

    group: GroupSettlement | None = None
    performances: dict[str, DevicePerformance] = {}
    group_id = group_id_of(event)
    if baselines:
        group_baseline = GroupBaseline(
            group_id=group_id,
            start=start,
            end=end,
            interval_s=config.interval_s,
            kw=tuple(float(v) for v in total),
            devices=tuple(baselines.values()),
            excluded=tuple(excluded),
            quality=worst(b.quality for b in baselines.values()),
        )
        perf = event_performance(
            group_baseline,
            {d: h for d, h in metered.items() if d in baselines},
            requested,
            device_requests,
            event_start=exact_start,
            event_end=exact_end,
        )
        performances = {p.device_id: p for p in perf.devices}
        group = GroupSettlement(
            group_id=group_id,
            interval_s=perf.interval_s,
            baseline_kw=perf.baseline_kw,
            weights=perf.weights,
            metered_kw=perf.metered_kw,
            delivered_kw=perf.delivered_kw,
            event_hours=perf.event_hours,
            baseline_kwh=perf.baseline_kwh,
            metered_kwh=perf.metered_kwh,
            delivered_kwh=perf.delivered_kwh,
            mean_delivered_kw=perf.mean_delivered_kw,
            requested_kw=perf.requested_kw,
            percent_of_request=perf.percent_of_request,
            widened=perf.widened,
            devices_settled=len(perf.devices),
            devices_by_quality=perf.devices_by_quality,
            excluded=perf.excluded,
            quality=perf.quality,
        )
        for p in perf.devices:
            device_flags[p.device_id].extend(_performance_flags(p))
    else:
        flags.append(SettlementFlag(code=FlagCode.NO_BASELINE, detail="no device has a baseline"))

    rows = tuple(
        DeviceSettlement(
            device_id=d,
            allocated=d in event.allocations,
            requested_kw=device_requests.get(d),
            baseline=baselines.get(d),
            performance=performances.get(d),
            flags=tuple(device_flags[d]),
        )
        for d in settled
    )
    for row in rows:
        flags.extend(row.flags)
    ratio = None
    if group is not None and group.percent_of_request is not None:
        ratio = group.percent_of_request / 100.0
    if (start, end) != (event.start, event.end):
        detail = (
            f"event {event.start.isoformat()} - {event.end.isoformat()} "
            f"({(hi - lo) / 3600:.3f} h) settled over its exact window, partial intervals "
            f"weighted; baselines over whole {config.interval_s} s intervals "
            f"{start.isoformat()} - {end.isoformat()}"
        )
        widened = group.widened if group is not None else None
        if widened is not None and widened.percent_of_request is not None and ratio is not None:
            detail += (
                f"; over those whole intervals the ratio would read "
                f"{widened.percent_of_request / 100:.3f} instead of {ratio:.3f} (supporting "
                "detail in 'widened')"
            )
        flags.insert(0, SettlementFlag(code=FlagCode.WINDOW_WIDENED, detail=detail))
    return PerformanceReport(
        command_id=event.command_id,
        program=event.program,
        group_id=event.group_id,
        final_state=event.final_state,
        mode=event.mode,
        dispatch_kw=event.kw,
        requested_kw=requested,
        event_start=event.start,
        event_end=event.end,
        start=start,
        end=end,
        interval_s=config.interval_s,
        generated_at=generated_at,
        baseline_method=method_description(config),
        method=config.method,
        group_baseline=config.group,
        control_devices=control,
        adjustment_cap=config.adjustment_cap,
        delivered_kwh=group.delivered_kwh if group else None,
        mean_delivered_kw=group.mean_delivered_kw if group else None,
        performance_ratio=ratio,
        widened=group.widened if group is not None else None,
        group=group,
        devices=rows,
        flags=tuple(flags),
        quality=group.quality if group is not None else Quality.INVALID,
    )


def group_id_of(event: EventToSettle) -> str:
    return event.group_id or f"command:{event.command_id}"


def _aggregate_shares(
    group_id: str,
    baselines: Mapping[str, DeviceBaseline],
    histories: Mapping[str, DeviceHistory],
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    config: BaselineConfig,
    temperatures: Mapping[str, Temperatures],
) -> dict[str, DeviceBaseline]:
    """``group = "aggregate_load"``: the rule applied to the summed load of the devices whose
    baseline came from the rule, shared out to them in proportion to their own baselines
    (equally where those sum to zero). Devices on the pre-event fallback keep theirs: their
    short history would lower the sum on the days before they joined. An interval is NaN in the
    sum only where no device has data; the group's event days are every summed device's.
    Raises like the rule when the sum has no baseline: the caller then keeps the device
    baselines (sum of devices) and says so."""
    ruled = {d: b for d, b in baselines.items() if b.selected_days and d in histories}
    if not ruled:
        raise ValueError(f"{group_id}: no device baseline from the rule to sum")
    members = [histories[d] for d in ruled]
    grids = {(h.start, h.interval_s, len(h.kw)) for h in members}
    if len(grids) != 1:
        raise ValueError(f"{group_id}: device histories are not on one grid")
    stacked = np.array([h.kw for h in members])
    have = ~np.isnan(stacked)
    summed = np.where(have.any(axis=0), np.where(have, stacked, 0.0).sum(axis=0), np.nan)
    first = members[0]
    pseudo = DeviceHistory(group_id, first.start, first.interval_s, summed)
    days: set[date] = set()
    for d in ruled:
        days |= calendar.device_event_days.get(d, frozenset())
    group_calendar = EventCalendar(
        event_days=calendar.event_days,
        holidays=calendar.holidays,
        tz=calendar.tz,
        device_event_days={group_id: frozenset(days)},
    )
    temps = next(iter(temperatures.values()), None)
    total = method_baseline(pseudo, group_calendar, start, end, config, temperatures=temps)
    group_kw = np.array(total.kw)
    device_kw = {d: np.array(b.kw) for d, b in ruled.items()}
    device_sum = np.sum(list(device_kw.values()), axis=0)
    out = dict(baselines)
    for d, b in ruled.items():
        share = np.divide(
            device_kw[d],
            device_sum,
            out=np.full(len(group_kw), 1.0 / len(ruled)),
            where=np.abs(device_sum) > 1e-9,
        )
        out[d] = b.model_copy(
            update={
                "kw": tuple(float(v) for v in group_kw * share),
                "method": f"{b.method}; pro-rata share of the group's aggregate-load baseline "
                f"({total.method})",
            }
        )
    return out


def event_days(start: datetime, end: datetime, calendar: EventCalendar) -> list[date]:
    """The local days an event touched (they are not "similar days" for later baselines)."""
    first = calendar.local_day(start)
    last = calendar.local_day(from_epoch(max(epoch_s(start), epoch_s(end) - 1e-6)))
    return [first + timedelta(days=k) for k in range((last - first).days + 1)]


__all__ = [
    "DeviceSettlement",
    "EventToSettle",
    "FlagCode",
    "GroupSettlement",
    "PerformanceReport",
    "PerformanceRequest",
    "SettlementFlag",
    "event_days",
    "group_id_of",
    "history_span",
    "pre_event_baseline",
    "settle_event",
    "settlement_window",
]
