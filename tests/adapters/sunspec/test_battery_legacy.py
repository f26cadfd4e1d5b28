"""SunSpecBattery against a simulator showing only the legacy models (1, 103, 120–124)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.sunspec.battery import SunSpecBattery, SunSpecEndpoint
from gateway.devices import DeviceProtocolError, DeviceRejected, UnsafeCommand
from protocols.sunspec import load_model_def
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.adapters.sunspec.test_battery import CountingTransport, cmd, eventually
from unified.model import DeviceCommand


def endpoint(sim: SunSpecBatterySimulator, **kw: Any) -> SunSpecEndpoint:
    return SunSpecEndpoint(port=sim.port, timeout_s=0.5, **kw)


@pytest.fixture
async def sim() -> AsyncIterator[SunSpecBatterySimulator]:
    async with SunSpecBatterySimulator(
        port=0,
        legacy=True,
        capacity_kwh=10.0,
        max_charge_kw=3.3,
        max_discharge_kw=5.0,
        initial_soc_pct=60.0,
        min_soc_pct=10.0,
        time_scale=720.0,
        step_s=0.05,
    ) as simulator:
        yield simulator


@pytest.fixture
async def battery(sim: SunSpecBatterySimulator) -> AsyncIterator[SunSpecBattery]:
    adapter = SunSpecBattery("bat-1", endpoint(sim))
    await adapter.connect()
    yield adapter
    await adapter.close()


def _addr(battery: SunSpecBattery, model: int, point: str) -> int:
    assert battery.layout is not None
    return battery.layout.find(model).address + load_model_def(model).point(point).offset


async def test_a_legacy_only_device_is_no_longer_refused(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    assert battery.layout is not None
    assert battery.layout.model_ids == (1, 103, 120, 121, 123, 124)
    assert battery.legacy
    state = await battery.read()
    # Ratings from 120 MaxChaRte / MaxDisChaRte, capacity from 120 WHRtg, SoC from 124 ChaState.
    assert (state.max_charge_kw, state.max_discharge_kw, state.capacity_kwh) == (3.3, 5.0, 10.0)
    assert state.soc_pct == 60.0
    assert state.power_kw == 0.0
    assert state.setpoint_kw is None


async def test_discharge_and_charge_through_the_124_window(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    await battery.apply(cmd(-4.0))
    # WChaMax is 5 kW (the larger rating) and InOutWRte_SF is -1: 4 kW out is 80.0 %, as
    # OutWRte=+800 and InWRte=-800, then StorCtl_Mod = CHARGE|DISCHARGE.
    out = _addr(battery, 124, "OutWRte")
    assert sim.read_registers(out, 5) == [800, -800 & 0xFFFF, 0, 300, 0]
    assert sim.read_registers(_addr(battery, 124, "StorCtl_Mod"), 1) == [3]
    await eventually(lambda: sim.power_kw == -4.0)
    state = await battery.read()
    assert (state.power_kw, state.setpoint_kw) == (-4.0, -4.0)
    await eventually(lambda: sim.soc_pct < 59.0)
    await battery.apply(cmd(2.0))
    await eventually(lambda: sim.power_kw == 2.0)
    assert sim.read_registers(out, 2) == [-400 & 0xFFFF, 400]
    await battery.apply(cmd(None))
    assert sim.read_registers(_addr(battery, 124, "StorCtl_Mod"), 1) == [0]
    await eventually(lambda: sim.power_kw == 0.0)
    assert (await battery.read()).setpoint_kw is None


async def test_poll_stays_two_small_reads(sim: SunSpecBatterySimulator) -> None:
    transport = CountingTransport("127.0.0.1", sim.port, timeout_s=0.5)
    adapter = SunSpecBattery("bat-1", endpoint(sim), transport=transport)
    await adapter.connect()
    try:
        await adapter.read()
        await adapter.apply(cmd(-1.0))
        transport.reads.clear()
        await adapter.read()
        assert transport.reads == [
            (adapter.layout.find(103).address + 14, 1),  # type: ignore[union-attr]
            (adapter.layout.find(124).address + 8, 1),  # type: ignore[union-attr]
        ]
    finally:
        await adapter.close()


async def test_out_of_ratings_is_unsafe_and_writes_nothing(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    with pytest.raises(UnsafeCommand):
        await battery.apply(cmd(3.6))  # beyond the 3.3 kW charge rating
    assert sim.write_count == 0


async def test_setpoint_reverts_with_inoutwrte_rvrttms(sim: SunSpecBatterySimulator) -> None:
    adapter = SunSpecBattery("bat-1", endpoint(sim, setpoint_revert_s=1))
    await adapter.connect()
    try:
        await adapter.apply(cmd(-3.0))
        await eventually(lambda: sim.power_kw == -3.0)
        await eventually(lambda: sim.power_kw == 0.0, within_s=3.0)
        assert (await adapter.read()).setpoint_kw is None  # the window lapsed on the device
    finally:
        await adapter.close()


async def test_autonomous_limit_uses_123_wmaxlimpct(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    pct = _addr(battery, 123, "WMaxLimPct")
    # 121 WMax is 5 kW: a 2 kW cap is 40.0 % at WMaxLimPct_SF -1, no reversion, enabled.
    await battery.apply(DeviceCommand(device_id="bat-1", power_kw=None, export_limit_kw=2.0))
    assert sim.read_registers(pct, 5) == [400, 0, 0, 0, 1]
    # A setpoint lifts the cap so it cannot clip the setpoint.
    await battery.apply(cmd(-4.0))
    assert sim.read_registers(_addr(battery, 123, "WMaxLim_Ena"), 1) == [0]
    await eventually(lambda: sim.power_kw == -4.0)


async def test_a_setpoint_the_device_cannot_take_fails_honestly(
    sim: SunSpecBatterySimulator, battery: SunSpecBattery
) -> None:
    # The same device with 124's rate points "not implemented": it can be read, but a setpoint
    # is refused with a reason and nothing is written (the supervisor fails the command).
    await battery.close()
    sim.unimplement(124, "OutWRte", "InWRte")
    adapter = SunSpecBattery("bat-1", endpoint(sim))
    await adapter.connect()
    try:
        assert (await adapter.read()).soc_pct == 60.0
        writes = sim.write_count
        with pytest.raises(DeviceRejected, match="OutWRte"):
            await adapter.apply(cmd(-1.0))
        assert sim.write_count == writes
        await adapter.apply(cmd(None))  # releasing it is not an error, and writes nothing
        assert sim.write_count == writes
    finally:
        await adapter.close()


async def test_a_legacy_map_without_storage_is_refused_by_name() -> None:
    async with SunSpecBatterySimulator(port=0, legacy=True) as sim:
        # Cut the chain after 103: no 123, no 124 (a PV-only inverter).
        end = sim.base_address + 2 + 68 + 52
        sim._image[end - sim.base_address : end - sim.base_address + 2] = [0xFFFF, 0]
        adapter = SunSpecBattery("bat-1", endpoint(sim))
        with pytest.raises(DeviceProtocolError, match="124"):
            await adapter.connect()


@pytest.mark.parametrize("model", [101, 113])
async def test_other_legacy_measurement_models(model: int) -> None:
    async with SunSpecBatterySimulator(
        port=0,
        legacy=True,
        legacy_model=model,
        max_charge_kw=3.0,
        max_discharge_kw=3.0,
        step_s=0.02,
    ) as sim:
        adapter = SunSpecBattery("bat-1", endpoint(sim))
        await adapter.connect()
        try:
            assert adapter.layout is not None
            assert model in adapter.layout.model_ids
            # 1.5 kW is 50.0 % of WChaMax 3 kW (2.5 kW would be 83.3 %: 2499 W at 0.1 %).
            await adapter.apply(cmd(-1.5))
            await eventually(lambda: sim.power_kw == -1.5)
            assert (await adapter.read()).power_kw == -1.5  # float32 W or W × 10^W_SF
        finally:
            await adapter.close()
