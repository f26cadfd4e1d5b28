"""SunSpecBattery against the simulator over real Modbus/TCP."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from adapters.sunspec.battery import SunSpecBattery, SunSpecEndpoint
from gateway.devices import (
    DeviceAdapter,
    DeviceProtocolError,
    DeviceRejected,
    DeviceUnavailable,
    UnsafeCommand,
)
from protocols.modbus import ModbusTcpTransport
from protocols.sunspec import load_model_def
from simulators.sunspec_battery import SunSpecBatterySimulator
from unified.model import DeviceCommand

M704 = load_model_def(704)


async def eventually(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


class CountingTransport(ModbusTcpTransport):
    """The real transport, counting requests so tests can hold the adapter to its budget."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, list[int]]] = []

    async def read_holding(self, address: int, count: int) -> list[int]:
        self.reads.append((address, count))
        return await super().read_holding(address, count)

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        self.writes.append((address, list(values)))
        await super().write_registers(address, values)


def cmd(power_kw: float | None) -> DeviceCommand:
    return DeviceCommand(device_id="bat-1", power_kw=power_kw)


@pytest.fixture
async def sim() -> AsyncIterator[SunSpecBatterySimulator]:
    async with SunSpecBatterySimulator(
        port=0,
        capacity_kwh=10.0,
        max_charge_kw=3.3,
        max_discharge_kw=5.0,
        initial_soc_pct=60.0,
        min_soc_pct=10.0,
        time_scale=720.0,
        step_s=0.05,
    ) as simulator:
        yield simulator


def endpoint(sim: SunSpecBatterySimulator, **kw: Any) -> SunSpecEndpoint:
    return SunSpecEndpoint(port=sim.port, timeout_s=kw.pop("timeout_s", 0.5), **kw)


@pytest.fixture
async def battery(sim: SunSpecBatterySimulator) -> AsyncIterator[SunSpecBattery]:
    adapter = SunSpecBattery("bat-1", endpoint(sim))
    await adapter.connect()
    yield adapter
    await adapter.close()


def _ctl_address(battery: SunSpecBattery, point: str) -> int:
    assert battery.layout is not None
    return battery.layout.find(704).address + M704.point(point).offset


async def test_is_a_device_adapter(battery: SunSpecBattery) -> None:
    assert isinstance(battery, DeviceAdapter)
    assert battery.device_id == "bat-1"


async def test_connect_discovers_map_and_ratings(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    assert battery.layout is not None
    assert battery.layout.base_address == 40000
    assert battery.layout.model_ids == (1, 701, 702, 704, 713, 802)
    state = await battery.read()
    assert state.max_charge_kw == 3.3
    assert state.max_discharge_kw == 5.0
    assert state.capacity_kwh == 10.0
    assert state.soc_pct == 60.0
    assert state.power_kw == 0.0
    assert state.setpoint_kw is None
    assert state.source == f"sunspec:127.0.0.1:{sim.port}/1"
    assert state.device_id == "bat-1"


async def test_apply_discharge_moves_registers_power_and_soc(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    await battery.apply(cmd(-5.0))
    # The setpoint registers really changed (SunSpec sign: + injects) ...
    assert sim.read_registers(_ctl_address(battery, "WSetEna"), 11) == [
        1,
        1,
        0,
        5000,
        0,
        0,
        0,
        0,
        1,
        0,
        300,
    ]
    assert sim.wset_enabled
    assert sim.wset_w == 5000
    # ... the battery follows, and its SoC falls.
    await eventually(lambda: sim.power_kw == -5.0)
    state = await battery.read()
    assert state.power_kw == -5.0
    assert state.setpoint_kw == -5.0
    await eventually(lambda: sim.soc_pct < 58.0)
    assert (await battery.read()).soc_pct is not None
    assert (await battery.read()).soc_pct < 59.0  # type: ignore[operator]


async def test_apply_charge_and_release(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    await battery.apply(cmd(2.0))
    await eventually(lambda: sim.power_kw == 2.0)
    assert sim.wset_w == -2000
    await eventually(lambda: sim.soc_pct > 61.0)
    await battery.apply(cmd(None))
    assert not sim.wset_enabled
    await eventually(lambda: sim.power_kw == 0.0)
    state = await battery.read()
    assert state.power_kw == 0.0
    assert state.setpoint_kw is None


async def test_soc_limit_holds_through_the_adapter() -> None:
    async with SunSpecBatterySimulator(
        port=0,
        capacity_kwh=1.0,
        initial_soc_pct=21.0,
        min_soc_pct=20.0,
        time_scale=3600.0,
        step_s=0.02,
    ) as sim:
        adapter = SunSpecBattery("bat-1", endpoint(sim))
        await adapter.connect()
        try:
            await adapter.apply(cmd(-5.0))
            await eventually(lambda: sim.power_kw == 0.0 and sim.soc_pct < 21.0)
            state = await adapter.read()
            assert state.power_kw == 0.0
            assert state.soc_pct == pytest.approx(20.0)
            assert state.setpoint_kw == -5.0  # the request stands; the battery cannot honour it
        finally:
            await adapter.close()


async def test_poll_uses_two_small_reads(sim: SunSpecBatterySimulator) -> None:
    transport = CountingTransport("127.0.0.1", sim.port, timeout_s=0.5)
    adapter = SunSpecBattery("bat-1", endpoint(sim), transport=transport)
    await adapter.connect()
    try:
        await adapter.read()  # first poll also learns the control state
        assert len(transport.reads) > 2
        transport.reads.clear()
        await adapter.apply(cmd(-1.0))
        assert len(transport.writes) == 1  # setpoint + mode + reversion in one block
        await adapter.read()
        assert len(transport.reads) == 2
        assert all(count <= 9 for _, count in transport.reads)
    finally:
        await adapter.close()


@pytest.mark.parametrize("power_kw", [-5.2, 3.5, math.inf, -math.inf, math.nan, -1e9])
async def test_out_of_ratings_is_unsafe_and_writes_nothing(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery, power_kw: float
) -> None:
    writes = sim.write_count
    with pytest.raises(UnsafeCommand):
        await battery.apply(cmd(power_kw))
    assert sim.write_count == writes
    assert not sim.wset_enabled


async def test_within_tolerance_is_clipped_to_the_rating(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    await battery.apply(cmd(-5.04))
    assert sim.wset_w == 5000
    assert (await battery.read()).setpoint_kw == -5.0


async def test_command_for_another_device_is_refused(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    with pytest.raises(UnsafeCommand):
        await battery.apply(DeviceCommand(device_id="bat-2", power_kw=-1.0))
    assert sim.write_count == 0


async def test_modbus_exception_is_device_rejected_with_code(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    sim.inject_exception(6)
    with pytest.raises(DeviceRejected) as info:
        await battery.apply(cmd(-1.0))
    assert info.value.code == 6
    assert info.value.device_id == "bat-1"
    assert not sim.wset_enabled
    sim.inject_exception(4)
    with pytest.raises(DeviceRejected) as info:
        await battery.read()
    assert info.value.code == 4
    # The connection survives an exception response.
    await battery.apply(cmd(-1.0))
    assert sim.wset_w == 1000


async def test_offline_is_unavailable_quickly_and_recovers(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    await sim.set_offline(True)
    started = time.monotonic()
    with pytest.raises(DeviceUnavailable):
        await battery.read()
    with pytest.raises(DeviceUnavailable):
        await battery.connect()
    assert time.monotonic() - started < 2.0
    await sim.set_offline(False)
    await battery.connect()
    await battery.apply(cmd(-2.0))
    await eventually(lambda: sim.power_kw == -2.0)
    assert (await battery.read()).power_kw == -2.0


async def test_silent_device_times_out(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    sim.latency_s = 2.0
    started = time.monotonic()
    with pytest.raises(DeviceUnavailable):
        await battery.read()
    assert time.monotonic() - started < 1.2  # timeout_s 0.5 plus the backstop
    sim.latency_s = 0.0


async def test_not_connected_is_unavailable(sim: SunSpecBatterySimulator) -> None:
    adapter = SunSpecBattery("bat-1", endpoint(sim))
    with pytest.raises(DeviceUnavailable):
        await adapter.read()
    with pytest.raises(DeviceUnavailable):
        await adapter.apply(cmd(None))
    await adapter.close()  # safe without connect, and twice
    await adapter.close()


@pytest.mark.parametrize("base", [0, 50000])
async def test_discovers_the_alternative_base_addresses(base: int) -> None:
    async with SunSpecBatterySimulator(port=0, base_address=base) as sim:
        adapter = SunSpecBattery("bat-1", endpoint(sim))
        await adapter.connect()
        try:
            assert adapter.layout is not None
            assert adapter.layout.base_address == base
            assert (await adapter.read()).soc_pct == 50.0
        finally:
            await adapter.close()


async def test_no_map_is_a_protocol_error_unless_the_base_is_configured() -> None:
    async with SunSpecBatterySimulator(port=0, base_address=1000) as sim:
        adapter = SunSpecBattery("bat-1", endpoint(sim))
        with pytest.raises(DeviceProtocolError):
            await adapter.connect()
        configured = SunSpecBattery("bat-1", endpoint(sim, base_address=1000))
        await configured.connect()
        try:
            assert (await configured.read()).capacity_kwh == 13.5
        finally:
            await configured.close()


async def test_wrong_unit_id_is_rejected(sim: SunSpecBatterySimulator) -> None:
    adapter = SunSpecBattery("bat-1", endpoint(sim, unit_id=9))
    with pytest.raises(DeviceRejected) as info:
        await adapter.connect()
    assert info.value.code == 4


async def test_setpoint_reverts_on_the_device_when_the_gateway_goes_quiet(
    sim: SunSpecBatterySimulator,
) -> None:
    adapter = SunSpecBattery("bat-1", endpoint(sim, setpoint_revert_s=1))
    await adapter.connect()
    try:
        await adapter.apply(cmd(-3.0))
        await eventually(lambda: sim.power_kw == -3.0)
        await eventually(lambda: sim.power_kw == 0.0, within_s=3.0)
        state = await adapter.read()  # cached knowledge expired: reads 704 again
        assert state.setpoint_kw == 0.0
    finally:
        await adapter.close()


def test_endpoint_validation() -> None:
    with pytest.raises(ValueError, match="unit_id"):
        SunSpecEndpoint(port=502, unit_id=0)
    with pytest.raises(ValueError, match="port"):
        SunSpecEndpoint(port=0)
    ep = SunSpecEndpoint(port=5020)
    assert (ep.host, ep.unit_id, ep.timeout_s, ep.base_address, ep.setpoint_revert_s) == (
        "127.0.0.1",
        1,
        2.0,
        None,
        300,
    )


async def test_autonomous_limits_use_wmaxlimpct_and_a_setpoint_lifts_them(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    ena = _ctl_address(battery, "WMaxLimPctEna")
    # WMax of this battery is its 5 kW discharge rating: a 2 kW cap is 40 % (WMaxLimPct_SF -1).
    await battery.apply(DeviceCommand(device_id="bat-1", power_kw=None, export_limit_kw=2.0))
    assert sim.read_registers(ena, 2) == [1, 400]
    assert not sim.wset_enabled
    writes = sim.write_count
    # The same cap again: nothing to write.
    await battery.apply(DeviceCommand(device_id="bat-1", power_kw=None, export_limit_kw=2.0))
    assert sim.write_count == writes + 1  # only the WSetEna release, not the cap
    # A setpoint takes over: the cap is lifted so it cannot clip the setpoint.
    await battery.apply(cmd(-4.0))
    assert sim.read_registers(ena, 1) == [0]
    await eventually(lambda: sim.power_kw == -4.0)
    # The model refuses a non-finite limit; the adapter refuses it again (defence in depth) and
    # writes nothing.
    writes = sim.write_count
    bad = DeviceCommand.model_construct(
        device_id="bat-1",
        power_kw=None,
        import_limit_kw=None,
        export_limit_kw=float("nan"),
        provenance=(),
    )
    with pytest.raises(UnsafeCommand):
        await battery.apply(bad)
    assert sim.write_count == writes
