"""Issue 5 end to end: a Grid DERMS envelope caps an EV site reached over OCPP 1.6J and 2.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from simulators.broker import BrokerEndpoint, free_port
from simulators.ev_charger import EvChargerSim, EvChargerSimConfig, EvVisit
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually, iso

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("version", ["ocpp1.6", "ocpp2.0.1"])
async def test_envelope_caps_an_ev_site_and_lifts_after(
    broker_endpoint: BrokerEndpoint, tmp_path: Path, version: str
) -> None:
    port = free_port()
    ocpp = {
        "ocpp_central": {
            "port": port,
            "heartbeat_interval_s": 30,
            "stale_after_s": 5.0,
            "response_timeout_s": 3.0,
            "chargers": [
                {
                    "charge_point_id": "CP-1",
                    "location": {"substation": "s1", "feeder": "f1"},
                    "max_kw": 11.0,
                }
            ],
        }
    }
    battery = SunSpecBatterySimulator(
        port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=60
    )
    async with Fleet(
        broker_endpoint, tmp_path / "gw.sqlite", [battery], feeders=("f2",), extra_config=ocpp
    ) as fleet:
        assert fleet.app is not None
        assert fleet.app.ocpp_central is not None
        sim = EvChargerSim(
            EvChargerSimConfig(
                charge_point_id="CP-1",
                url=fleet.app.ocpp_central.url(),
                version=version,
                meter_interval_s=0.1,
                tick_s=0.02,
                visits=(EvVisit(energy_needed_kwh=40.0, ev_max_kw=11.0),),
            )
        )
        task = asyncio.create_task(sim.run(), name="ev-charger")
        try:
            await eventually(
                lambda: fleet.gateway.supervisors["CP-1"].available,
                10,
                "charger enrolled and reporting",
            )
            await eventually(lambda: sim.power_kw > 10.0, 10, "EV charging at full power")

            await fleet.grid.send(
                {
                    "type": "envelope",
                    "command_id": "ev-doe",
                    "target": {"group_id": "feeder:f1"},
                    "intervals": [{"start": iso(-1), "end": iso(4), "import_limit_kw": 4.0}],
                }
            )
            await eventually(lambda: sim.power_kw <= 4.0 + 0.1, 10, "site capped at 4 kW")
            assert sim.power_kw > 1.0  # capped, not stopped
            await eventually(lambda: sim.power_kw > 10.0, 15, "cap lifted after the envelope")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
