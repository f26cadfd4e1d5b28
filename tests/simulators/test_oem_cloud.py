"""The OEM cloud simulator's physics and event handling, without a VTN."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from protocols.openadr.vtn_events import parse_resource_id
from simulators.oem_cloud import ActiveInstruction, OemCloud, SimBattery, SimThermostat
from unified.model import DerClass, TopologyLocation, utcnow

LOC = TopologyLocation(substation="s1", feeder="f1", transformer="x9")


def shed(value: float = -3.0, minutes: float = 60) -> ActiveInstruction:
    now = utcnow()
    return ActiveInstruction(
        "ev", 0, now, now + timedelta(minutes=minutes), "LOAD_DISPATCH", "delta", value
    )


def mean_power(
    house: SimThermostat, seconds: float, instruction: ActiveInstruction | None
) -> float:
    total, step = 0.0, 10.0
    for _ in range(int(seconds / step)):
        house.step(step, instruction)
        total += house.power_kw * step
    return total / seconds


def test_thermostat_cycles_around_its_setpoint() -> None:
    house = SimThermostat("t", location=LOC)
    mean_power(house, 4 * 3600, None)  # settle
    temps = []
    for _ in range(360):
        house.step(10, None)
        temps.append(house.indoor_c)
    assert 21.3 < min(temps) < max(temps) < 22.7
    duty = mean_power(house, 4 * 3600, None) / house.rated_kw
    # Heat gain (32-22)/2 = 5 kW against 9 kW of cooling: a duty cycle near 5/9.
    assert duty == pytest.approx(5 / 9, abs=0.08)


def test_shed_drops_load_and_it_rebounds_after() -> None:
    house = SimThermostat("t", location=LOC)
    mean_power(house, 4 * 3600, None)
    baseline = mean_power(house, 2 * 3600, None)
    during = mean_power(house, 40 * 60, shed())  # the house warms ~2 °C in ~48 min
    assert during < 0.2 * baseline
    assert house.indoor_c > 23.0
    rebound = mean_power(house, 20 * 60, None)
    assert rebound > 1.5 * baseline
    assert rebound == pytest.approx(house.rated_kw, rel=0.05)
    # Drifts back to the normal cycle afterwards.
    later = mean_power(house, 3 * 3600, None)
    assert later == pytest.approx(baseline, rel=0.2)


def test_indoor_drifts_toward_outdoor_when_the_ac_is_off() -> None:
    house = SimThermostat("t", location=LOC, cop=0.0, indoor_c=22.0, outdoor_c=30.0)  # broken AC
    house.step(24 * 3600, None)
    assert house.indoor_c == pytest.approx(30.0, abs=0.05)
    assert house.status_pct == 0.0  # beyond its comfort band: no headroom
    assert house.feasible("LOAD_DISPATCH", -1.0) == "no comfort headroom left"
    hot = SimThermostat("h", location=LOC, indoor_c=26.5)
    assert hot.feasible("LOAD_DISPATCH", -1.0) == "no comfort headroom left"
    assert hot.feasible("LOAD_DISPATCH", 1.0) is None


def test_battery_follows_within_soc_limits() -> None:
    battery = SimBattery("b", location=LOC, rated_kw=5, capacity_kwh=10, soc_pct=20, min_soc_pct=10)
    order = ActiveInstruction(
        "e", 0, utcnow(), utcnow() + timedelta(hours=1), "LOAD_DISPATCH", "setpoint", -5.0
    )
    battery.step(360, order)  # 0.5 kWh = 5 %
    assert battery.power_kw == -5.0
    assert battery.soc_pct == pytest.approx(15.0)
    battery.step(3600, order)
    assert battery.soc_pct == pytest.approx(10.0)
    assert battery.power_kw == 0.0
    assert battery.feasible("LOAD_DISPATCH", -1.0) == "at minimum state of charge"
    assert battery.feasible("LOAD_DISPATCH", 9.0) is not None
    assert battery.feasible("LOAD_DISPATCH", 2.0) is None


def test_resource_ids_carry_class_rating_and_location() -> None:
    described = parse_resource_id(SimBattery("b7", location=LOC, capacity_kwh=13.5).resource_id())
    assert (described.name, described.der_class, described.rated_kw) == (
        "b7",
        DerClass.BATTERY,
        5.0,
    )
    assert (described.capacity_kwh, described.location) == (13.5, LOC)
    thermostat = parse_resource_id(SimThermostat("t1", location=LOC).resource_id())
    assert (thermostat.der_class, thermostat.capacity_kwh) == (DerClass.THERMOSTAT, 3.0)


def event(
    event_id: str,
    resource_id: str,
    value: float,
    *,
    mod: int = 0,
    status: str = "active",
    startafter: int = 0,
    start: datetime | None = None,
) -> dict[str, Any]:
    # Computed per call by default: a module-level constant would be minutes stale by the time
    # a full suite reaches these tests. Pass one to keep a modification on the same start.
    start = start or utcnow() + timedelta(seconds=5)
    return {
        "event_descriptor": {
            "event_id": event_id,
            "modification_number": mod,
            "event_status": status,
        },
        "active_period": {
            "dtstart": start,
            "duration": timedelta(minutes=30),
            "tolerance": {"tolerate": {"startafter": timedelta(seconds=startafter)}}
            if startafter
            else None,
        },
        "event_signals": [
            {
                "signal_name": "LOAD_DISPATCH",
                "signal_type": "delta",
                "intervals": [{"duration": timedelta(minutes=30), "signal_payload": value}],
            }
        ],
        "targets": [{"resource_id": resource_id}],
        "response_required": "always",
    }


async def test_event_handling_opts_in_out_and_draws_startafter_once() -> None:
    house = SimThermostat("t1", location=LOC)
    stubborn = SimThermostat("t2", location=LOC, override=True)
    cloud = OemCloud("oem", "http://127.0.0.1:9/OpenADR2/Simple/2.0b", [house, stubborn], seed=1)
    start = utcnow() + timedelta(seconds=5)
    assert (
        await cloud._on_event(event("e1", house.resource_id(), -2.0, startafter=600, start=start))
        == "optIn"
    )
    first = cloud.instructions["t1"]
    assert 0 < (first.start - utcnow()).total_seconds() <= 600
    # A modification keeps the draw.
    assert (
        await cloud._on_event(
            event("e1", house.resource_id(), -1.0, mod=1, startafter=600, start=start)
        )
        == "optIn"
    )
    second = cloud.instructions["t1"]
    assert second.start == first.start
    assert second.value == -1.0
    assert await cloud._on_event(event("e2", stubborn.resource_id(), -2.0)) == "optOut"
    assert "t2" not in cloud.instructions
    assert (
        await cloud._on_event(event("e1", house.resource_id(), -1.0, mod=2, status="cancelled"))
        == "optIn"
    )
    assert cloud.instructions == {}
    assert [(e.event_id, e.opt) for e in cloud.stats.log] == [
        ("e1", "optIn"),
        ("e1", "optIn"),
        ("e2", "optOut"),
        ("e1", "optIn"),
    ]
