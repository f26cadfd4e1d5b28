"""10-in-10 / 4-in-4 baselines: day selection, capped day-of adjustment, insufficient history."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from gateway.flex import (
    BaselineConfig,
    BaselineFallback,
    DayType,
    EventCalendar,
    InsufficientHistory,
    device_baseline,
    group_baseline,
)
from unified.model import Quality

from .conftest import hourly_history

D = date
JUNETEENTH = D(2024, 6, 19)
CALENDAR = EventCalendar(
    event_days=frozenset({D(2024, 6, 18), D(2024, 6, 13)}),
    holidays=frozenset({JUNETEENTH}),
)
NO_ADJUST = BaselineConfig(adjustment_duration_s=0)


def day_value(day: date, hour: int) -> float:
    """A distinct load per day, so the baseline reveals which days were averaged."""
    return 1.0 + day.toordinal() % 97 / 10


def at(day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


@pytest.mark.parametrize(
    ("event_day", "missing", "expected_type", "expected"),
    [
        # Thursday: skips the holiday (19th), event days (18th, 13th) and weekends.
        (
            D(2024, 6, 20),
            set(),
            DayType.WEEKDAY,
            [17, 14, 12, 11, 10, 7, 6, 5, 4, 3],
        ),
        # A day with no meter data in the event window is not eligible: one more day back.
        (
            D(2024, 6, 20),
            {D(2024, 6, 17)},
            DayType.WEEKDAY,
            [14, 12, 11, 10, 7, 6, 5, 4, 3, -31],
        ),
        # Saturday: 4-in-4 over weekends and holidays (holiday pooled with weekends).
        (D(2024, 6, 22), set(), DayType.WEEKEND, [19, 16, 15, 9]),
        # The holiday itself is a weekend-type day.
        (JUNETEENTH, set(), DayType.WEEKEND, [16, 15, 9, 8]),
    ],
)
def test_selects_the_right_similar_days(
    event_day: date, missing: set[date], expected_type: DayType, expected: list[int]
) -> None:
    history = hourly_history("d1", lambda d, h: None if d in missing else day_value(d, h))
    days = [D(2024, 6, x) if x > 0 else D(2024, 5, -x) for x in expected]
    result = device_baseline(history, CALENDAR, at(event_day, 16), at(event_day, 19), NO_ADJUST)
    assert result.day_type is expected_type
    assert list(result.selected_days) == days
    want = np.mean([day_value(d, 0) for d in days])
    assert result.kw == pytest.approx([want] * 3)
    assert result.adjustment_factor == 1.0
    assert result.quality is Quality.GOOD


@pytest.mark.parametrize(
    ("ratio", "factor", "capped"),
    [
        (1.0, 1.0, False),
        (1.1, 1.1, False),
        (0.85, 0.85, False),
        (1.5, 1.2, True),
        (0.5, 0.8, True),
        (3.0, 1.2, True),
    ],
)
def test_day_of_adjustment_is_capped_at_20_percent(
    ratio: float, factor: float, capped: bool
) -> None:
    event = D(2024, 6, 20)

    def kw(d: date, h: int) -> float:
        base = 2.0 + 0.1 * h  # a shaped profile, same every day
        # On the event day the adjustment window (12:00-15:00 for a 16:00 start) runs at ratio.
        return base * ratio if d == event and 12 <= h < 15 else base

    history = hourly_history("d1", kw)
    result = device_baseline(history, CALENDAR, at(event, 16), at(event, 19))
    assert result.raw_adjustment_factor == pytest.approx(ratio)
    assert result.adjustment_factor == pytest.approx(factor)
    assert result.adjustment_capped is capped
    assert result.unadjusted_kw == pytest.approx([3.6, 3.7, 3.8])
    assert result.kw == pytest.approx([3.6 * factor, 3.7 * factor, 3.8 * factor])


def test_no_ratio_adjustment_for_an_idle_device() -> None:
    event = D(2024, 6, 20)
    history = hourly_history("d1", lambda d, h: 5.0 if d == event else 0.0)
    result = device_baseline(history, CALENDAR, at(event, 16), at(event, 19))
    assert result.adjustment_factor == 1.0
    assert result.raw_adjustment_factor is None
    assert "too small" in result.method


@pytest.mark.parametrize(
    ("history_days", "fallback", "raises"),
    [
        (3, BaselineFallback.NONE, True),  # 17th, 19th eligible (18th an event): 2 < 5
        (6, BaselineFallback.EVENT_DAYS, True),  # 3 weekdays + 1 event day: still short
        (7, BaselineFallback.EVENT_DAYS, False),  # 3 weekdays + 2 event days: fallback works
        (9, BaselineFallback.NONE, False),  # 5 eligible weekdays: enough
    ],
)
def test_insufficient_history(history_days: int, fallback: BaselineFallback, raises: bool) -> None:
    event = D(2024, 6, 20)
    start = at(event, 0) - timedelta(days=history_days)
    history = hourly_history("d1", day_value, start=start)
    calendar = EventCalendar(event_days=frozenset({D(2024, 6, 18), D(2024, 6, 13)}))
    config = BaselineConfig(adjustment_duration_s=0, fallback=fallback)
    if raises:
        with pytest.raises(InsufficientHistory, match=r"d1: .* at least 5 required") as info:
            device_baseline(history, calendar, at(event, 16), at(event, 19), config)
        assert info.value.day_type is DayType.WEEKDAY
        return
    result = device_baseline(history, calendar, at(event, 16), at(event, 19), config)
    if fallback is BaselineFallback.EVENT_DAYS:
        assert result.fallback_days
        assert result.quality is Quality.SUSPECT
    else:
        assert len(result.selected_days) >= 5


def test_group_baseline_sums_devices_and_reports_exclusions() -> None:
    event = D(2024, 6, 20)
    a = hourly_history("a", lambda d, h: 1.0)
    b = hourly_history("b", lambda d, h: 2.5)
    short = hourly_history("short", lambda d, h: 9.0, start=at(event, 0) - timedelta(days=2))
    group = group_baseline("feeder:f1", [a, b, short], CALENDAR, at(event, 16), at(event, 18))
    assert group.kw == pytest.approx([3.5, 3.5])
    assert group.kwh == pytest.approx(7.0)
    assert [e.device_id for e in group.excluded] == ["short"]
    assert group.quality is Quality.SUBSTITUTED


def test_misaligned_window_is_a_clear_error() -> None:
    history = hourly_history("d1", day_value)
    start = at(D(2024, 6, 20), 16) + timedelta(minutes=30)
    with pytest.raises(ValueError, match="not aligned"):
        device_baseline(history, CALENDAR, start, start + timedelta(hours=1))
