"""Customer baselines for event settlement: CAISO-style 10-in-10 with a capped day-of adjustment.

A baseline is the load a device *would* have drawn had there been no event. It cannot be
measured, so settlement estimates it from similar days, the way CAISO's "10-in-10" customer
load baseline does (and most North-American DR tariffs copy):

* **Similar days.** For a weekday event: the 10 most recent weekdays that were neither holidays
  nor event days (for this device), within a 45-day look-back. For a weekend or holiday event:
  the 4 most recent weekend days / holidays that were not event days ("4-in-4"). Event days are
  excluded because their load was depressed by the event itself; holidays behave like weekends,
  so they are pooled with them. A day is only eligible if the device's meter covered enough of
  the intervals the baseline needs (``min_coverage``): a day the meter was down would drag the
  average towards whatever the gaps were filled with.
* **Profile.** For every interval of the event window, the mean over the selected days of the
  device's average power at the same local *clock* time (days are local calendar days of the
  calendar's time zone, since customers live by the local clock). Each (similar day, clock
  time) is converted to UTC on its own, so a day with a daylight-saving change is read at the
  right hours: 16:00 on the spring-forward Sunday is 15 h after its midnight, not 16. A clock
  time that does not exist on a similar day (02:30 when clocks jump from 02:00 to 03:00) is
  missing on that day, and the other days' mean stands for it; a clock time that occurs twice
  (01:30 when clocks fall back) is read at its first occurrence. On an event day that falls
  back, both 01:00 hours of the event take the similar days' 01:00.
* **Day-of adjustment.** Similar days can be cooler or busier than the event day. The ratio of
  the event day's actual load to the baseline profile in the hours just before the event (by
  default the 3 h ending 1 h before the start: the hour right before is excluded because
  customers who know about the event pre-cool or pre-charge then) scales the whole profile. The
  ratio is capped to ``1 ± adjustment_cap`` (±20 %) so that a customer cannot inflate the
  baseline by running load up before the event. When the baseline in that window is too small
  for a ratio to mean anything (an idle battery, a PV system), no adjustment is made and the
  result says so.
* **Insufficient history.** Fewer than ``min_weekday_days`` (5) / ``min_weekend_days`` (2)
  eligible days raises :class:`InsufficientHistory` naming the device, the day type and what was
  found. The documented fallback (``fallback=EVENT_DAYS``, CAISO practice for customers with many
  events) tops the selection up with the most recent *event* days of the same day type; the
  result then carries ``fallback_days`` and quality ``suspect`` so settlement can flag it.

Group baselines are the sum of the device baselines, each adjusted on its own (a device's
adjustment should not be diluted by, or leak into, its neighbours'). Devices whose baseline
cannot be computed are listed with the reason and contribute nothing. (Settlement can instead
take the baseline of the summed load, and other rules than this one: ``BaselineConfig.method``
and ``group``, :mod:`gateway.flex.methods`.)

Everything here is pure: histories come in as :class:`DeviceHistory` arrays (interval-average
kW, NaN where no data), results go out as frozen pydantic models with JSON Schema.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from enum import StrEnum
from functools import lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from unified.model import SCHEMA_VERSION, Frozen, Quality, Quantity, Reading, UtcDatetime

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_s(when: datetime) -> float:
    """Seconds since the Unix epoch of an aware datetime (naive datetimes are refused)."""
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when.isoformat()}: times must be timezone-aware")
    return (when - _EPOCH).total_seconds()


def from_epoch(seconds: float) -> datetime:
    return _EPOCH + timedelta(seconds=float(seconds))


class InsufficientHistory(ValueError):
    """Too few eligible similar days to compute a baseline for a device."""

    def __init__(
        self, device_id: str, day_type: DayType, found: int, required: int, detail: str = ""
    ) -> None:
        self.device_id = device_id
        self.day_type = day_type
        self.found = found
        self.required = required
        message = (
            f"{device_id}: {found} eligible {day_type.value} day(s) in the look-back, "
            f"at least {required} required"
        )
        super().__init__(f"{message}; {detail}" if detail else message)


# --------------------------------------------------------------------------- input: histories


@dataclass(frozen=True, slots=True, eq=False)
class DeviceHistory:
    """Interval-average power of one device on a regular grid (load convention, kW).

    ``kw[i]`` is the average power over ``[start + i·interval_s, start + (i+1)·interval_s)``;
    NaN means no data. ``estimated[i]`` marks intervals whose value was estimated or substituted
    (not measured), so settlement can say how much of a result rests on estimates.
    """

    device_id: str
    start: datetime
    interval_s: int
    kw: FloatArray
    estimated: BoolArray | None = None
    _t0: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"{self.device_id}: interval_s must be positive")
        kw = np.asarray(self.kw, dtype=np.float64)
        if kw.ndim != 1:
            raise ValueError(f"{self.device_id}: kw must be one-dimensional")
        object.__setattr__(self, "kw", kw)
        if self.estimated is not None:
            est = np.asarray(self.estimated, dtype=np.bool_)
            if est.shape != kw.shape:
                raise ValueError(f"{self.device_id}: estimated must have the shape of kw")
            object.__setattr__(self, "estimated", est)
        object.__setattr__(self, "_t0", epoch_s(self.start))

    @classmethod
    def from_values(
        cls,
        device_id: str,
        start: datetime,
        interval_s: int,
        kw: Sequence[float | None],
        estimated: Sequence[bool] | None = None,
    ) -> DeviceHistory:
        values = np.array([np.nan if v is None else v for v in kw], dtype=np.float64)
        est = None if estimated is None else np.array(estimated, dtype=np.bool_)
        return cls(device_id, start, interval_s, values, est)

    @classmethod
    def from_readings(
        cls,
        device_id: str,
        readings: Iterable[Reading],
        *,
        start: datetime,
        end: datetime,
        interval_s: int,
    ) -> DeviceHistory:
        """Bin a device's power readings into interval means.

        An interval is ``estimated`` when any reading in it is not of ``good`` quality; readings
        of ``invalid`` quality are dropped. Intervals without readings are NaN. (Sample means are
        a fair interval average only when readings are regular; feed meter interval data when
        settlement-grade accuracy is needed.)
        """
        t0 = epoch_s(start)
        n = int((epoch_s(end) - t0) // interval_s)
        if n <= 0:
            raise ValueError("end must be at least one interval after start")
        total = np.zeros(n)
        count = np.zeros(n)
        est = np.zeros(n, dtype=np.bool_)
        for r in readings:
            if r.device_id != device_id or r.quantity is not Quantity.POWER:
                continue
            if r.quality is Quality.INVALID:
                continue
            i = int((epoch_s(r.timestamp) - t0) // interval_s)
            if 0 <= i < n:
                total[i] += r.value
                count[i] += 1
                est[i] |= r.quality is not Quality.GOOD
        kw = np.full(n, np.nan)
        np.divide(total, count, out=kw, where=count > 0)
        return cls(device_id, start, interval_s, kw, est)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.interval_s * len(self.kw))

    def window(self, starts: FloatArray, width_s: int) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Mean kW over ``[s, s + width_s)`` for every epoch-second ``s`` in ``starts``.

        Returns ``(mean, coverage, estimated_share)``: the mean of the intervals that have data
        (NaN if none), the share of the window's intervals with data, and the share that were
        estimated. ``width_s`` must be a multiple of ``interval_s`` and every start must fall on
        the history's grid: a partial overlap would silently mix two intervals. A NaN start (a
        clock time that does not exist on that day) gives NaN mean and coverage.
        """
        starts = np.asarray(starts, dtype=np.float64)
        absent = np.isnan(starts)
        if absent.any():
            mean, coverage, est = self.window(np.where(absent, self._t0, starts), width_s)
            return (
                np.where(absent, np.nan, mean),
                np.where(absent, np.nan, coverage),
                np.where(absent, np.nan, est),
            )
        if width_s % self.interval_s:
            raise ValueError(
                f"{self.device_id}: window {width_s} s is not a multiple of the history "
                f"interval {self.interval_s} s"
            )
        offsets = (np.asarray(starts, dtype=np.float64) - self._t0) / self.interval_s
        first = np.round(offsets)
        if np.any(np.abs(offsets - first) > 1e-6):
            raise ValueError(
                f"{self.device_id}: window starts are not aligned to the history grid "
                f"(start {self.start.isoformat()}, interval {self.interval_s} s)"
            )
        k = width_s // self.interval_s
        idx = first.astype(np.int64)[..., None] + np.arange(k)
        inside = (idx >= 0) & (idx < len(self.kw))
        safe = np.clip(idx, 0, max(len(self.kw) - 1, 0))
        if len(self.kw) == 0:
            vals = np.full(idx.shape, np.nan)
        else:
            vals = np.where(inside, self.kw[safe], np.nan)
        have = ~np.isnan(vals)
        n_have = have.sum(axis=-1)
        total = np.where(have, vals, 0.0).sum(axis=-1)
        mean = np.full(n_have.shape, np.nan)
        np.divide(total, n_have, out=mean, where=n_have > 0)
        if self.estimated is None or len(self.kw) == 0:
            est_share = np.zeros(n_have.shape)
        else:
            est = np.where(inside, self.estimated[safe], False) & have
            est_share = est.sum(axis=-1) / k
        return mean, n_have / k, est_share


# --------------------------------------------------------------------------- input: calendar


class DayType(StrEnum):
    WEEKDAY = "weekday"
    WEEKEND = "weekend"
    """Saturdays, Sundays and holidays (they share the 4-in-4 rule)."""


@dataclass(frozen=True, slots=True)
class EventCalendar:
    """Which days were event days and holidays, and the local time zone that defines a day.

    ``event_days`` apply to every device; ``device_event_days`` add days on which only some
    devices had an event (a device enrolled in a program the others are not in).
    """

    event_days: frozenset[date] = frozenset()
    holidays: frozenset[date] = frozenset()
    tz: tzinfo = UTC
    device_event_days: Mapping[str, frozenset[date]] = field(default_factory=dict)

    def day_type(self, day: date) -> DayType:
        return DayType.WEEKEND if day.weekday() >= 5 or day in self.holidays else DayType.WEEKDAY

    def is_event_day(self, device_id: str, day: date) -> bool:
        return day in self.event_days or day in self.device_event_days.get(device_id, ())

    def local_day(self, when: datetime) -> date:
        return when.astimezone(self.tz).date()

    def midnight(self, day: date) -> datetime:
        """Local midnight starting ``day``, in UTC."""
        return datetime(day.year, day.month, day.day, tzinfo=self.tz).astimezone(UTC)

    def clock_times(self, day: date, instants: FloatArray) -> tuple[timedelta, ...]:
        """The local wall-clock time of each epoch second in ``instants``, as an offset from
        the local midnight of ``day`` (negative for the evening before, 1 day+ after)."""
        base = datetime.combine(day, time())
        return tuple(
            from_epoch(s).astimezone(self.tz).replace(tzinfo=None) - base for s in instants
        )

    def at_clock_times(self, day: date, clock: tuple[timedelta, ...]) -> FloatArray:
        """Epoch seconds of the local clock times ``clock`` (see :meth:`clock_times`) on
        ``day``, each converted on its own; NaN where that clock time does not exist on that
        day (the hour skipped when clocks go forward). A time that occurs twice (clocks going
        back) is its first occurrence."""
        return np.array(_at_clock_times(self.tz, day, clock), dtype=np.float64)


@lru_cache(maxsize=8192)
def _at_clock_times(tz: tzinfo, day: date, clock: tuple[timedelta, ...]) -> tuple[float, ...]:
    # Cached: settlement asks the same (day, clock times) for every device of an event.
    base = datetime.combine(day, time())
    out = []
    for offset in clock:
        wall = base + offset
        aware = wall.replace(tzinfo=tz, fold=0)
        utc = aware.astimezone(UTC)
        exists = utc.astimezone(tz).replace(tzinfo=None) == wall
        out.append(epoch_s(utc) if exists else math.nan)
    return tuple(out)


# --------------------------------------------------------------------------- configuration


class BaselineFallback(StrEnum):
    NONE = "none"
    """Raise :class:`InsufficientHistory`."""
    EVENT_DAYS = "event_days"
    """Top the selection up with the most recent event days of the same type (flagged)."""


class BaselineMethod(StrEnum):
    """The rule that estimates what a device would have drawn (:mod:`gateway.flex.methods`)."""

    CAISO_10_IN_10 = "caiso_10in10"
    """10-in-10 weekdays / 4-in-4 weekends, multiplicative day-of adjustment capped ±20 %."""
    PJM_HIGH_4_OF_5 = "pjm_high4of5"
    """PJM economic CBL: the 4 highest of the 5 most recent weekdays (2 of 3 like weekend
    days), symmetric additive adjustment."""
    NYISO_CBL = "nyiso_cbl"
    """NYISO CBL: the 5 highest of the last 10 weekdays (2 of 3 like weekend days), low-usage
    days excluded, in-day adjustment capped ±20 %."""
    WEATHER_MATCHED = "weather_matched"
    """The past days of the same type whose outdoor temperature at the event hours was closest
    to the event day's (thermal loads)."""
    CONTROL_GROUP = "control_group"
    """Mass-market programs: a seeded random held-out share of the group is not called; its
    metered load, scaled to the treated devices, is their baseline."""


class GroupBaselineMode(StrEnum):
    """How a group's baseline is formed (see docs/mqtt-api.md, "Performance reports")."""

    SUM_OF_DEVICES = "sum_of_devices"
    """Each device's baseline computed (and adjusted) on its own, then summed: the default,
    because device rows then add up to the group and one device's day-of adjustment neither
    dilutes nor leaks into its neighbours'."""
    AGGREGATE_LOAD = "aggregate_load"
    """The rule applied once to the summed load of the group (what a utility does for an
    aggregator settled at one meter or one portfolio): day selection and adjustment see the
    group, so the high-X-of-Y rules pick the group's high days, not each device's. Device rows
    then carry a pro-rata share of the group baseline."""


class ControlScaling(StrEnum):
    """How the control group's mean load becomes a treated device's baseline."""

    COUNT = "count"
    """The control mean as it is: a random draw makes the groups alike on average, so the
    treated group's baseline is that mean times the treated count."""
    PRE_EVENT = "pre_event"
    """Times the treated over control mean load in the day-of adjustment window, capped like
    that adjustment: corrects a draw that came out unlike (small groups)."""


class BaselineConfig(Frozen):
    """Parameters of the baseline rule; the 10-in-10 / 4-in-4 defaults follow CAISO practice.

    ``method`` picks the rule; the day counts, look-back and adjustment window here belong to
    the CAISO rule (the PJM and NYISO rules carry their tariffs' own, see
    :mod:`gateway.flex.methods`)."""

    method: BaselineMethod = BaselineMethod.CAISO_10_IN_10
    group: GroupBaselineMode = GroupBaselineMode.SUM_OF_DEVICES
    interval_s: int = Field(
        default=3600,
        ge=1,
        le=86_400,
        description="Baseline interval, s (settlement intervals; usually 3600, shorter in tests)",
    )
    weekday_days: int = Field(default=10, ge=1, le=60)
    weekend_days: int = Field(default=4, ge=1, le=60)
    min_weekday_days: int = Field(default=5, ge=1, le=60)
    min_weekend_days: int = Field(default=2, ge=1, le=60)
    lookback_days: int = Field(default=45, ge=1, le=366)
    adjustment_offset_s: int = Field(
        default=3600, ge=0, le=86_400, description="Gap between the adjustment window and start"
    )
    adjustment_duration_s: int = Field(
        default=3 * 3600, ge=0, le=86_400, description="Length of the adjustment window; 0: off"
    )
    adjustment_cap: float = Field(default=0.20, ge=0, le=1, description="Cap on |factor - 1|")
    min_adjust_kw: float = Field(
        default=0.01, ge=0, description="Below this baseline in the window, no ratio adjustment"
    )
    min_coverage: float = Field(
        default=0.9, gt=0, le=1, description="Share of needed intervals a day must have data for"
    )
    fallback: BaselineFallback = BaselineFallback.NONE
    weather_days: int = Field(
        default=5, ge=1, le=60, description="weather_matched: days closest in temperature"
    )
    min_weather_days: int = Field(
        default=3, ge=1, le=60, description="weather_matched: fewer days with temperature: none"
    )
    control_share: float = Field(
        default=0.1, gt=0, lt=1, description="control_group: share of the group held out"
    )
    control_seed: int = Field(
        default=0, description="control_group: seed of the hold-out draw (fixed per program)"
    )
    control_scaling: ControlScaling = Field(
        default=ControlScaling.COUNT,
        description="control_group: the control mean as is, or scaled by the pre-event ratio",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BaselineConfig:
        if self.min_weekday_days > self.weekday_days or self.min_weekend_days > self.weekend_days:
            raise ValueError("minimum day counts exceed the target day counts")
        if self.min_weather_days > self.weather_days:
            raise ValueError("min_weather_days exceeds weather_days")
        if (
            self.method is BaselineMethod.CONTROL_GROUP
            and self.group is GroupBaselineMode.AGGREGATE_LOAD
        ):
            raise ValueError(
                "group = 'aggregate_load' with method = 'control_group': a control group is "
                "already a baseline of the group (use 'sum_of_devices')"
            )
        if self.adjustment_duration_s % self.interval_s:
            raise ValueError("adjustment window must be a whole number of intervals")
        return self


# --------------------------------------------------------------------------- results


class DeviceBaseline(Frozen):
    """A device's baseline over an event window, interval by interval (kW, load convention)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    device_id: str
    event_day: date
    day_type: DayType
    start: UtcDatetime
    end: UtcDatetime
    interval_s: int
    kw: tuple[float, ...] = Field(description="Adjusted baseline per interval, kW")
    unadjusted_kw: tuple[float, ...] = Field(description="Mean of the selected days, kW")
    adjustment_factor: float = Field(description="Applied (capped) day-of factor; 1: none")
    raw_adjustment_factor: float | None = Field(
        default=None,
        description="Uncapped actual/baseline ratio in the adjustment window; None: not computed",
    )
    adjustment_capped: bool
    adjustment_kw: float | None = Field(
        default=None,
        description="Additive day-of adjustment (PJM's symmetric additive adjustment), kW; "
        "None: not additive",
    )
    selected_days: tuple[date, ...] = Field(description="Similar days used, most recent first")
    fallback_days: tuple[date, ...] = Field(default=(), description="Event days used as fallback")
    quality: Quality
    method: str

    @property
    def kwh(self) -> float:
        return float(sum(self.kw)) * self.interval_s / 3600.0


class ExcludedDevice(Frozen):
    device_id: str
    reason: str


class GroupBaseline(Frozen):
    """Sum of the device baselines of a group; devices without one are listed, not guessed."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    group_id: str
    start: UtcDatetime
    end: UtcDatetime
    interval_s: int
    kw: tuple[float, ...]
    devices: tuple[DeviceBaseline, ...]
    excluded: tuple[ExcludedDevice, ...] = ()
    quality: Quality

    @property
    def kwh(self) -> float:
        return float(sum(self.kw)) * self.interval_s / 3600.0


# --------------------------------------------------------------------------- computation


def interval_starts(start: datetime, end: datetime, interval_s: int) -> FloatArray:
    """Epoch seconds of the intervals tiling ``[start, end)``; the span must tile exactly."""
    t0, t1 = epoch_s(start), epoch_s(end)
    if t1 <= t0:
        raise ValueError("window end must be after its start")
    span = t1 - t0
    if abs(span / interval_s - round(span / interval_s)) > 1e-9:
        raise ValueError(
            f"window of {span:.0f} s is not a whole number of {interval_s} s intervals"
        )
    return t0 + interval_s * np.arange(round(span / interval_s), dtype=np.float64)


def _select_days(
    history: DeviceHistory,
    calendar: EventCalendar,
    event_day: date,
    needed: FloatArray,
    config: BaselineConfig,
) -> tuple[list[date], list[date], DayType]:
    """The similar days (most recent first) and any fallback event days, or raise."""
    day_type = calendar.day_type(event_day)
    want = config.weekday_days if day_type is DayType.WEEKDAY else config.weekend_days
    minimum = config.min_weekday_days if day_type is DayType.WEEKDAY else config.min_weekend_days
    clock = calendar.clock_times(event_day, needed)
    selected: list[date] = []
    event_candidates: list[date] = []
    skipped_coverage = 0
    for back in range(1, config.lookback_days + 1):
        day = event_day - timedelta(days=back)
        if calendar.day_type(day) is not day_type:
            continue
        _, coverage, _ = history.window(calendar.at_clock_times(day, clock), config.interval_s)
        # A clock time the day does not have (NaN) is not held against its coverage.
        if np.isnan(coverage).all() or np.nanmean(coverage) < config.min_coverage:
            skipped_coverage += 1
            continue
        if calendar.is_event_day(history.device_id, day):
            event_candidates.append(day)
            continue
        selected.append(day)
        if len(selected) == want:
            break
    fallback: list[date] = []
    if len(selected) < minimum:
        detail = f"{skipped_coverage} day(s) skipped for missing data"
        if config.fallback is BaselineFallback.EVENT_DAYS:
            fallback = event_candidates[: minimum - len(selected)]
        if len(selected) + len(fallback) < minimum:
            raise InsufficientHistory(history.device_id, day_type, len(selected), minimum, detail)
    return selected, fallback, day_type


def device_baseline(
    history: DeviceHistory,
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    config: BaselineConfig | None = None,
) -> DeviceBaseline:
    """The 10-in-10 (weekday) or 4-in-4 (weekend / holiday) baseline of one device.

    ``[start, end)`` is the event window; it must be a whole number of ``config.interval_s``
    intervals on the history's grid. The event day is the local day of ``start``. Raises
    :class:`InsufficientHistory` when too few similar days have data (see the module docstring
    for the fallback) and ``ValueError`` for misaligned windows.
    """
    config = config or BaselineConfig()
    starts = interval_starts(start, end, config.interval_s)
    adj_starts = np.empty(0)
    if config.adjustment_duration_s > 0:
        adj_end = epoch_s(start) - config.adjustment_offset_s
        adj_starts = interval_starts(
            from_epoch(adj_end - config.adjustment_duration_s),
            from_epoch(adj_end),
            config.interval_s,
        )
    needed = np.concatenate([starts, adj_starts])
    event_day = calendar.local_day(start)
    selected, fallback, day_type = _select_days(history, calendar, event_day, needed, config)
    days = selected + fallback

    clock = calendar.clock_times(event_day, needed)
    at = np.array([calendar.at_clock_times(d, clock) for d in days]).reshape(len(days), -1)
    means, _, _ = history.window(at, config.interval_s)
    have = ~np.isnan(means)
    n_have = have.sum(axis=0)
    profile = np.full(len(needed), np.nan)
    np.divide(np.where(have, means, 0.0).sum(axis=0), n_have, out=profile, where=n_have > 0)
    window_profile = profile[: len(starts)]
    if np.isnan(window_profile).any():
        raise InsufficientHistory(
            history.device_id,
            day_type,
            len(days),
            len(days),
            "no selected day has data for some event interval",
        )

    factor, raw, note = 1.0, None, "no day-of adjustment"
    if len(adj_starts):
        actual, coverage, _ = history.window(adj_starts, config.interval_s)
        base_adj = profile[len(starts) :]
        ok = ~np.isnan(actual) & ~np.isnan(base_adj)
        base_mean = float(base_adj[ok].mean()) if ok.any() else 0.0
        if coverage.mean() < config.min_coverage:
            note = "no day-of adjustment: event-day data missing before the event"
        elif base_mean <= config.min_adjust_kw:
            note = "no day-of adjustment: baseline too small in the adjustment window"
        else:
            raw = float(actual[ok].mean()) / base_mean
            factor = min(1 + config.adjustment_cap, max(1 - config.adjustment_cap, raw))
            note = f"day-of adjustment x{factor:.3f}"
    capped = raw is not None and abs(raw - factor) > 1e-12
    rule = (
        f"{config.weekday_days}-in-{config.weekday_days}"
        if day_type is DayType.WEEKDAY
        else f"{config.weekend_days}-in-{config.weekend_days}"
    )
    method = f"{rule} on {len(selected)} day(s)"
    if fallback:
        method += f" + {len(fallback)} event day(s) (fallback)"
    quality = Quality.SUSPECT if fallback else Quality.GOOD
    return DeviceBaseline(
        device_id=history.device_id,
        event_day=event_day,
        day_type=day_type,
        start=start,
        end=end,
        interval_s=config.interval_s,
        kw=tuple(float(v) for v in window_profile * factor),
        unadjusted_kw=tuple(float(v) for v in window_profile),
        adjustment_factor=factor,
        raw_adjustment_factor=raw,
        adjustment_capped=capped,
        selected_days=tuple(selected),
        fallback_days=tuple(fallback),
        quality=quality,
        method=f"{method}; {note}",
    )


def group_baseline(
    group_id: str,
    histories: Iterable[DeviceHistory],
    calendar: EventCalendar,
    start: datetime,
    end: datetime,
    config: BaselineConfig | None = None,
) -> GroupBaseline:
    """Sum of the member devices' baselines; devices without one are reported in ``excluded``.

    The group's quality is ``good`` only when every device has a non-fallback baseline;
    ``suspect`` when any device used the fallback; ``substituted`` when any was excluded
    (its load is missing from the sum, so the group baseline is too low).
    """
    config = config or BaselineConfig()
    n = len(interval_starts(start, end, config.interval_s))
    total = np.zeros(n)
    devices: list[DeviceBaseline] = []
    excluded: list[ExcludedDevice] = []
    for history in histories:
        try:
            baseline = device_baseline(history, calendar, start, end, config)
        except ValueError as exc:  # InsufficientHistory included
            excluded.append(ExcludedDevice(device_id=history.device_id, reason=str(exc)))
            continue
        devices.append(baseline)
        total += np.array(baseline.kw)
    quality = Quality.GOOD
    if any(d.quality is not Quality.GOOD for d in devices):
        quality = Quality.SUSPECT
    if excluded:
        quality = Quality.SUBSTITUTED if devices else Quality.INVALID
    return GroupBaseline(
        group_id=group_id,
        start=start,
        end=end,
        interval_s=config.interval_s,
        kw=tuple(float(v) for v in total),
        devices=tuple(devices),
        excluded=tuple(excluded),
        quality=quality,
    )
