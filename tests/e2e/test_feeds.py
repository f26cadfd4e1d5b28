"""External feed values published on ``feeds/{name}`` are validated, stale and future ones
refused, older ones ignored, and kept across a restart, over mosquitto (the gateway and Grid
DERMS client of ``test_weather``)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from simulators.broker import BrokerEndpoint
from unified.model import utcnow

from .fleet import eventually
from .test_weather import gateway_config, grid_derms, running


def feed(value: float, *, age_s: float = 0.0, **extra: Any) -> bytes:
    stamp = utcnow() - timedelta(seconds=age_s)
    return json.dumps({"value": value, "timestamp": stamp.isoformat()} | extra).encode()


async def test_feed_values_are_validated_and_kept_across_a_restart(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    gateway_id = f"gw-fd-{uuid.uuid4().hex[:8]}"
    config = gateway_config(broker_endpoint, gateway_id, tmp_path)
    async with running(config) as core, grid_derms(broker_endpoint, gateway_id) as grid:
        topic = f"{grid.root}/feeds/frequency"
        await grid.client.publish(topic, feed(49.91, age_s=5, unit="Hz"), qos=1)
        await eventually(
            lambda: (v := core.feeds.fresh("frequency", utcnow())) is not None
            and v.value == 49.91,
            15,
            "the value held",
        )
        bad = [
            (b'{"value": 1', "malformed_json"),
            (feed(float("1e12")), "schema_violation"),
            (json.dumps({"value": "high", "timestamp": utcnow().isoformat()}).encode(),
             "schema_violation"),
            (feed(50.0, name="voltage"), "schema_violation"),  # not the topic's feed
            (feed(50.0, age_s=3600, valid_s=60), "already_ended"),
            (feed(50.0, age_s=-3600), "window_invalid"),
        ]
        for payload, _reason in bad:
            await grid.client.publish(topic, payload, qos=1)
        await eventually(lambda: len(grid.errors) >= len(bad), 15, "every bad value refused")
        assert [e["reason"] for e in grid.errors] == [r for _, r in bad]
        # An older value (a redelivery) is ignored; nothing of the bad ones was used.
        await grid.client.publish(topic, feed(48.0, age_s=60), qos=1)
        await grid.client.publish(f"{grid.root}/feeds/carbon", feed(412.0), qos=1)
        await eventually(lambda: len(core.feeds) == 2, 15, "the second feed held")
        held = core.feeds.fresh("frequency", utcnow())
        assert held is not None
        assert held.value == 49.91
        assert len(grid.errors) == len(bad)

    async with running(config) as core:
        held = core.feeds.fresh("frequency", utcnow())
        assert held is not None
        assert held.value == 49.91
        assert held.unit == "Hz"
