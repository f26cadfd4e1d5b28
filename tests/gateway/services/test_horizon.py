"""A group's schedule posed from the registry, device states and envelopes, solved, and handed
back as setpoints that name the service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from gateway.registry import Registry
from gateway.services.horizon import envelope_limits, group_problem, setpoints_at
from gateway.services.schedule import ScheduleError, group_net_kw, solve_schedule
from unified.model import (
    BatteryConstraints,
    BatteryRatings,
    DerClass,
    Device,
    DeviceState,
    EnvelopeInterval,
    EvSession,
    OperatingEnvelope,
    Target,
    TopologyLocation,
)

T0 = datetime(2026, 7, 1, 12, tzinfo=UTC)
HOUR = 3600.0


def device(device_id: str, der_class: DerClass, transformer: str, kw: float) -> Device:
    return Device(
        device_id=device_id,
        der_class=der_class,
        location=TopologyLocation(substation="s1", feeder="f1", transformer=transformer),
        adapter="test",
        ratings=BatteryRatings(max_charge_kw=kw, max_discharge_kw=kw, capacity_kwh=10.0),
        constraints=BatteryConstraints(reserve_soc_pct=20.0),
    )


def state(device_id: str, **kw: object) -> DeviceState:
    return DeviceState(device_id=device_id, timestamp=T0, power_kw=0.0, source="test", **kw)  # type: ignore[arg-type]


def envelope(command_id: str, target: Target, limit: float, hours: float = 3) -> OperatingEnvelope:
    return OperatingEnvelope(
        command_id=command_id,
        target=target,
        intervals=(
            EnvelopeInterval(
                start=T0, end=T0 + timedelta(hours=hours), import_limit_kw=limit
            ),
        ),
    )


@pytest.fixture
def registry() -> Registry:
    return Registry(
        [
            device("b1", DerClass.BATTERY, "t1", 5.0),
            device("ev1", DerClass.EVSE, "t1", 7.0),
            device("ev2", DerClass.EVSE, "t2", 7.0),
            device("ev3", DerClass.EVSE, "t2", 7.0),
        ]
    )


def test_a_feeder_schedule_under_a_transformer_envelope(registry: Registry) -> None:
    states = {
        "b1": state("b1", soc_pct=50.0),
        "ev1": state("ev1", ev=EvSession(energy_needed_kwh=7.0, departure=T0 + timedelta(hours=2))),
        "ev2": state("ev2", ev=EvSession(energy_needed_kwh=7.0, departure=T0 + timedelta(hours=3))),
        # No departure: nobody can promise it anything; it charges on its own.
        "ev3": state("ev3", ev=EvSession(energy_needed_kwh=7.0)),
    }
    prices = np.array([0.1, 0.4, 0.1])
    problem = group_problem(
        registry,
        "feeder:f1",
        states,
        start=T0,
        step_s=HOUR,
        prices=prices,
        envelopes=[envelope("doe-t1", Target(group_id="transformer:t1"), 6.0)],
    )
    assert sorted(b.device_id for b in problem.batteries) == ["b1"]
    assert sorted(e.device_id for e in problem.evs) == ["ev1", "ev2"]
    ev1 = next(e for e in problem.evs if e.device_id == "ev1")
    assert ev1.departure_step == 2
    plan = solve_schedule(problem)
    assert plan.shortfall_kwh == {}
    (t1,) = problem.groups
    assert group_net_kw(plan.setpoints_kw, plan.device_ids, t1).max() <= 6.0 + 1e-6
    # ev1 takes all t1 allows in the cheap first hour (6 kW) and its last kWh in the dear
    # second, when the battery sells (and buys back in the cheap last hour).
    assert plan.row("ev1").sum() == pytest.approx(7.0)
    assert plan.row("b1")[1] < 0
    setpoints = setpoints_at(plan, 0, command_id="svc-1", start=T0, step_s=HOUR, priority=1)
    assert {s.device_id for s in setpoints} == {"b1", "ev1", "ev2"}
    assert all(s.command_id == "svc-1" and s.start == T0 for s in setpoints)
    assert all(s.duration_s == HOUR and s.priority == 1 for s in setpoints)


def test_envelope_limits_take_the_tightest_interval_overlapping_a_step() -> None:
    env = OperatingEnvelope(
        command_id="doe",
        target=Target(group_id="feeder:f1"),
        intervals=(
            EnvelopeInterval(start=T0, end=T0 + timedelta(minutes=90), import_limit_kw=10.0),
            EnvelopeInterval(
                start=T0 + timedelta(minutes=90),
                end=T0 + timedelta(hours=2),
                import_limit_kw=4.0,
                export_limit_kw=1.0,
            ),
        ),
    )
    imp, exp = envelope_limits(env, T0, HOUR, 3)
    np.testing.assert_array_equal(imp, [10.0, 4.0, np.inf])
    np.testing.assert_array_equal(exp, [np.inf, 1.0, np.inf])


def test_unpriced_steps_and_unknown_groups_are_refused(registry: Registry) -> None:
    with pytest.raises(ScheduleError, match="no price"):
        group_problem(registry, "feeder:f1", {}, start=T0, step_s=HOUR, prices=np.array([np.nan]))
    with pytest.raises(ScheduleError, match="unknown group"):
        group_problem(registry, "feeder:nope", {}, start=T0, step_s=HOUR, prices=np.array([0.1]))
