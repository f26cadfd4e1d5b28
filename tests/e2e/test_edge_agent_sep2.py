"""Issue 4 end to end: a Grid DERMS command over MQTT reaches a Modbus battery at a site through
the head-end gateway's IEEE 2030.5 server and the site's edge agent, over mutual TLS."""

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
from gateway.audit import read_lines
from simulators.broker import BrokerEndpoint, free_port
from simulators.grid_derms import GridDermsClient
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import eventually, iso
from unified.model import AckState

pytestmark = pytest.mark.broker

FAST = {
    "control_period_s": 0.2,
    "poll_interval_s": 0.3,
    "telemetry_period_s": 0.5,
    "stale_after_s": 2.0,
    "io_timeout_s": 1.0,
    "backoff_max_s": 1.0,
}


async def _run(task_name: str, coro: object, stack: contextlib.AsyncExitStack) -> None:
    task = asyncio.create_task(coro, name=task_name)  # type: ignore[arg-type]

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)


@dataclass
class Site:
    head_end: GatewayApp
    edge: EdgeAgent
    battery: SunSpecBatterySimulator
    grid: GridDermsClient  # Grid DERMS, talking to the head end
    local: GridDermsClient  # a site controller, talking to the edge agent's own MQTT


@pytest.fixture
async def site(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Site]:
    pki = tmp_path / "pki"
    ca = make_ca(pki)
    server_cert = make_cert(ca, pki, "head-end", server=True, hosts=("127.0.0.1",))
    site_cert = make_cert(ca, pki, "site-1")
    port = free_port()
    broker = {"port": broker_endpoint.port, "protocol": broker_endpoint.protocol}

    head_end = GatewayApp(
        parse_config(
            {
                "gateway_id": "head-end",
                "broker": broker,
                "timing": FAST,
                "store": {"path": str(tmp_path / "head-end.sqlite")},
                "settlement": {"timezone": "UTC"},
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
                        "device_id": "site-1",
                        "der_class": "battery",
                        "adapter": "sep2_der",
                        "location": {"substation": "north", "feeder": "north-f1"},
                        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
                        "sep2": {
                            "lfdi": site_cert.lfdi,
                            "supports_target_w": True,
                            "stale_after_s": 30,
                        },
                    }
                ],
            }
        )
    )

    async with contextlib.AsyncExitStack() as stack:
        battery = await stack.enter_async_context(
            SunSpecBatterySimulator(
                port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=70
            )
        )
        edge = build_edge_agent(
            parse_config(
                {
                    "gateway_id": "site-1-edge",
                    "broker": broker,
                    "timing": FAST,
                    "store": {"path": str(tmp_path / "edge.sqlite")},
                    "settlement": {"timezone": "UTC"},
                    "devices": [
                        {
                            "device_id": "bat-1",
                            "der_class": "battery",
                            "adapter": "sunspec_battery",
                            "location": {"substation": "site-1"},
                            "ratings": {
                                "max_charge_kw": 5,
                                "max_discharge_kw": 5,
                                "capacity_kwh": 10,
                            },
                            "sunspec": {"port": battery.port, "timeout_s": 1.0},
                        }
                    ],
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
        )
        assert edge.lfdi.lower() == site_cert.lfdi.lower()
        grid = await stack.enter_async_context(
            GridDermsClient(
                broker_endpoint.host,
                broker_endpoint.port,
                "head-end",
                protocol=broker_endpoint.protocol,
            )
        )
        local = await stack.enter_async_context(
            GridDermsClient(
                broker_endpoint.host,
                broker_endpoint.port,
                "site-1-edge",
                protocol=broker_endpoint.protocol,
            )
        )
        await _run("head-end", head_end.run(), stack)
        await eventually(
            lambda: head_end.sep2_server is not None and head_end.sep2_server.running,
            10,
            "head-end 2030.5 server up",
        )
        await _run("edge", edge.run(), stack)
        # The site posts its telemetry and SoC upstream, so the head end can count on it.
        await eventually(
            lambda: head_end.core.supervisors["site-1"].available,
            15,
            "site-1 reporting to the head end over mutual TLS",
        )
        yield Site(head_end, edge, battery, grid, local)


async def test_grid_dispatch_reaches_a_site_battery_through_2030_5_over_mutual_tls(
    site: Site,
) -> None:
    supervisor = site.head_end.core.supervisors["site-1"]
    # The site's power and its SoC are mirrored in separate posts: wait for both.
    await eventually(
        lambda: supervisor.latest is not None and supervisor.latest.soc_pct is not None,
        10,
        "site-1's SoC mirrored to the head end",
    )
    state = supervisor.latest
    assert state is not None
    assert state.soc_pct == pytest.approx(70, abs=1)

    await site.grid.send(
        {
            "type": "dispatch",
            "command_id": "north-shed",
            "kw": -3.0,
            "target": {"group_id": "feeder:north-f1"},
            "start": iso(0.1),
            "duration_s": 60,
        }
    )
    ack = await site.grid.wait_for_state("north-shed", AckState.ACTIVE, 5)
    assert [a.device_id for a in ack.allocations] == ["site-1"]

    # ... becomes a DERControl the edge agent polls, a local dispatch, and a Modbus write.
    battery = site.battery
    await eventually(
        lambda: battery.wset_enabled and battery.power_kw == pytest.approx(-3.0, abs=0.05),
        10,
        "the site battery discharging 3 kW",
    )
    controls = site.edge.last_controls
    assert controls is not None
    assert controls.target_kw == pytest.approx(-3.0)
    assert controls.generation_limit_kw == pytest.approx(3.0)
    # The site's audit log names the utility's server, and us as its client, as the sender.
    edge_log = site.edge.gateway.audit_log
    assert edge_log is not None
    await eventually(
        lambda: any(
            r.record is not None and r.record["kind"] == "command.received"
            for r in read_lines(edge_log.directory)
        ),
        3,
        "the utility's control recorded",
    )
    sources = {
        r.record["source"]
        for r in read_lines(edge_log.directory)
        if r.record is not None and r.record["kind"] == "command.received"
    }
    upstream = site.edge.upstream.server_url
    assert sources == {f"sep2-server:{upstream};client-lfdi={site.edge.lfdi}"}
    # The head end sees the site's response in its own telemetry.
    await eventually(
        lambda: (
            (s := site.head_end.core.supervisors["site-1"].latest) is not None
            and s.power_kw == pytest.approx(-3.0, abs=0.2)
        ),
        10,
        "site power mirrored upstream",
    )
    await site.grid.send(
        {"type": "cancel", "command_id": "north-shed-end", "cancels": "north-shed"}
    )
    await site.grid.wait_for_state("north-shed", AckState.CANCELLED, 5)
    await eventually(
        lambda: not battery.wset_enabled or battery.power_kw == 0, 10, "the site battery released"
    )


async def test_grid_envelope_caps_a_site_already_discharging_for_a_local_program(
    site: Site,
) -> None:
    battery = site.battery
    # The site's own controller runs the battery for self-consumption: 4 kW export.
    await site.local.send(
        {
            "type": "dispatch",
            "command_id": "self-consumption",
            "kw": -4.0,
            "target": {"group_id": "substation:site-1"},
            "start": iso(0.1),
            "duration_s": 120,
            "program": "site",
        }
    )
    await eventually(
        lambda: battery.power_kw == pytest.approx(-4.0, abs=0.05), 10, "local program running"
    )
    await eventually(
        lambda: (
            (s := site.head_end.core.supervisors["site-1"].latest) is not None
            and s.power_kw == pytest.approx(-4.0, abs=0.2)
        ),
        10,
        "the head end sees the site exporting 4 kW",
    )
    # Grid DERMS: this feeder may export at most 2.5 kW for the next minute.
    await site.grid.send(
        {
            "type": "envelope",
            "command_id": "doe-north-f1",
            "target": {"group_id": "feeder:north-f1"},
            "intervals": [{"start": iso(-1), "end": iso(60), "export_limit_kw": 2.5}],
        }
    )
    await site.grid.wait_for_state("doe-north-f1", AckState.ACTIVE, 5)
    await eventually(
        lambda: battery.power_kw == pytest.approx(-2.5, abs=0.05),
        10,
        "the site battery held to the feeder's export limit",
    )
    # The limit wins over the site's own program, and keeps winning.
    for _ in range(5):
        await asyncio.sleep(0.3)
        assert battery.power_kw >= -2.5 - 0.05
    local_ack = site.local.observed.acks["self-consumption"][-1]
    assert local_ack.state is AckState.ACTIVE
