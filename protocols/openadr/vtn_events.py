"""The VTN side of OpenADR 2.0b as pure functions: resources in, events out (no I/O, no clock).

The gateway hosts a VTN that OEM clouds join as VENs. Each resource a VEN lists in its METADATA
report becomes a device; the planner then hands that device one setpoint at a time
(:class:`unified.model.DeviceCommand`). This module decides what that setpoint means on the wire:

* :func:`parse_resource_id` reads what a VEN tells us about a resource. OpenADR has no field for
  a resource's capacity or grid location, and openleadr's VEN cannot fill ``reportSubject`` or
  the data source's group fields, so both travel in the ``resourceID`` itself (grammar below).
* :func:`plan_event` turns a setpoint into a new event, a modification (``modificationNumber``
  + 1), a cancellation, or nothing at all. "Nothing" matters: the device supervisor re-applies
  an unchanged setpoint every few seconds, and each of those must not become a modification.
* :func:`event_payload` renders an issued event as the dict openleadr's templates expect.

An event for a dispatch whose window the VTN knows lasts that window (:func:`plan_event`'s
``window_end``); otherwise it ends by itself after ``event_duration_s`` and is extended (a
modification) while the setpoint still holds: like a SunSpec battery's reversion timer, an OEM
cloud whose gateway has gone silent returns its customers to normal operation instead of
shedding forever.

Advance notice (:func:`announce_event`): a dispatch accepted ahead of its start becomes an event
at once, with the dispatch's window and a provisional value (the resource's expected share), so
the VEN sees it ``far`` then ``near`` (within the program's ``near_s``) then ``active``. The
planner's setpoint at the start *confirms* it (a modification when the value differs); an event
still unconfirmed ``unconfirmed_grace_s`` after its start is cancelled (the planner did not call
the resource after all).

Resource id grammar (``;``-separated, the name first, then ``key=value`` fields in any order)::

    tstat-7;class=thermostat;kw=3.5;sub=s1;feeder=f1;xfmr=t12
    bat-2;class=battery;kw=5;kwh=13.5;sub=s1;feeder=f2;section=f2a

``class`` is a :class:`unified.model.DerClass` value, ``kw`` the rated power (shed and absorb),
``kwh`` the usable energy (a thermostat defaults to one hour at rated power: the energy its
comfort band stores), ``sub`` / ``feeder`` / ``section`` / ``xfmr`` the grid location. A resource
without a location gets its VEN's default location from the configuration.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from unified.model import DerClass, DeviceCommand, LimitSource, TopologyLocation

__all__ = [
    "DEFAULT_LEVEL_FRACTIONS",
    "DispatchSignal",
    "IssuedEvent",
    "ResourceDescriptor",
    "ResourceIdError",
    "VtnProgram",
    "announce_event",
    "cancel_event",
    "event_payload",
    "event_status",
    "format_resource_id",
    "is_live",
    "parse_resource_id",
    "plan_event",
    "signal_for",
    "simple_level",
    "status_changes",
]

_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LOCATION_KEYS: Final = {
    "sub": "substation",
    "feeder": "feeder",
    "section": "feeder_section",
    "xfmr": "transformer",
}
_MAX_RESOURCE_ID: Final = 512
# Resource ids are echoed into event targets by templates that do not escape: allow only these.
_SAFE: Final = re.compile(r"^[A-Za-z0-9_.:;=/-]+$")
_MAX_KW: Final = 100_000.0

DEFAULT_LEVEL_FRACTIONS: Final[dict[int, float]] = {1: 0.5, 2: 0.75, 3: 1.0}
"""SIMPLE level → fraction of a resource's shed capacity; the same default as the VEN side
(:data:`protocols.openadr.DEFAULT_SIMPLE_LEVELS`), so our own VEN reads our VTN's levels back."""


class ResourceIdError(ValueError):
    """A resource id that does not follow the grammar; ``field`` names the offending part."""

    def __init__(self, resource_id: str, field: str, detail: str) -> None:
        super().__init__(f"resource id {resource_id[:80]!r}: {field}: {detail}")
        self.resource_id = resource_id
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ResourceDescriptor:
    """One resource as its VEN described it."""

    resource_id: str
    name: str
    der_class: DerClass
    rated_kw: float
    capacity_kwh: float
    location: TopologyLocation | None


def _positive(resource_id: str, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ResourceIdError(resource_id, key, f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0 < value <= _MAX_KW * 100:
        raise ResourceIdError(resource_id, key, f"{text!r} is not a positive finite number")
    return value


def describe_resource(
    resource_id: str,
    default: tuple[DerClass, float, float] | None,
) -> ResourceDescriptor:
    """A resource from a METADATA report: a plain resource id (any standard VEN) takes the
    configured ``default`` (DER class, rated kW, capacity kWh) and the VEN's location; an id in
    the private grammar (``name;class=...;kw=...``) describes itself. Raises
    :class:`ResourceIdError` when it can be neither."""
    if ";" in resource_id:
        return parse_resource_id(resource_id)
    if len(resource_id) > _MAX_RESOURCE_ID or not _NAME.match(resource_id):
        raise ResourceIdError(resource_id, "name", "letters, digits, '_', '.', '-' (max 64)")
    if default is None:
        raise ResourceIdError(
            resource_id, "class", "a plain resource id needs the VEN's default_resource mapping"
        )
    der_class, rated_kw, capacity_kwh = default
    return ResourceDescriptor(resource_id, resource_id, der_class, rated_kw, capacity_kwh, None)


def parse_resource_id(resource_id: str) -> ResourceDescriptor:
    """Read a resource id (grammar in the module docstring); raises :class:`ResourceIdError`."""
    if len(resource_id) > _MAX_RESOURCE_ID:
        raise ResourceIdError(resource_id, "length", f"longer than {_MAX_RESOURCE_ID}")
    if not _SAFE.match(resource_id):
        raise ResourceIdError(resource_id, "characters", "only letters, digits and _ . : ; = / -")
    name, *parts = resource_id.split(";")
    if not _NAME.match(name):
        raise ResourceIdError(resource_id, "name", "letters, digits, '_', '.', '-' (max 64)")
    fields: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ResourceIdError(resource_id, part or "(empty)", "expected key=value")
        fields[key.strip()] = value.strip()
    try:
        der_class = DerClass(fields.get("class", ""))
    except ValueError:
        known = ", ".join(c.value for c in DerClass)
        raise ResourceIdError(resource_id, "class", f"one of {known}") from None
    if "kw" not in fields:
        raise ResourceIdError(resource_id, "kw", "missing: the rated power is required")
    rated = _positive(resource_id, "kw", fields["kw"])
    if rated > _MAX_KW:
        raise ResourceIdError(resource_id, "kw", f"above {_MAX_KW:g} kW")
    if "kwh" in fields:
        capacity = _positive(resource_id, "kwh", fields["kwh"])
    elif der_class is DerClass.BATTERY:
        raise ResourceIdError(resource_id, "kwh", "missing: a battery needs its energy capacity")
    else:
        capacity = rated  # one hour at rated power
    location = None
    given = {_LOCATION_KEYS[k]: v for k, v in fields.items() if k in _LOCATION_KEYS}
    if given:
        try:
            location = TopologyLocation.model_validate(given)
        except ValueError as exc:
            raise ResourceIdError(resource_id, "location", str(exc).splitlines()[0]) from None
    return ResourceDescriptor(resource_id, name, der_class, rated, capacity, location)


def format_resource_id(
    name: str,
    der_class: DerClass,
    rated_kw: float,
    *,
    capacity_kwh: float | None = None,
    location: TopologyLocation | None = None,
) -> str:
    """The inverse of :func:`parse_resource_id` (what a VEN, e.g. the OEM simulator, sends)."""
    parts = [name, f"class={der_class.value}", f"kw={rated_kw:g}"]
    if capacity_kwh is not None:
        parts.append(f"kwh={capacity_kwh:g}")
    if location is not None:
        for key, attr in _LOCATION_KEYS.items():
            value = getattr(location, attr)
            if value is not None:
                parts.append(f"{key}={value}")
    text = ";".join(parts)
    parse_resource_id(text)  # never send what we could not read back
    return text


# --------------------------------------------------------------------------- programs


class DispatchSignal(StrEnum):
    """How a setpoint goes on the wire.

    ``delta``: LOAD_DISPATCH delta in kW, "change your load by this much". The planner treats
    every device as a battery whose idle is 0 kW, so for a resource with a baseline load (a
    thermostat) the setpoint it computes already *is* a change from that baseline.
    ``setpoint``: LOAD_DISPATCH setpoint in kW, an absolute net power (batteries).
    ``simple``: SIMPLE levels 0-3 for clouds that only understand those; the level whose share of
    the shed capacity is nearest the request (a request to absorb becomes level 0).
    """

    DELTA = "delta"
    SETPOINT = "setpoint"
    SIMPLE = "simple"


class VtnProgram(BaseModel):
    """How setpoints for one VEN's resources become events."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    program: str = Field(default="oem", min_length=1, max_length=64)
    market_context: str = Field(default="http://derms.example/programs/oem", max_length=500)
    signal: DispatchSignal = DispatchSignal.DELTA
    level_fractions: dict[int, float] = Field(
        default_factory=lambda: dict(DEFAULT_LEVEL_FRACTIONS),
        description="SIMPLE level → fraction of the resource's shed capacity",
    )
    event_duration_s: int = Field(
        default=3600, ge=60, le=86_400, description="Events end by themselves unless extended"
    )
    extend_before_s: int = Field(
        default=900, ge=1, description="Extend a held event when less than this remains"
    )
    ramp_up_s: int = Field(default=0, ge=0, le=3600)
    recovery_s: int = Field(default=0, ge=0, le=3600)
    startafter_s: int = Field(
        default=0, ge=0, le=3600, description="Start randomization each VEN draws (tolerance)"
    )
    priority: int = Field(default=0, ge=0, le=1000)
    deadband_kw: float = Field(
        default=0.01, ge=0, description="Smaller changes do not modify an event"
    )
    response_required: bool = True
    near_s: int = Field(
        default=300, ge=0, le=86_400, description="eventStatus is 'near' this long before start"
    )
    notification_s: int = Field(
        default=0,
        ge=0,
        le=7 * 86_400,
        description="x-eiNotification: the notice the program promises (0: not sent)",
    )
    unconfirmed_grace_s: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="A notified event the planner has not confirmed this long after its start "
        "is cancelled",
    )

    @field_validator("level_fractions")
    @classmethod
    def _levels(cls, value: dict[int, float]) -> dict[int, float]:
        if not value or not set(value) <= {1, 2, 3}:
            raise ValueError("level_fractions maps SIMPLE levels 1, 2 and 3 to fractions")
        if any(not 0 < f <= 1 for f in value.values()):
            raise ValueError("level fractions must be in (0, 1]")
        return value


def simple_level(power_kw: float, shed_capacity_kw: float, fractions: dict[int, float]) -> int:
    """The SIMPLE level nearest a request to change load by ``power_kw`` (negative sheds)."""
    if power_kw >= 0 or shed_capacity_kw <= 0:
        return 0
    wanted = min(1.0, -power_kw / shed_capacity_kw)
    candidates = {0: 0.0, **fractions}
    return min(candidates, key=lambda level: (abs(candidates[level] - wanted), level))


SignalSpec = tuple[Literal["LOAD_DISPATCH", "SIMPLE"], Literal["delta", "setpoint", "level"], float]


def signal_for(power_kw: float, program: VtnProgram, rated_kw: float) -> SignalSpec:
    """``(signal_name, signal_type, value)`` of a setpoint under ``program``."""
    if program.signal is DispatchSignal.SIMPLE:
        return "SIMPLE", "level", float(simple_level(power_kw, rated_kw, program.level_fractions))
    kind: Literal["delta", "setpoint"] = (
        "delta" if program.signal is DispatchSignal.DELTA else "setpoint"
    )
    return "LOAD_DISPATCH", kind, round(power_kw, 3) + 0.0


# --------------------------------------------------------------------------- issued events


class IssuedEvent(BaseModel):
    """One event the VTN issued to one VEN for one resource, as persisted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str
    ven_name: str
    device_id: str
    resource_id: str
    modification_number: int = Field(ge=0)
    cancelled: bool = False
    created: datetime
    start: datetime
    duration_s: float = Field(gt=0)
    signal_name: Literal["LOAD_DISPATCH", "SIMPLE"]
    signal_type: Literal["delta", "setpoint", "level"]
    value: float
    power_kw: float | None = Field(description="The setpoint the event carries out")
    provenance: tuple[LimitSource, ...] = ()
    market_context: str
    priority: int = 0
    ramp_up_s: int = 0
    recovery_s: int = 0
    startafter_s: int = 0
    response_required: bool = True
    near_s: int = 300
    notification_s: int = 0
    command_id: str | None = Field(
        default=None, description="The dispatch it carries out, when the VTN was told of it"
    )
    fixed_end: bool = Field(
        default=False, description="Ends with its dispatch's window: never extended"
    )
    confirmed: bool = Field(
        default=True, description="False while only announced: no setpoint has come for it yet"
    )
    opt: Literal["optIn", "optOut"] | None = None
    opt_modification: int | None = Field(
        default=None, description="Modification the last opt answered"
    )
    acknowledged_cancel: bool = False
    updated_at: datetime

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)

    def command(self) -> DeviceCommand:
        """The device command this modification carries out (for refusals)."""
        return DeviceCommand(
            device_id=self.device_id, power_kw=self.power_kw, provenance=self.provenance
        )


def is_live(event: IssuedEvent, now: datetime) -> bool:
    """Still in force: neither cancelled nor over."""
    return not event.cancelled and event.end > now


def plan_event(
    previous: IssuedEvent | None,
    command: DeviceCommand,
    *,
    ven_name: str,
    resource_id: str,
    rated_kw: float,
    program: VtnProgram,
    now: datetime,
    new_event_id: str,
    window_end: datetime | None = None,
) -> IssuedEvent | None:
    """The event that carries out ``command``, or None when nothing needs to change.

    ``window_end``: the end of the dispatch the setpoint comes from, when known; a new event
    then lasts until it (instead of ``event_duration_s``) and is never extended.

    A live event is modified in place (same id, ``modificationNumber`` + 1) rather than
    cancelled and re-issued, so the VEN keeps its ``startafter`` draw and the customer sees one
    event. A release (``power_kw`` None) cancels it. A repeat of the setpoint in force is a
    no-op unless the event is about to end, in which case it is extended.
    """
    live = previous is not None and is_live(previous, now)
    if command.power_kw is None:
        if previous is None or not live:
            return None
        if previous.start > now and previous.command_id not in {
            s.command_id for s in command.provenance
        }:
            return None  # a release of something else does not withdraw a notice
        return previous.model_copy(
            update={
                "modification_number": previous.modification_number + 1,
                "cancelled": True,
                "power_kw": None,
                "provenance": command.provenance,
                "updated_at": now,
            }
        )
    if not math.isfinite(command.power_kw):
        raise ValueError(f"setpoint {command.power_kw} is not a number")
    name, kind, value = signal_for(command.power_kw, program, rated_kw)
    if previous is None or not live:
        fixed = window_end is not None and window_end > now
        return IssuedEvent(
            event_id=new_event_id,
            ven_name=ven_name,
            device_id=command.device_id,
            resource_id=resource_id,
            modification_number=0,
            created=now,
            start=now,
            duration_s=(window_end - now).total_seconds()
            if fixed and window_end is not None
            else program.event_duration_s,
            signal_name=name,
            signal_type=kind,
            value=value,
            power_kw=command.power_kw,
            provenance=command.provenance,
            market_context=program.market_context,
            priority=program.priority,
            ramp_up_s=program.ramp_up_s,
            recovery_s=program.recovery_s,
            startafter_s=program.startafter_s,
            response_required=program.response_required,
            near_s=program.near_s,
            notification_s=program.notification_s,
            command_id=_command_id(command),
            fixed_end=fixed,
            updated_at=now,
        )
    remaining = (previous.end - now).total_seconds()
    same = (
        (name, kind) == (previous.signal_name, previous.signal_type)
        and abs(value - previous.value) <= program.deadband_kw
        and command.provenance == previous.provenance
    )
    extend = not previous.fixed_end and remaining <= program.extend_before_s
    if same and not extend:
        if previous.confirmed:
            return None
        # The announced value was right: confirmed, and nothing changes on the wire.
        return previous.model_copy(update={"confirmed": True, "updated_at": now})
    duration = previous.duration_s
    if extend:
        duration = (now - previous.start).total_seconds() + program.event_duration_s
    return previous.model_copy(
        update={
            "modification_number": previous.modification_number + 1,
            "signal_name": name,
            "signal_type": kind,
            "value": value,
            "power_kw": command.power_kw,
            "provenance": command.provenance,
            "duration_s": duration,
            "confirmed": True,
            "updated_at": now,
        }
    )


def _command_id(command: DeviceCommand) -> str | None:
    return command.provenance[0].command_id if command.provenance else None


def announce_event(
    previous: IssuedEvent | None,
    *,
    command_id: str,
    device_id: str,
    start: datetime,
    end: datetime,
    expected_kw: float,
    ven_name: str,
    resource_id: str,
    rated_kw: float,
    program: VtnProgram,
    now: datetime,
    new_event_id: str,
) -> IssuedEvent | None:
    """The event announcing a dispatch ahead of its start, or None when there is nothing to
    announce: it has started (the setpoint comes through :func:`plan_event`), or the resource
    has a live event of another dispatch (it keeps one event at a time; it is told at start).

    A repeated notice of the same dispatch changes nothing.
    """
    if start <= now or end <= start or not math.isfinite(expected_kw):
        return None
    if previous is not None and is_live(previous, now):
        return None
    name, kind, value = signal_for(expected_kw, program, rated_kw)
    return IssuedEvent(
        event_id=new_event_id,
        ven_name=ven_name,
        device_id=device_id,
        resource_id=resource_id,
        modification_number=0,
        created=now,
        start=start,
        duration_s=(end - start).total_seconds(),
        signal_name=name,
        signal_type=kind,
        value=value,
        power_kw=expected_kw,
        provenance=(LimitSource(command_id=command_id, kind="dispatch"),),
        market_context=program.market_context,
        priority=program.priority,
        ramp_up_s=program.ramp_up_s,
        recovery_s=program.recovery_s,
        startafter_s=program.startafter_s,
        response_required=program.response_required,
        near_s=program.near_s,
        notification_s=program.notification_s,
        command_id=command_id,
        fixed_end=True,
        confirmed=False,
        updated_at=now,
    )


def cancel_event(event: IssuedEvent, now: datetime) -> IssuedEvent:
    """``event`` cancelled (a modification)."""
    return event.model_copy(
        update={
            "modification_number": event.modification_number + 1,
            "cancelled": True,
            "power_kw": None,
            "updated_at": now,
        }
    )


def event_status(event: IssuedEvent, now: datetime) -> str:
    """The 2.0b ``eventStatus`` at ``now`` (``near`` within the program's ``near_s``)."""
    if event.cancelled:
        return "cancelled"
    if now >= event.end:
        return "completed"
    if now >= event.start:
        return "active"
    return "near" if (event.start - now).total_seconds() <= event.near_s else "far"


def status_changes(event: IssuedEvent, after: datetime) -> datetime | None:
    """When the event's ``eventStatus`` next changes after ``after`` (None: it will not)."""
    if event.cancelled:
        return None
    near = event.start - timedelta(seconds=event.near_s)
    return next((t for t in (near, event.start, event.end) if t > after), None)


def event_payload(event: IssuedEvent, now: datetime, ven_id: str) -> dict[str, Any]:
    """The event as openleadr's ``oadrDistributeEvent`` template reads it.

    One interval covers the whole event: a modification replaces the value from now on, and a
    2.0b VEN reconciles a modified event as a whole anyway.
    """
    signal: dict[str, Any] = {
        "intervals": [
            {
                "dtstart": event.start,
                "duration": timedelta(seconds=event.duration_s),
                "signal_payload": event.value,
            }
        ],
        "signal_name": event.signal_name,
        "signal_type": event.signal_type,
        "signal_id": f"{event.event_id}-s0",
    }
    if event.signal_name == "LOAD_DISPATCH":
        # (openleadr's preflight rewrites a SIMPLE current value with a warning: leave it out)
        signal["current_value"] = event.value if event_status(event, now) == "active" else 0.0
    if event.signal_name == "LOAD_DISPATCH":
        signal["measurement"] = {
            "ns": "power",
            "name": "powerReal",  # openleadr's name; rendered as the schema's element
            "description": "RealPower",
            "unit": "W",
            "scale": "k",
            "power_attributes": {"hertz": 50, "voltage": 230, "ac": True},
        }
    active_period: dict[str, Any] = {
        "dtstart": event.start,
        "duration": timedelta(seconds=event.duration_s),
        "tolerance": (
            {"startafter": timedelta(seconds=event.startafter_s)} if event.startafter_s else None
        ),
        "ramp_up_period": timedelta(seconds=event.ramp_up_s) if event.ramp_up_s else None,
        "recovery_period": timedelta(seconds=event.recovery_s) if event.recovery_s else None,
        "notification_period": (
            timedelta(seconds=event.notification_s) if event.notification_s else None
        ),
    }
    return {
        "event_descriptor": {
            "event_id": event.event_id,
            "modification_number": event.modification_number,
            "modification_date_time": event.updated_at if event.modification_number else None,
            "priority": event.priority,
            "market_context": event.market_context,
            "created_date_time": event.created,
            "event_status": event_status(event, now),
        },
        "active_period": active_period,
        "event_signals": [signal],
        "targets": [{"resource_id": event.resource_id, "ven_id": ven_id}],
        "response_required": "always" if event.response_required else "never",
    }
