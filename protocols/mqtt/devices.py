"""Topics and JSON payloads for devices that speak MQTT directly (pure, no I/O).

Thermostats and water heaters each own a subtree ``{root}/{device_id}/``::

    birth         device → gateway   QoS 1, retained   what the device is (kind, ratings)
    availability  device → gateway   QoS 1, retained   online / offline (offline is the last will)
    telemetry     device → gateway   QoS 0             latest measured state
    command       gateway → device   QoS 1             one action, with a hold time
    result        device → gateway   QoS 1             accepted / rejected / completed / opted out

The broker ACL (:mod:`adapters.mqtt_devices.acl`) lets a device write only its own ``birth``,
``availability``, ``telemetry`` and ``result`` and read only its own ``command``, so the topic
tells who sent a message; a payload whose ``device_id`` disagrees with its topic is refused.

Every decoder returns a model or raises :class:`DeviceMessageError` with a machine-readable
reason: a caller logs it and drops the message. Bounds on every value keep nonsense (a 900 °C
living room, a negative tank volume) from ever reaching the planner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from unified.model import SCHEMA_VERSION, Frozen, Identifier, UtcDatetime

__all__ = [
    "COMMAND_ADAPTER",
    "DEFAULT_ROOT",
    "MAX_DEVICE_PAYLOAD_BYTES",
    "TELEMETRY_ADAPTER",
    "Availability",
    "Birth",
    "CommandResult",
    "DeviceCommandMessage",
    "DeviceKind",
    "DeviceMessageError",
    "DeviceTopics",
    "EndEvent",
    "HvacMode",
    "HvacState",
    "MessageKind",
    "ResultStatus",
    "SetMode",
    "SetSetpoint",
    "SetpointOffset",
    "TelemetryMessage",
    "ThermostatTelemetry",
    "WaterHeaterAction",
    "WaterHeaterMode",
    "WaterHeaterTelemetry",
    "decode_availability",
    "decode_birth",
    "decode_command",
    "decode_result",
    "decode_telemetry",
    "encode",
    "json_schemas",
]

DEFAULT_ROOT: Final = "derms/devices/v1"
MAX_DEVICE_PAYLOAD_BYTES: Final = 16 * 1024
"""Device messages are small; anything larger is refused before JSON parsing."""

_MAX_HOLD_S: Final = 24 * 3600
_M = TypeVar("_M", bound=Frozen)


class MessageKind(StrEnum):
    BIRTH = "birth"
    AVAILABILITY = "availability"
    TELEMETRY = "telemetry"
    COMMAND = "command"
    RESULT = "result"


DEVICE_TO_GATEWAY: Final = (
    MessageKind.BIRTH,
    MessageKind.AVAILABILITY,
    MessageKind.TELEMETRY,
    MessageKind.RESULT,
)


@dataclass(frozen=True, slots=True)
class DeviceTopics:
    """The topic scheme under one root (one root per utility or deployment)."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in "+#") or self.root.endswith("/"):
            raise ValueError(f"bad topic root {self.root!r}")

    def topic(self, device_id: str, kind: MessageKind) -> str:
        return f"{self.root}/{device_id}/{kind.value}"

    def wildcard(self, kind: MessageKind) -> str:
        """What the gateway subscribes to: one subscription per kind for every device."""
        return f"{self.root}/+/{kind.value}"

    def parse(self, topic: str) -> tuple[str, MessageKind] | None:
        """``(device_id, kind)`` of a topic in this scheme, or None for anything else."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2 or not parts[0]:
            return None
        try:
            kind = MessageKind(parts[1])
        except ValueError:
            return None
        return parts[0], kind


class DeviceMessageError(Exception):
    """A device message that cannot be used; ``reason`` is stable, ``detail`` is for people."""

    def __init__(
        self,
        reason: Literal["too_large", "malformed_json", "schema_violation", "wrong_device"],
        detail: str,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- common


class DeviceKind(StrEnum):
    THERMOSTAT = "thermostat"
    WATER_HEATER = "water_heater"


class _Message(Frozen):
    schema_version: Literal["1"] = SCHEMA_VERSION
    device_id: Identifier
    timestamp: UtcDatetime


class Birth(_Message):
    """Published (retained) on every connect: what the device is and what it can do."""

    kind: DeviceKind
    rated_kw: float = Field(
        gt=0, le=50, description="Electric power when running (compressor or element), kW"
    )
    model: str = Field(default="", max_length=128)
    firmware: str = Field(default="", max_length=64)
    min_setpoint_c: float | None = Field(default=None, ge=-10, le=95)
    max_setpoint_c: float | None = Field(default=None, ge=-10, le=95)
    tank_litres: float | None = Field(default=None, gt=0, le=2000)


class Availability(_Message):
    """Retained; the device's last will publishes ``online: false``."""

    online: bool


class HvacMode(StrEnum):
    OFF = "off"
    COOL = "cool"
    HEAT = "heat"


class HvacState(StrEnum):
    IDLE = "idle"
    COOLING = "cooling"
    HEATING = "heating"


class ThermostatTelemetry(_Message):
    type: Literal["thermostat"] = "thermostat"
    mode: HvacMode
    hvac_state: HvacState
    setpoint_c: float = Field(ge=5, le=35, description="The occupant's (or program's) setpoint")
    offset_c: float = Field(
        default=0.0, ge=-10, le=10, description="Event offset in force (pre-conditioning too)"
    )
    indoor_c: float = Field(ge=-30, le=60)
    outdoor_c: float | None = Field(default=None, ge=-60, le=60)
    power_kw: float = Field(ge=0, le=50, description="Measured or estimated electric load, kW")
    override: bool = Field(default=False, description="An occupant override is in force")
    command_id: str | None = Field(default=None, max_length=128, description="Event in force")


class WaterHeaterMode(StrEnum):
    NORMAL = "normal"
    SHED = "shed"
    LOAD_UP = "load_up"


class WaterHeaterTelemetry(_Message):
    """CTA-2045 style: the operating mode and the two commodity reads for stored energy."""

    type: Literal["water_heater"] = "water_heater"
    mode: WaterHeaterMode
    element_on: bool
    tank_c: float = Field(ge=0, le=100, description="Tank (upper sensor) temperature")
    setpoint_c: float = Field(ge=20, le=85)
    power_kw: float = Field(ge=0, le=50)
    energy_take_kwh: float = Field(
        ge=0, le=500, description="Energy the tank can still take now (CTA-2045 'energy take')"
    )
    energy_capacity_kwh: float = Field(
        gt=0, le=500, description="Total energy storage capacity between its min and max"
    )
    override: bool = False
    command_id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _take_fits(self) -> WaterHeaterTelemetry:
        if self.energy_take_kwh > self.energy_capacity_kwh * 1.05:
            raise ValueError("energy_take_kwh exceeds energy_capacity_kwh")
        return self


TelemetryMessage = Annotated[
    ThermostatTelemetry | WaterHeaterTelemetry, Field(discriminator="type")
]
TELEMETRY_ADAPTER: TypeAdapter[ThermostatTelemetry | WaterHeaterTelemetry] = TypeAdapter(
    TelemetryMessage
)


# --------------------------------------------------------------------------- commands


class SetMode(Frozen):
    action: Literal["set_mode"] = "set_mode"
    mode: HvacMode


class SetSetpoint(Frozen):
    action: Literal["set_setpoint"] = "set_setpoint"
    setpoint_c: float = Field(ge=5, le=35)


class SetpointOffset(Frozen):
    """A thermostat event: hold ``setpoint + offset_c``, after an optional pre-conditioning.

    Pre-conditioning runs ``precondition_offset_c`` (e.g. -1.5 °C: pre-cool) for
    ``precondition_s`` before the offset starts, so the house stores comfort it then spends.
    The event ends by itself after ``precondition_s + hold_s`` of the command.
    """

    action: Literal["setpoint_offset"] = "setpoint_offset"
    offset_c: float = Field(ge=-10, le=10)
    precondition_offset_c: float = Field(default=0.0, ge=-10, le=10)
    precondition_s: float = Field(default=0.0, ge=0, le=6 * 3600)


class EndEvent(Frozen):
    """Thermostat: back to the occupant's own schedule and setpoint."""

    action: Literal["end_event"] = "end_event"


class WaterHeaterAction(Frozen):
    """CTA-2045 basic DR: ``shed``, ``load_up`` or ``normal`` (End Shed / Run Normal)."""

    action: Literal["water_heater"] = "water_heater"
    mode: WaterHeaterMode


Action = Annotated[
    SetMode | SetSetpoint | SetpointOffset | EndEvent | WaterHeaterAction,
    Field(discriminator="action"),
]


class DeviceCommandMessage(Frozen):
    """One action for one device. ``hold_s`` bounds it: the device reverts to normal unless the
    gateway repeats the command in time, so a silent gateway never leaves a house shedding."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    command_id: Identifier
    device_id: Identifier
    issued_at: UtcDatetime
    hold_s: float = Field(gt=0, le=_MAX_HOLD_S)
    body: Action


COMMAND_ADAPTER: TypeAdapter[DeviceCommandMessage] = TypeAdapter(DeviceCommandMessage)


class ResultStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    COMPLETED = "completed"
    OPTED_OUT = "opted_out"
    """The occupant overrode an event in force: the device left it for good."""


class CommandResult(_Message):
    command_id: Identifier
    status: ResultStatus
    reason: str | None = Field(default=None, max_length=256)


# --------------------------------------------------------------------------- codec


def encode(message: Frozen) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


def _load(payload: bytes) -> Any:
    if len(payload) > MAX_DEVICE_PAYLOAD_BYTES:
        raise DeviceMessageError("too_large", f"{len(payload)} bytes")
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeviceMessageError("malformed_json", str(exc)) from None
    except RecursionError:
        # 16 kB of "[" is past the parser's recursion limit: bad input like any other, and an
        # exception other than DeviceMessageError would end the link's receive task.
        raise DeviceMessageError("malformed_json", "JSON nested too deeply") from None


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:6]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc or '(root)'}: {err['msg']}")
    return "; ".join(parts)


def _validated(model: type[_M], payload: bytes, device_id: str | None) -> _M:
    data = _load(payload)
    try:
        message = model.model_validate(data)
    except ValidationError as exc:
        raise DeviceMessageError("schema_violation", _errors(exc)) from None
    _same_device(message, device_id)
    return message


def _same_device(message: Frozen, device_id: str | None) -> None:
    claimed = getattr(message, "device_id", None)
    if device_id is not None and claimed != device_id:
        raise DeviceMessageError("wrong_device", f"payload for {claimed!r} on {device_id!r} topic")


def decode_birth(payload: bytes, device_id: str | None = None) -> Birth:
    return _validated(Birth, payload, device_id)


def decode_availability(payload: bytes, device_id: str | None = None) -> Availability:
    return _validated(Availability, payload, device_id)


def decode_result(payload: bytes, device_id: str | None = None) -> CommandResult:
    return _validated(CommandResult, payload, device_id)


def decode_command(payload: bytes, device_id: str | None = None) -> DeviceCommandMessage:
    return _validated(DeviceCommandMessage, payload, device_id)


def decode_telemetry(
    payload: bytes, device_id: str | None = None
) -> ThermostatTelemetry | WaterHeaterTelemetry:
    data = _load(payload)
    try:
        message = TELEMETRY_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise DeviceMessageError("schema_violation", _errors(exc)) from None
    _same_device(message, device_id)
    return message


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of every device message, by topic kind."""
    return {
        "birth": Birth.model_json_schema(),
        "availability": Availability.model_json_schema(),
        "telemetry": TELEMETRY_ADAPTER.json_schema(),
        "command": COMMAND_ADAPTER.json_schema(),
        "result": CommandResult.model_json_schema(),
    }
