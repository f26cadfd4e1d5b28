"""The optimised allocation (``[dispatch] allocator = "lp"``): HiGHS through SciPy.

What an operator relies on: an envelope holds at every nesting level while the request is still
met by devices with room elsewhere; no battery is asked past its reserve or its rating; a
request the fleet cannot meet is delivered as far as it can be and the shortfall is reported;
the devices called least lately are called first; and, in small cases, the plan is the optimum
one works out by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from gateway import allocation, dispatch
from gateway.config import CoreConfig
from gateway.dispatch import ActiveCommand, headroom, plan
from gateway.registry import Registry
from unified.model import (
    BatteryConstraints,
    BatteryRatings,
    DerClass,
    Device,
    DeviceState,
    Dispatch,
    EnvelopeInterval,
    OperatingEnvelope,
    Target,
    TopologyLocation,
)

NOW = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)


def battery(
    did: str,
    feeder: str = "f1",
    transformer: str | None = None,
    kw: float = 5.0,
    kwh: float = 50.0,
    reserve: float = 20.0,
    der_class: DerClass = DerClass.BATTERY,
) -> Device:
    return Device(
        device_id=did,
        der_class=der_class,
        adapter="sim",
        location=TopologyLocation(substation="s1", feeder=feeder, transformer=transformer),
        ratings=BatteryRatings(max_charge_kw=kw, max_discharge_kw=kw, capacity_kwh=kwh),
        constraints=BatteryConstraints(reserve_soc_pct=reserve),
    )


def state(did: str, soc: float = 50.0) -> DeviceState:
    return DeviceState(device_id=did, timestamp=NOW, power_kw=0.0, soc_pct=soc, source="test")


def request(kw: float, group: str = "substation:s1", duration_s: float = 3600) -> Dispatch:
    return Dispatch(
        command_id="d",
        target=Target(group_id=group),
        kw=kw,
        start=NOW - timedelta(minutes=1),
        duration_s=duration_s,
    )


def envelope(cid: str, group: str, import_kw: float) -> OperatingEnvelope:
    return OperatingEnvelope(
        command_id=cid,
        target=Target(group_id=group),
        intervals=(
            EnvelopeInterval(
                start=NOW - timedelta(minutes=1),
                end=NOW + timedelta(hours=1),
                import_limit_kw=import_kw,
            ),
        ),
    )


def net(result: dispatch.Plan, devices: list[Device], where: str) -> float:
    level, name = where.split(":")
    return sum(
        result.setpoints[d.device_id].power_kw or 0.0
        for d in devices
        if getattr(d.location, level) == name and d.device_id in result.setpoints
    )


# ------------------------------------------------------------------ the solver on its own


def test_small_problem_is_solved_to_the_optimum_worked_by_hand() -> None:
    # Three devices of 4 kW at costs 1, 2, 3 asked for 10 kW: the two cheapest give all they
    # can (8 kW), the dearest the last 2 kW.
    cheap_first = allocation.solve(
        allocation.Problem(10.0, np.array([4.0, 4.0, 4.0]), np.array([1.0, 2.0, 3.0]))
    )
    assert cheap_first.kw.tolist() == pytest.approx([4.0, 4.0, 2.0])
    assert cheap_first.shortfall_kw == 0.0
    # The two cheapest sit behind a 5 kW limit: the cheapest fills it (4), the next gets the
    # last 1 kW of it, the dearest gives all it can, and 1 kW of the request is short.
    limited = allocation.solve(
        allocation.Problem(
            10.0,
            np.array([4.0, 4.0, 4.0]),
            np.array([1.0, 2.0, 3.0]),
            limits=[allocation.Limit("t1", np.array([0, 1]), 5.0)],
        )
    )
    assert limited.kw.tolist() == pytest.approx([4.0, 1.0, 4.0])
    assert limited.shortfall_kw == pytest.approx(1.0)
    assert limited.binding == {"t1"}
    # Moving from last period's allocation costs: a device 0.01 cheaper does not take over from
    # one already giving (a swap would save 0.01 per kW and cost twice the churn cost).
    kept = allocation.solve(
        allocation.Problem(
            1.0, np.array([4.0, 4.0]), np.array([1.01, 1.0]), previous=np.array([1.0, 0.0])
        )
    )
    assert kept.kw.tolist() == pytest.approx([1.0, 0.0])
    # Alike devices share a request, slice by slice (a quarter of each one's headroom at a
    # time): 3 kW of two 5 kW batteries, one a step cheaper, is 1.75 + 1.25, not 3 + 0.
    spread = allocation.solve(
        allocation.Problem(3.0, np.array([5.0, 5.0]), np.array([1.0, 1.01]))
    )
    assert spread.kw.tolist() == pytest.approx([1.75, 1.25])


# ------------------------------------------------------------------ through the planner


def test_envelopes_hold_at_every_level_and_the_request_is_met_elsewhere() -> None:
    # Charging 40 kW across a substation: transformer t1 may take 5 kW, feeder f1 (t1 and t2)
    # 15 kW, the substation 40 kW. Feeder f2 has 30 kW of room: the request is met in full
    # without any envelope being passed, so nothing has to be clipped afterwards.
    devices = (
        [battery(f"a{i}", "f1", "t1") for i in range(4)]
        + [battery(f"b{i}", "f1", "t2") for i in range(4)]
        + [battery(f"c{i}", "f2", "t3") for i in range(6)]
    )
    registry = Registry(devices)
    states: dict[str, DeviceState | None] = {d.device_id: state(d.device_id) for d in devices}
    active = [
        ActiveCommand(request(40.0), 1),
        ActiveCommand(envelope("env-t1", "transformer:t1", 5.0), 2),
        ActiveCommand(envelope("env-f1", "feeder:f1", 15.0), 3),
        ActiveCommand(envelope("env-s1", "substation:s1", 40.0), 4),
    ]
    result = plan(NOW, registry, states, active)
    # (setpoints are rounded to 0.1 W each)
    assert net(result, devices, "transformer:t1") <= 5.0 + 1e-3
    assert net(result, devices, "feeder:f1") <= 15.0 + 1e-3
    assert net(result, devices, "substation:s1") == pytest.approx(40.0, abs=1e-3)
    assert result.shortfall_kw["d"] == 0.0
    # What holds back a battery of f1 that could give more is f1's envelope, and it says so.
    held = [a for a in result.allocations["d"] if a.device_id[0] in "ab"]
    assert sum(a.commanded_kw for a in held) == pytest.approx(15.0, abs=1e-3)
    assert all("env-f1" in a.limited_by for a in held if a.commanded_kw < 5.0 - 1e-3)


def test_reserve_and_ratings_hold_and_an_impossible_request_reports_its_shortfall() -> None:
    # Asked to discharge 100 kW for an hour; each battery can give at most its rating or the
    # energy above its reserve spread over the hour, whichever is less.
    devices = [
        battery("full", kw=5.0, kwh=50.0, reserve=20.0),  # 30 kWh above reserve: its 5 kW rating
        battery("low", kw=5.0, kwh=10.0, reserve=20.0),  # 2.5 kWh above reserve: 2.5 kW
        battery("empty", kw=5.0, kwh=10.0, reserve=50.0),  # at its reserve: nothing
    ]
    socs = {"full": 80.0, "low": 45.0, "empty": 50.0}
    registry = Registry(devices)
    states: dict[str, DeviceState | None] = {d: state(d, soc) for d, soc in socs.items()}
    result = plan(NOW, registry, states, [ActiveCommand(request(-100.0, "feeder:f1", 3600), 1)])
    given = {a.device_id: a.commanded_kw for a in result.allocations["d"]}
    for device in devices:
        room = headroom(device, states[device.device_id], 3540.0)
        assert -given[device.device_id] <= room.discharge_kw + 1e-4  # rounded to 0.1 W
    assert given["full"] == pytest.approx(-5.0)
    assert given["low"] == pytest.approx(-2.5, abs=0.05)
    assert given["empty"] == 0.0
    assert result.shortfall_kw["d"] == pytest.approx(100.0 + sum(given.values()), abs=1e-3)
    assert result.shortfall_kw["d"] > 92.0


def test_the_device_called_least_lately_is_called_first() -> None:
    devices = [battery("x"), battery("y")]
    states: dict[str, DeviceState | None] = {"x": state("x"), "y": state("y")}
    for rested in ("x", "y"):
        registry = Registry(devices)
        registry.add_called("y" if rested == "x" else "x", 3 * 3600.0)
        result = plan(NOW, registry, states, [ActiveCommand(request(-4.0, "feeder:f1"), 1)])
        given = {a.device_id: a.commanded_kw for a in result.allocations["d"]}
        assert given[rested] == pytest.approx(-4.0)
        assert given["y" if rested == "x" else "x"] == 0.0


def test_stored_energy_is_called_before_comfort_and_the_baseline_planner_is_kept() -> None:
    # A battery and a PV inverter that can both shed 4 kW; 4 kW asked: the optimiser takes the
    # battery (no energy lost), the proportional planner half from each.
    devices = [battery("bat"), battery("pv", der_class=DerClass.PV)]
    registry = Registry(devices)
    states: dict[str, DeviceState | None] = {"bat": state("bat"), "pv": state("pv")}
    active = [ActiveCommand(request(-4.0, "feeder:f1"), 1)]
    optimised = plan(NOW, registry, states, active).allocations["d"]
    best = {a.device_id: a.commanded_kw for a in optimised}
    assert best == {"bat": pytest.approx(-4.0), "pv": 0.0}
    even = plan(NOW, registry, states, active, allocator="proportional").allocations["d"]
    assert {a.device_id: a.commanded_kw for a in even} == {"bat": -2.0, "pv": -2.0}


def test_batteries_first_then_thermal_loads_in_turns_for_the_rest() -> None:
    # A 2 kW battery and four houses each drawing 1.5 kW, asked to shed 5 kW: the battery gives
    # all it can, two houses are held off for the remaining 3 kW, and the same two stay held
    # in the next period (their turn goes on).
    devices = [battery("bat", kw=2.0)] + [
        battery(f"h{i}", kw=3.0, reserve=0.0, der_class=DerClass.THERMOSTAT) for i in range(4)
    ]
    registry = Registry(devices)
    states: dict[str, DeviceState | None] = {d.device_id: state(d.device_id) for d in devices}
    baselines = {f"h{i}": 1.5 for i in range(4)}
    active = [ActiveCommand(request(-5.0, "feeder:f1"), 1)]
    first = plan(NOW, registry, states, active, baselines)
    later = plan(NOW + timedelta(seconds=30), registry, states, active, baselines, previous=first)
    for result in (first, later):
        given = {a.device_id: a.commanded_kw for a in result.allocations["d"]}
        assert given["bat"] == pytest.approx(-2.0)
        assert sorted(v for d, v in given.items() if d != "bat") == [-1.5, -1.5, 0.0, 0.0]
        assert result.shortfall_kw["d"] == 0.0
    assert set(first.held_since) == set(later.held_since)
    assert len(first.held_since) == 2


def test_a_shed_is_placed_first_where_it_also_holds_an_envelope() -> None:
    # Feeder f1 carries a 20 kW site and may import 15 kW; a 10 kW shed is asked of the
    # substation, whose batteries on f1 and f2 are alike. Placed on f1 first, the shed brings
    # f1 under its limit: the request is met exactly and no battery has to be called on top of
    # it for the envelope.
    devices = [battery(f"{f}{i}", f) for f in ("f1", "f2") for i in range(3)]
    site = battery("site", "f1", der_class=DerClass.CI_SITE, kw=50.0)
    registry = Registry([*devices, site])
    states: dict[str, DeviceState | None] = {d.device_id: state(d.device_id) for d in devices}
    states["site"] = DeviceState(
        device_id="site", timestamp=NOW, power_kw=20.0, soc_pct=None, source="test"
    )
    active = [
        ActiveCommand(request(-10.0), 1),
        ActiveCommand(envelope("cap-f1", "feeder:f1", 15.0), 2),
    ]
    result = plan(NOW, registry, states, active)
    assert 20.0 + net(result, devices, "feeder:f1") <= 15.0 + 1e-3
    assert net(result, devices, "substation:s1") == pytest.approx(-10.0, abs=1e-3)
    assert all(sp.provenance[0].kind == "dispatch" for sp in result.setpoints.values())


def test_a_battery_that_delivers_half_its_command_is_called_last() -> None:
    # Two alike batteries share a 4 kW shed; one of them (an OEM's, say) only ever gives half
    # of what it is told. Once its readings have shown it, the other carries the request and
    # the plan counts the weak one for what it gives, so the shortfall stays honest.
    devices = [battery("weak"), battery("good")]
    registry = Registry(devices)
    active = [ActiveCommand(request(-4.0, "feeder:f1"), 1)]
    result: dispatch.Plan | None = None
    for period in range(8):
        now = NOW + timedelta(seconds=30 * period)
        states: dict[str, DeviceState | None] = {}
        for d in devices:
            told = 0.0
            if result is not None:
                told = result.setpoints[d.device_id].power_kw or 0.0
            gives = told / 2 if d.device_id == "weak" else told
            states[d.device_id] = DeviceState(
                device_id=d.device_id, timestamp=now, power_kw=gives, soc_pct=50.0, source="t"
            )
        result = plan(now, registry, states, active, previous=result)
    assert result is not None
    given = {a.device_id: a.commanded_kw for a in result.allocations["d"]}
    assert given["good"] == pytest.approx(-4.0)
    assert given["weak"] == 0.0
    assert result.shortfall_kw["d"] == 0.0
    assert dispatch.response_factor(result.response["weak"]) < 0.9


def test_the_allocator_is_chosen_in_config_and_a_bad_name_is_refused() -> None:
    assert CoreConfig().dispatch.allocator == "lp"
    chosen = CoreConfig.model_validate({"dispatch": {"allocator": "proportional"}})
    assert chosen.dispatch.allocator == "proportional"
    with pytest.raises(ValidationError, match="allocator"):
        CoreConfig.model_validate({"dispatch": {"allocator": "simplex"}})


def test_unusable_headroom_is_no_headroom() -> None:
    # A NaN or negative cap (a device reporting nonsense) gives nothing and breaks nothing.
    odd = allocation.solve(
        allocation.Problem(3.0, np.array([np.nan, -2.0, 2.0]), np.array([1.0, 1.0, 1.0]))
    )
    assert odd.kw.tolist() == pytest.approx([0.0, 0.0, 2.0])
    assert odd.shortfall_kw == pytest.approx(1.0)


def test_a_battery_barred_by_one_early_reading_is_asked_again() -> None:
    # A battery newly in a dispatch is read once before its setpoint reached it (0 kW): its
    # record drops, and the other battery, which can carry the request, takes it all. Given
    # nothing, it could never show it delivers: its record drifts back, and it shares again.
    devices = [battery("late"), battery("first")]
    registry = Registry(devices)
    active = [ActiveCommand(request(-4.0, "feeder:f1"), 1)]
    result: dispatch.Plan | None = None
    shares: list[float] = []
    for period in range(60):
        now = NOW + timedelta(seconds=30 * period)
        states: dict[str, DeviceState | None] = {}
        for d in devices:
            told = 0.0
            if result is not None:
                told = result.setpoints[d.device_id].power_kw or 0.0
            gives = 0.0 if d.device_id == "late" and period == 1 else told  # the early reading
            states[d.device_id] = DeviceState(
                device_id=d.device_id, timestamp=now, power_kw=gives, soc_pct=50.0, source="t"
            )
        result = plan(now, registry, states, active, previous=result)
        given = {a.device_id: a.commanded_kw for a in result.allocations["d"]}
        shares.append(given.get("late", 0.0))
    assert max(shares[2:6]) > -1.0  # it was barred for a while ...
    assert shares[-1] == pytest.approx(-2.0)  # ... and shares again
