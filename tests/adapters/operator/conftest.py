"""A real gateway (mosquitto, Modbus TCP batteries) with the live view mounted on a minimal
aiohttp application, as the operator server will mount it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from adapters.operator.auth import BasicAuth
from adapters.operator.view import add_view
from composition.config import GatewayConfig
from gateway.core import Gateway
from simulators.broker import BrokerEndpoint
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet
from unified.model import TopologyLocation

USER = "operator"
PASSWORD = "s3cret-pass"

# bat-1 and bat-3 on feeder f1 (section f1-a), bat-2 and bat-4 on f2 (no sections).
LOCATIONS = {
    "bat-1": TopologyLocation(
        substation="s1", feeder="f1", feeder_section="f1-a", transformer="t1"
    ),
    "bat-2": TopologyLocation(substation="s1", feeder="f2", transformer="t2"),
    "bat-3": TopologyLocation(
        substation="s1", feeder="f1", feeder_section="f1-a", transformer="t3"
    ),
    "bat-4": TopologyLocation(substation="s1", feeder="f2", transformer="t4"),
}


class TopologyFleet(Fleet):
    """The e2e fleet, with feeder sections, transformers and one configured group."""

    def config(self) -> GatewayConfig:
        config = super().config()
        devices = tuple(
            d.model_copy(update={"location": LOCATIONS[d.device_id]}) for d in config.devices
        )
        return config.model_copy(
            update={
                "devices": devices,
                "history": config.history.model_copy(update={"flush_s": 0.3}),
            }
        )


def batteries(n: int = 4) -> list[SunSpecBatterySimulator]:
    return [
        SunSpecBatterySimulator(
            port=0,
            capacity_kwh=10.0,
            max_charge_kw=5.0,
            max_discharge_kw=5.0,
            initial_soc_pct=60.0,
            time_scale=60,
        )
        for _ in range(n)
    ]


@dataclass
class ViewServer:
    fleet: Fleet
    core: Gateway
    app: web.Application
    auth: BasicAuth
    port: int

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/view", *, credentials: bool = True) -> str:
        login = f"{USER}:{PASSWORD}@" if credentials else ""
        return f"http://{login}127.0.0.1:{self.port}{path}"


@pytest.fixture
async def fleet(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with TopologyFleet(broker_endpoint, tmp_path / "gw.sqlite", batteries()) as f:
        yield f


@pytest.fixture
async def view(fleet: Fleet, tmp_path: Path) -> AsyncIterator[ViewServer]:
    secret = tmp_path / "operator.password"
    secret.write_text(PASSWORD + "\n")
    auth = BasicAuth(USER, password_file=secret)
    app = web.Application()
    assert fleet.gateway is not None
    add_view(app, fleet.gateway, auth)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield ViewServer(fleet, fleet.gateway, app, auth, port)
    finally:
        await runner.cleanup()
