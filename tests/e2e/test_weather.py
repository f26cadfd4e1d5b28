"""A weather forecast published on ``weather`` reaches the flexibility forecast, over mosquitto.

A real gateway with three thermostats (feeder f1: two, feeder f2: one; no device adapters, so
their baselines come from the thermal model alone) and a Grid DERMS client of our own that keeps
every flex forecast and error it sees, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from composition.app import GatewayApp
from composition.config import GatewayConfig, parse_config
from gateway.core import Gateway
from simulators.broker import BrokerEndpoint
from unified.model import utcnow

from .fleet import eventually

RATED = 5.0
FALLBACK_C = 25.0


def ac_kw(temp_c: float) -> float:
    """Default thermal model, 5 kW rated: duty = (T - 22) / (R·COP·rated) = (T - 22) / 30."""
    return RATED * min(1.0, max(0.0, (temp_c - 22.0) / 30.0))


def thermostat(device_id: str, feeder: str) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "der_class": "thermostat",
        "adapter": "mqtt_thermostat",
        "location": {"substation": "s1", "feeder": feeder},
        "ratings": {"max_charge_kw": RATED, "max_discharge_kw": RATED, "capacity_kwh": 3},
    }


def gateway_config(broker: BrokerEndpoint, gateway_id: str, tmp_path: Path) -> GatewayConfig:
    return parse_config(
        {
            "gateway_id": gateway_id,
            "broker": {"host": broker.host, "port": broker.port, "protocol": broker.protocol},
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "settlement": {"timezone": "UTC"},
            # Periodic forecasts only long after the test: every one seen answers a request.
            "flex": {"outdoor_temp_c": FALLBACK_C, "period_s": 86_400},
            "timing": {"telemetry_period_s": 3600},
            "device_mqtt": {
                "host": broker.host,
                "port": broker.port,
                "topic_root": f"devices-{gateway_id}",
            },
            "devices": [thermostat("t1", "f1"), thermostat("t2", "f1"), thermostat("t3", "f2")],
        }
    )


class GridDerms:
    """Publishes weather and flex requests; keeps every flex forecast and error, in order."""

    def __init__(self, client: aiomqtt.Client, root: str) -> None:
        self.client = client
        self.root = root
        self.flex: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []

    async def receive(self) -> None:
        async for message in self.client.messages:
            body = json.loads(bytes(message.payload))
            if message.topic.matches(f"{self.root}/errors"):
                self.errors.append(body)
            else:
                self.flex.append(body)

    async def weather(self, document: dict[str, Any] | bytes) -> None:
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        await self.client.publish(f"{self.root}/weather", payload, qos=1)

    async def forecast(self, request: dict[str, Any]) -> dict[str, Any]:
        request_id = f"rq-{uuid.uuid4().hex[:8]}"
        await self.client.publish(
            f"{self.root}/requests/flex",
            json.dumps(request | {"request_id": request_id}).encode(),
            qos=1,
        )
        await eventually(
            lambda: any(f.get("request_id") == request_id for f in self.flex), 15, request_id
        )
        return next(f for f in self.flex if f.get("request_id") == request_id)


@contextlib.asynccontextmanager
async def grid_derms(broker: BrokerEndpoint, gateway_id: str) -> AsyncIterator[GridDerms]:
    version = aiomqtt.ProtocolVersion.V5 if broker.protocol == "5" else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=version, identifier=f"grid-{uuid.uuid4().hex[:8]}"
    ) as client:
        grid = GridDerms(client, f"derms/v1/{gateway_id}")
        await client.subscribe(f"{grid.root}/errors", qos=1)
        await client.subscribe(f"{grid.root}/telemetry/flex/+", qos=1)
        task = asyncio.create_task(grid.receive(), name="grid-derms-test-receive")
        try:
            yield grid
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def running(config: GatewayConfig) -> AsyncIterator[Gateway]:
    app = GatewayApp(config, adapters={})
    task = asyncio.create_task(app.run(), name="gateway-under-test")
    try:
        await asyncio.wait_for(app.northbound.connected.wait(), 15)
        yield app.core
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


def hour(t: datetime, k: int) -> str:
    return (t + timedelta(hours=k)).isoformat()


def p50(forecast: dict[str, Any], name: str = "baseline_kw") -> list[float]:
    return [i[name]["p50"] for i in forecast["intervals"]]


async def test_weather_forecast_drives_the_flex_baseline_and_survives_a_restart(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    gateway_id = f"gw-wx-{uuid.uuid4().hex[:8]}"
    config = gateway_config(broker_endpoint, gateway_id, tmp_path)
    start = utcnow().replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    request = {"group_id": "feeder:f1", "start": start.isoformat(), "horizon_s": 6 * 3600}
    afternoon = [26.0, 29.0, 32.0, 35.0]  # then two hours the forecast does not cover
    issued = start - timedelta(hours=2)
    f1_weather = {
        "issued_at": issued.isoformat(),
        "scope": "feeder:f1",
        "source": "test",
        "points": [{"start": hour(start, k), "temp_c": t} for k, t in enumerate(afternoon)],
    }
    async with grid_derms(broker_endpoint, gateway_id) as grid:
        async with running(config) as gateway:
            before = await grid.forecast(request)
            assert p50(before) == pytest.approx([2 * ac_kw(FALLBACK_C)] * 6)
            assert {i["temperature_source"] for i in before["intervals"]} == {"configured"}
            assert "weather" not in before

            await grid.weather(f1_weather)
            await eventually(lambda: gateway.weather.get("feeder:f1") is not None, 15, "weather")
            after = await grid.forecast(request)
            expected = [2 * ac_kw(t) for t in afternoon] + [2 * ac_kw(FALLBACK_C)] * 2
            assert p50(after) == pytest.approx(expected)
            assert p50(after)[3] > p50(after)[0] > p50(before)[0]
            sources = [i["temperature_source"] for i in after["intervals"]]
            assert sources == ["weather_forecast"] * 4 + ["configured"] * 2
            assert [i["outdoor_temp_c"] for i in after["intervals"]] == pytest.approx(
                [*afternoon, FALLBACK_C, FALLBACK_C]
            )
            assert after["weather"] == [
                {
                    "scope": "feeder:f1",
                    "issued_at": issued.isoformat().replace("+00:00", "Z"),
                    "thermostats": 2,
                    "intervals_covered": 4,
                }
            ]
            # Feeder f2 is outside that scope: its thermostat keeps the configured temperature.
            other = await grid.forecast(request | {"group_id": "feeder:f2"})
            assert p50(other) == pytest.approx([ac_kw(FALLBACK_C)] * 6)

            # Invalid weather: a specific error, and nothing changes.
            hot = [{"start": hour(start, k), "temp_c": 70.0} for k in range(4)]
            await grid.weather(f1_weather | {"issued_at": hour(issued, 1), "points": hot})
            await grid.weather(b"{not json")
            await grid.weather(f1_weather | {"issued_at": hour(issued, 1), "scope": "feeder:f9"})
            await eventually(lambda: len(grid.errors) >= 3, 15, "three errors")
            reasons = [e["reason"] for e in grid.errors]
            assert reasons == ["schema_violation", "malformed_json", "unknown_group"]
            assert "points.0.temp_c" in grid.errors[0]["detail"]
            assert {e["topic"] for e in grid.errors} == {f"derms/v1/{gateway_id}/weather"}
            # A stale redelivery (older issue) is ignored, without an error.
            await grid.weather(
                f1_weather
                | {
                    "issued_at": hour(issued, -1),
                    "points": [{"start": hour(start, 0), "temp_c": 40}],
                }
            )
            await grid.weather(b"[]")  # handled after the stale one: a marker
            await eventually(lambda: len(grid.errors) >= 4, 15, "the marker's error")
            assert len(grid.errors) == 4
            unchanged = await grid.forecast(request)
            assert p50(unchanged) == pytest.approx(expected)
            held = gateway.weather.get("feeder:f1")
            assert held is not None
            assert held.issued_at == issued

        # A new process: the forecast comes back from the history file (nothing was retained).
        async with running(config) as restarted:
            held = restarted.weather.get("feeder:f1")
            assert held is not None
            assert held.issued_at == issued
            again = await grid.forecast(request)
            assert p50(again) == pytest.approx(expected)
            assert again["weather"] == after["weather"]


async def test_the_gateway_wide_forecast_covers_every_group_and_a_newer_one_replaces_it(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    gateway_id = f"gw-wx-{uuid.uuid4().hex[:8]}"
    config = gateway_config(broker_endpoint, gateway_id, tmp_path)
    start = datetime(2030, 7, 1, 12, tzinfo=UTC)
    request = {"group_id": "substation:s1", "start": start.isoformat(), "horizon_s": 2 * 3600}

    def everywhere(issued_h: int, temps: list[float]) -> dict[str, Any]:
        return {
            "issued_at": hour(start, issued_h),
            "points": [{"start": hour(start, k), "temp_c": t} for k, t in enumerate(temps)],
        }

    async with grid_derms(broker_endpoint, gateway_id) as grid, running(config) as gateway:
        await grid.weather(everywhere(-5, [30.0, 34.0]))
        await eventually(lambda: gateway.weather.get(None) is not None, 15, "weather")
        first = await grid.forecast(request)
        assert p50(first) == pytest.approx([3 * ac_kw(30.0), 3 * ac_kw(34.0)])
        await grid.weather(everywhere(-4, [28.0, 28.0]))
        await eventually(
            lambda: (f := gateway.weather.get(None)) is not None and f.points[0].temp_c == 28.0,
            15,
            "the newer forecast",
        )
        second = await grid.forecast(request)
        assert p50(second) == pytest.approx([3 * ac_kw(28.0)] * 2)
        assert grid.errors == []


async def test_a_new_weather_forecast_republishes_the_retained_flex_forecasts(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    """The periodic forecasts are retained: a subscriber must not keep yesterday's
    temperatures for a whole flex period after a new weather forecast."""
    gateway_id = f"gw-wx-{uuid.uuid4().hex[:8]}"
    base = gateway_config(broker_endpoint, gateway_id, tmp_path)
    config = base.model_copy(
        update={
            "flex": base.flex.model_copy(update={"groups": ("feeder:f1",)}),
            "timing": base.timing.model_copy(update={"telemetry_period_s": 0.5}),
        }
    )
    start = utcnow().replace(minute=0, second=0, microsecond=0)
    weather = {
        "issued_at": utcnow().isoformat(),
        "scope": "feeder:f1",
        "points": [{"start": hour(start, k), "temp_c": 34.0} for k in range(30)],
    }

    def periodic() -> list[dict[str, Any]]:
        return [f for f in grid.flex if f.get("request_id") is None]

    async with grid_derms(broker_endpoint, gateway_id) as grid, running(config):
        await eventually(lambda: len(periodic()) >= 1, 15, "the first periodic forecast")
        first = periodic()[-1]
        assert {i["temperature_source"] for i in first["intervals"]} == {"configured"}
        await grid.weather(weather)
        await eventually(
            lambda: any(
                "weather_forecast" in {i["temperature_source"] for i in f["intervals"]}
                for f in periodic()
            ),
            15,
            "a periodic forecast with the new weather, long before the flex period (1 day)",
        )
