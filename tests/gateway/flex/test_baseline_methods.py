"""PJM High 4 of 5, NYISO CBL, weather-matched and control-group baselines, worked by hand.

Every expected number below is written out from the rule (the days chosen, their loads, the
averages, the adjustment), not computed by the product's functions. Loads are flat over each
day (one number per day) so a baseline reveals which days were averaged; the calendar is UTC.
June 2024: the 20th is a Thursday, the 18th an event day, the 19th (Juneteenth) a holiday.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from gateway.flex import (
    BaselineConfig,
    BaselineMethod,
    ControlScaling,
    DeviceHistory,
    EventCalendar,
    InsufficientHistory,
    control_group,
    control_group_baseline,
    method_baseline,
)
from gateway.weather import TemperatureRecord, TemperatureSeries
from unified.model import Quality

D = date
HISTORY_START = datetime(2024, 4, 1, tzinfo=UTC)
HISTORY_END = datetime(2024, 6, 25, tzinfo=UTC)
CALENDAR = EventCalendar(
    event_days=frozenset({D(2024, 6, 18)}), holidays=frozenset({D(2024, 6, 19)})
)
EVENT_DAY = D(2024, 6, 20)
PJM = BaselineConfig(method=BaselineMethod.PJM_HIGH_4_OF_5)
NYISO = BaselineConfig(method=BaselineMethod.NYISO_CBL)


def at(day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def flat_days(
    device_id: str,
    per_day: dict[date, float],
    *,
    default: float = 1.0,
    event_day: date = EVENT_DAY,
    event_day_hours: dict[int, float | None] | None = None,
) -> DeviceHistory:
    """Hourly history: ``per_day[day]`` all day (``default`` on other days); on ``event_day``,
    ``event_day_hours[h]`` at hour ``h`` (None: no data), else no data."""
    hours = int((HISTORY_END - HISTORY_START).total_seconds() // 3600)
    values = np.full(hours, np.nan)
    for i in range(hours):
        t = HISTORY_START + timedelta(hours=i)
        if t.date() == event_day:
            v = (event_day_hours or {}).get(t.hour)
            values[i] = np.nan if v is None else v
        elif t.date() < event_day:
            values[i] = per_day.get(t.date(), default)
    return DeviceHistory(device_id, HISTORY_START, 3600, values)


# --------------------------------------------------------------------------- PJM High 4 of 5


def test_pjm_weekday_high_4_of_5_with_symmetric_additive_adjustment() -> None:
    # Event Thursday 20 June 14:00-16:00. The 5 most recent eligible weekdays: 19 (holiday) and
    # 18 (event day) are skipped: 17 (6 kW), 14 (5), 13 (3), 12 (7), 11 (4).
    # Mean event-hour load of the window (6+5+3+7+4)/5 = 5.0; 25 % of it is 1.25: no low day.
    # Highest 4: 12 (7), 17 (6), 14 (5), 11 (4); 13 (3) is dropped. CBL = 22 / 4 = 5.5 kW.
    # Adjustment window: the 2 hours starting 3 hours before 14:00, i.e. 11:00 and 12:00.
    # Actual there 6.5 kW, CBL there 5.5 kW: SAA = +1.0 kW, added to every hour: 6.5 kW.
    days = {D(2024, 6, 17): 6.0, D(2024, 6, 14): 5.0, D(2024, 6, 13): 3.0}
    days |= {D(2024, 6, 12): 7.0, D(2024, 6, 11): 4.0}
    h = flat_days("a", days, event_day_hours={11: 6.5, 12: 6.5, 13: 20.0, 14: 1.0, 15: 1.0})
    b = method_baseline(h, CALENDAR, at(D(2024, 6, 20), 14), at(D(2024, 6, 20), 16), PJM)
    assert b.selected_days == (D(2024, 6, 17), D(2024, 6, 14), D(2024, 6, 12), D(2024, 6, 11))
    assert b.unadjusted_kw == pytest.approx((5.5, 5.5))
    assert b.adjustment_kw == pytest.approx(1.0)
    assert b.kw == pytest.approx((6.5, 6.5))
    assert b.adjustment_factor == 1.0
    assert not b.adjustment_capped
    # (13:00, the hour right before the event at 20 kW, is outside the window: no effect.)
    assert b.method.startswith("PJM High 4 of 5: highest 4 of 5 weekday day(s)")


def test_pjm_adjustment_is_symmetric_downwards() -> None:
    # Same days, actual 3.5 kW at 11:00-13:00: SAA = 3.5 - 5.5 = -2.0 kW -> 3.5 kW.
    days = {D(2024, 6, 17): 6.0, D(2024, 6, 14): 5.0, D(2024, 6, 13): 3.0}
    days |= {D(2024, 6, 12): 7.0, D(2024, 6, 11): 4.0}
    h = flat_days("a", days, event_day_hours={11: 3.5, 12: 3.5})
    b = method_baseline(h, CALENDAR, at(D(2024, 6, 20), 14), at(D(2024, 6, 20), 16), PJM)
    assert b.adjustment_kw == pytest.approx(-2.0)
    assert b.kw == pytest.approx((3.5, 3.5))


def test_pjm_low_usage_day_is_replaced_by_the_next_older_weekday() -> None:
    # Window 17 (6), 14 (5), 13 (0.5), 12 (7), 11 (4): mean 22.5 / 5 = 4.5, 25 % = 1.125.
    # 13 (0.5 < 1.125) is a low-usage day: replaced by the next older weekday, 10 June (8 kW).
    # Window 17, 14, 12, 11, 10 -> highest 4: 10 (8), 12 (7), 17 (6), 14 (5) = 26 / 4 = 6.5.
    # No event-day data before the event: no adjustment.
    days = {D(2024, 6, 17): 6.0, D(2024, 6, 14): 5.0, D(2024, 6, 13): 0.5}
    days |= {D(2024, 6, 12): 7.0, D(2024, 6, 11): 4.0, D(2024, 6, 10): 8.0}
    h = flat_days("a", days)
    b = method_baseline(h, CALENDAR, at(D(2024, 6, 20), 14), at(D(2024, 6, 20), 16), PJM)
    assert b.selected_days == (D(2024, 6, 17), D(2024, 6, 14), D(2024, 6, 12), D(2024, 6, 10))
    assert b.kw == pytest.approx((6.5, 6.5))
    assert b.adjustment_kw is None
    assert "1 low-usage day(s) replaced" in b.method
    assert "no day-of adjustment: event-day data missing" in b.method


def test_pjm_saturday_2_of_3_saturdays() -> None:
    # Saturday 22 June: the 3 most recent Saturdays 15 (3 kW), 8 (5), 1 (4): highest 2 are
    # 8 and 1 -> 4.5 kW. (Sunday 16 and the holiday are not Saturdays.) SAA over 11-13 h:
    # actual 5.0 - 4.5 = +0.5 -> 5.0 kW.
    days = {D(2024, 6, 15): 3.0, D(2024, 6, 8): 5.0, D(2024, 6, 1): 4.0, D(2024, 6, 16): 50.0}
    h = flat_days("a", days, event_day=D(2024, 6, 22), event_day_hours={11: 5.0, 12: 5.0})
    b = method_baseline(h, CALENDAR, at(D(2024, 6, 22), 14), at(D(2024, 6, 22), 15), PJM)
    assert b.selected_days == (D(2024, 6, 8), D(2024, 6, 1))
    assert b.unadjusted_kw == pytest.approx((4.5,))
    assert b.kw == pytest.approx((5.0,))


def test_pjm_sunday_pools_sundays_and_holidays() -> None:
    # Sunday 23 June: the 3 most recent Sundays / holidays are 19 (holiday, 2 kW), 16 (6), 9
    # (5); 2 June (9 kW) is a fourth and not used. Highest 2: 16 and 9 -> 5.5 kW.
    days = {D(2024, 6, 19): 2.0, D(2024, 6, 16): 6.0, D(2024, 6, 9): 5.0, D(2024, 6, 2): 9.0}
    h = flat_days("a", days, event_day=D(2024, 6, 23))
    b = method_baseline(h, CALENDAR, at(D(2024, 6, 23), 14), at(D(2024, 6, 23), 15), PJM)
    assert b.selected_days == (D(2024, 6, 16), D(2024, 6, 9))
    assert b.kw == pytest.approx((5.5,))


def test_pjm_too_few_days_raises() -> None:
    # Only 3 weekdays with data (17, 14, 13): fewer than the 4 PJM averages.
    hours = int((HISTORY_END - HISTORY_START).total_seconds() // 3600)
    values = np.full(hours, np.nan)
    for day in (D(2024, 6, 17), D(2024, 6, 14), D(2024, 6, 13)):
        i = int((at(day, 0) - HISTORY_START).total_seconds() // 3600)
        values[i : i + 24] = 2.0
    h = DeviceHistory("a", HISTORY_START, 3600, values)
    with pytest.raises(InsufficientHistory) as info:
        method_baseline(h, CALENDAR, at(D(2024, 6, 20), 14), at(D(2024, 6, 20), 16), PJM)
    assert (info.value.found, info.value.required) == (3, 4)


# --------------------------------------------------------------------------- NYISO


def test_nyiso_weekday_5_of_10_low_usage_excluded_adjustment_capped() -> None:
    # Event Thursday 20 June 15:00-17:00. The 10 most recent eligible weekdays (19 holiday,
    # 18 event day skipped): 17 (5), 14 (6), 13 (0.5), 12 (4), 11 (7), 10 (3), 7 (8), 6 (2),
    # 5 (5), 4 (6). Their mean 46.5 / 10 = 4.65; 25 % = 1.1625: 13 is a low-usage day, replaced
    # by the next older weekday, 3 June (9 kW). Highest 5 of 17, 14, 12, 11, 10, 7, 6, 5, 4, 3:
    # 3 (9), 7 (8), 11 (7), 14 (6), 4 (6) -> 36 / 5 = 7.2 kW.
    # In-day adjustment over the 2 hours starting 4 hours before 15:00 (11:00, 12:00): actual
    # 9.0 / 7.2 = 1.25, capped to 1.20 -> 8.64 kW.
    days = {
        D(2024, 6, 17): 5.0,
        D(2024, 6, 14): 6.0,
        D(2024, 6, 13): 0.5,
        D(2024, 6, 12): 4.0,
        D(2024, 6, 11): 7.0,
        D(2024, 6, 10): 3.0,
        D(2024, 6, 7): 8.0,
        D(2024, 6, 6): 2.0,
        D(2024, 6, 5): 5.0,
        D(2024, 6, 4): 6.0,
        D(2024, 6, 3): 9.0,
    }
    h = flat_days("a", days, event_day_hours={11: 9.0, 12: 9.0, 13: 30.0, 14: 30.0})
    b = method_baseline(h, CALENDAR, at(D(2024, 6, 20), 15), at(D(2024, 6, 20), 17), NYISO)
    assert b.selected_days == (
        D(2024, 6, 14),
        D(2024, 6, 11),
        D(2024, 6, 7),
        D(2024, 6, 4),
        D(2024, 6, 3),
    )
    assert b.unadjusted_kw == pytest.approx((7.2, 7.2))
    assert b.raw_adjustment_factor == pytest.approx(1.25)
    assert b.adjustment_factor == pytest.approx(1.2)
    assert b.adjustment_capped
    assert b.kw == pytest.approx((8.64, 8.64))
    assert b.adjustment_kw is None
    assert b.method.startswith("NYISO CBL: highest 5 of 10 weekday day(s), 1 low-usage")


def test_nyiso_saturday_2_of_3_with_uncapped_adjustment() -> None:
    # Saturday 22 June: Saturdays 15 (2 kW), 8 (6), 1 (4): highest 2 -> (6 + 4) / 2 = 5.0.
    # Adjustment over 10:00-12:00 for an event at 14:00: 4.5 / 5.0 = 0.9 (inside ±20 %) -> 4.5.
    days = {D(2024, 6, 15): 2.0, D(2024, 6, 8): 6.0, D(2024, 6, 1): 4.0}
    h = flat_days("a", days, event_day=D(2024, 6, 22), event_day_hours={10: 4.5, 11: 4.5})
    b = method_baseline(h, CALENDAR, at(D(2024, 6, 22), 14), at(D(2024, 6, 22), 15), NYISO)
    assert b.selected_days == (D(2024, 6, 8), D(2024, 6, 1))
    assert b.adjustment_factor == pytest.approx(0.9)
    assert not b.adjustment_capped
    assert b.kw == pytest.approx((4.5,))


# --------------------------------------------------------------------------- weather-matched


def temperatures(per_day: dict[date, float], default: float = 20.0) -> TemperatureSeries:
    """Hourly outdoor temperature, flat per day."""
    start = datetime(2024, 5, 1, tzinfo=UTC)
    hours = int((HISTORY_END - start).total_seconds() // 3600)
    temps = [per_day.get((start + timedelta(hours=i)).date(), default) for i in range(hours)]
    return TemperatureSeries(start.timestamp(), 3600, np.array(temps))


WEATHER = BaselineConfig(method=BaselineMethod.WEATHER_MATCHED, weather_days=3, min_weather_days=2)


def test_weather_matched_takes_the_days_closest_in_temperature() -> None:
    # Event Thursday 20 June 15:00-17:00 at 30 °C. Weekdays of the look-back (18 event day,
    # 19 holiday skipped) and their distance to 30 °C: 17 (29 °C, 6 kW): 1; 14 (25, 4): 5;
    # 13 (31, 7): 1; 12 (30, 8): 0; 11 (33, 9): 3; 10 (28, 5): 2; all others 20 °C: 10.
    # Closest 3: 12 (0), then 17 and 13 (1 each; the more recent first) -> (8 + 6 + 7) / 3 = 7.
    temps = {D(2024, 6, 20): 30.0, D(2024, 6, 17): 29.0, D(2024, 6, 14): 25.0}
    temps |= {D(2024, 6, 13): 31.0, D(2024, 6, 12): 30.0, D(2024, 6, 11): 33.0}
    temps |= {D(2024, 6, 10): 28.0, D(2024, 6, 18): 30.0}
    loads = {D(2024, 6, 17): 6.0, D(2024, 6, 14): 4.0, D(2024, 6, 13): 7.0}
    loads |= {D(2024, 6, 12): 8.0, D(2024, 6, 11): 9.0, D(2024, 6, 10): 5.0}
    loads |= {D(2024, 6, 18): 100.0}  # an event day at 30 °C: never a similar day
    h = flat_days("hp", loads, default=2.0)
    b = method_baseline(
        h,
        CALENDAR,
        at(D(2024, 6, 20), 15),
        at(D(2024, 6, 20), 17),
        WEATHER,
        temperatures=temperatures(temps),
    )
    assert b.selected_days == (D(2024, 6, 17), D(2024, 6, 13), D(2024, 6, 12))
    assert b.kw == pytest.approx((7.0, 7.0))
    assert b.adjustment_factor == 1.0
    assert "closest to 30.0 °C" in b.method
    assert "(29.0 - 31.0 °C)" in b.method


def test_weather_matched_without_temperatures_has_no_baseline() -> None:
    h = flat_days("hp", {}, default=2.0)
    with pytest.raises(InsufficientHistory, match="no outdoor temperatures"):
        method_baseline(h, CALENDAR, at(D(2024, 6, 20), 15), at(D(2024, 6, 20), 17), WEATHER)
    # A forecast covering the event but not the past days (all the gateway keeps): none either.
    future = TemperatureSeries(at(D(2024, 6, 20), 0).timestamp(), 3600, np.full(48, 30.0))
    with pytest.raises(InsufficientHistory, match="too few past days"):
        method_baseline(
            h,
            CALENDAR,
            at(D(2024, 6, 20), 15),
            at(D(2024, 6, 20), 17),
            WEATHER,
            temperatures=future,
        )


# --------------------------------------------------------------------------- control group


def test_control_group_draw_is_seeded_sized_and_order_independent() -> None:
    ids = [f"d{i:02d}" for i in range(20)]
    # The rule, written out: rank by SHA-256 of "seed:id", hold out round(0.1 * 20) = 2.
    ranked = sorted(ids, key=lambda d: hashlib.sha256(f"7:{d}".encode()).digest())
    assert control_group(ids, 0.1, 7) == frozenset(ranked[:2])
    assert control_group(reversed(ids), 0.1, 7) == control_group(ids, 0.1, 7)
    assert control_group(ids, 0.1, 8) != control_group(ids, 0.1, 7)
    assert len(control_group(ids, 0.25, 7)) == 5
    assert len(control_group(ids[:3], 0.01, 7)) == 1  # at least one
    assert len(control_group(ids[:2], 0.9, 7)) == 1  # never the whole group
    assert control_group(ids[:1], 0.5, 7) == frozenset()


def test_control_group_baseline_is_the_control_mean() -> None:
    # Control devices c1, c2 at 16:00 and 17:00: c1 2.0, 3.0; c2 4.0, (no data).
    # Mean per interval: (2 + 4) / 2 = 3.0, then 3.0 / 1 = 3.0; suspect (a control gap).
    # Three treated devices: the group baseline is 3 x 3.0 = 9.0 kW each hour.
    start = at(D(2024, 6, 20), 16)
    c1 = DeviceHistory.from_values("c1", start, 3600, [2.0, 3.0])
    c2 = DeviceHistory.from_values("c2", start, 3600, [4.0, None])
    config = BaselineConfig(method=BaselineMethod.CONTROL_GROUP, control_share=0.4)
    rows = [
        control_group_baseline(
            d, {"c1": c1, "c2": c2}, CALENDAR, start, start + timedelta(hours=2), config
        )
        for d in ("t1", "t2", "t3")
    ]
    assert rows[0].kw == pytest.approx((3.0, 3.0))
    assert rows[0].quality is Quality.SUSPECT
    assert np.sum([r.kw for r in rows], axis=0) == pytest.approx([9.0, 9.0])
    assert rows[0].method.startswith("control group: mean metered load of 2 held-out device(s)")


# --------------------------------------------------------------------------- clock time (DST)

NEW_YORK = ZoneInfo("America/New_York")


def clock_hour_load(offset: dict[date, float]) -> DeviceHistory:
    """Hourly history whose load is the *local* clock hour plus a per-day offset (New York)."""
    start, end = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 12, 1, tzinfo=UTC)
    hours = int((end - start).total_seconds() // 3600)
    values = np.empty(hours)
    for i in range(hours):
        local = (start + timedelta(hours=i)).astimezone(NEW_YORK)
        values[i] = local.hour + offset.get(local.date(), 0.0)
    return DeviceHistory("a", start, 3600, values)


def local(day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=NEW_YORK)


def test_pjm_on_the_spring_forward_sunday_reads_the_clock_hours() -> None:
    # Sunday 10 March 2024, clocks 02:00 -> 03:00 in New York; event 16:00-17:00 local.
    # Sundays before: 3 March (+2 kW), 25 Feb (+1), 18 Feb (+4): highest 2 are 18 Feb and
    # 3 March. Load at 16:00 local = 16 + offset: (20 + 18) / 2 = 19 kW. SAA window 13:00 and
    # 14:00 local: CBL (13 + 14) / 2 + 3 = 16.5, actual on the day (13 + 14) / 2 = 13.5:
    # SAA -3.0 -> 16.0 kW, i.e. exactly the event day's own 16:00 clock-hour load.
    # (Read by elapsed time since midnight, 16:00 on the DST Sunday would be 15 h in: 15 kW.)
    offsets = {D(2024, 3, 3): 2.0, D(2024, 2, 25): 1.0, D(2024, 2, 18): 4.0}
    calendar = EventCalendar(tz=NEW_YORK)
    day = D(2024, 3, 10)
    b = method_baseline(clock_hour_load(offsets), calendar, local(day, 16), local(day, 17), PJM)
    assert b.selected_days == (D(2024, 3, 3), D(2024, 2, 18))
    assert b.unadjusted_kw == pytest.approx((19.0,))
    assert b.adjustment_kw == pytest.approx(-3.0)
    assert b.kw == pytest.approx((16.0,))


def test_nyiso_with_a_similar_day_that_is_the_fall_back_sunday() -> None:
    # Sunday 10 Nov 2024; like days 3 Nov (clocks 02:00 -> 01:00 in New York, +3.5 kW), 27 Oct
    # (+3), 20 Oct (+2). At 15:00 local: 18.5, 18, 17 -> highest 2 are 3 Nov and 27 Oct:
    # (18.5 + 18) / 2 = 18.25 kW. (Read by elapsed time, 15:00 on 3 Nov would be its 14:00.)
    # Adjustment over 11:00 and 12:00 local: CBL (11 + 12) / 2 + 3.25 = 14.75, actual on the
    # day (11 + 12) / 2 + 2.8 = 14.3 -> ratio 14.3 / 14.75 = 0.9695 -> 17.693 kW.
    offsets = {D(2024, 11, 3): 3.5, D(2024, 10, 27): 3.0, D(2024, 10, 20): 2.0}
    offsets[D(2024, 11, 10)] = 2.8
    calendar = EventCalendar(tz=NEW_YORK)
    day = D(2024, 11, 10)
    b = method_baseline(clock_hour_load(offsets), calendar, local(day, 15), local(day, 16), NYISO)
    assert b.selected_days == (D(2024, 11, 3), D(2024, 10, 27))
    assert b.unadjusted_kw == pytest.approx((18.25,))
    assert b.raw_adjustment_factor == pytest.approx(14.3 / 14.75)
    assert b.kw == pytest.approx((18.25 * 14.3 / 14.75,))


# --------------------------------------------------------------------------- temperature record


def test_temperature_record_keeps_each_moment_at_its_newest_forecast() -> None:
    # Forecast A (issued first, hourly): 10:00 20 °C, 11:00 22 °C. Forecast B (issued later,
    # half-hourly): 11:00 24 °C, 11:30 26 °C. On the common 30-min step: 10:00 20, 10:30 20,
    # 11:00 24, 11:30 26. Hourly means: 10:00 -> 20, 11:00 -> (24 + 26) / 2 = 25; 12:00 ->
    # unknown; 11:30-12:30 -> half known (the minimum coverage): 26.
    t = at(EVENT_DAY, 10).timestamp()
    record = TemperatureRecord.from_points(
        [
            (t + 3600, 1800, 24.0, 2.0),
            (t, 3600, 20.0, 1.0),
            (t + 3600, 3600, 22.0, 1.0),
            (t + 5400, 1800, 26.0, 2.0),
        ]
    )
    assert record is not None
    assert record.step_s == 1800
    starts = np.array([t, t + 3600, t + 7200, t + 5400, np.nan])
    means = record.means(starts, 3600)
    assert means[:2] == pytest.approx([20.0, 25.0])
    assert np.isnan(means[2])
    assert means[3] == pytest.approx(26.0)
    assert np.isnan(means[4])
    assert TemperatureRecord.from_points([]) is None


def test_no_low_usage_exclusion_for_a_net_exporter() -> None:
    # A PV-like device exporting: 17 (-6 kW), 14 (-5), 13 (-0.5), 12 (-7), 11 (-4). The window
    # mean is negative, so no day is "low-usage"; the 4 highest loads are 13 (-0.5), 11 (-4),
    # 14 (-5), 17 (-6) -> -15.5 / 4 = -3.875 kW.
    days = {D(2024, 6, 17): -6.0, D(2024, 6, 14): -5.0, D(2024, 6, 13): -0.5}
    days |= {D(2024, 6, 12): -7.0, D(2024, 6, 11): -4.0}
    h = flat_days("pv", days)
    b = method_baseline(h, CALENDAR, at(EVENT_DAY, 14), at(EVENT_DAY, 16), PJM)
    assert b.selected_days == (D(2024, 6, 17), D(2024, 6, 14), D(2024, 6, 13), D(2024, 6, 11))
    assert b.kw == pytest.approx((-3.875, -3.875))
    assert "low-usage" not in b.method


def test_control_group_scaled_to_the_treated_pre_event_load() -> None:
    # Event 16:00-18:00; pre-event window (CAISO keys): 3 h ending 1 h before, 12:00-15:00.
    # Control c1 2 kW and c2 4 kW all day (mean 3.0, also in the event); treated t1 3.3 kW and
    # t2 3.9 kW before the event (mean 3.6). Ratio 3.6 / 3.0 = 1.2 (at the ±20 % cap, not over)
    # -> baseline 3.0 x 1.2 = 3.6 kW per treated device.
    day_start = at(EVENT_DAY, 0)
    c1 = DeviceHistory.from_values("c1", day_start, 3600, [2.0] * 24)
    c2 = DeviceHistory.from_values("c2", day_start, 3600, [4.0] * 24)
    t1 = DeviceHistory.from_values("t1", day_start, 3600, [3.3] * 16 + [0.5] * 8)
    t2 = DeviceHistory.from_values("t2", day_start, 3600, [3.9] * 16 + [0.5] * 8)
    config = BaselineConfig(
        method=BaselineMethod.CONTROL_GROUP, control_scaling=ControlScaling.PRE_EVENT
    )
    start = at(EVENT_DAY, 16)
    b = control_group_baseline(
        "t1",
        {"c1": c1, "c2": c2},
        CALENDAR,
        start,
        start + timedelta(hours=2),
        config,
        treated={"t1": t1, "t2": t2},
    )
    assert b.unadjusted_kw == pytest.approx((3.0, 3.0))
    assert b.raw_adjustment_factor == pytest.approx(1.2)
    assert b.kw == pytest.approx((3.6, 3.6))
    assert not b.adjustment_capped
    # Treated at 4.5 kW before the event (a pre-cooling rush): 4.5 / 3.0 = 1.5, capped 1.2.
    t3 = DeviceHistory.from_values("t3", day_start, 3600, [4.5] * 24)
    capped = control_group_baseline(
        "t3",
        {"c1": c1, "c2": c2},
        CALENDAR,
        start,
        start + timedelta(hours=2),
        config,
        treated={"t3": t3},
    )
    assert capped.raw_adjustment_factor == pytest.approx(1.5)
    assert capped.kw == pytest.approx((3.6, 3.6))
    assert capped.adjustment_capped
