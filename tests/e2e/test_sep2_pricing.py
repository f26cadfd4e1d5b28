"""Grid DERMS's price schedule (MQTT ``prices``) → the gateway → its IEEE 2030.5 server → a DER
client reading it as Pricing (TariffProfile ... ConsumptionTariffInterval), also after the
gateway restarts (the schedule comes back from the gateway's store)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from composition.app import GatewayApp
from composition.config import GatewayConfig, parse_config
from protocols.sep2 import MEDIA_TYPE, ConsumptionTariffIntervalList, TariffProfileList, decode_as
from simulators.broker import BrokerEndpoint
from tests.e2e.fleet import eventually
from tests.e2e.test_weather import grid_derms
from unified.model import utcnow

pytestmark = pytest.mark.broker

LFDI = "F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5"
HEADER = "X-LFDI"


def _config(broker: BrokerEndpoint, gateway_id: str, tmp_path: Path) -> GatewayConfig:
    return parse_config(
        {
            "gateway_id": gateway_id,
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
                    "sep2": {"lfdi": LFDI, "supports_target_w": True},
                }
            ],
        }
    )


@contextlib.asynccontextmanager
async def _running(config: GatewayConfig) -> AsyncIterator[GatewayApp]:
    app = GatewayApp(config)
    task = asyncio.create_task(app.run(), name="gateway-under-test")
    try:
        await asyncio.wait_for(app.northbound.connected.wait(), 15)
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _read_prices(app: GatewayApp) -> list[int]:
    """The import prices (x 10^-5 per kWh) a 2030.5 client reads, interval by interval."""
    server = app.sep2_server
    assert server is not None
    edev = server.edev_href("der-1")
    async with aiohttp.ClientSession(
        base_url=server.url, headers={HEADER: LFDI}, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:

        async def get(href: str) -> bytes:
            async with session.get(href) as resp:
                assert resp.status == 200, (href, resp.status)
                assert resp.headers["Content-Type"] == MEDIA_TYPE
                return await resp.read()

        profiles = decode_as(TariffProfileList, await get(f"{edev}/tp?l=10"))
        if not profiles.items:
            return []
        t = (profiles.items[0].href or "").rsplit("/", 1)[1]
        prices = []
        for i in range(1, 10):
            href = f"{edev}/tp/{t}/rc/1/tti/{i}/cti"
            async with session.get(href) as resp:
                if resp.status == 404:
                    break
                ctis = decode_as(ConsumptionTariffIntervalList, await resp.read())
            price = ctis.items[0].price
            assert price is not None
            prices.append(price)
        return prices


async def test_a_feeders_prices_reach_its_2030_5_client_and_survive_a_restart(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    gateway_id = f"gw-sep2px-{uuid.uuid4().hex[:8]}"
    config = _config(broker_endpoint, gateway_id, tmp_path)
    start = utcnow().replace(minute=0, second=0, microsecond=0)
    schedule = {
        "issued_at": start.isoformat(),
        "scope": "feeder:f1",
        "currency": "AUD",
        "step_s": 3600,
        "points": [
            {"start": (start + timedelta(hours=k)).isoformat(), "price": p}
            for k, p in enumerate([0.21, 0.35, 0.18])
        ],
    }
    async with _running(config) as app, grid_derms(broker_endpoint, gateway_id) as grid:
        assert await _read_prices(app) == []  # nothing priced yet: no TariffProfile
        await grid.client.publish(f"{grid.root}/prices", json.dumps(schedule).encode(), qos=1)
        await eventually(lambda: len(app.core.prices) == 1, 15, "the schedule held")
        assert await _read_prices(app) == [21000, 35000, 18000]
    async with _running(config) as app:
        await eventually(lambda: len(app.core.prices) == 1, 15, "the schedule loaded")
        assert await _read_prices(app) == [21000, 35000, 18000]
