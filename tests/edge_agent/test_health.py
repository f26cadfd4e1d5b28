"""The edge box's health view on the operator endpoint, read with a real aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest

from composition.app import build_edge_agent
from composition.config import EdgeAgentConfig, parse_config
from tests.e2e.fleet import eventually
from unified.config import ConfigError


def _config(tmp_path: Path) -> EdgeAgentConfig:
    location = {"substation": "s1"}
    ratings = {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10}
    config = parse_config(
        {
            "gateway_id": "edge",
            "store": {"path": str(tmp_path / "edge.sqlite")},
            "settlement": {"timezone": "UTC"},
            "operator": {"port": 0},
            "devices": [
                {
                    "device_id": "bat-1",
                    "der_class": "battery",
                    "adapter": "sunspec_battery",
                    "location": location,
                    "ratings": ratings,
                    "sunspec": {"port": 1},
                }
            ],
            "site_loop": {
                "meter": {"port": 1},
                "battery": "bat-1",
                "group": "substation:s1",
                "fallback_export_kw": 1.5,
                "fallback_import_kw": 20,
            },
        },
        model=EdgeAgentConfig,
    )
    assert isinstance(config, EdgeAgentConfig)
    return config


async def test_healthz_says_503_and_why_while_the_site_loop_is_not_holding_the_site(
    tmp_path: Path,
) -> None:
    agent = build_edge_agent(_config(tmp_path))
    assert agent.client is None  # no 2030.5 upstream: commands come over the Grid DERMS link
    operator = agent.host.operator
    assert operator is not None
    task = asyncio.create_task(operator.run())
    try:
        await eventually(lambda: operator.port is not None, 5, "listening")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{operator.port}/healthz") as response,
        ):
            assert response.status == 503
            body = await response.json()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert body["ok"] is False
    assert body["problems"] == ["site loop not stepping"]
    assert body["uplink"] == "unknown"
    assert body["devices_online"] == 0
    assert body["devices_total"] == 1
    # No envelope in force: the configured defaults, said to be the defaults.
    assert body["limits"] == {
        "import_limit_kw": 20.0,
        "export_limit_kw": 1.5,
        "import_source": "fallback",
        "export_source": "fallback",
    }


def test_an_edge_agent_without_a_2030_5_upstream_must_name_its_site_group(
    tmp_path: Path,
) -> None:
    data = _config(tmp_path).model_dump(mode="json", exclude_none=True)
    del data["site_loop"]["group"]
    with pytest.raises(ConfigError, match="site_loop"):
        parse_config(data, model=EdgeAgentConfig)
