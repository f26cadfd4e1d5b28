"""A ``service`` command in the core: its schedule solved off the loop at the prices held, its
setpoints on the devices with the service as their provenance, and a dispatch taking over the
devices it covers. In process, with the real command book (SQLite) and batteries that answer at
once (the scheduler's physics is tested in test_schedule)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from composition.config import parse_config
from gateway.core import Gateway
from tests.gateway.test_audit import eventually
from unified.model import (
    Ack,
    AckState,
    Cancel,
    Device,
    DeviceCommand,
    DeviceState,
    Dispatch,
    GridService,
    ServiceMode,
    Target,
    utcnow,
)
from unified.prices import PricePoint, PriceSchedule

STEP_S = 900


class Battery:
    """Answers every poll at once; keeps the last command it was given."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.last: DeviceCommand | None = None

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def read(self) -> DeviceState:
        kw = self.last.power_kw if self.last is not None and self.last.power_kw else 0.0
        return DeviceState(
            device_id=self.device_id,
            timestamp=utcnow(),
            power_kw=kw,
            soc_pct=60.0,
            capacity_kwh=10.0,
            max_charge_kw=5.0,
            max_discharge_kw=5.0,
            source="test",
        )

    async def apply(self, command: DeviceCommand) -> None:
        self.last = command


class Acks:
    def __init__(self) -> None:
        self.acks: list[Ack] = []
        self.reports: dict[str, bytes] = {}

    def ack(self, ack: Ack, reply: object | None) -> None:
        self.acks.append(ack)

    def group_telemetry(self, *args: object) -> None: ...
    def device_telemetry(self, *args: object) -> None: ...
    def flex_forecast(self, *args: object) -> None: ...
    def performance_report(self, command_id: str, report: bytes) -> None:
        self.reports[command_id] = report


def battery(device_id: str, port: int) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "der_class": "battery",
        "adapter": "sunspec_battery",
        "location": {"substation": "s1", "feeder": "f1"},
        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
        "sunspec": {"port": port},
    }


@contextlib.asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Mapping[str, Battery], Acks]]:
    config = parse_config(
        {
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "history": {"enabled": False},
            "settlement": {"enabled": False},
            "audit": {"enabled": False},
            "timing": {"control_period_s": 0.2, "poll_interval_s": 0.2},
            "devices": [battery("bat-1", 1001), battery("bat-2", 1002)],
        }
    )
    batteries = {d: Battery(d) for d in ("bat-1", "bat-2")}
    acks = Acks()
    devices: list[Device] = [d.as_device() for d in config.devices]
    core = Gateway(config, devices=devices, adapters=dict(batteries), publisher=acks)
    task = asyncio.create_task(core.run(), name="core-under-test")
    try:
        await asyncio.wait_for(core.ready.wait(), 10)
        yield core, batteries, acks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def prices(now: datetime, values: list[float]) -> PriceSchedule:
    start = datetime.fromtimestamp(math.floor(now.timestamp() / STEP_S) * STEP_S, UTC)
    return PriceSchedule(
        issued_at=now,
        step_s=STEP_S,
        points=tuple(
            PricePoint(start=start + timedelta(seconds=k * STEP_S), price=p)
            for k, p in enumerate(values)
        ),
    )


def held_by(battery: Battery) -> set[str]:
    return {s.command_id for s in battery.last.provenance} if battery.last else set()


async def test_arbitrage_charges_in_cheap_hours_and_yields_to_a_dispatch(tmp_path: Path) -> None:
    async with running(tmp_path) as (core, batteries, acks):
        now = utcnow()
        # Cheap now and in the next step (so a step boundary during the test changes nothing),
        # dear for the hour after: both batteries buy now, to sell then.
        await core.put_prices(prices(now, [0.05, 0.05, 0.6, 0.6, 0.6, 0.6]))
        service = GridService(
            command_id="svc-arb",
            target=Target(group_id="feeder:f1"),
            mode=ServiceMode.ARBITRAGE,
            start=now - timedelta(seconds=1),
            duration_s=4 * 3600,
        )
        await core.submit(service)

        def charging(device_id: str, command_id: str) -> bool:
            b = batteries[device_id]
            return b.last is not None and (b.last.power_kw or 0.0) > 4.9 and held_by(b) == {
                command_id
            }

        await eventually(lambda: charging("bat-1", "svc-arb") and charging("bat-2", "svc-arb"), 30)
        await eventually(
            lambda: any(
                a.command_id == "svc-arb" and a.state is AckState.ACTIVE and len(a.allocations) == 2
                for a in acks.acks
            ),
            10,
        )
        # A dispatch for bat-1 takes it (for its window); bat-2 stays on the service.
        await core.submit(
            Dispatch(
                command_id="dr-1",
                target=Target(device_ids=("bat-1",)),
                kw=-3.0,
                start=utcnow() - timedelta(seconds=1),
                duration_s=600,
            )
        )
        await eventually(
            lambda: batteries["bat-1"].last is not None
            and batteries["bat-1"].last.power_kw == pytest.approx(-3.0)
            and held_by(batteries["bat-1"]) == {"dr-1"},
            10,
        )
        assert charging("bat-2", "svc-arb")


async def test_a_service_without_prices_sets_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as (core, batteries, acks):
        now = utcnow()
        await core.submit(
            GridService(
                command_id="svc-none",
                target=Target(group_id="feeder:f1"),
                mode=ServiceMode.ARBITRAGE,
                start=now - timedelta(seconds=1),
                duration_s=3600,
            )
        )
        await eventually(
            lambda: any(
                a.command_id == "svc-none" and a.state is AckState.ACTIVE for a in acks.acks
            ),
            10,
        )
        await asyncio.sleep(0.5)
        assert all("svc-none" not in held_by(b) for b in batteries.values())


async def test_a_service_that_ends_publishes_its_settlement(tmp_path: Path) -> None:
    async with running(tmp_path) as (core, batteries, acks):
        now = utcnow()
        await core.put_prices(prices(now, [0.05, 0.05, 0.6, 0.6, 0.6, 0.6]))
        await core.submit(
            GridService(
                command_id="svc-end",
                target=Target(group_id="feeder:f1"),
                mode=ServiceMode.ARBITRAGE,
                start=now - timedelta(seconds=1),
                duration_s=4 * 3600,
            )
        )
        await eventually(
            lambda: all(
                b.last is not None and (b.last.power_kw or 0.0) > 4.9 for b in batteries.values()
            ),
            30,
        )
        await asyncio.sleep(1.0)  # a few control cycles of metered charging
        assert "svc-end" not in acks.reports
        await core.submit(Cancel(command_id="cancel-1", cancels="svc-end"))
        await eventually(lambda: "svc-end" in acks.reports, 10)
        report = json.loads(acks.reports["svc-end"])
        assert report["type"] == "service_settlement"
        assert report["group_id"] == "feeder:f1"
        assert report["devices"] == 2
        assert report["schedule_solves"] >= 1
        # Both batteries charged at 0.05 (the unmanaged counterfactual: idle, costing nothing);
        # the energy they hold now is valued at the mean price seen, so nothing is "saved" yet.
        assert report["energy_import_kwh"] > 0
        assert report["energy_cost"] == pytest.approx(
            0.05 * report["energy_import_kwh"], abs=2e-6
        )
        assert report["unmanaged_cost"] == 0
        assert report["battery_energy_change_kwh"] == pytest.approx(
            report["energy_import_kwh"], abs=2e-6
        )
        assert report["cost_saved"] == pytest.approx(0.0, abs=1e-5)


async def test_an_aggregator_limit_caps_every_device_of_its_group(tmp_path: Path) -> None:
    async with running(tmp_path) as (core, batteries, _acks):
        await core.submit(
            GridService(
                command_id="cap-1",
                target=Target(group_id="feeder:f1"),
                mode=ServiceMode.AGGREGATOR_LIMIT,
                device_export_limit_kw=2.0,
                start=utcnow() - timedelta(seconds=1),
                duration_s=3600,
            )
        )
        # A dispatch of 8 kW of discharge would be 4 kW from each; the cap holds each at 2.
        await core.submit(
            Dispatch(
                command_id="dr-cap",
                target=Target(group_id="feeder:f1"),
                kw=-8.0,
                start=utcnow() - timedelta(seconds=1),
                duration_s=600,
            )
        )

        def capped(b: Battery) -> bool:
            return (
                b.last is not None
                and b.last.power_kw == pytest.approx(-2.0)
                and f"cap-1.{b.device_id}" in held_by(b)
            )

        await eventually(lambda: all(capped(b) for b in batteries.values()), 20)
        # Cancelled, the cap goes: the dispatch has its 4 kW from each again.
        await core.submit(Cancel(command_id="cancel-cap", cancels="cap-1"))
        await eventually(
            lambda: all(
                b.last is not None and b.last.power_kw == pytest.approx(-4.0)
                for b in batteries.values()
            ),
            20,
        )
