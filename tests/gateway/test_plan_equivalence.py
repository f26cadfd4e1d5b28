"""The planner is fast without changing what it plans: on a randomised mixed fleet over several
periods (dispatches in both directions and both modes, conflicts, refusals, envelopes on both
sides, thermal turns ending, a dispatch ending and its loads released, a device moved to another
feeder), every plan equals the reference planner's (``reference_dispatch``: the planner before it
was optimised), down to the sign of a zero, and does not depend on what the planner carried
over from its previous plan."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway import dispatch as fast
from gateway.registry import Registry
from tests.gateway import reference_dispatch as reference
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
    ScheduledCommand,
    Target,
    TopologyLocation,
)

T0 = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)
PERIOD = timedelta(seconds=60)
PERIODS = 12
FEEDERS = ("f1", "f2", "f3", "f4")


def fleet(rng: random.Random, scale: int) -> list[Device]:
    kinds = (
        (DerClass.THERMOSTAT, "t", 8 * scale),
        (DerClass.WATER_HEATER, "w", 2 * scale),
        (DerClass.BATTERY, "b", 4 * scale),
        (DerClass.EVSE, "e", scale),
        (DerClass.PV, "p", scale),
    )
    devices = []
    for der_class, prefix, count in kinds:
        for i in range(count):
            rated = rng.choice((2.5, 3.0, 3.7, 4.5, 5.0, 7.0, 10.0, 11.0))
            if der_class is DerClass.BATTERY:
                reserve = rng.choice((10.0, 20.0, 30.0))
                top = rng.choice((90.0, 100.0))
            else:
                reserve, top = 0.0, rng.choice((95.0, 100.0))
            devices.append(
                Device(
                    device_id=f"{prefix}{i}",
                    der_class=der_class,
                    adapter="sim",
                    location=TopologyLocation(substation="s1", feeder=rng.choice(FEEDERS)),
                    ratings=BatteryRatings(
                        max_charge_kw=rated,
                        max_discharge_kw=rated * rng.choice((1.0, 0.8)),
                        capacity_kwh=rated * rng.choice((1.0, 2.0, 3.0)),
                    ),
                    constraints=BatteryConstraints(reserve_soc_pct=reserve, max_soc_pct=top),
                )
            )
    rng.shuffle(devices)  # the registry's order is not the order of the ids
    return devices


def device_state(rng: random.Random, device: Device, now: datetime) -> DeviceState | None:
    if rng.random() < 0.05:
        return None
    rated = device.ratings.max_charge_kw
    cls = device.der_class
    soc: float | None
    ev = None
    if cls in (DerClass.THERMOSTAT, DerClass.WATER_HEATER):
        on = rng.random() < 0.55
        power = max(0.0, (rated if on else 0.0) + rng.gauss(0.0, 0.05))
        soc = rng.choice((100.0, 0.0, 3.0, 50.0, rng.uniform(0.0, 100.0), rng.uniform(0.0, 100.0)))
        if rng.random() < 0.03:
            soc = None  # no comfort headroom known: not plannable
    elif cls is DerClass.BATTERY:
        power = rng.uniform(-3.0, 3.0)
        soc = rng.choice((device.constraints.reserve_soc_pct, 100.0, rng.uniform(5.0, 100.0)))
    elif cls is DerClass.EVSE:
        power = rng.uniform(0.0, rated)
        soc = rng.choice((None, rng.uniform(10.0, 90.0)))
        if rng.random() < 0.8:
            ev = EvSession(energy_needed_kwh=rng.choice((None, 0.0, rng.uniform(0.0, 40.0))))
    else:  # PV: exports, no state of charge
        power, soc = -rng.uniform(0.0, rated), None
    return DeviceState(
        device_id=device.device_id,
        timestamp=now,
        power_kw=power,
        soc_pct=soc,
        capacity_kwh=rng.choice((None, None, device.ratings.capacity_kwh * 0.9)),
        max_charge_kw=rng.choice((None, rated, rated * 0.5)),
        max_discharge_kw=rng.choice((None, rated, rated * 0.5)),
        ev=ev,
        source="sim",
    )


def commands(registry: Registry, devices: Sequence[Device], sign: float) -> list[ScheduledCommand]:
    n = len(devices)
    f1 = [d.device_id for d in registry.members("feeder:f1")]
    f2 = [d.device_id for d in registry.members("feeder:f2")]
    f1_load = 1.6 * len(f1)
    return [
        Dispatch(  # ends after 7 periods: its thermal loads are released
            command_id="sub",
            target=Target(group_id="substation:s1"),
            kw=sign * 0.12 * n,
            start=T0,
            duration_s=7 * 60,
            ramp_s=90,
        ),
        Dispatch(
            command_id="tgt",
            target=Target(group_id="feeder:f2"),
            mode=DispatchMode.TARGET,
            kw=0.8 * len(f2),
            start=T0 + 2 * PERIOD,
            duration_s=600,
            priority=5,
        ),
        Dispatch(  # more than the feeder can give: a shortfall
            command_id="chg",
            target=Target(group_id="feeder:f4"),
            kw=-sign * 40.0 * n,
            start=T0 + 3 * PERIOD,
            duration_s=400,
            priority=3,
        ),
        Dispatch(  # an explicit list of devices, some of them held by others
            command_id="few",
            target=Target(device_ids=tuple(f1[:40] + f2[:10])),
            kw=sign * 30.0,
            start=T0,
            duration_s=3600,
            priority=4,
        ),
        DeviceSetpoint(
            command_id="sp", device_id=f1[-1], kw=-3.0, start=T0, duration_s=3600, priority=10
        ),
        DeviceSetpoint(
            command_id="sp2", device_id=f2[-1], kw=2.0, start=T0, duration_s=3600, priority=1
        ),
        OperatingEnvelope(
            command_id="imp",
            target=Target(group_id="feeder:f1"),
            intervals=(
                EnvelopeInterval(
                    start=T0, end=T0 + 5 * PERIOD, import_limit_kw=round(0.6 * f1_load, 1)
                ),
                EnvelopeInterval(
                    start=T0 + 5 * PERIOD,
                    end=T0 + 20 * PERIOD,
                    import_limit_kw=round(0.8 * f1_load, 1),
                    export_limit_kw=5.0,
                ),
            ),
        ),
        OperatingEnvelope(
            command_id="exp",
            target=Target(group_id="feeder:f3"),
            intervals=(EnvelopeInterval(start=T0, end=T0 + 20 * PERIOD, export_limit_kw=2.0),),
        ),
        OperatingEnvelope(
            command_id="sub-cap",
            target=Target(group_id="substation:s1"),
            intervals=(
                EnvelopeInterval(
                    start=T0 + 4 * PERIOD, end=T0 + 9 * PERIOD, import_limit_kw=0.5 * n
                ),
            ),
        ),
    ]


def canonical(plan: Any) -> dict[str, str]:
    """What the planner decides, as text: ``repr`` tells 0.0 from -0.0, ``==`` does not."""
    out = {
        name: repr(sorted(getattr(plan, name).items()))
        for name in (
            "setpoints",
            "allocations",
            "shortfall_kw",
            "conflicts",
            "envelopes",
            "requested_kw",
            "baseline_kw",
            "available_kw",
            "held_since",
            "committed_kw",
            "released",
        )
    }
    out["releasing"] = repr(
        sorted((d, (r.command_id, r.kw, r.at)) for d, r in plan.releasing.items())
    )
    return out


def without_memory(plan: fast.Plan) -> fast.Plan:
    """The same plan, without whatever the planner keeps beside it to do less work."""
    return fast.Plan(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.init})


@pytest.mark.parametrize(("seed", "scale", "sign"), [(1, 100, -1.0), (2, 120, 1.0), (3, 60, -1.0)])
def test_plans_equal_the_reference_planner(seed: int, scale: int, sign: float) -> None:
    rng = random.Random(seed)
    devices = fleet(rng, scale)
    registry = Registry(devices)
    scheduled = commands(registry, devices, sign)
    refused = frozenset(d.device_id for d in devices[: len(devices) // 50])
    ref_plan = reference.Plan()
    fast_plan = fast.Plan()
    seen: dict[str, int] = {}
    for period in range(PERIODS):
        now = T0 + period * PERIOD + timedelta(seconds=rng.choice((0.0, 0.25, 1.5)))
        if period == 5:  # field switching: a thermostat of feeder f1 is now on f3
            moved = next(d for d in registry.members("feeder:f1") if d.device_id[0] == "t")
            registry.relocate(moved.device_id, TopologyLocation(substation="s1", feeder="f3"))
        states = {d.device_id: device_state(rng, d, now) for d in registry.devices()}
        baselines = {d.device_id: rng.uniform(0.0, 4.0) for d in devices if rng.random() < 0.7}
        corrections = {
            c: rng.uniform(-20.0, 20.0) for c in ("sub", "tgt", "chg") if rng.random() < 0.8
        }
        allowance = {"sub": rng.choice((0.0, 5.0, 50.0, 500.0))} if rng.random() < 0.7 else None
        live = [
            (seq, c, refused if c.command_id == "sub" and period >= 3 else frozenset())
            for seq, c in enumerate(scheduled)
            if c.start <= now < c.end
        ]
        inputs = (now, registry, states)
        settings = (baselines, corrections)
        release = (120.0, 600.0, allowance)
        ref_active = [reference.ActiveCommand(c, seq, ex) for seq, c, ex in live]
        fast_active = [fast.ActiveCommand(c, seq, ex) for seq, c, ex in live]
        expected = reference.plan(*inputs, ref_active, *settings, ref_plan, *release)
        got = fast.plan(
            *inputs, fast_active, *settings, fast_plan, *release, allocator="proportional"
        )
        fresh = fast.plan(
            *inputs,
            fast_active,
            *settings,
            without_memory(fast_plan),
            *release,
            allocator="proportional",
        )
        assert canonical(got) == canonical(expected), f"period {period}"
        assert canonical(fresh) == canonical(expected), f"period {period}, no memory"
        ref_plan, fast_plan = expected, got
        for name in ("conflicts", "held_since", "releasing", "released", "baseline_kw"):
            seen[name] = seen.get(name, 0) + len(getattr(expected, name))
        seen["limited"] = seen.get("limited", 0) + sum(
            1 for a in expected.allocations.get("sub", ()) if a.limited_by
        )
        seen["standing"] = seen.get("standing", 0) + sum(
            1 for s in expected.setpoints.values() if s.power_kw is None
        )
    # The run went through every path the test is about.
    assert all(seen[name] > 0 for name in seen), seen
