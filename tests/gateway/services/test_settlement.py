"""A service's settlement: metered cost against the unmanaged counterfactual at the same prices
and instants, energy shifted, EV energy delivered, envelope violations (simulated clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from gateway.registry import Registry
from gateway.services.schedule import EvPlan, ScheduleProblem, solve_schedule
from gateway.services.settlement import ServiceLedger
from unified.model import (
    BatteryRatings,
    DerClass,
    Device,
    DeviceState,
    EnvelopeInterval,
    GridService,
    OperatingEnvelope,
    ServiceMode,
    Target,
    TopologyLocation,
)

T0 = datetime(2026, 7, 1, 12, tzinfo=UTC)
PRICES = [0.5, 0.1]  # per kWh, hourly


def price(when: datetime) -> tuple[float, float]:
    k = int((when - T0).total_seconds() // 3600)
    return (PRICES[k], PRICES[k]) if 0 <= k < len(PRICES) else (float("nan"), float("nan"))


@pytest.fixture
def registry() -> Registry:
    return Registry(
        [
            Device(
                device_id="ev1",
                der_class=DerClass.EVSE,
                location=TopologyLocation(substation="s1", feeder="f1", transformer="t1"),
                adapter="test",
                ratings=BatteryRatings(
                    max_charge_kw=7.0, max_discharge_kw=0.001, capacity_kwh=60.0
                ),
            )
        ]
    )


def service() -> GridService:
    return GridService(
        command_id="svc-1",
        target=Target(group_id="feeder:f1"),
        mode=ServiceMode.EV_COST,
        start=T0,
        duration_s=7200,
    )


def run_day(ledger: ServiceLedger, registry: Registry, envelopes: list[OperatingEnvelope]) -> None:
    """The EV charges as planned: 7 kW in the second (cheap) hour; observed every minute."""
    problem = ScheduleProblem(
        step_s=3600,
        prices=np.array(PRICES),
        evs=[EvPlan("ev1", max_kw=7.0, energy_needed_kwh=7.0, departure_step=2)],
    )
    plan = solve_schedule(problem)
    np.testing.assert_allclose(plan.row("ev1"), [0.0, 7.0], atol=1e-6)
    ledger.record_plan(plan, T0, 3600, [], {"ev1": 7.0})
    for minute in range(121):
        now = T0 + timedelta(minutes=minute)
        kw = 7.0 if minute > 60 else 0.0  # a reading held over the minute before it
        states = {"ev1": DeviceState(device_id="ev1", timestamp=now, power_kw=kw, source="t")}
        ledger.observe(now, states, price, envelopes, registry)


def test_cost_saved_against_charging_on_arrival_at_the_same_prices(registry: Registry) -> None:
    ledger = ServiceLedger(service())
    run_day(ledger, registry, [])
    report = ledger.report(T0 + timedelta(hours=2))
    # Unmanaged: 7 kWh at 0.5 in the first hour; managed: 7 kWh at 0.1 in the second.
    assert report.unmanaged_cost == pytest.approx(3.5)
    assert report.energy_cost == pytest.approx(0.7)
    assert report.cost_saved == pytest.approx(2.8)
    assert report.energy_shifted_kwh == pytest.approx(7.0)
    assert report.energy_import_kwh == pytest.approx(7.0)
    assert report.ev_energy_needed_kwh == pytest.approx(7.0)
    assert report.ev_delivered_pct == pytest.approx(100.0)
    assert report.envelope_checks == 0
    assert report.envelope_violations == 0
    assert report.devices == 1
    assert report.schedule_solves == 1
    assert report.type == "service_settlement"


def test_an_envelope_exceeded_while_the_service_ran_is_counted(registry: Registry) -> None:
    cap = OperatingEnvelope(
        command_id="env-1",
        target=Target(group_id="transformer:t1"),
        intervals=(
            EnvelopeInterval(
                start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=2), import_limit_kw=5.0
            ),
        ),
    )
    ledger = ServiceLedger(service())
    run_day(ledger, registry, [cap])
    report = ledger.report(T0 + timedelta(hours=2))
    assert report.envelope_checks == 60  # minutes 61..120 (the interval ends at 120)
    assert report.envelope_violations == 59  # at minute 60 the EV still drew 0
    assert report.worst_envelope_excess_kw == pytest.approx(2.0)
