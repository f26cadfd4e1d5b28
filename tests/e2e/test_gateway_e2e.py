"""End to end: Grid DERMS over a real broker → gateway → real Modbus TCP SunSpec batteries."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import gateway.core
from gateway.audit import read_lines
from simulators.broker import BrokerEndpoint
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually, iso
from unified.model import AckState, Reason

pytestmark = pytest.mark.broker


def batteries(
    n: int, *, soc: float = 60.0, kw: float = 5.0, time_scale: float = 1.0
) -> list[SunSpecBatterySimulator]:
    return [
        SunSpecBatterySimulator(
            port=0,
            capacity_kwh=10.0,
            max_charge_kw=kw,
            max_discharge_kw=kw,
            initial_soc_pct=soc,
            time_scale=time_scale,
        )
        for _ in range(n)
    ]


@pytest.fixture
async def fleet(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with Fleet(broker_endpoint, tmp_path / "gw.sqlite", batteries(4, time_scale=60)) as f:
        yield f


def dispatch(
    cid: str, group: str, kw: float, start_in: float, duration: float, **extra: object
) -> dict[str, object]:
    return {
        "type": "dispatch",
        "command_id": cid,
        "target": {"group_id": group},
        "kw": kw,
        "start": iso(start_in),
        "duration_s": duration,
        **extra,
    }


async def test_dispatch_moves_registers_and_soc_then_ends_on_time(fleet: Fleet) -> None:
    f1 = [s for i, s in enumerate(fleet.sims) if fleet.feeder_of(i) == "f1"]
    f2 = [s for i, s in enumerate(fleet.sims) if fleet.feeder_of(i) == "f2"]
    soc_before = [s.soc_pct for s in f1]
    await fleet.grid.send(dispatch("d1", "feeder:f1", -6.0, start_in=0.5, duration=3.0))

    active = await fleet.grid.wait_for_state("d1", AckState.ACTIVE, 5)
    assert {a.device_id for a in active.allocations} == {"bat-1", "bat-3"}
    assert sum(a.commanded_kw for a in active.allocations) == pytest.approx(-6.0)
    # The batteries' own control registers now hold the setpoint: 3 kW each, injecting.
    await eventually(
        lambda: all(s.wset_enabled and s.wset_w == pytest.approx(3000) for s in f1),
        3,
        "WSet written",
    )
    await eventually(
        lambda: fleet.feeder_power_kw("f1") == pytest.approx(-6.0, abs=0.05),
        3,
        "feeder f1 discharging 6 kW",
    )
    assert all(not s.wset_enabled for s in f2), "f2 must not be touched"

    completed = await fleet.grid.wait_for_state("d1", AckState.COMPLETED, 6)
    assert fleet.grid.states("d1") == [
        AckState.RECEIVED,
        AckState.ACCEPTED,
        AckState.ACTIVE,
        AckState.COMPLETED,
    ]
    assert completed.allocations, "the completed ack reports what was delivered"
    # Control released and power back to idle once the window ends.
    await eventually(
        lambda: all(not s.wset_enabled and abs(s.power_kw) < 0.01 for s in f1),
        3,
        "batteries released",
    )
    assert all(
        after < before for after, before in zip([s.soc_pct for s in f1], soc_before, strict=True)
    )


async def test_target_mode_holds_the_feeder_net_power_around_load_it_does_not_control(
    fleet: Fleet,
) -> None:
    """bat-1 is held charging at +2 kW by a higher-priority setpoint (load this dispatch does not
    control); a ``target`` of -1 kW on feeder f1 makes bat-3 discharge 3 kW so the feeder nets
    -1 kW. A ``delta`` of -1 kW would have left the feeder at +1 kW."""
    await fleet.grid.send(
        {
            "type": "setpoint",
            "command_id": "hold-b1",
            "device_id": "bat-1",
            "kw": 2.0,
            "start": iso(0.1),
            "duration_s": 20,
            "priority": 100,
        }
    )
    await fleet.grid.wait_for_state("hold-b1", AckState.ACTIVE, 5)
    await eventually(lambda: fleet.sims[0].power_kw == pytest.approx(2.0, abs=0.05), 3, "bat-1")
    await fleet.grid.send(
        dispatch("t1", "feeder:f1", -1.0, start_in=0.3, duration=20, mode="target")
    )
    ack = await fleet.grid.wait_for_state("t1", AckState.ACTIVE, 5)
    assert {a.device_id: a.commanded_kw for a in ack.allocations} == {
        "bat-3": pytest.approx(-3.0, abs=0.1)
    }
    await eventually(
        lambda: fleet.feeder_power_kw("f1") == pytest.approx(-1.0, abs=0.1),
        3,
        "feeder f1 held at its -1 kW target",
    )
    # The other load moves (the setpoint ends): the target follows it, bat-3 comes back to -1.
    await fleet.grid.send({"type": "cancel", "command_id": "c-hold", "cancels": "hold-b1"})
    await eventually(
        lambda: (
            fleet.feeder_power_kw("f1") == pytest.approx(-1.0, abs=0.1)
            and abs(fleet.sims[0].power_kw) < 0.6
        ),
        5,
        "target re-planned after the other load changed",
    )


async def test_envelope_clips_a_dispatch(fleet: Fleet) -> None:
    await fleet.grid.send(
        {
            "type": "envelope",
            "command_id": "doe",
            "target": {"group_id": "feeder:f2"},
            "intervals": [{"start": iso(-1), "end": iso(20), "export_limit_kw": 2.5}],
        }
    )
    await fleet.grid.send(
        dispatch("d2", "feeder:f2", -8.0, start_in=0.3, duration=10, priority=1000)
    )
    ack = await fleet.grid.wait_for_state("d2", AckState.ACTIVE, 5)
    assert sum(a.commanded_kw for a in ack.allocations) == pytest.approx(-2.5)
    assert all("doe" in a.limited_by for a in ack.allocations)
    assert ack.shortfall_kw == pytest.approx(5.5)
    await eventually(
        lambda: fleet.feeder_power_kw("f2") == pytest.approx(-2.5, abs=0.05),
        3,
        "f2 held at the envelope",
    )
    # The limit holds the whole time, not just at the start.
    for _ in range(10):
        assert fleet.feeder_power_kw("f2") >= -2.5 - 0.05
        await asyncio.sleep(0.1)
    # The envelope's own ack says how it holds at the meter.
    await fleet.grid.wait_for(
        lambda o: any(
            a.compliance is not None and a.compliance.seconds_in_force >= 1.0 for a in o.acks["doe"]
        ),
        8,
    )
    held = [a.compliance for a in fleet.grid.observed.acks["doe"] if a.compliance is not None]
    assert held[-1].export_limit_kw == 2.5
    assert held[-1].measured_kw == pytest.approx(-2.5, abs=0.1)
    assert held[-1].seconds_outside == 0
    assert held[-1].worst_excursion_kw < 0.05
    assert not held[-1].outside
    await fleet.grid.send({"type": "cancel", "command_id": "c-d2", "cancels": "d2"})
    await fleet.grid.wait_for_state("d2", AckState.CANCELLED, 5)
    await eventually(lambda: abs(fleet.feeder_power_kw("f2")) < 0.01, 3, "f2 released on cancel")
    # Once the envelope ends, its compliance report: interval by interval, who acted.
    await fleet.grid.send({"type": "cancel", "command_id": "c-doe", "cancels": "doe"})
    await fleet.grid.wait_for(lambda o: "doe" in o.envelopes, 5)
    report = fleet.grid.observed.envelopes["doe"]
    assert report.intervals_total >= 1
    assert report.intervals_held == report.intervals_total
    assert report.seconds_outside == 0
    assert report.seconds_in_force >= 1.0
    assert set(report.devices_acted) == {"bat-2", "bat-4"}  # the f2 batteries it clipped
    assert all(i.export_limit_kw == 2.5 for i in report.intervals)
    assert min(i.min_measured_kw for i in report.intervals) >= -2.5 - 0.1


async def test_restart_mid_command_resumes_it(fleet: Fleet) -> None:
    f1 = [s for i, s in enumerate(fleet.sims) if fleet.feeder_of(i) == "f1"]
    await fleet.grid.send(dispatch("long", "feeder:f1", -4.0, start_in=0.2, duration=6.0))
    await fleet.grid.wait_for_state("long", AckState.ACTIVE, 5)
    await eventually(lambda: fleet.feeder_power_kw("f1") == pytest.approx(-4.0, abs=0.05), 3)

    await fleet.stop_gateway()
    # Simulate a battery that lost its setpoint while the gateway was away.
    writes_before = [s.write_count for s in f1]
    gateway = await fleet.start_gateway()

    assert [e.command.command_id for e in gateway.book.open_entries()] == ["long"]
    await eventually(
        lambda: all(s.write_count > w for s, w in zip(f1, writes_before, strict=True)),
        3,
        "setpoints re-applied after restart",
    )
    await eventually(lambda: fleet.feeder_power_kw("f1") == pytest.approx(-4.0, abs=0.05), 3)
    await fleet.grid.wait_for_state("long", AckState.COMPLETED, 8)
    await eventually(lambda: all(not s.wset_enabled for s in f1), 3, "released at the end")


async def test_redelivered_command_is_applied_once(fleet: Fleet) -> None:
    command = dispatch("dup", "feeder:f1", -2.0, start_in=30, duration=60)
    await fleet.grid.send(command)
    await fleet.grid.wait_for_state("dup", AckState.ACCEPTED, 5)
    await fleet.grid.send(command)  # e.g. a QoS 1 redelivery after a reconnect
    await fleet.grid.wait_for(lambda o: len(o.acks["dup"]) >= 3, 5)
    assert fleet.grid.states("dup") == [AckState.RECEIVED, AckState.ACCEPTED, AckState.ACCEPTED]
    assert fleet.gateway is not None
    assert await fleet.gateway.store.count() == 1
    assert len(fleet.gateway.book.open_entries()) == 1
    # Same id, different content: refused on errors, original untouched.
    await fleet.grid.send(command | {"kw": -3.0})
    await fleet.grid.wait_for(lambda o: any(e.command_id == "dup" for e in o.errors), 5)
    error = next(e for e in fleet.grid.observed.errors if e.command_id == "dup")
    assert error.reason is Reason.DUPLICATE_ID_CONFLICT
    entry = fleet.gateway.book.open_entries()[0]
    assert entry.command.kw == -2.0  # type: ignore[union-attr]


async def test_bad_input_is_rejected_and_nothing_reaches_a_device(fleet: Fleet) -> None:
    await eventually(lambda: all(s.write_count >= 1 for s in fleet.sims), 3, "startup release")
    writes = [s.write_count for s in fleet.sims]
    grid = fleet.grid
    await grid.send(b"{this is not json")
    await grid.send(b'{"type": "dispatch", "kw": -1}')
    cases = {
        "schema": {
            "type": "dispatch",
            "command_id": "schema",
            "target": {"group_id": "feeder:f1"},
            "kw": "a lot",
            "start": iso(1),
            "duration_s": 10,
        },
        "unknown-group": dispatch("unknown-group", "feeder:nope", -1.0, 1, 10),
        "unknown-device": {
            "type": "setpoint",
            "command_id": "unknown-device",
            "device_id": "bat-99",
            "kw": -1,
            "start": iso(1),
            "duration_s": 10,
        },
        "over": dispatch("over", "feeder:f1", -1.0, start_in=-120, duration=60),
        "backwards": {
            "type": "envelope",
            "command_id": "backwards",
            "target": {"group_id": "feeder:f1"},
            "intervals": [{"start": iso(60), "end": iso(30), "export_limit_kw": 1}],
        },
        "too-big": {
            "type": "setpoint",
            "command_id": "too-big",
            "device_id": "bat-1",
            "kw": -50,
            "start": iso(1),
            "duration_s": 10,
        },
        "fleet-too-big": dispatch("fleet-too-big", "feeder:f1", -10.5, 1, 10),
    }
    expected = {
        "schema": Reason.SCHEMA_VIOLATION,
        "unknown-group": Reason.UNKNOWN_GROUP,
        "unknown-device": Reason.UNKNOWN_DEVICE,
        "over": Reason.ALREADY_ENDED,
        "backwards": Reason.WINDOW_INVALID,
        "too-big": Reason.BEYOND_RATINGS,
        "fleet-too-big": Reason.BEYOND_RATINGS,
    }
    for command in cases.values():
        await grid.send(command)
    for cid, reason in expected.items():
        ack = await grid.wait_for_state(cid, AckState.REJECTED, 5)
        assert ack.reason is reason, (cid, ack)
        assert ack.detail
    await grid.wait_for(lambda o: len(o.errors) >= 2, 5)
    # QoS 1 is at-least-once: a broker may deliver the same bad payload twice.
    reasons = {e.reason.value for e in grid.observed.errors}
    assert reasons == {"malformed_json", "schema_violation"}
    assert "command_id" in json.dumps([e.detail for e in grid.observed.errors])
    # Give the control loop several cycles: still no write, nothing enabled, nothing moving.
    await asyncio.sleep(1.0)
    assert [s.write_count for s in fleet.sims] == writes
    assert all(not s.wset_enabled and s.power_kw == 0 for s in fleet.sims)


async def test_mqtt5_response_topic_and_correlation(
    fleet: Fleet, broker_endpoint: BrokerEndpoint
) -> None:
    if broker_endpoint.protocol != "5":
        pytest.skip("response topics need MQTT 5 (mosquitto)")
    await fleet.grid.send(
        dispatch("rr", "feeder:f1", -1.0, 30, 10), reply=True, correlation=b"corr-42"
    )
    await fleet.grid.wait_for(lambda o: len(o.replies) >= 2, 5)
    states = [ack.state for _, _, ack in fleet.grid.observed.replies]
    assert states[:2] == [AckState.RECEIVED, AckState.ACCEPTED]
    assert all(corr == b"corr-42" for _, corr, _ in fleet.grid.observed.replies)


async def test_a_response_topic_into_the_gateways_own_topics_is_refused(
    fleet: Fleet, broker_endpoint: BrokerEndpoint
) -> None:
    """Pointed at the gateway's own commands topic, the acks would come back in as commands."""
    if broker_endpoint.protocol != "5":
        pytest.skip("response topics need MQTT 5 (mosquitto)")
    assert fleet.gateway is not None
    fleet.grid.reply_topic = fleet.grid.topics.commands
    await fleet.grid.send(dispatch("loop", "feeder:f1", -1.0, 30, 10), reply=True)
    await fleet.grid.wait_for_state("loop", AckState.ACCEPTED, 5)
    await fleet.grid.wait_for(
        lambda o: any(e.reason is Reason.RESPONSE_TOPIC_REFUSED for e in o.errors), 5
    )
    await asyncio.sleep(0.5)
    # Nothing was fed back in: no error about an ack arriving as a command, one command stored.
    assert not [
        e for e in fleet.grid.observed.errors if e.reason is not Reason.RESPONSE_TOPIC_REFUSED
    ]
    assert await fleet.gateway.store.count() == 1


async def test_offline_device_is_logged_once_and_its_share_reallocated(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.supervisor")
    f1 = [s for i, s in enumerate(fleet.sims) if fleet.feeder_of(i) == "f1"]
    await fleet.grid.send(dispatch("realloc", "feeder:f1", -6.0, 0.2, 20))
    await fleet.grid.wait_for_state("realloc", AckState.ACTIVE, 5)
    await eventually(lambda: fleet.feeder_power_kw("f1") == pytest.approx(-6.0, abs=0.05), 3)

    await f1[0].set_offline(True)
    # bat-3 takes the whole 6 kW... up to its 5 kW rating; the rest is reported as shortfall.
    await eventually(
        lambda: f1[1].power_kw == pytest.approx(-5.0, abs=0.05), 8, "surviving battery takes over"
    )
    await fleet.grid.wait_for(
        lambda o: any(
            a.state is AckState.ACTIVE and {x.device_id for x in a.allocations} == {"bat-3"}
            for a in o.acks["realloc"]
        ),
        5,
    )
    await asyncio.sleep(2.0)  # several failed reconnects happen in here
    down = [r for r in caplog.records if "bat-1 unavailable" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in down]

    await f1[0].set_offline(False)
    await eventually(
        lambda: f1[0].power_kw == pytest.approx(-3.0, abs=0.05),
        10,
        "recovered battery back in the event",
    )

    def recovered() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "bat-1 recovered" in r.getMessage()]

    await eventually(lambda: len(recovered()) >= 1, 5, "recovery logged")
    await asyncio.sleep(1.0)
    assert len(recovered()) == 1


async def test_device_refusing_control_fails_a_setpoint_and_is_dispatched_around(
    fleet: Fleet,
) -> None:
    stubborn = fleet.sims[0]  # bat-1, feeder f1
    other = fleet.sims[2]  # bat-3, feeder f1
    stubborn.reject_writes = 4  # slave device failure on every write; reads still answer
    await fleet.grid.send(
        {
            "type": "setpoint",
            "command_id": "sp",
            "device_id": "bat-1",
            "kw": -2.0,
            "start": iso(0.1),
            "duration_s": 20,
        }
    )
    failed = await fleet.grid.wait_for_state("sp", AckState.FAILED, 5)
    assert failed.reason is Reason.DEVICE_REJECTED
    assert "4" in (failed.detail or "")

    await fleet.grid.send(dispatch("around", "feeder:f1", -4.0, start_in=0.1, duration=20))
    await fleet.grid.wait_for(
        lambda o: any(
            a.state is AckState.ACTIVE and [x.device_id for x in a.allocations] == ["bat-3"]
            for a in o.acks["around"]
        ),
        5,
    )
    await eventually(lambda: other.power_kw == pytest.approx(-4.0, abs=0.05), 3)
    assert stubborn.power_kw == 0
    # The refusing device is not hammered: a handful of attempts, not one per control cycle.
    attempts = stubborn.rejected_write_count
    await asyncio.sleep(1.0)
    assert stubborn.rejected_write_count - attempts <= 1


async def test_device_enrolled_at_run_time_joins_an_active_dispatch(fleet: Fleet) -> None:
    from adapters.sunspec.battery import SunSpecBattery, SunSpecEndpoint
    from unified.model import BatteryRatings, DerClass, Device, TopologyLocation

    assert fleet.gateway is not None
    await fleet.grid.send(dispatch("grow", "feeder:f1", -9.0, 0.1, 20))
    ack = await fleet.grid.wait_for_state("grow", AckState.ACTIVE, 5)
    assert ack.shortfall_kw == pytest.approx(0.0)
    async with SunSpecBatterySimulator(
        port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=60
    ) as newcomer:
        device = Device(
            device_id="bat-new",
            der_class=DerClass.BATTERY,
            adapter="sunspec_battery",
            location=TopologyLocation(substation="s1", feeder="f1"),
            ratings=BatteryRatings(max_charge_kw=5, max_discharge_kw=5, capacity_kwh=10),
        )
        fleet.gateway.add_device(
            device, SunSpecBattery("bat-new", SunSpecEndpoint(port=newcomer.port))
        )
        # Three batteries now share the 9 kW: 3 kW each.
        await eventually(
            lambda: newcomer.power_kw == pytest.approx(-3.0, abs=0.05),
            5,
            "the new battery takes its share",
        )
        await eventually(lambda: fleet.feeder_power_kw("f1") == pytest.approx(-6.0, abs=0.05), 3)
        with pytest.raises(ValueError, match="already registered"):
            fleet.gateway.add_device(device, SunSpecBattery("bat-new", SunSpecEndpoint(port=1)))


async def test_group_telemetry_estimates_a_silent_device_with_an_interval(fleet: Fleet) -> None:
    # One setpoint per battery, so the truth stays put when one of them falls silent (a group
    # dispatch would re-allocate its share to the others).
    for i in range(4):
        await fleet.grid.send(
            {
                "type": "setpoint",
                "command_id": f"sp-{i}",
                "device_id": fleet.device_id(i),
                "kw": -2.0,
                "start": iso(0.1),
                "duration_s": 30,
            }
        )
    await eventually(lambda: sum(s.power_kw for s in fleet.sims) == pytest.approx(-8.0, abs=0.1), 5)
    await eventually(
        lambda: (
            (g := fleet.grid.observed.groups.get("substation:s1")) is not None
            and g.devices_reporting == 4
            and g.power_kw == pytest.approx(-8.0, abs=0.1)
        ),
        5,
    )
    silent = fleet.sims[0]
    await silent.set_offline(True)
    # The silent battery keeps discharging on its own setpoint (its revert timer has not run
    # out), so the truth stays at -8 kW while only -6 kW is reported.
    await eventually(
        lambda: (
            (g := fleet.grid.observed.groups.get("substation:s1")) is not None
            and g.devices_estimated >= 1
        ),
        8,
        "the silent device is estimated",
    )
    g = fleet.grid.observed.groups["substation:s1"]
    truth = sum(s.power_kw for s in fleet.sims)
    assert truth == pytest.approx(-8.0, abs=0.05)
    assert g.devices_reporting == 3
    assert g.measured_kw == pytest.approx(-6.0, abs=0.1)
    assert g.power_lower_kw is not None
    assert g.power_upper_kw is not None
    assert g.power_lower_kw <= truth <= g.power_upper_kw, g
    assert g.power_kw == pytest.approx(truth, abs=0.5)  # a plain sum would be 2 kW short
    assert g.quality.value == "estimated"


async def test_flexibility_forecast_is_published_and_served_on_request(fleet: Fleet) -> None:
    # Published by itself (retained) for every substation and feeder...
    await fleet.grid.wait_for(lambda o: "feeder:f1" in o.flex and "substation:s1" in o.flex, 8)
    periodic = fleet.grid.observed.flex["substation:s1"]
    assert periodic["devices_total"] == 4
    # ... and on request, for the window asked.
    await fleet.grid.request_flex(
        {"request_id": "rq-1", "group_id": "feeder:f1", "horizon_s": 7200, "interval_s": 900}
    )
    await fleet.grid.wait_for(lambda o: o.flex.get("feeder:f1", {}).get("request_id") == "rq-1", 5)
    forecast = fleet.grid.observed.flex["feeder:f1"]
    assert len(forecast["intervals"]) == 8
    first = forecast["intervals"][0]
    # Two 5 kW batteries at 60 % SoC with a 20 % reserve: flex down is there, bounded by
    # their ratings, and the bands are ordered. (A gateway that has just started has not yet
    # learnt how reliably each device turns up, so the low band may still be 0.)
    down = first["flex_down_kw"]
    assert 0 <= down["p10"] <= down["p50"] <= down["p90"] <= 10.0 + 1e-6
    assert down["p90"] > 1.0
    # Bad requests get a specific error, not silence.
    await fleet.grid.request_flex({"group_id": "feeder:nowhere"})
    await fleet.grid.wait_for(lambda o: any(e.reason.value == "unknown_group" for e in o.errors), 5)


async def test_a_failing_telemetry_cycle_does_not_end_the_gateway(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = fleet.gateway
    assert gateway is not None
    real = gateway.group_telemetry
    failures: list[int] = []

    def broken_once(now: Any) -> Any:
        if not failures:
            failures.append(1)
            raise RuntimeError("a bug in one telemetry cycle")
        return real(now)

    monkeypatch.setattr(gateway, "group_telemetry", broken_once)
    await eventually(lambda: bool(failures), 5, "the broken cycle ran")
    fleet.grid.observed.groups.clear()
    await eventually(lambda: "feeder:f1" in fleet.grid.observed.groups, 5, "telemetry again")
    assert fleet._task is not None
    assert not fleet._task.done()


async def test_a_wall_clock_step_ends_a_dispatch_by_the_new_clock_and_says_so(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    f1 = [s for i, s in enumerate(fleet.sims) if fleet.feeder_of(i) == "f1"]
    await fleet.grid.send(dispatch("d1", "feeder:f1", -6.0, start_in=0.2, duration=1800.0))
    await fleet.grid.wait_for_state("d1", AckState.ACTIVE, 5)
    await eventually(lambda: all(s.wset_enabled for s in f1), 3, "WSet written")

    # NTP steps the gateway's clock an hour forward: by the new clock the dispatch is over.
    real = gateway.core.utcnow
    monkeypatch.setattr(gateway.core, "utcnow", lambda: real() + timedelta(hours=1))
    completed = await fleet.grid.wait_for_state("d1", AckState.COMPLETED, 5)
    assert completed.detail is not None
    assert "wall clock stepped forward by 3600 s" in completed.detail
    await eventually(lambda: not any(s.wset_enabled for s in f1), 5, "batteries released")
    # ... and the audit trail has the step.
    assert fleet.gateway is not None
    assert fleet.gateway.audit_log is not None
    steps = [
        line.record
        for line in read_lines(fleet.gateway.audit_log.directory)
        if line.record is not None and line.record["kind"] == "clock.stepped"
    ]
    assert len(steps) == 1
    assert steps[0]["details"]["step_s"] == pytest.approx(3600, abs=5)
