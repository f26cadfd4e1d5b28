"""Same-hour baseline profiles for the closed loop (pure): what a device would draw, hour by hour.

The closed loop (:mod:`gateway.delivery`) measures a dispatch's delivered response against each
device's counterfactual load. Its pre-event level alone is flat; over a three-hour afternoon
event the load it stands for is not (it rises with the afternoon's heat, a water heater's
evening draw has its own shape), and a flat baseline reads that drift as response or shortfall.
So for every device with enough reading history, :func:`loop_profiles` takes the settlement
rules' same-hour profile over the event window (:func:`gateway.flex.baseline.device_baseline`:
the 10-in-10 / 4-in-4 similar days, no day-of adjustment of its own) or, for a thermal load
with outdoor temperatures recorded and forecast, the weather-matched one
(:func:`gateway.flex.methods.weather_matched_baseline`: the past days closest in temperature
at the event hours), with its day-to-day spread. The loop scales it by the day-of adjustment
it measures itself, the device's level just before it was held over the profile's at that time
(capped like the settlement rule's, ±``adjustment_cap``): :class:`gateway.delivery.DeviceBaseline`.

A device without enough history (fewer than ``min_weekday_days`` similar days, or none with data
for an hour of the window) gets no profile and keeps its flat pre-event level.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from gateway.flex.baseline import (
    BaselineConfig,
    BaselineMethod,
    DeviceHistory,
    EventCalendar,
    device_baseline,
    epoch_s,
    from_epoch,
)
from gateway.flex.methods import Temperatures, weather_matched_baseline

__all__ = ["BaselineProfile", "loop_config", "loop_profile", "loop_profiles"]


@dataclass(frozen=True, slots=True)
class BaselineProfile:
    """One device's same-hour profile over a window: interval means (kW) and the variance of
    the counterfactual about them (kW²: the spread of the similar days, plus that of their mean)."""

    device_id: str
    start_s: float
    """Epoch seconds of the first interval."""
    interval_s: int
    kw: tuple[float, ...]
    var_kw2: tuple[float, ...]
    method: str
    """``same_hour`` (10-in-10 / 4-in-4 days) or ``weather_matched``."""
    days: int

    @property
    def end_s(self) -> float:
        return self.start_s + self.interval_s * len(self.kw)

    def at(self, when_s: float) -> tuple[float, float]:
        """``(kW, kW²)`` at ``when_s``: linear between interval centres (an hourly profile read
        as steps would jump at every hour), on along the end slopes to the window's edges (the
        mean of a rising hour is below its end), constant beyond them."""
        last = len(self.kw) - 1
        x = min(last + 0.5, max(-0.5, (when_s - self.start_s) / self.interval_s - 0.5))
        if last == 0:
            return self.kw[0], self.var_kw2[0]
        i = min(last - 1, max(0, int(x)))
        f = x - i
        kw, var = self.kw, self.var_kw2
        return kw[i] + f * (kw[i + 1] - kw[i]), max(0.0, var[i] + f * (var[i + 1] - var[i]))


def loop_config(interval_s: int) -> BaselineConfig:
    """The similar-day rule on the history's own grid, without the settlement's day-of
    adjustment (the loop measures its own at the moment it holds the device)."""
    return BaselineConfig(interval_s=interval_s, adjustment_duration_s=0)


def loop_profile(
    history: DeviceHistory,
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    *,
    temperatures: Temperatures | None = None,
    config: BaselineConfig | None = None,
) -> BaselineProfile:
    """The profile of one device over ``[start, end)`` (widened to whole history intervals).

    With ``temperatures`` the weather-matched rule is tried first; where it finds too few days
    with temperatures, the same-hour rule. Raises :class:`~gateway.flex.baseline.
    InsufficientHistory` (a ``ValueError``) when neither has enough history."""
    rule = config or loop_config(history.interval_s)
    step = rule.interval_s
    s = math.floor(epoch_s(start) / step) * step
    e = max(s + step, math.ceil(epoch_s(end) / step) * step)
    start, end = from_epoch(s), from_epoch(e)
    method = "same_hour"
    baseline = None
    if temperatures is not None:
        weather = rule.model_copy(update={"method": BaselineMethod.WEATHER_MATCHED})
        try:
            baseline = weather_matched_baseline(
                history, calendar, start, end, weather, temperatures
            )
            method = "weather_matched"
        except ValueError:
            baseline = None
    if baseline is None:
        baseline = device_baseline(history, calendar, start, end, rule)
    days = (*baseline.selected_days, *baseline.fallback_days)
    starts = s + step * np.arange(len(baseline.kw), dtype=np.float64)
    clock = calendar.clock_times(calendar.local_day(start), starts)
    rows = np.array([history.window(calendar.at_clock_times(d, clock), step)[0] for d in days])
    n = (~np.isnan(rows)).sum(axis=0)
    spread = np.zeros(len(starts))
    if len(days) >= 2:
        squares = np.where(np.isnan(rows), 0.0, (rows - np.array(baseline.unadjusted_kw)) ** 2)
        spread = np.divide(squares.sum(axis=0), np.maximum(n - 1, 1))
        # A day like the similar ones varies about their mean by their spread, and that mean is
        # itself only known to spread / n.
        spread = spread * (1.0 + 1.0 / np.maximum(n, 1))
    return BaselineProfile(
        device_id=history.device_id,
        start_s=float(s),
        interval_s=step,
        kw=tuple(float(v) for v in baseline.unadjusted_kw),
        var_kw2=tuple(float(v) for v in spread),
        method=method,
        days=len(days),
    )


def loop_profiles(
    histories: Mapping[str, DeviceHistory],
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    device_ids: Collection[str],
    *,
    temperatures: Mapping[str, Temperatures] | None = None,
) -> dict[str, BaselineProfile]:
    """The profile of each of ``device_ids`` that has enough history (the others are left out:
    their loop keeps the flat pre-event level). ``temperatures`` holds the outdoor temperature
    record of the thermal loads the weather-matched rule may serve."""
    temperatures = temperatures or {}
    out: dict[str, BaselineProfile] = {}
    for device_id in device_ids:
        history = histories.get(device_id)
        if history is None or np.isnan(history.kw).all():
            continue
        try:
            out[device_id] = loop_profile(
                history, calendar, start, end, temperatures=temperatures.get(device_id)
            )
        except ValueError:  # InsufficientHistory, or a history off the window's grid
            continue
    return out
