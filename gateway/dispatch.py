"""Turn the commands active right now into one setpoint per device (pure, no I/O).

Composition order, as in DESIGN.md: dispatch targets and setpoints are allocated first (in
priority order, each device committed to at most one command), each clipped to the device's own
constraints (ratings, reserve and maximum state of charge); then every active operating envelope
scales the result so the group's net power stays inside its limits. The envelope runs last, so it
wins over every program goal. Every change a constraint makes is recorded against the device, so
an operator can see why a battery is held where it is.

Two kinds of setpoint, by device class. A battery's, an EV charger's or an inverter's setpoint is
its power (it idles at 0 kW when nobody asks); a thermostat's or a water heater's is a *change
from its own baseline* (what it would draw left alone: the MQTT adapters turn it into a comfort
offset or a shed / load-up). The two modes of a dispatch use that:

* ``delta`` (the default): the group's net power changes by ``kw`` from its baseline. The
  allocated setpoints sum to ``kw``: ``kw = -200`` sheds 200 kW, whatever the load is.
* ``target``: the group's net power becomes ``kw``. The planner estimates the group's baseline
  each control period — the measured power of every member it does not control, plus the
  baseline of each thermal device it does (``baselines``: the core learns each device's own
  power while it runs autonomously; a battery under control contributes its setpoint only) —
  and allocates the difference. Worked example: a feeder of 100 thermostats drawing 300 kW
  (baseline 3 kW each), 20 idle batteries and 40 kW of uncontrolled load; ``target`` 250 kW
  means a baseline of 300 + 40 = 340 kW, so a change of 250 - 340 = -90 kW is allocated (shed
  or discharged); ``delta`` -90 kW asks the same. When the uncontrolled load rises by 10 kW,
  the target's allocation follows (-100 kW) and the delta's does not. A ramp moves from the
  baseline to the target linearly.
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from gateway import allocation as lp
from gateway.registry import Registry
from unified.model import (
    Allocation,
    Delivery,
    DerClass,
    Device,
    DeviceCommand,
    DeviceSetpoint,
    DeviceState,
    Dispatch,
    DispatchMode,
    EnvelopeCompliance,
    LimitSource,
    OperatingEnvelope,
    ScheduledCommand,
    Target,
)

# Energy limits are spread over at least this long, so a battery a hair above its reserve is not
# allowed full power for the last control periods of an event and then overshoot the reserve.
MIN_ENERGY_HORIZON_S = 60.0
_EPS = 1e-9

SHIFTS_FROM_BASELINE: frozenset[DerClass] = frozenset({DerClass.THERMOSTAT, DerClass.WATER_HEATER})
"""Device classes whose setpoint is a change from their own baseline, not their power."""

THERMAL_MIN_HEADROOM_PCT = 5.0
"""A thermal load with less comfort (or tank) headroom than this is not called to shed."""


@dataclass(frozen=True, slots=True)
class ActiveCommand:
    command: ScheduledCommand
    seq: int
    excluded: frozenset[str] = frozenset()
    """Devices that refused this command (e.g. a Modbus exception): not allocated again."""


@dataclass(frozen=True, slots=True)
class Headroom:
    """Power a battery can deliver right now without breaking a rating or an SoC limit."""

    discharge_kw: float
    charge_kw: float
    discharge_limit: str
    charge_limit: str


def plannable(device: Device, state: DeviceState | None) -> bool:
    """Whether the planner can promise anything with this device right now.

    A stored-energy device needs a fresh SoC (nobody can promise its reserve holds without
    one); an EV charger needs a plugged-in EV whose need is known. Without either the device is
    left running on its own rather than held at zero (which would, say, pause an EV that nobody
    asked to pause).
    """
    if state is None:
        return False
    if device.der_class is DerClass.EVSE:
        return state.ev is not None and state.ev.energy_needed_kwh is not None
    return state.soc_pct is not None


def headroom(
    device: Device,
    state: DeviceState | None,
    remaining_s: float,
    baseline_kw: float | None = None,
) -> Headroom:
    """What a device can give now without breaking a rating or an energy limit.

    A thermal load (thermostat, water heater) called to shed is held off for its turn (its
    adapter keeps the setpoint ahead of the room or the tank), so what it sheds is what it would
    have drawn: its ``baseline_kw`` (its current power when unknown), while it has comfort or
    tank headroom left (more than ``THERMAL_MIN_HEADROOM_PCT``); the headroom it spends is
    bounded by its turn, not spread over the event.
    """
    if state is None or not plannable(device, state):
        return Headroom(0.0, 0.0, "unavailable", "unavailable")
    return _headroom(device, state, remaining_s, baseline_kw)


def _headroom(
    device: Device, state: DeviceState, remaining_s: float, baseline_kw: float | None
) -> Headroom:
    """:func:`headroom` of a device already known to be plannable."""
    ratings, limits = device.ratings, device.constraints
    rated_dis = min(ratings.max_discharge_kw, _or_inf(state.max_discharge_kw))
    rated_ch = min(ratings.max_charge_kw, _or_inf(state.max_charge_kw))
    hours = max(remaining_s, MIN_ENERGY_HORIZON_S) / 3600.0
    if device.der_class in SHIFTS_FROM_BASELINE and state.soc_pct is not None:
        draws = state.power_kw if baseline_kw is None else baseline_kw
        has_room = state.soc_pct > THERMAL_MIN_HEADROOM_PCT
        capacity = min(ratings.capacity_kwh, _or_inf(state.capacity_kwh))
        ch_energy = max(0.0, (limits.max_soc_pct - state.soc_pct) / 100.0 * capacity) / hours
        return Headroom(
            discharge_kw=min(rated_dis, max(0.0, draws)) if has_room else 0.0,
            charge_kw=min(rated_ch, ch_energy),
            discharge_limit="rating" if has_room else "reserve_soc",
            charge_limit="max_soc" if ch_energy < rated_ch else "rating",
        )
    if state.ev is not None and device.der_class is DerClass.EVSE:
        # An EV charger never exports, and charges at most the energy its EV still wants.
        wanted = (state.ev.energy_needed_kwh or 0.0) / hours
        return Headroom(
            discharge_kw=0.0,
            charge_kw=min(rated_ch, wanted),
            discharge_limit="rating",
            charge_limit="ev_energy_need" if wanted < rated_ch else "rating",
        )
    assert state.soc_pct is not None  # plannable
    capacity = min(ratings.capacity_kwh, _or_inf(state.capacity_kwh))
    above_reserve = max(0.0, (state.soc_pct - limits.reserve_soc_pct) / 100.0 * capacity)
    below_max = max(0.0, (limits.max_soc_pct - state.soc_pct) / 100.0 * capacity)
    dis_energy, ch_energy = above_reserve / hours, below_max / hours
    return Headroom(
        discharge_kw=min(rated_dis, dis_energy),
        charge_kw=min(rated_ch, ch_energy),
        discharge_limit="reserve_soc" if dis_energy < rated_dis else "rating",
        charge_limit="max_soc" if ch_energy < rated_ch else "rating",
    )


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def clip_to_headroom(kw: float, room: Headroom) -> tuple[float, str | None]:
    if kw < -room.discharge_kw:
        return -room.discharge_kw, room.discharge_limit
    if kw > room.charge_kw:
        return room.charge_kw, room.charge_limit
    return kw, None


def share(total_kw: float, caps: Mapping[str, float]) -> dict[str, float]:
    """Split ``total_kw`` across devices in proportion to each one's cap, never above a cap."""
    available = sum(caps.values())
    if available <= _EPS or abs(total_kw) <= _EPS:
        return dict.fromkeys(caps, 0.0)
    fraction = min(1.0, abs(total_kw) / available)
    sign = 1.0 if total_kw > 0 else -1.0
    return {dev: sign * cap * fraction for dev, cap in caps.items()}


Allocator = Literal["lp", "proportional"]
"""How a dispatch is shared among its continuously controllable devices: ``lp`` solves a linear
programme (:mod:`gateway.allocation`: costs, fairness, envelopes as hard limits), ``proportional``
shares it in proportion to each device's headroom (the planner before it, kept as a baseline)."""

CLASS_COST: Mapping[DerClass, float] = {
    DerClass.BATTERY: 1.0,
    DerClass.CI_SITE: 1.5,
    DerClass.EVSE: 2.0,
    DerClass.PV: 3.0,
    DerClass.THERMOSTAT: 4.0,
    DerClass.WATER_HEATER: 4.0,
}
"""Per kW, the order in which the optimised allocation calls classes: stored energy first (no
customer sees it), then a C&I site's contracted flexibility, an EV's charging (delayed, still
met by departure), PV curtailment (energy lost), then thermal loads (comfort, and a rebound)."""

FAIRNESS_COST_PER_HOUR = 0.25
"""Added per kW for each whole hour a device has been called lately (participation records):
those called least go first, and a device called for four more hours than another gives way
to it even across one class step."""

_Floats = npt.NDArray[np.float64]
_STORAGE, _THERMAL, _EV = 0, 1, 2
"""How :func:`_headroom` treats a device: by its stored energy, as a thermal load, as an EV."""


@dataclass(slots=True)
class _Pool:
    """A dispatch's members as its planning reads them every period: their ids, how each gives
    power and their nameplate limits, kept for as long as the registry hands back the same
    devices (it makes new ones, and a new member list, when a device is added or moved), so
    that a period reads only the states (10,000 devices: the same work every 10 s)."""

    members: list[Device]
    ids: list[str]
    kind: npt.NDArray[np.int8]
    has_ev: bool
    thermal_ids: set[str]
    rated_dis: _Floats
    rated_ch: _Floats
    capacity: _Floats
    reserve: _Floats
    max_soc: _Floats
    id_rank: npt.NDArray[np.intp]
    """Each member's place among the members' ids sorted: ties in a turn's order go by id."""
    class_cost: _Floats
    """Each member's class cost in the optimised allocation (``CLASS_COST``)."""

    @classmethod
    def of(cls, members: list[Device]) -> _Pool:
        ids = [d.device_id for d in members]
        kind = np.array(
            [
                _THERMAL
                if d.der_class in SHIFTS_FROM_BASELINE
                else _EV
                if d.der_class is DerClass.EVSE
                else _STORAGE
                for d in members
            ],
            dtype=np.int8,
        )
        rank = np.empty(len(ids), dtype=np.intp)
        rank[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
        return cls(
            members=members,
            ids=ids,
            kind=kind,
            has_ev=bool(np.any(kind == _EV)),
            # Built as the planner always built it: the thermal pool is summed in its order.
            thermal_ids={d.device_id for d in members if d.der_class in SHIFTS_FROM_BASELINE},
            rated_dis=np.array([d.ratings.max_discharge_kw for d in members], dtype=np.float64),
            rated_ch=np.array([d.ratings.max_charge_kw for d in members], dtype=np.float64),
            capacity=np.array([d.ratings.capacity_kwh for d in members], dtype=np.float64),
            reserve=np.array([d.constraints.reserve_soc_pct for d in members], dtype=np.float64),
            max_soc=np.array([d.constraints.max_soc_pct for d in members], dtype=np.float64),
            id_rank=rank,
            class_cost=np.array(
                [CLASS_COST.get(d.der_class, CLASS_COST[DerClass.BATTERY]) for d in members],
                dtype=np.float64,
            ),
        )

    def serves(self, members: list[Device]) -> bool:
        return self.members is members or (
            len(self.members) == len(members) and all(map(operator.is_, self.members, members))
        )


_Provenance = tuple[tuple[LimitSource, ...], tuple[str, ...]]


@dataclass(slots=True)
class _Memory:
    """What one plan leaves the next so that it does not build again what has not changed: each
    dispatch's :class:`_Pool`, the provenance tuples (the same objects period after period, so
    an unchanged setpoint is recognised by identity, not by comparing models) and each
    command's allocations by device. Reuse is always checked against the new values: nothing
    here can change a decision."""

    pools: dict[str, _Pool] = field(default_factory=dict)
    provenances: dict[tuple[str, str, tuple[str, ...]], _Provenance] = field(default_factory=dict)
    allocations: dict[str, dict[str, Allocation]] = field(default_factory=dict)
    solver: lp.Allocator = field(default_factory=lp.Allocator)


_LIMITED = {name: (name,) for name in ("rating", "reserve_soc", "max_soc", "ev_energy_need")}
"""A device's own limit, as a slot's ``limited_by``: one tuple for all the devices it holds."""


@dataclass(slots=True)
class _Slot:
    """One device's state during planning."""

    command_id: str
    kind: Literal["dispatch", "setpoint", "envelope", "release"]
    requested_kw: float
    kw: float
    limited_by: tuple[str, ...] = ()


@dataclass(slots=True)
class Plan:
    setpoints: dict[str, DeviceCommand] = field(default_factory=dict)
    """Devices under control, with their setpoint and its provenance. Others run autonomously."""
    allocations: dict[str, tuple[Allocation, ...]] = field(default_factory=dict)
    shortfall_kw: dict[str, float] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    """command_id → ids of commands that already held devices it wanted."""
    envelopes: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    """envelope command_id → (import_limit_kw, export_limit_kw) in force."""
    requested_kw: dict[str, float] = field(default_factory=dict)
    """dispatch command_id → the change from baseline asked for now (ramp and, in ``target``
    mode, the baseline estimate applied)."""
    baseline_kw: dict[str, float] = field(default_factory=dict)
    """``target`` dispatch command_id → the group baseline estimated for it now."""
    available_kw: dict[str, float] = field(default_factory=dict)
    """dispatch command_id → what the devices it holds can give in the request's direction."""
    compliance: dict[str, EnvelopeCompliance] = field(default_factory=dict)
    """envelope command_id → how it holds at the meter (:class:`gateway.delivery.EnvelopeWatch`);
    the core sets it, the planner does not."""
    delivery: dict[str, Delivery] = field(default_factory=dict)
    """dispatch command_id → its measured response so far, as the closed loop
    (:mod:`gateway.delivery`) estimated it; the core sets it, the planner does not."""
    held_since: dict[str, datetime] = field(default_factory=dict)
    """Thermal devices called by a dispatch → since when (for their turn: ``rotation_order``)."""
    committed_kw: dict[str, float] = field(default_factory=dict)
    """dispatch command_id → the change to allocate: the request plus the closed loop's
    correction (:mod:`gateway.delivery`); the devices' caps may leave a shortfall."""
    releasing: dict[str, Release] = field(default_factory=dict)
    """Thermal devices of a dispatch that has ended, each held until its turn to be released."""
    released: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Thermal devices this plan let go of after their dispatch ended → (its command_id, the
    rise expected of it: from what it drew to full power); the release governor counts it
    until a reading shows it (:class:`gateway.delivery.ReleaseGovernor`)."""
    response: dict[str, float] = field(default_factory=dict)
    """Batteries' track record under the optimised allocation: the power each delivered per kW
    commanded, learnt from readings taken after the command (``learn_response``)."""
    planned_at: datetime | None = None
    _memory: _Memory = field(default_factory=_Memory, init=False, repr=False, compare=False)
    """What the next plan can reuse instead of computing again (it changes no decision)."""

    def shift(self, by: timedelta) -> None:
        """The wall clock stepped by ``by``: turns and releases keep their true durations."""
        self.held_since = {d: since + by for d, since in self.held_since.items()}
        if self.planned_at is not None:
            self.planned_at += by
        self.releasing = {
            d: Release(r.command_id, r.kw, r.at + by) for d, r in self.releasing.items()
        }


@dataclass(frozen=True, slots=True)
class Release:
    command_id: str
    kw: float
    at: datetime


def target_devices(registry: Registry, target: Target) -> list[Device]:
    if target.group_id is not None:
        return registry.members(target.group_id)
    return [registry.device(d) for d in target.device_ids or () if d in registry]


def plan(
    now: datetime,
    registry: Registry,
    states: Mapping[str, DeviceState | None],
    active: Sequence[ActiveCommand],
    baselines: Mapping[str, float] | None = None,
    corrections: Mapping[str, float] | None = None,
    previous: Plan | None = None,
    rotation_s: float = 1800.0,
    release_s: float = 0.0,
    release_allowance: Mapping[str, float] | None = None,
    *,
    allocator: Allocator = "lp",
) -> Plan:
    """Compute every device's setpoint for ``now``.

    ``states`` holds the latest *fresh* state of each device (None when unavailable or stale);
    ``active`` the commands whose window contains ``now``; ``baselines`` each device's power when
    left alone, as far as it is known (``target`` mode and envelopes); ``corrections`` the
    closed loop's correction of each dispatch's request (:mod:`gateway.delivery`), in kW;
    ``previous`` the last plan (whose turns and releases go on); ``rotation_s`` a thermal load's
    turn; ``release_s`` how long the thermal loads of an ended dispatch take to be released at
    the latest; ``release_allowance`` per ended dispatch, the rise its releases may add now
    (:class:`gateway.delivery.ReleaseGovernor`; without one, the ``release_s`` schedule alone);
    ``allocator`` how each dispatch is shared among its batteries, EV chargers, inverters and
    sites (``"lp"``: optimised, every envelope a hard limit; ``"proportional"``: by headroom).
    """
    baselines = baselines or {}
    corrections = corrections or {}
    result = Plan()
    past = previous._memory if previous is not None else _Memory()
    pools = result._memory.pools
    result._memory.solver = past.solver
    result.planned_at = now
    if previous is not None and previous.response:
        result.response = dict(previous.response)
    bounds: list[_Bound] = []
    if allocator == "lp":
        bounds = _bounds(now, active, registry)
    slots: dict[str, _Slot] = {}
    holder: dict[str, str] = {}
    switched = _switched(now, active, registry)
    if switched:
        # A DER an envelope disconnects or de-energizes exchanges no power: nothing counts on
        # it (it plans as unavailable) and its command says so (after the plan, below).
        states = {k: None if k in switched and switched[k].holds else v for k, v in states.items()}
    power_commands = [a for a in active if not isinstance(a.command, OperatingEnvelope)]
    # Higher priority first; between equals, the earlier commitment holds.
    power_commands.sort(key=lambda a: (-a.command.priority, a.seq))

    for entry in power_commands:
        command = entry.command
        remaining = (command.end - now).total_seconds()
        if isinstance(command, DeviceSetpoint):
            _plan_setpoint(command, registry, states, slots, holder, result, remaining)
        elif isinstance(command, Dispatch):
            cid = command.command_id
            pools[cid] = _plan_dispatch(
                now,
                entry,
                registry,
                states,
                baselines,
                corrections.get(cid, 0.0),
                previous,
                rotation_s,
                slots,
                holder,
                result,
                remaining,
                past.pools.get(cid),
                bounds if allocator == "lp" else None,
                result._memory.solver,
            )

    result._memory.solver.keep(set(pools))
    if previous is not None and release_s > 0:
        active_ids = {a.command.command_id for a in active}
        _stagger_release(
            now,
            previous,
            active_ids,
            registry,
            states,
            slots,
            result,
            release_s,
            release_allowance or {},
        )

    envelopes = sorted(
        (a for a in active if isinstance(a.command, OperatingEnvelope)), key=lambda a: a.seq
    )
    # Two passes: pulling exports in can only raise imports and vice versa, so a second pass
    # settles any nested envelopes (a feeder inside a substation) that the first pass disturbed.
    limits: dict[str, _Limits] = {}
    for _ in range(2):
        limits.clear()  # the second pass sees every envelope's setpoints: it decides the limits
        for entry in envelopes:
            assert isinstance(entry.command, OperatingEnvelope)
            _apply_envelope(now, entry.command, registry, states, baselines, slots, limits, result)
    for device_id, limit in limits.items():
        if device_id in slots:
            continue
        result.setpoints[device_id] = DeviceCommand(
            device_id=device_id,
            power_kw=None,
            import_limit_kw=limit.import_kw,
            export_limit_kw=limit.export_kw,
            provenance=tuple(LimitSource(command_id=c, kind="envelope") for c in limit.sources),
        )

    _commit(slots, previous, result)
    for device_id, switch in switched.items():
        _apply_switch(result, device_id, switch)
    for entry in power_commands:
        command = entry.command
        if isinstance(command, Dispatch):
            allocated = result.allocations.get(command.command_id, ())
            track = result.response
            if track:  # what a battery that gives less than it is told will deliver
                delivered = sum(
                    a.commanded_kw * response_factor(track.get(a.device_id)) for a in allocated
                )
            else:
                delivered = sum(a.commanded_kw for a in allocated)
            wanted = result.committed_kw.get(command.command_id, 0.0)
            short = max(0.0, abs(wanted) - abs(delivered))
            if allocator == "lp" and short <= _ROUNDING_KW * len(allocated):
                short = 0.0  # each setpoint rounded to 0.1 W, not a kW missing
            result.shortfall_kw[command.command_id] = round(short, 3)
    return result


@dataclass(slots=True)
class _Switch:
    """What the envelopes in force say of one device's connection (False wins over True)."""

    connect: bool | None = None
    energize: bool | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return self.connect is False or self.energize is False


def _both(a: bool | None, b: bool | None) -> bool | None:
    return b if a is None else a if b is None else a and b


def _switched(
    now: datetime, active: Sequence[ActiveCommand], registry: Registry
) -> dict[str, _Switch]:
    found: dict[str, _Switch] = {}
    for entry in active:
        command = entry.command
        if not isinstance(command, OperatingEnvelope):
            continue
        interval = command.interval_at(now)
        if interval is None or (interval.connect is None and interval.energize is None):
            continue
        for device in target_devices(registry, command.target):
            switch = found.setdefault(device.device_id, _Switch())
            switch.connect = _both(switch.connect, interval.connect)
            switch.energize = _both(switch.energize, interval.energize)
            switch.sources.append(command.command_id)
    return found


def _apply_switch(result: Plan, device_id: str, switch: _Switch) -> None:
    """A disconnected / de-energized device holds nothing else: no power either way, so an
    adapter that cannot switch it still stops it; a reconnect rides on its command."""
    provenance = tuple(LimitSource(command_id=c, kind="envelope") for c in switch.sources)
    current = result.setpoints.get(device_id)
    if switch.holds or current is None:
        result.setpoints[device_id] = DeviceCommand(
            device_id=device_id,
            power_kw=None,
            import_limit_kw=0.0 if switch.holds else None,
            export_limit_kw=0.0 if switch.holds else None,
            provenance=provenance,
            connect=switch.connect,
            energize=switch.energize,
        )
        return
    result.setpoints[device_id] = current.model_copy(
        update={
            "connect": switch.connect,
            "energize": switch.energize,
            "provenance": current.provenance + provenance,
        }
    )


def _commit(slots: Mapping[str, _Slot], previous: Plan | None, result: Plan) -> None:
    """Each planned device's setpoint and allocation, with their provenance, into ``result``.

    A plan for 10,000 devices has ~20,000 of these every control period: a device whose
    command has not changed keeps the same object (its allocation too), and new ones are built
    from the planner's own values without re-validation (validating them cost 0.4 s a period).
    In device id order, so each command's allocations come out sorted.
    """
    memory = result._memory
    past = previous._memory if previous is not None else _Memory()
    before = previous.setpoints if previous is not None else {}
    sources: dict[tuple[str, str], LimitSource] = {}
    provenances, known = memory.provenances, past.provenances
    rounded: dict[float, float] = {}  # round() is slow, and many devices share a value
    command_id = ""
    allocations: dict[str, Allocation] = {}
    allocated: dict[str, Allocation] = {}
    made: _Provenance | None = None
    last: _Slot | None = None
    for device_id in sorted(slots):
        slot = slots[device_id]
        kind = slot.kind
        if (
            last is None
            or slot.command_id is not last.command_id
            or kind is not last.kind
            or slot.limited_by is not last.limited_by
        ):  # else: the same provenance as the device before it (most are)
            key = (slot.command_id, kind, slot.limited_by)
            made = provenances.get(key)
            if made is None:
                made = provenances[key] = known.get(key) or _provenance(sources, slot)
        assert made is not None
        last = slot
        provenance, limited_by = made
        kw = _rounded(slot.kw, rounded)
        old = before.get(device_id)
        if (
            old is not None
            and old.power_kw == kw
            and old.import_limit_kw is None
            and old.export_limit_kw is None
            and (old.provenance is provenance or old.provenance == provenance)
        ):
            result.setpoints[device_id] = old
        else:
            result.setpoints[device_id] = _built(
                DeviceCommand,
                device_id=device_id,
                power_kw=kw,
                import_limit_kw=None,
                export_limit_kw=None,
                provenance=provenance,
                connect=None,
                energize=None,
            )
        if kind == "release":
            continue  # not part of any command's allocation any more
        requested = kw if slot.requested_kw is slot.kw else _rounded(slot.requested_kw, rounded)
        if slot.command_id != command_id:
            command_id = slot.command_id
            allocations = memory.allocations.setdefault(command_id, {})
            allocated = past.allocations.get(command_id, {})
        was = allocated.get(device_id)
        if (
            was is not None
            # a zero is reused only with its sign: zeros are _ZERO or _MINUS_ZERO here
            and (was.commanded_kw is kw or (kw != 0.0 and was.commanded_kw == kw))
            and (
                was.requested_kw is requested
                or (requested != 0.0 and was.requested_kw == requested)
            )
            and (was.limited_by is limited_by or was.limited_by == limited_by)
        ):
            allocations[device_id] = was
        else:
            allocations[device_id] = _built(
                Allocation,
                device_id=device_id,
                requested_kw=requested,
                commanded_kw=kw,
                limited_by=limited_by,
            )
    for cid, by_device in memory.allocations.items():
        result.allocations[cid] = tuple(by_device.values())


_ZERO, _MINUS_ZERO = 0.0, -0.0
_ROUNDING_KW = 0.5e-4
"""At most what rounding a setpoint to 0.1 W (:func:`_rounded`) takes from it."""


def _rounded(kw: float, done: dict[float, float]) -> float:
    """``round(kw, 4)``, a zero as one of two objects (its sign is then compared by identity)."""
    if kw == 0.0:  # round(±0.0, 4) is itself
        return _ZERO if math.copysign(1.0, kw) > 0 else _MINUS_ZERO
    out = done.get(kw)
    if out is None:
        out = round(kw, 4)
        if out == 0.0:
            out = _ZERO if math.copysign(1.0, out) > 0 else _MINUS_ZERO
        done[kw] = out
    return out


def _provenance(sources: dict[tuple[str, str], LimitSource], slot: _Slot) -> _Provenance:
    limited_by = slot.limited_by
    first = _source(sources, slot.command_id, slot.kind)
    return (first, *(_limit_source(sources, s) for s in limited_by)), limited_by


_M = TypeVar("_M", bound=BaseModel)


def _built(cls: type[_M], **values: Any) -> _M:
    """A model from values the planner computed itself, every field given: what
    ``model_construct`` does, without its per-field default handling (5× faster)."""
    model = cls.__new__(cls)
    object.__setattr__(model, "__dict__", values)
    object.__setattr__(model, "__pydantic_fields_set__", set(values))
    object.__setattr__(model, "__pydantic_extra__", None)
    object.__setattr__(model, "__pydantic_private__", None)
    return model


def ramp_factor(command: Dispatch, now: datetime) -> float:
    if command.ramp_s <= 0:
        return 1.0
    elapsed = (now - command.start).total_seconds()
    return max(0.0, min(1.0, elapsed / command.ramp_s))


def _source(cache: dict[tuple[str, str], LimitSource], command_id: str, kind: str) -> LimitSource:
    key = (command_id, kind)
    source = cache.get(key)
    if source is None:
        source = cache[key] = LimitSource(command_id=command_id, kind=kind)
    return source


def _limit_source(cache: dict[tuple[str, str], LimitSource], label: str) -> LimitSource:
    if label in ("rating", "reserve_soc", "max_soc", "ev_energy_need"):
        return _source(cache, label, label)
    return _source(cache, label, "envelope")


def _plan_setpoint(
    command: DeviceSetpoint,
    registry: Registry,
    states: Mapping[str, DeviceState | None],
    slots: dict[str, _Slot],
    holder: dict[str, str],
    result: Plan,
    remaining_s: float,
) -> None:
    device_id = command.device_id
    if device_id in holder:
        result.conflicts.setdefault(command.command_id, []).append(holder[device_id])
        return
    state = states.get(device_id)
    if device_id not in registry or state is None:
        return
    room = headroom(registry.device(device_id), state, remaining_s)
    kw, limit = clip_to_headroom(command.kw, room)
    slots[device_id] = _Slot(
        command.command_id, "setpoint", command.kw, kw, (limit,) if limit else ()
    )
    holder[device_id] = command.command_id


def _plan_dispatch(
    now: datetime,
    entry: ActiveCommand,
    registry: Registry,
    states: Mapping[str, DeviceState | None],
    baselines: Mapping[str, float],
    correction_kw: float,
    previous: Plan | None,
    rotation_s: float,
    slots: dict[str, _Slot],
    holder: dict[str, str],
    result: Plan,
    remaining_s: float,
    pool: _Pool | None,
    bounds: Sequence[_Bound] | None = None,
    solver: lp.Allocator | None = None,
) -> _Pool:
    """Allocate one dispatch over the members no earlier command holds; returns its members'
    :class:`_Pool` (``pool``, the last period's, when it still serves) for the next period."""
    command = entry.command
    assert isinstance(command, Dispatch)
    cid = command.command_id
    # A program with an eligibility rule dispatches only devices eligible in it (envelopes,
    # being safety limits, hold every device of their group whatever its programs).
    members = [
        d
        for d in target_devices(registry, command.target)
        if registry.may_serve(d.device_id, command.program)
    ]
    if pool is None or not pool.serves(members):
        pool = _Pool.of(members)
    ids = pool.ids
    get = states.get
    member_states = [get(did) for did in ids]
    if pool.has_ev:
        rows = [
            i
            for i, (device, state) in enumerate(zip(members, member_states, strict=True))
            if state is not None and plannable(device, state)
        ]
    else:  # plannable() without an EV charger among them
        rows = [i for i, s in enumerate(member_states) if s is not None and s.soc_pct is not None]
    if entry.excluded:
        rows = [i for i in rows if ids[i] not in entry.excluded]
    if holder:
        free = []
        for i in rows:
            other = holder.get(ids[i])
            if other is None:
                free.append(i)
                continue
            blockers = result.conflicts.setdefault(cid, [])
            if other not in blockers:
                blockers.append(other)
        rows = free
    kept = [ids[i] for i in rows]
    kept_states = [s for i in rows if (s := member_states[i]) is not None]  # all of them
    if command.mode is DispatchMode.TARGET:
        baseline = group_baseline(members, states, baselines, controlled=kept)
        result.baseline_kw[cid] = round(baseline, 3)
        total = (command.kw - baseline) * ramp_factor(command, now)
    else:
        total = command.kw * ramp_factor(command, now)
    result.requested_kw[cid] = total
    at = np.array(rows, dtype=np.intp)
    room = _Rooms(pool, at, kept, kept_states, baselines, remaining_s)
    caps, energy_bound = room.side(discharge=total < 0)
    cap_list: list[float] = caps.tolist()
    available = sum(cap_list)
    result.available_kw[cid] = available
    # The device's caps bound what is allocated below; the shortfall says what they could not.
    requested, total = total, corrected(total, correction_kw, math.inf)
    result.committed_kw[cid] = total
    if (total < 0) != (requested < 0):  # a request within _EPS of zero: limits named as before
        energy_bound = room.side(discharge=total < 0)[1]
    row_of = dict(zip(kept, range(len(kept)), strict=True))
    thermal = pool.thermal_ids & row_of.keys()
    thermal_sum = sum(map(cap_list.__getitem__, map(row_of.__getitem__, thermal)))
    if bounds is not None:
        own_kw, asked_kw, limited_by, called = _allocate_lp(
            now,
            entry,
            registry,
            states,
            baselines,
            previous,
            rotation_s,
            slots,
            result,
            pool,
            at,
            kept,
            row_of,
            room,
            caps,
            energy_bound,
            total,
            bounds,
            solver or lp.Allocator(),
        )
    else:
        own_kw, asked_kw, limited_by, called = _allocate_proportionally(
            now,
            cid,
            registry,
            previous,
            rotation_s,
            pool,
            at,
            kept,
            row_of,
            room,
            caps,
            energy_bound,
            total,
            thermal_sum,
        )
    slots.update(
        zip(
            kept,
            [
                _Slot(cid, "dispatch", own, own, limits)
                for own, limits in zip(own_kw, limited_by, strict=True)
            ]
            if asked_kw is None
            else [
                _Slot(cid, "dispatch", asked, own, limits)
                for asked, own, limits in zip(asked_kw, own_kw, limited_by, strict=True)
            ],
            strict=True,
        )
    )
    holder.update(dict.fromkeys(kept, cid))
    for did, own in called.items():
        if abs(own) <= _EPS:
            continue  # only a thermal load called this period has a turn
        since = previous.held_since.get(did) if previous is not None else None
        same = previous is not None and _holder_of(previous, did) == cid
        result.held_since[did] = since if (same and since is not None) else now
    return pool


def _allocate_proportionally(
    now: datetime,
    cid: str,
    registry: Registry,
    previous: Plan | None,
    rotation_s: float,
    pool: _Pool,
    at: npt.NDArray[np.intp],
    kept: list[str],
    row_of: dict[str, int],
    room: _Rooms,
    caps: _Floats,
    energy_bound: npt.NDArray[np.bool_],
    total: float,
    thermal_sum: float,
) -> tuple[list[float], list[float] | None, list[tuple[str, ...]], dict[str, float]]:
    """The planner's allocation before the optimiser: between the thermal and the other
    devices in proportion to what each pool can give; within the thermal pool in turns (see
    rotation_order), within the other pool in proportion (as share())."""
    cap_list: list[float] = caps.tolist()
    available = sum(cap_list)
    is_thermal = pool.kind[at] == _THERMAL
    other_caps = caps[~is_thermal]
    other_sum = sum(other_caps.tolist())
    pooled = share(total, {"thermal": thermal_sum, "other": other_sum})
    kw = np.zeros(len(kept))
    other_total = pooled["other"]
    if other_sum > _EPS and abs(other_total) > _EPS:
        fraction = min(1.0, abs(other_total) / other_sum)
        kw[~is_thermal] = (1.0 if other_total > 0 else -1.0) * other_caps * fraction
    fair = total * (caps / available) if available > _EPS else np.zeros(len(kept))
    limited = (caps <= _EPS) | (~is_thermal & (np.abs(kw) + _EPS < np.abs(fair)))
    called: dict[str, float] = {}
    thermal_total = pooled["thermal"]
    left = abs(thermal_total)
    if left > _EPS:  # share_in_turn
        sign = 1.0 if thermal_total > 0 else -1.0
        order = rotation_order(
            cid,
            kept,
            row_of,
            is_thermal,
            room.soc,
            pool.id_rank[at],
            previous,
            now,
            rotation_s,
            registry.called_s,
        )
        for did in order:
            if left <= _EPS:
                break
            take = min(cap_list[row_of[did]], left)
            called[did] = sign * take
            left -= take
    own_kw = kw.tolist()
    for did, called_kw in called.items():
        own_kw[row_of[did]] = called_kw
    labels: list[str | None] = [None] * len(kept)
    bound, is_ev = energy_bound.tolist(), (pool.kind[at] == _EV).tolist()
    for k in np.flatnonzero(limited).tolist():
        if not bound[k]:
            labels[k] = "rating"
        elif total < 0:
            labels[k] = "reserve_soc"
        else:
            labels[k] = "ev_energy_need" if is_ev[k] else "max_soc"
    return own_kw, None, [() if label is None else _LIMITED[label] for label in labels], called


@dataclass(frozen=True, slots=True)
class _Bound:
    """An envelope in force, as the optimised allocation reads it."""

    command_id: str
    import_kw: float | None
    export_kw: float | None
    members: list[Device]


def _bounds(now: datetime, active: Sequence[ActiveCommand], registry: Registry) -> list[_Bound]:
    out = []
    for entry in sorted(active, key=lambda a: a.seq):
        command = entry.command
        if not isinstance(command, OperatingEnvelope):
            continue
        interval = command.interval_at(now)
        if interval is None:
            continue
        out.append(
            _Bound(
                command.command_id,
                interval.import_limit_kw,
                interval.export_limit_kw,
                target_devices(registry, command.target),
            )
        )
    return out


def _allocate_lp(
    now: datetime,
    entry: ActiveCommand,
    registry: Registry,
    states: Mapping[str, DeviceState | None],
    baselines: Mapping[str, float],
    previous: Plan | None,
    rotation_s: float,
    slots: Mapping[str, _Slot],
    result: Plan,
    pool: _Pool,
    at: npt.NDArray[np.intp],
    kept: list[str],
    row_of: dict[str, int],
    room: _Rooms,
    caps: _Floats,
    energy_bound: npt.NDArray[np.bool_],
    total: float,
    bounds: Sequence[_Bound],
    solver: lp.Allocator,
) -> tuple[list[float], list[float] | None, list[tuple[str, ...]], dict[str, float]]:
    """The optimised allocation (:mod:`gateway.allocation`): each battery, EV charger, inverter
    or site is a column bounded by its headroom (ratings, reserve or maximum SoC over the rest
    of the window, an EV's need), the thermal loads one column (what the cohort is asked for,
    then called in turns: :func:`rotation_order`); the request is one row, every envelope in
    force over these devices another (hard: the allocation never pushes a group past a limit
    in the request's direction). Costs: class (``CLASS_COST``) and participation hours
    (``FAIRNESS_COST_PER_HOUR``), each device's headroom offered in rising slices (a spread:
    ``gateway.allocation.SPREAD_COST``); moving a device from last period's allocation costs
    ``gateway.allocation.CHURN_COST`` per kW."""
    cid = entry.command.command_id
    n = len(kept)
    sign = 1.0 if total > 0 else -1.0
    is_thermal = pool.kind[at] == _THERMAL
    other = np.flatnonzero(~is_thermal)
    m = int(other.size)
    thermal_rows = np.flatnonzero(is_thermal)
    thermal_cap = float(caps[thermal_rows].sum()) if thermal_rows.size else 0.0
    cohort = thermal_cap > _EPS
    at_other = at[other]
    called_s = registry.called_s
    hours = (
        np.array([called_s.get(kept[k], 0.0) // 3600 for k in other.tolist()])
        if called_s
        else np.zeros(m)
    )
    # A battery's state of charge is in its headroom already (its energy spread over the rest
    # of the window): within a class, devices share in proportion to it.
    cost = pool.class_cost[at_other] + FAIRNESS_COST_PER_HOUR * hours
    cap_col, cost_col = caps[other], cost
    if cohort:
        cap_col = np.append(cap_col, thermal_cap)
        cost_col = np.append(cost_col, CLASS_COST[DerClass.THERMOSTAT])
    prev = np.zeros(cap_col.size)
    thermal_list = is_thermal.tolist()
    before = previous._memory.allocations.get(cid) if previous is not None else None
    track = result.response
    if before:
        assert previous is not None
        since = previous.planned_at
        members = pool.members
        for j, k in enumerate(other.tolist()):
            was = before.get(kept[k])
            if was is not None:
                prev[j] = max(0.0, sign * was.commanded_kw)
                if members[at[k]].der_class is DerClass.BATTERY:
                    learn_response(track, kept[k], was.commanded_kw, room.states[k], since)
            elif kept[k] in track:
                forgive_response(track, kept[k])
        if cohort and previous is not None:  # only the thermal loads called had a share
            given = 0.0
            for did in previous.held_since:
                row = row_of.get(did)
                called_was = before.get(did)
                if row is not None and thermal_list[row] and called_was is not None:
                    given += max(0.0, sign * called_was.commanded_kw)
            prev[m] = given
    col_of = np.full(n, -1, dtype=np.intp)
    col_of[other] = np.arange(m)
    limits: list[lp.Limit] = []
    relief: list[lp.Limit] = []
    for bound in bounds:
        # The limit the request pushes on (a load-up on an import limit, a shed on an export
        # limit) is hard; the other one it relieves, where it is passed, by preference.
        limit_kw, eases = (
            (bound.import_kw, bound.export_kw) if sign > 0 else (bound.export_kw, bound.import_kw)
        )
        if limit_kw is None and eases is None:
            continue
        fixed = measured = 0.0
        columns: list[int] = []
        has_thermal = False
        for device in bound.members:
            did = device.device_id
            row = row_of.get(did)
            if row is not None:
                if thermal_list[row]:  # counted at its baseline; the cohort column moves it
                    own = baselines.get(did)
                    state = states.get(did)
                    fixed += own if own is not None else (state.power_kw if state else 0.0)
                    has_thermal = True
                else:
                    columns.append(int(col_of[row]))
                continue
            if did in slots or device.der_class not in MODULATING:
                kw = _predicted_kw(device, states, baselines, slots)
                fixed += kw
                if did not in slots:
                    measured += abs(kw)
        margin = ENVELOPE_MARGIN * measured
        if eases is not None and columns:
            # Not the cohort: which houses are called is decided in turns, not by group.
            past = fixed + margin - eases if sign < 0 else -eases + margin - fixed
            if past > _EPS:
                relief.append(
                    lp.Limit(bound.command_id, np.array(columns, dtype=np.intp), past)
                )
        if has_thermal and cohort:
            columns.append(m)  # as if the whole cohort sat in this group: never past the limit
        if limit_kw is None or not columns:
            continue
        room_kw = limit_kw - margin - fixed if sign > 0 else limit_kw - margin + fixed
        limits.append(
            lp.Limit(bound.command_id, np.array(columns, dtype=np.intp), room_kw)
        )
    response = None
    if track:
        response = np.ones(cap_col.size)
        response[:m] = [response_factor(track.get(kept[k])) for k in other.tolist()]
    problem = lp.Problem(
        abs(total), cap_col, cost_col, prev, limits, relief=relief, response=response
    )
    try:
        solution = solver.solve(cid, problem)
    except lp.AllocationError:  # never for these problems; the baseline then
        return _allocate_proportionally(
            now, cid, registry, previous, rotation_s, pool, at, kept, row_of, room, caps,
            energy_bound, total, thermal_cap if cohort else 0.0,
        )  # fmt: skip
    y = solution.kw
    own_kw = [0.0] * n
    for k, kw in zip(other.tolist(), (sign * y[:m]).tolist(), strict=True):
        own_kw[k] = kw
    requested_kw: list[float] | None = None
    if solution.binding:  # what each would be asked without the envelopes: its request
        free = solver.solve(f"{cid}#free", lp.Problem(abs(total), cap_col, cost_col, prev))
        requested_kw = list(own_kw)
        for k, kw in zip(other.tolist(), (sign * free.kw[:m]).tolist(), strict=True):
            requested_kw[k] = kw
    called: dict[str, float] = {}
    left = float(y[m]) if cohort else 0.0
    if left > _EPS:
        cap_list: list[float] = caps.tolist()
        order = rotation_order(
            cid,
            kept,
            row_of,
            is_thermal,
            room.soc,
            pool.id_rank[at],
            previous,
            now,
            rotation_s,
            called_s,
        )
        for did in order:
            if left <= _EPS:
                break
            take = min(cap_list[row_of[did]], left)
            called[did] = sign * take
            own_kw[row_of[did]] = sign * take
            if requested_kw is not None:
                requested_kw[row_of[did]] = sign * take
            left -= take
    # What stopped each device giving more: its own limit when it gives all it can, else an
    # envelope at its limit that it sits in.
    limited_by: list[tuple[str, ...]] = [()] * n
    bound_by = energy_bound.tolist()
    is_ev = (pool.kind[at] == _EV).tolist()
    at_cap = caps <= _EPS
    at_cap[other] |= y[:m] >= caps[other] - 1e-6
    full = at_cap.tolist()
    for k in np.flatnonzero(at_cap).tolist():
        if not bound_by[k]:
            label = "rating"
        elif total < 0:
            label = "reserve_soc"
        else:
            label = "ev_energy_need" if is_ev[k] else "max_soc"
        limited_by[k] = _LIMITED[label]
    if solution.binding:
        by_col: dict[int, tuple[str, ...]] = {}
        for limit in limits:
            if limit.name in solution.binding:
                for j in limit.members.tolist():
                    by_col[j] = (*by_col.get(j, ()), limit.name)
        named: dict[tuple[str, ...], tuple[str, ...]] = {}
        for j, k in enumerate(other.tolist()):
            names = by_col.get(j)
            if names is not None and not full[k]:
                limited_by[k] = named.setdefault(names, names)
    return own_kw, requested_kw, limited_by, called


RESPONSE_MIN_KW = 0.5
"""A battery's track record learns only from commands at least this large (a reading's noise
is a large share of a small one)."""
RESPONSE_GAIN = 0.2
"""Each reading moves a battery's track record this share of the way to what it shows."""
RESPONSE_TOLERANCE = 0.9
"""A battery delivering at least this share of its command counts as delivering all of it
(noise, losses); below, its record, in steps of 5 %, scales what it is counted for."""
RESPONSE_FORGIVE_GAIN = 0.05
"""Per period given nothing, how far a battery's record moves back towards 1 (slower than it
learns: a battery that keeps giving half is tried again now and then, not every other period)."""


def learn_response(
    track: dict[str, float],
    device_id: str,
    commanded_kw: float,
    state: DeviceState,
    since: datetime | None,
) -> None:
    """Move a battery's track record towards what it delivered of ``commanded_kw``: its power
    in ``state`` if read after the command was planned (``since``)."""
    if abs(commanded_kw) < RESPONSE_MIN_KW:
        # Called last (or not at all) for a poor record, a battery would never show it does
        # better: a reading taken before a new setpoint reached it must not bar it for good.
        forgive_response(track, device_id)
        return
    if since is None or state.timestamp <= since:
        return
    sample = min(1.0, max(0.0, state.power_kw / commanded_kw))
    old = track.get(device_id, 1.0)
    track[device_id] = old + RESPONSE_GAIN * (sample - old)


def forgive_response(track: dict[str, float], device_id: str) -> None:
    """A battery given nothing this period: its record drifts back towards full response, so
    it is asked again and shows what it gives now."""
    old = track.get(device_id)
    if old is None:
        return
    record = old + RESPONSE_FORGIVE_GAIN * (1.0 - old)
    if record >= RESPONSE_TOLERANCE:
        del track[device_id]
    else:
        track[device_id] = record


def response_factor(record: float | None) -> float:
    """What the optimised allocation counts a battery for per kW commanded, from its record."""
    if record is None or record >= RESPONSE_TOLERANCE:
        return 1.0
    return max(lp.MIN_RESPONSE, round(record * 20.0) / 20.0)


class _Rooms:
    """What :func:`_headroom` gives, for many devices at once and one direction at a time
    (numpy, the same arithmetic in the same order: the same floats)."""

    def __init__(
        self,
        pool: _Pool,
        at: npt.NDArray[np.intp],
        ids: list[str],
        states: list[DeviceState],
        baselines: Mapping[str, float],
        remaining_s: float,
    ) -> None:
        self.pool, self.at, self.ids, self.states = pool, at, ids, states
        self.baselines = baselines
        self.hours = max(remaining_s, MIN_ENERGY_HORIZON_S) / 3600.0
        self.kind = pool.kind[at]
        self.soc = np.array([s.soc_pct for s in states], dtype=np.float64)  # an EV's: unused

    def side(self, *, discharge: bool) -> tuple[_Floats, npt.NDArray[np.bool_]]:
        """Each device's headroom, discharging or charging, and whether an energy limit (not
        its rating) sets it: what names its limit."""
        pool, at, states, kind = self.pool, self.at, self.states, self.kind
        capacity = _least(pool.capacity[at], _given([s.capacity_kwh for s in states]))
        if discharge:
            rated = _least(pool.rated_dis[at], _given([s.max_discharge_kw for s in states]))
            energy = _most(0.0, (self.soc - pool.reserve[at]) / 100.0 * capacity) / self.hours
            cap, bound = _least(rated, energy), energy < rated
            thermal = kind == _THERMAL
            if thermal.any():
                # A thermal load sheds what it would draw, while it has comfort headroom left.
                get = self.baselines.get
                draws = np.array(
                    [
                        s.power_kw if (b := get(did)) is None else b
                        for did, s in zip(self.ids, states, strict=True)
                    ],
                    dtype=np.float64,
                )
                has_room = self.soc > THERMAL_MIN_HEADROOM_PCT
                cap = np.where(
                    thermal, np.where(has_room, _least(rated, _most(0.0, draws)), 0.0), cap
                )
                bound = np.where(thermal, ~has_room, bound)
            ev = kind == _EV
            return np.where(ev, 0.0, cap), np.where(ev, False, bound)
        rated = _least(pool.rated_ch[at], _given([s.max_charge_kw for s in states]))
        energy = _most(0.0, (pool.max_soc[at] - self.soc) / 100.0 * capacity) / self.hours
        cap, bound = _least(rated, energy), energy < rated
        if pool.has_ev:
            # An EV charger charges at most the energy its EV still wants.
            wanted = (
                np.array(
                    [(s.ev.energy_needed_kwh or 0.0) if s.ev is not None else 0.0 for s in states],
                    dtype=np.float64,
                )
                / self.hours
            )
            ev = kind == _EV
            cap = np.where(ev, _least(rated, wanted), cap)
            bound = np.where(ev, wanted < rated, bound)
        return cap, bound


def _given(values: list[float | None]) -> _Floats:
    """A state's optional limits: none given is no limit (NaN, never valid here, is none too)."""
    out = np.array(values, dtype=np.float64)
    out[np.isnan(out)] = math.inf
    return out


def _least(a: _Floats, b: _Floats | float) -> _Floats:
    """``min(a, b)`` element by element, ties and zeros' signs as Python's."""
    return np.where(b < a, b, a)


def _most(a: float, b: _Floats) -> _Floats:
    """``max(a, b)`` element by element, ties and zeros' signs as Python's."""
    return np.where(b > a, b, a)


def _stagger_release(
    now: datetime,
    previous: Plan,
    active_ids: set[str],
    registry: Registry,
    states: Mapping[str, DeviceState | None],
    slots: dict[str, _Slot],
    result: Plan,
    release_s: float,
    allowance: Mapping[str, float],
) -> None:
    """Release the thermal loads of a dispatch that has just ended one after another, longest
    called first, instead of all at once: each as the measured rebound leaves room for it
    (``allowance``: the rise its release may add, from what it draws now to its full power,
    since a house held warm runs flat out to cool back), and at the latest on a schedule spread
    over ``release_s``.

    Every house held off pays its stored heat back when released: released together, their
    compressors all start together (a rebound larger than the shed). A device another command
    claims is simply taken (power commands are planned first)."""
    waiting: dict[str, list[tuple[datetime, str, Release]]] = {}
    for device_id, release in previous.releasing.items():
        if device_id in slots or device_id not in registry:
            continue  # another command has it now, or it has gone
        rise = _release_rise(registry.device(device_id), states.get(device_id), release)
        if release.at <= now:
            result.released[device_id] = (release.command_id, rise)  # on the schedule
        else:
            waiting.setdefault(release.command_id, []).append((release.at, device_id, release))
    for command_id, queue in waiting.items():
        room = allowance.get(command_id)
        queue.sort(key=lambda item: (item[0], item[1]))
        for _, device_id, release in queue:
            rise = _release_rise(registry.device(device_id), states.get(device_id), release)
            if room is not None and room >= rise:
                room -= rise  # released now: the rebound has room for it
                result.released[device_id] = (command_id, rise)
                continue
            room = None if room is None else -1.0  # in order: none after one that waits
            slots[device_id] = _Slot(release.command_id, "release", release.kw, release.kw)
            result.releasing[device_id] = release
    for command_id in previous.requested_kw:
        if command_id in active_ids:
            continue
        called = [
            a
            for a in previous.allocations.get(command_id, ())
            if a.device_id in previous.held_since and abs(a.commanded_kw) > _EPS
        ]
        called.sort(key=lambda a: previous.held_since[a.device_id])
        for rank, allocation in enumerate(called):
            did = allocation.device_id
            if did in slots or did not in registry:
                continue
            at = now + timedelta(seconds=release_s * (rank + 1) / len(called))
            kw = allocation.commanded_kw
            slots[did] = _Slot(command_id, "release", kw, kw)
            result.releasing[did] = Release(command_id, kw, at)


def _release_rise(device: Device, state: DeviceState | None, release: Release) -> float:
    """What releasing a held thermal load adds: it goes from what it draws now to full power."""
    rated = device.ratings.max_discharge_kw
    if state is not None and state.max_discharge_kw is not None:
        rated = min(rated, state.max_discharge_kw)
    if not math.isfinite(rated) or rated <= 0:
        return abs(release.kw)
    return max(abs(release.kw), rated - (state.power_kw if state is not None else 0.0))


def _holder_of(plan: Plan, device_id: str) -> str | None:
    setpoint = plan.setpoints.get(device_id)
    if setpoint is None or not setpoint.provenance:
        return None
    return setpoint.provenance[0].command_id


def share_in_turn(
    total_kw: float, caps: Mapping[str, float], order: Iterable[str]
) -> dict[str, float]:
    """Split ``total_kw`` by filling devices to their cap one after another in ``order``."""
    sign = 1.0 if total_kw > 0 else -1.0
    left = abs(total_kw)
    out = dict.fromkeys(caps, 0.0)
    for did in order:
        if left <= _EPS:
            break
        take = min(caps[did], left)
        out[did] = sign * take
        left -= take
    return out


def _turn_share(device_id: str) -> float:
    """Each house's turn lasts 0.5-1.5 × the configured turn (fixed per device): houses called
    together are not all released together, which would send a rebound through the event."""
    return 0.5 + zlib.crc32(device_id.encode()) / 0xFFFFFFFF


def rotation_order(
    command_id: str,
    ids: Sequence[str],
    row: Mapping[str, int],
    thermal: npt.NDArray[np.bool_],
    headroom: _Floats,
    rank: npt.NDArray[np.intp],
    previous: Plan | None,
    now: datetime,
    rotation_s: float,
    called_s: Mapping[str, float] | None = None,
) -> Iterator[str]:
    """Who a thermal load is asked of first: the houses already called for this command (until
    they have been called for ``rotation_s``), then those called for the fewest whole hours
    lately (``called_s``, the participation records: fairness between customers) and among
    them those with the most comfort headroom, then the ones whose turn is over.

    Called in turns, not all at once: a fleet whose every thermostat moves together stops every
    compressor together (twice the request) and then recovers together (a fraction of it and a
    rebound); houses called in turn, each for a while, keep the aggregate level, and each house
    gives back only the little heat of its own turn.

    Among the planned devices ``ids`` (``row``: each one's index), those ``thermal``, with
    their comfort ``headroom`` and ``rank`` (their place in id order: ties go by id). The order
    is made as it is read: a request a few hundred houses meet does not sort ten thousand.
    """
    current: list[tuple[float, str]] = []
    done: list[tuple[float, str]] = []
    fresh = thermal.copy()
    if previous is not None:
        for did, since in previous.held_since.items():
            k = row.get(did)
            if k is None or not fresh[k]:
                continue  # not one of these thermal loads
            if _holder_of(previous, did) != command_id:
                continue  # called by another command then: a fresh turn for this one
            fresh[k] = False
            if (now - since).total_seconds() < rotation_s * _turn_share(did):
                current.append(((since - now).total_seconds(), did))
            else:
                done.append(((since - now).total_seconds(), did))
    current.sort()
    yield from (did for _, did in current)
    picks = np.flatnonzero(fresh)
    if called_s:  # the fewest whole hours called lately first (fairness), then headroom
        hours = np.array([called_s.get(ids[k], 0.0) // 3600 for k in picks.tolist()])
        picks = picks[np.lexsort((rank[picks], -headroom[picks], hours))]
    else:
        picks = picks[np.lexsort((rank[picks], -headroom[picks]))]
    yield from (ids[k] for k in picks.tolist())
    done.sort()
    yield from (did for _, did in done)


def corrected(requested_kw: float, correction_kw: float, available_kw: float) -> float:
    """The request plus the closed loop's correction, with the request's sign (a shed never
    turns into a load-up against its own over-delivery) and at most ``available_kw``."""
    if abs(requested_kw) <= _EPS:
        return 0.0
    sign = 1.0 if requested_kw > 0 else -1.0
    return sign * max(0.0, min(available_kw, sign * (requested_kw + correction_kw)))


def group_baseline(
    members: Iterable[Device],
    states: Mapping[str, DeviceState | None],
    baselines: Mapping[str, float],
    *,
    controlled: Iterable[str],
) -> float:
    """The group's net power without the command's own setpoints (see the module docstring).

    A member the command does not control counts with what it measures now (or, when it does
    not report, its learnt baseline, else nothing); a controlled thermal device with its
    baseline (its setpoint moves it from there); a controlled battery, EV or inverter with
    nothing (its setpoint is its power).
    """
    held = set(controlled)
    total = 0.0
    for device in members:
        did = device.device_id
        state = states.get(did)
        if did in held:
            if device.der_class in SHIFTS_FROM_BASELINE:
                own = baselines.get(did)
                total += own if own is not None else (state.power_kw if state else 0.0)
        elif state is not None:
            total += state.power_kw
        else:
            total += baselines.get(did, 0.0)
    return total


@dataclass(slots=True)
class _Limits:
    """Standing limits on an autonomous device, from every envelope that covers it."""

    import_kw: float | None = None
    export_kw: float | None = None
    sources: list[str] = field(default_factory=list)

    def tighten(self, source: str, import_kw: float | None, export_kw: float | None) -> None:
        if import_kw is not None:
            self.import_kw = import_kw if self.import_kw is None else min(self.import_kw, import_kw)
        if export_kw is not None:
            self.export_kw = export_kw if self.export_kw is None else min(self.export_kw, export_kw)
        if source not in self.sources:
            self.sources.append(source)


ENVELOPE_MARGIN = 0.01
"""An envelope is held this share of the measured load it counts inside each limit: loads left
alone switch between control periods and the batteries offsetting them follow a period later."""

MODULATING: frozenset[DerClass] = frozenset({DerClass.BATTERY, DerClass.EVSE, DerClass.PV})
"""Classes whose power a standing limit caps continuously. A thermostat's compressor is on or
off: a cap below its rating only switches it off, so thermal loads are never given standing
limits; an envelope sheds them with setpoints when batteries cannot hold it."""

GENERATION_ONLY: frozenset[DerClass] = frozenset({DerClass.PV})
"""Classes that only generate: curtailable, never asked to import (a PV inverter's charge rating
means nothing), so they take no share of an import limit and no charging setpoint."""


def _apply_envelope(
    now: datetime,
    command: OperatingEnvelope,
    registry: Registry,
    states: Mapping[str, DeviceState | None],
    baselines: Mapping[str, float],
    slots: dict[str, _Slot],
    limits: dict[str, _Limits],
    result: Plan,
) -> None:
    """Keep the group's net power inside the envelope, counting all of it.

    The group's net power is what the planner controls (each setpoint: a battery's or an EV's
    power, a thermal device's baseline plus its change) plus what it does not: each load left
    alone at its measured power (its learnt baseline when it does not report). When that passes
    a limit, in order: devices under a setpoint that push past it are scaled back (the envelope
    wins over dispatch); batteries in the group discharge (or charge, against an export limit)
    to offset the rest, those left alone as well as those already dispatched, within their
    headroom; then thermal loads are shed (or loaded up). Batteries, EV chargers and inverters
    left alone get a standing share of whatever room remains, in proportion to their ratings: a
    limit that does not depend on their own measured power, so it holds steadily instead of being
    imposed and lifted in turn as the device obeys.
    """
    interval = command.interval_at(now)
    if interval is None:
        return
    imp, exp = interval.import_limit_kw, interval.export_limit_kw
    cid = command.command_id
    result.envelopes[cid] = (imp, exp)
    members = target_devices(registry, command.target)
    remaining_s = (interval.end - now).total_seconds()
    modulating = [d for d in members if d.device_id not in slots and d.der_class in MODULATING]
    net = 0.0
    measured = 0.0  # loads left alone: they switch between periods, batteries follow a period on
    for d in members:
        if d.device_id in slots or d.der_class not in MODULATING:
            kw = _predicted_kw(d, states, baselines, slots)
            net += kw
            if d.device_id not in slots:
                measured += abs(kw)
    margin = ENVELOPE_MARGIN * measured
    for limit, side in ((imp, 1.0), (exp, -1.0)):
        if limit is None:
            continue
        bound = (limit - margin) * side  # import: net <= imp; export: net >= -exp
        excess = side * (net - bound)
        if excess > _EPS:
            net -= side * _relieve(
                cid, side, excess, members, modulating, states, baselines, slots, remaining_s
            )
    # What the planned devices and the other loads leave of each limit, for those left alone.
    modulating = [d for d in modulating if d.device_id not in slots]
    if not modulating:
        return
    imp_room = None if imp is None else max(0.0, imp - net)
    exp_room = None if exp is None else max(0.0, exp + net)
    dis = sum(d.ratings.max_discharge_kw for d in modulating)
    cha = sum(d.ratings.max_charge_kw for d in modulating if d.der_class not in GENERATION_ONLY)
    for device in modulating:
        own_exp = None if exp_room is None else exp_room * device.ratings.max_discharge_kw / dis
        own_imp = (
            None
            if imp_room is None or device.der_class in GENERATION_ONLY
            else imp_room * device.ratings.max_charge_kw / cha
        )
        limits.setdefault(device.device_id, _Limits()).tighten(
            cid,
            None if own_imp is None else round(own_imp, 4),
            None if own_exp is None else round(own_exp, 4),
        )


def _predicted_kw(
    device: Device,
    states: Mapping[str, DeviceState | None],
    baselines: Mapping[str, float],
    slots: Mapping[str, _Slot],
) -> float:
    """A member's net power this period: its setpoint when planned, else what it measures."""
    did = device.device_id
    slot = slots.get(did)
    state = states.get(did)
    if slot is not None:
        if device.der_class in SHIFTS_FROM_BASELINE:
            own = baselines.get(did)
            base = own if own is not None else (state.power_kw if state else 0.0)
            return base + slot.kw
        return slot.kw
    if state is not None:
        return state.power_kw
    return baselines.get(did, 0.0)


def _relieve(
    cid: str,
    side: float,
    excess: float,
    members: Sequence[Device],
    modulating: Sequence[Device],
    states: Mapping[str, DeviceState | None],
    baselines: Mapping[str, float],
    slots: dict[str, _Slot],
    remaining_s: float,
) -> float:
    """Move the group's net power by up to ``excess`` kW against ``side`` (+1: it imports too
    much, -1: it exports too much); returns how far it moved."""
    moved = 0.0
    # 1. Setpoints pushing past the limit shrink proportionally (the envelope wins).
    pushing = {
        m.device_id: sl
        for m in members
        if (sl := slots.get(m.device_id)) is not None and sl.kw * side > _EPS
    }
    push_total = sum(sl.kw * side for sl in pushing.values())
    if push_total > _EPS:
        cut = min(excess, push_total)
        factor = 1.0 - cut / push_total
        for sl in pushing.values():
            sl.kw *= factor
            if cid not in sl.limited_by:
                sl.limited_by += (cid,)
        moved += cut
    # 2. Batteries offset the rest: those dispatched go further, those left alone are called.
    #    3. Then thermal loads are shed (import) or loaded up (export).
    free = {d.device_id for d in modulating}
    eligible_classes: tuple[frozenset[DerClass], ...] = (
        frozenset({DerClass.BATTERY}),
        SHIFTS_FROM_BASELINE,
    )
    for eligible in eligible_classes:
        if excess - moved <= _EPS:
            break
        rooms: dict[str, float] = {}
        for device in members:
            did = device.device_id
            state = states.get(did)
            if device.der_class not in eligible or not plannable(device, state):
                continue
            if did not in slots and did not in free and device.der_class in MODULATING:
                continue
            room = headroom(device, state, remaining_s, baselines.get(did))
            most = room.discharge_kw if side > 0 else room.charge_kw
            slot = slots.get(did)
            # A device called now starts from 0: a thermal load's setpoint is a change from
            # the baseline it measures now; a battery left alone is not in the net above (its
            # standing limits govern it), so its setpoint is all that it adds.
            now_kw = slot.kw if slot is not None else 0.0
            rooms[did] = max(0.0, most + side * now_kw)
        shares = share(-side * (excess - moved), rooms)
        for did, kw in shares.items():
            if abs(kw) <= _EPS:
                continue
            slot = slots.get(did)
            if slot is None:
                slots[did] = _Slot(cid, "envelope", kw, kw)
            else:
                slot.kw += kw
                if cid not in slot.limited_by and slot.command_id != cid:
                    slot.limited_by += (cid,)
            moved += abs(kw)
    return moved


def allocations_changed(
    before: Iterable[Allocation], after: Iterable[Allocation], tolerance_kw: float
) -> bool:
    a = {x.device_id: x.commanded_kw for x in before}
    b = {x.device_id: x.commanded_kw for x in after}
    if a.keys() != b.keys():
        return True
    return any(abs(a[k] - b[k]) > tolerance_kw for k in a)
