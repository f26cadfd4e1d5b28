"""Issue 14: an OpenADR VEN on the edge. A utility's OpenADR 2.0b event reaches the site's battery
through the edge agent's VEN and its site loop, and the meter shows it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from composition.app import GatewayApp, build_edge_agent
from composition.config import EdgeAgentConfig, parse_config
from simulators.broker import BrokerEndpoint, free_port
from simulators.site_meter import SiteLoadProfile, SiteMeterSimulator
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.adapters.openadr_ven.test_ven import VEN_NAME, Vtn
from tests.e2e.fleet import eventually
from unified.model import utcnow

pytestmark = [
    pytest.mark.broker,
    pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning"),
]


@pytest.fixture
async def vtn() -> AsyncIterator[Vtn]:
    logging.getLogger("openleadr").setLevel(logging.WARNING)
    server = Vtn(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_an_openadr_event_reaches_the_site_battery_through_the_edge_ven(
    broker_endpoint: BrokerEndpoint, vtn: Vtn, tmp_path: Path
) -> None:
    battery = SunSpecBatterySimulator(
        port=0, capacity_kwh=20, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=70
    )
    meter = SiteMeterSimulator(devices=[battery], load=SiteLoadProfile(base_kw=1.0), step_s=0.05)
    async with contextlib.AsyncExitStack() as stack:
        for sim in (battery, meter):
            await stack.enter_async_context(sim)
        config = parse_config(
            {
                "gateway_id": "site-ven-edge",
                "broker": {"port": broker_endpoint.port, "protocol": broker_endpoint.protocol},
                "timing": {
                    "control_period_s": 0.2,
                    "poll_interval_s": 0.2,
                    "telemetry_period_s": 0.5,
                    "stale_after_s": 2.0,
                    "io_timeout_s": 1.0,
                    "backoff_max_s": 1.0,
                },
                "store": {"path": str(tmp_path / "edge.sqlite")},
                "settlement": {"timezone": "UTC"},
                "operator": {"enabled": False},
                "devices": [
                    {
                        "device_id": "bat-1",
                        "der_class": "battery",
                        "adapter": "sunspec_battery",
                        "location": {"substation": "site-ven"},
                        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 20},
                        "sunspec": {"port": battery.port, "timeout_s": 1.0},
                    }
                ],
                "site_loop": {
                    "meter": {"port": meter.port, "timeout_s": 0.5},
                    "battery": "bat-1",
                    "group": "substation:site-ven",
                    "period_s": 0.25,
                    "battery_ramp_kw_per_s": 10,
                },
                "openadr_ven": {
                    "vtn_url": vtn.url,
                    "program": {
                        "ven_name": VEN_NAME,
                        "program": "utility-dr",
                        "default_group": "substation:site-ven",
                    },
                    "store_path": str(tmp_path / "ven.sqlite"),
                    "poll_interval_s": 0.2,
                    "io_timeout_s": 2.0,
                    "backoff_initial_s": 0.05,
                    "backoff_max_s": 0.5,
                },
            },
            model=EdgeAgentConfig,
        )
        assert isinstance(config, EdgeAgentConfig)
        edge = build_edge_agent(config)
        run = asyncio.create_task(edge.run())

        async def stop() -> None:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

        stack.push_async_callback(stop)
        assert isinstance(edge.host, GatewayApp)
        ven = edge.host.openadr_ven
        assert ven is not None
        await eventually(lambda: ven.registration is not None, 10, "VEN registered with the VTN")
        # The health view counts the VEN among the site's uplinks.
        await eventually(
            lambda: edge.health().uplinks["openadr_ven"].state == "up", 5, "VEN link up"
        )
        await eventually(lambda: edge.gateway.supervisors["bat-1"].available, 10, "bat-1 online")
        # LOAD_DISPATCH delta of -3000 W for 6 s starting in 1 s.
        vtn.add_event(
            "ev-site", values=(-3000.0,), start=utcnow() + timedelta(seconds=1), interval_s=6
        )
        await eventually(
            lambda: battery.power_kw == pytest.approx(-3.0, abs=0.2),
            10,
            "the site battery discharging 3 kW for the utility's event",
        )
        # The meter sees the site export 2 kW (1 kW of load).
        assert meter.net_kw == pytest.approx(-2.0, abs=0.3)
        await eventually(lambda: vtn.opts.get("ev-site") == ["optIn"], 5, "opt-in at the VTN")
        await eventually(lambda: battery.power_kw > -0.1, 10, "released after the event")
