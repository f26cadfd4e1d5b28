"""MQTT thermostat and water heater adapters against a real mosquitto with per-device accounts.

Simulated devices (each its own MQTT client and account) run their physics ``time_scale`` times
faster than the wall clock, so a shed and its rebound take seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiomqtt
import pytest

from adapters.mqtt_devices.acl import (
    DeviceAccount,
    new_device_accounts,
    provision_broker_files,
)
from adapters.mqtt_devices.devices import (
    DeviceMqttConfig,
    DeviceMqttLink,
    MqttDeviceSettings,
    MqttThermostat,
    MqttWaterHeater,
    build_mqtt_adapter,
)
from gateway.devices import AdapterError, DeviceRejected, DeviceUnavailable, UnsafeCommand
from gateway.supervisor import DeviceSupervisor
from protocols.mqtt.devices import (
    DeviceTopics,
    MessageKind,
    ThermostatTelemetry,
    WaterHeaterMode,
    encode,
)
from simulators.broker import AuthenticatedMosquitto, BrokerEndpoint, MosquittoBroker
from simulators.mqtt_devices import (
    MqttDeviceSimulator,
    SimThermostat,
    SimWaterHeater,
    Tank,
    ThermalHouse,
)
from unified.model import DeviceCommand, utcnow

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

TOPICS = DeviceTopics("test/devices/v1")
D = TypeVar("D", SimThermostat, SimWaterHeater)
GATEWAY = DeviceAccount("gateway", "gw-secret-1")


async def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


def require_mosquitto() -> None:
    if not MosquittoBroker.available():
        if os.environ.get("CI"):
            pytest.fail("CI is set but mosquitto is not installed")
        pytest.skip("mosquitto not installed")


@dataclass
class Rig:
    """A broker with accounts, the gateway's link, simulators and adapters, all running."""

    endpoint: BrokerEndpoint
    accounts: dict[str, DeviceAccount]
    link: DeviceMqttLink
    tasks: asyncio.TaskGroup
    sims: dict[str, MqttDeviceSimulator[SimThermostat] | MqttDeviceSimulator[SimWaterHeater]] = (
        field(default_factory=dict)
    )

    def simulate(self, device: D, *, time_scale: float) -> MqttDeviceSimulator[D]:
        account = self.accounts[device.device_id]
        sim = MqttDeviceSimulator(
            device,
            host=self.endpoint.host,
            port=self.endpoint.port,
            username=account.username,
            password=account.password,
            topics=TOPICS,
            report_interval_s=0.1,
            time_scale=time_scale,
        )
        self.sims[device.device_id] = sim
        self.tasks.create_task(sim.run(), name=f"sim:{device.device_id}")
        return sim


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, device_ids: Iterable[str]) -> AsyncIterator[Rig]:
    require_mosquitto()
    accounts = new_device_accounts(device_ids)
    passwd, acl = provision_broker_files(tmp_path, TOPICS, [GATEWAY, *accounts.values()])
    async with AuthenticatedMosquitto(passwd, acl) as endpoint:
        link = DeviceMqttLink(
            DeviceMqttConfig(
                host=endpoint.host,
                port=endpoint.port,
                username=GATEWAY.username,
                password=GATEWAY.password,
                topic_root=TOPICS.root,
                backoff_max_s=1.0,
            )
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run(), name="device-link")
            r = Rig(endpoint, accounts, link, tg)
            try:
                yield r
            finally:
                for task in asyncio.all_tasks():
                    if task.get_name().startswith(("sim:", "device-link", "device:")):
                        task.cancel()


SETTINGS = MqttDeviceSettings(
    comfort_min_c=20.0,
    comfort_max_c=24.5,
    stale_after_s=2.0,
    hold_s=5.0,
    result_timeout_s=2.0,
    connect_wait_s=3.0,
)


def house(i: int) -> SimThermostat:
    # Staggered starting temperatures and compressor states spread the cycles like a real fleet.
    indoor = 21.6 + 0.15 * i
    return SimThermostat(f"t{i}", house=ThermalHouse(indoor_c=indoor, on=i % 2 == 0))


def held_off(sim: SimThermostat) -> bool:
    """The setpoint is raised, within the band, and not behind the room (the compressor stops)."""
    target = sim.house.setpoint_c + sim.offset_c
    return 0 < sim.offset_c <= 2.5 and target >= sim.house.indoor_c - 0.05


def thermostat_telemetry(adapter: MqttThermostat) -> ThermostatTelemetry:
    telemetry = adapter._seen.telemetry
    assert isinstance(telemetry, ThermostatTelemetry)
    return telemetry


def mode(heater: SimWaterHeater) -> WaterHeaterMode:
    return heater.tank.mode


@dataclass
class Sample:
    at: float
    load_kw: float
    mean_indoor_c: float


async def test_thermostats_shed_then_rebound_above_baseline(tmp_path: Path) -> None:
    n = 6
    async with rig(tmp_path, [f"t{i}" for i in range(n)]) as r:
        sims = [r.simulate(house(i), time_scale=1800) for i in range(n)]
        adapters = [MqttThermostat(f"t{i}", r.link, SETTINGS) for i in range(n)]
        refused: list[tuple[DeviceCommand, AdapterError | None]] = []
        supervisors = [
            DeviceSupervisor(
                a,
                poll_interval_s=0.1,
                io_timeout_s=2.5,
                refresh_s=1.0,
                backoff_max_s=0.5,
                on_result=lambda c, e: refused.append((c, e)) if e is not None else None,
            )
            for a in adapters
        ]
        for s in supervisors:
            r.tasks.create_task(s.run(), name=f"device:{s.device_id}")
        await eventually(lambda: all(s.available for s in supervisors), 10, "devices online")

        samples: list[Sample] = []

        async def sample_for(seconds: float) -> list[Sample]:
            out = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                states = [await a.read() for a in adapters]
                telemetry = [sim.device.telemetry() for sim in sims]
                out.append(
                    Sample(
                        time.monotonic(),
                        sum(s.power_kw for s in states),
                        statistics.fmean(t.indoor_c for t in telemetry),
                    )
                )
                await asyncio.sleep(0.05)
            samples.extend(out)
            return out

        # Baseline: the fleet cycles around 22 °C.
        baseline = await sample_for(3.0)
        baseline_kw = statistics.fmean(s.load_kw for s in baseline)
        baseline_indoor = statistics.fmean(s.mean_indoor_c for s in baseline)
        assert 0 < baseline_kw < n * 3.0

        # Shed: each device asked for its full rating as a change from baseline.
        for s in supervisors:
            s.command(DeviceCommand(device_id=s.device_id, power_kw=-3.0))
        shed = await sample_for(2.5)
        # Each house is held off, its setpoint following the room up (the supervisor re-applies
        # every second, 30 simulated minutes) until the 24.5 °C band is spent.
        assert all(sim.device.offset_c == pytest.approx(2.5) for sim in sims)
        shed_tail = shed[len(shed) // 3 :]
        assert statistics.fmean(s.load_kw for s in shed_tail) < 0.5 * baseline_kw
        assert shed[-1].mean_indoor_c > baseline_indoor + 1.0  # the houses warmed

        # Release: back to autonomous operation; compressors run together (rebound).
        for s in supervisors:
            s.command(None)
        rebound = await sample_for(2.0)
        assert all(sim.device.offset_c == 0.0 for sim in sims)
        peak = max(s.load_kw for s in rebound)
        assert peak > 1.3 * baseline_kw
        assert peak == pytest.approx(n * 3.0)  # every compressor at once
        assert rebound[-1].mean_indoor_c < shed[-1].mean_indoor_c  # cooling back down
        assert not refused


async def test_override_ends_participation_and_is_reported(tmp_path: Path) -> None:
    async with rig(tmp_path, ["t0", "t1"]) as r:
        sims = [r.simulate(house(i), time_scale=600) for i in range(2)]
        opt_outs: list[tuple[DeviceCommand, AdapterError]] = []
        results: list[tuple[DeviceCommand, AdapterError | None]] = []
        adapters = [
            MqttThermostat(
                f"t{i}", r.link, SETTINGS, on_opt_out=lambda c, e: opt_outs.append((c, e))
            )
            for i in range(2)
        ]
        supervisors = [
            DeviceSupervisor(
                a,
                poll_interval_s=0.1,
                io_timeout_s=2.5,
                refresh_s=0.5,
                backoff_max_s=0.5,
                on_result=lambda c, e: results.append((c, e)),
            )
            for a in adapters
        ]
        for s in supervisors:
            r.tasks.create_task(s.run(), name=f"device:{s.device_id}")
        await eventually(lambda: all(s.available for s in supervisors), 10, "devices online")
        wanted = [DeviceCommand(device_id=f"t{i}", power_kw=-1.5) for i in range(2)]
        for s, c in zip(supervisors, wanted, strict=True):
            s.command(c)
        await eventually(lambda: all(sim.device.event for sim in sims), 5, "events running")
        assert held_off(sims[0].device)

        sims[0].override(duration_s=600, setpoint_c=21.0)  # the occupant wants it cooler now

        # Reported at once through on_opt_out, with the command it ends...
        await eventually(lambda: bool(opt_outs), 5, "opt-out reported")
        command, error = opt_outs[0]
        assert command == wanted[0]
        assert isinstance(error, DeviceRejected)
        assert "override" in str(error)
        # ... then the supervisor's next refresh is refused, so the gateway excludes the device.
        await eventually(
            lambda: any(c.device_id == "t0" and isinstance(e, DeviceRejected) for c, e in results),
            5,
            "refusal on re-apply",
        )
        state = await adapters[0].read()
        assert state.soc_pct is None  # no comfort headroom promised while overridden
        assert adapters[0].override_active
        assert sims[0].device.event is None
        assert sims[0].device.house.setpoint_c == 21.0
        # The neighbour keeps shedding.
        assert held_off(sims[1].device)
        assert (await adapters[1].read()).soc_pct is not None


async def test_setpoint_event_with_preconditioning_and_comfort_band(tmp_path: Path) -> None:
    async with rig(tmp_path, ["t0"]) as r:
        sim = r.simulate(house(0), time_scale=60)
        adapter = MqttThermostat("t0", r.link, SETTINGS)
        await adapter.connect()
        with pytest.raises(UnsafeCommand, match="comfort band"):
            await adapter.setpoint_event(3.0)  # 22 + 3 > 24.5
        with pytest.raises(UnsafeCommand, match="comfort band"):
            await adapter.setpoint_event(2.0, precondition_offset_c=-2.5)  # 19.5 < 20
        await adapter.setpoint_event(2.0, precondition_offset_c=-1.5, precondition_s=0.6)
        assert sim.device.offset_c == -1.5  # pre-cooling first
        await eventually(lambda: sim.device.offset_c == 2.0, 3, "event proper")
        await eventually(
            lambda: thermostat_telemetry(adapter).offset_c == 2.0,
            3,
            "telemetry shows the offset",
        )
        await adapter.apply(DeviceCommand(device_id="t0", power_kw=None))
        assert sim.device.event is None
        with pytest.raises(UnsafeCommand, match="rating"):
            await adapter.apply(DeviceCommand(device_id="t0", power_kw=-10.0))


async def test_a_small_shed_holds_the_house_off_too_and_only_a_full_band_refuses(
    tmp_path: Path,
) -> None:
    """A compressor is on or off: 0.3 kW of a 3 kW unit (worth an offset: 10 % of the 4 degC
    maximum is above the 0.3 degC minimum) holds the house off like a full shed, the setpoint
    ``hold_lead_c`` ahead of the room. Only a band with less room than the minimum is "at the
    edge" (a refusal, after which the planner excludes the house)."""
    async with rig(tmp_path, ["t0", "t1"]) as r:
        adapter = MqttThermostat("t0", r.link, SETTINGS)
        full = SETTINGS.model_copy(update={"comfort_max_c": 22.2})  # 0.2 degC of room
        edge = MqttThermostat("t1", r.link, full)
        sim = r.simulate(house(0), time_scale=60)
        r.simulate(house(1), time_scale=60)
        await adapter.connect()
        indoor = thermostat_telemetry(adapter).indoor_c
        await adapter.apply(DeviceCommand(device_id="t0", power_kw=-0.3))
        expected = max(SETTINGS.min_offset_c, indoor - 22.0 + SETTINGS.hold_lead_c)
        assert sim.device.offset_c == pytest.approx(expected, abs=0.051)
        await edge.connect()
        with pytest.raises(DeviceRejected, match="edge of comfort band"):
            await edge.apply(DeviceCommand(device_id="t1", power_kw=-1.5))


async def test_water_heater_sheds_and_loads_up(tmp_path: Path) -> None:
    async with rig(tmp_path, ["wh1"]) as r:
        heater = SimWaterHeater("wh1", tank=Tank(tank_c=44.0))  # below 47: heating in normal
        sim = r.simulate(heater, time_scale=900)
        adapter = build_mqtt_adapter("mqtt_water_heater", "wh1", r.link, SETTINGS)
        assert isinstance(adapter, MqttWaterHeater)
        await adapter.connect()
        await eventually(lambda: heater.tank.on, 3, "element on in normal mode")
        before = await adapter.read()
        assert before.max_discharge_kw == 4.5
        assert before.capacity_kwh == pytest.approx(4.42, 0.01)

        await adapter.apply(DeviceCommand(device_id="wh1", power_kw=-4.5))
        assert mode(heater) is WaterHeaterMode.SHED
        await eventually(lambda: not heater.tank.on, 2, "element off")
        await asyncio.sleep(0.3)
        assert (await adapter.read()).power_kw == 0.0

        await adapter.apply(DeviceCommand(device_id="wh1", power_kw=+4.5))
        assert mode(heater) is WaterHeaterMode.LOAD_UP
        await eventually(lambda: heater.tank.tank_c > 52.0, 6, "tank heated past normal setpoint")
        state = await adapter.read()
        assert state.power_kw == 4.5
        assert state.soc_pct is not None
        assert state.soc_pct > (before.soc_pct or 0) + 30

        await adapter.apply(DeviceCommand(device_id="wh1", power_kw=0.0))  # deadband → normal
        assert mode(heater) is WaterHeaterMode.NORMAL
        await eventually(lambda: not heater.tank.on, 2, "element off above setpoint")
        # An envelope cap below the element's rating keeps it off while autonomous.
        await adapter.apply(DeviceCommand(device_id="wh1", power_kw=None, import_limit_kw=2.0))
        assert mode(heater) is WaterHeaterMode.SHED
        assert [c.body.action for c in heater.commands_seen] == ["water_heater"] * 4
        assert sim.results[-1].status.value == "accepted"


async def test_water_heater_asked_for_its_expected_draw_sheds(tmp_path: Path) -> None:
    # The planner holds a heater off by asking for its baseline: an afternoon's 0.3-0.6 kW of a
    # 4.5 kW element. That is a shed (its whole expected draw), not a request below notice.
    async with rig(tmp_path, ["wh1"]) as r:
        heater = SimWaterHeater("wh1", tank=Tank(tank_c=44.0))  # below 47: heating in normal
        r.simulate(heater, time_scale=900)
        adapter = build_mqtt_adapter("mqtt_water_heater", "wh1", r.link, SETTINGS)
        await adapter.connect()
        await eventually(lambda: heater.tank.on, 3, "element on in normal mode")
        await adapter.apply(DeviceCommand(device_id="wh1", power_kw=-0.3))
        assert mode(heater) is WaterHeaterMode.SHED
        await eventually(lambda: not heater.tank.on, 2, "element off")
        await adapter.apply(DeviceCommand(device_id="wh1", power_kw=+0.3))  # a load-up, likewise
        assert mode(heater) is WaterHeaterMode.LOAD_UP
        await adapter.apply(DeviceCommand(device_id="wh1", power_kw=0.1))  # below notice
        assert mode(heater) is WaterHeaterMode.NORMAL


async def test_stale_and_offline_devices_are_unavailable(tmp_path: Path) -> None:
    async with rig(tmp_path, ["t0"]) as r:
        settings = SETTINGS.model_copy(update={"stale_after_s": 0.5, "connect_wait_s": 0.3})
        adapter = MqttThermostat("t0", r.link, settings)
        with pytest.raises(DeviceUnavailable):
            await adapter.connect()  # nothing published yet
        sim = r.simulate(house(0), time_scale=60)
        await eventually(sim.connected.is_set, 5, "sim connected")
        await adapter.connect()
        assert (await adapter.read()).power_kw in (0.0, 3.0)
        sim.silent = True  # connected, but stops reporting
        await asyncio.sleep(0.8)
        with pytest.raises(DeviceUnavailable, match="old"):
            await adapter.read()
        sim.silent = False
        await eventually(lambda: _reads(adapter), 6, "fresh again")
        for task in asyncio.all_tasks():
            if task.get_name() == "sim:t0":
                task.cancel()  # a clean stop publishes availability offline
        await eventually(lambda: adapter._seen.online is False, 3, "offline")
        with pytest.raises(DeviceUnavailable, match="offline"):
            await adapter.read()


def _reads(adapter: MqttThermostat) -> bool:
    try:
        adapter._fresh()
    except DeviceUnavailable:
        return False
    return True


async def test_bad_input_is_logged_once_and_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with rig(tmp_path, ["t0"]) as r:
        sim = r.simulate(house(0), time_scale=1)
        sim.report_interval_s = 30.0  # one report only: the fakes below must not be overwritten
        adapter = MqttThermostat("t0", r.link, SETTINGS)
        await adapter.connect()
        good = thermostat_telemetry(adapter)
        fake = good.model_copy(update={"timestamp": utcnow()})
        bad = [
            (TOPICS.topic("t0", MessageKind.TELEMETRY), b"{not json"),
            (TOPICS.topic("t0", MessageKind.TELEMETRY), b"{not json either"),
            (
                TOPICS.topic("t0", MessageKind.TELEMETRY),
                encode(fake).replace(b'"indoor_c":', b'"indoor_c":9', 1),  # 9xx °C
            ),
            (
                TOPICS.topic("t0", MessageKind.TELEMETRY),
                encode(fake.model_copy(update={"device_id": "t9"})),  # another device's payload
            ),
            (TOPICS.topic("t9", MessageKind.TELEMETRY), encode(fake)),  # nobody configured t9
            (TOPICS.topic("t9", MessageKind.TELEMETRY), encode(fake)),
            (f"{TOPICS.root}/t0/telemetry/extra", encode(fake)),  # not even subscribed
            (TOPICS.topic("t0", MessageKind.RESULT), b'{"command_id": 5}'),
        ]
        caplog.set_level(logging.WARNING, logger="adapters.mqtt_devices.devices")
        async with aiomqtt.Client(
            r.endpoint.host,
            r.endpoint.port,
            username=GATEWAY.username,
            password=GATEWAY.password,
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            for topic, payload in bad:
                await client.publish(topic, payload, qos=1)
            marker = fake.model_copy(update={"indoor_c": 23.456, "timestamp": utcnow()})
            await client.publish(TOPICS.topic("t0", MessageKind.TELEMETRY), encode(marker), qos=1)
        await eventually(
            lambda: thermostat_telemetry(adapter).indoor_c == 23.456,
            3,
            "the valid message after the bad ones",
        )
        assert r.link.stats.dropped_invalid == 5
        assert r.link.stats.dropped_unknown == 2
        warnings = [rec.getMessage() for rec in caplog.records]
        assert sum("malformed_json" in w for w in warnings) == 1  # logged once
        assert sum("unknown device 't9'" in w for w in warnings) == 1
        assert any("wrong_device" in w for w in warnings)
        assert any("schema_violation" in w for w in warnings)
        assert (await adapter.read()).power_kw in (0.0, 3.0)


async def test_link_and_devices_come_back_after_a_broker_restart(tmp_path: Path) -> None:
    require_mosquitto()
    accounts = new_device_accounts(["t0"])
    passwd, acl = provision_broker_files(tmp_path, TOPICS, [GATEWAY, *accounts.values()])
    broker = AuthenticatedMosquitto(passwd, acl)
    endpoint = await broker.start()
    try:
        link = DeviceMqttLink(
            DeviceMqttConfig(
                port=endpoint.port,
                username=GATEWAY.username,
                password=GATEWAY.password,
                topic_root=TOPICS.root,
                backoff_initial_s=0.1,
                backoff_max_s=0.5,
            )
        )
        adapter = MqttThermostat("t0", link, SETTINGS)
        sim = MqttDeviceSimulator(
            house(0),
            host=endpoint.host,
            port=endpoint.port,
            username=accounts["t0"].username,
            password=accounts["t0"].password,
            topics=TOPICS,
            report_interval_s=0.1,
            backoff_max_s=0.5,
        )
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(link.run(), name="device-link"),
                tg.create_task(sim.run(), name="sim:t0"),
            ]
            await adapter.connect()
            await broker.stop()
            await eventually(lambda: not link.connected.is_set(), 5, "link down")
            with pytest.raises(DeviceUnavailable):
                await adapter.read()
            await broker.start()  # same port, same accounts
            await eventually(link.connected.is_set, 8, "link back")
            await adapter.connect()
            await adapter.apply(DeviceCommand(device_id="t0", power_kw=-3.0))
            assert held_off(sim.device)
            for task in tasks:
                task.cancel()
    finally:
        await broker.stop()


async def test_a_flooding_device_is_held_to_its_quota_and_its_neighbour_still_heard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with rig(tmp_path, ["t0", "t1"]) as r:
        r.simulate(house(1), time_scale=1)
        flooder = MqttThermostat("t0", r.link, SETTINGS)
        neighbour = MqttThermostat("t1", r.link, SETTINGS)
        r.simulate(house(0), time_scale=1)
        await flooder.connect()
        await neighbour.connect()
        good = thermostat_telemetry(flooder)
        caplog.set_level(logging.WARNING, logger="adapters.mqtt_devices.devices")
        account = r.accounts["t0"]
        sent = 2_000
        async with aiomqtt.Client(
            r.endpoint.host,
            r.endpoint.port,
            username=account.username,
            password=account.password,
        ) as client:
            for k in range(sent):
                fake = good.model_copy(update={"indoor_c": 10.0 + k / 1000, "timestamp": utcnow()})
                await client.publish(TOPICS.topic("t0", MessageKind.TELEMETRY), encode(fake))
        quota = r.link.config.messages_per_device_burst
        await eventually(
            lambda: r.link.stats.dropped_over_quota >= sent - 2 * quota - 100,
            5,
            "the flood's excess dropped",
        )
        # The neighbour is still heard, fresh, while t0 floods.
        before = thermostat_telemetry(neighbour).timestamp
        await eventually(
            lambda: thermostat_telemetry(neighbour).timestamp > before, 3, "t1 still heard"
        )
        warnings = [rec.getMessage() for rec in caplog.records]
        assert sum("more than" in w and "t0" in w for w in warnings) == 1  # logged once
        assert not any("t1" in w and "more than" in w for w in warnings)
