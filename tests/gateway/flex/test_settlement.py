"""Settlement of one finished dispatch: baselines, the documented fallback, flags, hand-computed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from gateway.flex import BaselineConfig, DeviceHistory, EventCalendar, EventToSettle, settle_event
from gateway.flex.settlement import FlagCode, event_days, settlement_window
from unified.model import AckState, DispatchMode, Quality

EVENT_DAY = date(2024, 6, 20)  # a Thursday
START = datetime(2024, 6, 20, 16, tzinfo=UTC)
END = START + timedelta(hours=2)
HISTORY_START = datetime(2024, 5, 1, tzinfo=UTC)
CONFIG = BaselineConfig()  # 1 h intervals, 10-in-10, adjustment 3 h ending 1 h before


def history(
    device_id: str, kw_at: dict[str, float], *, old_from: datetime = HISTORY_START
) -> DeviceHistory:
    """Hourly history: ``kw_at["old"]`` on days before the event day (from ``old_from``),
    ``kw_at["pre"]`` on the event day before the event, ``kw_at["event"]`` during it; keys
    missing: no data."""
    days = 60
    n = days * 24
    values = np.full(n, np.nan)
    for i in range(n):
        t = HISTORY_START + timedelta(hours=i)
        if t.date() < EVENT_DAY:
            key = "old"
        elif t < START:
            key = "pre"
        elif t < END:
            key = "event"
        else:
            continue
        if key in kw_at and (key != "old" or t >= old_from):
            values[i] = kw_at[key]
    return DeviceHistory(device_id, HISTORY_START, 3600, values)


def event(devices: tuple[str, ...], **kw: object) -> EventToSettle:
    fields: dict[str, object] = {
        "command_id": "ev-1",
        "program": "default",
        "group_id": "feeder:f1",
        "mode": DispatchMode.DELTA,
        "kw": -4.0,
        "start": START,
        "end": END,
        "final_state": AckState.COMPLETED,
        "devices": devices,
        "allocations": {"a": -2.0, "b": -2.0},
    }
    fields.update(kw)
    return EventToSettle(**fields)  # type: ignore[arg-type]


def test_settles_a_history_device_and_falls_back_for_a_new_one() -> None:
    # a: 3 kW every earlier day, 3.3 kW on the morning of the event (+10 %), 0.5 kW during it.
    # b: joined 3 days ago (too few weekdays): fallback to its own pre-event mean, 2 kW.
    # c: never reported: excluded.
    a = history("a", {"old": 3.0, "pre": 3.3, "event": 0.5})
    b = history("b", {"old": 9.0, "pre": 2.0, "event": 1.0}, old_from=START - timedelta(days=3))
    now = END + timedelta(minutes=5)
    report = settle_event(
        event(("a", "b", "c")),
        {"a": a, "b": b},
        EventCalendar(),
        generated_at=now,
        config=CONFIG,
    )
    rows = {r.device_id: r for r in report.devices}
    ra, rb, rc = rows["a"], rows["b"], rows["c"]
    assert ra.baseline is not None
    assert ra.performance is not None
    assert ra.baseline.adjustment_factor == pytest.approx(1.1)
    assert ra.baseline.kw == pytest.approx((3.3, 3.3))
    assert len(ra.baseline.selected_days) == 10
    assert ra.performance.delivered_kw == pytest.approx((-2.8, -2.8))
    assert ra.performance.percent_of_request == pytest.approx(140.0)
    assert ra.baseline.quality is Quality.GOOD

    assert rb.baseline is not None
    assert rb.performance is not None
    assert rb.baseline.quality is Quality.SUSPECT
    assert rb.baseline.kw == pytest.approx((2.0, 2.0))
    assert "fallback" in rb.baseline.method
    assert rb.performance.delivered_kw == pytest.approx((-1.0, -1.0))
    assert [f.code for f in rb.flags] == [FlagCode.FALLBACK_PRE_EVENT_MEAN]

    assert rc.baseline is None
    assert rc.performance is None
    assert [f.code for f in rc.flags] == [FlagCode.NO_METER_DATA]

    group = report.group
    assert group is not None
    assert group.baseline_kw == pytest.approx((5.3, 5.3))
    assert group.metered_kw == pytest.approx((1.5, 1.5))
    assert report.mean_delivered_kw == pytest.approx(-3.8)
    assert report.delivered_kwh == pytest.approx(-7.6)
    assert report.performance_ratio == pytest.approx(0.95)
    assert [e.device_id for e in group.excluded] == ["c"]
    assert group.devices_by_quality == {Quality.GOOD: 1, Quality.SUSPECT: 1}
    # The worst of "a member is missing from the sums" (substituted) and the fallback (suspect).
    assert report.quality is Quality.SUSPECT
    assert report.generated_at == now
    assert "10-in-10" in report.baseline_method
    assert "20%" in report.baseline_method


def test_a_short_or_cancelled_event_is_settled_over_whole_intervals_and_flagged() -> None:
    a = history("a", {"old": 3.0, "pre": 3.0, "event": 1.0})
    cancelled_at = START + timedelta(minutes=40)
    report = settle_event(
        event(
            ("a",),
            start=START + timedelta(minutes=10),
            end=cancelled_at,
            final_state=AckState.CANCELLED,
            allocations={"a": -2.0},
        ),
        {"a": a},
        EventCalendar(),
        generated_at=END,
        config=CONFIG,
    )
    assert (report.start, report.end) == (START, START + timedelta(hours=1))
    assert report.event_end == cancelled_at
    assert report.flags[0].code is FlagCode.WINDOW_WIDENED
    assert report.final_state is AckState.CANCELLED
    assert report.group is not None
    assert report.group.delivered_kw == pytest.approx((-2.0,))


def test_target_mode_requests_the_difference_from_the_baseline() -> None:
    a = history("a", {"old": 3.0, "pre": 3.0, "event": 1.0})
    report = settle_event(
        event(("a",), mode=DispatchMode.TARGET, kw=1.0, allocations={"a": 1.0}),
        {"a": a},
        EventCalendar(),
        generated_at=END,
        config=CONFIG,
    )
    assert report.requested_kw == pytest.approx(-2.0)
    assert report.devices[0].requested_kw == pytest.approx(-2.0)
    assert report.performance_ratio == pytest.approx(1.0)


def test_no_data_at_all_gives_an_invalid_report_not_an_exception() -> None:
    report = settle_event(event(("a",)), {}, EventCalendar(), generated_at=END, config=CONFIG)
    assert report.group is None
    assert report.quality is Quality.INVALID
    assert {f.code for f in report.flags} == {FlagCode.NO_BASELINE, FlagCode.NO_METER_DATA}


def test_window_and_event_days_helpers() -> None:
    s, e = settlement_window(START + timedelta(seconds=1), START + timedelta(seconds=1), 3600)
    assert (s, e) == (START, START + timedelta(hours=1)), "never an empty window"
    assert settlement_window(START, END, 3600) == (START, END)
    late = datetime(2024, 6, 20, 23, 30, tzinfo=UTC)
    assert event_days(late, late + timedelta(hours=1), EventCalendar()) == [
        EVENT_DAY,
        EVENT_DAY + timedelta(days=1),
    ]
    assert event_days(START, START.replace(hour=23) + timedelta(hours=1), EventCalendar()) == [
        EVENT_DAY
    ], "an event ending at midnight does not touch the next day"


def five_minute_meter(device_id: str, kw_at: dict[str, float], start: datetime) -> DeviceHistory:
    """5-min meter data over 16:00-19:00: ``kw_at["event"]`` inside 16:10-18:50, else "pre"."""
    values = [
        kw_at["event"]
        if START + timedelta(minutes=10)
        <= start + timedelta(minutes=5 * i)
        < START + timedelta(hours=2, minutes=50)
        else kw_at["pre"]
        for i in range(36)
    ]
    return DeviceHistory.from_values(device_id, start, 300, values)


def test_performance_is_over_the_exact_event_window_with_partial_intervals_weighted() -> None:
    # Event 16:10-18:50 (2 h 40), request -2 kW. Baseline 3 kW every hour (flat history, no
    # adjustment); the meter (5-min) reads 1 kW inside the event, 3 kW outside: exactly the 2 kW
    # asked for. By hand: weights (5/6, 1, 5/6), 8/3 h, delivered -2 kW x 8/3 h = -16/3 kWh,
    # mean -2 kW, ratio 1.0. Over the widened 16:00-19:00 the hourly means are 4/3, 1, 4/3 kW
    # (10 of the 60 minutes at 3 kW at each edge): delivered -16/3 kWh over 3 h, mean -16/9 kW,
    # ratio 8/9 = 0.889 -- 11 % low for a response that was exactly what was asked.
    config = BaselineConfig(adjustment_duration_s=0)
    a = history("a", {"old": 3.0, "pre": 3.0, "event": 1.0})
    meter = five_minute_meter("a", {"pre": 3.0, "event": 1.0}, START)
    exact = settle_event(
        event(
            ("a",),
            start=START + timedelta(minutes=10),
            end=START + timedelta(hours=2, minutes=50),
            kw=-2.0,
            allocations={"a": -2.0},
        ),
        {"a": a},
        EventCalendar(),
        generated_at=END,
        config=config,
        metered={"a": meter},
    )
    assert (exact.start, exact.end) == (START, START + timedelta(hours=3))
    group = exact.group
    assert group is not None
    assert group.weights == pytest.approx((5 / 6, 1.0, 5 / 6))
    assert group.event_hours == pytest.approx(8 / 3)
    assert group.baseline_kw == pytest.approx((3.0, 3.0, 3.0))
    assert group.metered_kw == pytest.approx((1.0, 1.0, 1.0)), "the event's part of each hour"
    assert exact.delivered_kwh == pytest.approx(-16 / 3)
    assert exact.mean_delivered_kw == pytest.approx(-2.0)
    assert exact.performance_ratio == pytest.approx(1.0)
    row = exact.devices[0].performance
    assert row is not None
    assert row.percent_of_request == pytest.approx(100.0)
    assert row.baseline_kwh == pytest.approx(8.0)  # 3 kW x 8/3 h
    # The whole intervals: supporting detail only, and said so.
    assert exact.widened is not None
    assert exact.widened.delivered_kwh == pytest.approx(-16 / 3)
    assert exact.widened.mean_delivered_kw == pytest.approx(-16 / 9)
    assert exact.widened.percent_of_request == pytest.approx(800 / 9)
    (flag,) = [f for f in exact.flags if f.code is FlagCode.WINDOW_WIDENED]
    assert "2.667 h" in flag.detail
    assert "0.889 instead of 1.000" in flag.detail


def test_a_full_hour_event_has_no_widened_figures() -> None:
    a = history("a", {"old": 3.0, "pre": 3.0, "event": 1.0})
    report = settle_event(
        event(("a",), allocations={"a": -2.0}, kw=-2.0),
        {"a": a},
        EventCalendar(),
        generated_at=END,
        config=CONFIG,
    )
    assert report.widened is None
    assert report.group is not None
    assert report.group.weights == (1.0, 1.0)
    assert report.performance_ratio == pytest.approx(1.0)
    assert not any(f.code is FlagCode.WINDOW_WIDENED for f in report.flags)
