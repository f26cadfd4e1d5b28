"""The real commands as processes: a standalone battery simulator, and the gateway's clean stop."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from adapters.sunspec.battery import SunSpecBattery, SunSpecEndpoint
from simulators.broker import BrokerEndpoint, free_port, wait_for_port
from simulators.grid_derms import GridDermsClient
from tests.e2e.fleet import eventually

ROOT = Path(__file__).resolve().parents[2]


async def start(*args: str, log: Path | None = None) -> asyncio.subprocess.Process:
    # Output goes to a file, not a pipe nobody reads: a full pipe would block the child.
    if log is None:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "composition.cli",
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "composition.cli", *args, cwd=ROOT, stdout=sink, stderr=sink
        )


async def stop(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
    if process.returncode is None:
        process.send_signal(sig)
    try:
        async with asyncio.timeout(15):
            return await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise


async def test_simulate_battery_command_serves_a_sunspec_map() -> None:
    port = free_port()
    process = await start(
        "simulate", "battery", "--port", str(port), "--soc", "42", "--max-discharge-kw", "7"
    )
    try:
        await wait_for_port("127.0.0.1", port, 20)
        adapter = SunSpecBattery("sim", SunSpecEndpoint(port=port))
        await adapter.connect()
        state = await adapter.read()
        await adapter.close()
        assert state.soc_pct == pytest.approx(42, abs=0.1)
        assert state.max_discharge_kw == pytest.approx(7.0)
    finally:
        assert await stop(process, signal.SIGINT) == 0


@pytest.mark.broker
async def test_gateway_process_stops_cleanly_on_sigterm(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    port = free_port()
    sim = await start("simulate", "battery", "--port", str(port))
    config = tmp_path / "gw.toml"
    config.write_text(f"""
gateway_id = "proc-gw"
[broker]
port = {broker_endpoint.port}
protocol = "{broker_endpoint.protocol}"
[store]
path = "gw.sqlite"
[settlement]
timezone = "UTC"
[[devices]]
device_id = "b1"
der_class = "battery"
adapter = "sunspec_battery"
location = {{ substation = "s1", feeder = "f1" }}
ratings = {{ max_charge_kw = 5, max_discharge_kw = 5, capacity_kwh = 13.5 }}
sunspec = {{ port = {port} }}
""")
    try:
        await wait_for_port("127.0.0.1", port, 20)
        async with GridDermsClient(
            broker_endpoint.host, broker_endpoint.port, "proc-gw", protocol=broker_endpoint.protocol
        ) as grid:
            gateway = await start(
                "-vv", "run", "--config", str(config), log=tmp_path / "gateway.log"
            )
            try:
                await grid.wait_for(
                    lambda o: o.status is not None and o.status.state == "online", 20
                )
                assert grid.observed.status is not None
                assert "feeder:f1" in grid.observed.status.groups
            finally:
                code = await stop(gateway, signal.SIGTERM)
            assert code == 0, (tmp_path / "gateway.log").read_text()[-3000:]
            await eventually(
                lambda: (
                    grid.observed.status is not None and grid.observed.status.state == "offline"
                ),
                5,
                "offline status",
            )
        assert (tmp_path / "gw.sqlite").exists()
    finally:
        await stop(sim)


@pytest.mark.timeout(180)
async def test_the_readme_demo_passes_its_checks(tmp_path: Path) -> None:
    """`derms-gateway demo` is the README's first command: every one of its checks must pass
    (dispatch over every device family, envelope, rejection, the performance report)."""
    log = tmp_path / "demo.log"
    demo = await start("demo", log=log)
    try:
        code = await asyncio.wait_for(demo.wait(), 150)
    finally:
        await stop(demo, signal.SIGKILL)
    out = log.read_text(errors="replace")
    assert code == 0, out[-3000:]
    checks = [line for line in out.splitlines() if " CHECK " in line]
    assert len(checks) >= 6, out[-3000:]
    assert all(line.endswith(": ok") for line in checks), checks
    assert "SETTLED shed-north-f1" in out
