"""From the registry, device states, prices and envelopes to a schedule problem, and back to
setpoints (pure: no I/O, no clock; the caller passes ``start`` and runs the solve off the loop).

:func:`group_problem` poses a group's schedule: its plannable batteries (a fresh SoC) and EV
chargers (a plugged-in EV whose need and departure are known; one with no departure is left to
charge on its own: nobody can promise it anything), every topology group of the registry that
holds some of them (transformer, feeder section, feeder, substation: nested through their
devices) with the limits of every envelope over the horizon and its uncontrolled load, and the
prices of the group's area. :func:`setpoints_at` turns step k of a solved schedule into one
:class:`unified.model.DeviceSetpoint` per device whose ``command_id`` is the service's, so the
planner's provenance names it, and a dispatch of higher priority takes the device first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from gateway.registry import Registry
from gateway.services.schedule import (
    BatteryPlan,
    EvPlan,
    GroupLimits,
    Schedule,
    ScheduleError,
    ScheduleProblem,
)
from unified.model import DerClass, Device, DeviceSetpoint, DeviceState, OperatingEnvelope

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


def envelope_limits(
    envelope: OperatingEnvelope, start: datetime, step_s: float, steps: int
) -> tuple[FloatArray, FloatArray]:
    """Import and export limit per step (inf where none): the tightest of the intervals that
    overlap a step, so a plan honours a limit that starts or ends inside a step."""
    imp = np.full(steps, np.inf)
    exp = np.full(steps, np.inf)
    t0 = start.timestamp()
    for interval in envelope.intervals:
        a = (interval.start.timestamp() - t0) / step_s
        b = (interval.end.timestamp() - t0) / step_s
        lo, hi = max(math.floor(a), 0), min(math.ceil(b), steps)
        if lo >= hi:
            continue
        if interval.import_limit_kw is not None:
            imp[lo:hi] = np.minimum(imp[lo:hi], interval.import_limit_kw)
        if interval.export_limit_kw is not None:
            exp[lo:hi] = np.minimum(exp[lo:hi], interval.export_limit_kw)
    return imp, exp


def _battery(device: Device, state: DeviceState) -> BatteryPlan | None:
    if state.soc_pct is None:
        return None
    ratings, limits = device.ratings, device.constraints
    capacity = min(ratings.capacity_kwh, state.capacity_kwh or ratings.capacity_kwh)
    return BatteryPlan(
        device.device_id,
        capacity_kwh=capacity,
        soc_kwh=state.soc_pct / 100.0 * capacity,
        max_charge_kw=min(ratings.max_charge_kw, state.max_charge_kw or math.inf),
        max_discharge_kw=min(ratings.max_discharge_kw, state.max_discharge_kw or math.inf),
        reserve_kwh=limits.reserve_soc_pct / 100.0 * capacity,
        max_kwh=limits.max_soc_pct / 100.0 * capacity,
    )


def _ev(device: Device, state: DeviceState, start: datetime, step_s: float) -> EvPlan | None:
    ev = state.ev
    if ev is None or ev.energy_needed_kwh is None or ev.departure is None:
        return None
    departure = math.floor((ev.departure - start).total_seconds() / step_s)
    if departure <= 0:
        return None
    return EvPlan(
        device.device_id,
        max_kw=min(device.ratings.max_charge_kw, state.max_charge_kw or math.inf),
        energy_needed_kwh=ev.energy_needed_kwh,
        departure_step=departure,
    )


def group_problem(
    registry: Registry,
    group_id: str,
    states: Mapping[str, DeviceState | None],
    *,
    start: datetime,
    step_s: float,
    prices: FloatArray,
    export_prices: FloatArray | None = None,
    envelopes: Sequence[OperatingEnvelope] = (),
    baseline_kw: Mapping[str, FloatArray] | None = None,
    peak_threshold_kw: float | None = None,
    peak_price_per_kw: float = 0.0,
) -> ScheduleProblem:
    """The schedule problem of ``group_id`` (see the module docstring).

    ``prices`` (and ``export_prices``) per step must be finite: a horizon is cut by the caller
    where prices end. ``baseline_kw`` is each group's uncontrolled load forecast per step
    (default 0: the limits then bind the scheduled devices alone).
    """
    steps = len(prices)
    if not np.isfinite(np.asarray(prices, dtype=np.float64)).all():
        raise ScheduleError("a step has no price: cut the horizon where the prices end")
    if registry.group(group_id) is None:
        raise ScheduleError(f"unknown group {group_id!r}")
    bats: list[BatteryPlan] = []
    evs: list[EvPlan] = []
    for device in registry.members(group_id):
        state = states.get(device.device_id)
        if state is None:
            continue
        if device.der_class is DerClass.BATTERY:
            battery = _battery(device, state)
            if battery is not None:
                bats.append(battery)
        elif device.der_class is DerClass.EVSE:
            ev = _ev(device, state, start, step_s)
            if ev is not None:
                evs.append(ev)
    scheduled = {b.device_id for b in bats} | {e.device_id for e in evs}
    baseline_kw = baseline_kw or {}
    groups: list[GroupLimits] = []
    limited: dict[str, tuple[FloatArray, FloatArray]] = {}
    members_of: dict[str, frozenset[str]] = {}
    for envelope in envelopes:
        target = envelope.target
        if target.group_id is not None:
            key = target.group_id
            members = frozenset(d.device_id for d in registry.members(key)) & scheduled
        else:
            key = f"devices:{envelope.command_id}"
            members = frozenset(target.device_ids or ()) & scheduled
        if not members:
            continue
        imp, exp = envelope_limits(envelope, start, step_s, steps)
        held = limited.get(key)
        if held is not None:  # two envelopes on one group: both hold
            imp, exp = np.minimum(imp, held[0]), np.minimum(exp, held[1])
        limited[key] = (imp, exp)
        members_of[key] = members
    for key, (imp, exp) in limited.items():
        base = np.asarray(baseline_kw.get(key, np.zeros(steps)), dtype=np.float64)
        groups.append(
            GroupLimits(key, members_of[key], base, import_limit_kw=imp, export_limit_kw=exp)
        )
    if peak_threshold_kw is not None:
        base = np.asarray(baseline_kw.get(group_id, np.zeros(steps)), dtype=np.float64)
        groups.append(
            GroupLimits(
                f"{group_id}#peak",
                frozenset(scheduled),
                base,
                peak_threshold_kw=peak_threshold_kw,
                peak_price_per_kw=peak_price_per_kw,
            )
        )
    return ScheduleProblem(
        step_s=step_s,
        prices=np.asarray(prices, dtype=np.float64),
        export_prices=export_prices,
        batteries=bats,
        evs=evs,
        groups=groups,
    )


def setpoints_at(
    schedule: Schedule,
    step: int,
    *,
    command_id: str,
    start: datetime,
    step_s: float,
    program: str = "default",
    priority: int = 0,
) -> list[DeviceSetpoint]:
    """Step ``step`` of ``schedule`` as one setpoint per device, each for that step only."""
    at = start + timedelta(seconds=step * step_s)
    return [
        DeviceSetpoint(
            command_id=command_id,
            program=program,
            priority=priority,
            device_id=device_id,
            kw=round(float(schedule.setpoints_kw[i, step]), 3),
            start=at,
            duration_s=step_s,
        )
        for i, device_id in enumerate(schedule.device_ids)
    ]
