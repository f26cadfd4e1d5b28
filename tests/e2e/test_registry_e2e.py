"""End to end over mosquitto: the registry API (``{root}/requests/registry``) enrols, retires
and regroups real Modbus TCP batteries while commands are in force."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from protocols.mqtt.devices import DeviceTopics
from simulators.broker import BrokerEndpoint, free_port
from simulators.grid_derms import GridDermsClient
from simulators.mqtt_devices import MqttDeviceSimulator, SimThermostat, ThermalHouse
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually
from tests.e2e.test_gateway_e2e import batteries, dispatch, iso
from tests.e2e.test_processes import start, stop
from unified.model import AckState, Reason, utcnow

pytestmark = pytest.mark.broker


def new_battery(device_id: str, port: int, feeder: str = "f1") -> dict[str, Any]:
    return {
        "device_id": device_id,
        "der_class": "battery",
        "adapter": "sunspec_battery",
        "location": {"substation": "s1", "feeder": feeder},
        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
        "programs": ["summer-vpp"],
        "rate_class": "tou-a",
        "reach": {"sunspec": {"port": port, "timeout_s": 1.0}},
    }


def power(sims: Sequence[SunSpecBatterySimulator]) -> float:
    return sum(s.power_kw for s in sims)


async def test_a_battery_enrolled_over_mqtt_is_polled_dispatched_and_kept_after_a_restart(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    # The newcomer outlives the gateway: a gateway stopped while it connects to a battery
    # that has just gone can take longer than the fleet allows to stop.
    async with (
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=60
        ) as newcomer,
        Fleet(broker_endpoint, tmp_path / "gw.sqlite", batteries(2)) as fleet,
    ):
        request = {
            "request_id": "enrol-1",
            "op": "enrol",
            "devices": [new_battery("bat-new", newcomer.port)],
        }
        ack = await fleet.grid.registry_request(request)
        assert (ack.state, ack.devices) == ("applied", ("bat-new",))
        await fleet.grid.wait_for(
            lambda o: any(c.enrolled == ("bat-new",) for c in o.registry_changes), 5
        )
        change = fleet.grid.observed.registry_changes[-1]
        assert (change.op, change.version, change.request_id) == ("enrol", ack.version, "enrol-1")
        # Polled: it reports in its feeder's telemetry.
        await fleet.grid.wait_for(
            lambda o: (
                (g := o.groups.get("feeder:f1")) is not None
                and g.devices_total == 2
                and g.devices_reporting == 2
            ),
            8,
        )
        # Dispatchable: it takes its share of a dispatch on its feeder.
        await fleet.grid.send(dispatch("shed", "feeder:f1", -6.0, 0.1, 30))
        await fleet.grid.wait_for_state("shed", AckState.ACTIVE, 5)
        await eventually(lambda: newcomer.power_kw == pytest.approx(-3.0, abs=0.05), 5, "share")
        # A redelivery changes nothing and gets the same answer.
        assert await fleet.grid.registry_request(request) == ack
        assert sum(c.request_id == "enrol-1" for c in fleet.grid.observed.registry_changes) == 1
        # Restarted mid-dispatch: the enrolment came from the store, not the config.
        await fleet.stop_gateway()
        gateway = await fleet.start_gateway()
        await eventually(lambda: gateway.supervisors["bat-new"].available, 8, "polled again")
        await eventually(lambda: newcomer.power_kw == pytest.approx(-3.0, abs=0.05), 5, "held")
        get = await fleet.grid.registry_request({"request_id": "get-1", "op": "get"})
        assert get.state == "applied"
        await fleet.grid.wait_for(lambda o: o.registry is not None, 5)
        snapshot = fleet.grid.observed.registry
        assert snapshot is not None
        assert snapshot.version == get.version == ack.version
        entries = {e.device.device_id: e for e in snapshot.devices}
        assert set(entries) == {"bat-1", "bat-2", "bat-new"}
        assert entries["bat-new"].origin == "api"
        assert entries["bat-1"].origin == "config"
        assert entries["bat-new"].device.rate_class == "tou-a"
        assert [p.program_id for p in entries["bat-new"].programs] == ["summer-vpp"]


async def test_moving_a_feeder_section_during_envelopes_keeps_both_held(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    sims = batteries(4)
    sections = ("sec-a", "sec-b", "sec-c", "sec-d")  # bat-1, bat-3 on f1; bat-2, bat-4 on f2
    async with Fleet(broker_endpoint, tmp_path / "gw.sqlite", sims, sections=sections) as fleet:
        for feeder in ("f1", "f2"):
            await fleet.grid.send(
                {
                    "type": "envelope",
                    "command_id": f"doe-{feeder}",
                    "target": {"group_id": f"feeder:{feeder}"},
                    "intervals": [{"start": iso(-1), "end": iso(60), "import_limit_kw": 6.0}],
                }
            )
        await fleet.grid.send(dispatch("charge", "substation:s1", 20.0, 0.1, 60, priority=1000))
        await fleet.grid.wait_for_state("charge", AckState.ACTIVE, 5)
        f1, f2 = [sims[0], sims[2]], [sims[1], sims[3]]
        await eventually(lambda: power(f1) == pytest.approx(6.0, abs=0.1), 5, "f1 at its DOE")
        await eventually(lambda: power(f2) == pytest.approx(6.0, abs=0.1), 5, "f2 at its DOE")
        # Field switching: section c (bat-3) now hangs off feeder f2.
        ack = await fleet.grid.registry_request(
            {
                "request_id": "switch-1",
                "op": "topology",
                "section_moves": [{"feeder_section": "sec-c", "feeder": "f2", "substation": "s1"}],
            }
        )
        assert (ack.state, ack.devices) == ("applied", ("bat-3",))
        f1, f2 = [sims[0]], [sims[1], sims[2], sims[3]]
        # Both envelopes hold over the new membership: f2 now clips three batteries to 6 kW,
        # f1 has one battery (5 kW at most, under its 6 kW).
        await eventually(lambda: power(f2) == pytest.approx(6.0, abs=0.1), 5, "f2 over 3")
        await eventually(lambda: power(f1) == pytest.approx(5.0, abs=0.1), 5, "f1 over 1")
        for _ in range(10):
            assert power(f2) <= 6.0 + 0.1
            assert power(f1) <= 6.0 + 0.1
            await asyncio.sleep(0.1)
        await fleet.grid.wait_for(
            lambda o: (g := o.groups.get("feeder:f2")) is not None and g.devices_total == 3, 5
        )
        # The events in flight were not rewritten: the same commands, still active.
        assert fleet.grid.states("charge")[-1] is AckState.ACTIVE
        assert all(fleet.grid.states(f"doe-{f}")[-1] is AckState.ACTIVE for f in ("f1", "f2"))


async def test_a_device_retired_mid_dispatch_is_released_and_its_share_reallocated(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    sims = batteries(4)
    async with Fleet(broker_endpoint, tmp_path / "gw.sqlite", sims) as fleet:
        await fleet.grid.send(dispatch("shed", "feeder:f1", -4.0, 0.1, 60))
        await fleet.grid.wait_for_state("shed", AckState.ACTIVE, 5)
        bat1, bat3 = sims[0], sims[2]
        await eventually(lambda: bat3.power_kw == pytest.approx(-2.0, abs=0.05), 5, "shared")
        ack = await fleet.grid.registry_request(
            {"request_id": "retire-1", "op": "retire", "device_ids": ["bat-3"]}
        )
        assert (ack.state, ack.devices) == ("applied", ("bat-3",))
        # Its share moves to bat-1; bat-3 is released before its adapter stops.
        await eventually(lambda: bat1.power_kw == pytest.approx(-4.0, abs=0.05), 5, "re-allocated")
        await eventually(lambda: bat3.power_kw == 0.0, 5, "bat-3 released")
        gateway = fleet.gateway
        assert gateway is not None
        await eventually(lambda: "bat-3" not in gateway.supervisors, 5, "adapter stopped")
        assert fleet.grid.states("shed")[-1] is AckState.ACTIVE
        await fleet.grid.wait_for(
            lambda o: any(c.retired == ("bat-3",) for c in o.registry_changes), 5
        )
        # Participation records: bat-3 served "shed" until it was retired; bat-1 still does.
        [served] = await gateway.enrolment.store.participation("bat-3")
        assert served.command_id == "shed"
        assert served.ended_at is not None
        [serving] = await gateway.enrolment.store.participation("bat-1")
        assert serving.command_id == "shed"
        assert serving.ended_at is None
        assert gateway.registry.called_s["bat-3"] > 0  # counts for who is called first
        # Still listed in the config file, but retired through the API: it stays retired.
        await fleet.stop_gateway()
        gateway = await fleet.start_gateway()
        assert "bat-3" not in gateway.registry
        assert bat3.power_kw == 0.0


async def test_bad_registry_requests_are_answered(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    async with Fleet(broker_endpoint, tmp_path / "gw.sqlite", batteries(1)) as fleet:
        await fleet.grid.send_registry(b"{not json")
        await fleet.grid.wait_for(lambda o: bool(o.errors), 5)
        error = fleet.grid.observed.errors[-1]
        assert error.reason is Reason.MALFORMED_JSON
        assert error.topic.endswith("/requests/registry")
        ack = await fleet.grid.registry_request({"request_id": "r-1", "op": "enrol", "devices": []})
        assert (ack.state, ack.reason) == ("rejected", Reason.SCHEMA_VIOLATION)
        ack = await fleet.grid.registry_request(
            {"request_id": "r-2", "op": "retire", "device_ids": ["nobody"]}
        )
        assert (ack.state, ack.reason) == ("rejected", Reason.UNKNOWN_DEVICE)
        ack = await fleet.grid.registry_request(
            {"request_id": "r-3", "op": "enrol", "devices": [new_battery("x", 1, "f1")]}
            | {"devices": [{**new_battery("x", 1), "reach": {}}]}
        )
        assert (ack.state, ack.reason) == ("rejected", Reason.ADAPTER_INVALID)
        assert "sunspec" in (ack.detail or "")


async def test_an_unknown_mqtt_device_announces_itself_and_is_enrolled_on_approval(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    topics = DeviceTopics(f"derms/devices/e2e-{uuid.uuid4().hex[:6]}")
    device_mqtt = {
        "device_mqtt": {
            "host": broker_endpoint.host,
            "port": broker_endpoint.port,
            "topic_root": topics.root,
            "backoff_max_s": 1.0,
        }
    }
    async with (
        Fleet(
            broker_endpoint, tmp_path / "gw.sqlite", batteries(1), extra_config=device_mqtt
        ) as fleet,
        contextlib.AsyncExitStack() as stack,
    ):
        sim = MqttDeviceSimulator(
            SimThermostat("tstat-new", house=ThermalHouse(indoor_c=22.0, on=True)),
            host=broker_endpoint.host,
            port=broker_endpoint.port,
            topics=topics,
            report_interval_s=0.2,
        )
        task = asyncio.create_task(sim.run(), name="sim:tstat-new")
        stack.push_async_callback(_stop, task)
        await fleet.grid.wait_for(lambda o: "tstat-new" in o.pending, 10)
        pending = fleet.grid.observed.pending["tstat-new"]
        assert (pending.der_class, pending.adapter) == ("thermostat", "mqtt_thermostat")
        gateway = fleet.gateway
        assert gateway is not None
        assert "tstat-new" not in gateway.registry  # announced, not enrolled
        get = await fleet.grid.registry_request({"request_id": "g", "op": "get"})
        await fleet.grid.wait_for(lambda o: o.registry is not None, 5)
        assert fleet.grid.observed.registry is not None
        assert [p.device_id for p in fleet.grid.observed.registry.pending] == ["tstat-new"]
        assert get.state == "applied"
        ack = await fleet.grid.registry_request(
            {
                "request_id": "approve-1",
                "op": "approve",
                "devices": [
                    {
                        "device_id": "tstat-new",
                        "location": {"substation": "s1", "feeder": "f2"},
                        "programs": ["summer-vpp"],
                    }
                ],
            }
        )
        assert (ack.state, ack.devices) == ("applied", ("tstat-new",))
        # Polled at once: the link kept its birth and telemetry for when it was enrolled.
        await eventually(lambda: gateway.supervisors["tstat-new"].available, 5, "polled")
        assert gateway.registry.device("tstat-new").location.feeder == "f2"
        assert fleet.grid.observed.registry_changes[-1].op == "approve"
        again = await fleet.grid.registry_request(
            {
                "request_id": "approve-2",
                "op": "approve",
                "devices": [{"device_id": "tstat-new", "location": {"substation": "s1"}}],
            }
        )
        assert again.reason is Reason.UNKNOWN_DEVICE  # no longer pending


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_reloaded_config_enrols_moves_and_retires_without_touching_commands(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    sims = batteries(2)  # bat-1 on f1, bat-2 on f2
    async with (
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=60
        ) as newcomer,
        Fleet(broker_endpoint, tmp_path / "gw.sqlite", sims) as fleet,
    ):
        app, gateway = fleet.app, fleet.gateway
        assert app is not None
        assert gateway is not None
        await fleet.grid.send(dispatch("shed", "substation:s1", -6.0, 0.1, 60))
        await fleet.grid.wait_for_state("shed", AckState.ACTIVE, 5)
        await eventually(lambda: power(sims) == pytest.approx(-6.0, abs=0.1), 5, "shed")
        # The file now: bat-1 gone, bat-2 moved to f1, a new battery on f2.
        config = fleet.config()
        bat2 = config.devices[1]
        moved = bat2.model_copy(
            update={"location": bat2.location.model_copy(update={"feeder": "f1"})}
        )
        added = bat2.model_copy(
            update={
                "device_id": "bat-3",
                "sunspec": bat2.sunspec.model_copy(update={"port": newcomer.port})
                if bat2.sunspec is not None
                else None,
            }
        )
        notes = await app.reload(config.model_copy(update={"devices": (moved, added)}))
        assert notes == []
        await fleet.grid.wait_for(lambda o: o.registry_changes[-1].retired == ("bat-1",), 5)
        change = fleet.grid.observed.registry_changes[-1]
        assert (change.enrolled, change.updated, change.retired) == (
            ("bat-3",),
            ("bat-2",),
            ("bat-1",),
        )
        assert gateway.registry.device("bat-2").location.feeder == "f1"
        await eventually(lambda: sims[0].power_kw == 0.0, 5, "bat-1 released")
        await eventually(
            lambda: power([sims[1], newcomer]) == pytest.approx(-6.0, abs=0.1), 8, "re-shared"
        )
        assert fleet.grid.states("shed")[-1] is AckState.ACTIVE
        assert "shed" in {a.command.command_id for a in gateway.book.active(utcnow())}


async def test_sighup_reloads_the_devices_of_a_running_gateway_process(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    def battery_entry(device_id: str, port: int) -> str:
        return f"""
[[devices]]
device_id = "{device_id}"
der_class = "battery"
adapter = "sunspec_battery"
location = {{ substation = "s1", feeder = "f1" }}
ratings = {{ max_charge_kw = 5, max_discharge_kw = 5, capacity_kwh = 10 }}
sunspec = {{ port = {port}, timeout_s = 1.0 }}
"""

    head = f"""
gateway_id = "hup-gw"
[broker]
port = {broker_endpoint.port}
protocol = "{broker_endpoint.protocol}"
[store]
path = "gw.sqlite"
[settlement]
timezone = "UTC"
[timing]
control_period_s = 0.2
poll_interval_s = 0.3
telemetry_period_s = 0.5
"""
    async with (
        SunSpecBatterySimulator(port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5) as b1,
        SunSpecBatterySimulator(port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5) as b2,
        GridDermsClient(
            broker_endpoint.host, broker_endpoint.port, "hup-gw", protocol=broker_endpoint.protocol
        ) as grid,
    ):
        config = tmp_path / "gw.toml"
        config.write_text(head + battery_entry("b1", b1.port))
        log = tmp_path / "gateway.log"
        process = await start("-vv", "run", "--config", str(config), log=log)
        try:
            await grid.wait_for(
                lambda o: (g := o.groups.get("feeder:f1")) is not None and g.devices_reporting == 1,
                20,
            )
            await grid.send(dispatch("shed", "feeder:f1", -4.0, 0.1, 120))
            await grid.wait_for_state("shed", AckState.ACTIVE, 5)
            config.write_text(head + battery_entry("b1", b1.port) + battery_entry("b2", b2.port))
            process.send_signal(signal.SIGHUP)
            await grid.wait_for(
                lambda o: any(c.enrolled == ("b2",) for c in o.registry_changes), 10
            )
            # The dispatch carries on, now over both batteries.
            await eventually(lambda: b2.power_kw == pytest.approx(-2.0, abs=0.05), 10, "b2 shares")
            assert b1.power_kw == pytest.approx(-2.0, abs=0.05)
            assert grid.states("shed")[-1] is AckState.ACTIVE
            # A file that does not parse changes nothing.
            config.write_text("this is = not toml [")
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.0)
            assert process.returncode is None
            assert b2.power_kw == pytest.approx(-2.0, abs=0.05)
        finally:
            code = await stop(process, signal.SIGTERM)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "SIGHUP: configuration reloaded" in text
        assert "SIGHUP: configuration not reloaded" in text


async def test_a_sunspec_scan_finds_a_battery_that_is_then_approved_and_polled(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    async with (
        SunSpecBatterySimulator(
            port=0, capacity_kwh=13.5, max_charge_kw=7, max_discharge_kw=6, initial_soc_pct=50
        ) as found,
        Fleet(broker_endpoint, tmp_path / "gw.sqlite", batteries(1)) as fleet,
    ):
        nobody = free_port()
        scan = {
            "request_id": "scan-1",
            "op": "discover",
            "targets": [
                {"host": "127.0.0.1", "port": found.port, "device_id_prefix": "site9"},
                {"host": "127.0.0.1", "port": nobody},
            ],
        }
        first = await fleet.grid.registry_request(scan)
        assert first.state == "accepted"  # the scan runs in the background
        await fleet.grid.wait_for(
            lambda o: any(a.state == "applied" for a in o.registry_acks["scan-1"]), 15
        )
        done = fleet.grid.observed.registry_acks["scan-1"][-1]
        device_id = f"site9-127.0.0.1-{found.port}-1"
        assert done.devices == (device_id,)
        await fleet.grid.wait_for(lambda o: device_id in o.pending, 5)
        pending = fleet.grid.observed.pending[device_id]
        assert (pending.ratings.max_charge_kw, pending.ratings.max_discharge_kw) == (7.0, 6.0)
        assert pending.ratings.capacity_kwh == pytest.approx(13.5)
        # Sent again: the same answer, no second scan.
        assert await fleet.grid.registry_request(scan) == done
        ack = await fleet.grid.registry_request(
            {
                "request_id": "approve-scan",
                "op": "approve",
                "devices": [
                    {"device_id": device_id, "location": {"substation": "s1", "feeder": "f1"}}
                ],
            }
        )
        assert (ack.state, ack.devices) == ("applied", (device_id,))
        gateway = fleet.gateway
        assert gateway is not None
        await eventually(lambda: gateway.supervisors[device_id].available, 8, "polled")
        await fleet.grid.send(dispatch("shed", "feeder:f1", -4.0, 0.1, 30))
        await eventually(lambda: found.power_kw < -1.0, 5, "dispatched")


async def test_a_device_announcing_itself_is_enrolled_by_an_auto_approval_rule(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    topics = DeviceTopics(f"derms/devices/e2e-{uuid.uuid4().hex[:6]}")
    extra = {
        "device_mqtt": {
            "host": broker_endpoint.host,
            "port": broker_endpoint.port,
            "topic_root": topics.root,
            "backoff_max_s": 1.0,
        },
        "auto_approve": [
            {
                "adapter": "mqtt_thermostat",
                "device_id_prefix": "north-",
                "location": {"substation": "s1", "feeder": "f1"},
                "programs": ["comfort"],
            }
        ],
    }
    async with (
        Fleet(broker_endpoint, tmp_path / "gw.sqlite", batteries(1), extra_config=extra) as fleet,
        contextlib.AsyncExitStack() as stack,
    ):
        for device_id in ("north-7", "south-7"):
            sim = MqttDeviceSimulator(
                SimThermostat(device_id, house=ThermalHouse(indoor_c=22.0, on=True)),
                host=broker_endpoint.host,
                port=broker_endpoint.port,
                topics=topics,
                report_interval_s=0.2,
            )
            stack.push_async_callback(_stop, asyncio.create_task(sim.run()))
        await fleet.grid.wait_for(lambda o: {"north-7", "south-7"} <= set(o.pending), 10)
        await fleet.grid.wait_for(
            lambda o: any(a.state == "applied" for a in o.registry_acks["auto-approve.north-7"]),
            5,
        )
        gateway = fleet.gateway
        assert gateway is not None
        await eventually(lambda: gateway.supervisors["north-7"].available, 5, "polled")
        assert gateway.registry.device("north-7").programs == ("comfort",)
        assert "south-7" not in gateway.registry  # no rule matches: it waits for approval
        assert [p.device_id for p in gateway.enrolment.snapshot(utcnow()).pending] == ["south-7"]


async def test_a_device_its_endpoint_enrols_is_kept_moved_and_retired_through_the_registry(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    """An OCPP charger or an OEM cloud's resource is enrolled by its endpoint (here a SunSpec
    battery handed to ``add_device`` as those endpoints do): it is in the durable registry, the
    API can move it, the move holds when the endpoint enrols it again after a restart, and a
    retirement keeps it out."""
    from adapters.sunspec.battery import SunSpecBattery
    from adapters.sunspec.connection import SunSpecEndpoint
    from unified.model import BatteryRatings, DerClass, Device, TopologyLocation

    def described(port: int) -> tuple[Device, SunSpecBattery]:
        device = Device(
            device_id="cloud-1",
            der_class=DerClass.BATTERY,
            adapter="oem_vtn",
            location=TopologyLocation(substation="s1", feeder="f1"),
            ratings=BatteryRatings(max_charge_kw=5, max_discharge_kw=5, capacity_kwh=10),
        )
        return device, SunSpecBattery("cloud-1", SunSpecEndpoint(port=port))

    async with (
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, initial_soc_pct=60
        ) as sim,
        Fleet(broker_endpoint, tmp_path / "gw.sqlite", batteries(1)) as fleet,
    ):
        gateway = fleet.gateway
        assert gateway is not None
        gateway.add_device(*described(sim.port))
        await fleet.grid.wait_for(
            lambda o: any(c.enrolled == ("cloud-1",) for c in o.registry_changes), 5
        )
        assert fleet.grid.observed.registry_changes[-1].op == "endpoint"
        move = {
            "request_id": "move-1",
            "op": "topology",
            "moves": [{"device_id": "cloud-1", "location": {"substation": "s1", "feeder": "f2"}}],
        }
        ack = await fleet.grid.registry_request(move)
        assert (ack.state, ack.devices) == ("applied", ("cloud-1",))
        assert gateway.registry.device("cloud-1").location.feeder == "f2"
        # Restarted: the endpoint enrols it again as it describes it (on f1); the move holds.
        await fleet.stop_gateway()
        gateway = await fleet.start_gateway()
        assert "cloud-1" not in gateway.registry  # until its endpoint brings it back
        gateway.add_device(*described(sim.port))
        assert gateway.registry.device("cloud-1").location.feeder == "f2"
        await eventually(lambda: gateway.supervisors["cloud-1"].available, 8, "polled again")
        get = await fleet.grid.registry_request({"request_id": "get-1", "op": "get"})
        assert get.state == "applied"
        await fleet.grid.wait_for(lambda o: o.registry is not None, 5)
        snapshot = fleet.grid.observed.registry
        assert snapshot is not None
        entry = next(e for e in snapshot.devices if e.device.device_id == "cloud-1")
        assert (entry.origin, entry.managed, entry.device.location.feeder) == (
            "endpoint",
            True,
            "f2",
        )
        # Retired through the API: its endpoint cannot bring it back.
        retire = {"request_id": "retire-1", "op": "retire", "device_ids": ["cloud-1"]}
        assert (await fleet.grid.registry_request(retire)).state == "applied"
        await eventually(lambda: "cloud-1" not in gateway.supervisors, 8, "released and stopped")
        with pytest.raises(ValueError, match="retired through the registry API"):
            gateway.add_device(*described(sim.port))
