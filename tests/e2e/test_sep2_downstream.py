"""Grid DERMS over MQTT → gateway → its IEEE 2030.5 server → a DER client polling it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import aiohttp
import pytest

from composition.app import GatewayApp
from composition.config import parse_config
from gateway.audit import read_lines
from protocols.sep2 import MEDIA_TYPE, DERControl, DERControlList, decode_as, to_watts
from simulators.broker import BrokerEndpoint
from simulators.grid_derms import GridDermsClient
from tests.e2e.fleet import eventually, iso
from tests.protocols.sep2.envoy_fixtures import load
from unified.model import AckState

pytestmark = pytest.mark.broker

LFDI = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"  # envoy capture's device A
HEADER = "X-LFDI"


async def test_dispatch_reaches_a_2030_5_client_as_a_der_control(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "gateway_id": "gw-sep2",
            "broker": {"port": broker_endpoint.port, "protocol": broker_endpoint.protocol},
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "settlement": {"timezone": "UTC"},
            "timing": {
                "control_period_s": 0.2,
                "poll_interval_s": 0.3,
                "telemetry_period_s": 0.5,
                "stale_after_s": 2.0,
            },
            "sep2_server": {"port": 0, "dev_lfdi_header": HEADER},
            "devices": [
                {
                    "device_id": "der-1",
                    "der_class": "battery",
                    "adapter": "sep2_der",
                    "location": {"substation": "s1", "feeder": "f1"},
                    "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 13.5},
                    "sep2": {"lfdi": LFDI, "supports_target_w": True},
                }
            ],
        }
    )
    app = GatewayApp(config)
    gateway = app.core
    assert app.sep2_server is not None
    server = app.sep2_server
    async with contextlib.AsyncExitStack() as stack:
        grid = await stack.enter_async_context(
            GridDermsClient(
                broker_endpoint.host,
                broker_endpoint.port,
                "gw-sep2",
                protocol=broker_endpoint.protocol,
            )
        )
        import asyncio

        task = asyncio.create_task(app.run())
        stack.push_async_callback(_cancel, task)
        await eventually(lambda: server.running, 10, "2030.5 server listening")
        session = await stack.enter_async_context(
            aiohttp.ClientSession(headers={HEADER: LFDI, "Content-Type": MEDIA_TYPE})
        )
        edev = server.edev_href("der-1")

        async def send(method: str, href: str, fixture: str) -> str | None:
            async with session.request(method, server.url + href, data=load(fixture)) as resp:
                assert resp.status in (201, 204), await resp.text()
                return resp.headers.get("Location")

        # The DER client reports its status (SoC 65.5 %), capability and power.
        await send("PUT", f"{edev}/der/1/ders", "req-der-status.xml")
        await send("PUT", f"{edev}/der/1/dercap", "req-der-capability.xml")
        await send("POST", "/mup", "req-mup-der.xml")
        await eventually(lambda: gateway.supervisors["der-1"].available, 10, "der-1 online")

        await grid.send(
            {
                "type": "dispatch",
                "command_id": "via-sep2",
                "kw": -3.0,
                "target": {"group_id": "feeder:f1"},
                "start": iso(0.1),
                "duration_s": 60,
            }
        )
        ack = await grid.wait_for_state("via-sep2", AckState.ACTIVE, 5)
        assert [a.device_id for a in ack.allocations] == ["der-1"]

        async def active_target_w() -> float | None:
            fsa_controls = server.snapshot("der-1").active_control
            if fsa_controls is None:
                return None
            href = fsa_controls.href.rsplit("/", 1)[0]  # the DERControlList it lives in
            async with session.get(server.url + href + "?s=0&l=255") as resp:
                assert resp.headers["Content-Type"] == MEDIA_TYPE
                controls = decode_as(DERControlList, await resp.read())
            for control in controls.items:
                base = control.der_control_base
                if control.mrid == fsa_controls.mrid and base.op_mod_target_w is not None:
                    return to_watts(base.op_mod_target_w)
            return None

        targets: list[float | None] = []

        async def poll() -> bool:
            targets.append(await active_target_w())
            return targets[-1] == pytest.approx(3000)

        for _ in range(50):
            if await poll():
                break
            await asyncio.sleep(0.1)
        assert targets[-1] == pytest.approx(3000), targets[-5:]

        # The client answers the control with Response 253 ("cannot be met"): the dispatch is
        # re-allocated around it (there is no one else here: all of it becomes shortfall).
        published = server.snapshot("der-1").active_control
        assert published is not None
        async with session.get(server.url + published.href) as resp:
            control = decode_as(DERControl, await resp.read())
        assert control.reply_to is not None
        body = (
            load("req-derc-response-started.xml")
            .replace(b"30000000000000000000000600000000", control.mrid.encode())
            .replace(b"<status>2</status>", b"<status>253</status>")
        )
        async with session.post(server.url + control.reply_to, data=body) as resp:
            assert resp.status == 201, await resp.text()
        await grid.wait_for(
            lambda o: any(
                a.state is AckState.ACTIVE and not a.allocations and a.shortfall_kw == 3.0
                for a in o.acks["via-sep2"]
            ),
            5,
        )

        # A client asking for another's EndDevice is refused, and the audit trail has it.
        stranger = "0123456789ABCDEF0123456789ABCDEF01234567"
        async with session.get(server.url + edev, headers={HEADER: stranger}) as resp:
            assert resp.status == 403
        assert gateway.audit_log is not None
        folder = gateway.audit_log.directory

        def refused() -> list[dict[str, object]]:
            return [
                line.record
                for line in read_lines(folder)
                if line.record is not None and line.record["kind"] == "access.refused"
            ]

        await eventually(lambda: bool(refused()), 5, "the refusal in the audit log")
        assert refused()[0]["source"] == f"sep2:{stranger}"


async def _cancel(task: object) -> None:
    import asyncio

    assert isinstance(task, asyncio.Task)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
