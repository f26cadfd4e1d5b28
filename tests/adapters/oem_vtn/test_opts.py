"""EiOpt schedules on the gateway's VTN, sent by the OEM cloud simulator (an openleadr VEN).

An opt-out schedule takes resources out of dispatch for its windows: a resource carrying a
setpoint is refused once (so the planner re-allocates), gets no new event while the window
lasts, and is eligible again once the window ends or the schedule is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.oem_vtn.vtn import VtnStore
from gateway.devices import DeviceRejected
from protocols.openadr import encode
from protocols.openadr.vtn_events import IssuedEvent
from simulators.oem_cloud import SimBattery, SimThermostat
from tests.adapters.oem_vtn.test_vtn import (
    LOC,
    OEM,
    Registrar,
    cmd,
    enrolled,
    fleet,
    free_port,
    power_of,
    running_oem,
    running_vtn,
    vtn_config,
    wait_for,
)
from unified.model import utcnow

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")

HOUR = timedelta(hours=1)


@pytest.fixture
def registrar() -> Registrar:
    logging.getLogger("openleadr").setLevel(logging.WARNING)
    return Registrar()


def refusals_for(registrar: Registrar, name: str) -> list[str]:
    return [str(e) for c, e in registrar.refusals if c.device_id == f"{OEM}.{name}"]


async def test_opt_out_schedule_refuses_the_active_setpoint_once_and_keeps_the_resource_out(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        b1 = registrar.resource("b1")
        await b1.apply(cmd("b1", -2.0, "dispatch-1"))
        await wait_for(lambda: oem.devices["b1"].power_kw == -2.0, 10, "battery discharging")
        # The OEM answers the event (createdEvent optIn) after it has applied it.
        await wait_for(
            lambda: getattr(vtn.current_event(f"{OEM}.b1"), "opt", None) == "optIn", 10, "opted in"
        )
        event = vtn.current_event(f"{OEM}.b1")
        assert event is not None

        answer = await oem.opt_out("b1", utcnow() - timedelta(seconds=1), HOUR, opt_id="away-1")
        assert (answer.code, answer.opt_id) == (200, "away-1")
        # The refusal carries the setpoint that was refused, with its command, and says why.
        ((refused, error),) = registrar.refusals
        assert refused == cmd("b1", -2.0, "dispatch-1")
        assert isinstance(error, DeviceRejected)
        assert "opted out" in str(error)
        assert "away-1" in str(error)

        # The same opt delivered again, and a re-applied setpoint: still one refusal.
        assert (await oem.opt_out("b1", utcnow(), HOUR, opt_id="away-1")).code == 200
        with pytest.raises(DeviceRejected, match="opted out"):
            await b1.apply(cmd("b1", -1.0, "dispatch-2"))
        assert len(registrar.refusals) == 1
        assert vtn.current_event(f"{OEM}.b1") == event  # no new event, no modification

        # Out of dispatch, still in telemetry: power reported, no state of charge to plan on.
        state = await b1.read()
        assert state.soc_pct is None
        assert state.power_kw is not None
        # Other resources of the same VEN are not affected.
        t1 = await registrar.resource("t1").read()
        assert t1.soc_pct is not None
        await registrar.resource("t1").apply(cmd("t1", -1.0, "dispatch-3"))
        assert vtn.current_event(f"{OEM}.t1") is not None

        # The planner releases the refused resource: the release cancels the event.
        await b1.apply(cmd("b1", None, "dispatch-1"))
        cancelled = vtn.current_event(f"{OEM}.b1")
        assert cancelled is not None
        assert cancelled.cancelled
        await wait_for(lambda: oem.devices["b1"].power_kw == 0.0, 10, "battery idle")

        # Cancelled: eligible again, and a new setpoint becomes a new event.
        assert (await oem.cancel_opt("away-1")).code == 200
        assert vtn.opts == {}
        assert (await b1.read()).soc_pct is not None
        await b1.apply(cmd("b1", -1.0, "dispatch-4"))
        again = vtn.current_event(f"{OEM}.b1")
        assert again is not None
        assert again.event_id != event.event_id
        await wait_for(lambda: oem.devices["b1"].power_kw == -1.0, 10, "battery back")
        assert len(registrar.refusals) == 1


async def test_windows_start_and_end_on_time_and_an_opt_in_ends_an_opt_out_early(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        t1, b1 = f"{OEM}.t1", f"{OEM}.b1"
        await registrar.resource("t1").apply(cmd("t1", -1.0, "d-t1"))

        # A window that starts later: nothing until it starts, then one refusal.
        start = utcnow() + timedelta(seconds=2)
        assert (await oem.opt_out("t1", start, HOUR, opt_id="later")).code == 200
        if utcnow() < start:
            assert vtn.opted_out(t1) is None
            assert refusals_for(registrar, "t1") == []
        await wait_for(lambda: refusals_for(registrar, "t1"), 15, "refusal at window start")
        assert vtn.opted_out(t1) is not None

        # An opt-in sent afterwards over the same time wins; cancelling it restores the opt-out.
        assert (await oem.opt_in("t1", utcnow() - timedelta(seconds=5), HOUR, opt_id="back")).ok
        assert vtn.opted_out(t1) is None
        assert (await registrar.resource("t1").read()).soc_pct is not None
        assert (await oem.cancel_opt("back")).ok
        assert vtn.opted_out(t1) is not None

        # A window that ends: the resource is eligible again and the schedule is forgotten.
        ends = utcnow() + timedelta(seconds=4)
        answer = await oem.opt_out("b1", utcnow() - timedelta(seconds=10), timedelta(seconds=14))
        assert answer.ok
        if utcnow() < ends:
            assert vtn.opted_out(b1) is not None
        await wait_for(lambda: vtn.opted_out(b1) is None, 20, "window over")
        await wait_for(lambda: (OEM, answer.opt_id) not in vtn.opts, 20, "expired opt pruned")
        assert (await registrar.resource("b1").read()).soc_pct is not None
        await registrar.resource("b1").apply(cmd("b1", -1.0, "d-b1"))
        await wait_for(lambda: oem.devices["b1"].power_kw == -1.0, 10, "battery dispatched")
        assert refusals_for(registrar, "b1") == []
        assert len(refusals_for(registrar, "t1")) == 1


async def test_opt_out_of_one_event_is_the_same_as_an_opt_out_response(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        await registrar.resource("t1").apply(cmd("t1", -1.5, "d-7"))
        await wait_for(lambda: vtn.current_event(f"{OEM}.t1").opt == "optIn", 10)  # type: ignore[union-attr]
        event = vtn.current_event(f"{OEM}.t1")
        assert event is not None
        for _ in range(2):  # a repeat changes nothing
            answer = await oem.opt_out_of_event(event.event_id, event.modification_number)
            assert answer.code == 200
        ((refused, error),) = registrar.refusals
        assert refused == cmd("t1", -1.5, "d-7")
        assert f"opted out of event {event.event_id}" in str(error)
        after = vtn.current_event(f"{OEM}.t1")
        assert after is not None
        assert (after.opt, after.opt_modification) == ("optOut", 0)
        # Only that event: the resource itself stays available for later commands.
        assert vtn.opted_out(f"{OEM}.t1") is None


async def test_bad_opt_messages_get_a_clear_error_and_change_nothing(
    tmp_path: Path, registrar: Registrar, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    caplog.set_level(logging.WARNING, logger="adapters.oem_vtn.vtn")
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        await registrar.resource("b1").apply(cmd("b1", -2.0))
        now = utcnow()
        cases: list[tuple[dict[str, Any], int, str]] = [
            (
                {"resource_id": "ghost;class=battery;kw=1", "windows": [(now, HOUR)]},
                452,
                "unknown resource",
            ),
            ({"device": "b1", "windows": [(now - HOUR, HOUR / 2)]}, 454, "already over"),
            ({"device": "b1", "windows": [(now, timedelta(0))]}, 454, "duration"),
            ({"device": "b1", "windows": [(now, timedelta(days=30))]}, 454, "longer than"),
            ({"device": "b1"}, 454, "either an event or vavailability"),
            ({"event": ("ev-nope", 0)}, 452, "unknown event"),
            (
                {"device": "b1", "windows": [(now, HOUR)], "market_context": "http://other"},
                452,
                "market context",
            ),
        ]
        for kwargs, code, words in cases:
            answer = await oem.send_opt("optOut", **kwargs)
            assert answer.code == code, (kwargs, answer)
            assert words in answer.description, (kwargs, answer)
        assert (await oem.cancel_opt("never-sent")).code == 452

        # From a VEN that is not registered: asked to register, nothing else.
        message = encode(
            "oadrCreateOpt",
            {
                "request_id": "r",
                "ven_id": "ghost",
                "opt_id": "o",
                "opt_type": "optOut",
                "opt_reason": "economic",
                "created_date_time": now,
                "vavailability": {"components": [{"dtstart": now, "duration": HOUR}]},
            },
        )
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.post(
                f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b/EiOpt",
                data=message,
                headers={"Content-Type": "application/xml"},
            ) as r,
        ):
            assert b"oadrRequestReregistration" in await r.read()

        assert vtn.opts == {}
        assert registrar.refusals == []
        assert all(vtn.opted_out(d) is None for d in registrar.devices)
        assert vtn.current_event(f"{OEM}.b1").opt != "optOut"  # type: ignore[union-attr]
        assert any("opt" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)


async def test_opt_schedules_survive_a_vtn_restart(tmp_path: Path, registrar: Registrar) -> None:
    port = free_port()
    config = vtn_config(tmp_path, port)
    devices: list[SimThermostat | SimBattery] = [SimBattery("b1", location=LOC)]
    async with running_oem(port, devices) as oem:
        async with running_vtn(config, registrar) as vtn:
            await enrolled(oem, registrar, vtn)
            assert (await oem.opt_out("b1", utcnow(), HOUR, opt_id="holiday")).ok
            before = dict(vtn.opts)
        again = Registrar()
        async with running_vtn(config, again) as vtn2:
            assert vtn2.opts == before
            assert vtn2.opted_out(f"{OEM}.b1") is not None
            b1 = again.resource("b1")
            await wait_for(lambda: power_of(vtn2, f"{OEM}.b1") is not None, 15, "usage report")
            await wait_for(lambda: vtn2.ven_ready(f"{OEM}.b1") is None, 15, "VEN polling")
            assert (await b1.read()).soc_pct is None
            with pytest.raises(DeviceRejected):
                await b1.apply(cmd("b1", -1.0))
            assert vtn2.current_event(f"{OEM}.b1") is None
            assert (await oem.cancel_opt("holiday")).ok
            await b1.apply(cmd("b1", -1.0))
            await wait_for(lambda: oem.devices["b1"].power_kw == -1.0, 10, "dispatched")
    # The cancellation is durable too.
    async with VtnStore(config.store_path) as store:
        assert await store.load_opts() == []


async def test_opt_for_another_vens_target_is_not_authorized(
    tmp_path: Path, registrar: Registrar
) -> None:
    port = free_port()
    async with (
        running_vtn(vtn_config(tmp_path, port), registrar) as vtn,
        running_oem(port, fleet()) as oem,
    ):
        await enrolled(oem, registrar, vtn)
        message = oem.client._create_message(
            "oadrCreateOpt",
            request_id="r",
            ven_id=oem.client.ven_id,
            opt_id="o-x",
            opt_type="optOut",
            opt_reason="economic",
            created_date_time=utcnow(),
            targets=[{"ven_id": "someone-else"}],
            vavailability={"components": [{"dtstart": utcnow(), "duration": HOUR}]},
        )
        answer_type, answer = await oem.client._perform_request("EiOpt", message)
        assert answer_type == "oadrCreatedOpt"
        assert answer["response"]["response_code"] == 463
        assert vtn.opts == {}


# --------------------------------------------------------------------------- with the real gateway


@pytest.mark.broker
async def test_real_gateway_reallocates_around_an_opt_out_schedule(
    broker_endpoint: Any, tmp_path: Path
) -> None:
    """A feeder dispatch over a SunSpec battery and two OEM batteries; the OEM cloud then opts
    one battery out for the afternoon: its share moves to the others, the ack says so, it gets
    no event from a later dispatch until the opt-out is cancelled."""
    from simulators.sunspec_battery import SunSpecBatterySimulator
    from tests.e2e.fleet import Fleet, eventually, iso
    from unified.model import AckState

    sim = SunSpecBatterySimulator(
        port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=70
    )
    devices: list[SimThermostat | SimBattery] = [
        SimBattery("b1", location=LOC, rated_kw=5, capacity_kwh=10, soc_pct=70),
        SimBattery("b2", location=LOC, rated_kw=5, capacity_kwh=10, soc_pct=70),
    ]
    b1_id, b2_id = f"{OEM}.b1", f"{OEM}.b2"
    port = free_port()
    vtn_section = vtn_config(tmp_path, port, stale_after_s=3.0).model_dump(mode="json")
    async with Fleet(
        broker_endpoint,
        tmp_path / "gw.sqlite",
        [sim],
        feeders=("f1",),
        extra_config={"openadr_vtn": vtn_section},
    ) as fleet_:
        gateway = fleet_.gateway
        assert gateway is not None
        assert fleet_.app is not None
        vtn = fleet_.app.openadr_vtn
        assert vtn is not None
        refusals: list[str] = []
        report_refusal = gateway.report_refusal

        def counting(command: Any, error: Any) -> None:
            refusals.append(command.device_id)
            report_refusal(command, error)

        gateway.report_refusal = counting  # type: ignore[method-assign]
        async with running_oem(port, devices) as oem:
            await eventually(
                lambda: all(
                    gateway.supervisors.get(d) is not None and gateway.supervisors[d].available
                    for d in (b1_id, b2_id)
                ),
                15,
                "OEM resources online in the gateway",
            )

            def total_kw() -> float:
                return sim.power_kw + oem.devices["b1"].power_kw + oem.devices["b2"].power_kw

            await fleet_.grid.send(
                {
                    "type": "dispatch",
                    "command_id": "d-1",
                    "target": {"group_id": "feeder:f1"},
                    "kw": -7.0,
                    "start": iso(0.2),
                    "duration_s": 120,
                }
            )
            await eventually(
                lambda: (
                    total_kw() == pytest.approx(-7.0, abs=0.1) and oem.devices["b1"].power_kw < -0.5
                ),
                15,
                "7 kW shared by the three batteries",
            )

            answer = await oem.opt_out("b1", utcnow() - timedelta(seconds=1), HOUR, opt_id="pm")
            assert answer.ok
            await eventually(
                lambda: (
                    oem.devices["b1"].power_kw == 0.0 and total_kw() == pytest.approx(-7.0, abs=0.1)
                ),
                15,
                "b1 released, the other two carry 7 kW",
            )
            event = vtn.current_event(b1_id)
            assert event is not None
            assert event.cancelled
            assert refusals == [b1_id]

            def reallocated() -> bool:
                acks = fleet_.grid.observed.acks.get("d-1", [])
                last = acks[-1] if acks else None
                if last is None or last.state is not AckState.ACTIVE or not last.allocations:
                    return False
                shares = {a.device_id: a.commanded_kw for a in last.allocations}
                return b1_id not in shares and sum(shares.values()) == pytest.approx(-7, abs=0.1)

            await eventually(reallocated, 15, "an ack with the re-allocation")

            # A later dispatch while the window lasts: no event for b1.
            await fleet_.grid.send({"type": "cancel", "command_id": "c-1", "cancels": "d-1"})
            await eventually(lambda: abs(total_kw()) < 0.05, 15, "released")
            await fleet_.grid.send(
                {
                    "type": "dispatch",
                    "command_id": "d-2",
                    "target": {"group_id": "feeder:f1"},
                    "kw": -3.0,
                    "start": iso(0.2),
                    "duration_s": 120,
                }
            )
            await eventually(
                lambda: total_kw() == pytest.approx(-3.0, abs=0.1), 15, "3 kW without b1"
            )

            def issued(e: IssuedEvent | None) -> tuple[object, ...] | None:
                # What the VTN issued (not the VEN's acknowledgements of it, which may still
                # arrive: a late ack of the cancellation is not a new event).
                if e is None:
                    return None
                return (e.event_id, e.modification_number, e.cancelled, e.value, e.start)

            for _ in range(10):  # a few control cycles
                await asyncio.sleep(0.2)
                assert issued(vtn.current_event(b1_id)) == issued(event)
            assert oem.devices["b1"].power_kw == 0.0

            # Cancelled: b1 is eligible again and takes its share of the running dispatch.
            assert (await oem.cancel_opt("pm")).ok
            await eventually(
                lambda: (
                    oem.devices["b1"].power_kw < -0.2 and total_kw() == pytest.approx(-3.0, abs=0.1)
                ),
                20,
                "b1 back in the dispatch",
            )
            assert refusals == [b1_id]
            await fleet_.grid.send({"type": "cancel", "command_id": "c-2", "cancels": "d-2"})
            await eventually(lambda: abs(total_kw()) < 0.05, 15, "released")
