"""Settle a grid service: what it cost against what the same devices would have cost alone.

A :class:`ServiceLedger` is fed every control cycle (:meth:`ServiceLedger.observe`) with the
measured power of the devices the service scheduled, the prices in force, and the envelopes in
force; and with every schedule solved (:meth:`ServiceLedger.record_plan`), whose unmanaged
profile (EVs at full rate from plug-in until full, batteries idle) becomes, for each device the
first time it is scheduled, its counterfactual. Both are integrated over the same instants at
the same prices, so the saving is the service's and not the prices'. When the service ends the
ledger becomes a :class:`unified.services.ServiceReport`.

The counterfactual starts at the first plan a device is in: an EV that plugged in before the
service began counts from then. The ledger lives in memory: a restart starts a new one (the
report then covers the time since).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from gateway.registry import Registry
from gateway.services.schedule import FloatArray, Schedule
from unified.model import DeviceState, GridService, OperatingEnvelope
from unified.services import ServiceReport

MAX_GAP_S = 300.0
"""A gap between two observations longer than this counts as this long (a stalled loop must not
count one reading for an hour)."""
ENVELOPE_TOLERANCE = 0.01
"""Share of a limit an excess must pass to count as a violation (meter noise)."""


@dataclass
class _Counterfactual:
    start_s: float
    step_s: float
    kw: FloatArray

    def at(self, when_s: float) -> float:
        k = int((when_s - self.start_s) // self.step_s)
        return float(self.kw[k]) if 0 <= k < len(self.kw) else 0.0


@dataclass
class ServiceLedger:
    command: GridService
    first: datetime | None = None
    last: datetime | None = None
    seconds: float = 0.0
    import_kwh: float = 0.0
    export_kwh: float = 0.0
    cost: float = 0.0
    unmanaged_import_kwh: float = 0.0
    unmanaged_cost: float = 0.0
    battery_kwh: float = 0.0
    price_seconds: float = 0.0
    price_integral: float = 0.0
    shifted_kwh: float = 0.0
    counterfactual: dict[str, _Counterfactual] = field(default_factory=dict)
    batteries: set[str] = field(default_factory=set)
    ev_need: dict[str, float] = field(default_factory=dict)
    ev_delivered: dict[str, float] = field(default_factory=dict)
    envelope_checks: int = 0
    envelope_violations: int = 0
    worst_excess_kw: float = 0.0
    solves: int = 0

    def record_plan(
        self,
        schedule: Schedule,
        start: datetime,
        step_s: float,
        batteries: Sequence[str],
        ev_need: Mapping[str, float],
    ) -> None:
        """A schedule solved: devices new to the service get their counterfactual from it."""
        self.solves += 1
        self.batteries.update(batteries)
        for i, device_id in enumerate(schedule.device_ids):
            if device_id in self.counterfactual:
                continue
            self.counterfactual[device_id] = _Counterfactual(
                start.timestamp(), step_s, np.asarray(schedule.unmanaged_kw[i], dtype=np.float64)
            )
            if device_id in ev_need:
                self.ev_need[device_id] = float(ev_need[device_id])

    def observe(
        self,
        now: datetime,
        states: Mapping[str, DeviceState | None],
        price: Callable[[datetime], tuple[float, float]],
        envelopes: Sequence[OperatingEnvelope],
        registry: Registry,
    ) -> None:
        """One control cycle: integrate the power since the last one (the reading now held over
        it), at the price and counterfactual of the span's middle."""
        if self.first is None:
            self.first = now
        previous, self.last = self.last, now
        if previous is None or not self.counterfactual:
            return
        span = min(max((now - previous).total_seconds(), 0.0), MAX_GAP_S)
        if span <= 0:
            return
        middle = now - timedelta(seconds=span / 2)  # the span's price and counterfactual step
        imp_price, exp_price = price(middle)
        if not (np.isfinite(imp_price) and np.isfinite(exp_price)):
            return  # no price in force: nothing to settle this span at
        h = span / 3600.0
        self.seconds += span
        self.price_seconds += span
        self.price_integral += imp_price * span
        middle_s = middle.timestamp()
        measured = unmanaged = 0.0
        for device_id, cf in self.counterfactual.items():
            state = states.get(device_id)
            kw = state.power_kw if state is not None else 0.0
            measured += kw
            cf_kw = cf.at(middle_s)
            unmanaged += cf_kw
            if kw > 0:
                self.import_kwh += kw * h
                self.cost += kw * h * imp_price
            else:
                self.export_kwh += -kw * h
                self.cost += kw * h * exp_price
            if cf_kw > 0:
                self.unmanaged_import_kwh += cf_kw * h
                self.unmanaged_cost += cf_kw * h * imp_price
            if device_id in self.batteries:
                self.battery_kwh += kw * h
            elif device_id in self.ev_need and kw > 0:
                self.ev_delivered[device_id] = self.ev_delivered.get(device_id, 0.0) + kw * h
        self.shifted_kwh += max(unmanaged - measured, 0.0) * h
        self._check_envelopes(now, states, envelopes, registry)

    def _check_envelopes(
        self,
        now: datetime,
        states: Mapping[str, DeviceState | None],
        envelopes: Sequence[OperatingEnvelope],
        registry: Registry,
    ) -> None:
        for envelope in envelopes:
            interval = envelope.interval_at(now)
            if interval is None:
                continue
            members = (
                [d.device_id for d in registry.members(envelope.target.group_id)]
                if envelope.target.group_id is not None
                else list(envelope.target.device_ids or ())
            )
            if not any(d in self.counterfactual for d in members):
                continue
            net = sum(s.power_kw for d in members if (s := states.get(d)) is not None)
            excess = 0.0
            if interval.import_limit_kw is not None:
                limit = interval.import_limit_kw
                if net > limit * (1 + ENVELOPE_TOLERANCE) + 1e-3:
                    excess = net - limit
            if interval.export_limit_kw is not None:
                limit = interval.export_limit_kw
                if -net > limit * (1 + ENVELOPE_TOLERANCE) + 1e-3:
                    excess = max(excess, -net - limit)
            self.envelope_checks += 1
            if excess > 0:
                self.envelope_violations += 1
                self.worst_excess_kw = max(self.worst_excess_kw, excess)

    def report(self, generated_at: datetime) -> ServiceReport:
        mean_price = self.price_integral / self.price_seconds if self.price_seconds else 0.0
        value = self.battery_kwh * mean_price
        needed = sum(self.ev_need.values())
        delivered = sum(
            min(self.ev_delivered.get(d, 0.0), need) for d, need in self.ev_need.items()
        )
        group_id = self.command.target.group_id
        return ServiceReport(
            command_id=self.command.command_id,
            group_id=group_id or "",
            mode=self.command.mode,
            start=self.first or generated_at,
            end=self.last or generated_at,
            generated_at=generated_at,
            devices=len(self.counterfactual),
            seconds_metered=round(self.seconds, 3),
            energy_import_kwh=round(self.import_kwh, 6),
            energy_export_kwh=round(self.export_kwh, 6),
            energy_cost=round(self.cost, 6),
            unmanaged_import_kwh=round(self.unmanaged_import_kwh, 6),
            unmanaged_cost=round(self.unmanaged_cost, 6),
            battery_energy_change_kwh=round(self.battery_kwh, 6),
            battery_energy_value=round(value, 6),
            cost_saved=round(self.unmanaged_cost - self.cost + value, 6),
            energy_shifted_kwh=round(self.shifted_kwh, 6),
            ev_energy_needed_kwh=round(needed, 6),
            ev_energy_delivered_kwh=round(delivered, 6),
            ev_delivered_pct=round(100 * delivered / needed, 3) if needed > 0 else None,
            envelope_checks=self.envelope_checks,
            envelope_violations=self.envelope_violations,
            worst_envelope_excess_kw=round(self.worst_excess_kw, 6),
            schedule_solves=self.solves,
        )
