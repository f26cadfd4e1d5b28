"""Issue 14: an edge site as one DER of a head end over MQTT (``adapter = "edge_site"``).

Head-end gateway and edge agent on one broker: the site's samples reach the head end through
the edge's durable outbox, the head end's commands reach the site on its Grid DERMS link; the
site is a real Modbus meter and battery with 1 kW of load the head end cannot see otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from composition.app import GatewayApp, build_edge_agent
from composition.config import EdgeAgentConfig, parse_config
from edge_agent.agent import EdgeAgent
from simulators.broker import BrokerEndpoint
from simulators.grid_derms import GridDermsClient
from simulators.site_meter import SiteLoadProfile, SiteMeterSimulator
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import eventually, iso
from unified.model import AckState, utcnow

pytestmark = pytest.mark.broker

FAST = {
    "control_period_s": 0.2,
    "poll_interval_s": 0.2,
    "telemetry_period_s": 0.5,
    "stale_after_s": 2.0,
    "io_timeout_s": 1.0,
    "backoff_max_s": 1.0,
}
SITE_LOAD_KW = 1.0


@dataclass
class HeadEndAndSite:
    head_end: GatewayApp
    edge: EdgeAgent
    battery: SunSpecBatterySimulator
    meter: SiteMeterSimulator
    grid: GridDermsClient


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
async def system(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[HeadEndAndSite]:
    broker = {"port": broker_endpoint.port, "protocol": broker_endpoint.protocol}
    head_end = GatewayApp(
        parse_config(
            {
                "gateway_id": "head-end-mqtt",
                "broker": broker,
                "timing": FAST,
                "store": {"path": str(tmp_path / "head-end.sqlite")},
                "settlement": {"timezone": "UTC"},
                "operator": {"enabled": False},
                "devices": [
                    {
                        # The site, one DER on the head end's broker.
                        "device_id": "site-1",
                        "der_class": "battery",
                        "adapter": "edge_site",
                        "location": {"substation": "north", "feeder": "north-f1"},
                        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 20},
                        "edge_site": {
                            "port": broker_endpoint.port,
                            "site_id": "site-1",
                            "gateway_id": "site-1-edge-mqtt",
                            "site_group": "substation:site-1",
                            "stale_after_s": 5,
                        },
                    }
                ],
            }
        )
    )
    battery = SunSpecBatterySimulator(
        port=0,
        capacity_kwh=20,
        max_charge_kw=5,
        max_discharge_kw=5,
        initial_soc_pct=70,
        step_s=0.05,
    )
    meter = SiteMeterSimulator(
        devices=[battery], load=SiteLoadProfile(base_kw=SITE_LOAD_KW), step_s=0.05
    )
    async with contextlib.AsyncExitStack() as stack:
        for sim in (battery, meter):
            await stack.enter_async_context(sim)
        config = parse_config(
            {
                # No 2030.5 upstream: the site takes unified commands on the head end's broker.
                "gateway_id": "site-1-edge-mqtt",
                "broker": broker,
                "timing": FAST,
                "store": {"path": str(tmp_path / "edge.sqlite")},
                "settlement": {"timezone": "UTC"},
                "operator": {"enabled": False},
                "devices": [
                    {
                        "device_id": "bat-1",
                        "der_class": "battery",
                        "adapter": "sunspec_battery",
                        "location": {"substation": "site-1"},
                        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 20},
                        "sunspec": {"port": battery.port, "timeout_s": 1.0},
                    }
                ],
                "site_loop": {
                    "meter": {"port": meter.port, "timeout_s": 0.5},
                    "battery": "bat-1",
                    "group": "substation:site-1",
                    "period_s": 0.25,
                    "battery_ramp_kw_per_s": 10,
                },
                "uplink_mqtt": {
                    "host": "127.0.0.1",
                    "port": broker_endpoint.port,
                    "site_id": "site-1",
                    "outbox_path": str(tmp_path / "outbox.sqlite"),
                    "backfill_per_s": 200,
                },
            },
            model=EdgeAgentConfig,
        )
        assert isinstance(config, EdgeAgentConfig)
        edge = build_edge_agent(config)
        stack.callback(lambda: edge.outbox.close() if edge.outbox is not None else None)
        grid = await stack.enter_async_context(
            GridDermsClient(
                broker_endpoint.host,
                broker_endpoint.port,
                "head-end-mqtt",
                protocol=broker_endpoint.protocol,
            )
        )
        edge_task = asyncio.create_task(edge.run())
        stack.push_async_callback(_stop, edge_task)
        head_task = asyncio.create_task(head_end.run())
        stack.push_async_callback(_stop, head_task)
        await eventually(
            lambda: head_end.core.supervisors["site-1"].available, 15, "site-1 at the head end"
        )
        yield HeadEndAndSite(head_end, edge, battery, meter, grid)


def _head_end_site_kw(system: HeadEndAndSite) -> float | None:
    state = system.head_end.core.supervisors["site-1"].latest
    return None if state is None else state.power_kw


def _head_end_feeder_kw(system: HeadEndAndSite) -> float | None:
    for telemetry in system.head_end.core.group_telemetry(utcnow()):
        if telemetry.group_id == "feeder:north-f1":
            return telemetry.power_kw
    return None


async def test_the_site_is_one_der_of_the_head_end_over_mqtt(
    system: HeadEndAndSite,
) -> None:
    supervisor = system.head_end.core.supervisors["site-1"]
    # The site's aggregate as the head end reads it: ratings and SoC of its storage, power at
    # the connection point (the 1 kW load included, though no device of the site draws it).
    await eventually(
        lambda: (
            (s := supervisor.latest) is not None
            and s.soc_pct is not None
            and s.power_kw == pytest.approx(SITE_LOAD_KW, abs=0.15)
        ),
        10,
        "the site's metered import and SoC at the head end",
    )
    state = supervisor.latest
    assert state is not None
    assert state.soc_pct == pytest.approx(70, abs=1)
    assert state.max_discharge_kw == pytest.approx(5)
    assert state.capacity_kwh == pytest.approx(20)

    # Grid DERMS asks the head end for 3 kW of discharge on the feeder: the site gets it, its
    # battery delivers it, and the head end sees the site go from 1 kW import to export, as
    # the meter measures it (battery and load), not as the battery alone.
    await system.grid.send(
        {
            "type": "dispatch",
            "command_id": "north-discharge",
            "kw": -3.0,
            "target": {"group_id": "feeder:north-f1"},
            "start": iso(0.1),
            "duration_s": 60,
        }
    )
    ack = await system.grid.wait_for_state("north-discharge", AckState.ACTIVE, 5)
    assert [a.device_id for a in ack.allocations] == ["site-1"]
    await eventually(lambda: system.battery.power_kw < -2.5, 10, "the site battery discharging")

    def metered_at_head_end() -> bool:
        kw = _head_end_site_kw(system)
        return (
            kw is not None
            and kw < -1.2
            and kw == pytest.approx(system.battery.power_kw + SITE_LOAD_KW, abs=0.3)
        )

    await eventually(metered_at_head_end, 10, "the site's metered power at the head end")
    # The metered power is what the head end's estimator publishes for the feeder.
    await eventually(
        lambda: (
            (kw := _head_end_feeder_kw(system)) is not None
            and kw == pytest.approx(system.meter.net_kw, abs=0.3)
            and kw < -1.2
        ),
        10,
        "the feeder's telemetry at the head end",
    )
