"""SunSpecSiteMeter against the site meter simulator (load + PV + battery) over Modbus/TCP."""

from __future__ import annotations

import pytest

from adapters.sunspec.battery import SunSpecBattery
from adapters.sunspec.connection import SunSpecEndpoint
from adapters.sunspec.site_meter import SunSpecSiteMeter
from gateway.devices import DeviceAdapter, UnsafeCommand
from simulators.site_meter import LoadStep, SiteLoadProfile, SiteMeterSimulator
from simulators.sunspec_battery import SunSpecBatterySimulator
from simulators.sunspec_pv import IrradianceProfile, SunSpecPvSimulator
from tests.adapters.sunspec.test_battery import eventually
from unified.model import DeviceCommand


@pytest.mark.parametrize("model", [203, 701])
async def test_meter_measures_load_pv_and_battery(model: int) -> None:
    async with (
        SunSpecPvSimulator(rated_kw=6.0, profile=IrradianceProfile(clear_sky_pu=0.5)) as pv,
        SunSpecBatterySimulator(port=0, max_charge_kw=3.0, max_discharge_kw=3.0) as bat,
        SiteMeterSimulator(
            devices=[pv, bat],
            load=SiteLoadProfile(base_kw=1.5, steps=(LoadStep(0.0, 3600.0, 0.5),)),
            model=model,
        ) as sim,
    ):
        meter = SunSpecSiteMeter("meter", SunSpecEndpoint(port=sim.port, timeout_s=0.5))
        assert isinstance(meter, DeviceAdapter)
        await meter.connect()
        try:
            assert meter.model_id == model
            # 2 kW of load, 3 kW of PV: the site exports 1 kW.
            await eventually(lambda: sim.net_kw == pytest.approx(-1.0))
            assert (await meter.read()).power_kw == pytest.approx(-1.0)
            # The battery charging 3 kW turns it into a 2 kW import, seen at the meter.
            battery = SunSpecBattery("b", SunSpecEndpoint(port=bat.port, timeout_s=0.5))
            await battery.connect()
            await battery.apply(DeviceCommand(device_id="b", power_kw=3.0))
            await eventually(lambda: sim.net_kw == pytest.approx(2.0))
            assert (await meter.read()).power_kw == pytest.approx(2.0)
            await battery.close()
            with pytest.raises(UnsafeCommand):
                await meter.apply(DeviceCommand(device_id="meter", power_kw=0.0))
        finally:
            await meter.close()


async def test_a_meter_exporting_positive_is_read_with_its_sign() -> None:
    async with SiteMeterSimulator(load=SiteLoadProfile(base_kw=2.0)) as sim:
        meter = SunSpecSiteMeter(
            "meter", SunSpecEndpoint(port=sim.port, timeout_s=0.5), import_positive=False
        )
        await meter.connect()
        try:
            await eventually(lambda: sim.net_kw == 2.0)
            assert (await meter.read()).power_kw == -2.0
        finally:
            await meter.close()
