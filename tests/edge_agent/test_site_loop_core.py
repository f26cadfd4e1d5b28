"""The site loop bound to the gateway core: the envelope in the core's command book is held at
the meter, through the supervisors (one writer per device), with the core's own writes off."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import pytest

from adapters.sunspec.connection import SunSpecEndpoint
from adapters.sunspec.site_meter import SunSpecSiteMeter
from composition.app import GatewayApp
from composition.config import parse_config
from edge_agent.site_loop import (
    SiteLoop,
    SiteLoopConfig,
    SupervisedBattery,
    SupervisedPv,
    core_dispatch,
    core_envelope,
)
from gateway.audit import read_lines
from simulators.broker import BrokerEndpoint
from simulators.site_meter import SiteLoadProfile, SiteMeterSimulator
from simulators.sunspec_battery import SunSpecBatterySimulator
from simulators.sunspec_pv import CloudStep, IrradianceProfile, SunSpecPvSimulator
from tests.e2e.fleet import eventually
from unified.model import EnvelopeInterval, OperatingEnvelope, Target, utcnow

pytestmark = pytest.mark.broker

TIMING = {
    "control_period_s": 0.2,
    "poll_interval_s": 0.1,
    "telemetry_period_s": 0.5,
    "stale_after_s": 2.0,
    "io_timeout_s": 1.0,
    "backoff_max_s": 1.0,
}


async def test_core_envelope_held_at_the_meter(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    pv_sim = SunSpecPvSimulator(
        rated_kw=8.0,
        profile=IrradianceProfile(clear_sky_pu=0.8, clouds=(CloudStep(3.0, 4.5, 0.2),)),
        step_s=0.05,
    )
    bat_sim = SunSpecBatterySimulator(
        port=0, max_charge_kw=2.0, max_discharge_kw=2.0, capacity_kwh=50.0, step_s=0.05
    )
    meter_sim = SiteMeterSimulator(
        devices=[pv_sim, bat_sim], load=SiteLoadProfile(base_kw=1.0), step_s=0.05
    )
    async with contextlib.AsyncExitStack() as stack:
        for sim in (pv_sim, bat_sim, meter_sim):
            await stack.enter_async_context(sim)
        location = {"substation": "s1", "feeder": "f1"}
        app = GatewayApp(
            parse_config(
                {
                    "gateway_id": "site-edge",
                    "broker": {"port": broker_endpoint.port, "protocol": broker_endpoint.protocol},
                    "timing": TIMING,
                    "store": {"path": str(tmp_path / "edge.sqlite")},
                    "settlement": {"timezone": "UTC"},
                    "devices": [
                        {
                            "device_id": "pv-1",
                            "der_class": "pv",
                            "adapter": "sunspec_pv",
                            "location": location,
                            "ratings": {
                                "max_charge_kw": 8,
                                "max_discharge_kw": 8,
                                "capacity_kwh": 1,
                            },
                            "sunspec": {"port": pv_sim.port, "timeout_s": 1.0},
                        },
                        {
                            "device_id": "bat-1",
                            "der_class": "battery",
                            "adapter": "sunspec_battery",
                            "location": location,
                            "ratings": {
                                "max_charge_kw": 2,
                                "max_discharge_kw": 2,
                                "capacity_kwh": 50,
                            },
                            "sunspec": {"port": bat_sim.port, "timeout_s": 1.0},
                        },
                    ],
                }
            )
        )
        core = app.core
        core.delegate(frozenset({"pv-1", "bat-1"}))
        run = asyncio.create_task(app.run())
        stack.push_async_callback(_cancel, run)
        await eventually(
            lambda: all(core.supervisors[d].available for d in ("pv-1", "bat-1")), 10, "online"
        )
        now = utcnow()
        envelope = OperatingEnvelope(
            command_id="doe-1",
            target=Target(group_id="feeder:f1"),
            intervals=(
                EnvelopeInterval(start=now, end=now + timedelta(minutes=5), export_limit_kw=2.0),
            ),
        )
        await core.submit(envelope)
        meter = SunSpecSiteMeter("meter", SunSpecEndpoint(port=meter_sim.port, timeout_s=0.5))
        await meter.connect()
        stack.push_async_callback(meter.close)
        loop = SiteLoop(
            meter,
            [SupervisedPv(core, "pv-1")],
            SupervisedBattery(core, "bat-1"),
            core_envelope(core, "feeder:f1"),
            dispatch=core_dispatch(core, "bat-1"),
            config=SiteLoopConfig(period_s=0.25, battery_ramp_kw_per_s=4, pv_ramp_kw_per_s=4),
        )
        assert core_envelope(core, "feeder:f1")(utcnow()) == (None, 2.0)
        loop_task = asyncio.create_task(loop.run())
        stack.push_async_callback(_cancel, loop_task)
        await asyncio.sleep(1.5)
        worst, curtailed = 0.0, False
        for _ in range(100):  # 5 s, through the cloud
            worst = max(worst, -meter_sim.net_kw)
            curtailed |= pv_sim.limit_pct is not None
            await asyncio.sleep(0.05)
        print(f"worst export {worst:.3f} kW")
        assert curtailed
        assert bat_sim.power_kw > 1.0
        # Stated tolerance through the cloud edges, with device polls at 0.1 s: 0.4 kW.
        assert worst <= 2.0 + 0.4, f"export reached {worst:.2f} kW"
        # Every write the loop made is in the site's audit log, under its own name; none of the
        # core's own writes reached these two devices.
        audit = core.audit_log
        assert audit is not None

        def writers(device_id: str) -> set[str]:
            return {
                r.record["source"]
                for r in read_lines(audit.directory)
                if r.record is not None
                and r.record["kind"] == "device.write"
                and r.record.get("device_id") == device_id
            }

        await eventually(lambda: writers("pv-1") == {"edge-site-loop"}, 5, "PV writes audited")
        assert writers("bat-1") == {"edge-site-loop"}


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
