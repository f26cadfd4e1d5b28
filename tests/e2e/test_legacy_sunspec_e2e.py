"""End to end with legacy-model (1, 103, 120–124) batteries: dispatched like any other, and a
setpoint one cannot express fails its command rather than being acked ``active`` with nobody."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from simulators.broker import BrokerEndpoint
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually, iso
from unified.model import AckState, Reason

pytestmark = pytest.mark.broker


def _sim(*, legacy: bool) -> SunSpecBatterySimulator:
    return SunSpecBatterySimulator(
        port=0, legacy=legacy, capacity_kwh=10.0, max_charge_kw=5.0, max_discharge_kw=5.0
    )


@pytest.fixture
async def fleet(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Fleet]:
    sims = [_sim(legacy=True), _sim(legacy=False), _sim(legacy=True)]
    # bat-3 is a legacy unit whose 124 has no charge/discharge rate points.
    sims[2].unimplement(124, "InWRte", "OutWRte")
    async with Fleet(
        broker_endpoint, tmp_path / "gw.sqlite", sims, feeders=("f1", "f1", "f2")
    ) as f:
        yield f


async def test_legacy_battery_is_dispatched_and_an_impossible_setpoint_fails(
    fleet: Fleet,
) -> None:
    legacy, modern, mute = fleet.sims
    await fleet.grid.send(
        {
            "type": "dispatch",
            "command_id": "d1",
            "target": {"group_id": "feeder:f1"},
            "kw": -6.0,
            "start": iso(0.3),
            "duration_s": 30,
        }
    )
    active = await fleet.grid.wait_for_state("d1", AckState.ACTIVE, 5)
    assert {a.device_id for a in active.allocations} == {"bat-1", "bat-2"}
    await eventually(
        lambda: legacy.power_kw + modern.power_kw == pytest.approx(-6.0, abs=0.05),
        5,
        "feeder f1 discharging 6 kW, the legacy battery included",
    )
    assert legacy.power_kw < -0.5
    assert legacy.values(124)["StorCtl_Mod"] == 3

    await fleet.grid.send(
        {
            "type": "setpoint",
            "command_id": "sp",
            "device_id": "bat-3",
            "kw": -2.0,
            "start": iso(0.1),
            "duration_s": 20,
        }
    )
    failed = await fleet.grid.wait_for_state("sp", AckState.FAILED, 5)
    assert failed.reason is Reason.DEVICE_REJECTED
    assert "OutWRte" in (failed.detail or "")
    assert mute.power_kw == 0.0
    assert fleet.grid.states("sp")[-1] is AckState.FAILED
