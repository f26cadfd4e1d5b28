"""End to end: prices and a ``service`` command from Grid DERMS over mosquitto → the gateway's
schedule → real Modbus TCP SunSpec batteries; re-planned when prices change; a dispatch takes
over the battery it covers."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from simulators.broker import BrokerEndpoint
from tests.e2e.fleet import Fleet, eventually, iso
from tests.e2e.test_gateway_e2e import batteries
from unified.model import AckState, utcnow

pytestmark = pytest.mark.broker

STEP_S = 300


def prices(values: list[float], issued: datetime) -> bytes:
    now = utcnow()
    start = datetime.fromtimestamp(math.floor(now.timestamp() / STEP_S) * STEP_S, UTC)
    return json.dumps(
        {
            "issued_at": issued.isoformat(),
            "step_s": STEP_S,
            "points": [
                {"start": (start + timedelta(seconds=k * STEP_S)).isoformat(), "price": p}
                for k, p in enumerate(values)
            ],
        }
    ).encode()


async def test_arbitrage_follows_prices_and_yields_to_a_dispatch(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    sims = batteries(2, soc=60.0)
    async with Fleet(broker_endpoint, tmp_path / "gw.sqlite", sims, feeders=("f1",)) as fleet:
        root = f"derms/v1/{fleet.gateway_id}"
        async with aiomqtt.Client(
            broker_endpoint.host, broker_endpoint.port, identifier=f"px-{uuid.uuid4().hex[:6]}"
        ) as grid_prices:
            # Dear now and next, cheap after: the batteries sell now and buy back later.
            issued = utcnow()
            dear_now = prices([0.6, 0.6, 0.05, 0.05, 0.05, 0.05], issued)
            await grid_prices.publish(f"{root}/prices", dear_now, qos=1)
            await fleet.grid.send(
                {
                    "type": "service",
                    "command_id": "arb-1",
                    "target": {"group_id": "feeder:f1"},
                    "mode": "arbitrage",
                    "start": iso(0),
                    "duration_s": 3600,
                    "step_s": STEP_S,
                }
            )
            await eventually(
                lambda: all(s.power_kw < -4.9 for s in sims), 20, "both batteries selling"
            )
            active = await fleet.grid.wait_for_state("arb-1", AckState.ACTIVE, 5)
            assert active.state is AckState.ACTIVE
            await fleet.grid.wait_for(
                lambda o: any(
                    {a.device_id for a in ack.allocations} == {"bat-1", "bat-2"}
                    for ack in o.acks.get("arb-1", [])
                ),
                10,
            )
            # New prices: cheap now, dear later. The service re-plans and they buy now.
            cheap_now = prices([0.05, 0.05, 0.6, 0.6, 0.6, 0.6], issued + timedelta(seconds=1))
            await grid_prices.publish(f"{root}/prices", cheap_now, qos=1)
            await eventually(
                lambda: all(s.power_kw > 4.9 for s in sims), 20, "both batteries buying"
            )
            # A dispatch for bat-1 takes it for its window; bat-2 stays on the service.
            await fleet.grid.send(
                {
                    "type": "dispatch",
                    "command_id": "dr-1",
                    "target": {"device_ids": ["bat-1"]},
                    "kw": -3.0,
                    "start": iso(0),
                    "duration_s": 600,
                }
            )
            await eventually(
                lambda: sims[0].power_kw == pytest.approx(-3.0, abs=0.05)
                and sims[1].power_kw > 4.9,
                10,
                "bat-1 on the dispatch, bat-2 still on the service",
            )


def feed(value: float) -> bytes:
    return json.dumps({"value": value, "timestamp": utcnow().isoformat(), "unit": "Hz"}).encode()


async def test_a_feed_trigger_responds_past_its_threshold_and_releases_with_hysteresis(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    sims = batteries(2, soc=60.0)
    async with Fleet(broker_endpoint, tmp_path / "gw.sqlite", sims, feeders=("f1",)) as fleet:
        root = f"derms/v1/{fleet.gateway_id}"
        async with aiomqtt.Client(
            broker_endpoint.host, broker_endpoint.port, identifier=f"fd-{uuid.uuid4().hex[:6]}"
        ) as feeds:
            topic = f"{root}/feeds/frequency"
            await feeds.publish(topic, feed(50.0), qos=1)
            await fleet.grid.send(
                {
                    "type": "service",
                    "command_id": "uf-1",
                    "target": {"group_id": "feeder:f1"},
                    "mode": "feed_trigger",
                    "feed": "frequency",
                    "threshold": 49.8,
                    "trigger": "below",
                    "hysteresis": 0.1,
                    "response": "discharge",
                    "start": iso(0),
                    "duration_s": 3600,
                }
            )
            await fleet.grid.wait_for_state("uf-1", AckState.ACTIVE, 10)
            assert all(abs(s.power_kw) < 0.1 for s in sims)  # 50.0 Hz: nothing to do
            await feeds.publish(topic, feed(49.7), qos=1)
            await eventually(
                lambda: all(s.power_kw < -4.9 for s in sims), 20, "both batteries discharging"
            )
            # Back above the threshold but within the hysteresis: still responding (wait
            # until the gateway holds 49.85, then for a control cycle or two).
            def held() -> float | None:
                value = fleet.gateway.feeds.fresh("frequency", utcnow())
                return None if value is None else value.value

            await feeds.publish(topic, feed(49.85), qos=1)
            await eventually(lambda: held() == 49.85, 10, "49.85 Hz held")
            await asyncio.sleep(1.0)
            assert all(s.power_kw < -4.9 for s in sims)
            await feeds.publish(topic, feed(49.95), qos=1)
            await eventually(
                lambda: all(abs(s.power_kw) < 0.1 for s in sims), 20, "released at 49.95 Hz"
            )
