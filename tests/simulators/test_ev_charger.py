"""The simulated EV charger: profile composition (pure) and EV visits against a real central."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from adapters.ocpp.central import (
    NEEDS_MESSAGE_ID,
    NEEDS_VENDOR_ID,
    OcppCentral,
    OcppCentralConfig,
    OcppChargerConfig,
    OcppVersion,
)
from adapters.ocpp.charger import OcppCharger
from simulators import ev_charger
from simulators.ev_charger import EvChargerSim, EvChargerSimConfig, EvVisit
from unified.model import TopologyLocation

pytestmark = pytest.mark.timeout(30)
VERSIONS: list[OcppVersion] = ["ocpp1.6", "ocpp2.0.1"]


async def eventually(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


def sim(**overrides: Any) -> EvChargerSim:
    values: dict[str, Any] = {"charge_point_id": "CP-1", "url": "ws://127.0.0.1:1/ocpp"}
    values.update(overrides)
    return EvChargerSim(EvChargerSimConfig(**values))


def profile16(
    pid: int, purpose: str, limit: float, *, stack: int = 1, unit: str = "W", **extra: Any
) -> dict[str, Any]:
    return {
        "charging_profile_id": pid,
        "stack_level": stack,
        "charging_profile_purpose": purpose,
        "charging_profile_kind": "Absolute",
        "charging_schedule": {
            "start_schedule": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
            "charging_rate_unit": unit,
            "charging_schedule_period": [{"start_period": 0, "limit": limit, **extra}],
        },
    }


def plugged(s: EvChargerSim, transaction_id: str = "7") -> None:
    s.ev = ev_charger._Ev(EvVisit(energy_needed_kwh=10), 0.0, None, transaction_id=transaction_id)


def test_needs_message_ids_match_the_central() -> None:
    assert (ev_charger._NEEDS_VENDOR_ID, ev_charger._NEEDS_MESSAGE_ID) == (
        NEEDS_VENDOR_ID,
        NEEDS_MESSAGE_ID,
    )


def test_profile_composition() -> None:
    s = sim()
    assert math.isinf(s.limit_kw)
    assert s.store_profile(0, profile16(1, "TxDefaultProfile", 6000), "ocpp1.6") == "Accepted"
    assert s.limit_kw == pytest.approx(6.0)
    # A TxProfile needs the running transaction.
    assert s.store_profile(1, profile16(2, "TxProfile", 3000), "ocpp1.6") == "Rejected"
    plugged(s)
    assert s.store_profile(1, profile16(2, "TxProfile", 8000), "ocpp1.6") == "Accepted"
    assert s.limit_kw == pytest.approx(8.0)  # Tx replaces TxDefault, even when higher
    # The site cap caps everything.
    assert s.store_profile(1, profile16(3, "ChargePointMaxProfile", 5000), "ocpp1.6") == "Rejected"
    assert s.store_profile(0, profile16(3, "ChargePointMaxProfile", 5000), "ocpp1.6") == "Accepted"
    assert s.limit_kw == pytest.approx(5.0)
    # A higher stack level wins within a purpose.
    s.store_profile(1, profile16(4, "TxProfile", 2000, stack=2), "ocpp1.6")
    assert s.limit_kw == pytest.approx(2.0)
    assert s.clear_profiles(None, None, "TxProfile", None) == "Accepted"
    assert s.limit_kw == pytest.approx(5.0)
    assert s.clear_profiles(99, None, None, None) == "Unknown"


def test_limits_in_amperes_use_the_phases() -> None:
    s = sim(voltage_v=230.0, phases=3)
    s.store_profile(0, profile16(1, "TxDefaultProfile", 16, unit="A"), "ocpp1.6")
    assert s.limit_kw == pytest.approx(16 * 230 * 3 / 1000)
    s.store_profile(0, profile16(1, "TxDefaultProfile", 16, unit="A", number_phases=1), "ocpp1.6")
    assert s.limit_kw == pytest.approx(16 * 230 / 1000)


def test_a_future_or_expired_schedule_does_not_limit() -> None:
    s = sim()
    future = profile16(1, "TxDefaultProfile", 1000)
    future["charging_schedule"]["start_schedule"] = (
        datetime.now(UTC) + timedelta(hours=1)
    ).isoformat()
    s.store_profile(0, future, "ocpp1.6")
    assert math.isinf(s.limit_kw)
    short = profile16(2, "ChargePointMaxProfile", 1000)
    short["charging_schedule"]["duration"] = 1
    s.store_profile(0, short, "ocpp1.6")
    assert math.isinf(s.limit_kw)


def test_201_profiles() -> None:
    s = sim(version="ocpp2.0.1")
    plugged(s, "tx-abc")
    profile = {
        "id": 5,
        "stack_level": 0,
        "charging_profile_purpose": "TxProfile",
        "charging_profile_kind": "Relative",
        "transaction_id": "tx-abc",
        "charging_schedule": [
            {"id": 1, "charging_rate_unit": "W", "charging_schedule_period": [
                {"start_period": 0, "limit": 4000.0}]}
        ],
    }  # fmt: skip
    assert s.store_profile(1, profile, "ocpp2.0.1") == "Accepted"
    assert s.limit_kw == pytest.approx(4.0)
    assert s.store_profile(1, {**profile, "transaction_id": "other"}, "ocpp2.0.1") == "Rejected"


# --------------------------------------------------------------------------- against a central


@asynccontextmanager
async def central() -> AsyncIterator[OcppCentral]:
    location = TopologyLocation(substation="sub-1")
    config = OcppCentralConfig(
        port=0,
        chargers=(OcppChargerConfig(charge_point_id="CP-1", location=location),),
    )
    system = OcppCentral(config, charger_factory=OcppCharger)
    task = asyncio.create_task(system.run())
    try:
        await asyncio.wait_for(system.ready.wait(), 5)
        yield system
    finally:
        task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def running(s: EvChargerSim) -> AsyncIterator[EvChargerSim]:
    task = asyncio.create_task(s.run())
    try:
        await asyncio.wait_for(s.booted.wait(), 5)
        yield s
    finally:
        task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("version", VERSIONS)
async def test_visits_arrive_charge_and_leave(version: OcppVersion) -> None:
    """Two EVs in simulated minutes: each gets its energy, leaves, and the sessions are
    reported to the central (transactions, needs, meter values)."""
    visits = (
        EvVisit(arrive_after_s=60, energy_needed_kwh=5.0, dwell_s=3600, ev_max_kw=11.0),
        EvVisit(arrive_after_s=600, energy_needed_kwh=2.0, dwell_s=1800, ev_max_kw=7.0),
    )
    async with central() as system:
        s = EvChargerSim(
            EvChargerSimConfig(
                charge_point_id="CP-1",
                url=system.url(),
                version=version,
                time_scale=3000.0,
                tick_s=0.01,
                meter_interval_s=0.05,
                visits=visits,
            )
        )
        seen_transactions: set[str] = set()
        seen_needs: list[float] = []

        def watch(snapshot: Any) -> None:
            if snapshot.transaction is not None:
                seen_transactions.add(snapshot.transaction.transaction_id)
            if snapshot.need is not None and snapshot.need.energy_kwh not in seen_needs:
                seen_needs.append(snapshot.need.energy_kwh)

        system.listeners.append(watch)
        async with running(s):
            await eventually(lambda: len(s.results) >= 2, 10.0)
            await asyncio.sleep(0.1)
        assert [r.met for r in s.results] == [True, True]
        assert [r.delivered_kwh for r in s.results] == pytest.approx([5.0, 2.0])
        assert len(seen_transactions) == 2
        # Needs travel in wall-time energy (divided by time_scale), rounded up to a whole Wh
        # (2.0.1) or 0.1 Wh (1.6): never understated.
        assert len(seen_needs) == 2
        for seen, need in zip(seen_needs, (5.0, 2.0), strict=True):
            assert need / 3000 <= seen <= need / 3000 + 0.001
        snap = system.snapshot("CP-1")
        assert snap is not None
        assert snap.transaction is None
        assert not snap.plugged


async def test_reboot_on_request() -> None:
    async with central() as system, running(sim(url=system.url(), meter_interval_s=0.1)) as s:
        before = system.snapshot("CP-1")
        assert before is not None
        s.request_boot()
        await eventually(lambda: system.snapshot("CP-1").generation > before.generation)  # type: ignore[union-attr]


async def test_heartbeats_keep_the_charger_seen() -> None:
    async with (
        central() as system,
        running(sim(url=system.url(), heartbeat_s=0.05, meter_interval_s=60)),
    ):
        first = system.snapshot("CP-1").last_seen  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        later = system.snapshot("CP-1").last_seen  # type: ignore[union-attr]
        assert first is not None
        assert later is not None
        assert later > first
