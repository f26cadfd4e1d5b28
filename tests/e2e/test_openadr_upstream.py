"""A utility's OpenADR 2.0b event reaches real batteries through the whole gateway."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.audit import read_lines
from simulators.broker import BrokerEndpoint, free_port
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.adapters.openadr_ven.test_ven import VEN_NAME, Vtn
from tests.e2e.fleet import Fleet, eventually
from unified.model import AckState, utcnow

pytestmark = [
    pytest.mark.broker,
    pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning"),
]


@pytest.fixture
async def vtn() -> AsyncIterator[Vtn]:
    logging.getLogger("openleadr").setLevel(logging.WARNING)
    server = Vtn(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_openadr_event_dispatches_the_batteries_and_opts_in(
    broker_endpoint: BrokerEndpoint, vtn: Vtn, tmp_path: Path
) -> None:
    sims = [
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=70
        )
        for _ in range(2)
    ]
    ven = {
        "openadr_ven": {
            "vtn_url": vtn.url,
            "program": {
                "ven_name": VEN_NAME,
                "program": "utility-dr",
                "default_group": "feeder:f1",
            },
            "store_path": str(tmp_path / "ven.sqlite"),
            "poll_interval_s": 0.2,
            "io_timeout_s": 2.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
        }
    }
    async with Fleet(
        broker_endpoint, tmp_path / "gw.sqlite", sims, feeders=("f1",), extra_config=ven
    ) as fleet:
        assert fleet.app is not None
        assert fleet.app.openadr_ven is not None
        await eventually(
            lambda: fleet.app.openadr_ven.registration is not None,
            10,
            "VEN registered with the VTN",
        )
        # LOAD_DISPATCH delta of -4000 W for 6 s starting in 1 s, no ramp.
        vtn.add_event(
            "ev-1",
            values=(-4000.0,),
            start=utcnow() + timedelta(seconds=1),
            interval_s=6,
            ramp_up_s=0,
        )

        await eventually(
            lambda: fleet.feeder_power_kw("f1") == pytest.approx(-4.0, abs=0.05),
            10,
            "batteries discharging 4 kW for the utility event",
        )
        assert all(s.wset_enabled for s in sims)
        await eventually(lambda: vtn.opts.get("ev-1") == ["optIn"], 5, "opt-in at the VTN")
        # Grid DERMS sees the same lifecycle on MQTT as for its own commands.
        oadr = [c for c in fleet.grid.observed.acks if c.startswith("oadr-")]
        assert oadr, fleet.grid.observed.acks.keys()
        await fleet.grid.wait_for_state(oadr[0], AckState.COMPLETED, 10)
        await eventually(lambda: all(not s.wset_enabled for s in sims), 3, "released after")
        # The audit log names the VTN as the command's sender.
        registration = fleet.app.openadr_ven.registration
        assert registration is not None
        assert registration.vtn_id
        assert fleet.gateway is not None
        assert fleet.gateway.audit_log is not None
        folder = fleet.gateway.audit_log.directory
        received = [
            r.record
            for r in read_lines(folder)
            if r.record is not None
            and r.record["kind"] == "command.received"
            and r.record["command_id"] == oadr[0]
        ]
        assert [r["source"] for r in received] == [f"openadr-vtn:{registration.vtn_id}"]
