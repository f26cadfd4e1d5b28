"""The closed loop's baselines from the reading history (real SQLite): same-hour profiles."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from composition.config import parse_config
from gateway.core import Gateway
from gateway.delivery import BaselineTracker, DeliveryLoop, DeliveryTuning, close_loops
from gateway.dispatch import Plan
from gateway.flex.baseline import EventCalendar
from gateway.flex.profiles import BaselineProfile, loop_profiles
from gateway.history import ReadingHistory
from gateway.weather import TemperatureSeries
from unified.model import (
    Ack,
    Allocation,
    Delivery,
    DeviceState,
    DeviceTelemetry,
    Dispatch,
    GroupTelemetry,
    Target,
    utcnow,
)

EVENT = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)  # a Wednesday, 16:00-19:00
END = EVENT + timedelta(hours=3)
TUNING = DeliveryTuning(smoothing_s=60.0, integral_s=300.0, settle_s=300.0)


def afternoon_kw(when: datetime, day_offset: float = 0.0) -> float:
    """A house whose load rises through the afternoon's heat: 1.0 kW at noon, +0.4 kW an hour."""
    hours = when.hour + when.minute / 60 + when.second / 3600
    return 1.0 + 0.4 * max(0.0, hours - 12.0) + day_offset


def daily_kw(when: datetime) -> float:
    """A load that follows the day smoothly (whatever time of day the test runs at)."""
    hours = when.hour + when.minute / 60 + when.second / 3600
    return 2.0 + math.sin(2 * math.pi * hours / 24)


@pytest.fixture
async def history(tmp_path: Path) -> AsyncIterator[ReadingHistory]:
    async with ReadingHistory(tmp_path / "h.sqlite", interval_s=300) as h:
        # Three weeks before the event: "warm" every day, the days a little unlike each other.
        for back in range(1, 22):
            day = EVENT.replace(hour=10) - timedelta(days=back)
            offset = 0.05 * (back % 3 - 1)
            for k in range(12 * 12):  # 10:00-22:00, every 5 minutes
                at = day + timedelta(minutes=5 * k)
                h.observe("warm", at, afternoon_kw(at, offset))
        await h.flush()
        yield h


async def profiles_for(history: ReadingHistory, ids: list[str]) -> dict[str, BaselineProfile]:
    since = EVENT.replace(hour=0) - timedelta(days=21)
    found = await history.histories(ids, since, EVENT.replace(hour=15), 3600)
    return loop_profiles(found, EventCalendar(), EVENT - timedelta(hours=1), END, ids)


def run_event(profiles: dict[str, BaselineProfile] | None) -> Delivery:
    """Both devices do nothing the event asks: ``warm`` follows its afternoon, ``new`` (no
    history) stays at 1 kW. The closed loop measures them from 15:00 (left alone) to 19:00."""
    tracker = BaselineTracker(900.0)
    loops: dict[str, DeliveryLoop] = {}
    plan = Plan(
        allocations={
            "c": (
                Allocation(device_id="warm", requested_kw=-1.0, commanded_kw=-1.0),
                Allocation(device_id="new", requested_kw=-1.0, commanded_kw=-1.0),
            )
        },
        requested_kw={"c": -2.0},
        available_kw={"c": 4.0},
    )
    delivery = None
    for k in range(4 * 120):  # every 30 s
        now = EVENT - timedelta(hours=1) + timedelta(seconds=30 * k)
        states = {
            "warm": DeviceState(
                device_id="warm", timestamp=now, power_kw=afternoon_kw(now), source="test"
            ),
            "new": DeviceState(device_id="new", timestamp=now, power_kw=1.0, source="test"),
        }
        held = now >= EVENT
        for device_id, state in states.items():
            tracker.observe(device_id, now, state.power_kw, held=held)
        if held:
            out = close_loops(
                now,
                plan,
                dict(states),
                tracker,
                loops,
                TUNING,
                {"warm", "new"},
                profiles=None if profiles is None else {"c": profiles},
            )
            delivery = out["c"]
    assert delivery is not None
    return delivery


async def test_a_device_that_did_nothing_delivers_nothing_against_its_afternoon_profile(
    history: ReadingHistory,
) -> None:
    profiles = await profiles_for(history, ["warm", "new"])
    assert set(profiles) == {"warm"}, "a device without history has no profile"
    profile = profiles["warm"]
    assert profile.days == 10
    assert profile.method == "same_hour"

    delivery = run_event(profiles)
    # By 19:00 the house draws 1.2 kW more than when it was held; the profile expected it.
    assert delivery.devices == 2
    assert delivery.profiled == 1
    assert abs(delivery.delivered_kw) < 0.1
    assert delivery.delivered_lower_kw < delivery.delivered_kw < delivery.delivered_upper_kw
    # The day-to-day spread of the profile widens the interval (the flat device has none).
    assert delivery.delivered_upper_kw - delivery.delivered_lower_kw > 0.05
    assert delivery.short, "nothing was shed: the ack says so"

    flat = run_event(None)  # today's flat pre-event baseline: the drift reads as a load-up
    assert flat.profiled == 0
    assert flat.delivered_kw > 1.0


async def test_a_device_without_enough_history_keeps_its_flat_pre_event_level(
    history: ReadingHistory,
) -> None:
    # Four similar days are too few for a 10-in-10 profile (at least five): no profile.
    since = EVENT.replace(hour=0) - timedelta(days=4)
    found = await history.histories(["warm"], since, EVENT.replace(hour=15), 3600)
    profiles = loop_profiles(found, EventCalendar(), EVENT - timedelta(hours=1), END, ["warm"])
    assert profiles == {}
    delivery = run_event(profiles)
    assert delivery.profiled == 0
    assert delivery.delivered_kw > 1.0  # measured against its flat level, as before


class Quiet:
    def ack(self, ack: Ack, reply: object | None) -> None:
        pass

    def group_telemetry(self, telemetry: GroupTelemetry) -> None:
        pass

    def device_telemetry(self, telemetry: DeviceTelemetry) -> None:
        pass

    def flex_forecast(self, forecast: object) -> None:
        pass

    def performance_report(self, command_id: str, report: bytes) -> None:
        pass


def thermostat(device_id: str) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "der_class": "thermostat",
        "adapter": "mqtt_thermostat",
        "location": {"substation": "s1", "feeder": "f1"},
        "ratings": {"max_charge_kw": 3, "max_discharge_kw": 3, "capacity_kwh": 3},
    }


async def test_the_core_reads_a_running_dispatchs_profiles_once_active_then_hourly(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "history": {"interval_s": 300},
            "settlement": {"timezone": "UTC"},
            "device_mqtt": {"host": "127.0.0.1", "port": 1883, "username": "gateway"},
            "devices": [thermostat("t1"), thermostat("t2")],
        }
    )
    devices = [d.as_device() for d in config.devices]
    gateway = Gateway(config, devices=devices, adapters={}, publisher=Quiet())
    history = gateway.history
    assert history is not None
    now = utcnow()
    async with gateway.store, history:
        await gateway.book.load(now)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        for back in range(1, 23):  # t1 has three weeks of history, t2 none
            day = midnight - timedelta(days=back)
            for k in range(24 * 12):
                at = day + timedelta(minutes=5 * k)
                history.observe("t1", at, daily_kw(at))
        await history.flush()
        command = Dispatch(
            command_id="c1",
            target=Target(group_id="feeder:f1"),
            kw=-2.0,
            start=now - timedelta(seconds=1),
            duration_s=3 * 3600,
        )
        await gateway.submit(command)
        gateway.plan = Plan(requested_kw={"c1": -2.0})  # what the control loop planned
        assert await gateway.load_loop_profiles(now) == 1
        profiles = gateway._profiles["c1"]
        assert set(profiles) == {"t1"}, "t2 has no history: its loop keeps the flat level"
        profile = profiles["t1"]
        assert profile.start_s <= now.timestamp() - 3600  # the pre-event level is inside
        assert profile.end_s >= command.end.timestamp()
        expected = daily_kw(command.end - timedelta(minutes=30))
        assert profile.at(command.end.timestamp() - 1800)[0] == pytest.approx(expected, abs=0.05)
        # Not read again within the hour; read again after it.
        assert await gateway.load_loop_profiles(now + timedelta(minutes=10)) == 0
        assert await gateway.load_loop_profiles(now + timedelta(minutes=61)) == 1


async def test_a_thermostat_on_a_hot_day_is_measured_against_the_past_hot_days(
    history: ReadingHistory,
) -> None:
    # Every other day was hot (35 °C, the house drew 3 kW) or mild (22 °C, 1 kW); the event
    # day is forecast hot. The recent similar days mix both (~2 kW); the days matched on the
    # outdoor temperature are the hot ones.
    midnight = EVENT.replace(hour=0)
    temps = []
    for back in range(22, 0, -1):
        day = midnight - timedelta(days=back)
        hot = back % 2 == 1
        temps.extend([35.0 if hot else 22.0] * 24)
        for k in range(24 * 12):
            history.observe("house", day + timedelta(minutes=5 * k), 3.0 if hot else 1.0)
    temps.extend([35.0] * 24)
    await history.flush()
    record = TemperatureSeries((midnight - timedelta(days=22)).timestamp(), 3600, np.array(temps))
    since = midnight - timedelta(days=21)
    found = await history.histories(["house"], since, EVENT.replace(hour=15), 3600)
    window = (EVENT - timedelta(hours=1), END)
    weather = loop_profiles(
        found, EventCalendar(), *window, ["house"], temperatures={"house": record}
    )
    plain = loop_profiles(found, EventCalendar(), *window, ["house"])
    assert weather["house"].method == "weather_matched"
    assert weather["house"].at(EVENT.timestamp() + 3600)[0] == pytest.approx(3.0)
    assert plain["house"].method == "same_hour"
    assert plain["house"].at(EVENT.timestamp() + 3600)[0] == pytest.approx(2.0, abs=0.25)


def test_the_day_of_adjustment_is_anchored_on_the_hour_before_not_the_last_minutes() -> None:
    # A house that drew 1 kW for 45 minutes, then 3 kW the last quarter hour before it was
    # held: over the hour 1.5 kW, as its similar days say. Its baseline is the profile's 1.5 kW,
    # not the last quarter hour's level (the profile scaled by +20 %, the cap).
    tracker = BaselineTracker(900.0)
    start = EVENT - timedelta(hours=1)
    for k in range(120):
        tracker.observe("h", start + timedelta(seconds=30 * k), 1.0 if k < 90 else 3.0, held=False)
    profile = BaselineProfile("h", start.timestamp() - 3600, 3600, (1.5,) * 5, (0.0,) * 5, "x", 10)
    base = tracker.baseline("h", None)
    assert base is not None
    assert base.mean_kw > 2.0  # the quarter-hour mean the flat baseline uses
    profiled = base.profiled(profile, EVENT.timestamp())
    assert profiled.at(EVENT.timestamp())[0] == pytest.approx(1.5, rel=0.05)
