"""The core's side of settlement: which zone settles an event, and whose days become event days."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from composition.config import parse_config
from gateway.core import Gateway
from gateway.errors import CoreError
from gateway.flex import EventToSettle, FlexForecast
from unified.model import Ack, AckState, DeviceTelemetry, DispatchMode, GroupTelemetry

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
