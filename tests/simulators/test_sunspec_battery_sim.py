"""The SunSpec battery simulator over real Modbus/TCP: map, physics, validation, faults."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sunspec2.modbus.client as sunspec_client

from protocols.modbus import (
    ModbusConnectionError,
    ModbusExceptionResponse,
    ModbusTcpTransport,
    ModbusTimeout,
)
from protocols.sunspec import encode_points, load_model_def, parse_model_chain
from simulators.sunspec_battery import SunSpecBatterySimulator

M704 = load_model_def(704)
BASE = 40000


async def eventually(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def sim() -> AsyncIterator[SunSpecBatterySimulator]:
    async with SunSpecBatterySimulator(
        port=0,
        capacity_kwh=10.0,
        max_charge_kw=4.0,
        max_discharge_kw=5.0,
        initial_soc_pct=50.0,
        time_scale=720.0,  # 1 s of wall time = 12 simulated minutes
        step_s=0.05,
    ) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: SunSpecBatterySimulator) -> AsyncIterator[ModbusTcpTransport]:
    transport = ModbusTcpTransport("127.0.0.1", sim.port, device_id=1, timeout_s=1.0)
    await transport.connect()
    yield transport
    await transport.close()


def _address(sim: SunSpecBatterySimulator, model_id: int, point: str) -> int:
    layout = parse_model_chain(sim.read_registers(BASE, 2 + 68 + 155 + 52 + 67 + 9 + 64 + 2), BASE)
    return layout.find(model_id).address + load_model_def(model_id).point(point).offset


async def _write_704(
    client: ModbusTcpTransport, sim: SunSpecBatterySimulator, values: dict[str, Any]
) -> None:
    base = _address(sim, 704, "ID")
    for offset, regs in encode_points(M704, values, {"WSet_SF": 0, "WSetPct_SF": -2}):
        await client.write_registers(base + offset, regs)


# --------------------------------------------------------------------------- the map


def _scan(port: int) -> dict[int, dict[str, Any]]:
    """Blocking pysunspec2 scan (run in a thread)."""
    device = sunspec_client.SunSpecModbusClientDeviceTCP(
        slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2
    )
    try:
        device.scan()
        out: dict[int, dict[str, Any]] = {}
        for model_id, models in device.models.items():
            if isinstance(model_id, int):
                out[model_id] = {n: p.cvalue for n, p in models[0].points.items()}
        return out
    finally:
        device.close()


def _scan_and_command(port: int, watts: int) -> None:
    """pysunspec2 writes a setpoint through its own model API."""
    device = sunspec_client.SunSpecModbusClientDeviceTCP(
        slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2
    )
    try:
        device.scan()
        ctl = device.models[704][0]
        ctl.WSetMod.cvalue = 1
        ctl.WSet.cvalue = watts
        ctl.WSetEna.cvalue = 1
        ctl.write()
    finally:
        device.close()


async def test_pysunspec2_scans_the_simulator(sim: SunSpecBatterySimulator) -> None:
    models = await asyncio.to_thread(_scan, sim.port)
    assert set(models) == {1, 701, 702, 704, 713, 802}
    assert models[1]["Mn"] == "DERMS Simulators"
    assert models[1]["SN"] == "SIM-BAT-0001"
    assert models[702]["WMaxRtg"] == 5000
    assert models[702]["WChaRteMaxRtg"] == 4000
    assert models[702]["WDisChaRteMaxRtg"] == 5000
    assert models[713]["WHRtg"] == 10000
    assert models[713]["SoC"] == 50.0
    assert models[802]["SoC"] == 50.0
    assert models[701]["W"] == 0
    assert models[701]["Hz"] == 60.0
    assert models[704]["WSetEna"] == 0


async def test_pysunspec2_can_command_the_simulator(sim: SunSpecBatterySimulator) -> None:
    await asyncio.to_thread(_scan_and_command, sim.port, 3000)
    await eventually(lambda: sim.power_kw == -3.0)
    assert sim.wset_enabled
    assert sim.wset_w == 3000
    models = await asyncio.to_thread(_scan, sim.port)
    assert models[701]["W"] == 3000
    assert models[802]["W"] == 3000
    assert models[802]["ChaSt"] == 3  # DISCHARGING


# --------------------------------------------------------------------------- physics


async def test_discharge_follows_wset_and_soc_falls(
    sim: SunSpecBatterySimulator, client: ModbusTcpTransport
) -> None:
    await _write_704(client, sim, {"WSetEna": 1, "WSetMod": 1, "WSet": 2500})
    await eventually(lambda: sim.power_kw == -2.5)
    w = await client.read_holding(_address(sim, 701, "W"), 1)
    assert w == [2500]
    soc_before = sim.soc_pct
    await eventually(lambda: sim.soc_pct < soc_before - 1)
    soc_reg = _address(sim, 713, "SoC")
    await eventually(lambda: sim.read_registers(soc_reg, 1)[0] < 500)


async def test_charge_is_clipped_to_rating_and_idles_when_disabled(
    sim: SunSpecBatterySimulator, client: ModbusTcpTransport
) -> None:
    # -4000 W (charge) is the charge rating; the device accepts it.
    await _write_704(client, sim, {"WSetEna": 1, "WSetMod": 1, "WSet": -4000})
    await eventually(lambda: sim.power_kw == 4.0)
    soc_before = sim.soc_pct
    await eventually(lambda: sim.soc_pct > soc_before + 1)
    await _write_704(client, sim, {"WSetEna": 0})
    await eventually(lambda: sim.power_kw == 0.0)
    assert not sim.wset_enabled


async def test_soc_limits_hold() -> None:
    async with SunSpecBatterySimulator(
        port=0,
        capacity_kwh=1.0,
        initial_soc_pct=50.0,
        min_soc_pct=45.0,
        max_soc_pct=55.0,
        time_scale=3600.0,
        step_s=0.02,
    ) as sim:
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=1.0)
        await transport.connect()
        try:
            await _write_704(transport, sim, {"WSetEna": 1, "WSetMod": 1, "WSet": 5000})
            await eventually(lambda: sim.soc_pct <= 45.0 + 1e-6)
            await eventually(lambda: sim.power_kw == 0.0)
            assert sim.soc_pct == pytest.approx(45.0)
            await asyncio.sleep(0.1)
            assert sim.soc_pct == pytest.approx(45.0)
            await _write_704(transport, sim, {"WSet": -5000})
            await eventually(lambda: sim.soc_pct >= 55.0 - 1e-6)
            await eventually(lambda: sim.power_kw == 0.0)
            assert sim.soc_pct == pytest.approx(55.0)
        finally:
            await transport.close()


async def test_reversion_after_wsetrvrttms(
    sim: SunSpecBatterySimulator, client: ModbusTcpTransport
) -> None:
    await _write_704(
        client,
        sim,
        {
            "WSetEna": 1,
            "WSetMod": 1,
            "WSet": 2000,
            "WSetRvrt": 0,
            "WSetPct": 0,
            "WSetPctRvrt": 0,
            "WSetEnaRvrt": 1,
            "WSetRvrtTms": 1,
        },
    )
    await eventually(lambda: sim.power_kw == -2.0)
    started = time.monotonic()
    await eventually(lambda: sim.power_kw == 0.0, within_s=3.0)
    assert time.monotonic() - started > 0.5  # it held the setpoint for (about) the timeout
    assert sim.wset_w == 0
    assert sim.wset_enabled


# --------------------------------------------------------------------------- validation


async def test_write_to_read_only_point_is_illegal_address(
    sim: SunSpecBatterySimulator, client: ModbusTcpTransport
) -> None:
    address = _address(sim, 701, "W")
    before = sim.read_registers(address, 1)
    with pytest.raises(ModbusExceptionResponse) as info:
        await client.write_registers(address, [1234])
    assert (info.value.function_code, info.value.exception_code) == (16, 2)
    assert sim.read_registers(address, 1) == before
    with pytest.raises(ModbusExceptionResponse) as info:
        await client.write_registers(BASE, [0, 0])  # the marker
    assert info.value.exception_code == 2


async def test_out_of_range_values_are_illegal_value_and_change_nothing(
    sim: SunSpecBatterySimulator, client: ModbusTcpTransport
) -> None:
    ctl = _address(sim, 704, "ID")
    before = sim.read_registers(ctl, M704.size)
    cases = [
        {"WSetEna": 1, "WSetMod": 1, "WSet": 5001},  # beyond the discharge rating
        {"WSetEna": 1, "WSetMod": 1, "WSet": -4001},  # beyond the charge rating
    ]
    for values in cases:
        with pytest.raises(ModbusExceptionResponse) as info:
            await _write_704(client, sim, values)
        assert info.value.exception_code == 3
    with pytest.raises(ModbusExceptionResponse) as info:
        await client.write_registers(_address(sim, 704, "WSetEna"), [5])  # not an enum value
    assert info.value.exception_code == 3
    with pytest.raises(ModbusExceptionResponse) as info:
        await client.write_registers(_address(sim, 704, "WSet"), [0])  # half an int32
    assert info.value.exception_code == 2
    assert sim.read_registers(ctl, M704.size) == before
    assert sim.rejected_write_count == 4
    assert sim.write_count == 4
    assert not sim.wset_enabled


async def test_unknown_unit_id_is_exception_4(sim: SunSpecBatterySimulator) -> None:
    other = ModbusTcpTransport("127.0.0.1", sim.port, device_id=7, timeout_s=1.0)
    await other.connect()
    try:
        with pytest.raises(ModbusExceptionResponse) as info:
            await other.read_holding(BASE, 2)
        assert info.value.exception_code == 4
    finally:
        await other.close()


async def test_reads_outside_the_map_are_illegal_address(
    sim: SunSpecBatterySimulator, client: ModbusTcpTransport
) -> None:
    with pytest.raises(ModbusExceptionResponse) as info:
        await client.read_holding(0, 2)
    assert info.value.exception_code == 2
    # Reads longer than one PDU are split by the transport and still line up.
    regs = await client.read_holding(BASE, 300)
    assert regs == sim.read_registers(BASE, 300)


# --------------------------------------------------------------------------- faults


async def test_injected_exceptions_then_normal_service(
    sim: SunSpecBatterySimulator, client: ModbusTcpTransport
) -> None:
    sim.inject_exception(6, count=2)
    for _ in range(2):
        with pytest.raises(ModbusExceptionResponse) as info:
            await client.read_holding(BASE, 2)
        assert info.value.exception_code == 6
    assert await client.read_holding(BASE, 2) == [0x5375, 0x6E53]


async def test_latency_beyond_the_timeout_is_a_timeout(
    sim: SunSpecBatterySimulator,
) -> None:
    transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=0.2)
    await transport.connect()
    sim.latency_s = 0.5
    started = time.monotonic()
    with pytest.raises(ModbusTimeout):
        await transport.read_holding(BASE, 2)
    assert time.monotonic() - started < 1.0
    sim.latency_s = 0.0
    with pytest.raises(ModbusConnectionError):  # closed after the timeout: state unknown
        await transport.read_holding(BASE, 2)
    await transport.connect()
    assert await transport.read_holding(BASE, 2) == [0x5375, 0x6E53]
    await transport.close()


async def test_offline_closes_connections_and_comes_back_on_the_same_port(
    sim: SunSpecBatterySimulator, client: ModbusTcpTransport
) -> None:
    port = sim.port
    await sim.set_offline(True)
    started = time.monotonic()
    with pytest.raises(ModbusConnectionError):  # reported at once, not after the timeout
        await client.read_holding(BASE, 2)
    assert time.monotonic() - started < 0.5
    with pytest.raises(ModbusConnectionError):
        await client.connect()
    await sim.set_offline(False)
    assert sim.port == port
    await client.connect()
    assert await client.read_holding(BASE, 2) == [0x5375, 0x6E53]


async def test_stop_closes_the_listening_socket() -> None:
    sim = SunSpecBatterySimulator(port=0)
    await sim.start()
    port = sim.port
    assert port != 0
    await sim.stop()
    await sim.stop()  # idempotent
    with socket.socket() as probe:
        probe.settimeout(1.0)
        assert probe.connect_ex(("127.0.0.1", port)) != 0


async def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError, match="unit_id"):
        SunSpecBatterySimulator(unit_id=0)
    with pytest.raises(ValueError, match="soc"):
        SunSpecBatterySimulator(min_soc_pct=60, max_soc_pct=50)
