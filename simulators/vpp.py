"""An in-process virtual power plant: the gateway's control path over vectorised device physics.

For measuring dispatch delivery on fleets too large, or events too long, to run over a broker in
a test: the same planner (:func:`gateway.dispatch.plan`), baseline tracker and closed loop
(:mod:`gateway.delivery`) and thermostat offset mapping (:mod:`adapters.mqtt_devices.devices`)
that the gateway runs, each control period, over devices whose physics are numpy arrays:

* air conditioners: the first-order house of :class:`simulators.mqtt_devices.ThermalHouse`
  (``C dT/dt = (T_out − T_in)/R − on·COP·P``, compressor with hysteresis around the setpoint
  plus the offset in force), with houses that differ in size, insulation and setpoint;
* water heaters: the fully mixed tank of :class:`simulators.mqtt_devices.Tank` (element on/off
  with a deadband around the setpoint of the mode in force: normal, shed down to the floor,
  load-up to the top; standby losses; random hot-water draws replaced by cold water), driven as
  the MQTT water-heater adapter drives it (a shed or load-up mode, normal below its deadband);
* batteries: power follows the setpoint at the next period, SoC integrates it.

What the control path sees is what a gateway sees: readings with noise, some missing each period
(a device whose reading is missing is not fresh and is planned around for that period). No I/O,
no clock: time is an argument, so an hour of physics runs in well under a second of CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

from adapters.mqtt_devices.devices import (
    MqttDeviceSettings,
    offset_for_change,
    offset_range,
    worth_an_offset,
)
from gateway import dispatch
from gateway.delivery import (
    BaselineTracker,
    DeliveryLoop,
    DeliveryTuning,
    ReleaseGovernor,
    baseline_taus,
    close_loops,
    govern_releases,
    planning_baselines,
)
from gateway.dispatch import SHIFTS_FROM_BASELINE
from gateway.flex.profiles import BaselineProfile
from gateway.registry import Registry
from protocols.mqtt.devices import HvacMode
from unified.model import (
    BatteryConstraints,
    BatteryRatings,
    Delivery,
    DerClass,
    Device,
    DeviceCommand,
    DeviceState,
    ScheduledCommand,
    TopologyLocation,
)

__all__ = ["FleetSpec", "Sample", "VirtualPowerPlant"]

_SUBSTEP_S = 10.0
_WATER_KWH_PER_L_C = 4.186 / 3600.0
# A water heater's tank (as simulators.mqtt_devices.Tank): °C, kW per °C, mean draw in litres.
_W_SHED_FLOOR_C, _W_LOAD_UP_C, _W_DEADBAND_C = 40.0, 60.0, 3.0
_W_INLET_C, _W_AMBIENT_C, _W_LOSS_KW_PER_C, _W_DRAW_L = 15.0, 20.0, 0.002, 20.0
_NORMAL, _SHED, _LOAD_UP = 0, 1, 2
_Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class FleetSpec:
    thermostats: int = 100
    batteries: int = 0
    water_heaters: int = 0
    draw_l_per_h: float = 10.0
    """Mean hot water drawn per heater (an afternoon's: a tenth of a day's 200-250 L), in draws
    of 20 L on average."""
    feeders: int = 1
    outdoor_c: float = 32.0
    warming_c_per_h: float = 0.0
    """Outdoor temperature rise per hour from the start (a warming afternoon: the houses'
    counterfactual load drifts up over an event)."""
    seed: int = 1
    day: int = 0
    """Another day of the same fleet (0: the run's own): the houses are built alike, their
    starting temperatures and cycles are drawn anew (the similar days of a same-hour profile)."""
    noise_kw: float = 0.02
    """Standard deviation of each reading's noise."""
    dropout: float = 0.02
    """Probability that a device's reading is missing in a period: the gateway then has the
    previous one, until it is older than ``stale_after_s``."""
    stale_after_s: float = 30.0
    battery_soc_pct: tuple[float, float] = (40.0, 90.0)
    burn_in_s: float = 6 * 3600.0
    """Physics run before the start, so that the compressors' cycles are spread as in a real
    fleet (houses started together stay in step for hours: the aggregate then swings by a
    tenth, which no baseline can follow)."""
    settings: MqttDeviceSettings = field(default_factory=MqttDeviceSettings)


@dataclass(frozen=True, slots=True)
class Sample:
    at: datetime
    power_kw: dict[str, float]
    """Group id → true net power of its members."""
    delivery: dict[str, Delivery]
    comfort_breaches: int
    """Houses above the customer's comfort band (cooling) beyond their compressor's hysteresis."""
    reserve_breaches: int


class VirtualPowerPlant:
    """A fleet and the gateway's control path; :meth:`run` steps both."""

    def __init__(
        self,
        spec: FleetSpec,
        start: datetime,
        *,
        closed_loop: bool = True,
        tuning: DeliveryTuning | None = None,
        control_period_s: float = 10.0,
        deadband_kw: float = 0.05,
        thermal_turn_s: float = 1800.0,
        baseline_tau_s: float = 900.0,
        refresh_s: float = 60.0,
        release_s: float = 10_800.0,
        govern_release: bool = True,
        allocator: dispatch.Allocator = "lp",
    ) -> None:
        """``release_s`` and ``tuning.rebound_limit`` are the gateway's ``[delivery]`` settings;
        ``govern_release = False`` releases on the ``release_s`` schedule alone (no
        :class:`gateway.delivery.ReleaseGovernor`), as the gateway did before it; ``allocator`` is
        its ``[dispatch] allocator``."""
        self.release_s = release_s
        self.allocator: dispatch.Allocator = allocator
        self.govern_release = govern_release
        self.refresh_s = refresh_s
        self.thermal_turn_s = thermal_turn_s
        self.spec = spec
        self.now = start
        self.closed_loop = closed_loop
        self.tuning = tuning or DeliveryTuning()
        self.period_s = control_period_s
        self.deadband_kw = deadband_kw
        rng = np.random.default_rng(spec.seed)
        self._rng = np.random.default_rng(spec.seed + 1)
        n = spec.thermostats
        self.rated = rng.uniform(2.5, 4.0, n)
        self.cop = np.full(n, 3.0)
        self.capacitance = rng.uniform(1.5, 3.0, n)  # kWh/°C
        # Insulation such that the houses run 40-70 % of the time at the outdoor temperature.
        self.setpoint = rng.choice([21.0, 22.0, 23.0], n)
        duty = rng.uniform(0.4, 0.7, n)
        self.resistance = (spec.outdoor_c - self.setpoint) / (duty * self.rated * self.cop)
        self.hysteresis = np.full(n, 0.5)
        self.indoor = self.setpoint + rng.uniform(-0.5, 0.5, n)
        self.on = rng.random(n) < duty
        self._start = start
        if spec.day:
            day_rng = np.random.default_rng((spec.seed, spec.day))
            self.indoor = self.setpoint + day_rng.uniform(-0.5, 0.5, n)
            self.on = day_rng.random(n) < duty
        self.offset = np.zeros(n)
        self._step_houses(spec.burn_in_s)
        m = spec.batteries
        self.b_rated = rng.choice([5.0, 7.0, 10.0], m)
        self.b_capacity = self.b_rated * 2.0
        self.b_soc = rng.uniform(*spec.battery_soc_pct, m)
        self.b_power = np.zeros(m)
        self.b_setpoint = np.zeros(m)
        self.b_reserve = np.full(m, 20.0)
        self._init_heaters(spec)
        devices: list[Device] = []
        for i in range(n):
            devices.append(self._device(f"t{i}", DerClass.THERMOSTAT, i, float(self.rated[i])))
        for j in range(m):
            devices.append(self._device(f"b{j}", DerClass.BATTERY, j, float(self.b_rated[j])))
        for k in range(spec.water_heaters):
            devices.append(
                self._device(f"w{k}", DerClass.WATER_HEATER, k, float(self.w_rated[k]))
            )
        self.devices = devices
        self.registry = Registry(devices)
        self._thermal = {d.device_id for d in devices if d.der_class in SHIFTS_FROM_BASELINE}
        self.baselines = BaselineTracker(baseline_tau_s, baseline_taus(devices))
        self.loops: dict[str, DeliveryLoop] = {}
        self.profiles: dict[str, BaselineProfile] = {}
        """Same-hour profiles of the thermal loads' history (the gateway reads them from its
        reading history); empty: every baseline is the flat pre-event level."""
        self.governors: dict[str, ReleaseGovernor] = {}
        self.plan = dispatch.Plan()
        self.commands: list[ScheduledCommand] = []
        self._desired: dict[str, DeviceCommand] = {}
        self._last_states: dict[str, DeviceState] = {}

    def _init_heaters(self, spec: FleetSpec) -> None:
        # Their own generator: a fleet without water heaters draws the numbers it always drew.
        rng = self._w_rng = np.random.default_rng(spec.seed + 2)
        k = spec.water_heaters
        self.w_rated = rng.choice([3.8, 4.5, 5.5], k)
        self.w_litres = rng.choice([150.0, 190.0, 270.0], k)
        self.w_setpoint = rng.choice([49.0, 52.0, 55.0], k)
        self.w_tank = self.w_setpoint - rng.uniform(0.0, _W_DEADBAND_C, k)
        self.w_on = np.zeros(k, dtype=bool)
        self.w_mode = np.zeros(k, dtype=np.int8)  # _NORMAL, _SHED, _LOAD_UP
        self._step_heaters(spec.burn_in_s)

    def _device(self, device_id: str, der_class: DerClass, i: int, rated: float) -> Device:
        is_battery = der_class is DerClass.BATTERY
        if der_class is DerClass.WATER_HEATER:
            return Device(
                device_id=device_id,
                der_class=der_class,
                adapter="vpp",
                location=TopologyLocation(substation="s1", feeder=f"f{i % self.spec.feeders + 1}"),
                ratings=BatteryRatings(
                    max_charge_kw=rated,
                    max_discharge_kw=rated,
                    capacity_kwh=float(self._w_capacity()[i]),
                ),
            )
        return Device(
            device_id=device_id,
            der_class=der_class,
            adapter="vpp",
            location=TopologyLocation(substation="s1", feeder=f"f{i % self.spec.feeders + 1}"),
            ratings=BatteryRatings(
                max_charge_kw=rated,
                max_discharge_kw=rated,
                capacity_kwh=rated * 2.0 if is_battery else self._thermal_capacity(rated),
            ),
            constraints=BatteryConstraints(reserve_soc_pct=20.0 if is_battery else 0.0),
        )

    def _thermal_capacity(self, rated: float) -> float:
        return self.spec.settings.thermal_capacity_kwh or rated

    # ------------------------------------------------------------------ physics
    def _w_kwh_per_c(self) -> _Array:
        return self.w_litres * _WATER_KWH_PER_L_C

    def _w_capacity(self) -> _Array:
        """Storage between the shed floor and the load-up temperature (the adapter's capacity)."""
        return self._w_kwh_per_c() * (_W_LOAD_UP_C - _W_SHED_FLOOR_C)

    def _w_stored_pct(self) -> _Array:
        take = np.clip(self._w_kwh_per_c() * (_W_LOAD_UP_C - self.w_tank), 0.0, None)
        capacity = self._w_capacity()
        return 100.0 * (1.0 - np.minimum(take, capacity) / capacity)

    def _step_heaters(self, dt_s: float) -> None:
        """:class:`simulators.mqtt_devices.Tank`, vectorised: draws, thermostat, losses."""
        k = self.spec.water_heaters
        if k == 0:
            return
        rng = self._w_rng
        per_c = self._w_kwh_per_c()
        shed, up = self.w_mode == _SHED, self.w_mode == _LOAD_UP
        on_below = np.where(
            shed,
            _W_SHED_FLOOR_C,
            np.where(up, _W_LOAD_UP_C - 1.0, self.w_setpoint - _W_DEADBAND_C),
        )
        off_above = np.where(
            shed, _W_SHED_FLOOR_C + _W_DEADBAND_C, np.where(up, _W_LOAD_UP_C, self.w_setpoint)
        )
        remaining = dt_s
        while remaining > 0:
            dt = min(remaining, _SUBSTEP_S)
            remaining -= dt
            # Draws of 20 L on average, as often as the mean draw rate needs.
            drawing = rng.random(k) < self.spec.draw_l_per_h / _W_DRAW_L * dt / 3600.0
            if drawing.any():
                litres = np.minimum(rng.exponential(_W_DRAW_L, k), self.w_litres) * drawing
                self.w_tank += (_W_INLET_C - self.w_tank) * litres / self.w_litres
            self.w_on = np.where(
                self.w_tank < on_below, True, np.where(self.w_tank >= off_above, False, self.w_on)
            )
            power = np.where(self.w_on, self.w_rated, 0.0)
            loss = (self.w_tank - _W_AMBIENT_C) * _W_LOSS_KW_PER_C
            self.w_tank += (power - loss) * (dt / 3600.0) / per_c

    def heater_power(self) -> _Array:
        return np.where(self.w_on, self.w_rated, 0.0)

    def _step(self, dt_s: float) -> None:
        self._step_houses(dt_s)
        self._step_heaters(dt_s)
        self.b_power = self.b_setpoint.copy()
        self.b_soc += self.b_power * dt_s / 3600.0 / self.b_capacity * 100.0
        self.b_soc = np.clip(self.b_soc, 0.0, 100.0)

    def _step_houses(self, dt_s: float) -> None:
        remaining = dt_s
        hours = max(0.0, (self.now - self._start).total_seconds() / 3600.0)
        outdoor = self.spec.outdoor_c + self.spec.warming_c_per_h * hours
        while remaining > 0:
            dt = min(remaining, _SUBSTEP_S)
            remaining -= dt
            gain = (outdoor - self.indoor) / self.resistance
            cooling = np.where(self.on, self.rated * self.cop, 0.0)
            self.indoor += (gain - cooling) * (dt / 3600.0) / self.capacitance
            target = self.setpoint + self.offset
            self.on = np.where(
                self.indoor > target + self.hysteresis,
                True,
                np.where(self.indoor < target - self.hysteresis, False, self.on),
            )

    def thermostat_power(self) -> _Array:
        return np.where(self.on, self.rated, 0.0)

    def true_power(self) -> dict[str, float]:
        t_kw, w_kw, b_kw = self.thermostat_power(), self.heater_power(), self.b_power
        out: dict[str, float] = {}
        step = self.spec.feeders
        for k in range(step):
            f = f"f{k + 1}"
            out[f"feeder:{f}"] = float(
                t_kw[k::step].sum() + b_kw[k::step].sum() + w_kw[k::step].sum()
            )
        out["substation:s1"] = float(t_kw.sum() + b_kw.sum() + w_kw.sum())
        return out

    # ------------------------------------------------------------------ what the gateway sees
    def states(self) -> dict[str, DeviceState | None]:
        """Each device's reading this period (``None``: none, or only a stale one)."""
        spec = self.spec
        settings = spec.settings
        band = settings.comfort_max_c - settings.comfort_min_c
        headroom = np.clip(100.0 * (settings.comfort_max_c - self.indoor) / band, 0.0, 100.0)
        t_kw = self.thermostat_power()
        n, m, k = spec.thermostats, spec.batteries, spec.water_heaters
        noise = self._rng.normal(0.0, spec.noise_kw, n + m)
        missing = self._rng.random(n + m) < spec.dropout
        if k:
            noise = np.concatenate([noise, self._rng.normal(0.0, spec.noise_kw, k)])
            missing = np.concatenate([missing, self._rng.random(k) < spec.dropout])
        out: dict[str, DeviceState | None] = {}
        now, make = self.now, DeviceState
        t_power = np.maximum(0.0, t_kw + noise[:n]).tolist()
        rated, head, gone = self.rated.tolist(), headroom.tolist(), missing.tolist()
        for i in range(n):
            did = f"t{i}"
            if gone[i]:
                out[did] = self._last_fresh(did)
                continue
            out[did] = make(
                device_id=did,
                timestamp=now,
                power_kw=t_power[i],
                soc_pct=head[i],
                capacity_kwh=self._thermal_capacity(rated[i]),
                max_charge_kw=rated[i],
                max_discharge_kw=rated[i],
                source="vpp",
            )
        b_power = (self.b_power + noise[n : n + m]).tolist()
        b_soc, b_capacity = self.b_soc.tolist(), self.b_capacity.tolist()
        for j in range(m):
            did = f"b{j}"
            if gone[n + j]:
                out[did] = self._last_fresh(did)
                continue
            out[did] = make(
                device_id=did,
                timestamp=now,
                power_kw=b_power[j],
                soc_pct=b_soc[j],
                capacity_kwh=b_capacity[j],
                source="vpp",
            )
        if k:
            w_power = np.maximum(0.0, self.heater_power() + noise[n + m :]).tolist()
            stored, capacity = self._w_stored_pct().tolist(), self._w_capacity().tolist()
            w_rated = self.w_rated.tolist()
            for q in range(k):
                did = f"w{q}"
                if gone[n + m + q]:
                    out[did] = self._last_fresh(did)
                    continue
                out[did] = make(
                    device_id=did,
                    timestamp=now,
                    power_kw=w_power[q],
                    soc_pct=stored[q],
                    capacity_kwh=capacity[q],
                    max_charge_kw=w_rated[q],
                    max_discharge_kw=w_rated[q],
                    source="vpp",
                )
        self._last_states.update({d: s for d, s in out.items() if s is not None})
        return out

    def _last_fresh(self, device_id: str) -> DeviceState | None:
        last = self._last_states.get(device_id)
        if last is None or (self.now - last.timestamp).total_seconds() > self.spec.stale_after_s:
            return None
        return last

    # ------------------------------------------------------------------ the control path
    def control(self, states: dict[str, DeviceState | None] | None = None) -> dict[str, Delivery]:
        """One control period of the gateway: close the loops, plan, apply."""
        now = self.now
        if states is None:
            states = self.states()
        observe, desired = self.baselines.observe, self._desired
        for did, state in states.items():
            if state is not None:
                observe(did, now, state.power_kw, held=did in desired)
        deliveries: dict[str, Delivery] = {}
        allowance: dict[str, float] = {}
        if self.closed_loop:
            deliveries = close_loops(
                now,
                self.plan,
                states,
                self.baselines,
                self.loops,
                self.tuning,
                self._thermal,
                self.governors,
                {c.command_id: self.profiles for c in self.commands} if self.profiles else None,
            )
            if self.govern_release:
                allowance = govern_releases(now, self.plan, states, self.governors)
        corrections = {cid: loop.correction_kw for cid, loop in self.loops.items()}
        active = [
            dispatch.ActiveCommand(c, seq)
            for seq, c in enumerate(self.commands)
            if c.start <= now < c.end
        ]
        plan = dispatch.plan(
            now,
            self.registry,
            states,
            active,
            planning_baselines(now, self.loops, self.baselines.mean_kw),
            corrections,
            self.plan,
            self.thermal_turn_s,
            self.release_s,
            allowance,
            allocator=self.allocator,
        )
        self._apply(plan)
        self.plan = plan
        return deliveries

    def _apply(self, plan: dispatch.Plan) -> None:
        settings = self.spec.settings
        setpoints, desired = plan.setpoints, self._desired
        for index, device in enumerate(self.devices):
            did = device.device_id
            new = setpoints.get(did)
            old = desired.get(did)
            if new is old:
                continue  # the planner keeps an unchanged command's object: nothing to apply
            if (
                new is not None
                and old is not None
                and new.power_kw is not None
                and old.power_kw is not None
                and abs(new.power_kw - old.power_kw) < self.deadband_kw
            ):
                continue
            if new is None:
                self._desired.pop(did, None)
            else:
                self._desired[did] = new
            if device.der_class is DerClass.WATER_HEATER:
                self._mode_for(index - self.spec.thermostats - self.spec.batteries, new)
                continue
            if device.der_class is DerClass.BATTERY:
                j = index - self.spec.thermostats
                kw = 0.0 if new is None or new.power_kw is None else new.power_kw
                self.b_setpoint[j] = max(-self.b_rated[j], min(self.b_rated[j], kw))
                continue
            i = index
            power = None if new is None else new.power_kw
            rated = float(self.rated[i])
            if new is None or power is None or not worth_an_offset(power, rated, settings):
                self.offset[i] = 0.0
                continue
            if _releasing(new) and self.offset[i] != 0:
                continue  # waiting to be released: the offset stays where it is
            self._offset_for(i, power)

    def _mode_for(self, k: int, command: DeviceCommand | None) -> None:
        """What :class:`adapters.mqtt_devices.devices.MqttWaterHeater` sends: shed or load-up,
        normal below its deadband; a heater waiting to be released keeps its mode."""
        power = None if command is None else command.power_kw
        rated = float(self.w_rated[k])
        if command is None or power is None:
            self.w_mode[k] = _NORMAL
        elif _releasing(command) and self.w_mode[k] != _NORMAL:
            return
        elif abs(power) < self.spec.settings.deadband_fraction * rated:
            self.w_mode[k] = _NORMAL
        else:
            self.w_mode[k] = _SHED if power < 0 else _LOAD_UP

    def _offset_for(self, i: int, power: float) -> None:
        settings = self.spec.settings
        shed_room, absorb_room = offset_range(float(self.setpoint[i]), HvacMode.COOL, settings)
        room = shed_room if power < 0 else absorb_room
        if abs(room) < settings.min_offset_c:
            return  # the adapter refuses: the offset in force stays
        self.offset[i] = offset_for_change(
            power,
            float(self.rated[i]),
            float(room),
            settings,
            float(self.indoor[i] - self.setpoint[i]),
        )

    def refresh(self) -> None:
        """What the supervisors do every ``refresh_s``: re-apply each setpoint in force (the
        adapter recomputes the offset from the house's telemetry)."""
        for i in range(self.spec.thermostats):
            command = self._desired.get(f"t{i}")
            power = None if command is None else command.power_kw
            if command is None or power is None or _releasing(command):
                continue  # nothing in force, or waiting to be released: the offset stays
            if worth_an_offset(power, float(self.rated[i]), self.spec.settings):
                self._offset_for(i, power)

    def run(
        self, until: datetime, *, record_s: float = 60.0, physics_only: bool = False
    ) -> list[Sample]:
        """Step physics and control to ``until``; one sample every ``record_s``.

        ``physics_only``: the devices left alone, no control path (a counterfactual: with no
        command the control path changes nothing, and the physics draws no numbers the readings
        draw, so it is the same run as with it, in a fraction of the time)."""
        samples: list[Sample] = []
        next_record = self.now
        settings = self.spec.settings
        next_refresh = self.now
        while self.now < until:
            deliveries = {} if physics_only else self.control()
            if not physics_only and self.now >= next_refresh:
                self.refresh()
                next_refresh = self.now + timedelta(seconds=self.refresh_s)
            if self.now >= next_record:
                above = self.indoor > settings.comfort_max_c + self.hysteresis + 0.05
                reserve = self.b_soc < self.b_reserve - 0.5
                # A tank held by the gateway below its shed floor by more than its deadband
                # (a draw can take a tank at the floor lower; the element then runs at once).
                cold = (self.w_tank < _W_SHED_FLOOR_C - _W_DEADBAND_C) & (self.w_mode != _NORMAL)
                samples.append(
                    Sample(
                        at=self.now,
                        power_kw=self.true_power(),
                        delivery=deliveries,
                        comfort_breaches=int(np.count_nonzero(above & (self.offset != 0)))
                        + int(np.count_nonzero(cold)),
                        reserve_breaches=int(np.count_nonzero(reserve)),
                    )
                )
                next_record = self.now + timedelta(seconds=record_s)
            self.advance()
        return samples

    def advance(self) -> None:
        """Physics over one control period."""
        self._step(self.period_s)
        self.now += timedelta(seconds=self.period_s)

    def add(self, commands: Sequence[ScheduledCommand]) -> None:
        self.commands.extend(commands)


def _releasing(command: DeviceCommand) -> bool:
    return bool(command.provenance) and command.provenance[0].kind == "release"
