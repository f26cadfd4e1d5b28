"""The core's side of settlement: which zone settles an event, and whose days become event days."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from composition.config import parse_config
from gateway.core import Gateway
from gateway.errors import CoreError
from gateway.flex import (
    BaselineMethod,
    EventToSettle,
    FlexForecast,
    FlexRequest,
    PerformanceReport,
)
from gateway.history import ReadingHistory
from unified.model import Ack, AckState, DeviceTelemetry, DispatchMode, GroupTelemetry
from unified.weather import WeatherForecast

T0 = datetime(2024, 6, 21, 20, tzinfo=UTC)  # Friday 13:00 in Los Angeles


class Reports:
    def __init__(self) -> None:
        self.reports: dict[str, bytes] = {}

    def ack(self, ack: Ack, reply: object | None) -> None:
        pass

    def group_telemetry(self, telemetry: GroupTelemetry) -> None:
        pass

    def device_telemetry(self, telemetry: DeviceTelemetry) -> None:
        pass

    def flex_forecast(self, forecast: FlexForecast) -> None:
        pass

    def performance_report(self, command_id: str, report: bytes) -> None:
        self.reports[command_id] = report


def battery(device_id: str, substation: str, feeder: str, port: int) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "der_class": "battery",
        "adapter": "sunspec_battery",
        "location": {"substation": substation, "feeder": feeder},
        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
        "sunspec": {"port": port},
    }


def core(tmp_path: Path, settlement: dict[str, Any]) -> tuple[Gateway, Reports]:
    config = parse_config(
        {
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "history": {"interval_s": 60},
            "settlement": settlement,
            "devices": [
                battery("w1", "west", "w-f1", 5020),
                battery("w2", "west", "w-f2", 5021),
                battery("e1", "east", "e-f1", 5022),
                battery("e2", "east", "e-f1", 5023),
            ],
        }
    )
    publisher = Reports()
    devices = [d.as_device() for d in config.devices]
    return Gateway(config, devices=devices, adapters={}, publisher=publisher), publisher


def event(group_id: str | None, devices: tuple[str, ...], **kw: Any) -> EventToSettle:
    fields: dict[str, Any] = {
        "command_id": "ev-1",
        "program": "default",
        "group_id": group_id,
        "mode": DispatchMode.DELTA,
        "kw": -2.0,
        "start": T0,
        "end": T0 + timedelta(hours=1),
        "final_state": AckState.COMPLETED,
        "devices": devices,
        "allocations": {},
    }
    return EventToSettle(**(fields | kw))


def test_the_zone_comes_from_the_target_group_or_its_devices_groups(tmp_path: Path) -> None:
    gateway, _ = core(
        tmp_path,
        {
            "timezone": "America/New_York",
            "group_timezones": {"substation:west": "America/Los_Angeles", "feeder:w-f2": "UTC"},
        },
    )
    zone = gateway.settlement_zone
    assert zone(event("substation:west", ("w1", "w2"))).key == "America/Los_Angeles"
    assert zone(event("feeder:w-f2", ("w2",))).key == "UTC", "the target group's own zone"
    assert zone(event("feeder:w-f1", ("w1",))).key == "America/Los_Angeles", "its substation's"
    assert zone(event(None, ("w1",))).key == "America/Los_Angeles", "a device list"
    assert zone(event("substation:east", ("e1", "e2"))).key == "America/New_York", "default"
    assert zone(event(None, ("w1", "e1"))).key == "America/New_York", "zones disagree: default"


def test_without_a_default_an_unzoned_event_is_a_clear_error(tmp_path: Path) -> None:
    gateway, _ = core(tmp_path, {"group_timezones": {"substation:west": "America/Los_Angeles"}})
    assert gateway.settlement_zone(event(None, ("w1", "w2"))).key == "America/Los_Angeles"
    with pytest.raises(CoreError, match="no settlement time zone for 'substation:east'"):
        gateway.settlement_zone(event("substation:east", ("e1",)))


async def test_every_device_of_the_target_group_gets_the_event_day(tmp_path: Path) -> None:
    # Only e1 was allocated a share, but e2 was called too: its load that day is not a normal
    # day's either (it may have been held, or pre-conditioned), so later baselines skip it.
    gateway, reports = core(tmp_path, {"timezone": "America/Los_Angeles"})
    assert gateway.history is not None
    late = T0.replace(hour=23, minute=0) + timedelta(hours=5)  # Sat 04:00 UTC = Fri 21:00 LA
    async with gateway.history:
        await gateway.settle(
            event(
                "substation:east",
                ("e1", "e2"),
                start=late,
                end=late + timedelta(hours=1),
                allocations={"e1": -2.0},
            )
        )
        days = await gateway.history.event_days(date(2024, 6, 1))
    friday = date(2024, 6, 21)  # the local day, not the UTC one (Saturday)
    assert days == {"e1": frozenset({friday}), "e2": frozenset({friday})}
    assert "ev-1" in reports.reports


async def test_weather_matched_program_settles_on_the_recorded_forecasts(tmp_path: Path) -> None:
    # Forecasts received over the weeks are recorded hour by hour; the "thermal" program is
    # settled weather-matched on them. Event Friday 21 June 20:00-21:00 UTC at 30 °C. Weekdays
    # with a recorded temperature and meter data at 20:00: 20th (25 °C, 5 kW), 19th (31, 7),
    # 18th (29, 6), 17th (20, 9), 14th (30, 8). Closest 2: the 14th (0 K), then of the 19th
    # and 18th (1 K each) the more recent, the 19th -> (8 + 7) / 2 = 7.5 kW.
    gateway, reports = core(
        tmp_path,
        {
            "timezone": "UTC",
            "programs": {
                "thermal": {"method": "weather_matched", "weather_days": 2, "min_weather_days": 2}
            },
        },
    )
    history = gateway.history
    assert history is not None
    days = {14: (30.0, 8.0), 17: (20.0, 9.0), 18: (29.0, 6.0), 19: (31.0, 7.0), 20: (25.0, 5.0)}
    days[21] = (30.0, 1.0)
    async with history:
        for day, (temp, kw) in sorted(days.items()):
            at = datetime(2024, 6, day, 20, tzinfo=UTC)
            # Later forecasts for other hours: none of them replaces this hour's record.
            await gateway.put_weather(
                WeatherForecast.model_validate(
                    {
                        "issued_at": (at - timedelta(hours=6)).isoformat(),
                        "points": [{"start": at.isoformat(), "temp_c": temp}],
                    }
                )
            )
            for minute in range(60):
                history.observe("e1", at + timedelta(minutes=minute, seconds=30), kw)
        event_at = datetime(2024, 6, 21, 20, tzinfo=UTC)
        await gateway.settle(
            event(
                "substation:east",
                ("e1",),
                program="thermal",
                start=event_at,
                end=event_at + timedelta(hours=1),
                allocations={"e1": -2.0},
            )
        )
    report = PerformanceReport.model_validate_json(reports.reports["ev-1"])
    assert report.method is BaselineMethod.WEATHER_MATCHED
    (row,) = report.devices
    assert row.baseline is not None
    assert row.baseline.selected_days == (date(2024, 6, 19), date(2024, 6, 14))
    assert row.baseline.kw == pytest.approx((7.5,))
    assert "closest to 30.0 °C" in row.baseline.method


async def test_the_temperature_record_keeps_the_newest_forecast_and_is_pruned(
    tmp_path: Path,
) -> None:
    history = ReadingHistory(tmp_path / "h.sqlite", interval_s=60, retention_days=10)
    t = T0
    async with history:
        await history.save_temperatures("*", t, [(int(t.timestamp()), 3600, 20.0)])
        later = t + timedelta(hours=1)
        await history.save_temperatures("*", later, [(int(t.timestamp()), 3600, 21.0)])
        await history.save_temperatures("*", t, [(int(t.timestamp()), 3600, 19.0)])  # older
        await history.save_temperatures("feeder:f1", t, [(int(t.timestamp()), 3600, 5.0)])
        rows = await history.temperatures("*", t, t + timedelta(hours=1))
        assert rows == [(int(t.timestamp()), 3600, 21.0, later.timestamp())]
        assert await history.temperatures("*", t + timedelta(hours=1), t + timedelta(hours=2)) == []
        await history.prune(t + timedelta(days=11))
        assert await history.temperatures("*", t, t + timedelta(hours=1)) == []


async def test_a_settled_dispatch_is_checked_against_the_flex_forecast_in_force(
    tmp_path: Path,
) -> None:
    # The east substation's batteries sent no state: its forecast offers no flex (p10 = p90 =
    # 0), yet the dispatch delivered 6.5 kW less than its baseline: outside p10..p90, counted.
    gateway, reports = core(
        tmp_path,
        {
            "timezone": "UTC",
            "programs": {
                "thermal": {"method": "weather_matched", "weather_days": 2, "min_weather_days": 2}
            },
        },
    )
    history = gateway.history
    assert history is not None
    event_at = datetime(2024, 6, 21, 20, tzinfo=UTC)
    days = {14: (30.0, 8.0), 18: (29.0, 6.0), 19: (31.0, 7.0), 21: (30.0, 1.0)}
    async with history:
        for day, (temp, kw) in sorted(days.items()):
            at = datetime(2024, 6, day, 20, tzinfo=UTC)
            await gateway.put_weather(
                WeatherForecast.model_validate(
                    {
                        "issued_at": (at - timedelta(hours=6)).isoformat(),
                        "points": [{"start": at.isoformat(), "temp_c": temp}],
                    }
                )
            )
            for minute in range(60):
                history.observe("e1", at + timedelta(minutes=minute, seconds=30), kw)
        before = event_at - timedelta(minutes=30)
        forecast = gateway.flex_forecast(
            FlexRequest(group_id="substation:east", start=before, horizon_s=7200, interval_s=3600),
            before,
        )
        assert forecast.coverage is not None
        assert forecast.coverage.checked == 0
        gateway.flex_coverage.remember(forecast)
        await gateway.settle(
            event(
                "substation:east",
                ("e1",),
                program="thermal",
                start=event_at,
                end=event_at + timedelta(hours=1),
                allocations={"e1": -2.0},
            )
        )
    report = PerformanceReport.model_validate_json(reports.reports["ev-1"])
    assert report.mean_delivered_kw == pytest.approx(-6.5)
    stat = gateway.flex_coverage.stat("substation:east")
    assert stat.checked == 1
    assert stat.within == 0
    assert stat.coverage == 0.0
    later = gateway.flex_forecast(FlexRequest(group_id="substation:east"), event_at)
    assert later.coverage == stat
