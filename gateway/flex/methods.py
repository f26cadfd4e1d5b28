"""The baseline rules besides CAISO's 10-in-10: PJM, NYISO, weather-matched, control group.

Utilities settle on different rules, and a program is paid on the one its tariff names, so the
rule is configuration (``[settlement.baseline] method``, or per program in
``[settlement.programs.<name>]``). Each rule below is written as its tariff states it, on the
settlement's intervals (hourly by default) and local clock times (the same clock-time matching
as :mod:`gateway.flex.baseline`, so DST days are read at the right hours):

* **PJM "High 4 of 5"** (economic load response CBL, PJM Manual 11). Weekdays: the 5 most
  recent eligible weekdays within 45 days (not holidays, not event days, meter data present);
  the 4 of them with the highest mean load over the event hours are averaged. Saturdays: the 2
  highest of the 3 most recent Saturdays; Sundays and holidays: 2 of the 3 most recent Sundays /
  holidays. Low-usage days (mean event-hour load below 25 % of the mean of the 5) are replaced
  by the next older eligible day. Symmetric additive adjustment: the event day's actual minus
  the CBL's mean load over the 2 hours starting 3 hours before the event is *added* to every
  hour (up or down, uncapped: additive because a ratio on a small pre-event load swings wildly).
* **NYISO CBL** (ICAP/SCR and DADRP, NYISO's Emergency Demand Response manual). Weekdays: the
  10 most recent eligible weekdays within 30 days, low-usage days (below 25 % of the window's
  mean event-hour load) replaced by older ones, then the 5 highest averaged. Weekends: 2 highest
  of the 3 most recent like days (Saturday; Sunday / holiday). In-day adjustment: the ratio of
  actual to CBL over the 2 hours starting 4 hours before the event (early enough that a
  notified customer has not yet pre-cooled), capped to 0.8 - 1.2.
* **Weather-matched** (thermal loads: heat pumps, air conditioners, water heaters). Their load
  follows the outdoor temperature more than the calendar, so the similar days are the past days
  of the same type (weekday / weekend-or-holiday) whose mean outdoor temperature over the event's
  clock hours was closest to the event day's; ``weather_days`` (5) of them are averaged, no
  day-of adjustment (the temperature match does its job). It needs the outdoor temperature of
  the past days at those hours: the gateway records every forecast it receives, point by point,
  in the history file (:class:`gateway.weather.TemperatureRecord`: each hour at its newest
  forecast, the nearest thing to an observation it has), so the rule works once forecasts have
  covered the look-back; before that it finds too few days and settlement falls back (flag
  ``fallback_pre_event_mean``), saying so.
* **Control group** (mass-market programs: thousands of small devices, where any one device's
  baseline is noise). A share of the group (``control_share``) is held out by a seeded draw
  (:func:`control_group`: deterministic, independent of the order devices are listed in) and
  never called; every treated device's baseline is the control devices' mean metered load in
  each interval, so the treated group's baseline is that mean times the number of treated
  devices (``control_scaling = "pre_event"``: times the treated over control load before the
  event, capped ±``adjustment_cap``, for draws that came out unlike). The planner leaves
  held-out devices alone: the core adds them to the dispatch's
  ``ActiveCommand.excluded`` (the eligibility flag a refusing device gets), drawing them from
  the target's members as settlement does (``Gateway._hold_out``).

``interval_s``, ``min_coverage`` and ``min_adjust_kw`` of :class:`BaselineConfig` apply to every
rule; the day counts, look-back, adjustment window and ``fallback`` (event days topping up the
selection) are CAISO's, the PJM and NYISO rules use their tariffs' own (:data:`PJM_HIGH_4_OF_5`,
:data:`NYISO_CBL`), and the weather-matched rule uses ``lookback_days``.

Pure, like :mod:`gateway.flex.baseline`: histories, calendars and temperatures come in as
arguments.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal, Protocol

import numpy as np

from gateway.flex.baseline import (
    BaselineConfig,
    BaselineMethod,
    ControlScaling,
    DeviceBaseline,
    DeviceHistory,
    EventCalendar,
    FloatArray,
    InsufficientHistory,
    device_baseline,
    epoch_s,
    from_epoch,
    interval_starts,
)
from unified.model import Quality


class Temperatures(Protocol):
    """Outdoor temperatures over time: :class:`gateway.weather.TemperatureRecord` (what the
    gateway recorded from the forecasts it received) or a :class:`~gateway.weather.
    TemperatureSeries` (one forecast or a feed of observations)."""

    def means(self, starts: FloatArray, interval_s: float) -> FloatArray:
        """Mean °C over each ``[s, s + interval_s)``; NaN where not known."""
        ...


@dataclass(frozen=True, slots=True)
class HighOfRule:
    """A "highest X of the Y most recent like days" rule with a day-of adjustment."""

    name: str
    weekday_window: int
    weekday_highest: int
    weekend_window: int
    weekend_highest: int
    lookback_days: int
    low_usage_share: float
    """Weekdays whose mean event-hour load is below this share of the window's are replaced."""
    adjustment: Literal["additive", "ratio"]
    adjustment_offset_s: int
    """The adjustment window ends this long before the event starts."""
    adjustment_duration_s: int
    adjustment_cap: float | None
    """Cap on ``|ratio - 1|``; None: uncapped."""


PJM_HIGH_4_OF_5 = HighOfRule(
    name="PJM High 4 of 5",
    weekday_window=5,
    weekday_highest=4,
    weekend_window=3,
    weekend_highest=2,
    lookback_days=45,
    low_usage_share=0.25,
    adjustment="additive",
    adjustment_offset_s=3600,
    adjustment_duration_s=7200,
    adjustment_cap=None,
)
NYISO_CBL = HighOfRule(
    name="NYISO CBL",
    weekday_window=10,
    weekday_highest=5,
    weekend_window=3,
    weekend_highest=2,
    lookback_days=30,
    low_usage_share=0.25,
    adjustment="ratio",
    adjustment_offset_s=7200,
    adjustment_duration_s=7200,
    adjustment_cap=0.20,
)
HIGH_OF_RULES = {
    BaselineMethod.PJM_HIGH_4_OF_5: PJM_HIGH_4_OF_5,
    BaselineMethod.NYISO_CBL: NYISO_CBL,
}


def like_day(calendar: EventCalendar, day: date) -> str:
    """PJM's and NYISO's day classes: weekday, Saturday, or Sunday / holiday."""
    if day in calendar.holidays or day.weekday() == 6:
        return "sunday_holiday"
    return "saturday" if day.weekday() == 5 else "weekday"


def reach(config: BaselineConfig) -> tuple[int, int]:
    """``(look-back days, seconds before the start)`` a baseline of ``config`` reads."""
    rule = HIGH_OF_RULES.get(config.method)
    caiso = config.adjustment_offset_s + config.adjustment_duration_s
    if rule is None:
        return config.lookback_days, caiso
    return (
        max(config.lookback_days, rule.lookback_days),
        max(caiso, rule.adjustment_offset_s + rule.adjustment_duration_s),
    )


def _eligible_days(
    history: DeviceHistory,
    calendar: EventCalendar,
    event_day: date,
    clock: tuple[timedelta, ...],
    config: BaselineConfig,
    lookback_days: int,
    accept: Iterable[date] | None = None,
) -> Iterator[tuple[date, FloatArray]]:
    """Most recent first: the non-event days of the look-back with enough meter data, with the
    device's mean kW at each clock time of ``clock`` (NaN where missing)."""
    wanted = None if accept is None else set(accept)
    for back in range(1, lookback_days + 1):
        day = event_day - timedelta(days=back)
        if wanted is not None and day not in wanted:
            continue
        if calendar.is_event_day(history.device_id, day):
            continue
        means, coverage, _ = history.window(calendar.at_clock_times(day, clock), config.interval_s)
        if np.isnan(coverage).all() or np.nanmean(coverage) < config.min_coverage:
            continue
        yield day, means


def _profile(rows: list[FloatArray]) -> FloatArray:
    stacked = np.array(rows)
    have = ~np.isnan(stacked)
    n_have = have.sum(axis=0)
    out = np.full(stacked.shape[1], np.nan)
    np.divide(np.where(have, stacked, 0.0).sum(axis=0), n_have, out=out, where=n_have > 0)
    return out


def _adjustment_starts(
    start: datetime, offset_s: int, duration_s: int, interval_s: int
) -> FloatArray:
    if duration_s <= 0:
        return np.empty(0)
    adj_end = epoch_s(start) - offset_s
    return interval_starts(from_epoch(adj_end - duration_s), from_epoch(adj_end), interval_s)


def high_of_baseline(
    history: DeviceHistory,
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    config: BaselineConfig,
    rule: HighOfRule,
) -> DeviceBaseline:
    """A PJM / NYISO style baseline (see the module docstring); raises
    :class:`InsufficientHistory` with fewer eligible days than the rule averages."""
    starts = interval_starts(start, end, config.interval_s)
    adj_starts = _adjustment_starts(
        start, rule.adjustment_offset_s, rule.adjustment_duration_s, config.interval_s
    )
    needed = np.concatenate([starts, adj_starts])
    n = len(starts)
    event_day = calendar.local_day(start)
    kind = like_day(calendar, event_day)
    weekday = kind == "weekday"
    size = rule.weekday_window if weekday else rule.weekend_window
    highest = rule.weekday_highest if weekday else rule.weekend_highest
    clock = calendar.clock_times(event_day, needed)
    like = (
        event_day - timedelta(days=b)
        for b in range(1, rule.lookback_days + 1)
        if like_day(calendar, event_day - timedelta(days=b)) == kind
    )
    candidates = _eligible_days(
        history, calendar, event_day, clock, config, rule.lookback_days, list(like)
    )

    def usage(means: FloatArray) -> float:  # mean load over the event hours
        return float(np.nanmean(means[:n])) if not np.isnan(means[:n]).all() else math.nan

    window = [(d, m, usage(m)) for d, m in _take(candidates, size)]
    window = [w for w in window if not math.isnan(w[2])]
    low: list[date] = []
    window_mean = float(np.mean([u for _, _, u in window])) if window else 0.0
    # The low-usage test is for consumption: a net exporter's (PV, a discharging battery)
    # "25 % of the mean" would exclude its higher-export days instead.
    if weekday and rule.low_usage_share > 0 and window_mean > 0:
        threshold = rule.low_usage_share * window_mean
        low = [d for d, _, u in window if u < threshold]
        window = [w for w in window if w[2] >= threshold]
        for day, means in candidates:
            if len(window) >= size:
                break
            u = usage(means)
            if not math.isnan(u) and u >= threshold:
                window.append((day, means, u))
            else:
                low.append(day)
    day_type = calendar.day_type(event_day)
    if len(window) < highest:
        raise InsufficientHistory(
            history.device_id,
            day_type,
            len(window),
            highest,
            f"{rule.name} averages the {highest} highest of {size} {kind} day(s)",
        )
    # Highest mean event-hour load first; between equals, the more recent (sorted is stable).
    chosen = sorted(window, key=lambda w: -w[2])[:highest]
    profile = _profile([m for _, m, _ in chosen])
    event_profile = profile[:n]
    if np.isnan(event_profile).any():
        raise InsufficientHistory(
            history.device_id,
            day_type,
            len(chosen),
            highest,
            "no chosen day has data for some event interval",
        )
    factor, raw, add_kw = 1.0, None, None
    kw = event_profile
    note = "no day-of adjustment"
    if len(adj_starts):
        actual, coverage, _ = history.window(adj_starts, config.interval_s)
        base_adj = profile[n:]
        ok = ~np.isnan(actual) & ~np.isnan(base_adj)
        if coverage.mean() < config.min_coverage or not ok.any():
            note = "no day-of adjustment: event-day data missing before the event"
        elif rule.adjustment == "additive":
            add_kw = float(actual[ok].mean() - base_adj[ok].mean())
            kw = event_profile + add_kw
            note = f"symmetric additive adjustment {add_kw:+.3f} kW"
        else:
            base_mean = float(base_adj[ok].mean())
            if base_mean <= config.min_adjust_kw:
                note = "no day-of adjustment: baseline too small in the adjustment window"
            else:
                raw = float(actual[ok].mean()) / base_mean
                cap = rule.adjustment_cap
                factor = raw if cap is None else min(1 + cap, max(1 - cap, raw))
                kw = event_profile * factor
                note = f"in-day adjustment x{factor:.3f}"
    capped = raw is not None and abs(raw - factor) > 1e-12
    method = f"{rule.name}: highest {highest} of {len(window)} {kind} day(s)"
    if low:
        method += f", {len(low)} low-usage day(s) replaced"
    return DeviceBaseline(
        device_id=history.device_id,
        event_day=event_day,
        day_type=day_type,
        start=start,
        end=end,
        interval_s=config.interval_s,
        kw=tuple(float(v) for v in kw),
        unadjusted_kw=tuple(float(v) for v in event_profile),
        adjustment_factor=factor,
        raw_adjustment_factor=raw,
        adjustment_capped=capped,
        adjustment_kw=add_kw,
        selected_days=tuple(sorted((d for d, _, _ in chosen), reverse=True)),
        quality=Quality.GOOD,
        method=f"{method}; {note}",
    )


def _take(items: Iterator[tuple[date, FloatArray]], k: int) -> list[tuple[date, FloatArray]]:
    out = []
    for item in items:
        out.append(item)
        if len(out) == k:
            break
    return out


def weather_matched_baseline(
    history: DeviceHistory,
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    config: BaselineConfig,
    temperatures: Temperatures | None,
) -> DeviceBaseline:
    """The mean of the ``weather_days`` same-type days closest in outdoor temperature at the
    event's clock hours (see the module docstring); raises :class:`InsufficientHistory` with
    fewer than ``min_weather_days`` such days (no temperature history counts as none)."""
    event_day = calendar.local_day(start)
    day_type = calendar.day_type(event_day)
    if temperatures is None:
        raise InsufficientHistory(
            history.device_id, day_type, 0, config.min_weather_days, "no outdoor temperatures"
        )
    starts = interval_starts(start, end, config.interval_s)
    event_temps = temperatures.means(starts, config.interval_s)
    if np.isnan(event_temps).any():
        raise InsufficientHistory(
            history.device_id,
            day_type,
            0,
            config.min_weather_days,
            "no outdoor temperature for the event hours",
        )
    target = float(event_temps.mean())
    clock = calendar.clock_times(event_day, starts)
    same_type = [
        event_day - timedelta(days=b)
        for b in range(1, config.lookback_days + 1)
        if calendar.day_type(event_day - timedelta(days=b)) is day_type
    ]
    scored: list[tuple[float, int, date, FloatArray, float]] = []
    for rank, (day, means) in enumerate(
        _eligible_days(history, calendar, event_day, clock, config, config.lookback_days, same_type)
    ):
        at = calendar.at_clock_times(day, clock)
        temps = temperatures.means(at, config.interval_s)
        if np.isnan(temps[~np.isnan(at)]).any() or np.isnan(at).all():
            continue  # no temperature for that day's event hours
        mean_temp = float(np.nanmean(temps))
        scored.append((abs(mean_temp - target), rank, day, means, mean_temp))
    scored.sort(key=lambda s: (s[0], s[1]))
    chosen = scored[: config.weather_days]
    if len(chosen) < config.min_weather_days:
        raise InsufficientHistory(
            history.device_id,
            day_type,
            len(chosen),
            config.min_weather_days,
            "too few past days with outdoor temperatures at the event hours",
        )
    profile = _profile([c[3] for c in chosen])
    if np.isnan(profile).any():
        raise InsufficientHistory(
            history.device_id,
            day_type,
            len(chosen),
            len(chosen),
            "no chosen day has data for some event interval",
        )
    chosen_temps = [c[4] for c in chosen]
    return DeviceBaseline(
        device_id=history.device_id,
        event_day=event_day,
        day_type=day_type,
        start=start,
        end=end,
        interval_s=config.interval_s,
        kw=tuple(float(v) for v in profile),
        unadjusted_kw=tuple(float(v) for v in profile),
        adjustment_factor=1.0,
        adjustment_capped=False,
        selected_days=tuple(sorted((c[2] for c in chosen), reverse=True)),
        quality=Quality.GOOD,
        method=(
            f"weather-matched: {len(chosen)} {day_type.value} day(s) closest to {target:.1f} °C "
            f"at the event hours ({min(chosen_temps):.1f} - {max(chosen_temps):.1f} °C); "
            "no day-of adjustment"
        ),
    )


def control_group(device_ids: Iterable[str], share: float, seed: int) -> frozenset[str]:
    """The held-out devices: the ``round(share · n)`` (at least 1, at most n - 1) devices
    whose SHA-256 of ``"{seed}:{device_id}"`` sorts first. Deterministic and independent of
    the order devices are listed in; a group of fewer than 2 has no control group."""
    ids = sorted(set(device_ids))
    if len(ids) < 2:
        return frozenset()
    k = min(len(ids) - 1, max(1, round(share * len(ids))))
    ranked = sorted(ids, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).digest())
    return frozenset(ranked[:k])


def control_group_baseline(
    device_id: str,
    control: Mapping[str, DeviceHistory],
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    config: BaselineConfig,
    treated: Mapping[str, DeviceHistory] | None = None,
) -> DeviceBaseline:
    """A treated device's baseline: the control devices' mean metered kW per interval.

    With ``control_scaling = "pre_event"`` the mean is scaled by the treated devices' mean
    load over the control devices' in the day-of adjustment window (``adjustment_offset_s``,
    ``adjustment_duration_s``), capped to ``1 ± adjustment_cap`` like the day-of adjustment
    (a treated customer who pre-cools must not inflate it); ``treated`` are their histories.
    ``suspect`` when some control device lacks data in some interval (the mean is then of
    fewer devices); raises :class:`InsufficientHistory` when an interval has none at all."""
    starts = interval_starts(start, end, config.interval_s)
    event_day = calendar.local_day(start)
    day_type = calendar.day_type(event_day)
    rows = [h.window(starts, config.interval_s)[0] for h in control.values()]
    if not rows:
        raise InsufficientHistory(device_id, day_type, 0, 1, "no control group")
    profile = _profile(rows)
    if np.isnan(profile).any():
        raise InsufficientHistory(
            device_id, day_type, 0, 1, "no control device has meter data for some interval"
        )
    complete = not np.isnan(np.array(rows)).any()
    factor, raw, note = 1.0, None, ""
    if config.control_scaling is ControlScaling.PRE_EVENT:
        factor, raw, note = _pre_event_scaling(control, treated or {}, start, config)
    capped = raw is not None and abs(raw - factor) > 1e-12
    return DeviceBaseline(
        device_id=device_id,
        event_day=event_day,
        day_type=day_type,
        start=start,
        end=end,
        interval_s=config.interval_s,
        kw=tuple(float(v) for v in profile * factor),
        unadjusted_kw=tuple(float(v) for v in profile),
        adjustment_factor=factor,
        raw_adjustment_factor=raw,
        adjustment_capped=capped,
        selected_days=(),
        quality=Quality.GOOD if complete else Quality.SUSPECT,
        method=(
            f"control group: mean metered load of {len(rows)} held-out device(s) (share "
            f"{config.control_share:.0%}, seed {config.control_seed})"
            + note
            + ("" if complete else "; some control intervals without data")
        ),
    )


def _pre_event_scaling(
    control: Mapping[str, DeviceHistory],
    treated: Mapping[str, DeviceHistory],
    start: datetime,
    config: BaselineConfig,
) -> tuple[float, float | None, str]:
    """``(factor, uncapped ratio, note)``: treated over control mean load before the event."""
    window = _adjustment_starts(
        start, config.adjustment_offset_s, config.adjustment_duration_s, config.interval_s
    )
    if not len(window) or not treated:
        return 1.0, None, "; not scaled: no pre-event window or no treated history"

    def mean_load(histories: Mapping[str, DeviceHistory]) -> float:
        rows = [h.window(window, config.interval_s)[0] for h in histories.values()]
        values = np.array(rows)
        return float(np.nanmean(values)) if (~np.isnan(values)).any() else math.nan

    control_kw, treated_kw = mean_load(control), mean_load(treated)
    if math.isnan(control_kw) or math.isnan(treated_kw) or control_kw <= config.min_adjust_kw:
        return 1.0, None, "; not scaled: no usable pre-event load"
    raw = treated_kw / control_kw
    cap = config.adjustment_cap
    factor = min(1 + cap, max(1 - cap, raw))
    return factor, raw, f"; scaled x{factor:.3f} to the treated devices' pre-event load"


def method_baseline(
    history: DeviceHistory,
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    config: BaselineConfig,
    *,
    temperatures: Temperatures | None = None,
) -> DeviceBaseline:
    """One device's baseline by ``config.method`` (the control group is per event: see
    :func:`control_group_baseline`)."""
    method = config.method
    if method is BaselineMethod.CAISO_10_IN_10:
        return device_baseline(history, calendar, start, end, config)
    if method in HIGH_OF_RULES:
        return high_of_baseline(history, calendar, start, end, config, HIGH_OF_RULES[method])
    if method is BaselineMethod.WEATHER_MATCHED:
        return weather_matched_baseline(history, calendar, start, end, config, temperatures)
    raise ValueError(f"{method.value}: a control-group baseline needs the event's control group")


def method_description(config: BaselineConfig) -> str:
    """The rule in words, for the performance report's ``baseline_method``."""
    method = config.method
    if method is BaselineMethod.CAISO_10_IN_10:
        rule = f"{config.weekday_days}-in-{config.weekday_days} (weekdays) / "
        rule += f"{config.weekend_days}-in-{config.weekend_days} (weekends, holidays)"
        if config.adjustment_duration_s:
            rule += (
                f", day-of adjustment over {config.adjustment_duration_s} s ending "
                f"{config.adjustment_offset_s} s before the start, capped at "
                f"±{config.adjustment_cap:.0%}"
            )
    elif method in HIGH_OF_RULES:
        r = HIGH_OF_RULES[method]
        rule = (
            f"{r.name}: highest {r.weekday_highest} of {r.weekday_window} weekdays / "
            f"{r.weekend_highest} of {r.weekend_window} like weekend days within "
            f"{r.lookback_days} days, low-usage weekdays (< {r.low_usage_share:.0%}) replaced, "
        )
        adj = f"over {r.adjustment_duration_s} s ending {r.adjustment_offset_s} s before the start"
        if r.adjustment == "additive":
            rule += f"symmetric additive adjustment {adj}"
        else:
            cap = "" if r.adjustment_cap is None else f", capped at ±{r.adjustment_cap:.0%}"
            rule += f"in-day ratio adjustment {adj}{cap}"
    elif method is BaselineMethod.WEATHER_MATCHED:
        rule = (
            f"weather-matched: {config.weather_days} same-type day(s) within "
            f"{config.lookback_days} days closest in outdoor temperature at the event hours"
        )
    else:
        rule = (
            f"control group: {config.control_share:.0%} of the group held out (seed "
            f"{config.control_seed}), their mean metered load per treated device"
        )
        if config.control_scaling is ControlScaling.PRE_EVENT:
            rule += (
                f", scaled by the treated / control load over {config.adjustment_duration_s} s "
                f"ending {config.adjustment_offset_s} s before the start, capped at "
                f"±{config.adjustment_cap:.0%}"
            )
    return f"{method.value} ({rule}); group baseline {config.group.value}"


__all__ = [
    "HIGH_OF_RULES",
    "NYISO_CBL",
    "PJM_HIGH_4_OF_5",
    "HighOfRule",
    "Temperatures",
    "control_group",
    "control_group_baseline",
    "high_of_baseline",
    "like_day",
    "method_baseline",
    "method_description",
    "reach",
    "weather_matched_baseline",
]
