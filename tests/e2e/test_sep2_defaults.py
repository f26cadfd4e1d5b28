"""Operations planning over MQTT: a group's default control and the clients' poll / post rates,
set through the registry API, reach a 2030.5 client polling the gateway's server, and hold
across a restart of the gateway."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from composition.app import GatewayApp
from composition.config import parse_config
from protocols.sep2 import (
    MEDIA_TYPE,
    DefaultDERControl,
    DERProgram,
    DERProgramList,
    DeviceCapability,
    FunctionSetAssignments,
    FunctionSetAssignmentsList,
    decode_as,
    to_watts,
)
from simulators.broker import BrokerEndpoint
from simulators.grid_derms import GridDermsClient
from tests.e2e.fleet import eventually
from unified.model import Reason

pytestmark = pytest.mark.broker

LFDI = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"
HEADER = "X-LFDI"


def _config(broker: BrokerEndpoint, tmp_path: Path) -> Any:
    return parse_config(
        {
            "gateway_id": "gw-dflt",
            "broker": {"port": broker.port, "protocol": broker.protocol},
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "settlement": {"timezone": "UTC"},
            "sep2_server": {"port": 0, "dev_lfdi_header": HEADER},
            "devices": [
                {
                    "device_id": "der-1",
                    "der_class": "battery",
                    "adapter": "sep2_der",
                    "location": {"substation": "s1", "feeder": "f1"},
                    "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 13.5},
                    "sep2": {"lfdi": LFDI},
                }
            ],
        }
    )


async def _read(app: GatewayApp) -> tuple[dict[str, DefaultDERControl], int | None, int | None]:
    """What a client finds: each program's default (by its description) and the rates."""
    server = app.sep2_server
    assert server is not None
    await eventually(lambda: server.running, 10, "2030.5 server listening")
    headers = {HEADER: LFDI, "Content-Type": MEDIA_TYPE}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def get(href: str) -> bytes:
            async with session.get(server.url + href) as resp:
                assert resp.status == 200, href
                return await resp.read()

        dcap = decode_as(DeviceCapability, await get("/dcap"))
        edev = server.edev_href("der-1")
        fsas = decode_as(FunctionSetAssignmentsList, await get(f"{edev}/fsa?l=10"))
        fsa = decode_as(FunctionSetAssignments, await get(fsas.items[0].href or ""))
        assert fsa.der_program_list_link is not None
        programs = decode_as(
            DERProgramList, await get(fsa.der_program_list_link.href + "?s=0&l=255")
        )
        defaults: dict[str, DefaultDERControl] = {}
        for listed in programs.items:
            program = decode_as(DERProgram, await get(listed.href or ""))
            assert program.default_der_control_link is not None
            defaults[program.description or ""] = decode_as(
                DefaultDERControl, await get(program.default_der_control_link.href)
            )
        return defaults, dcap.poll_rate, programs.poll_rate


async def test_defaults_and_rates_set_through_the_registry_reach_2030_5_clients(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    config = _config(broker_endpoint, tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        grid = await stack.enter_async_context(
            GridDermsClient(
                broker_endpoint.host,
                broker_endpoint.port,
                "gw-dflt",
                protocol=broker_endpoint.protocol,
            )
        )
        app = GatewayApp(config)
        task = asyncio.create_task(app.run())
        await asyncio.wait_for(app.core.ready.wait(), 10)
        before, _, _ = await _read(app)
        assert before["feeder:f1"].der_control_base.op_mod_exp_lim_w is None
        ack = await grid.registry_request(
            {
                "request_id": "plan-1",
                "op": "defaults",
                "defaults": {
                    "group_id": "feeder:f1",
                    "export_limit_kw": 2.5,
                    "import_limit_kw": 7.0,
                    "ramp_rate_pct_per_s": 0.5,
                },
            }
        )
        assert ack.state == "applied"
        rates = {"request_id": "plan-2", "op": "rates", "rates": {"poll_rate_s": 120}}
        assert (await grid.registry_request(rates)).state == "applied"
        rates = {"request_id": "plan-3", "op": "rates", "rates": {"der_poll_rate_s": 30}}
        assert (await grid.registry_request(rates)).state == "applied"
        await grid.wait_for(
            lambda o: any(c.op == "rates" and c.rates is not None for c in o.registry_changes), 5
        )
        change = [c for c in grid.observed.registry_changes if c.op == "rates"][-1]
        assert change.rates is not None
        assert (change.rates.poll_rate_s, change.rates.der_poll_rate_s) == (120, 30)  # merged

        defaults, poll, der_poll = await _read(app)
        base = defaults["feeder:f1"].der_control_base
        assert base.op_mod_exp_lim_w is not None
        assert base.op_mod_imp_lim_w is not None
        assert (to_watts(base.op_mod_exp_lim_w), to_watts(base.op_mod_imp_lim_w)) == (2500, 7000)
        assert defaults["feeder:f1"].set_grad_w == 50  # 0.5 %/s in hundredths of a percent
        assert (poll, der_poll) == (120, 30)

        # Refused with a reason: a group no 2030.5 DER is in, and an unknown group.
        for gid, reason in (("feeder:f9", Reason.UNKNOWN_GROUP), ("s9", Reason.UNKNOWN_GROUP)):
            refused = await grid.registry_request(
                {
                    "request_id": f"plan-{gid}",
                    "op": "defaults",
                    "defaults": {"group_id": gid, "export_limit_kw": 1.0},
                }
            )
            assert (refused.state, refused.reason) == ("rejected", reason)

        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        # Restarted (the server keeps no state file here): the registry serves them again.
        app = GatewayApp(config)
        task = asyncio.create_task(app.run())
        stack.push_async_callback(_cancel, task)
        await asyncio.wait_for(app.core.ready.wait(), 10)
        await eventually(lambda: "der-1" in app.core.supervisors, 5, "der-1 supervised")

        async def served() -> bool:
            found, poll, der_poll = await _read(app)
            base = found["feeder:f1"].der_control_base
            exp = base.op_mod_exp_lim_w
            return exp is not None and to_watts(exp) == 2500 and (poll, der_poll) == (120, 30)

        for _ in range(50):
            if await served():
                break
            await asyncio.sleep(0.1)
        assert await served()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
