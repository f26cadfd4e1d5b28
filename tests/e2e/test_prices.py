"""Price schedules published on ``prices`` are validated, kept per scope and kind, and survive
a restart, over mosquitto (the gateway and Grid DERMS client of ``test_weather``)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from simulators.broker import BrokerEndpoint
from unified.model import utcnow

from .fleet import eventually
from .test_weather import gateway_config, grid_derms, running


def schedule(
    start: datetime, prices: list[float], *, issued: datetime, **extra: Any
) -> dict[str, Any]:
    return {
        "issued_at": issued.isoformat(),
        "step_s": 3600,
        "points": [
            {"start": (start + timedelta(hours=k)).isoformat(), "price": p}
            for k, p in enumerate(prices)
        ],
    } | extra


async def test_price_schedules_are_validated_layered_and_kept_across_a_restart(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    gateway_id = f"gw-px-{uuid.uuid4().hex[:8]}"
    config = gateway_config(broker_endpoint, gateway_id, tmp_path)
    start = utcnow().replace(minute=0, second=0, microsecond=0)
    issued = start - timedelta(hours=1)
    day_ahead = schedule(start, [0.10, 0.20, 0.40, 0.15], issued=issued)
    # A feeder's real-time prices for hours 1-2 win there over the gateway's day-ahead ones.
    real_time = schedule(
        start + timedelta(hours=1), [0.90, 0.80], issued=issued, scope="feeder:f1",
        kind="real_time",
    )
    async with running(config) as core, grid_derms(broker_endpoint, gateway_id) as grid:
        publish = grid.client.publish
        topic = f"{grid.root}/prices"
        await publish(topic, json.dumps(day_ahead).encode(), qos=1)
        await publish(topic, json.dumps(real_time).encode(), qos=1)
        await eventually(lambda: len(core.prices) == 2, 15, "both schedules held")
        imp, _ = core.prices.series(["feeder:f1"], start.timestamp(), 3600, 5)
        np.testing.assert_allclose(imp[:4], [0.10, 0.90, 0.80, 0.15])
        assert np.isnan(imp[4])  # nobody priced it: no price is invented
        imp, _ = core.prices.series(["feeder:f2"], start.timestamp(), 3600, 4)
        np.testing.assert_allclose(imp, [0.10, 0.20, 0.40, 0.15])

        # Every bad one is answered on errors, and changes nothing.
        bad = [
            (b'{"issued_at": "2026-01-01T00:00:00Z", "points": [', "malformed_json"),
            (
                json.dumps(schedule(start, [0.1, 1e6], issued=start)).encode(),
                "schema_violation",
            ),
            (
                json.dumps(schedule(start, [0.1], issued=start, scope="feeder:nowhere")).encode(),
                "unknown_group",
            ),
            (
                json.dumps(
                    schedule(start - timedelta(days=2), [0.1, 0.2], issued=start)
                ).encode(),
                "already_ended",
            ),
        ]
        for payload, _reason in bad:
            await publish(topic, payload, qos=1)
        await eventually(lambda: len(grid.errors) >= len(bad), 15, "every bad schedule refused")
        assert [e["reason"] for e in grid.errors] == [r for _, r in bad]
        # An older schedule (a redelivery from before) is ignored, silently.
        older = schedule(start, [5.0, 5.0], issued=issued - timedelta(hours=1))
        await publish(topic, json.dumps(older).encode(), qos=1)
        newer_rt = real_time | {"issued_at": start.isoformat()}
        newer_rt["points"] = [dict(p, price=0.5) for p in real_time["points"]]
        await publish(topic, json.dumps(newer_rt).encode(), qos=1)
        def rt_price() -> float:
            return float(core.prices.series(["feeder:f1"], start.timestamp(), 3600, 2)[0][1])

        await eventually(
            lambda: np.isclose(rt_price(), 0.5),
            15,
            "the newer real-time schedule replaces the older",
        )
        assert np.isclose(core.prices.series(["feeder:f2"], start.timestamp(), 3600, 1)[0][0], 0.1)
        assert len(grid.errors) == len(bad)

    async with running(config) as core:
        imp, _ = core.prices.series(["feeder:f1"], start.timestamp(), 3600, 4)
        np.testing.assert_allclose(imp, [0.10, 0.5, 0.5, 0.15])
