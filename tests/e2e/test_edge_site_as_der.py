"""Issue 14: to the head end, an edge site is one DER — the site's ratings, the power measured at
its meter and its aggregate SoC — dispatched and enveloped like any other.

Head-end gateway (2030.5 server, mutual TLS) ← edge agent (2030.5 client, site loop over a real
Modbus meter and battery) ← 1 kW of site load the head end cannot see device by device.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from composition.app import GatewayApp, build_edge_agent
from composition.certs import make_ca, make_cert
from composition.config import EdgeAgentConfig, parse_config
from edge_agent.agent import EdgeAgent
from simulators.broker import BrokerEndpoint, free_port
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
    pki = tmp_path / "pki"
    ca = make_ca(pki)
    server_cert = make_cert(ca, pki, "head-end", server=True, hosts=("127.0.0.1",))
    site_cert = make_cert(ca, pki, "site-1")
    port = free_port()
    broker = {"port": broker_endpoint.port, "protocol": broker_endpoint.protocol}
    head_end = GatewayApp(
        parse_config(
            {
                "gateway_id": "head-end-der",
                "broker": broker,
                "timing": FAST,
                "store": {"path": str(tmp_path / "head-end.sqlite")},
                "settlement": {"timezone": "UTC"},
                "operator": {"enabled": False},
                "sep2_server": {
                    "port": port,
                    "tls": {
                        "cert_file": str(server_cert.cert_path),
                        "key_file": str(server_cert.key_path),
                        "ca_file": str(ca.cert_path),
                    },
                    "der_poll_rate_s": 1,
                    "post_rate_s": 1,
                    # The site polls every 0.3 s (time runs fast here) and walks one FSA per
                    # program: far above the pollRate the quota is sized for.
                    "requests_per_client_per_s": 200,
                },
                "devices": [
                    {
                        # The site, one DER: what it is made of is the edge agent's business.
                        "device_id": "site-1",
                        "der_class": "battery",
                        "adapter": "sep2_der",
                        "location": {"substation": "north", "feeder": "north-f1"},
                        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 20},
                        "sep2": {
                            "lfdi": site_cert.lfdi,
                            "supports_target_w": True,
                            "power_from": "site",
                            "stale_after_s": 30,
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
                "gateway_id": "site-1-edge-der",
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
                    "period_s": 0.25,
                    "battery_ramp_kw_per_s": 10,
                },
                "upstream_sep2": {
                    "server_url": f"https://127.0.0.1:{port}",
                    "site_group": "substation:site-1",
                    "tls": {
                        "cert_file": str(site_cert.cert_path),
                        "key_file": str(site_cert.key_path),
                        "ca_file": str(ca.cert_path),
                    },
                    "state_path": str(tmp_path / "edge-sep2.json"),
                    "poll_interval_s": 0.3,
                    "telemetry_interval_s": 0.3,
                    "backoff_max_s": 1.0,
                },
            },
            model=EdgeAgentConfig,
        )
        assert isinstance(config, EdgeAgentConfig)
        edge = build_edge_agent(config)
        grid = await stack.enter_async_context(
            GridDermsClient(
                broker_endpoint.host,
                broker_endpoint.port,
                "head-end-der",
                protocol=broker_endpoint.protocol,
            )
        )
        head_task = asyncio.create_task(head_end.run())
        stack.push_async_callback(_stop, head_task)
        await eventually(
            lambda: head_end.sep2_server is not None and head_end.sep2_server.running,
            10,
            "head-end 2030.5 server up",
        )
        edge_task = asyncio.create_task(edge.run())
        stack.push_async_callback(_stop, edge_task)
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


async def test_the_site_is_one_der_at_the_head_end_measured_at_its_meter(
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
