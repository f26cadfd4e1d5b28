"""Thermostats and water heaters that speak MQTT directly (topic scheme: docs/mqtt-devices.md).

One :class:`DeviceMqttLink` (one aiomqtt client) serves every MQTT device of a gateway: it
subscribes once per message kind with a wildcard (``{root}/+/telemetry`` ...), keeps the latest
birth, availability and telemetry of each device it knows, and routes command results to the
adapter waiting for them. Per-device adapters (:class:`MqttThermostat`,
:class:`MqttWaterHeater`) implement :class:`gateway.devices.DeviceAdapter` over it, so the
supervisor and the planner drive them like any battery:

* The planner sees a device that idles at 0 kW: a setpoint ``power_kw`` is a *change from the
  device's baseline* (negative sheds). ``max_discharge_kw`` is the load it can shed (its rated
  power while it can run), ``soc_pct`` is its comfort headroom: for a thermostat the share of the
  customer's comfort band still between the indoor temperature and the band's edge, for a water
  heater the stored energy (CTA-2045 energy take vs. capacity). The planner's reserve / max-SoC
  rules therefore limit what it asks of a house that is already warm or a tank that is cold.
* ``apply`` turns a setpoint into one device action (a setpoint offset inside the comfort band,
  or shed / load-up / normal), publishes it with a hold time (the device reverts by itself if the
  gateway stops repeating it) and waits for the device's result: ``rejected`` raises
  :class:`DeviceRejected`.
* An occupant override while an event is in force ends the device's participation. The device
  publishes an ``opted_out`` result and sets ``override`` in its telemetry. The adapter then
  (1) calls ``on_opt_out(command, DeviceRejected)`` at once (wire it to
  ``Gateway.report_refusal`` so the command is re-allocated), (2) reports ``soc_pct=None`` while
  the override lasts (the planner commits nothing to it) and (3) raises :class:`DeviceRejected`
  from ``apply`` for any new shed or load-up until the override ends.
* ``read`` returns the latest telemetry; none yet, or older than ``stale_after_s``, or the device
  offline (its last will) raises :class:`DeviceUnavailable`.

Bad input (malformed JSON, values out of range, a payload naming another device, topics of
devices nobody configured) is logged once per device and reason and dropped; nothing of it
reaches an adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, Protocol

import aiomqtt
from pydantic import Field, model_validator

from adapters.broker_security import (
    BrokerLogin,
    Credentials,
    CredentialsRotated,
    CredentialsUnavailable,
    raise_session_end,
    watch_rotation,
)
from gateway.aio import raise_if_cancelling, wait_inside_task_group
from gateway.devices import (
    AdapterError,
    DeviceRejected,
    DeviceUnavailable,
    UnsafeCommand,
)
from gateway.quota import Quotas
from protocols.mqtt.devices import (
    DEFAULT_ROOT,
    DEVICE_TO_GATEWAY,
    Birth,
    CommandResult,
    DeviceCommandMessage,
    DeviceKind,
    DeviceMessageError,
    DeviceTopics,
    EndEvent,
    HvacMode,
    MessageKind,
    ResultStatus,
    SetMode,
    SetpointOffset,
    SetSetpoint,
    ThermostatTelemetry,
    WaterHeaterAction,
    WaterHeaterMode,
    WaterHeaterTelemetry,
    decode_availability,
    decode_birth,
    decode_result,
    decode_telemetry,
    encode,
)
from unified.config import Section
from unified.model import BatteryRatings, DerClass, DeviceCommand, DeviceState, utcnow
from unified.registry import PendingEnrolment

__all__ = [
    "RATING_TOLERANCE",
    "DeviceMqttConfig",
    "DeviceMqttLink",
    "LinkDown",
    "MqttDeviceSettings",
    "MqttThermostat",
    "MqttWaterHeater",
    "OptOutListener",
    "build_mqtt_adapter",
    "offset_for_change",
    "offset_range",
    "worth_an_offset",
]

log = logging.getLogger(__name__)

#: As for the other adapters: allocation rounding may exceed a rating by 1 %.
RATING_TOLERANCE: Final = 0.01
_MAX_LOGGED_KEYS: Final = 10_000

OptOutListener = Callable[[DeviceCommand, AdapterError], None]


# --------------------------------------------------------------------------- configuration


class DeviceMqttConfig(BrokerLogin):
    """The broker the devices use (``[device_mqtt]``); often not the Grid DERMS broker. The
    gateway's login on it (password source, TLS, rotation) is :class:`BrokerLogin`'s."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535, description="Usually 8883 with TLS")
    client_id: str | None = Field(default=None, max_length=128)
    protocol: Literal["5", "3.1.1"] = Field(
        default="3.1.1",
        description=(
            "The gateway's own session on the device broker (devices choose theirs). It uses "
            "no MQTT 5 feature, and 3.1.1 spares paho a properties object per message (~20 % "
            "of the link's CPU per message, bench.mqtt_devices)"
        ),
    )
    topic_root: str = DEFAULT_ROOT
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    io_timeout_s: float = Field(default=5.0, gt=0, le=60)
    backoff_initial_s: float = Field(default=0.5, gt=0, le=60)
    backoff_max_s: float = Field(default=30.0, gt=0, le=600)
    max_queued_incoming: int = Field(
        default=50_000,
        ge=100,
        description="aiomqtt's inbound queue; beyond it messages are dropped (telemetry first)",
    )
    messages_per_device_per_s: float = Field(
        default=20.0,
        gt=0,
        le=10_000,
        description="Messages one device may send per second on average (real ones send one "
        "every few seconds); beyond it and the burst, its messages are dropped and counted",
    )
    messages_per_device_burst: int = Field(
        default=100, ge=1, le=100_000, description="Messages one device may send at once"
    )
    max_publishes_in_flight: int = Field(
        default=64,
        ge=1,
        le=65_535,
        description="Commands handed to the MQTT client at once; the rest of a fan-out waits",
    )


class MqttDeviceSettings(Section):
    """Per device (``[devices.mqtt]``): timing, and the customer's comfort band."""

    stale_after_s: float = Field(default=60.0, gt=0, le=3600)
    hold_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="The device reverts to normal unless a command is repeated within this",
    )
    result_timeout_s: float = Field(default=3.0, gt=0, le=60)
    connect_wait_s: float = Field(
        default=2.0, ge=0, le=60, description="How long connect() waits for the first telemetry"
    )
    comfort_min_c: float = Field(default=20.0, ge=5, le=35)
    comfort_max_c: float = Field(default=26.0, ge=5, le=35)
    max_offset_c: float = Field(default=4.0, gt=0, le=10)
    min_offset_c: float = Field(
        default=0.3, ge=0, le=5, description="Smaller offsets are not worth an event"
    )
    thermal_capacity_kwh: float | None = Field(
        default=None,
        gt=0,
        description="Electric energy the comfort band stores; None: one hour at rated power",
    )
    hold_lead_c: float = Field(
        default=1.0,
        gt=0,
        le=5,
        description="Thermostat: how far ahead of the room a shed keeps the setpoint (°C)",
    )
    # 5 %: the planner asks a water heater held off for its whole expected draw (its baseline,
    # 0.3-0.6 kW for a 4.5 kW element in the afternoon); at 10 % half the heaters called ignored it.
    deadband_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Water heater: |request| below this share of rated"
    )

    @model_validator(mode="after")
    def _band(self) -> MqttDeviceSettings:
        if self.comfort_min_c >= self.comfort_max_c:
            raise ValueError("comfort_min_c must be below comfort_max_c")
        return self


# --------------------------------------------------------------------------- the link


class LinkDown(Exception):
    """The device broker cannot be reached right now."""


class _Endpoint(Protocol):
    @property
    def device_id(self) -> str: ...

    def deliver(self, kind: MessageKind, payload: bytes) -> None:
        """Decode and take one message; raises DeviceMessageError for bad input."""


@dataclass(slots=True)
class LinkStats:
    received: int = 0
    dropped_unknown: int = 0
    dropped_invalid: int = 0
    dropped_over_quota: int = 0
    published: int = 0


class _LogOnce:
    """Remember what was already logged, so a device spamming garbage costs one log line."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, ...]] = set()

    def warn(self, key: tuple[str, ...], message: str, *args: object) -> None:
        if key in self._seen:
            return
        if len(self._seen) >= _MAX_LOGGED_KEYS:
            return
        self._seen.add(key)
        log.warning(message, *args)


_MAX_UNKNOWN: Final = 10_000
"""Unknown devices whose last messages the link keeps (for when they are enrolled)."""

_ADAPTER_OF: Final = {
    DeviceKind.THERMOSTAT: ("mqtt_thermostat", DerClass.THERMOSTAT),
    DeviceKind.WATER_HEATER: ("mqtt_water_heater", DerClass.WATER_HEATER),
}


def pending_from_birth(birth: Birth) -> PendingEnrolment:
    """What an unknown device's birth says of it, as a pending enrolment: its class, adapter
    and rating (a thermal load stores about an hour of its rated power)."""
    adapter, der_class = _ADAPTER_OF[birth.kind]
    kw = birth.rated_kw
    return PendingEnrolment(
        device_id=birth.device_id,
        der_class=der_class,
        adapter=adapter,
        ratings=BatteryRatings(max_charge_kw=kw, max_discharge_kw=kw, capacity_kwh=kw),
        seen_at=birth.timestamp,
        source="mqtt birth",
        description=f"{birth.model} {birth.firmware}".strip()[:256],
    )


class DeviceMqttLink:
    """One MQTT session for every MQTT device; ``await run()`` until cancelled.

    A device nobody attached is not served, but its last birth, availability and telemetry are
    kept (for up to 10,000 such devices) and handed to its adapter when it is attached: an
    approved device does not wait for its next retained birth. Its birth goes to
    ``on_unknown_birth`` (a pending enrolment)."""

    def __init__(self, config: DeviceMqttConfig, *, name: str = "gateway") -> None:
        self.config = config
        self.topics = DeviceTopics(config.topic_root)
        self.name = name
        self._endpoints: dict[str, _Endpoint] = {}
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.stats = LinkStats()
        self._log = _LogOnce()
        self._quotas = Quotas(config.messages_per_device_per_s, config.messages_per_device_burst)
        # aiomqtt scans every pending call on each publish: a fan-out of N unbounded publishes
        # costs O(N^2). Bounded, it costs O(N) and the broker sees the same stream.
        self._in_flight = asyncio.Semaphore(config.max_publishes_in_flight)
        self._unknown: dict[str, dict[MessageKind, bytes]] = {}
        self.on_unknown_birth: Callable[[Birth], None] | None = None
        """Told of each valid birth from a device no adapter is attached for."""

    # ------------------------------------------------------------------ fan-out
    def attach(self, endpoint: _Endpoint) -> None:
        if endpoint.device_id in self._endpoints:
            raise ValueError(f"device {endpoint.device_id!r} is already attached")
        self._endpoints[endpoint.device_id] = endpoint
        for kind, payload in self._unknown.pop(endpoint.device_id, {}).items():
            with contextlib.suppress(DeviceMessageError):
                endpoint.deliver(kind, payload)

    def detach(self, device_id: str) -> None:
        self._endpoints.pop(device_id, None)
        self._quotas.forget(device_id)

    def route(self, topic: str, payload: bytes) -> None:
        """Hand one inbound message to its device's adapter (synchronous: no awaits)."""
        self.stats.received += 1
        parsed = self.topics.parse(topic)
        if parsed is None or parsed[1] not in DEVICE_TO_GATEWAY:
            self.stats.dropped_unknown += 1
            self._log.warn(("topic", topic), "device link: ignoring topic %s", topic)
            return
        device_id, kind = parsed
        endpoint = self._endpoints.get(device_id)
        if endpoint is None:
            self.stats.dropped_unknown += 1
            self._unknown_device(device_id, kind, payload)
            return
        if not self._quotas.take(device_id, time.monotonic()):
            # A device sending far more than any real one does (a firmware loop, or someone
            # with its credentials): its excess is not decoded, so it cannot crowd out the rest.
            self.stats.dropped_over_quota += 1
            self._log.warn(
                ("quota", device_id),
                "device %s: more than %g messages/s (burst %d); the excess is dropped and "
                "counted, further ones silently",
                device_id,
                self._quotas.rate_per_s,
                self._quotas.burst,
            )
            return
        try:
            endpoint.deliver(kind, payload)
        except DeviceMessageError as exc:
            self.stats.dropped_invalid += 1
            self._log.warn(
                ("invalid", device_id, kind.value, exc.reason),
                "device %s: dropping %s message (%s); further ones are dropped silently: %s",
                device_id,
                kind.value,
                exc.reason,
                exc.detail[:300],
            )

    def _unknown_device(self, device_id: str, kind: MessageKind, payload: bytes) -> None:
        self._log.warn(
            ("unknown", device_id),
            "device link: ignoring unknown device %r (until it is enrolled)",
            device_id,
        )
        if not self._quotas.take(device_id, time.monotonic()):
            return
        if kind not in (MessageKind.BIRTH, MessageKind.AVAILABILITY, MessageKind.TELEMETRY):
            return
        kept = self._unknown.get(device_id)
        if kept is None:
            if len(self._unknown) >= _MAX_UNKNOWN:
                return
            kept = self._unknown[device_id] = {}
        kept[kind] = payload
        if kind is not MessageKind.BIRTH:
            return
        try:
            birth = decode_birth(payload, device_id)
        except DeviceMessageError as exc:
            self._log.warn(
                ("bad birth", device_id), "device link: unknown device %r, bad birth", device_id
            )
            del kept[kind]
            log.debug("%s", exc)
            return
        self._log.warn(
            ("announced", device_id),
            "device link: unknown device %r announced itself (pending enrolment)",
            device_id,
        )
        if self.on_unknown_birth is not None:
            self.on_unknown_birth(birth)

    # ------------------------------------------------------------------ outbound
    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        client = self._client
        if client is None or not self.connected.is_set():
            raise LinkDown("device broker not connected")
        try:
            async with asyncio.timeout(self.config.io_timeout_s), self._in_flight:
                await client.publish(topic, payload, qos=qos)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise LinkDown(f"publish to {topic} failed: {exc}") from exc
        raise_if_cancelling()
        self.stats.published += 1

    # ------------------------------------------------------------------ the task
    async def run(self) -> None:
        for warning in self.config.warnings("device_mqtt", self.config.host):
            log.warning("%s", warning)
        failures = 0
        while True:
            raise_if_cancelling()
            try:
                await self._session()
                failures = 0
            except CredentialsRotated as rotated:
                log.info(
                    "%s changed: reconnecting to the device broker %s:%d with the new files",
                    ", ".join(rotated.settings),
                    *self._where(),
                )
                failures = 0
            except (aiomqtt.MqttError, TimeoutError, CredentialsUnavailable) as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "device broker %s:%d lost, refused or not answering: %r; retrying",
                        self.config.host,
                        self.config.port,
                        exc,
                    )
            finally:
                self.connected.clear()
                self._client = None
            ceiling = min(
                self.config.backoff_max_s,
                self.config.backoff_initial_s * 2 ** min(max(failures - 1, 0), 16),
            )
            # Full jitter: a broker restart must not bring every gateway back in one burst.
            await asyncio.sleep(random.uniform(0.5 * ceiling, ceiling) if failures else 0.1)

    def _client_kwargs(self, credentials: Credentials) -> dict[str, object]:
        cfg = self.config
        kwargs: dict[str, object] = {
            "hostname": cfg.host,
            "port": cfg.port,
            **credentials.client_kwargs(),
            "identifier": cfg.client_id or f"derms-devices-{self.name}-{secrets.token_hex(3)}",
            "keepalive": cfg.keepalive_s,
            "timeout": cfg.connect_timeout_s,
            "max_queued_incoming_messages": cfg.max_queued_incoming,
        }
        if cfg.protocol == "5":
            kwargs["protocol"] = aiomqtt.ProtocolVersion.V5
        else:
            kwargs |= {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": True}
        return kwargs

    async def _session(self) -> None:
        # Read now, not at start-up: a rotated password or certificate is used on reconnect.
        credentials = await asyncio.to_thread(self.config.credentials, "device_mqtt")
        kwargs = self._client_kwargs(credentials)
        async with aiomqtt.Client(**kwargs) as client:  # type: ignore[arg-type]
            # aiomqtt logs a warning for every publish past 10 in flight (with a stack walk
            # per record); a dispatch fanning out to a thousand devices is normal here.
            client.pending_calls_threshold = 1_000_000
            wanted = [(self.topics.wildcard(kind), 1) for kind in DEVICE_TO_GATEWAY]
            async with asyncio.timeout(self.config.io_timeout_s):
                granted = await client.subscribe(wanted)
            raise_if_cancelling()
            refused = [t for (t, _), code in zip(wanted, granted, strict=False) if _failed(code)]
            if refused:
                log.error("device broker refused subscriptions %s: check the ACL", refused)
            self._client = client
            self.connected.set()
            log.info("device link up: %s:%d under %s/", *self._where(), self.topics.root)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._receive(client), name=f"device-link:{self.name}:receive")
                    tg.create_task(
                        watch_rotation(credentials.stamps, self.config.rotation_check_s),
                        name=f"device-link:{self.name}:rotation",
                    )
                    await wait_inside_task_group()
            except ExceptionGroup as group:
                raise_session_end(group, aiomqtt.MqttError)

    def _where(self) -> tuple[str, int]:
        return self.config.host, self.config.port

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            self.route(str(message.topic), data)


def _failed(code: object) -> bool:
    value = getattr(code, "value", code)
    return isinstance(value, int) and value >= 0x80


# --------------------------------------------------------------------------- adapters


@dataclass(slots=True)
class _Seen:
    """What the link last received from one device, and when (monotonic)."""

    birth: Birth | None = None
    online: bool | None = None
    telemetry: ThermostatTelemetry | WaterHeaterTelemetry | None = None
    telemetry_at: float = 0.0
    telemetry_utc: datetime | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class _Sent:
    message: DeviceCommandMessage
    command: DeviceCommand | None


@dataclass(frozen=True, slots=True)
class OptOut:
    device_command_id: str
    command: DeviceCommand | None
    reason: str
    at: datetime


_ids = itertools.count(1)


class _MqttDevice:
    """What thermostats and water heaters share: state from the link, commands with results."""

    kind: DeviceKind
    telemetry_type: type[ThermostatTelemetry | WaterHeaterTelemetry]

    def __init__(
        self,
        device_id: str,
        link: DeviceMqttLink,
        settings: MqttDeviceSettings | None = None,
        *,
        on_opt_out: OptOutListener | None = None,
    ) -> None:
        self._device_id = device_id
        self._link = link
        self.settings = settings or MqttDeviceSettings()
        self.on_opt_out = on_opt_out
        self._seen = _Seen()
        self._pending: dict[str, asyncio.Future[CommandResult]] = {}
        self._active: _Sent | None = None
        self.opt_outs: list[OptOut] = []
        link.attach(self)

    # ------------------------------------------------------------------ identity
    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def source(self) -> str:
        return f"mqtt:{self._link.topics.root}/{self._device_id}"

    @property
    def stale_after_s(self) -> float:
        return self.settings.stale_after_s

    @property
    def hold_s(self) -> float:
        """Every command carries this hold time and lapses by itself
        (:class:`gateway.devices.CommandsLapse`), so a (re)connect needs no release."""
        return self.settings.hold_s

    @property
    def birth(self) -> Birth | None:
        return self._seen.birth

    @property
    def override_active(self) -> bool:
        telemetry = self._seen.telemetry
        return telemetry is not None and telemetry.override

    # ------------------------------------------------------------------ inbound (from the link)
    def deliver(self, kind: MessageKind, payload: bytes) -> None:
        seen = self._seen
        if kind is MessageKind.TELEMETRY:
            telemetry = decode_telemetry(payload, self._device_id)
            if not isinstance(telemetry, self.telemetry_type):
                raise DeviceMessageError("schema_violation", f"{telemetry.type} telemetry")
            last = seen.telemetry
            if last is not None and telemetry.timestamp < last.timestamp:
                return  # late duplicate after a reconnect: the newer one stands
            seen.telemetry = telemetry
            seen.telemetry_at = time.monotonic()
            seen.telemetry_utc = utcnow()
            seen.arrived.set()
        elif kind is MessageKind.BIRTH:
            birth = decode_birth(payload, self._device_id)
            if birth.kind is not self.kind:
                raise DeviceMessageError("schema_violation", f"birth says {birth.kind.value}")
            seen.birth = birth
        elif kind is MessageKind.AVAILABILITY:
            seen.online = decode_availability(payload, self._device_id).online
            if not seen.online:
                seen.arrived.clear()
        elif kind is MessageKind.RESULT:
            self._on_result(decode_result(payload, self._device_id))

    def _on_result(self, result: CommandResult) -> None:
        future = self._pending.get(result.command_id)
        if future is not None and not future.done() and result.status is not ResultStatus.OPTED_OUT:
            future.set_result(result)
            return
        if result.status is ResultStatus.OPTED_OUT:
            active = self._active
            command = active.command if active is not None else None
            self._active = None
            opt_out = OptOut(result.command_id, command, result.reason or "override", utcnow())
            self.opt_outs.append(opt_out)
            log.info("device %s opted out: %s", self._device_id, opt_out.reason)
            if self.on_opt_out is not None and command is not None:
                error = DeviceRejected(self._device_id, f"opted out: {opt_out.reason}")
                self.on_opt_out(command, error)
        elif (
            result.status is ResultStatus.COMPLETED
            and self._active is not None
            and self._active.message.command_id == result.command_id
        ):
            self._active = None

    # ------------------------------------------------------------------ DeviceAdapter
    async def connect(self) -> None:
        """Succeeds once the link is up and the device has a birth and fresh telemetry."""
        wait = self.settings.connect_wait_s
        try:
            async with asyncio.timeout(wait):
                await self._link.connected.wait()
                await self._seen.arrived.wait()
        except TimeoutError:
            pass
        await asyncio.sleep(0)
        self._fresh()

    def retire(self) -> None:
        """Its device was retired: the link forgets it (it may be enrolled again)."""
        self._link.detach(self._device_id)

    async def close(self) -> None:
        """The link is shared and stays up: nothing to release.

        Pending results are left to their own timeouts (the supervisor never closes while an
        ``apply`` of the same adapter runs); cancelling their futures would look like a
        cancellation of the waiting task.
        """
        await asyncio.sleep(0)

    async def read(self) -> DeviceState:
        await asyncio.sleep(0)  # the supervisor needs a yield point in every call
        birth, telemetry, at = self._fresh()
        return self._state(birth, telemetry, at)

    def _fresh(self) -> tuple[Birth, ThermostatTelemetry | WaterHeaterTelemetry, datetime]:
        seen = self._seen
        if not self._link.connected.is_set():
            raise DeviceUnavailable(self._device_id, "device broker not connected")
        if seen.online is False:
            raise DeviceUnavailable(self._device_id, "offline (last will or clean disconnect)")
        if seen.birth is None:
            raise DeviceUnavailable(self._device_id, "no birth message yet")
        if seen.telemetry is None or seen.telemetry_utc is None:
            raise DeviceUnavailable(self._device_id, "no telemetry yet")
        age = time.monotonic() - seen.telemetry_at
        if age > self.settings.stale_after_s:
            raise DeviceUnavailable(self._device_id, f"telemetry is {age:.0f} s old")
        return seen.birth, seen.telemetry, seen.telemetry_utc

    def _state(
        self, birth: Birth, telemetry: ThermostatTelemetry | WaterHeaterTelemetry, at: datetime
    ) -> DeviceState:
        raise NotImplementedError

    async def apply(self, command: DeviceCommand) -> None:
        if command.device_id != self._device_id:
            raise UnsafeCommand(self._device_id, f"command is for {command.device_id}")
        birth, telemetry, _ = self._fresh()
        if command.power_kw is not None:
            if not math.isfinite(command.power_kw):
                raise UnsafeCommand(self._device_id, f"setpoint {command.power_kw} kW")
            if abs(command.power_kw) > birth.rated_kw * (1 + RATING_TOLERANCE):
                raise UnsafeCommand(
                    self._device_id,
                    f"{command.power_kw} kW beyond the {birth.rated_kw} kW rating",
                )
        body = self._action_for(command, birth, telemetry)
        await self._send(body, command)

    def _action_for(
        self,
        command: DeviceCommand,
        birth: Birth,
        telemetry: ThermostatTelemetry | WaterHeaterTelemetry,
    ) -> SetMode | SetSetpoint | SetpointOffset | EndEvent | WaterHeaterAction:
        raise NotImplementedError

    def _refuse_if_overridden(self) -> None:
        if self.override_active:
            raise DeviceRejected(self._device_id, "occupant override in force")

    async def _send(
        self,
        body: SetMode | SetSetpoint | SetpointOffset | EndEvent | WaterHeaterAction,
        command: DeviceCommand | None,
        *,
        hold_s: float | None = None,
    ) -> CommandResult:
        message = DeviceCommandMessage(
            command_id=f"gw{next(_ids)}-{secrets.token_hex(4)}",
            device_id=self._device_id,
            issued_at=utcnow(),
            hold_s=hold_s or self.settings.hold_s,
            body=body,
        )
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._pending[message.command_id] = future
        try:
            try:
                await self._link.publish(
                    self._link.topics.topic(self._device_id, MessageKind.COMMAND), encode(message)
                )
            except LinkDown as exc:
                raise DeviceUnavailable(self._device_id, str(exc)) from exc
            try:
                async with asyncio.timeout(self.settings.result_timeout_s):
                    result = await future
            except TimeoutError:
                raise DeviceUnavailable(
                    self._device_id, f"no result within {self.settings.result_timeout_s} s"
                ) from None
        finally:
            self._pending.pop(message.command_id, None)
        if result.status is ResultStatus.REJECTED:
            raise DeviceRejected(self._device_id, result.reason or "rejected")
        releases = isinstance(body, EndEvent) or (
            isinstance(body, WaterHeaterAction) and body.mode is WaterHeaterMode.NORMAL
        )
        self._active = None if releases else _Sent(message, command)
        return result


def worth_an_offset(power_kw: float, rated_kw: float, settings: MqttDeviceSettings) -> bool:
    """Whether a change of ``power_kw`` from baseline is worth a setpoint offset at all."""
    fraction = min(1.0, abs(power_kw) / rated_kw)
    return fraction * settings.max_offset_c >= settings.min_offset_c


def offset_range(
    setpoint_c: float, mode: HvacMode, settings: MqttDeviceSettings
) -> tuple[float, float]:
    """(shed, absorb) offsets the comfort band allows from ``setpoint_c``; the sign follows the
    mode (a cooling shed raises the setpoint, a heating one lowers it)."""
    s = settings
    if mode is HvacMode.HEAT:
        shed = -min(s.max_offset_c, max(0.0, setpoint_c - s.comfort_min_c))
        absorb = min(s.max_offset_c, max(0.0, s.comfort_max_c - setpoint_c))
    else:
        shed = min(s.max_offset_c, max(0.0, s.comfort_max_c - setpoint_c))
        absorb = -min(s.max_offset_c, max(0.0, setpoint_c - s.comfort_min_c))
    return shed, absorb


def offset_for_change(
    power_kw: float,
    rated_kw: float,
    room_c: float,
    settings: MqttDeviceSettings,
    indoor_minus_setpoint_c: float,
) -> float:
    """The setpoint offset (°C, signed like ``room_c``) for a change of ``power_kw`` from the
    baseline.

    A compressor is on or off, so a house called to shed is *held off* for its turn: the
    setpoint is kept ``hold_lead_c`` ahead of the room, in the direction of ``room_c`` (up for a
    cooling shed, down for a heating one), within the comfort band's ``room_c``. The supervisor
    re-applies the command every ``refresh_s``, so the offset follows the room up as it warms
    and the compressor stays off until the band is spent. A load
    up (pre-cooling) is held on the same way. The planner calls houses in turns and closes the
    loop on what they measure (``gateway.dispatch``, ``gateway.delivery``); a house need only
    do reliably what one house can: stop, or run.
    """
    direction = math.copysign(1.0, room_c)
    wanted = direction * indoor_minus_setpoint_c + settings.hold_lead_c
    offset = direction * round(min(abs(room_c), max(0.0, wanted)), 1)
    if abs(offset) < settings.min_offset_c:
        # A small request that rounds below the smallest worthwhile offset (the band has room
        # for it): the smallest offset, not a refusal that would exclude the house.
        offset = math.copysign(settings.min_offset_c, room_c)
    return offset


class MqttThermostat(_MqttDevice):
    """:class:`gateway.devices.DeviceAdapter` for an MQTT thermostat (cooling or heating)."""

    kind = DeviceKind.THERMOSTAT
    telemetry_type = ThermostatTelemetry

    def comfort_headroom_pct(self, telemetry: ThermostatTelemetry) -> float:
        """Share of the comfort band left to spend on a shed (cooling: room below the top)."""
        s = self.settings
        band = s.comfort_max_c - s.comfort_min_c
        if telemetry.mode is HvacMode.HEAT:
            room = telemetry.indoor_c - s.comfort_min_c
        else:
            room = s.comfort_max_c - telemetry.indoor_c
        return max(0.0, min(100.0, 100.0 * room / band))

    def _state(
        self, birth: Birth, telemetry: ThermostatTelemetry | WaterHeaterTelemetry, at: datetime
    ) -> DeviceState:
        assert isinstance(telemetry, ThermostatTelemetry)
        runs = telemetry.mode is not HvacMode.OFF
        capacity = self.settings.thermal_capacity_kwh or birth.rated_kw
        active = self._active
        return DeviceState(
            device_id=self._device_id,
            timestamp=at,
            power_kw=telemetry.power_kw,
            soc_pct=None if telemetry.override else self.comfort_headroom_pct(telemetry),
            capacity_kwh=capacity,
            max_charge_kw=birth.rated_kw if runs else 0.0,
            max_discharge_kw=birth.rated_kw if runs else 0.0,
            setpoint_kw=None
            if active is None or active.command is None
            else active.command.power_kw,
            source=self.source,
        )

    def offset_range(self, telemetry: ThermostatTelemetry) -> tuple[float, float]:
        """(shed, absorb) offsets allowed by the comfort band; the sign follows the mode."""
        return offset_range(telemetry.setpoint_c, telemetry.mode, self.settings)

    def _action_for(
        self,
        command: DeviceCommand,
        birth: Birth,
        telemetry: ThermostatTelemetry | WaterHeaterTelemetry,
    ) -> SetMode | SetSetpoint | SetpointOffset | EndEvent | WaterHeaterAction:
        assert isinstance(telemetry, ThermostatTelemetry)
        power = command.power_kw
        if power is None:
            limit = command.import_limit_kw
            if limit is None or limit >= birth.rated_kw:
                return EndEvent()
            power = -birth.rated_kw  # an on/off compressor only fits under the cap when off
        if not worth_an_offset(power, birth.rated_kw, self.settings):
            return EndEvent()
        self._refuse_if_overridden()
        active = self._active
        if (
            command.provenance
            and command.provenance[0].kind == "release"
            and active is not None
            and isinstance(active.message.body, SetpointOffset)
        ):
            # Waiting for its turn to be released after the event: the house stays where it is
            # (its setpoint no longer follows the room up), so it stores no more heat to pay back.
            return SetpointOffset(offset_c=active.message.body.offset_c)
        if telemetry.mode is HvacMode.OFF:
            raise DeviceRejected(self._device_id, "HVAC is off: no load to shift")
        shed, absorb = self.offset_range(telemetry)
        room = shed if power < 0 else absorb
        if abs(room) < self.settings.min_offset_c:
            raise DeviceRejected(self._device_id, "setpoint already at the edge of comfort band")
        offset = offset_for_change(
            power, birth.rated_kw, room, self.settings, telemetry.indoor_c - telemetry.setpoint_c
        )
        return SetpointOffset(offset_c=offset)

    async def setpoint_event(
        self,
        offset_c: float,
        *,
        precondition_offset_c: float = 0.0,
        precondition_s: float = 0.0,
        hold_s: float | None = None,
    ) -> CommandResult:
        """A program's setpoint-offset event with optional pre-conditioning, kept inside the
        customer's comfort band (raises :class:`UnsafeCommand` otherwise)."""
        _, telemetry, _ = self._fresh()
        assert isinstance(telemetry, ThermostatTelemetry)
        self._refuse_if_overridden()
        s = self.settings
        for offset in (offset_c, precondition_offset_c):
            target = telemetry.setpoint_c + offset
            if not s.comfort_min_c - 1e-6 <= target <= s.comfort_max_c + 1e-6:
                raise UnsafeCommand(
                    self._device_id,
                    f"offset {offset:+.1f} °C leaves the comfort band "
                    f"[{s.comfort_min_c}, {s.comfort_max_c}] °C",
                )
        body = SetpointOffset(
            offset_c=offset_c,
            precondition_offset_c=precondition_offset_c,
            precondition_s=precondition_s,
        )
        return await self._send(body, None, hold_s=(hold_s or s.hold_s) + precondition_s)

    async def set_mode(self, mode: HvacMode) -> CommandResult:
        return await self._send(SetMode(mode=mode), None)

    async def set_setpoint(self, setpoint_c: float) -> CommandResult:
        s = self.settings
        if not s.comfort_min_c <= setpoint_c <= s.comfort_max_c:
            raise UnsafeCommand(self._device_id, f"setpoint {setpoint_c} °C outside comfort band")
        return await self._send(SetSetpoint(setpoint_c=setpoint_c), None)


class MqttWaterHeater(_MqttDevice):
    """:class:`gateway.devices.DeviceAdapter` for a water heater with CTA-2045 style modes."""

    kind = DeviceKind.WATER_HEATER
    telemetry_type = WaterHeaterTelemetry

    def _state(
        self, birth: Birth, telemetry: ThermostatTelemetry | WaterHeaterTelemetry, at: datetime
    ) -> DeviceState:
        assert isinstance(telemetry, WaterHeaterTelemetry)
        stored = 1.0 - telemetry.energy_take_kwh / telemetry.energy_capacity_kwh
        active = self._active
        return DeviceState(
            device_id=self._device_id,
            timestamp=at,
            power_kw=telemetry.power_kw,
            soc_pct=None if telemetry.override else max(0.0, min(100.0, 100.0 * stored)),
            capacity_kwh=telemetry.energy_capacity_kwh,
            max_charge_kw=birth.rated_kw,
            max_discharge_kw=birth.rated_kw,
            setpoint_kw=None
            if active is None or active.command is None
            else active.command.power_kw,
            source=self.source,
        )

    def _action_for(
        self,
        command: DeviceCommand,
        birth: Birth,
        telemetry: ThermostatTelemetry | WaterHeaterTelemetry,
    ) -> SetMode | SetSetpoint | SetpointOffset | EndEvent | WaterHeaterAction:
        power = command.power_kw
        if power is None:
            limit = command.import_limit_kw
            if limit is None or limit >= birth.rated_kw:
                return WaterHeaterAction(mode=WaterHeaterMode.NORMAL)
            power = -birth.rated_kw  # the element is on/off: under the cap means off
        if abs(power) < self.settings.deadband_fraction * birth.rated_kw:
            return WaterHeaterAction(mode=WaterHeaterMode.NORMAL)
        self._refuse_if_overridden()
        mode = WaterHeaterMode.SHED if power < 0 else WaterHeaterMode.LOAD_UP
        return WaterHeaterAction(mode=mode)

    async def shed(self) -> CommandResult:
        return await self._send(WaterHeaterAction(mode=WaterHeaterMode.SHED), None)

    async def load_up(self) -> CommandResult:
        return await self._send(WaterHeaterAction(mode=WaterHeaterMode.LOAD_UP), None)

    async def normal(self) -> CommandResult:
        return await self._send(WaterHeaterAction(mode=WaterHeaterMode.NORMAL), None)


def build_mqtt_adapter(
    adapter: Literal["mqtt_thermostat", "mqtt_water_heater"],
    device_id: str,
    link: DeviceMqttLink,
    settings: MqttDeviceSettings | None = None,
    *,
    on_opt_out: OptOutListener | None = None,
) -> MqttThermostat | MqttWaterHeater:
    """What ``composition.app.build_adapters`` calls for ``adapter = "mqtt_thermostat"`` etc."""
    cls = MqttThermostat if adapter == "mqtt_thermostat" else MqttWaterHeater
    return cls(device_id, link, settings, on_opt_out=on_opt_out)
