"""Baselines across daylight-saving changes: similar days are matched by local clock time.

Every history here draws, in each hour, as many kW as the local clock hour it starts at (16 kW
from 16:00 to 17:00 local), so a correct baseline of an event 16:00-18:00 local is exactly
(16, 17) whatever the DST changes; a baseline matched by elapsed time since midnight reads
(15, 16) or (17, 18) on a DST day. The expected values are worked by hand in each case.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from gateway.flex import BaselineConfig, DeviceHistory, EventCalendar, device_baseline

LA = ZoneInfo("America/Los_Angeles")  # 2024: forward Sun 10 Mar 02:00, back Sun 3 Nov 02:00
BERLIN = ZoneInfo("Europe/Berlin")  # 2024: forward Sun 31 Mar 02:00, back Sun 27 Oct 03:00
NO_ADJUST = BaselineConfig(adjustment_duration_s=0)
ADJUST = BaselineConfig()  # 3 h day-of adjustment ending 1 h before the start


def clock_history(
    tz: ZoneInfo, first: date, last: date, extra: Callable[[date], float] = lambda d: 0.0
) -> DeviceHistory:
    """Hourly history in UTC whose value is the local clock hour (+ ``extra(local day)``)."""
    start = datetime(first.year, first.month, first.day, tzinfo=tz).astimezone(UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=tz).astimezone(UTC)
    n = int((end - start).total_seconds() // 3600)
    kw = np.empty(n)
    for i in range(n):
        local = (start + timedelta(hours=i)).astimezone(tz)
        kw[i] = local.hour + local.minute / 60 + extra(local.date())
    return DeviceHistory("d1", start, 3600, kw)


def local(tz: ZoneInfo, day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=tz).astimezone(UTC)


CASES = [
    # (zone, event day, why): each event day is a DST day, or has DST days among its 4-in-4
    # (weekend) or 10-in-10 similar days.
    (LA, date(2024, 3, 10), "event on the spring-forward Sunday"),
    (LA, date(2024, 11, 3), "event on the fall-back Sunday"),
    (LA, date(2024, 3, 16), "Saturday: the spring-forward Sunday is a similar day"),
    (LA, date(2024, 11, 9), "Saturday: the fall-back Sunday is a similar day"),
    (LA, date(2024, 3, 11), "Monday after spring-forward: similar days before it"),
    (BERLIN, date(2024, 3, 31), "event on the spring-forward Sunday"),
    (BERLIN, date(2024, 10, 27), "event on the fall-back Sunday"),
    (BERLIN, date(2024, 4, 6), "Saturday: the spring-forward Sunday is a similar day"),
    (BERLIN, date(2024, 11, 2), "Saturday: the fall-back Sunday is a similar day"),
]


@pytest.mark.parametrize(("tz", "event_day", "why"), CASES)
@pytest.mark.parametrize("config", [NO_ADJUST, ADJUST], ids=["unadjusted", "adjusted"])
def test_event_hours_read_the_same_clock_hours_on_every_similar_day(
    tz: ZoneInfo, event_day: date, why: str, config: BaselineConfig
) -> None:
    history = clock_history(tz, event_day - timedelta(days=50), event_day + timedelta(days=2))
    calendar = EventCalendar(tz=tz)
    result = device_baseline(
        history, calendar, local(tz, event_day, 16), local(tz, event_day, 18), config
    )
    assert result.unadjusted_kw == pytest.approx([16.0, 17.0]), why
    # The adjustment window (13:00-15:00 local) also reads the same clock hours: ratio 1.
    assert result.adjustment_factor == pytest.approx(1.0), why
    assert result.kw == pytest.approx([16.0, 17.0]), why


def test_a_similar_day_that_is_a_dst_day_is_read_at_its_clock_hours() -> None:
    # Saturday 16 Mar 2024 in Los Angeles: 4-in-4 = Sun 10 (spring forward), Sat 9, Sun 3,
    # Sat 2. Each day's load is the clock hour + 10 x (days before the event), so the mean
    # names the hours read: at 16:00, (16+60) + (16+70) + (16+130) + (16+140) = 464 -> 116.
    # Matched by elapsed time, the 10th would be read at 17:00: 116.25.
    event = date(2024, 3, 16)
    history = clock_history(
        LA, date(2024, 1, 20), date(2024, 3, 18), lambda d: 10.0 * (event - d).days
    )
    result = device_baseline(
        history, EventCalendar(tz=LA), local(LA, event, 16), local(LA, event, 18), NO_ADJUST
    )
    assert result.selected_days == (
        date(2024, 3, 10),
        date(2024, 3, 9),
        date(2024, 3, 3),
        date(2024, 3, 2),
    )
    assert result.unadjusted_kw == pytest.approx([116.0, 117.0])


def test_a_clock_hour_a_similar_day_does_not_have_is_left_out_of_its_mean() -> None:
    # Event Sat 16 Mar 2024 02:00-04:00 PDT (LA). On Sun 10 Mar 02:00-03:00 does not exist;
    # that day draws +100 kW. 02:00: the other three days only, 2 kW; 03:00: all four,
    # (3 + 103 + 3 + 3) / 4 = 28 kW.
    event = date(2024, 3, 16)
    history = clock_history(
        LA, date(2024, 1, 20), date(2024, 3, 18), lambda d: 100.0 if d == date(2024, 3, 10) else 0
    )
    result = device_baseline(
        history, EventCalendar(tz=LA), local(LA, event, 2), local(LA, event, 4), NO_ADJUST
    )
    assert date(2024, 3, 10) in result.selected_days
    assert result.unadjusted_kw == pytest.approx([2.0, 28.0])


def test_both_repeated_hours_of_a_fall_back_event_day_take_the_similar_days_hour() -> None:
    # Event Sun 3 Nov 2024 00:00-03:00 PST-ish in LA: four UTC hours, local 00:00, 01:00
    # (PDT), 01:00 (PST), 02:00. On every similar day those are clock hours 0, 1, 1, 2.
    event = date(2024, 11, 3)
    history = clock_history(LA, date(2024, 9, 10), date(2024, 11, 5))
    start = local(LA, event, 0)
    result = device_baseline(
        history, EventCalendar(tz=LA), start, start + timedelta(hours=4), NO_ADJUST
    )
    assert result.unadjusted_kw == pytest.approx([0.0, 1.0, 1.0, 2.0])
