"""Event performance against a baseline, hand-computed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from gateway.flex import (
    BaselineConfig,
    DeviceHistory,
    EventCalendar,
    device_performance,
    event_performance,
    group_baseline,
)
from unified.model import Quality

from .conftest import hourly_history

EVENT = date(2024, 6, 20)
START = datetime(2024, 6, 20, 16, tzinfo=UTC)
END = START + timedelta(hours=3)
CONFIG = BaselineConfig(adjustment_duration_s=0)


def event_meter(device_id: str, kw: list[float | None], estimated: list[bool]) -> DeviceHistory:
    return DeviceHistory.from_values(device_id, START, 3600, kw, estimated)


def test_hand_computed_device_and_group_performance() -> None:
    baseline = group_baseline(
        "feeder:f1",
        [hourly_history("a", lambda d, h: 4.0), hourly_history("b", lambda d, h: 2.0)],
        EventCalendar(),
        START,
        END,
        CONFIG,
    )
    metered = {
        # a: 1 kW measured, then no data, then 2 kW estimated upstream.
        "a": event_meter("a", [1.0, None, 2.0], [False, False, True]),
        "b": event_meter("b", [0.0, 0.0, 0.0], [False, False, False]),
    }
    result = event_performance(baseline, metered, requested_kw=-6.0, device_requests={"a": -3.0})
    a, b = result.devices
    assert a.baseline_kw == (4.0, 4.0, 4.0)
    assert a.metered_kw == (1.0, None, 2.0)
    assert a.delivered_kw == (-3.0, 0.0, -2.0)  # the missing hour earns nothing
    assert a.delivered_kwh == pytest.approx(-5.0)
    assert a.mean_delivered_kw == pytest.approx(-5 / 3)
    assert a.percent_of_request == pytest.approx(100 * (5 / 3) / 3)
    assert (a.intervals_measured, a.intervals_estimated, a.intervals_missing) == (1, 1, 1)
    assert a.quality is Quality.SUBSTITUTED
    assert b.quality is Quality.GOOD
    assert b.percent_of_request is None
    assert b.delivered_kwh == pytest.approx(-6.0)

    assert result.delivered_kw == pytest.approx((-5.0, -2.0, -4.0))
    assert result.delivered_kwh == pytest.approx(-11.0)
    assert result.baseline_kwh == pytest.approx(18.0)
    assert result.metered_kwh == pytest.approx(7.0)
    assert result.percent_of_request == pytest.approx(100 * (11 / 3) / 6)
    assert result.devices_by_quality == {Quality.SUBSTITUTED: 1, Quality.GOOD: 1}
    assert result.quality is Quality.SUBSTITUTED


@pytest.mark.parametrize(
    ("kw", "estimated", "quality"),
    [
        ([1.0, 1.0, 1.0], [False] * 3, Quality.GOOD),
        ([1.0, 1.0, 1.0], [False, True, False], Quality.ESTIMATED),
        ([1.0, None, 1.0], [False] * 3, Quality.SUBSTITUTED),
        ([None, None, None], [False] * 3, Quality.INVALID),
    ],
)
def test_quality_flags(kw: list[float | None], estimated: list[bool], quality: Quality) -> None:
    baseline = group_baseline(
        "g", [hourly_history("a", lambda d, h: 3.0)], EventCalendar(), START, END, CONFIG
    ).devices[0]
    result = device_performance(baseline, event_meter("a", kw, estimated), requested_kw=-2.0)
    assert result.quality is quality


def test_finer_meter_data_is_averaged_into_baseline_intervals() -> None:
    baseline = group_baseline(
        "g", [hourly_history("a", lambda d, h: 3.0)], EventCalendar(), START, END, CONFIG
    ).devices[0]
    quarter = np.tile([0.0, 1.0, 2.0, 3.0], 3)  # 1.5 kW mean each hour
    meter = DeviceHistory("a", START, 900, quarter)
    result = device_performance(baseline, meter, requested_kw=-1.5)
    assert result.delivered_kw == pytest.approx((-1.5, -1.5, -1.5))
    assert result.percent_of_request == pytest.approx(100.0)
    assert result.quality is Quality.GOOD


def test_with_only_hourly_meter_data_a_partial_hour_takes_the_hours_mean_weighted() -> None:
    # Event 16:10-18:50 against a flat 3 kW baseline; the meter has hourly means only (4/3, 1,
    # 4/3 kW), so a partial hour's part inside the event cannot be told from the hour: by hand
    # delivered (-5/3, -2, -5/3) kW with weights (5/6, 1, 5/6): -25/9 - 2 = -43/9 kWh over 8/3 h,
    # a mean of -43/24 kW.
    baseline = group_baseline(
        "g", [hourly_history("a", lambda d, h: 3.0)], EventCalendar(), START, END, CONFIG
    ).devices[0]
    meter = DeviceHistory("a", START, 3600, np.array([4 / 3, 1.0, 4 / 3]))
    result = device_performance(
        baseline,
        meter,
        requested_kw=-2.0,
        event_start=START + timedelta(minutes=10),
        event_end=END - timedelta(minutes=10),
    )
    assert result.weights == pytest.approx((5 / 6, 1.0, 5 / 6))
    assert result.delivered_kw == pytest.approx((-5 / 3, -2.0, -5 / 3))
    assert result.event_hours == pytest.approx(8 / 3)
    assert result.delivered_kwh == pytest.approx(-43 / 9)
    assert result.mean_delivered_kw == pytest.approx(-43 / 24)
    assert result.widened is not None
    assert result.widened.mean_delivered_kw == pytest.approx(-16 / 9)
