"""The planner: allocation, device constraints, priorities and envelopes (pure, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.dispatch import ENVELOPE_MARGIN, ActiveCommand, Plan, Release, headroom, plan, share
from gateway.registry import Registry
from unified.model import (
    BatteryConstraints,
    BatteryRatings,
    DerClass,
    Device,
    DeviceSetpoint,
    DeviceState,
    Dispatch,
    DispatchMode,
    EnvelopeInterval,
    EvSession,
    OperatingEnvelope,
    Target,
    TopologyLocation,
)

NOW = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)


def battery(
    i: int, feeder: str = "f1", kw: float = 5.0, kwh: float = 10.0, reserve: float = 20.0
) -> Device:
    return Device(
        device_id=f"b{i}",
        der_class=DerClass.BATTERY,
        adapter="sunspec_battery",
        location=TopologyLocation(substation="s1", feeder=feeder),
        ratings=BatteryRatings(max_charge_kw=kw, max_discharge_kw=kw, capacity_kwh=kwh),
        constraints=BatteryConstraints(reserve_soc_pct=reserve),
    )


def state(device_id: str, soc: float = 60.0, power: float = 0.0) -> DeviceState:
    return DeviceState(
        device_id=device_id, timestamp=NOW, power_kw=power, soc_pct=soc, source="test"
    )


def dispatch(
    kw: float,
    group: str = "feeder:f1",
    *,
    cid: str = "d1",
    duration: float = 600,
    priority: int = 0,
    program: str = "p",
    ramp: float = 0,
    start: datetime = NOW,
) -> Dispatch:
    return Dispatch(
        command_id=cid,
        target=Target(group_id=group),
        kw=kw,
        start=start,
        duration_s=duration,
        priority=priority,
        program=program,
        ramp_s=ramp,
    )


def test_share_is_proportional_and_capped() -> None:
    assert share(-6.0, {"a": 4.0, "b": 2.0}) == {"a": -4.0, "b": -2.0}
    assert share(-3.0, {"a": 4.0, "b": 2.0}) == {"a": -2.0, "b": -1.0}
    assert share(-100.0, {"a": 4.0, "b": 2.0}) == {"a": -4.0, "b": -2.0}
    assert share(5.0, {"a": 0.0}) == {"a": 0.0}


def test_group_target_shared_in_proportion_to_available_power() -> None:
    reg = Registry([battery(1, kw=5), battery(2, kw=10)])
    states = {"b1": state("b1"), "b2": state("b2")}
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-6.0, duration=60), 1)])
    assert p.setpoints["b1"].power_kw == pytest.approx(-2.0)
    assert p.setpoints["b2"].power_kw == pytest.approx(-4.0)
    assert p.shortfall_kw["d1"] == 0
    assert p.setpoints["b1"].provenance[0].command_id == "d1"


def test_reserve_soc_is_never_crossed() -> None:
    # b1 sits at its reserve: it must get nothing; b2 has energy for the whole hour.
    reg = Registry([battery(1, reserve=30), battery(2)])
    states = {"b1": state("b1", soc=30.0), "b2": state("b2", soc=80.0)}
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-8.0, duration=3600), 1)])
    assert p.setpoints["b1"].power_kw == 0
    # b2: 6 kWh above reserve over one hour → at most 5 kW (its rating)
    assert p.setpoints["b2"].power_kw == pytest.approx(-5.0)
    assert p.shortfall_kw["d1"] == pytest.approx(3.0)
    allocs = {a.device_id: a for a in p.allocations["d1"]}
    assert "reserve_soc" in allocs["b1"].limited_by


def test_energy_limits_sustained_power_over_long_events() -> None:
    # 10 kWh battery at 50 % with a 20 % reserve holds 3 kWh: over 3 h that is 1 kW sustained.
    reg = Registry([battery(1)])
    p = plan(
        NOW, reg, {"b1": state("b1", soc=50)}, [ActiveCommand(dispatch(-5.0, duration=3 * 3600), 1)]
    )
    assert p.setpoints["b1"].power_kw == pytest.approx(-1.0)


def test_charge_respects_max_soc() -> None:
    dev = battery(1).model_copy(
        update={"constraints": BatteryConstraints(reserve_soc_pct=10, max_soc_pct=90)}
    )
    p = plan(
        NOW,
        Registry([dev]),
        {"b1": state("b1", soc=90)},
        [ActiveCommand(dispatch(4.0, duration=60), 1)],
    )
    assert p.setpoints["b1"].power_kw == 0


def test_unavailable_devices_get_nothing_and_others_take_their_share() -> None:
    reg = Registry([battery(1), battery(2), battery(3)])
    states = {"b1": state("b1"), "b2": None, "b3": state("b3")}
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-6.0, duration=60), 1)])
    assert "b2" not in p.setpoints
    assert p.setpoints["b1"].power_kw == pytest.approx(-3.0)
    assert p.setpoints["b3"].power_kw == pytest.approx(-3.0)


def test_envelope_clips_dispatch_and_wins() -> None:
    reg = Registry([battery(1), battery(2)])
    states = {"b1": state("b1"), "b2": state("b2")}
    env = OperatingEnvelope(
        command_id="e1",
        target=Target(group_id="feeder:f1"),
        intervals=(
            EnvelopeInterval(
                start=NOW - timedelta(minutes=5), end=NOW + timedelta(hours=1), export_limit_kw=3.0
            ),
        ),
    )
    p = plan(
        NOW,
        reg,
        states,
        [ActiveCommand(dispatch(-8.0, duration=60, priority=1000), 1), ActiveCommand(env, 2)],
    )
    total = sum(sp.power_kw or 0 for sp in p.setpoints.values())
    assert total == pytest.approx(-3.0)
    for alloc in p.allocations["d1"]:
        assert "e1" in alloc.limited_by
        assert alloc.requested_kw == pytest.approx(-4.0)
    assert any(src.command_id == "e1" for src in p.setpoints["b1"].provenance)


def test_envelope_gives_autonomous_devices_standing_limits() -> None:
    # No dispatch: two batteries run on their own (self-consumption). The envelope becomes a
    # standing export limit on each, shared by rating, whatever they happen to measure now:
    # the same plan whether they export 4 kW each or nothing.
    reg = Registry([battery(1, kw=5), battery(2, kw=10)])
    env = OperatingEnvelope(
        command_id="e1",
        target=Target(device_ids=("b1", "b2")),
        intervals=(EnvelopeInterval(start=NOW, end=NOW + timedelta(hours=1), export_limit_kw=3.0),),
    )
    for power in (-4.0, 0.0):
        states = {"b1": state("b1", power=power), "b2": state("b2", power=power)}
        p = plan(NOW, reg, states, [ActiveCommand(env, 1)])
        assert p.setpoints["b1"].power_kw is None
        assert p.setpoints["b1"].export_limit_kw == pytest.approx(1.0)
        assert p.setpoints["b2"].export_limit_kw == pytest.approx(2.0)
        assert p.setpoints["b2"].import_limit_kw is None
        assert p.setpoints["b1"].provenance[0].command_id == "e1"


def test_autonomous_limits_leave_room_for_dispatched_devices() -> None:
    reg = Registry([battery(1), battery(2), battery(3)])
    states = {d: state(d) for d in ("b1", "b2", "b3")}
    env = OperatingEnvelope(
        command_id="e1",
        target=Target(group_id="feeder:f1"),
        intervals=(EnvelopeInterval(start=NOW, end=NOW + timedelta(hours=1), export_limit_kw=6.0),),
    )
    # b1 is dispatched at -4 kW; b2 and b3 share the remaining 2 kW of export.
    setpoint = DeviceSetpoint(command_id="sp", device_id="b1", kw=-4.0, start=NOW, duration_s=60)
    p = plan(NOW, reg, states, [ActiveCommand(setpoint, 1), ActiveCommand(env, 2)])
    assert p.setpoints["b1"].power_kw == pytest.approx(-4.0)
    assert p.setpoints["b2"].export_limit_kw == pytest.approx(1.0)
    assert p.setpoints["b3"].export_limit_kw == pytest.approx(1.0)


def test_nested_envelopes_keep_the_tighter_limit() -> None:
    reg = Registry([battery(1), battery(2, feeder="f2")])
    states = {d: state(d) for d in ("b1", "b2")}
    wide = OperatingEnvelope(
        command_id="sub",
        target=Target(group_id="substation:s1"),
        intervals=(EnvelopeInterval(start=NOW, end=NOW + timedelta(hours=1), export_limit_kw=8),),
    )
    narrow = OperatingEnvelope(
        command_id="f1",
        target=Target(group_id="feeder:f1"),
        intervals=(EnvelopeInterval(start=NOW, end=NOW + timedelta(hours=1), export_limit_kw=1),),
    )
    p = plan(NOW, reg, states, [ActiveCommand(wide, 1), ActiveCommand(narrow, 2)])
    assert p.setpoints["b1"].export_limit_kw == pytest.approx(1.0)
    assert p.setpoints["b2"].export_limit_kw == pytest.approx(4.0)
    assert {s.command_id for s in p.setpoints["b1"].provenance} == {"sub", "f1"}


def test_import_envelope_clips_charging() -> None:
    reg = Registry([battery(1), battery(2)])
    states = {"b1": state("b1", soc=40), "b2": state("b2", soc=40)}
    env = OperatingEnvelope(
        command_id="e1",
        target=Target(group_id="feeder:f1"),
        intervals=(EnvelopeInterval(start=NOW, end=NOW + timedelta(hours=1), import_limit_kw=1.0),),
    )
    p = plan(
        NOW, reg, states, [ActiveCommand(dispatch(6.0, duration=60), 1), ActiveCommand(env, 2)]
    )
    assert sum(sp.power_kw or 0 for sp in p.setpoints.values()) == pytest.approx(1.0)


def test_envelope_outside_its_intervals_does_nothing() -> None:
    reg = Registry([battery(1)])
    env = OperatingEnvelope(
        command_id="e1",
        target=Target(group_id="feeder:f1"),
        intervals=(
            EnvelopeInterval(
                start=NOW + timedelta(hours=1), end=NOW + timedelta(hours=2), export_limit_kw=0.0
            ),
        ),
    )
    p = plan(
        NOW,
        reg,
        {"b1": state("b1")},
        [ActiveCommand(dispatch(-4.0, duration=60), 1), ActiveCommand(env, 2)],
    )
    assert p.setpoints["b1"].power_kw == pytest.approx(-4.0)


def test_higher_priority_holds_the_device_and_conflict_is_reported() -> None:
    reg = Registry([battery(1)])
    low = dispatch(-2.0, cid="low", priority=1, program="a", duration=60)
    high = DeviceSetpoint(
        command_id="high", device_id="b1", kw=3.0, start=NOW, duration_s=60, priority=5, program="b"
    )
    p = plan(NOW, reg, {"b1": state("b1")}, [ActiveCommand(low, 1), ActiveCommand(high, 2)])
    assert p.setpoints["b1"].power_kw == pytest.approx(3.0)
    assert p.conflicts["low"] == ["high"]
    assert p.shortfall_kw["low"] == pytest.approx(2.0)


def test_ramp_scales_the_target_linearly() -> None:
    reg = Registry([battery(1, kw=10)])
    cmd = dispatch(-8.0, duration=60, ramp=10, start=NOW - timedelta(seconds=5))
    p = plan(NOW, reg, {"b1": state("b1")}, [ActiveCommand(cmd, 1)])
    assert p.setpoints["b1"].power_kw == pytest.approx(-4.0)


def test_excluded_device_is_allocated_around() -> None:
    reg = Registry([battery(1), battery(2)])
    states = {"b1": state("b1"), "b2": state("b2")}
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-6.0, duration=60), 1, frozenset({"b1"}))])
    assert "b1" not in p.setpoints
    assert p.setpoints["b2"].power_kw == pytest.approx(-5.0)
    assert p.shortfall_kw["d1"] == pytest.approx(1.0)


def test_headroom_without_soc_commits_nothing() -> None:
    dev = battery(1)
    no_soc = DeviceState(device_id="b1", timestamp=NOW, power_kw=0.0, source="t")
    room = headroom(dev, no_soc, 60)
    assert (room.discharge_kw, room.charge_kw) == (0.0, 0.0)


def test_regrouping_moves_a_device_between_active_commands() -> None:
    # Field switching moves b2 from feeder f1 to f2 mid-event: the next plan follows it without
    # touching either command.
    reg = Registry([battery(1), battery(2), battery(3, feeder="f2")])
    states = {d: state(d) for d in ("b1", "b2", "b3")}
    active = [
        ActiveCommand(dispatch(-4.0, "feeder:f1", cid="f1", duration=60), 1),
        ActiveCommand(dispatch(-2.0, "feeder:f2", cid="f2", duration=60), 2),
    ]
    before = plan(NOW, reg, states, active)
    assert {a.device_id for a in before.allocations["f1"]} == {"b1", "b2"}
    reg.relocate("b2", TopologyLocation(substation="s1", feeder="f2"))
    after = plan(NOW, reg, states, active)
    assert {a.device_id for a in after.allocations["f1"]} == {"b1"}
    assert {a.device_id for a in after.allocations["f2"]} == {"b2", "b3"}
    assert after.setpoints["b1"].power_kw == pytest.approx(-4.0)
    assert after.setpoints["b2"].power_kw == pytest.approx(-1.0)


def thermostat(i: int, feeder: str = "f1", kw: float = 3.0) -> Device:
    return Device(
        device_id=f"t{i}",
        der_class=DerClass.THERMOSTAT,
        adapter="mqtt_thermostat",
        location=TopologyLocation(substation="s1", feeder=feeder),
        ratings=BatteryRatings(max_charge_kw=kw, max_discharge_kw=kw, capacity_kwh=kw),
        constraints=BatteryConstraints(reserve_soc_pct=0.0),
    )


def target(kw: float, group: str = "feeder:f1", *, cid: str = "t1", ramp: float = 0) -> Dispatch:
    return dispatch(kw, group, cid=cid, ramp=ramp).model_copy(update={"mode": DispatchMode.TARGET})


def _net_after(p: Plan, reg: Registry, measured: dict[str, float], base: dict[str, float]) -> float:
    """The group's net power once every device does what the plan says."""
    net = 0.0
    for device in reg.members("feeder:f1"):
        did = device.device_id
        sp = p.setpoints.get(did)
        if sp is None or sp.power_kw is None:
            net += measured[did]
        elif device.der_class is DerClass.THERMOSTAT:
            net += base[did] + sp.power_kw
        else:
            net += sp.power_kw
    return net


def test_target_mode_plans_the_change_from_the_baseline_to_the_target() -> None:
    """Worked example: 3 thermostats at a 3 kW baseline, an idle battery and 2 kW of load the
    gateway does not control; a target of 5 kW is a change of 5 - 11 = -6 kW."""
    uncontrolled = Device(
        device_id="site",
        der_class=DerClass.CI_SITE,
        adapter="sunspec_battery",
        location=TopologyLocation(substation="s1", feeder="f1"),
        ratings=BatteryRatings(max_charge_kw=10, max_discharge_kw=10, capacity_kwh=10),
    )
    reg = Registry([thermostat(1), thermostat(2), thermostat(3), battery(1), uncontrolled])
    base = {"t1": 3.0, "t2": 3.0, "t3": 3.0, "b1": 0.0}
    measured = {**base, "site": 2.0}
    states = {d: state(d, soc=60.0, power=kw) for d, kw in measured.items()}
    states["site"] = DeviceState(device_id="site", timestamp=NOW, power_kw=2.0, source="test")

    p = plan(NOW, reg, states, [ActiveCommand(target(5.0), 1)], base)
    assert p.baseline_kw["t1"] == pytest.approx(11.0)
    assert p.requested_kw["t1"] == pytest.approx(-6.0)
    assert sum(a.commanded_kw for a in p.allocations["t1"]) == pytest.approx(-6.0)
    assert _net_after(p, reg, measured, base) == pytest.approx(5.0, abs=1e-3)
    assert p.shortfall_kw["t1"] == pytest.approx(0.0)

    # The load nobody controls rises by 3 kW: the target follows it, a delta would not.
    states["site"] = states["site"].model_copy(update={"power_kw": 5.0})
    measured["site"] = 5.0
    p = plan(NOW, reg, states, [ActiveCommand(target(5.0), 1)], base)
    assert p.requested_kw["t1"] == pytest.approx(-9.0)
    assert _net_after(p, reg, measured, base) == pytest.approx(5.0, abs=1e-3)


def test_target_above_the_baseline_charges_and_a_ramp_starts_from_the_baseline() -> None:
    reg = Registry([battery(1), battery(2)])
    states = {"b1": state("b1", soc=50.0), "b2": state("b2", soc=50.0)}
    p = plan(NOW, reg, states, [ActiveCommand(target(4.0), 1)])
    assert sum(a.commanded_kw for a in p.allocations["t1"]) == pytest.approx(4.0)  # charge
    ramped = target(4.0, ramp=600).model_copy(update={"start": NOW - timedelta(seconds=150)})
    p = plan(NOW, reg, states, [ActiveCommand(ramped, 1)])
    assert sum(a.commanded_kw for a in p.allocations["t1"]) == pytest.approx(1.0)


def ev_charger(i: int, kw: float = 7.0) -> Device:
    return Device(
        device_id=f"e{i}",
        der_class=DerClass.EVSE,
        adapter="ocpp_charger",
        location=TopologyLocation(substation="s1", feeder="f1"),
        ratings=BatteryRatings(max_charge_kw=kw, max_discharge_kw=0.001, capacity_kwh=60.0),
        constraints=BatteryConstraints(reserve_soc_pct=0.0, max_soc_pct=100.0),
    )


def ev_state(device_id: str, need_kwh: float | None, *, soc: float | None = None) -> DeviceState:
    return DeviceState(
        device_id=device_id,
        timestamp=NOW,
        power_kw=0.0,
        soc_pct=soc,
        max_charge_kw=7.0,
        max_discharge_kw=0.0,
        ev=EvSession(energy_needed_kwh=need_kwh, departure=NOW + timedelta(hours=3)),
        source="test",
    )


def test_ev_charger_takes_at_most_its_need_and_never_exports() -> None:
    reg = Registry([ev_charger(1), ev_charger(2)])
    # e1 wants 2 kWh: over a one-hour load-up that is 2 kW, whatever its rating or reported SoC.
    states = {"e1": ev_state("e1", 2.0, soc=10.0), "e2": ev_state("e2", 30.0)}
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(+12.0, duration=3600), 1)])
    assert p.setpoints["e1"].power_kw == pytest.approx(2.0)
    assert p.setpoints["e2"].power_kw == pytest.approx(7.0)
    allocs = {a.device_id: a for a in p.allocations["d1"]}
    assert "ev_energy_need" in allocs["e1"].limited_by
    # A shed never asks an EV to export.
    shed = plan(NOW, reg, states, [ActiveCommand(dispatch(-5.0, duration=3600), 1)])
    assert all((sp.power_kw or 0.0) >= 0.0 for sp in shed.setpoints.values())
    assert shed.shortfall_kw["d1"] == pytest.approx(5.0)


def test_ev_charger_whose_need_is_unknown_is_left_alone() -> None:
    # A battery-like SoC on an EV charger is not a need: nothing is committed to it.
    reg = Registry([ev_charger(1)])
    states = {"e1": ev_state("e1", None, soc=50.0)}
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(+5.0, duration=3600), 1)])
    assert "e1" not in p.setpoints
    assert p.shortfall_kw["d1"] == pytest.approx(5.0)


def import_envelope(limit: float, group: str = "feeder:f1") -> OperatingEnvelope:
    return OperatingEnvelope(
        command_id="env",
        target=Target(group_id=group),
        intervals=(
            EnvelopeInterval(start=NOW, end=NOW + timedelta(hours=1), import_limit_kw=limit),
        ),
    )


def test_envelope_is_held_by_batteries_offsetting_other_load() -> None:
    # Four air conditioners draw 10 kW; the feeder may import 7 kW. The idle battery discharges
    # the 3 kW difference; the houses are left alone (no compressor forced off).
    reg = Registry([thermostat(i) for i in range(4)] + [battery(1)])
    states = {f"t{i}": state(f"t{i}", soc=80.0, power=2.5) for i in range(4)}
    states["b1"] = state("b1", soc=60.0)
    p = plan(NOW, reg, states, [ActiveCommand(import_envelope(7.0), 1)])
    # 3 kW, and the margin kept against measured load that switches between periods (1 %).
    margin = ENVELOPE_MARGIN * 10.0
    assert p.setpoints["b1"].power_kw == pytest.approx(-3.0 - margin)
    assert p.setpoints["b1"].provenance[0].command_id == "env"
    assert all(f"t{i}" not in p.setpoints for i in range(4))
    # The net power the plan leads to is inside the limit: 10 kW of load, 3.1 kW discharged.
    assert 10.0 + (p.setpoints["b1"].power_kw or 0.0) == pytest.approx(7.0 - margin)


def test_envelope_sheds_thermal_load_only_beyond_what_batteries_can_give() -> None:
    # The battery holds 2 kWh above its reserve: 2 kW for the hour. The last 1 kW is shed by
    # the thermostats, shared among them, as a change from their baseline.
    reg = Registry([thermostat(i) for i in range(4)] + [battery(1)])
    states = {f"t{i}": state(f"t{i}", soc=80.0, power=2.5) for i in range(4)}
    states["b1"] = state("b1", soc=40.0)
    baselines = {f"t{i}": 2.5 for i in range(4)}
    p = plan(NOW, reg, states, [ActiveCommand(import_envelope(7.0), 1)], baselines)
    assert p.setpoints["b1"].power_kw == pytest.approx(-2.0)
    sheds = [p.setpoints[f"t{i}"].power_kw or 0.0 for i in range(4)]
    assert sum(sheds) == pytest.approx(-1.0 - ENVELOPE_MARGIN * 10.0)
    assert all(s < 0 for s in sheds)


def test_envelope_pushes_a_discharging_dispatch_further_but_never_past_headroom() -> None:
    # b1 discharges 1 kW for a dispatch; the feeder's other load leaves it 4 kW over the limit:
    # b1 goes to its 5 kW rating (envelope wins), which is 4 kW further, and no further.
    reg = Registry([thermostat(i) for i in range(4)] + [battery(1)])
    states = {f"t{i}": state(f"t{i}", soc=0.0, power=2.75) for i in range(4)}
    states["b1"] = state("b1", soc=90.0)
    p = plan(
        NOW,
        reg,
        states,
        [ActiveCommand(dispatch(-1.0, duration=600), 1), ActiveCommand(import_envelope(6.0), 2)],
    )
    assert p.setpoints["b1"].power_kw == pytest.approx(-5.0)
    assert {s.command_id for s in p.setpoints["b1"].provenance} >= {"d1", "env"}


def test_an_ended_dispatchs_houses_are_released_as_the_rebound_leaves_room() -> None:
    reg = Registry([thermostat(i) for i in range(4)])
    held = {f"t{i}": state(f"t{i}", power=0.0) for i in range(4)}
    previous = Plan(
        releasing={
            f"t{i}": Release("d1", -1.0, NOW + timedelta(minutes=10 * (i + 1))) for i in range(4)
        }
    )
    later = NOW + timedelta(minutes=5)

    def after(allowance: dict[str, float] | None) -> Plan:
        return plan(
            later, reg, held, [], previous=previous, release_s=3600, release_allowance=allowance
        )

    # No governor: the schedule alone (nobody is due yet).
    assert set(after(None).releasing) == {"t0", "t1", "t2", "t3"}
    # Room for two houses going from off to their full 3 kW: the first two in order go.
    paced = after({"d1": 6.5})
    assert set(paced.releasing) == {"t2", "t3"}
    assert paced.released == {"t0": ("d1", 3.0), "t1": ("d1", 3.0)}
    assert "t0" not in paced.setpoints
    # No room (the group is already above its rebound limit): all stay held.
    assert set(after({"d1": -10.0}).releasing) == {"t0", "t1", "t2", "t3"}
    # The schedule is the floor: one whose time has come goes whatever the room.
    floor = plan(
        NOW + timedelta(minutes=15),
        reg,
        held,
        [],
        previous=previous,
        release_s=3600,
        release_allowance={"d1": -10.0},
    )
    assert set(floor.releasing) == {"t1", "t2", "t3"}
    assert floor.released == {"t0": ("d1", 3.0)}


def pv(i: int, kw: float = 6.0) -> Device:
    return Device(
        device_id=f"pv{i}",
        der_class=DerClass.PV,
        adapter="sunspec_pv",
        location=TopologyLocation(substation="s1", feeder="f1"),
        # A PV inverter's charge rating and capacity mean nothing; the planner ignores them.
        ratings=BatteryRatings(max_charge_kw=kw, max_discharge_kw=kw, capacity_kwh=1.0),
    )


def test_pv_is_curtailable_generation_only() -> None:
    # Import and export limits over a battery and a PV inverter: the PV takes a share of the
    # export limit (its curtailment) but none of the import limit, which the battery keeps whole.
    reg = Registry([battery(1, kw=5), pv(1, kw=5)])
    states = {
        "b1": state("b1"),
        "pv1": DeviceState(device_id="pv1", timestamp=NOW, power_kw=-4.0, source="t"),
    }
    env = OperatingEnvelope(
        command_id="e1",
        target=Target(group_id="feeder:f1"),
        intervals=(
            EnvelopeInterval(
                start=NOW, end=NOW + timedelta(hours=1), export_limit_kw=4.0, import_limit_kw=3.0
            ),
        ),
    )
    p = plan(NOW, reg, states, [ActiveCommand(env, 1)])
    assert p.setpoints["pv1"].power_kw is None
    assert p.setpoints["pv1"].export_limit_kw == pytest.approx(2.0)
    assert p.setpoints["pv1"].import_limit_kw is None
    assert p.setpoints["b1"].import_limit_kw == pytest.approx(3.0)
    # A charging dispatch never lands on the PV inverter.
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(3.0), 1)])
    assert "pv1" not in p.setpoints or p.setpoints["pv1"].power_kw is None


def test_a_program_with_an_eligibility_rule_dispatches_only_its_eligible_devices() -> None:
    reg = Registry([battery(1), battery(2)])
    reg.set_eligible({"vpp": frozenset({"b2"})})
    states = {"b1": state("b1"), "b2": state("b2")}
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-4.0, program="vpp", duration=60), 1)])
    assert "b1" not in p.setpoints
    assert p.setpoints["b2"].power_kw == pytest.approx(-4.0)
    # A program without a rule still uses every device of the target.
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-4.0, program="other", duration=60), 1)])
    assert p.setpoints["b1"].power_kw == pytest.approx(-2.0)


def test_thermal_loads_called_least_lately_are_called_first() -> None:
    reg = Registry([thermostat(1), thermostat(2), thermostat(3)])
    # t1 has the most comfort headroom but was called for 5 h lately; t3 for 20 min.
    states = {
        "t1": state("t1", soc=90.0, power=3.0),
        "t2": state("t2", soc=60.0, power=3.0),
        "t3": state("t3", soc=30.0, power=3.0),
    }
    reg.add_called("t1", 5 * 3600.0)
    reg.add_called("t3", 1200.0)
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-3.0, duration=600), 1)])
    called = {a.device_id for a in p.allocations["d1"] if a.commanded_kw < 0}
    # t2 and t3 have both been called less than an hour: the headroom decides (t2).
    assert called == {"t2"}
    reg.add_called("t2", 3600.0)
    p = plan(NOW, reg, states, [ActiveCommand(dispatch(-3.0, duration=600), 1)])
    called = {a.device_id for a in p.allocations["d1"] if a.commanded_kw < 0}
    assert called == {"t3"}
