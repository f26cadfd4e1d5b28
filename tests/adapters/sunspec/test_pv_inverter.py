"""SunSpecPvInverter against the PV simulator (7xx and legacy maps) over real Modbus/TCP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.sunspec.connection import SunSpecEndpoint
from adapters.sunspec.pv_inverter import SunSpecPvInverter
from gateway.devices import DeviceAdapter, DeviceRejected, UnsafeCommand
from simulators.sunspec_pv import CloudStep, IrradianceProfile, SunSpecPvSimulator
from tests.adapters.sunspec.test_battery import eventually
from unified.model import DeviceCommand


@pytest.fixture(params=[False, True], ids=["7xx", "legacy"])
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[SunSpecPvSimulator]:
    async with SunSpecPvSimulator(
        rated_kw=8.0,
        profile=IrradianceProfile(clear_sky_pu=0.75),
        legacy=request.param,
        step_s=0.02,
    ) as simulator:
        yield simulator


@pytest.fixture
async def pv(sim: SunSpecPvSimulator) -> AsyncIterator[SunSpecPvInverter]:
    adapter = SunSpecPvInverter("pv-1", SunSpecEndpoint(port=sim.port, timeout_s=0.5))
    await adapter.connect()
    yield adapter
    await adapter.close()


def cmd(power_kw: float | None = None, export_limit_kw: float | None = None) -> DeviceCommand:
    return DeviceCommand(device_id="pv-1", power_kw=power_kw, export_limit_kw=export_limit_kw)


async def test_reads_generation_and_rating(sim: SunSpecPvSimulator, pv: SunSpecPvInverter) -> None:
    assert isinstance(pv, DeviceAdapter)
    assert pv.legacy == sim.legacy
    assert pv.rated_kw == 8.0
    await eventually(lambda: sim.power_kw == -6.0)
    state = await pv.read()
    assert state.power_kw == -6.0  # load convention: generating
    assert (state.max_charge_kw, state.max_discharge_kw, state.soc_pct) == (0.0, 8.0, None)


async def test_export_limit_curtails_via_wmaxlimpct_and_lifts(
    sim: SunSpecPvSimulator, pv: SunSpecPvInverter
) -> None:
    await pv.apply(cmd(export_limit_kw=2.0))
    assert sim.limit_pct == 25.0  # 2 kW of WMax 8 kW
    if sim.legacy:
        # 123: WMaxLimPct 250 (SF -1), WinTms, RvrtTms 0 (a safety limit does not lapse), RmpTms,
        # WMaxLim_Ena.
        assert sim.read_registers(sim.address_of(123, "WMaxLimPct"), 5) == [250, 0, 0, 0, 1]
    else:
        # 704: WMaxLimPctEna, WMaxLimPct, WMaxLimPctRvrt, WMaxLimPctEnaRvrt, WMaxLimPctRvrtTms.
        assert sim.read_registers(sim.address_of(704, "WMaxLimPctEna"), 6) == [
            1, 250, 1000, 0, 0, 0
        ]  # fmt: skip
    await eventually(lambda: sim.power_kw == -2.0)
    assert (await pv.read()).power_kw == -2.0
    writes = sim.write_count
    await pv.apply(cmd(export_limit_kw=2.0))
    assert sim.write_count == writes  # the same standing cap: nothing written
    await pv.apply(cmd())
    assert sim.limit_pct is None
    await eventually(lambda: sim.power_kw == -6.0)


async def test_generation_setpoint_is_a_reverting_cap(sim: SunSpecPvSimulator) -> None:
    pv = SunSpecPvInverter(
        "pv-1", SunSpecEndpoint(port=sim.port, timeout_s=0.5, setpoint_revert_s=1)
    )
    await pv.connect()
    try:
        await pv.apply(cmd(power_kw=-3.0))
        await eventually(lambda: sim.power_kw == -3.0)
        # The gateway goes quiet: the inverter lifts the cap by itself.
        await eventually(lambda: sim.power_kw == -6.0, within_s=3.0)
        assert sim.limit_pct is None
    finally:
        await pv.close()


@pytest.mark.parametrize("power_kw", [0.5, float("nan")])
async def test_import_is_refused_and_nothing_written(
    sim: SunSpecPvSimulator, pv: SunSpecPvInverter, power_kw: float
) -> None:
    with pytest.raises(UnsafeCommand):
        await pv.apply(DeviceCommand.model_construct(device_id="pv-1", power_kw=power_kw))
    assert sim.write_count == 0


async def test_disconnect_and_reconnect(sim: SunSpecPvSimulator, pv: SunSpecPvInverter) -> None:
    await pv.set_connected(False)
    assert not sim.connected
    await eventually(lambda: sim.power_kw == 0.0)
    await pv.set_connected(True)
    await eventually(lambda: sim.power_kw == -6.0)


async def test_cloud_steps_follow_the_profile() -> None:
    profile = IrradianceProfile(clouds=(CloudStep(0.3, 1.0, 0.2),))
    assert [profile.at(t) for t in (0.0, 0.3, 0.99, 1.0)] == [1.0, 0.2, 0.2, 1.0]
    day = IrradianceProfile(day_s=100.0)
    assert (day.at(0.0), day.at(50.0), day.at(150.0)) == (0.0, 1.0, 0.0)
    async with SunSpecPvSimulator(rated_kw=5.0, profile=profile, step_s=0.02) as sim:
        await eventually(lambda: sim.power_kw == -1.0, within_s=1.0)
        await eventually(lambda: sim.power_kw == -5.0, within_s=1.0)


async def test_a_map_without_controls_refuses_a_cap_but_reads() -> None:
    async with SunSpecPvSimulator(rated_kw=5.0, legacy=True) as sim:
        sim.unimplement(123, "WMaxLimPct_SF")
        pv = SunSpecPvInverter("pv-1", SunSpecEndpoint(port=sim.port, timeout_s=0.5))
        await pv.connect()
        try:
            assert (await pv.read()).max_discharge_kw == 5.0
            with pytest.raises(DeviceRejected, match="WMaxLimPct_SF"):
                await pv.apply(cmd(export_limit_kw=1.0))
            assert sim.write_count == 0
        finally:
            await pv.close()


@pytest.mark.parametrize("model", [101, 113])
async def test_other_legacy_measurement_models(model: int) -> None:
    profile = IrradianceProfile(clear_sky_pu=0.5)
    async with SunSpecPvSimulator(
        rated_kw=5.0, profile=profile, legacy=True, legacy_model=model, step_s=0.02
    ) as sim:
        pv = SunSpecPvInverter("pv-1", SunSpecEndpoint(port=sim.port, timeout_s=0.5))
        await pv.connect()
        try:
            assert pv.layout is not None
            assert model in pv.layout.model_ids
            await eventually(lambda: sim.power_kw == -2.5)
            assert (await pv.read()).power_kw == -2.5  # float32 W (113) or W × 10^W_SF (101)
            await pv.apply(cmd(export_limit_kw=1.0))
            await eventually(lambda: sim.power_kw == -1.0)
            assert (await pv.read()).power_kw == -1.0
        finally:
            await pv.close()


async def test_legacy_disconnect_reverts_with_conn_rvrttms() -> None:
    async with SunSpecPvSimulator(rated_kw=5.0, legacy=True, step_s=0.02) as sim:
        pv = SunSpecPvInverter("pv-1", SunSpecEndpoint(port=sim.port, timeout_s=0.5))
        await pv.connect()
        try:
            await pv.set_connected(False, revert_s=1)
            assert sim.read_registers(sim.address_of(123, "Conn_WinTms"), 3) == [0, 1, 0]
            await eventually(lambda: sim.power_kw == 0.0)
            await eventually(lambda: sim.power_kw == -5.0, within_s=3.0)  # back by itself
            assert sim.connected
        finally:
            await pv.close()


async def test_an_envelopes_disconnect_opens_the_connection_until_it_ends(
    sim: SunSpecPvSimulator, pv: SunSpecPvInverter
) -> None:
    await pv.apply(DeviceCommand(device_id="pv-1", power_kw=None, connect=False))
    assert not sim.connected
    await eventually(lambda: sim.power_kw == 0.0)
    writes = sim.write_count
    await pv.apply(DeviceCommand(device_id="pv-1", power_kw=None, connect=False))
    assert sim.write_count == writes  # held open: nothing written again
    await pv.apply(DeviceCommand(device_id="pv-1", power_kw=None, energize=False))
    assert not sim.connected
    await pv.apply(cmd())  # the envelope is over
    assert sim.connected
    await eventually(lambda: sim.power_kw == -6.0)
