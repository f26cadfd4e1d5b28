"""Group telemetry estimation benchmark: a synthetic fleet with known truth and real faults.

    python -m bench.telemetry_estimation [--quick] [--seed N] [--json FILE] [--scenario NAME]
                                         [--fingerprints]

A fleet of 10,000 devices over 20 feeders is simulated in 20 s steps (all vectorised):

* **air conditioners** (40 %): indoor temperature relaxes toward a diurnal outdoor temperature
  and the compressor cycles on a thermostat deadband (2.5–5 kW); some occupants lower their
  setpoint at 17:00 (a correlated step in demand);
* **water heaters** (25 %): tank energy deficit from random hot-water draws (morning and evening
  peaks) and standby loss, a 3.8–5.5 kW element on a hysteresis;
* **EV chargers** (20 %): one evening session (arrival ~17:45 ± 1.5 h, 5–35 kWh at 3.6/7.2/11
  kW), a third of them on a 21:00 time-of-use timer (a cliff in demand);
* **batteries** (15 %): midday solar charging with cloud noise, evening discharge following
  house load, limited by state of charge and reserve.

Devices report every 60 s through one of six vendor clouds; readings carry a 1 % meter error.
As in operation, no vendor payload fingerprint or state-change hint reaches the classifier unless
``--fingerprints`` is given (the running gateway is never handed either). What the running
gateway does have from each ``DeviceState`` comes with every reading (``--no-device-state``: power
alone): the state of charge of batteries and of water-heater tanks, and whether the device's
own state says it must draw power (a tank below its band; an EV plugged in, allowed to charge
and needing energy), from which the classifier finds sensors stuck at zero. Faults injected (every
scenario): per-device Markov dropouts; 1 % of devices stuck for 1–4 h (a frozen power sensor;
with ``--fingerprints``, a frozen payload where the vendor sends fingerprints); 1 % of devices
stale for 0.5–3 h (the cloud re-serves the last reading); 1 % of values ×10; 2 % of readings
delivered twice; latency lognormal (median 2 s) plus 5 % of readings delayed 30–300 s; 10 % of
devices with clock skew of ±1–10 min. Scenarios:

* ``random20`` — dropouts at a 20 % stationary loss rate (mean outage 10 min);
* ``correlated`` — 5 % random loss, plus the largest vendor cloud (≈30 % of devices: 45 % of the
  ACs and half the water heaters) down 17:00–19:00, backfilling its last 30 min late on
  recovery, and one feeder's backhaul down 19:30–21:00 (no backfill);
* ``unit_error`` — 5 % loss; the EV cloud of vendor 3 (≈9 % of devices) reports W as kW (×1000),
  2 % of devices report kW as MW (×0.001) and 2 % of the loads report generator convention;
* ``stuck_zero`` — 5 % loss; 6 % of devices (every class) have a power sensor stuck at 0 kW,
  unflagged, for 1–6 h from a random time;
* ``dr_event`` — 5 % loss; a demand-response event 17:00–19:00: half the ACs raise their
  setpoint by 2 °C (step down at the start, snapback at the end), half the batteries discharge
  at 3 kW; 5 % of those batteries serve a frozen register for the event. The bench tells the
  gateway's ``CommandBoard`` what the core's control loop would: the cohorts, the expected
  response (ACs 0 kW, batteries −3 kW held; released ACs back at their rating) and when.

Methods compared, every 60 s at fleet and feeder level, against the true instantaneous total:
the gateway (``QualityClassifier`` → ``GroupEstimator``), and three naive baselines working on
raw arrivals — *sum of received* (values received in the last period), *last value carried
forward* (every device's newest arrival, however old), *N × mean* (mean of the values received
in the last period times the number of devices, with the textbook simple-random-sampling 90 %
interval). The estimator never sees the truth or which devices are faulty. Metrics are taken
after a one-hour warm-up (history and clock offsets are learnt online).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.telemetry import (
    CommandBoard,
    Detail,
    DeviceProfile,
    EstimatorConfig,
    FleetIndex,
    GroupEstimator,
    QualityClassifier,
)
from unified.model import DerClass

F = npt.NDArray[np.float64]
I = npt.NDArray[np.intp]  # noqa: E741
B = npt.NDArray[np.bool_]

DAY0 = 1_752_537_600.0  # 2025-07-15 00:00 UTC; the simulated clock is "local" hours of that day
STEP_S = 20.0
PERIOD_S = 60.0
STEPS_PER_PERIOD = 3
N_FEEDERS = 20
AC, WH, EV, BAT = 0, 1, 2, 3
KIND_CLASS = (DerClass.THERMOSTAT, DerClass.WATER_HEATER, DerClass.EVSE, DerClass.BATTERY)
KIND_SHARE = (0.40, 0.25, 0.20, 0.15)
# Vendor mix per device kind; vendor 0 is the big thermostat / water-heater cloud.
VENDOR_MIX = (
    (0.45, 0.35, 0.0, 0.0, 0.0, 0.20),
    (0.50, 0.0, 0.0, 0.0, 0.0, 0.50),
    (0.0, 0.0, 0.55, 0.45, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.70, 0.30),
)
VENDOR_FINGERPRINT = np.array([True, False, True, False, True, False])
VENDOR_HINT = np.array([True, True, False, False, True, False])
EVENT_OFFSET_C = 2.0
EVENT_BATTERY_KW = 3.0
# Nameplate bounds configured in the registry (looser than most devices' real draw).
# A water heater's tank: heat below the full tank (kWh) over which ``soc_pct`` is reported; the
# element switches on 1.2 kWh down, so below 60 % it must be heating.
TANK_KWH = 4.0
TANK_BAND_SOC = 60.0
BOUNDS = {AC: (-0.1, 7.0), WH: (-0.1, 6.0), EV: (-0.1, 12.0), BAT: (-5.5, 5.5)}


def hours(t: float) -> float:
    return (t - DAY0) / 3600.0


# --------------------------------------------------------------------------- physics


class Fleet:
    """Ground truth: device physics, vectorised over the fleet."""

    def __init__(self, n: int, rng: np.random.Generator, start_h: float) -> None:
        self.n = n
        self.kind = rng.choice(4, size=n, p=KIND_SHARE).astype(np.intp)
        weights = rng.dirichlet(np.full(N_FEEDERS, 40.0))
        self.feeder = rng.choice(N_FEEDERS, size=n, p=weights).astype(np.intp)
        self.vendor = np.empty(n, dtype=np.intp)
        for k in range(4):
            sel = self.kind == k
            self.vendor[sel] = rng.choice(6, size=int(sel.sum()), p=VENDOR_MIX[k])
        self.feeder_temp = rng.normal(0.0, 1.0, N_FEEDERS)
        self.weather = 0.0
        k = self.kind
        # Air conditioners.
        self.ac_p = rng.uniform(2.5, 5.0, n)
        self.ac_tau = rng.uniform(2.0, 5.0, n)
        self.ac_sp = rng.normal(24.0, 1.0, n) + np.array([0.5, -0.5, 0, 0, 0, 0.0])[self.vendor]
        duty = rng.uniform(0.6, 0.95, n)
        self.ac_q = (36.0 - self.ac_sp) / (self.ac_tau * duty)
        self.ac_evening_drop = np.where(rng.random(n) < 0.3, rng.uniform(1.0, 2.0, n), 0.0)
        self.t_in = self.ac_sp + rng.uniform(-0.5, 0.5, n)
        self.ac_on = rng.random(n) < 0.5
        # Water heaters.
        self.wh_p = rng.choice([3.8, 4.5, 5.5], size=n, p=[0.3, 0.5, 0.2])
        self.wh_deficit = rng.uniform(0.0, 1.5, n)
        self.wh_on = rng.random(n) < 0.2
        self.wh_usage = rng.lognormal(0.0, 0.4, n)
        # EVs.
        self.ev_rate = rng.choice([3.6, 7.2, 11.0], size=n, p=[0.2, 0.6, 0.2])
        has_session = rng.random(n) < 0.7
        arrival = np.minimum(rng.normal(17.75, 1.5, n), 23.5)
        timer = rng.random(n) < 0.35
        self.ev_start = np.where(timer, np.maximum(arrival, 21.0), arrival)
        self.ev_start = np.where(has_session, self.ev_start, np.inf)
        # Sessions that started before the simulation have charged since their start.
        charged = np.clip(start_h - self.ev_start, 0.0, None) * self.ev_rate
        self.ev_need = np.maximum(rng.uniform(5.0, 35.0, n) - charged, 0.0)
        # Batteries.
        self.bat_cap = np.full(n, 13.5)
        self.bat_soc = rng.uniform(0.3, 0.6, n)
        self.bat_charge = rng.uniform(1.5, 3.5, n)
        self.bat_house = rng.uniform(0.8, 2.5, n)
        self.bat_noise = np.zeros(n)
        self.power = np.zeros(n)
        self.state = np.zeros(n, dtype=np.int8)
        # Demand response (scenario ``dr_event``): half the ACs raise their setpoint by 2 °C and
        # half the batteries discharge at 3 kW for the event; both let go at its end.
        self.event: tuple[float, float] | None = None
        self.ac_in_event = (k == AC) & (rng.random(n) < 0.5)
        self.bat_in_event = (k == BAT) & (rng.random(n) < 0.5)
        self._rng = rng
        self._is = [k == j for j in range(4)]

    def outdoor(self, h: float) -> F:
        base = 27.0 + 7.0 * np.sin(2 * np.pi * (h - 9.0) / 24.0) + self.weather
        temp: F = base + self.feeder_temp[self.feeder]
        return temp

    def step(self, t: float) -> None:
        """Advance STEP_S seconds to time ``t``."""
        rng, n, dt = self._rng, self.n, STEP_S / 3600.0
        h = hours(t)
        self.weather = 0.995 * self.weather + rng.normal(0.0, 0.05)
        is_ac, is_wh, is_ev, is_bat = self._is
        # AC: thermostat on a 1 °C deadband.
        sp = self.ac_sp - np.where(h >= 17.0, self.ac_evening_drop, 0.0)
        in_event = self.event is not None and self.event[0] <= h < self.event[1]
        if in_event:
            sp = sp + np.where(self.ac_in_event, EVENT_OFFSET_C, 0.0)
        t_out = self.outdoor(h)
        self.t_in += ((t_out - self.t_in) / self.ac_tau - self.ac_on * self.ac_q) * dt
        self.t_in += rng.normal(0.0, 0.02, n)
        self.ac_on = np.where(
            self.t_in >= sp + 0.5, True, np.where(self.t_in <= sp - 0.5, False, self.ac_on)
        )
        # Water heaters: random draws, peaks morning and evening.
        rate = (
            0.15
            + 0.9 * np.exp(-(((h - 7.5) / 1.2) ** 2))
            + 0.7 * np.exp(-(((h - 19.5) / 1.5) ** 2))
        )
        draw = rng.random(n) < rate * dt * self.wh_usage
        self.wh_deficit += np.where(draw, rng.exponential(1.2, n), 0.0) + 0.06 * dt
        self.wh_deficit -= np.where(self.wh_on, self.wh_p * dt, 0.0)
        self.wh_on = np.where(
            self.wh_deficit > 1.2, True, np.where(self.wh_deficit <= 0.0, False, self.wh_on)
        )
        self.wh_deficit = np.maximum(self.wh_deficit, 0.0)
        # EVs: charge at full rate from the session start until the energy need is met.
        ev_on = (h >= self.ev_start) & (self.ev_need > 0)
        self.ev_need -= np.where(ev_on, self.ev_rate * dt, 0.0)
        # Batteries: solar charging 11-15 h, evening discharge 17-21 h, within SoC limits.
        self.bat_noise = 0.98 * self.bat_noise + rng.normal(0.0, 0.08, n)
        charge = (h >= 11.0) & (h < 15.0) & (self.bat_soc < 1.0)
        discharge = (h >= 17.0) & (h < 21.0) & (self.bat_soc > 0.2)
        bp = np.where(charge, np.clip(self.bat_charge * (1 + 2 * self.bat_noise), 0.0, 5.0), 0.0)
        bp = np.where(discharge, -np.clip(self.bat_house * (1 + 2 * self.bat_noise), 0.0, 5.0), bp)
        if in_event:
            bp = np.where(self.bat_in_event & (self.bat_soc > 0.1), -EVENT_BATTERY_KW, bp)
        self.bat_soc += bp * dt / self.bat_cap
        power = np.where(is_ac, np.where(self.ac_on, self.ac_p, 0.03), 0.0)
        power = np.where(is_wh, np.where(self.wh_on, self.wh_p, 0.0), power)
        power = np.where(is_ev, np.where(ev_on, self.ev_rate, 0.0), power)
        self.power = np.where(is_bat, bp, power)
        state = np.where(is_ac, self.ac_on, np.where(is_wh, self.wh_on, ev_on)).astype(np.int8)
        self.state = np.where(is_bat, np.sign(bp).astype(np.int8), state)


# --------------------------------------------------------------------------- faults & delivery


@dataclass
class Scenario:
    name: str
    loss: float
    vendor_outage: tuple[float, float] | None = None
    feeder_outage: tuple[float, float] | None = None
    backfill_s: float = 1800.0
    #: Share of devices whose vendor reports W as kW (values x1000): the EV cloud of vendor 3.
    w_as_kw: bool = False
    #: Share of devices reporting kW as MW (x0.001) and share of loads reporting generator
    #: convention (sign flipped).
    milli_share: float = 0.0
    sign_share: float = 0.0
    #: Share of devices whose power sensor sticks at 0 kW (no flag) for 1-6 h.
    stuck_zero_share: float = 0.0
    #: Demand-response event window (hours), with 5 % of the event's batteries serving
    #: frozen registers for its duration.
    event: tuple[float, float] | None = None


@dataclass
class Arrivals:
    """Readings in flight, released when their receive time has passed."""

    parts: list[dict[str, np.ndarray]] = field(default_factory=list)

    def add(self, **cols: np.ndarray) -> None:
        if len(cols["row"]):
            self.parts.append(cols)

    def release(self, now: float) -> dict[str, np.ndarray] | None:
        if not self.parts:
            return None
        allc = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        due = allc["recv"] <= now
        rest = {k: v[~due] for k, v in allc.items()}
        self.parts = [rest] if len(rest["row"]) else []
        if not due.any():
            return None
        out = {k: v[due] for k, v in allc.items()}
        order = np.argsort(out["recv"], kind="stable")
        return {k: v[order] for k, v in out.items()}


class Faults:
    """Turns true device behaviour into the reading stream a gateway would receive."""

    def __init__(
        self,
        fleet: Fleet,
        sc: Scenario,
        rng: np.random.Generator,
        t0: float,
        t1: float,
        fingerprints: bool,
        device_states: bool = True,
    ) -> None:
        n = fleet.n
        self.fleet, self.sc, self.rng = fleet, sc, rng
        self.phase = rng.integers(0, STEPS_PER_PERIOD, n)
        skewed = rng.random(n) < 0.10
        self.skew = np.where(
            skewed, rng.choice([-1.0, 1.0], n) * rng.uniform(60, 600, n), rng.normal(0, 1.0, n)
        )
        self.up = rng.random(n) >= sc.loss
        mean_down = 10.0  # reports
        self.p_recover = 1.0 / mean_down
        self.p_fail = sc.loss / (1.0 - sc.loss) / mean_down if sc.loss > 0 else 0.0
        span = t1 - t0
        stuck = rng.random(n) < 0.01
        self.stuck_from = np.where(stuck, t0 + rng.uniform(0, span, n), np.inf)
        self.stuck_to = self.stuck_from + rng.uniform(3600, 4 * 3600, n)
        stale = rng.random(n) < 0.01
        self.stale_from = np.where(stale, t0 + rng.uniform(0, span, n), np.inf)
        self.stale_to = self.stale_from + rng.uniform(1800, 3 * 3600, n)
        if sc.event is not None:
            e0, e1 = DAY0 + sc.event[0] * 3600, DAY0 + sc.event[1] * 3600
            frozen = fleet.bat_in_event & (rng.random(n) < 0.05)
            self.stuck_from = np.where(frozen, e0, self.stuck_from)
            self.stuck_to = np.where(frozen, e1, self.stuck_to)
        # Unit errors: a multiplier per device on what it reports.
        self.scale = np.ones(n)
        if sc.w_as_kw:
            self.scale[fleet.vendor == 3] = 1000.0
        loads = fleet.kind != BAT
        self.scale[(self.scale == 1.0) & (rng.random(n) < sc.milli_share)] = 0.001
        self.scale[(self.scale == 1.0) & loads & (rng.random(n) < sc.sign_share)] = -1.0
        zero = rng.random(n) < sc.stuck_zero_share
        self.zero_from = np.where(zero, t0 + rng.uniform(0, span, n), np.inf)
        self.zero_to = self.zero_from + rng.uniform(3600, 6 * 3600, n)
        self.has_fp = VENDOR_FINGERPRINT[fleet.vendor] & fingerprints
        self.has_hint = VENDOR_HINT[fleet.vendor] & fingerprints
        self.last_value = np.zeros(n)
        self.last_fp = np.ones(n, dtype=np.int64)
        self.last_dev = np.full(n, np.nan)
        self.last_state = fleet.state.copy()
        self.device_states = device_states
        self.last_soc = np.full(n, np.nan)
        self.last_demand = np.full(n, -1, dtype=np.int8)
        self.frozen_value = np.zeros(n)
        self.frozen_fp = np.ones(n, dtype=np.int64)
        self.was_stuck = np.zeros(n, dtype=bool)
        self.counter = 0
        self.arrivals = Arrivals()
        self.backfill: list[dict[str, np.ndarray]] = []

    def device_state(self, rows: I, t: float) -> tuple[F, npt.NDArray[np.int8]]:
        """State of charge (batteries; a water heater's tank heat) and demand of ``rows``."""
        fl, h = self.fleet, hours(t)
        kind = fl.kind[rows]
        tank = 100.0 * np.clip(1.0 - fl.wh_deficit[rows] / TANK_KWH, 0.0, 1.0)
        soc = np.where(kind == BAT, 100.0 * np.clip(fl.bat_soc[rows], 0.0, 1.0), np.nan)
        soc = np.where(kind == WH, tank, soc)
        charging = (h >= fl.ev_start[rows]) & (fl.ev_need[rows] > 0)
        demand = np.where(
            kind == WH,
            tank < TANK_BAND_SOC,
            np.where(kind == EV, charging, -1),
        ).astype(np.int8)
        return soc, demand

    def offline(self, t: float) -> B:
        sc, fl = self.sc, self.fleet
        off = np.zeros(fl.n, dtype=bool)
        h = hours(t)
        if sc.vendor_outage and sc.vendor_outage[0] <= h < sc.vendor_outage[1]:
            off |= fl.vendor == 0
        if sc.feeder_outage and sc.feeder_outage[0] <= h < sc.feeder_outage[1]:
            off |= fl.feeder == 7
        return off

    def emit(self, t: float, step: int) -> None:
        """Readings of the devices whose report falls on this step."""
        rng, fl = self.rng, self.fleet
        rows = np.flatnonzero(self.phase == step % STEPS_PER_PERIOD)
        m = len(rows)
        # Markov dropouts, one transition per report.
        up = self.up[rows]
        u = rng.random(m)
        up = np.where(up, u >= self.p_fail, u < self.p_recover)
        self.up[rows] = up
        true = fl.power[rows]
        value = np.where(true != 0.0, true * (1.0 + 0.01 * rng.standard_normal(m)), 0.0)
        # A power sensor stuck at zero; the rest of the payload (and its state) stays live.
        zero = (t >= self.zero_from[rows]) & (t < self.zero_to[rows])
        value = np.where(zero, 0.0, value)
        value = value * self.scale[rows]
        self.counter += 1
        fp = np.where(self.has_fp[rows], rows.astype(np.int64) * 1_000_003 + self.counter, 0)
        state = fl.state[rows]
        hint = np.where(self.has_hint[rows], (state != self.last_state[rows]).astype(np.int8), -1)
        hint = hint.astype(np.int8)
        self.last_state[rows] = state
        dev = t + self.skew[rows]
        # Stuck: a frozen payload (vendors with fingerprints) or a frozen power sensor.
        stuck = (t >= self.stuck_from[rows]) & (t < self.stuck_to[rows])
        starting = stuck & ~self.was_stuck[rows]
        self.frozen_value[rows[starting]] = self.last_value[rows[starting]]
        self.frozen_fp[rows[starting]] = np.where(
            self.has_fp[rows[starting]], self.last_fp[rows[starting]], 0
        )
        self.was_stuck[rows] = stuck
        value = np.where(stuck, self.frozen_value[rows], value)
        payload_frozen = stuck & self.has_fp[rows]
        fp = np.where(payload_frozen, self.frozen_fp[rows], fp)
        hint = np.where(payload_frozen, np.where(self.has_hint[rows], 0, -1), hint).astype(np.int8)
        # Stale: the cloud re-serves its last reading (old device timestamp) once it has one.
        stale = (
            (t >= self.stale_from[rows])
            & (t < self.stale_to[rows])
            & np.isfinite(self.last_dev[rows])
        )
        value = np.where(stale, self.last_value[rows], value)
        fp = np.where(stale, self.last_fp[rows], fp)
        dev = np.where(stale, self.last_dev[rows], dev)
        hint = np.where(stale, np.where(self.has_hint[rows], 0, -1), hint).astype(np.int8)
        fresh_payload = ~stale
        # The rest of a live payload: state of charge (batteries; a water heater's tank), and
        # whether the device's own state says it must draw power (``QualityClassifier.demand_of``
        # in operation): a tank below its band, an EV plugged in, allowed and needing energy.
        soc, demand = self.device_state(rows, t)
        soc[stale], demand[stale] = self.last_soc[rows[stale]], self.last_demand[rows[stale]]
        self.last_soc[rows[fresh_payload]] = soc[fresh_payload]
        self.last_demand[rows[fresh_payload]] = demand[fresh_payload]
        if not self.device_states:
            soc, demand = np.full(m, np.nan), np.full(m, -1, dtype=np.int8)
        self.last_value[rows[fresh_payload]] = value[fresh_payload]
        self.last_fp[rows[fresh_payload]] = fp[fresh_payload]
        self.last_dev[rows[fresh_payload]] = dev[fresh_payload]
        # Corruption after the device: 1 % of values x10 (the fingerprint covers the value).
        spike = rng.random(m) < 0.01
        value = np.where(spike, value * 10.0, value)
        fp = np.where(spike & (fp != 0), fp ^ 0x5A5A, fp)
        latency = rng.lognormal(np.log(2.0), 0.7, m)
        latency += np.where(rng.random(m) < 0.05, rng.uniform(30, 300, m), 0.0)
        recv = t + latency
        offline = self.offline(t)[rows]
        send = up & ~offline
        # Vendor outage: keep the readings, deliver the last ``backfill_s`` of them on recovery.
        if self.sc.vendor_outage:
            queued = up & offline & (self.fleet.vendor[rows] == 0) & ~(self.fleet.feeder[rows] == 7)
            if queued.any():
                self.backfill.append(
                    {"row": rows[queued], "dev": dev[queued], "recv": recv[queued],
                     "value": value[queued], "fp": fp[queued], "hint": hint[queued],
                     "soc": soc[queued], "demand": demand[queued],
                     "t": np.full(int(queued.sum()), t)}
                )  # fmt: skip
        self.arrivals.add(
            row=rows[send],
            dev=dev[send],
            recv=recv[send],
            value=value[send],
            fp=fp[send],
            hint=hint[send],
            soc=soc[send],
            demand=demand[send],
        )
        dup = send & (rng.random(m) < 0.02)
        self.arrivals.add(
            row=rows[dup], dev=dev[dup], recv=recv[dup] + rng.uniform(1, 60, int(dup.sum())),
            value=value[dup], fp=fp[dup], hint=hint[dup], soc=soc[dup], demand=demand[dup],
        )  # fmt: skip

    def recover(self, t: float) -> None:
        """Vendor cloud back: it backfills its last ``backfill_s`` of readings, late."""
        if not self.backfill:
            return
        allc = {k: np.concatenate([p[k] for p in self.backfill]) for k in self.backfill[0]}
        keep = allc["t"] >= t - self.sc.backfill_s
        k = int(keep.sum())
        recv = t + self.rng.uniform(5, 120, k)
        self.arrivals.add(
            row=allc["row"][keep], dev=allc["dev"][keep], recv=recv, value=allc["value"][keep],
            fp=allc["fp"][keep], hint=allc["hint"][keep], soc=allc["soc"][keep],
            demand=allc["demand"][keep],
        )  # fmt: skip
        self.backfill = []


# --------------------------------------------------------------------------- methods


class NaiveBaselines:
    """Sum of received, last value carried forward, N × mean; raw arrivals, no screening."""

    def __init__(self, n: int, labels: I, n_groups: int) -> None:
        self.value = np.full(n, np.nan)
        self.recv = np.full(n, -np.inf)
        self.labels, self.n_groups = labels, n_groups
        self.size = np.bincount(labels, minlength=n_groups).astype(np.float64)

    def observe(self, batch: dict[str, np.ndarray]) -> None:
        # Arrival order: the newest arrival wins, whatever its device timestamp says.
        self.value[batch["row"]] = batch["value"]
        self.recv[batch["row"]] = batch["recv"]

    def estimate(self, now: float) -> dict[str, tuple[F, F | None, F | None]]:
        """Fleet (element 0) and feeder (1..) totals of each baseline, with N × mean's interval."""
        recent = now - self.recv <= PERIOD_S
        known = np.isfinite(self.value)
        v = np.where(recent, self.value, 0.0)
        out: dict[str, list[F]] = {}
        for lab, g in ((np.zeros_like(self.labels), 1), (self.labels, self.n_groups)):
            size = np.bincount(lab, minlength=g).astype(np.float64)
            s_recent = np.bincount(lab, weights=v, minlength=g)
            lvcf = np.bincount(lab, weights=np.where(known, self.value, 0.0), minlength=g)
            n = np.bincount(lab, weights=recent.astype(np.float64), minlength=g)
            ss = np.bincount(lab, weights=v * v, minlength=g)
            # A group with nothing received falls back to the fleet mean (N x mean is naive,
            # not broken).
            fleet_mean = v.sum() / max(recent.sum(), 1)
            safe = np.maximum(n, 1.0)
            mean = np.where(n > 0, s_recent / safe, fleet_mean)
            var = np.where(
                n > 1, np.maximum(ss / safe - mean**2, 0.0) * n / np.maximum(n - 1, 1), 0.0
            )
            nmean = size * mean
            half = 1.645 * size * np.sqrt(var / safe * np.maximum(1 - n / size, 0.0))
            for name, arr in (
                ("sum of received", s_recent), ("last value fwd", lvcf), ("N x mean", nmean),
                ("N x mean lo", nmean - half), ("N x mean hi", nmean + half),
            ):  # fmt: skip
                out.setdefault(name, []).append(arr)
        cat = {k: np.concatenate(v) for k, v in out.items()}
        return {
            "sum of received": (cat["sum of received"], None, None),
            "last value fwd": (cat["last value fwd"], None, None),
            "N x mean": (cat["N x mean"], cat["N x mean lo"], cat["N x mean hi"]),
        }


@dataclass
class Series:
    est: list[F] = field(default_factory=list)
    lo: list[F] = field(default_factory=list)
    hi: list[F] = field(default_factory=list)

    def add(self, e: F, lo: F | None, hi: F | None) -> None:
        self.est.append(e)
        self.lo.append(lo if lo is not None else np.full_like(e, np.nan))
        self.hi.append(hi if hi is not None else np.full_like(e, np.nan))


def metrics(truth: F, s: Series, mask: B) -> dict[str, dict[str, float]]:
    """Fleet (column 0) and feeder (columns 1..) metrics over the cycles in ``mask``."""
    est, lo, hi = (np.array(x)[mask] for x in (s.est, s.lo, s.hi))
    tr = truth[mask]
    out = {}
    for level, cols in (("fleet", slice(0, 1)), ("feeder", slice(1, None))):
        t, e, lw, up = tr[:, cols], est[:, cols], lo[:, cols], hi[:, cols]
        err = e - t
        rel = np.abs(err) / np.abs(t)
        has_pi = bool(np.isfinite(lw).all())
        # Bias per group over the window; at feeder level the worst feeder's (pooled feeder
        # errors would just repeat the fleet's bias, since feeders add up to the fleet).
        biases = 100 * err.sum(axis=0) / t.sum(axis=0)
        out[level] = {
            "mape": float(100 * rel.mean()),
            "bias": float(biases[np.abs(biases).argmax()]),
            "p95": float(100 * np.quantile(rel, 0.95)),
            "coverage": float(100 * ((lw <= t) & (t <= up)).mean()) if has_pi else float("nan"),
            "width": float(100 * ((up - lw) / np.abs(t)).mean()) if has_pi else float("nan"),
        }
    return out


def coverage_by_hour(truth: F, s: Series, h: F, mask: B) -> dict[str, dict[int, float]]:
    """90 % interval coverage per hour of the day, fleet and all feeders pooled (hours with
    at least 30 scored cycles: the run's last instant is not an hour)."""
    lo, hi = np.array(s.lo), np.array(s.hi)
    inside = (lo <= truth) & (truth <= hi)
    out: dict[str, dict[int, float]] = {"fleet": {}, "feeder": {}}
    for hour in sorted({int(x) for x in h[mask]}):
        sel = mask & (np.floor(h) == hour)
        if sel.sum() < 30:
            continue
        out["fleet"][hour] = float(100 * inside[sel, 0].mean())
        out["feeder"][hour] = float(100 * inside[sel, 1:].mean())
    return out


# --------------------------------------------------------------------------- one run


RELEASE_COHORT_S = 900.0


def tell_commands(
    board: CommandBoard, fleet: Fleet, event: tuple[float, float], t: float, phase: int
) -> int:
    """What the core's control loop tells the telemetry board as the event goes: at its start
    the ACs are shed (expected 0 kW) and the batteries held at -3 kW; at its end both are
    released (the ACs expected back at their rated power), and 15 min later forgotten."""
    h = hours(t)
    ac, bat = fleet.ac_in_event, fleet.bat_in_event
    n = fleet.n
    if phase == 0 and h >= event[0]:
        cohort = np.where(ac, board.code("dr:ac"), np.where(bat, board.code("dr:bat"), 0))
        expected = np.where(ac, 0.0, np.where(bat, -EVENT_BATTERY_KW, np.nan))
        board.set_rows(t, cohort.astype(np.intp), expected, bat.copy())
        return 1
    if phase == 1 and h >= event[1]:
        cohort = np.where(
            ac, board.code("release:dr:ac"), np.where(bat, board.code("release:dr:bat"), 0)
        )
        expected = np.where(ac, fleet.ac_p, np.nan)
        board.set_rows(t, cohort.astype(np.intp), expected, np.zeros(n, dtype=bool))
        return 2
    if phase == 2 and h >= event[1] + RELEASE_COHORT_S / 3600:
        board.set_rows(t, np.zeros(n, dtype=np.intp), np.full(n, np.nan), np.zeros(n, dtype=bool))
        return 3
    return phase


def run(
    sc: Scenario,
    n: int,
    seed: int,
    start_h: float,
    warm_h: float,
    end_h: float,
    fingerprints: bool = False,
    device_states: bool = True,
) -> dict[str, Any]:
    fleet = Fleet(n, np.random.default_rng([seed, 0]), start_h)
    fleet.event = sc.event
    t0, t1 = DAY0 + start_h * 3600, DAY0 + end_h * 3600
    faults = Faults(
        fleet,
        sc,
        np.random.default_rng([seed, 1, zlib.crc32(sc.name.encode())]),
        t0,
        t1,
        fingerprints,
        device_states,
    )
    profiles = [
        DeviceProfile(
            device_id=f"dev{i:05d}",
            der_class=KIND_CLASS[k],
            peer_group=f"feeder:F{f:02d}",
            min_kw=BOUNDS[k][0],
            max_kw=BOUNDS[k][1],
            report_interval_s=PERIOD_S,
        )
        for i, (k, f) in enumerate(zip(fleet.kind.tolist(), fleet.feeder.tolist(), strict=True))
    ]
    index = FleetIndex(profiles)
    # The commands in force, as the core tells them after each control cycle (dr_event).
    board = CommandBoard(index)
    classifier = QualityClassifier(index, commands=board)
    estimator = GroupEstimator(index, EstimatorConfig(period_s=PERIOD_S, seed=seed), commands=board)
    event_phase = 0
    feeder_of = fleet.feeder  # group labels 0..19 for feeders; the fleet is summed separately
    naive = NaiveBaselines(n, feeder_of, N_FEEDERS)
    group_ids = [f"feeder:F{f:02d}" for f in range(N_FEEDERS)]
    series: dict[str, Series] = {"gateway": Series()}
    truths: list[F] = []
    hours_at: list[float] = []
    cycle_ms: list[float] = []
    classify_s = 0.0
    readings = 0
    flags: dict[str, int] = {}
    recovered = False
    steps = round((t1 - t0) / STEP_S)
    for step in range(1, steps + 1):
        t = t0 + step * STEP_S
        fleet.step(t)
        faults.emit(t, step)
        if sc.vendor_outage and not recovered and hours(t) >= sc.vendor_outage[1]:
            faults.recover(t)
            recovered = True
        if sc.event is not None:
            event_phase = tell_commands(board, fleet, sc.event, t, event_phase)
        if step % STEPS_PER_PERIOD:
            continue
        batch = faults.arrivals.release(t)
        if batch is not None:
            c0 = time.perf_counter()
            res = classifier.observe_batch(
                batch["row"], batch["dev"], batch["recv"], batch["value"],
                fingerprint=batch["fp"], should_change=batch["hint"],
                demand=batch["demand"], soc_pct=batch["soc"],
            )  # fmt: skip
            classify_s += time.perf_counter() - c0
            readings += len(batch["row"])
            for bit in (
                "DUPLICATE",
                "OUT_OF_ORDER",
                "LATE",
                "STALE",
                "STUCK",
                "OUT_OF_RANGE",
                "OUTLIER",
                "CLOCK_SKEW",
            ):
                flags[bit] = flags.get(bit, 0) + int(((res.detail & int(Detail[bit])) != 0).sum())
            naive.observe(batch)
        # One aggregation cycle: snapshot, estimate, aggregate fleet + feeders.
        c0 = time.perf_counter()
        snap = classifier.snapshot(t)
        cyc = estimator.cycle(snap)
        fleet_est = cyc.group_estimates(np.zeros(n, dtype=np.intp), ["fleet"])[0]
        feeders = cyc.group_estimates(feeder_of, group_ids)
        cycle_ms.append(1000 * (time.perf_counter() - c0))
        series["gateway"].add(
            np.array([fleet_est.power_kw] + [g.power_kw for g in feeders]),
            np.array([fleet_est.lower_kw] + [g.lower_kw for g in feeders]),
            np.array([fleet_est.upper_kw] + [g.upper_kw for g in feeders]),
        )
        for name, (e, lo, hi) in naive.estimate(t).items():
            series.setdefault(name, Series()).add(e, lo, hi)
        truth_f = np.bincount(feeder_of, weights=fleet.power, minlength=N_FEEDERS)
        truths.append(np.r_[truth_f.sum(), truth_f])
        hours_at.append(hours(t))
    truth = np.array(truths)
    h = np.array(hours_at)
    scored = h >= warm_h
    windows = {"all": scored}
    if sc.vendor_outage or sc.feeder_outage:
        w = np.zeros_like(scored)
        for win in (sc.vendor_outage, sc.feeder_outage):
            if win:
                w |= (h >= win[0]) & (h < win[1])
        windows["outages"] = scored & w
    gw = series["gateway"]
    result: dict[str, Any] = {
        "by_hour": coverage_by_hour(truth, gw, h, scored),
        "_trace": {
            "hours": h,
            "truth": truth,
            "est": np.array(gw.est),
            "lo": np.array(gw.lo),
            "hi": np.array(gw.hi),
        },
        "scenario": sc.name,
        "cycles": int(scored.sum()),
        "readings": readings,
        "classify_us_per_reading": 1e6 * classify_s / max(readings, 1),
        "cycle_ms_median": float(np.median(cycle_ms[5:])),
        "cycle_ms_p95": float(np.quantile(cycle_ms[5:], 0.95)),
        "flags": flags,
        "fleet_mean_kw": float(truth[scored, 0].mean()),
        "methods": {
            win: {name: metrics(truth, s, mask) for name, s in series.items()}
            for win, mask in windows.items()
        },
    }
    return result


# --------------------------------------------------------------------------- report


def fmt(x: float, spec: str = "6.2f") -> str:
    return "     -" if not np.isfinite(x) else format(x, spec)


def print_table(res: dict[str, Any]) -> None:
    print(
        f"\n=== scenario {res['scenario']}: {res['cycles']} scored cycles,"
        f" {res['readings']:,} readings,"
        f" mean fleet load {res['fleet_mean_kw'] / 1000:.2f} MW"
    )
    print("bias: fleet = total error / total truth; feeder = the worst feeder's bias")
    print("reading flags: " + ", ".join(f"{k.lower()} {v:,}" for k, v in res["flags"].items()))
    cols = ("MAPE%", "bias%", "p95%", "cov90%", "width%")
    head = f"{'window':8} {'level':7} {'method':16} " + " ".join(f"{c:>6}" for c in cols)
    print(head)
    print("-" * len(head))
    for win, methods in res["methods"].items():
        for level in ("fleet", "feeder"):
            for name, m in methods.items():
                mm = m[level]
                print(
                    f"{win:8} {level:7} {name:16} {fmt(mm['mape'])} {fmt(mm['bias'], '+6.2f')} "
                    f"{fmt(mm['p95'])} {fmt(mm['coverage'], '6.1f')} {fmt(mm['width'])}"
                )
    for level in ("fleet", "feeder"):
        cells = " ".join(f"{hh}h {c:.0f}" for hh, c in res["by_hour"][level].items())
        print(f"cov90% by hour, {level:6}: {cells}")
    print(
        "aggregation cycle (snapshot + estimate + fleet & 20 feeders):"
        f" median {res['cycle_ms_median']:.1f} ms, p95 {res['cycle_ms_p95']:.1f} ms;"
        f" classification {res['classify_us_per_reading']:.1f} µs/reading"
    )


#: Fleet MAPE target per scenario (issue 13): random loss 1.5 %, every harder case 2.5 %.
MAPE_TARGET = {"random20": 1.5}


def targets(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool]]:
    rows: list[tuple[str, str, bool]] = []

    def add(name: str, value: str, ok: bool) -> None:
        rows.append((name, value, ok))

    for name, res in results.items():
        m = res["methods"]["all"]["gateway"]
        goal = MAPE_TARGET.get(name, 2.5)
        add(
            f"{name}: fleet MAPE <= {goal}%",
            f"{m['fleet']['mape']:.2f}%",
            m["fleet"]["mape"] <= goal,
        )
        if "outages" in res["methods"]:
            w = res["methods"]["outages"]["gateway"]["fleet"]["mape"]
            add(f"{name}: fleet MAPE in the outage hours <= 2.5%", f"{w:.2f}%", w <= 2.5)
        b = m["feeder"]["bias"]
        add(f"{name}: worst feeder bias within ±3%", f"{b:+.2f}%", abs(b) <= 3.0)
        for level in ("fleet", "feeder"):
            c = m[level]["coverage"]
            low = min(res["by_hour"][level].values())
            add(
                f"{name}: {level} 90% coverage in 85-95%, >= 75% every hour",
                f"{c:.1f}% (lowest hour {low:.0f}%)",
                85.0 <= c <= 95.0 and low >= 75.0,
            )
    p95 = max(r["cycle_ms_p95"] for r in results.values())
    add("one cycle, 10k devices, p95 < 50 ms", f"{p95:.1f} ms", p95 < 50.0)
    return rows


SCENARIOS = (
    Scenario("random20", loss=0.20),
    Scenario("correlated", loss=0.05, vendor_outage=(17.0, 19.0), feeder_outage=(19.5, 21.0)),
    Scenario("unit_error", loss=0.05, w_as_kw=True, milli_share=0.02, sign_share=0.02),
    Scenario("stuck_zero", loss=0.05, stuck_zero_share=0.06),
    Scenario("dr_event", loss=0.05, event=(17.0, 19.0)),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="15:00-21:00 instead of 11:00-24:00")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument(
        "--scenario",
        action="append",
        choices=[sc.name for sc in SCENARIOS],
        help="run only this scenario (repeatable; default: all)",
    )
    ap.add_argument(
        "--fingerprints",
        action="store_true",
        help="pass vendor payload fingerprints and state hints (the running gateway has none)",
    )
    ap.add_argument(
        "--no-device-state",
        action="store_true",
        help="pass no state of charge or demand with the readings (power alone)",
    )
    args = ap.parse_args(argv)
    start_h, warm_h, end_h = (15.0, 16.0, 21.0) if args.quick else (11.0, 12.0, 24.0)
    scenarios = [sc for sc in SCENARIOS if not args.scenario or sc.name in args.scenario]
    results = {}
    wall = time.perf_counter()
    for sc in scenarios:
        res = run(
            sc, args.devices, args.seed, start_h, warm_h, end_h, args.fingerprints,
            not args.no_device_state,
        )  # fmt: skip
        results[sc.name] = res
        print_table(res)
        sys.stdout.flush()
    print(
        f"\n=== targets (seed {args.seed}, {args.devices:,} devices,"
        f" fingerprints {'on' if args.fingerprints else 'off'},"
        f" wall {time.perf_counter() - wall:.0f} s)"
    )
    rows = targets(results)
    for name, value, ok in rows:
        print(f"  [{'met' if ok else 'MISSED':6}] {name}: {value}")
    if args.json:
        public = {
            k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
            for k, v in results.items()
        }
        args.json.write_text(json.dumps({"results": public, "targets": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
