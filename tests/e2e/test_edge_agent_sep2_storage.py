"""CSIP-AUS STO-03/06 and ALL-12 end to end, over mutual TLS.

A Grid DERMS dispatch and envelope on the same site become one DERControl with
``opModStorageTargetW`` and ``opModExpLimW`` at the head end's 2030.5 server (CSIP-AUS v1.3), and
the site's edge agent applies both: a storage dispatch on its battery and the site's export
limit. An envelope that disconnects the site's DERs becomes ``opModConnect`` false, and the edge
agent opens its PV inverter's connection (SunSpec) until the envelope ends."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from composition.app import GatewayApp, build_edge_agent
from composition.certs import make_ca, make_cert
from composition.config import EdgeAgentConfig, parse_config
from simulators.broker import BrokerEndpoint, free_port
from simulators.grid_derms import GridDermsClient
from simulators.sunspec_battery import SunSpecBatterySimulator
from simulators.sunspec_pv import IrradianceProfile, SunSpecPvSimulator
from tests.e2e.fleet import eventually, iso
from tests.e2e.test_edge_agent_sep2 import FAST, Site, _run
from unified.model import AckState, Dispatch, OperatingEnvelope, utcnow

pytestmark = pytest.mark.broker


@dataclass
class PvSite(Site):
    pv: SunSpecPvSimulator


@pytest.fixture
async def site(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Site]:
    sep2: dict[str, object] = {"storage_target": True, "power_from": "site", "csipaus": True}
    async with _site(broker_endpoint, tmp_path, sep2, with_pv=False) as built:
        yield built


@pytest.fixture
async def pv_site(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[PvSite]:
    sep2: dict[str, object] = {"supports_target_w": True, "csipaus": False}
    async with _site(broker_endpoint, tmp_path, sep2, with_pv=True) as built:
        assert isinstance(built, PvSite)
        yield built


@contextlib.asynccontextmanager
async def _site(
    broker_endpoint: BrokerEndpoint, tmp_path: Path, sep2: dict[str, object], *, with_pv: bool
) -> AsyncIterator[Site]:
    """A head end serving site-1 over 2030.5 and the site's edge agent with a SunSpec battery
    (and a SunSpec PV inverter)."""
    v13 = sep2.pop("csipaus")
    pki = tmp_path / "pki"
    ca = make_ca(pki)
    server_cert = make_cert(ca, pki, "head-end", server=True, hosts=("127.0.0.1",))
    site_cert = make_cert(ca, pki, "site-1")
    port = free_port()
    broker = {"port": broker_endpoint.port, "protocol": broker_endpoint.protocol}
    tls = {"cert_file": str(site_cert.cert_path), "key_file": str(site_cert.key_path)}
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
                    **({"csipaus": "https://csipaus.org/ns/v1.3"} if v13 else {}),
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
                        "sep2": {"lfdi": site_cert.lfdi, "stale_after_s": 30, **sep2},
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
        pv: SunSpecPvSimulator | None = None
        pv_devices: list[dict[str, object]] = []
        if with_pv:
            pv = await stack.enter_async_context(
                SunSpecPvSimulator(
                    rated_kw=2.0, profile=IrradianceProfile(clear_sky_pu=0.25), step_s=0.05
                )
            )
            pv_devices.append(
                {
                    "device_id": "pv-1",
                    "der_class": "pv",
                    "adapter": "sunspec_pv",
                    "location": {"substation": "site-1"},
                    "ratings": {"max_charge_kw": 2, "max_discharge_kw": 2, "capacity_kwh": 1},
                    "sunspec": {"port": pv.port, "timeout_s": 1.0},
                }
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
                        },
                        *pv_devices,
                    ],
                    "upstream_sep2": {
                        "server_url": f"https://127.0.0.1:{port}",
                        "site_group": "substation:site-1",
                        "tls": {**tls, "ca_file": str(ca.cert_path)},
                        "state_path": str(tmp_path / "edge-sep2.json"),
                        "poll_interval_s": 0.3,
                        "telemetry_interval_s": 0.3,
                        "backoff_max_s": 1.0,
                    },
                },
                model=EdgeAgentConfig,
            )
        )
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
        await eventually(
            lambda: head_end.core.supervisors["site-1"].available,
            15,
            "site-1 reporting to the head end over mutual TLS",
        )
        if pv is not None:
            yield PvSite(head_end, edge, battery, grid, local, pv)
        else:
            yield Site(head_end, edge, battery, grid, local)


async def test_storage_target_and_site_export_limit_in_one_control(site: Site) -> None:
    # The feeder holds one site: its envelope is that site's connection-point limit.
    await site.grid.send(
        {
            "type": "envelope",
            "command_id": "doe-north-f1",
            "target": {"group_id": "feeder:north-f1"},
            "intervals": [{"start": iso(-1), "end": iso(60), "export_limit_kw": 4.0}],
        }
    )
    await site.grid.wait_for_state("doe-north-f1", AckState.ACTIVE, 5)
    await site.grid.send(
        {
            "type": "dispatch",
            "command_id": "north-shed",
            "kw": -2.0,
            "target": {"group_id": "feeder:north-f1"},
            "start": iso(0.1),
            "duration_s": 60,
        }
    )
    await site.grid.wait_for_state("north-shed", AckState.ACTIVE, 5)

    server = site.head_end.sep2_server
    assert server is not None

    def served_both() -> bool:
        control = server.snapshot("site-1").active_control
        return (
            control is not None
            and control.base.op_mod_storage_target_w is not None
            and control.base.op_mod_exp_lim_w is not None
        )

    await eventually(served_both, 10, "one DERControl with a storage target and an export limit")
    control = server.snapshot("site-1").active_control
    assert control is not None
    assert {s.command_id for s in control.provenance} == {"north-shed", "doe-north-f1"}

    # The edge agent applies both: the battery discharges at the storage target, and the
    # site's export limit stands as a local envelope beside the storage dispatch.
    battery = site.battery
    await eventually(
        lambda: battery.wset_enabled and battery.power_kw == pytest.approx(-2.0, abs=0.05),
        10,
        "the site battery discharging at the storage target",
    )
    controls = site.edge.last_controls
    assert controls is not None
    assert controls.storage_target_kw == pytest.approx(-2.0)
    assert controls.export_limit_kw == pytest.approx(4.0)
    active = [a.command for a in site.edge.gateway.book.active(utcnow())]
    envelopes = [c for c in active if isinstance(c, OperatingEnvelope)]
    dispatches = [c for c in active if isinstance(c, Dispatch)]
    # The local envelope is the tighter of the site's export limit and the device generation
    # limit the same control carries (opModGenLimW, the storage target's magnitude).
    assert controls.generation_limit_kw == pytest.approx(2.0)
    assert [e.intervals[0].export_limit_kw for e in envelopes] == [pytest.approx(2.0)]
    assert [(d.kw, d.target.device_ids) for d in dispatches] == [(-2.0, ("bat-1",))]


async def test_a_grid_disconnect_opens_the_site_pv_inverter_until_it_ends(pv_site: PvSite) -> None:
    await eventually(lambda: pv_site.pv.connected and pv_site.pv.power_kw < 0, 10, "PV generating")
    await pv_site.grid.send(
        {
            "type": "envelope",
            "command_id": "trip-north-f1",
            "target": {"group_id": "feeder:north-f1"},
            "intervals": [{"start": iso(-1), "end": iso(60), "connect": False}],
        }
    )
    await pv_site.grid.wait_for_state("trip-north-f1", AckState.ACTIVE, 5)
    server = pv_site.head_end.sep2_server
    assert server is not None

    def served_disconnect() -> bool:
        control = server.snapshot("site-1").active_control
        return control is not None and control.base.op_mod_connect is False

    await eventually(served_disconnect, 10, "opModConnect false served for site-1")
    await eventually(lambda: not pv_site.pv.connected, 10, "the site's PV inverter disconnected")
    controls = pv_site.edge.last_controls
    assert controls is not None
    assert controls.connect is False
    await eventually(lambda: pv_site.pv.power_kw == 0.0, 10, "no PV power while disconnected")

    await pv_site.grid.send(
        {"type": "cancel", "command_id": "trip-north-f1-end", "cancels": "trip-north-f1"}
    )
    await pv_site.grid.wait_for_state("trip-north-f1", AckState.CANCELLED, 5)
    await eventually(lambda: pv_site.pv.connected, 10, "the PV inverter reconnected")
