"""The operator endpoint of a real gateway (real mosquitto, Modbus TCP batteries, aiohttp):
metrics follow the fleet, readiness follows the broker, and ``derms-gateway status`` asks it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from composition.cli import main
from simulators.broker import BrokerEndpoint, MosquittoBroker
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually, iso
from unified.model import AckState

pytestmark = pytest.mark.broker

PASSWORD = "op-secret-1"
ROOT = Path(__file__).resolve().parents[2]


def batteries(n: int) -> list[SunSpecBatterySimulator]:
    return [
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=60
        )
        for _ in range(n)
    ]


def operated(broker: BrokerEndpoint, tmp_path: Path, n: int = 2) -> Fleet:
    (tmp_path / "operator.pw").write_text(PASSWORD + "\n")
    (tmp_path / "operator.pw").chmod(0o600)
    return Fleet(
        broker,
        tmp_path / "gw.sqlite",
        batteries(n),
        extra_config={"operator": {"port": 0, "password_file": str(tmp_path / "operator.pw")}},
    )


def base_url(fleet: Fleet) -> str:
    assert fleet.app is not None
    assert fleet.app.operator is not None
    return f"http://127.0.0.1:{fleet.app.operator.port}"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(fleet: Fleet) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url(fleet) + "/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape_until(fleet: Fleet, check: Callable[[Samples], bool], timeout_s: float) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(fleet)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics did not get there in {timeout_s} s")
        await asyncio.sleep(0.2)


async def health(fleet: Fleet, which: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url(fleet) + f"/health/{which}") as response,
    ):
        return response.status, await response.json()


@pytest.fixture
async def fleet(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with operated(broker_endpoint, tmp_path) as f:
        yield f


async def test_metrics_follow_dispatch_refusals_and_a_device_going_offline(fleet: Fleet) -> None:
    before = await scrape(fleet)
    assert value(before, "derms_devices", der_class="battery", state="online") == 2
    assert value(before, "derms_commands_open", state="active") == 0
    assert value(before, "derms_link_up", link="grid_derms") == 1
    assert value(before, "derms_grid_derms_messages_received_total", kind="command") == 0
    assert value(before, "derms_grid_derms_messages_received_total", kind="registry") == 0
    assert value(before, "derms_registry_version") == 1  # the config's seed
    assert value(before, "derms_registry_pending") == 0

    await fleet.grid.send(
        {
            "type": "dispatch",
            "command_id": "m1",
            "kw": -4.0,
            "target": {"group_id": "substation:s1"},
            "start": iso(0.3),
            "duration_s": 60,
        }
    )
    await fleet.grid.wait_for_state("m1", AckState.ACTIVE, 5)
    # The batteries discharge 4 kW between them, and the group metrics say so.
    await scrape_until(
        fleet,
        lambda m: (
            abs((value(m, "derms_group_measured_power_watts", group="substation:s1") or 0) + 4000)
            < 100
        ),
        5,
    )
    await fleet.grid.send(
        {
            "type": "dispatch",
            "command_id": "nowhere",
            "kw": -1.0,
            "target": {"group_id": "feeder:nowhere"},
            "start": iso(0.3),
            "duration_s": 60,
        }
    )
    await fleet.grid.wait_for_state("nowhere", AckState.REJECTED, 5)
    during = await scrape(fleet)
    assert value(during, "derms_commands_open", state="active") == 1
    assert value(during, "derms_grid_derms_messages_received_total", kind="command") == 2
    refused = value(
        during, "derms_grid_derms_messages_refused_total", kind="command", reason="unknown_group"
    )
    assert refused == 1
    cycles = "derms_control_cycle_duration_seconds_count"
    assert (value(during, cycles) or 0) > (value(before, cycles) or 0)
    assert value(during, "derms_gateway_ready") == 1

    # bat-1 is on feeder f1: it stops answering, and goes stale after stale_after_s (2 s).
    await fleet.sims[0].set_offline(True)
    # (Waited for as one picture: on a loaded machine bat-2 may miss a poll of its own.)
    latest = await scrape_until(
        fleet,
        lambda m: (
            value(m, "derms_devices", der_class="battery", state="offline") == 1
            and value(m, "derms_group_devices_missing", group="feeder:f1") == 1
            and value(m, "derms_group_devices_missing", group="feeder:f2") == 0
        ),
        8,
    )
    assert value(latest, "derms_devices", der_class="battery", state="online") == 1
    assert value(latest, "derms_group_devices_reporting", group="substation:s1") == 1


def write_cli_config(fleet: Fleet, tmp_path: Path) -> Path:
    """Where the running gateway's endpoint is, as an operator's config file says (the
    password file relative to the config file; the status command reads [operator] only)."""
    assert fleet.app is not None
    assert fleet.app.operator is not None
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'gateway_id = "{fleet.gateway_id}"\n\n'
        f'[operator]\nport = {fleet.app.operator.port}\npassword_file = "operator.pw"\n'
    )
    return path


async def status_process(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``derms-gateway status`` in a process of its own, as an operator runs it (in a thread:
    the gateway under test runs on this event loop and must keep answering)."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "composition.cli", "status", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def status_command(config: Path, *extra: str) -> Result:
    """The same command in this process (a new process costs seconds of imports)."""
    return await asyncio.to_thread(
        CliRunner().invoke, main, ["status", "--config", str(config), *extra]
    )


async def test_readiness_and_status_follow_the_broker(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with operated(mosquitto.endpoint, tmp_path) as fleet:
        app = fleet.app
        assert app is not None
        config = write_cli_config(fleet, tmp_path)
        status, body = await health(fleet, "ready")
        assert status == 200, body
        async with (
            aiohttp.ClientSession() as session,
            session.get(base_url(fleet) + "/status") as anonymous,
        ):
            assert anonymous.status == 401

        ok = await status_process(config)
        assert ok.returncode == 0, ok.stderr
        assert f"gateway {fleet.gateway_id}" in ok.stdout
        assert "ready: yes" in ok.stdout
        assert "devices: 2/2 online" in ok.stdout
        assert "battery  2/2" in ok.stdout

        await mosquitto.stop()
        await eventually(lambda: not app.northbound.connected.is_set(), 5, "link down")
        status, body = await health(fleet, "ready")
        assert status == 503
        assert body["failed"] == ["broker"]
        assert (await health(fleet, "live"))[0] == 200  # down, not dead: no restart
        not_ready = await status_command(config, "--json")
        assert not_ready.exit_code == 1, not_ready.output
        document = json.loads(not_ready.stdout)
        assert document["ready"]["failed"] == ["broker"]
        assert document["links"]["grid_derms"]["connected"] is False
        samples = await scrape(fleet)
        assert value(samples, "derms_gateway_health_check", check="broker") == 0
        assert value(samples, "derms_link_up", link="grid_derms") == 0

        await mosquitto.start()
        await eventually(app.northbound.connected.is_set, 15, "gateway reconnected")
        status, body = await health(fleet, "ready")
        assert status == 200, body

        await fleet.stop_gateway()
        gone = await status_command(config)
        assert gone.exit_code == 2
        assert "unreachable" in gone.stderr
