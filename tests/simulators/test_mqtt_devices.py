"""Simulated MQTT thermostats and water heaters: physics and device logic, then on a broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt
import pytest

from protocols.mqtt.devices import (
    DeviceCommandMessage,
    DeviceTopics,
    EndEvent,
    HvacMode,
    MessageKind,
    ResultStatus,
    SetpointOffset,
    WaterHeaterAction,
    WaterHeaterMode,
    decode_availability,
    decode_birth,
    decode_result,
    decode_telemetry,
    encode,
)
from simulators.broker import MosquittoBroker
from simulators.mqtt_devices import (
    MqttDeviceSimulator,
    SimThermostat,
    SimWaterHeater,
    Tank,
    ThermalHouse,
)
from unified.model import utcnow


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def command(
    device_id: str, body: SetpointOffset | EndEvent | WaterHeaterAction, hold_s: float = 60
) -> DeviceCommandMessage:
    return DeviceCommandMessage(
        command_id=f"c{time.monotonic_ns()}",
        device_id=device_id,
        issued_at=utcnow(),
        hold_s=hold_s,
        body=body,
    )


# --------------------------------------------------------------------------- physics


def test_house_drifts_toward_outdoor_with_the_hvac_off() -> None:
    house = ThermalHouse(mode=HvacMode.OFF, indoor_c=22.0, outdoor_c=32.0)
    house.step(4 * 3600, 0.0)  # one time constant (R·C = 4 h)
    assert house.indoor_c == pytest.approx(32 - 10 / 2.718, abs=0.3)
    assert house.power_kw == 0.0


def test_compressor_cycles_inside_the_hysteresis_band() -> None:
    house = ThermalHouse(indoor_c=22.0)
    temps, loads = [], []
    for _ in range(6 * 120):  # six hours in 30 s steps
        house.step(30, 0.0)
        temps.append(house.indoor_c)
        loads.append(house.power_kw)
    assert min(temps[100:]) > 21.3
    assert max(temps[100:]) < 22.7
    assert set(loads) == {0.0, 3.0}
    duty = sum(loads) / (3.0 * len(loads))
    assert 0.3 < duty < 0.8


def test_heating_mode_mirrors_cooling() -> None:
    house = ThermalHouse(mode=HvacMode.HEAT, outdoor_c=8.0, indoor_c=20.0, setpoint_c=21.0)
    house.step(1800, 0.0)
    assert house.on
    assert house.indoor_c > 20.0
    house.step(1800, -3.0)  # a heating shed lowers the target: the heat pump stops
    assert not house.on


def test_shed_drops_load_and_release_rebounds() -> None:
    clock = FakeClock()
    device = SimThermostat("t", clock=clock, house=ThermalHouse(indoor_c=22.5, on=True))
    for _ in range(20):
        device.step(600)
    baseline = device.house.indoor_c
    assert device.handle(command("t", SetpointOffset(offset_c=2.0))).status is ResultStatus.ACCEPTED
    loads = []
    for _ in range(6):
        device.step(300)
        loads.append(device.power_kw)
    assert loads[:3] == [0.0, 0.0, 0.0]  # the house warms with the compressor off
    assert device.house.indoor_c > baseline + 1.0
    device.handle(command("t", EndEvent()))
    device.step(30)
    assert device.power_kw == 3.0  # everybody above the normal setpoint: rebound


def test_preconditioning_then_offset_then_expiry() -> None:
    clock = FakeClock()
    device = SimThermostat("t", clock=clock)
    body = SetpointOffset(offset_c=2.0, precondition_offset_c=-1.0, precondition_s=600)
    message = command("t", body, hold_s=100)
    device.handle(message)
    assert device.offset_c == -1.0
    clock.now += 601
    assert device.offset_c == 2.0
    # Renewal by the same instruction keeps the event (no second pre-cool).
    device.handle(command("t", body, hold_s=100))
    assert device.offset_c == 2.0
    assert device.expire() is None
    clock.now += 101
    done = device.expire()
    assert done is not None
    assert done.status is ResultStatus.COMPLETED
    assert device.offset_c == 0.0


def test_occupant_override_opts_out_and_blocks_events_until_it_ends() -> None:
    clock = FakeClock()
    device = SimThermostat("t", clock=clock)
    assert device.occupant_override(60) is None  # nothing to leave
    clock.now += 61
    event = command("t", SetpointOffset(offset_c=2.0))
    device.handle(event)
    result = device.occupant_setpoint(21.0, duration_s=600)
    assert result is not None
    assert result.status is ResultStatus.OPTED_OUT
    assert result.command_id == event.command_id
    assert device.telemetry().override
    again = device.handle(command("t", SetpointOffset(offset_c=1.0)))
    assert again.status is ResultStatus.REJECTED
    assert again.reason == "occupant override"
    assert device.handle(command("t", EndEvent())).status is ResultStatus.ACCEPTED
    clock.now += 601
    assert device.handle(command("t", SetpointOffset(offset_c=1.0))).status.value == "accepted"
    out_of_range = device.handle(command("t", SetpointOffset(offset_c=10.0)))
    assert out_of_range.status is ResultStatus.REJECTED


def test_tank_modes_draws_and_energy_take() -> None:
    tank = Tank(tank_c=50.0)
    assert tank.energy_capacity_kwh == pytest.approx(190 * 4.186 / 3600 * 20)
    assert tank.energy_take_kwh == pytest.approx(tank.energy_capacity_kwh / 2)
    tank.draw(40)  # a shower
    assert tank.tank_c == pytest.approx(50 - 35 * 40 / 190)
    tank.mode = WaterHeaterMode.SHED
    tank.step(60)
    assert not tank.on  # above the 40 °C floor: no heating while shed
    tank.mode = WaterHeaterMode.NORMAL
    tank.step(60)
    assert tank.on
    tank.step(3 * 3600)
    assert 46.5 < tank.tank_c <= 50.5
    tank.mode = WaterHeaterMode.LOAD_UP
    tank.step(2 * 3600)
    assert tank.tank_c == pytest.approx(60, abs=0.6)
    assert tank.energy_take_kwh < 0.1


def test_water_heater_logic() -> None:
    clock = FakeClock()
    heater = SimWaterHeater("wh", clock=clock)
    shed = command("wh", WaterHeaterAction(mode=WaterHeaterMode.SHED), hold_s=30)
    assert heater.handle(shed).status is ResultStatus.ACCEPTED
    assert heater.tank.mode is WaterHeaterMode.SHED
    assert heater.handle(command("wh", SetpointOffset(offset_c=1))).status.value == "rejected"
    clock.now += 31
    assert heater.expire() is not None
    heater.step(1)
    assert heater.tank.mode.value == "normal"
    assert heater.telemetry().energy_capacity_kwh == pytest.approx(4.42, abs=0.01)


# --------------------------------------------------------------------------- on a broker


async def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.broker
@pytest.mark.timeout(30)
async def test_simulator_speaks_the_topic_scheme(mosquitto: MosquittoBroker) -> None:
    topics = DeviceTopics("sim/devices/v1")
    ep = mosquitto.endpoint
    device = SimThermostat("t1", house=ThermalHouse(indoor_c=22.6, on=True))
    sim = MqttDeviceSimulator(
        device, host=ep.host, port=ep.port, topics=topics, report_interval_s=0.1, time_scale=60
    )
    seen: dict[MessageKind, list[bytes]] = {kind: [] for kind in MessageKind}
    async with (
        aiomqtt.Client(ep.host, ep.port, protocol=aiomqtt.ProtocolVersion.V5) as gw,
        asyncio.TaskGroup() as tg,
    ):
        run = tg.create_task(sim.run(), name="sim")
        await eventually(sim.connected.is_set, 5, "sim connected")
        # Retained: a gateway that subscribes later still learns what the device is.
        await gw.subscribe(f"{topics.root}/#", qos=1)

        async def listen() -> None:
            async for message in gw.messages:
                parsed = topics.parse(str(message.topic))
                assert parsed is not None
                assert isinstance(message.payload, bytes)
                seen[parsed[1]].append(message.payload)

        listener = tg.create_task(listen(), name="listen")
        await eventually(lambda: len(seen[MessageKind.TELEMETRY]) >= 2, 5, "telemetry")
        assert decode_birth(seen[MessageKind.BIRTH][0], "t1").rated_kw == 3.0
        assert decode_availability(seen[MessageKind.AVAILABILITY][0], "t1").online

        await gw.publish(topics.topic("t1", MessageKind.COMMAND), b"garbage", qos=1)
        offset = command("t1", SetpointOffset(offset_c=1.5))
        await gw.publish(topics.topic("t1", MessageKind.COMMAND), encode(offset), qos=1)
        await eventually(lambda: bool(seen[MessageKind.RESULT]), 5, "a result")
        result = decode_result(seen[MessageKind.RESULT][0], "t1")
        assert (result.command_id, result.status) == (offset.command_id, ResultStatus.ACCEPTED)
        assert sim.malformed == 1
        await eventually(
            lambda: (
                getattr(decode_telemetry(seen[MessageKind.TELEMETRY][-1]), "offset_c", 0) == 1.5
            ),
            3,
            "the offset in telemetry",
        )
        sim.override(duration_s=60)
        await eventually(lambda: len(seen[MessageKind.RESULT]) >= 2, 5, "the opt-out")
        assert decode_result(seen[MessageKind.RESULT][1]).status is ResultStatus.OPTED_OUT

        run.cancel()  # a clean stop says offline itself
        await eventually(
            lambda: not decode_availability(seen[MessageKind.AVAILABILITY][-1]).online,
            3,
            "offline",
        )
        listener.cancel()
