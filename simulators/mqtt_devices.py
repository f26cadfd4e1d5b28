"""Simulated MQTT thermostats and water heaters, each its own MQTT client with its own account.

Physics (Euler steps of at most 30 simulated seconds; ``time_scale`` runs the physics faster than
the wall clock, while protocol timing — report interval, command hold times, pre-conditioning
and override durations — stays in wall-clock seconds):

* :class:`ThermalHouse` — first-order model ``C dT/dt = (T_out - T_in)/R ± on·COP·P_rated``.
  Cooling: the compressor starts above ``target + hysteresis`` and stops below
  ``target - hysteresis`` (heating mirrors it). A shed raises the cooling target, so compressors
  stay off while the house warms (load drops); at the release every house is above its normal
  setpoint and compressors run together (the rebound).
* :class:`Tank` — a fully mixed tank: standby losses to ambient, hot-water draws replaced by cold
  inlet water, an on/off element. CTA-2045 style modes: ``normal`` holds the setpoint with a
  deadband, ``shed`` only heats below the shed floor, ``load_up`` heats to the load-up
  temperature. ``energy take`` is the energy the tank can still absorb up to that temperature.

:class:`SimThermostat` / :class:`SimWaterHeater` hold the device logic (commands, hold times,
occupant overrides) without I/O; :class:`MqttDeviceSimulator` puts one of them on a broker:
birth and availability (retained, with an ``offline`` last will), periodic telemetry, commands
obeyed and answered on the result topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, TypeVar

import aiomqtt

from gateway.aio import raise_if_cancelling, wait_inside_task_group
from protocols.mqtt.devices import (
    Availability,
    Birth,
    CommandResult,
    DeviceCommandMessage,
    DeviceKind,
    DeviceMessageError,
    DeviceTopics,
    EndEvent,
    HvacMode,
    HvacState,
    MessageKind,
    ResultStatus,
    SetMode,
    SetpointOffset,
    SetSetpoint,
    ThermostatTelemetry,
    WaterHeaterAction,
    WaterHeaterMode,
    WaterHeaterTelemetry,
    decode_command,
    encode,
)
from unified.model import utcnow

__all__ = [
    "MqttDeviceSimulator",
    "SimDevice",
    "SimThermostat",
    "SimWaterHeater",
    "Tank",
    "ThermalHouse",
]

log = logging.getLogger(__name__)

_MAX_STEP_S: Final = 30.0
_WATER_KWH_PER_L_C: Final = 4.186 / 3600.0  # 1 litre of water, 1 °C, in kWh
_MAX_PENDING_RESULTS: Final = 1000

Clock = Callable[[], float]


# --------------------------------------------------------------------------- physics


@dataclass(slots=True)
class ThermalHouse:
    """One house and its heat pump / air conditioner."""

    rated_kw: float = 3.0
    cop: float = 3.0
    resistance_c_per_kw: float = 2.0
    capacitance_kwh_per_c: float = 2.0
    setpoint_c: float = 22.0
    hysteresis_c: float = 0.5
    outdoor_c: float = 32.0
    indoor_c: float = 22.0
    mode: HvacMode = HvacMode.COOL
    on: bool = False

    @property
    def power_kw(self) -> float:
        return self.rated_kw if self.on and self.mode is not HvacMode.OFF else 0.0

    @property
    def state(self) -> HvacState:
        if self.power_kw == 0:
            return HvacState.IDLE
        return HvacState.COOLING if self.mode is HvacMode.COOL else HvacState.HEATING

    def step(self, dt_s: float, offset_c: float) -> None:
        remaining = dt_s
        while remaining > 0:
            dt = min(remaining, _MAX_STEP_S)
            remaining -= dt
            gain_kw = (self.outdoor_c - self.indoor_c) / self.resistance_c_per_kw
            hvac_kw = self.power_kw * self.cop
            if self.mode is HvacMode.COOL:
                hvac_kw = -hvac_kw
            self.indoor_c += (gain_kw + hvac_kw) * (dt / 3600.0) / self.capacitance_kwh_per_c
            target = self.setpoint_c + offset_c
            if self.mode is HvacMode.COOL:
                if self.indoor_c > target + self.hysteresis_c:
                    self.on = True
                elif self.indoor_c < target - self.hysteresis_c:
                    self.on = False
            elif self.mode is HvacMode.HEAT:
                if self.indoor_c < target - self.hysteresis_c:
                    self.on = True
                elif self.indoor_c > target + self.hysteresis_c:
                    self.on = False
            else:
                self.on = False


@dataclass(slots=True)
class Tank:
    """A fully mixed electric storage water heater."""

    litres: float = 190.0
    element_kw: float = 4.5
    tank_c: float = 50.0
    inlet_c: float = 15.0
    ambient_c: float = 20.0
    loss_kw_per_c: float = 0.002
    setpoint_c: float = 50.0
    deadband_c: float = 3.0
    shed_floor_c: float = 40.0
    load_up_c: float = 60.0
    mode: WaterHeaterMode = WaterHeaterMode.NORMAL
    on: bool = False

    @property
    def power_kw(self) -> float:
        return self.element_kw if self.on else 0.0

    @property
    def _kwh_per_c(self) -> float:
        return self.litres * _WATER_KWH_PER_L_C

    @property
    def energy_capacity_kwh(self) -> float:
        """Storage between the shed floor and the load-up temperature."""
        return self._kwh_per_c * (self.load_up_c - self.shed_floor_c)

    @property
    def energy_take_kwh(self) -> float:
        take = self._kwh_per_c * (self.load_up_c - self.tank_c)
        return max(0.0, min(self.energy_capacity_kwh, take))

    def target(self) -> tuple[float, float]:
        """(switch-on below, switch-off above) for the mode in force."""
        if self.mode is WaterHeaterMode.SHED:
            return self.shed_floor_c, self.shed_floor_c + self.deadband_c
        if self.mode is WaterHeaterMode.LOAD_UP:
            return self.load_up_c - 1.0, self.load_up_c
        return self.setpoint_c - self.deadband_c, self.setpoint_c

    def draw(self, litres: float) -> None:
        """Hot water out, cold water in (mixed at once)."""
        litres = max(0.0, min(litres, self.litres))
        self.tank_c += (self.inlet_c - self.tank_c) * litres / self.litres

    def step(self, dt_s: float) -> None:
        remaining = dt_s
        while remaining > 0:
            dt = min(remaining, _MAX_STEP_S)
            remaining -= dt
            on_below, off_above = self.target()
            if self.tank_c < on_below:
                self.on = True
            elif self.tank_c >= off_above:
                self.on = False
            loss = (self.tank_c - self.ambient_c) * self.loss_kw_per_c
            self.tank_c += (self.power_kw - loss) * (dt / 3600.0) / self._kwh_per_c


# --------------------------------------------------------------------------- device logic


@dataclass(slots=True)
class _Event:
    command_id: str
    body: SetpointOffset | WaterHeaterAction
    until: float
    precondition_until: float = 0.0


@dataclass(slots=True)
class _DeviceLogic:
    """Commands, hold times and overrides, shared by both device kinds (no I/O)."""

    device_id: str
    clock: Clock = time.monotonic
    event: _Event | None = None
    override_until: float = 0.0
    commands_seen: list[DeviceCommandMessage] = field(default_factory=list)

    @property
    def override(self) -> bool:
        return self.clock() < self.override_until

    def _result(
        self, command_id: str, status: ResultStatus, reason: str | None = None
    ) -> CommandResult:
        return CommandResult(
            device_id=self.device_id,
            timestamp=utcnow(),
            command_id=command_id,
            status=status,
            reason=reason,
        )

    def occupant_override(self, duration_s: float) -> CommandResult | None:
        """The occupant takes over: any event ends for good (an ``opted_out`` result)."""
        self.override_until = self.clock() + duration_s
        event, self.event = self.event, None
        if event is None:
            return None
        return self._result(event.command_id, ResultStatus.OPTED_OUT, "occupant override")

    def expire(self) -> CommandResult | None:
        """End an event whose hold ran out (the gateway stopped repeating it)."""
        event = self.event
        if event is not None and self.clock() >= event.until:
            self.event = None
            return self._result(event.command_id, ResultStatus.COMPLETED, "hold expired")
        return None

    def _start(
        self, message: DeviceCommandMessage, body: SetpointOffset | WaterHeaterAction
    ) -> None:
        now = self.clock()
        held = self.event
        if held is not None and held.body == body:
            # The gateway repeating the same instruction renews it; pre-conditioning is not
            # re-run and the event keeps its place.
            held.command_id = message.command_id
            held.until = max(held.until, now + message.hold_s)
            return
        pre = body.precondition_s if isinstance(body, SetpointOffset) else 0.0
        self.event = _Event(
            message.command_id, body, until=now + pre + message.hold_s, precondition_until=now + pre
        )


@dataclass(slots=True)
class SimThermostat(_DeviceLogic):
    house: ThermalHouse = field(default_factory=ThermalHouse)
    min_setpoint_c: float = 16.0
    max_setpoint_c: float = 30.0

    kind: Literal[DeviceKind.THERMOSTAT] = DeviceKind.THERMOSTAT

    @property
    def offset_c(self) -> float:
        event = self.event
        if event is None or not isinstance(event.body, SetpointOffset):
            return 0.0
        if self.clock() < event.precondition_until:
            return event.body.precondition_offset_c
        return event.body.offset_c

    def birth(self) -> Birth:
        return Birth(
            device_id=self.device_id,
            timestamp=utcnow(),
            kind=DeviceKind.THERMOSTAT,
            rated_kw=self.house.rated_kw,
            model="sim-thermostat",
            firmware="1.0",
            min_setpoint_c=self.min_setpoint_c,
            max_setpoint_c=self.max_setpoint_c,
        )

    def telemetry(self) -> ThermostatTelemetry:
        event = self.event
        return ThermostatTelemetry(
            device_id=self.device_id,
            timestamp=utcnow(),
            mode=self.house.mode,
            hvac_state=self.house.state,
            setpoint_c=self.house.setpoint_c,
            offset_c=self.offset_c,
            indoor_c=round(self.house.indoor_c, 3),
            outdoor_c=self.house.outdoor_c,
            power_kw=self.house.power_kw,
            override=self.override,
            command_id=None if event is None else event.command_id,
        )

    def handle(self, message: DeviceCommandMessage) -> CommandResult:
        self.commands_seen.append(message)
        body = message.body
        cid = message.command_id
        if isinstance(body, SetpointOffset):
            if self.override:
                return self._result(cid, ResultStatus.REJECTED, "occupant override")
            for offset in (body.offset_c, body.precondition_offset_c):
                target = self.house.setpoint_c + offset
                if not self.min_setpoint_c <= target <= self.max_setpoint_c:
                    return self._result(cid, ResultStatus.REJECTED, f"{target} °C out of range")
            self._start(message, body)
        elif isinstance(body, EndEvent):
            self.event = None
        elif isinstance(body, SetMode):
            self.house.mode = body.mode
        elif isinstance(body, SetSetpoint):
            if not self.min_setpoint_c <= body.setpoint_c <= self.max_setpoint_c:
                return self._result(cid, ResultStatus.REJECTED, "setpoint out of range")
            self.house.setpoint_c = body.setpoint_c
        else:
            return self._result(cid, ResultStatus.REJECTED, f"unsupported action {body.action}")
        return self._result(cid, ResultStatus.ACCEPTED)

    def occupant_setpoint(self, setpoint_c: float, duration_s: float) -> CommandResult | None:
        """The occupant turns the dial: a new setpoint and an override."""
        self.house.setpoint_c = setpoint_c
        return self.occupant_override(duration_s)

    def step(self, sim_seconds: float) -> None:
        self.house.step(sim_seconds, self.offset_c)

    @property
    def power_kw(self) -> float:
        return self.house.power_kw


@dataclass(slots=True)
class SimWaterHeater(_DeviceLogic):
    tank: Tank = field(default_factory=Tank)
    draw_l_per_h: float = 0.0
    """Mean hot-water use, drawn in random small draws (needs a seeded ``rng``)."""
    rng: random.Random = field(default_factory=random.Random)

    kind: Literal[DeviceKind.WATER_HEATER] = DeviceKind.WATER_HEATER

    def birth(self) -> Birth:
        return Birth(
            device_id=self.device_id,
            timestamp=utcnow(),
            kind=DeviceKind.WATER_HEATER,
            rated_kw=self.tank.element_kw,
            model="sim-water-heater",
            firmware="1.0",
            tank_litres=self.tank.litres,
        )

    def telemetry(self) -> WaterHeaterTelemetry:
        event = self.event
        return WaterHeaterTelemetry(
            device_id=self.device_id,
            timestamp=utcnow(),
            mode=self.tank.mode,
            element_on=self.tank.on,
            tank_c=round(self.tank.tank_c, 3),
            setpoint_c=self.tank.setpoint_c,
            power_kw=self.tank.power_kw,
            energy_take_kwh=round(self.tank.energy_take_kwh, 4),
            energy_capacity_kwh=round(self.tank.energy_capacity_kwh, 4),
            override=self.override,
            command_id=None if event is None else event.command_id,
        )

    def handle(self, message: DeviceCommandMessage) -> CommandResult:
        self.commands_seen.append(message)
        body = message.body
        cid = message.command_id
        if not isinstance(body, WaterHeaterAction):
            return self._result(cid, ResultStatus.REJECTED, f"unsupported action {body.action}")
        if body.mode is WaterHeaterMode.NORMAL:
            self.event = None
        elif self.override:
            return self._result(cid, ResultStatus.REJECTED, "occupant override")
        else:
            self._start(message, body)
        self._sync_mode()
        return self._result(cid, ResultStatus.ACCEPTED)

    def _sync_mode(self) -> None:
        event = self.event
        if event is not None and isinstance(event.body, WaterHeaterAction):
            self.tank.mode = event.body.mode
        else:
            self.tank.mode = WaterHeaterMode.NORMAL

    def step(self, sim_seconds: float) -> None:
        self._sync_mode()
        if self.draw_l_per_h > 0 and sim_seconds > 0:
            # Poisson-ish: expected litres this step, in one draw.
            self.tank.draw(self.rng.expovariate(1.0) * self.draw_l_per_h * sim_seconds / 3600)
        self.tank.step(sim_seconds)

    @property
    def power_kw(self) -> float:
        return self.tank.power_kw


SimDevice = SimThermostat | SimWaterHeater
_D = TypeVar("_D", SimThermostat, SimWaterHeater)


# --------------------------------------------------------------------------- on the broker


class MqttDeviceSimulator(Generic[_D]):
    """One simulated device as its own MQTT client; ``await run()`` until cancelled."""

    def __init__(
        self,
        device: _D,
        *,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        topics: DeviceTopics | None = None,
        protocol: Literal["5", "3.1.1"] = "5",
        report_interval_s: float = 1.0,
        time_scale: float = 1.0,
        tick_s: float = 0.05,
        io_timeout_s: float = 5.0,
        backoff_max_s: float = 2.0,
    ) -> None:
        self.device: _D = device
        self.device_id = device.device_id
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._tls = tls_context
        self.topics = topics or DeviceTopics()
        self._protocol = protocol
        self.report_interval_s = report_interval_s
        self.time_scale = time_scale
        self._tick_s = tick_s
        self._io_timeout_s = io_timeout_s
        self._backoff_max_s = backoff_max_s
        self._outbox: asyncio.Queue[CommandResult] = asyncio.Queue(_MAX_PENDING_RESULTS)
        self.connected = asyncio.Event()
        self.malformed = 0
        self.silent = False
        """Fault injection: stay connected but stop reporting (a stuck device)."""
        self.results: list[CommandResult] = []

    def _topic(self, kind: MessageKind) -> str:
        return self.topics.topic(self.device_id, kind)

    # ------------------------------------------------------------------ test / demo hooks
    def override(self, duration_s: float = 3600.0, setpoint_c: float | None = None) -> None:
        """An occupant override (a thermostat may also get a new setpoint from the occupant)."""
        if isinstance(self.device, SimThermostat) and setpoint_c is not None:
            result = self.device.occupant_setpoint(setpoint_c, duration_s)
        else:
            result = self.device.occupant_override(duration_s)
        if result is not None:
            self._queue(result)

    def _queue(self, result: CommandResult) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(result)

    # ------------------------------------------------------------------ the task
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._physics(), name=f"sim:{self.device_id}:physics")
            tg.create_task(self._connection(), name=f"sim:{self.device_id}:mqtt")
            await wait_inside_task_group()

    async def _physics(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self._tick_s)
            now = time.monotonic()
            expired = self.device.expire()
            if expired is not None:
                self._queue(expired)
            self.device.step((now - last) * self.time_scale)
            last = now

    async def _connection(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
            except (aiomqtt.MqttError, TimeoutError) as exc:
                failures += 1
                if failures == 1:
                    log.info("sim %s: broker lost or refused: %s", self.device_id, exc)
            finally:
                self.connected.clear()
            ceiling = min(self._backoff_max_s, 0.2 * 2 ** min(failures, 10))
            await asyncio.sleep(random.uniform(ceiling / 2, ceiling))

    async def _session(self) -> None:
        offline = Availability(device_id=self.device_id, timestamp=utcnow(), online=False)
        will = aiomqtt.Will(self._topic(MessageKind.AVAILABILITY), encode(offline), 1, True)
        version = (
            aiomqtt.ProtocolVersion.V5 if self._protocol == "5" else aiomqtt.ProtocolVersion.V311
        )
        async with aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            tls_context=self._tls,
            identifier=f"sim-{self.device_id}",
            protocol=version,
            will=will,
            keepalive=10,
            timeout=self._io_timeout_s,
            max_queued_incoming_messages=1000,
        ) as client:
            try:
                async with asyncio.timeout(self._io_timeout_s):
                    await client.subscribe(self._topic(MessageKind.COMMAND), qos=1)
                    await client.publish(
                        self._topic(MessageKind.BIRTH), encode(self.device.birth()), 1, True
                    )
                    online = Availability(device_id=self.device_id, timestamp=utcnow(), online=True)
                    await client.publish(
                        self._topic(MessageKind.AVAILABILITY), encode(online), 1, True
                    )
                raise_if_cancelling()
                self.connected.set()
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._commands(client), name=f"sim:{self.device_id}:commands")
                    tg.create_task(self._report(client), name=f"sim:{self.device_id}:report")
                    tg.create_task(self._results(client), name=f"sim:{self.device_id}:results")
                    await wait_inside_task_group()
            except ExceptionGroup as group:
                # A lost link or a broker that stopped answering: reconnect. Others are bugs.
                lost = [
                    e for e in group.exceptions if isinstance(e, aiomqtt.MqttError | TimeoutError)
                ]
                if len(lost) == len(group.exceptions):
                    raise lost[0] from None
                raise
            except asyncio.CancelledError:
                # A clean stop: say so, as the broker sends the will only for a vanished client.
                await self._say_offline(client)
                raise

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        gone = Availability(device_id=self.device_id, timestamp=utcnow(), online=False)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(1.0):
                await client.publish(
                    self._topic(MessageKind.AVAILABILITY), encode(gone), qos=1, retain=True
                )

    async def _publish(
        self, client: aiomqtt.Client, kind: MessageKind, payload: bytes, qos: int
    ) -> None:
        async with asyncio.timeout(self._io_timeout_s):
            await client.publish(self._topic(kind), payload, qos=qos)
        raise_if_cancelling()

    async def _report(self, client: aiomqtt.Client) -> None:
        while True:
            if not self.silent:
                payload = encode(self.device.telemetry())
                await self._publish(client, MessageKind.TELEMETRY, payload, 0)
            await asyncio.sleep(self.report_interval_s)

    async def _results(self, client: aiomqtt.Client) -> None:
        while True:
            result = await self._outbox.get()
            await self._publish(client, MessageKind.RESULT, encode(result), 1)
            self.results.append(result)

    async def _commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            try:
                command = decode_command(bytes(payload), self.device_id)
            except DeviceMessageError as exc:
                self.malformed += 1
                if self.malformed == 1:
                    log.warning("sim %s: ignoring bad command: %s", self.device_id, exc)
                continue
            result = self.device.handle(command)
            self._queue(result)
            # Report the new state at once rather than at the next report tick.
            await self._publish(client, MessageKind.TELEMETRY, encode(self.device.telemetry()), 0)
