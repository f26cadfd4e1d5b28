"""Issue 14: an edge site that loses its head end keeps itself safe, and catches up after.

A real mosquitto (the head end's broker: the site's commands come over it and its outbox drains
to it) is stopped mid-test and started again; the site is real Modbus TCP devices (PV inverter,
battery, a meter measuring load + PV + battery) held by the edge agent's site loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from composition.app import build_edge_agent
from composition.config import EdgeAgentConfig, parse_config
from edge_agent.agent import EdgeAgent
from edge_agent.uplink import decode_record
from protocols.mqtt.outbox import InOrderReceiver, outbox_topic
from simulators.broker import MosquittoBroker
from simulators.grid_derms import GridDermsClient
from simulators.site_meter import SiteLoadProfile, SiteMeterSimulator
from simulators.sunspec_battery import SunSpecBatterySimulator
from simulators.sunspec_pv import IrradianceProfile, SunSpecPvSimulator
from tests.e2e.fleet import eventually, iso
from unified.model import AckState

pytestmark = pytest.mark.broker

TIMING = {
    "control_period_s": 0.2,
    "poll_interval_s": 0.1,
    "telemetry_period_s": 0.5,
    "stale_after_s": 2.0,
    "io_timeout_s": 1.0,
    "backoff_max_s": 1.0,
}
FALLBACK_EXPORT_KW = 0.5
PASSWORD = "edge-operator-secret"


@dataclass
class EdgeSite:
    agent: EdgeAgent
    pv: SunSpecPvSimulator
    battery: SunSpecBatterySimulator
    meter: SiteMeterSimulator
    head_end_rx: InOrderReceiver
    operator_url: str


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _head_end_listener(port: int, rx: InOrderReceiver) -> None:
    """The head end's side of the outbox: reconnects as fast as it can after a broker restart
    (the broker keeps no sessions across restarts, so it must be subscribed before the site's
    forwarder drains)."""
    while True:
        try:
            async with aiomqtt.Client("127.0.0.1", port, identifier="head-end-rx") as client:
                await client.subscribe(outbox_topic("site-1", "+"), qos=1)
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    rx.receive(*decode_record(message.payload))
        except aiomqtt.MqttError:
            await asyncio.sleep(0.02)


@pytest.fixture
async def site(mosquitto: MosquittoBroker, tmp_path: Path) -> AsyncIterator[EdgeSite]:
    # 4 kW of PV giving 2 kW on 1 kW of load: 1 kW exported with the battery idle.
    pv = SunSpecPvSimulator(
        rated_kw=4.0, profile=IrradianceProfile(clear_sky_pu=0.5), step_s=0.05
    )
    battery = SunSpecBatterySimulator(
        port=0,
        max_charge_kw=3.0,
        max_discharge_kw=3.0,
        capacity_kwh=50.0,
        initial_soc_pct=60,
        step_s=0.05,
    )
    meter = SiteMeterSimulator(
        devices=[pv, battery], load=SiteLoadProfile(base_kw=1.0), step_s=0.05
    )
    password_file = tmp_path / "operator-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    location = {"substation": "site-1"}
    async with contextlib.AsyncExitStack() as stack:
        for sim in (pv, battery, meter):
            await stack.enter_async_context(sim)
        config = parse_config(
            {
                "gateway_id": "site-1-edge",
                "broker": {"port": mosquitto.port, "protocol": "5"},
                "timing": TIMING,
                "store": {"path": str(tmp_path / "edge.sqlite")},
                "settlement": {"timezone": "UTC"},
                "operator": {"port": 0, "password_file": str(password_file)},
                "devices": [
                    {
                        "device_id": "pv-1",
                        "der_class": "pv",
                        "adapter": "sunspec_pv",
                        "location": location,
                        "ratings": {"max_charge_kw": 4, "max_discharge_kw": 4, "capacity_kwh": 1},
                        "sunspec": {"port": pv.port, "timeout_s": 1.0},
                    },
                    {
                        "device_id": "bat-1",
                        "der_class": "battery",
                        "adapter": "sunspec_battery",
                        "location": location,
                        "ratings": {"max_charge_kw": 3, "max_discharge_kw": 3, "capacity_kwh": 50},
                        "sunspec": {"port": battery.port, "timeout_s": 1.0},
                    },
                ],
                "site_loop": {
                    "meter": {"port": meter.port, "timeout_s": 0.5},
                    "battery": "bat-1",
                    "pv": ["pv-1"],
                    "group": "substation:site-1",
                    "period_s": 0.25,
                    "battery_ramp_kw_per_s": 6,
                    "pv_ramp_kw_per_s": 4,
                    "fallback_export_kw": FALLBACK_EXPORT_KW,
                },
                "uplink_mqtt": {
                    "host": "127.0.0.1",
                    "port": mosquitto.port,
                    "site_id": "site-1",
                    "outbox_path": str(tmp_path / "outbox.sqlite"),
                    "backfill_per_s": 200,
                    "backoff_max_s": 1.0,
                },
            },
            model=EdgeAgentConfig,
        )
        assert isinstance(config, EdgeAgentConfig)
        agent = build_edge_agent(config)
        stack.callback(lambda: agent.outbox.close() if agent.outbox is not None else None)
        rx = InOrderReceiver()
        listener = asyncio.create_task(_head_end_listener(mosquitto.port, rx))
        stack.push_async_callback(_stop, listener)
        run = asyncio.create_task(agent.run())
        stack.push_async_callback(_stop, run)
        core = agent.gateway
        await eventually(
            lambda: all(core.supervisors[d].available for d in ("pv-1", "bat-1")), 10, "online"
        )
        await eventually(lambda: agent.health().uplink == "up", 10, "uplink up")
        operator = agent.host.operator
        assert operator is not None
        await eventually(lambda: operator.port is not None, 5, "operator endpoint listening")
        yield EdgeSite(agent, pv, battery, meter, rx, f"http://127.0.0.1:{operator.port}")


async def _healthz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
        return response.status, await response.json()


async def test_head_end_lost_the_site_holds_its_limits_releases_ends_and_catches_up(
    site: EdgeSite, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.uplink")
    agent, loop = site.agent, site.agent.site_loop
    assert loop is not None
    # Before any envelope: the configured default holds at the meter (1 kW of surplus PV is
    # curtailed or stored down to 0.5 kW of export).
    await eventually(lambda: -site.meter.net_kw <= FALLBACK_EXPORT_KW + 0.15, 10, "default held")

    # The head end: the site may export 4 kW for 6 s, and discharges 2 kW for 4 s of it.
    async with GridDermsClient("127.0.0.1", mosquitto.port, "site-1-edge") as head_end:
        await head_end.send(
            {
                "type": "envelope",
                "command_id": "doe-site-1",
                "target": {"group_id": "substation:site-1"},
                "intervals": [{"start": iso(-1), "end": iso(6), "export_limit_kw": 4.0}],
            }
        )
        await head_end.send(
            {
                "type": "dispatch",
                "command_id": "discharge",
                "kw": -2.0,
                "target": {"group_id": "substation:site-1"},
                "start": iso(0.1),
                "duration_s": 4,
            }
        )
        await head_end.wait_for_state("discharge", AckState.ACTIVE, 5)
    await eventually(lambda: site.battery.power_kw < -1.5, 5, "the battery discharging")

    # The head end's broker goes away.
    await mosquitto.stop()
    await eventually(lambda: agent.health().uplink == "down", 5, "uplink seen down")
    depth_at_loss = agent.health().outbox_depth
    assert loop.limits(loop.samples[-1].at).export_source == "envelope"
    status, body = await _healthz(site.operator_url)
    assert status == 200, body  # the site is held, uplink or not
    assert body["uplink"] == "down"
    assert body["limits"] == {
        "import_limit_kw": None,
        "export_limit_kw": 4.0,
        "import_source": None,
        "export_source": "envelope",
    }
    # The dispatch runs to its end without the head end, then the battery is released.
    assert site.battery.power_kw < -1.5
    await eventually(lambda: site.battery.power_kw > -0.1, 8, "dispatch released at its end")
    # The envelope ends: the site falls back to its default export limit, held at the meter.
    await eventually(
        lambda: loop.limits(loop.samples[-1].at).export_source == "fallback", 6, "fallback"
    )
    await asyncio.sleep(1.5)  # PV cap falls at once; give the battery's soak a moment
    worst = 0.0
    for _ in range(20):
        worst = max(worst, -site.meter.net_kw)
        await asyncio.sleep(0.05)
    assert worst <= FALLBACK_EXPORT_KW + 0.3, f"export {worst:.2f} kW on the fallback limit"
    status, body = await _healthz(site.operator_url)
    assert status == 200
    assert body["limits"]["export_source"] == "fallback"
    assert body["limits"]["export_limit_kw"] == FALLBACK_EXPORT_KW
    outbox_depth = body["outbox_depth"]
    assert isinstance(outbox_depth, int)
    assert depth_at_loss is not None
    assert outbox_depth > depth_at_loss + 10  # the site's samples, kept for the head end
    during_outage = len(loop.samples)

    # The broker comes back: every sample reaches the head end once, in order.
    await mosquitto.start()
    await eventually(lambda: agent.health().uplink == "up", 20, "uplink restored")
    await eventually(
        lambda: agent.outbox is not None and agent.outbox.depth == 0, 15, "outbox drained"
    )
    await eventually(
        lambda: len([r for r in site.head_end_rx.delivered if r.stream == "site"])
        >= during_outage,
        5,
        "the site's samples at the head end",
    )
    site_records = [r for r in site.head_end_rx.delivered if r.stream == "site"]
    assert [r.seq for r in site_records] == list(range(1, len(site_records) + 1))
    times = [json.loads(r.payload)["at"] for r in site_records]
    assert times == sorted(times)
    assert site.head_end_rx.skipped == 0
    # What the site did while alone is in what the head end got: the fallback limit in force.
    assert any(json.loads(r.payload).get("export_source") == "fallback" for r in site_records)
    print(
        f"fallback worst export {worst:.3f} kW; {outbox_depth} record(s) buffered; "
        f"{len(site_records)} site samples delivered in order, {site.head_end_rx.duplicates} "
        "duplicate(s) dropped"
    )
    # One line when the link went, one when it came back.
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_agent.uplink"]
    assert len([m for m in lines if " lost " in m]) == 1, lines
    assert len([m for m in lines if " restored " in m]) == 1, lines


async def test_status_carries_the_edge_view_behind_the_operator_password(
    site: EdgeSite,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{site.operator_url}/status") as response:
            assert response.status == 401
        token = base64.b64encode(f"operator:{PASSWORD}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        async with http.get(f"{site.operator_url}/status", headers=headers) as response:
            assert response.status == 200
            status = await response.json()
    edge = status["edge"]
    assert edge["uplink"] == "up"
    assert edge["uplinks"]["head_end_mqtt"]["state"] == "up"
    assert edge["devices_online"] == 2
    assert edge["devices_total"] == 2
    assert edge["site_loop"]["period_s"] == 0.25
    assert edge["site_loop"]["last_step_at"] is not None
    assert edge["limits"]["export_source"] == "fallback"
