"""The Grid DERMS link survives broker restarts and gateway restarts without losing commands."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from simulators.broker import MosquittoBroker
from simulators.grid_derms import GridDermsClient
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually, iso
from unified.model import AckState

pytestmark = pytest.mark.broker


@pytest.fixture
async def fleet(mosquitto: MosquittoBroker, tmp_path: Path) -> AsyncIterator[Fleet]:
    sims = [
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=60
        )
        for _ in range(2)
    ]
    async with Fleet(mosquitto.endpoint, tmp_path / "gw.sqlite", sims) as f:
        yield f


async def test_gateway_reconnects_after_a_broker_restart(
    fleet: Fleet, mosquitto: MosquittoBroker
) -> None:
    assert fleet.app is not None
    await fleet.grid.send(
        {
            "type": "dispatch",
            "command_id": "before",
            "kw": -2.0,
            "target": {"group_id": "substation:s1"},
            "start": iso(0.2),
            "duration_s": 30,
        }
    )
    await fleet.grid.wait_for_state("before", AckState.ACTIVE, 5)

    await mosquitto.stop()
    await eventually(lambda: not fleet.app.northbound.connected.is_set(), 5, "link down")
    # The devices keep obeying the active command while the uplink is down.
    await eventually(
        lambda: (
            fleet.feeder_power_kw("f1") + fleet.feeder_power_kw("f2")
            == pytest.approx(-2.0, abs=0.05)
        ),
        3,
    )
    await mosquitto.start()  # same port
    await eventually(fleet.app.northbound.connected.is_set, 15, "gateway reconnected")

    async with GridDermsClient(
        mosquitto.endpoint.host, mosquitto.endpoint.port, fleet.gateway_id
    ) as grid:
        await grid.wait_for(lambda o: o.status is not None and o.status.state == "online", 5)
        await grid.send({"type": "cancel", "command_id": "after", "cancels": "before"})
        await grid.wait_for_state("before", AckState.CANCELLED, 5)
    await eventually(lambda: all(not s.wset_enabled for s in fleet.sims), 3, "released")


async def test_commands_sent_while_the_gateway_is_down_are_delivered_on_return(
    fleet: Fleet,
) -> None:
    await fleet.stop_gateway()  # its persistent session stays in the broker
    await fleet.grid.send(
        {
            "type": "dispatch",
            "command_id": "queued",
            "kw": -3.0,
            "target": {"group_id": "substation:s1"},
            "start": iso(0.5),
            "duration_s": 30,
        }
    )
    await fleet.start_gateway()
    ack = await fleet.grid.wait_for_state("queued", AckState.ACTIVE, 10)
    assert sum(a.commanded_kw for a in ack.allocations) == pytest.approx(-3.0)


async def test_a_command_the_gateway_died_handling_is_delivered_again(fleet: Fleet) -> None:
    """The broker's PUBACK is sent only once a command is stored: a gateway that stops between
    receiving a command and storing it gets it again from its persistent session."""
    gateway = fleet.gateway
    assert gateway is not None
    entered = asyncio.Event()

    async def dies_before_storing(*_: object, **__: object) -> None:
        entered.set()
        await asyncio.Event().wait()  # the disk hangs, then the process is stopped

    gateway.book.submit = dies_before_storing  # type: ignore[method-assign]
    await fleet.grid.send(
        {
            "type": "dispatch",
            "command_id": "in-flight",
            "kw": -2.0,
            "target": {"group_id": "substation:s1"},
            "start": iso(0.5),
            "duration_s": 30,
        }
    )
    await asyncio.wait_for(entered.wait(), 10)
    await fleet.stop_gateway()
    assert fleet.grid.states("in-flight") == []  # nothing was acknowledged to Grid DERMS

    await fleet.start_gateway()  # a new process, same session
    ack = await fleet.grid.wait_for_state("in-flight", AckState.ACTIVE, 10)
    assert sum(a.commanded_kw for a in ack.allocations) == pytest.approx(-2.0)
