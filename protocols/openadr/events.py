"""OpenADR 2.0b events → unified commands, as a pure reconciler (no I/O, no clock, no RNG).

A VEN sees the same events again and again: every ``oadrDistributeEvent`` carries *all* the
events the VTN holds for it, an event changes by a higher ``modificationNumber``, is cancelled
explicitly (``eventStatus`` ``cancelled``) or implicitly (it is missing from a later
distribution). So instead of reacting to messages, :func:`reconcile` compares what the VTN says
now with what we acted on before (:class:`VenState`) and returns what to change: new commands,
cancels of old ones, and the opt-in / opt-out to answer with.

Everything that would make this impure is an input: ``now``, the ``startafter`` draw (taken
once per event and kept in the state, so a restart never re-randomizes), and the groups'
capacities. The state is a pydantic model so the service can persist it as JSON.

Commands get deterministic ids (``oadr-{ven}-{event}-m{modification}-i{interval}``), so a
redelivery or a resubmission after a crash is a no-op in the command book.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from unified.model import (
    AckState,
    Cancel,
    Command,
    Dispatch,
    DispatchMode,
    EnvelopeInterval,
    Identifier,
    OperatingEnvelope,
    Target,
    in_sane_range,
)
from unified.prices import MAX_ABS_PRICE

__all__ = [
    "DEFAULT_SIMPLE_LEVELS",
    "Distribution",
    "EventRecord",
    "EventRefused",
    "EventStatus",
    "GroupCapacity",
    "IssuedCommand",
    "MalformedEvent",
    "OadrEvent",
    "OadrInterval",
    "OadrSignal",
    "OptOutReason",
    "OptResponse",
    "OptType",
    "PriceInterval",
    "RecordStatus",
    "ResponseCode",
    "SimpleLevel",
    "StartAfterDraw",
    "VenProgramConfig",
    "VenState",
    "parse_distribution",
    "parse_event",
    "pending_commands",
    "price_intervals",
    "reconcile",
    "settle",
    "translate",
]


# --------------------------------------------------------------------------- vocabulary


class OptType(StrEnum):
    OPT_IN = "optIn"
    OPT_OUT = "optOut"


class EventStatus(StrEnum):
    NONE = "none"
    FAR = "far"
    NEAR = "near"
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class OptOutReason(StrEnum):
    """Why the VEN refused an event before submitting anything.

    A refusal because the gateway rejected a command carries the gateway's own
    :class:`unified.model.Reason` value instead (``beyond_ratings``, ``no_devices``, ...).
    """

    MALFORMED_EVENT = "malformed_event"
    UNSUPPORTED_SIGNAL = "unsupported_signal"
    UNSUPPORTED_SIGNAL_TYPE = "unsupported_signal_type"
    UNSUPPORTED_UNITS = "unsupported_units"
    INVALID_VALUE = "invalid_value"
    INVALID_WINDOW = "invalid_window"
    ALREADY_ENDED = "already_ended"
    UNKNOWN_TARGET = "unknown_target"
    NO_CAPACITY = "no_capacity"


class ResponseCode:
    """OpenADR 2.0b response codes used in ``eiResponse`` of an event response."""

    OK: Final = 200
    INVALID_DATA: Final = 454
    SIGNAL_NOT_SUPPORTED: Final = 460
    TARGET_MISMATCH: Final = 462


_REASON_CODES: Final[dict[str, int]] = {
    OptOutReason.MALFORMED_EVENT: ResponseCode.INVALID_DATA,
    OptOutReason.UNSUPPORTED_SIGNAL: ResponseCode.SIGNAL_NOT_SUPPORTED,
    OptOutReason.UNSUPPORTED_SIGNAL_TYPE: ResponseCode.SIGNAL_NOT_SUPPORTED,
    OptOutReason.UNSUPPORTED_UNITS: ResponseCode.SIGNAL_NOT_SUPPORTED,
    OptOutReason.INVALID_VALUE: ResponseCode.INVALID_DATA,
    OptOutReason.INVALID_WINDOW: ResponseCode.INVALID_DATA,
    OptOutReason.UNKNOWN_TARGET: ResponseCode.TARGET_MISMATCH,
}

SupportedSignal = Literal["LOAD_DISPATCH", "SIMPLE", "LOAD_CONTROL", "ELECTRICITY_PRICE"]

# siScaleCode multipliers (oadr_siscale_20b.xsd).
_SI_SCALE: Final[dict[str, float]] = {
    "p": 1e-12,
    "n": 1e-9,
    "micro": 1e-6,
    "m": 1e-3,
    "c": 1e-2,
    "d": 1e-1,
    "none": 1.0,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
}
# Real-power units in kW. Energy (Wh), reactive (VAR) or apparent (VA) power are not a dispatch.
_POWER_UNITS_KW: Final[dict[str, float]] = {"W": 1e-3, "kW": 1.0, "MW": 1e3}
_POWER_MEASUREMENTS: Final = frozenset({"powerReal", "customUnit"})
_MAX_RAMP_S: Final = 3600.0


# --------------------------------------------------------------------------- configuration


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SimpleLevel(_Frozen):
    """What one SIMPLE level asks of a group: a fixed signed kW change, a fraction of the
    group's shed capacity, or nothing (level 0, "normal operation")."""

    kw: float | None = Field(
        default=None, ge=-1_000_000, le=1_000_000, description="Signed kW delta (load convention)"
    )
    fraction: float | None = Field(
        default=None, ge=0, le=1, description="Shed this fraction of the group's shed capacity"
    )

    @field_validator("fraction")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("fraction must be finite")
        return value

    @model_validator(mode="after")
    def _one_action(self) -> SimpleLevel:
        if self.kw is not None and self.fraction is not None:
            raise ValueError("give kw or fraction, not both")
        return self


DEFAULT_SIMPLE_LEVELS: Final[dict[int, SimpleLevel]] = {
    0: SimpleLevel(),
    1: SimpleLevel(fraction=0.5),
    2: SimpleLevel(fraction=0.75),
    3: SimpleLevel(fraction=1.0),
}

_TARGET_KINDS: Final = frozenset(
    {
        "ven_id",
        "party_id",
        "resource_id",
        "group_id",
        "group_name",
        "end_device_asset",
        "meter_asset",
        "service_location",
        "service_delivery_point",
        "p_node",
        "aggregated_p_node",
    }
)
# Targets that name the VEN itself rather than one of its resources.
_VEN_TARGET_KINDS: Final = frozenset({"ven_id", "party_id"})


class VenProgramConfig(_Frozen):
    """How one VEN's events become unified commands."""

    ven_name: str = Field(min_length=1, max_length=200, description="Used in command ids")
    program: Identifier = Field(default="openadr", description="Program of the commands")
    priority: int = Field(default=0, ge=0, le=1000)
    default_group: Identifier | None = Field(
        default=None,
        description="Group for events that target the VEN as a whole (ven_id / party_id / none)",
    )
    targets: dict[str, Identifier] = Field(
        default_factory=dict,
        description="OpenADR target 'kind:value' (e.g. 'resource_id:site-7') → unified group_id",
    )
    simple_levels: dict[int, SimpleLevel] = Field(
        default_factory=lambda: dict(DEFAULT_SIMPLE_LEVELS)
    )
    signals: frozenset[SupportedSignal] = frozenset({"LOAD_DISPATCH", "SIMPLE"})
    unitless_dispatch_unit: Literal["W", "kW"] | None = Field(
        default=None,
        description="Unit assumed for a LOAD_DISPATCH signal without itemBase; None refuses it",
    )
    retention_s: float = Field(
        default=86_400, gt=0, description="Keep records of ended events this long (idempotency)"
    )

    @field_validator("targets")
    @classmethod
    def _target_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            kind, sep, name = key.partition(":")
            if not sep or not name or kind not in _TARGET_KINDS:
                raise ValueError(
                    f"target key {key!r} must be 'kind:value' with kind one of "
                    f"{', '.join(sorted(_TARGET_KINDS))}"
                )
        return value

    @field_validator("simple_levels")
    @classmethod
    def _levels(cls, value: dict[int, SimpleLevel]) -> dict[int, SimpleLevel]:
        if not set(value) <= {0, 1, 2, 3}:
            raise ValueError("SIMPLE levels are 0, 1, 2 and 3")
        return value


@dataclass(frozen=True, slots=True)
class GroupCapacity:
    """What a group can do, for signals expressed relative to it (SIMPLE fractions,
    ``x-loadControlCapacity``). The caller derives it from the registry's ratings."""

    shed_kw: float
    import_kw: float


StartAfterDraw = Callable[[str, float], float]
"""``(event_id, max_seconds) -> seconds in [0, max_seconds]``; called once per new event."""


# --------------------------------------------------------------------------- parsed events


@dataclass(frozen=True, slots=True)
class OadrInterval:
    start: datetime
    duration_s: float
    value: float


@dataclass(frozen=True, slots=True)
class OadrSignal:
    name: str
    type: str
    signal_id: str | None
    intervals: tuple[OadrInterval, ...]
    measurement: str | None = None
    units: str | None = None
    scale: str | None = None


@dataclass(frozen=True, slots=True)
class OadrEvent:
    """One event as this module understands it; built by :func:`parse_event`."""

    event_id: str
    modification_number: int
    status: str
    start: datetime
    duration_s: float
    signals: tuple[OadrSignal, ...]
    targets: tuple[str, ...] = ()
    priority: int = 0
    created: datetime | None = None
    test_event: bool = False
    startafter_s: float = 0.0
    ramp_up_s: float = 0.0
    recovery_s: float = 0.0
    response_required: bool = True
    market_context: str | None = None

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)


@dataclass(frozen=True, slots=True)
class MalformedEvent:
    """An event we could not read. With an id it still gets an opt-out, so the VTN learns why."""

    event_id: str | None
    modification_number: int
    detail: str
    response_required: bool = True


@dataclass(frozen=True, slots=True)
class Distribution:
    request_id: str | None
    vtn_id: str | None
    events: tuple[OadrEvent | MalformedEvent, ...]


class _Malformed(Exception):
    pass


def _as_mapping(value: object, where: str) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return value
    raise _Malformed(f"{where} is not a structure")


def _seconds(value: object, where: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _finite(value, where)
    raise _Malformed(f"{where} is not a duration: {value!r}")


def _time(value: object, where: str) -> datetime:
    if not isinstance(value, datetime):
        raise _Malformed(f"{where} is not a date-time: {value!r}")
    if value.tzinfo is None:
        raise _Malformed(f"{where} has no time zone")
    utc = in_sane_range(value)
    if utc is None:
        raise _Malformed(f"{where} {value.isoformat()} is out of range")
    return utc


def _check_span(start: datetime, seconds: float, startafter_s: float, where: str) -> None:
    """``start`` plus ``seconds`` plus up to ``startafter_s`` must be a sane time: the
    reconciler adds durations and the startafter draw to event times, and a far-future start
    or a duration of years overflows ``datetime`` (or a NaN one cannot be added at all)."""
    try:
        ends = [start + timedelta(seconds=s) for s in (seconds, seconds + max(startafter_s, 0.0))]
    except (OverflowError, ValueError):
        raise _Malformed(f"{where} does not end at a representable time") from None
    if any(in_sane_range(end) is None for end in ends):
        raise _Malformed(f"{where} ends out of range")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(f"{where} is not a number: {value!r}")
    return _finite(value, where)


def _finite(value: int | float, where: str) -> float:
    """An int beyond a float's range (a 300-digit payload) is malformed, not a crash."""
    try:
        return float(value)
    except OverflowError:
        raise _Malformed(f"{where} is out of range") from None


def _period(active: Mapping[str, Any], *names: str) -> float:
    """``ramp_up`` / ``recovery`` come as a duration (parsed XML) or {'duration': ...}."""
    for name in names:
        value = active.get(name)
        if isinstance(value, Mapping):
            value = value.get("duration")
        if value is not None:
            return _seconds(value, f"active_period.{name}")
    return 0.0


def _startafter(active: Mapping[str, Any]) -> float:
    tolerance = active.get("tolerance")
    if not isinstance(tolerance, Mapping):
        return 0.0
    # Parsed XML nests it as tolerance.tolerate.startafter; openleadr objects omit 'tolerate'.
    inner = tolerance.get("tolerate", tolerance)
    if not isinstance(inner, Mapping):
        return 0.0
    return _seconds(inner.get("startafter"), "tolerance.startafter")


def _targets(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, list | tuple) else [raw]
    out: list[str] = []
    for item in items:
        target = _as_mapping(item, "target")
        for kind, raw_value in target.items():
            value = raw_value
            if isinstance(value, Mapping):  # end_device_asset {'mrid': ...}, p_node {'node': ...}
                value = next((v for v in value.values() if isinstance(v, str | int)), None)
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            out.extend(f"{kind}:{v}" for v in values)
    return tuple(sorted(set(out)))


def _signal(raw: object, start: datetime, index: int, startafter_s: float) -> OadrSignal:
    signal = _as_mapping(raw, f"event_signals[{index}]")
    name, kind = signal.get("signal_name"), signal.get("signal_type")
    if not isinstance(name, str) or not isinstance(kind, str):
        raise _Malformed(f"event_signals[{index}] has no signal_name / signal_type")
    raw_intervals = signal.get("intervals")
    if isinstance(raw_intervals, Mapping):
        raw_intervals = [raw_intervals]
    if not isinstance(raw_intervals, list | tuple) or not raw_intervals:
        raise _Malformed(f"signal {name} has no intervals")
    intervals: list[OadrInterval] = []
    # 2.0b intervals follow each other from the event's dtstart; openleadr may add a dtstart.
    cursor = start
    for n, item in enumerate(raw_intervals):
        interval = _as_mapping(item, f"{name}.intervals[{n}]")
        where = f"{name}.intervals[{n}]"
        begin = (
            _time(interval["dtstart"], f"{where}.dtstart")
            if interval.get("dtstart") is not None
            else cursor
        )
        duration = _seconds(interval.get("duration"), f"{where}.duration")
        _check_span(begin, duration, startafter_s, where)
        payload = interval.get("signal_payload")
        if isinstance(payload, Mapping):
            payload = payload.get("value")
        intervals.append(OadrInterval(begin, duration, _number(payload, f"{where}.signal_payload")))
        cursor = begin + timedelta(seconds=max(duration, 0.0))
    measurement = signal.get("measurement")
    m = _as_mapping(measurement, f"{name}.measurement") if measurement is not None else None
    sid = signal.get("signal_id")
    return OadrSignal(
        name=name,
        type=kind,
        signal_id=None if sid is None else str(sid),
        intervals=tuple(intervals),
        measurement=None if m is None else _opt_str(m.get("name")),
        units=None if m is None else _opt_str(m.get("unit")),
        scale=None if m is None else _opt_str(m.get("scale")),
    )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def parse_event(raw: object) -> OadrEvent | MalformedEvent:
    """Read one event from openleadr's parsed dict (or its ``objects.Event``)."""
    event_id: str | None = None
    modification = 0
    required = True
    try:
        event = _as_mapping(raw, "event")
        required = event.get("response_required", "always") != "never"
        descriptor = _as_mapping(event.get("event_descriptor"), "event_descriptor")
        if descriptor.get("event_id") is not None:
            event_id = str(descriptor["event_id"])
        mod = descriptor.get("modification_number", 0)
        if isinstance(mod, int) and not isinstance(mod, bool):
            modification = mod
        if event_id is None or not event_id:
            raise _Malformed("event_descriptor has no event_id")
        if not isinstance(mod, int) or isinstance(mod, bool) or mod < 0:
            raise _Malformed(f"modification_number {mod!r} is not a non-negative integer")
        active = _as_mapping(event.get("active_period"), "active_period")
        start = _time(active.get("dtstart"), "active_period.dtstart")
        signals_raw = event.get("event_signals")
        if isinstance(signals_raw, Mapping) and "event_signals" in signals_raw:
            signals_raw = signals_raw["event_signals"]
        if isinstance(signals_raw, Mapping):
            signals_raw = [signals_raw]
        if not isinstance(signals_raw, list | tuple) or not signals_raw:
            raise _Malformed("event has no signals")
        created = descriptor.get("created_date_time")
        priority = descriptor.get("priority", 0)
        duration_s = _seconds(active.get("duration"), "active_period.duration")
        startafter_s = _startafter(active)
        _check_span(start, duration_s, startafter_s, "active_period")
        return OadrEvent(
            event_id=event_id,
            modification_number=mod,
            status=str(descriptor.get("event_status", EventStatus.NONE)),
            start=start,
            duration_s=duration_s,
            signals=tuple(_signal(s, start, i, startafter_s) for i, s in enumerate(signals_raw)),
            targets=_targets(event.get("targets")),
            priority=priority if isinstance(priority, int) else 0,
            created=_time(created, "created_date_time") if created is not None else None,
            test_event=descriptor.get("test_event") not in (None, False, "false"),
            startafter_s=startafter_s,
            ramp_up_s=_period(active, "ramp_up", "ramp_up_period"),
            recovery_s=_period(active, "recovery", "recovery_period"),
            response_required=required,
            market_context=_opt_str(descriptor.get("market_context")),
        )
    except (_Malformed, KeyError, TypeError, ValueError) as exc:
        return MalformedEvent(event_id, modification, str(exc), required)


def parse_distribution(payload: Mapping[str, Any]) -> Distribution:
    """Read an ``oadrDistributeEvent`` payload as openleadr's ``parse_message`` returns it."""
    events = payload.get("events") or []
    if not isinstance(events, list | tuple):  # one event, or something that is none
        events = [events]
    request_id = payload.get("request_id")
    vtn_id = payload.get("vtn_id")
    return Distribution(
        request_id=None if request_id is None else str(request_id),
        vtn_id=None if vtn_id is None else str(vtn_id),
        events=tuple(parse_event(e) for e in events),
    )


# --------------------------------------------------------------------------- state


class RecordStatus(StrEnum):
    ACTIVE = "active"
    CANCELLED = "cancelled"
    OPTED_OUT = "opted_out"


class IssuedCommand(_Frozen):
    command_id: str
    end: datetime


class EventRecord(_Frozen):
    """What we did about one event. Persisted; the ``outbox`` survives a crash so that commands
    are resubmitted (idempotently) rather than lost."""

    event_id: str
    modification_number: int
    status: RecordStatus
    startafter_s: float = 0.0
    opt: OptType
    response_code: int = ResponseCode.OK
    reason: str | None = None
    detail: str | None = None
    response_required: bool = True
    issued: tuple[IssuedCommand, ...] = ()
    outbox: tuple[Command, ...] = ()
    end: datetime
    updated_at: datetime

    def response(self, modification_number: int | None = None) -> OptResponse:
        return OptResponse(
            event_id=self.event_id,
            modification_number=(
                self.modification_number if modification_number is None else modification_number
            ),
            opt_type=self.opt,
            response_code=self.response_code,
            reason=self.reason,
            detail=self.detail,
        )


class VenState(_Frozen):
    events: dict[str, EventRecord] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OptResponse:
    """One ``eventResponse`` of an ``oadrCreatedEvent``."""

    event_id: str
    modification_number: int
    opt_type: OptType
    response_code: int = ResponseCode.OK
    """The 2.0b code naming the problem, for our logs; on the wire an opt-out is 200 with
    ``optOut`` (an answer, not an error) and the reason is in the description."""
    reason: str | None = None
    detail: str | None = None

    @property
    def description(self) -> str:
        if self.reason is None:
            return "OK"
        text = self.reason if not self.detail else f"{self.reason}: {self.detail}"
        return text[:250]


# --------------------------------------------------------------------------- translation


class EventRefused(Exception):
    """:func:`translate` will not act on an event; ``reason`` is what the opt-out says."""

    def __init__(self, reason: OptOutReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _refuse(reason: OptOutReason, detail: str) -> EventRefused:
    return EventRefused(reason, detail)


_ID_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def _id_part(text: str, max_len: int) -> str:
    """Make an OpenADR id usable inside a unified Identifier, deterministically and without
    collisions: anything altered or shortened gets a hash of the original appended."""
    safe = _ID_SAFE.sub("_", text)
    if safe == text and len(safe) <= max_len and safe[:1].isalnum():
        return safe
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{safe[: max_len - 9].strip('_.:-') or 'x'}-{digest}"


def _command_prefix(config: VenProgramConfig, event: OadrEvent) -> str:
    return (
        f"oadr-{_id_part(config.ven_name, 32)}-{_id_part(event.event_id, 48)}"
        f"-m{event.modification_number}"
    )


def _cancel_id(command_id: str) -> str:
    return f"{command_id}-cancel"


def _groups(event: OadrEvent, config: VenProgramConfig) -> list[str]:
    resource_targets = [t for t in event.targets if t.split(":", 1)[0] not in _VEN_TARGET_KINDS]
    if not resource_targets:
        if config.default_group is None:
            raise _refuse(
                OptOutReason.UNKNOWN_TARGET,
                "event targets the VEN as a whole and no default_group is configured",
            )
        return [config.default_group]
    groups = sorted({config.targets[t] for t in resource_targets if t in config.targets})
    if not groups:
        raise _refuse(
            OptOutReason.UNKNOWN_TARGET,
            f"none of the targets {', '.join(resource_targets)} maps to a group",
        )
    return groups


def _power_factor_kw(signal: OadrSignal, config: VenProgramConfig) -> float:
    if signal.units is None:
        if config.unitless_dispatch_unit is None:
            raise _refuse(
                OptOutReason.UNSUPPORTED_UNITS,
                f"{signal.name} signal without itemBase units",
            )
        return _POWER_UNITS_KW[config.unitless_dispatch_unit]
    if signal.measurement is not None and signal.measurement not in _POWER_MEASUREMENTS:
        raise _refuse(
            OptOutReason.UNSUPPORTED_UNITS,
            f"{signal.name} signal measures {signal.measurement}, not real power",
        )
    unit = _POWER_UNITS_KW.get(signal.units)
    scale = _SI_SCALE.get(signal.scale or "none")
    if unit is None or scale is None:
        raise _refuse(
            OptOutReason.UNSUPPORTED_UNITS,
            f"{signal.name} signal in {signal.scale or ''}{signal.units}: not a real-power unit",
        )
    return unit * scale


def _check_signals(event: OadrEvent, config: VenProgramConfig) -> dict[str, OadrSignal]:
    by_name: dict[str, OadrSignal] = {}
    for signal in event.signals:
        name = "SIMPLE" if signal.name == "simple" else signal.name
        if name not in config.signals:
            raise _refuse(OptOutReason.UNSUPPORTED_SIGNAL, f"signal {signal.name} not supported")
        allowed = {
            "LOAD_DISPATCH": ("delta", "setpoint"),
            "SIMPLE": ("level",),
            "LOAD_CONTROL": ("x-loadControlCapacity",),
            "ELECTRICITY_PRICE": ("price",),
        }[name]
        if signal.type not in allowed:
            raise _refuse(
                OptOutReason.UNSUPPORTED_SIGNAL_TYPE,
                f"signal {signal.name} of type {signal.type} not supported "
                f"(supported: {', '.join(allowed)})",
            )
        if name in by_name:
            raise _refuse(OptOutReason.UNSUPPORTED_SIGNAL, f"more than one {name} signal")
        for interval in signal.intervals:
            if not math.isfinite(interval.value):
                raise _refuse(OptOutReason.INVALID_VALUE, f"{name} value {interval.value}")
            if interval.duration_s <= 0:
                raise _refuse(
                    OptOutReason.INVALID_WINDOW,
                    f"{name} interval duration {interval.duration_s:g} s is not positive",
                )
        by_name[name] = signal
    return by_name


_PRICE_PER_KWH: Final = {None: 1.0, "currencyPerKWh": 1.0, "currencyPerMWh": 0.001}


def _price_factor(signal: OadrSignal) -> float:
    """Per-kWh factor of an ELECTRICITY_PRICE signal's values (itemBase currencyPerKWh or
    currencyPerMWh, scale none; no itemBase: per kWh)."""
    if signal.measurement not in _PRICE_PER_KWH:
        raise _refuse(
            OptOutReason.UNSUPPORTED_UNITS,
            f"ELECTRICITY_PRICE in {signal.measurement} (supported: currencyPerKWh, "
            "currencyPerMWh)",
        )
    if signal.scale not in (None, "none"):
        raise _refuse(OptOutReason.UNSUPPORTED_UNITS, f"ELECTRICITY_PRICE scale {signal.scale}")
    return _PRICE_PER_KWH[signal.measurement]


@dataclass(frozen=True, slots=True)
class PriceInterval:
    group_id: str
    start: datetime
    duration_s: float
    price_per_kwh: float
    currency: str | None


def price_intervals(
    distribution: Distribution, config: VenProgramConfig, now: datetime
) -> list[PriceInterval]:
    """Every ELECTRICITY_PRICE interval (per kWh) of the distribution's events in force or to
    come, per group the event targets. Events this VEN refuses (a malformed one, cancelled,
    a test event, units it cannot read, a target it cannot map) give none."""
    out: list[PriceInterval] = []
    if "ELECTRICITY_PRICE" not in config.signals:
        return out
    for event in distribution.events:
        if isinstance(event, MalformedEvent) or event.test_event:
            continue
        if event.status in (EventStatus.CANCELLED, EventStatus.COMPLETED) or event.end <= now:
            continue
        try:
            signals = _check_signals(event, config)
            price = signals.get("ELECTRICITY_PRICE")
            if price is None:
                continue
            factor = _price_factor(price)
            groups = _groups(event, config)
        except EventRefused:
            continue
        for interval in price.intervals:
            if interval.start + timedelta(seconds=interval.duration_s) <= now:
                continue
            for group in groups:
                out.append(
                    PriceInterval(
                        group, interval.start, interval.duration_s,
                        interval.value * factor, price.units,
                    )
                )
    return out


def translate(
    event: OadrEvent,
    config: VenProgramConfig,
    now: datetime,
    startafter_s: float,
    capacity: Mapping[str, GroupCapacity] | None = None,
) -> list[Command]:
    """The commands for one event (one modification); raises :class:`EventRefused` with the
    reason to opt out with. ``startafter_s`` shifts every interval."""
    if event.duration_s < 0:
        raise _refuse(
            OptOutReason.INVALID_WINDOW, f"negative event duration {event.duration_s:g} s"
        )
    if event.duration_s == 0:
        # 2.0b lets a duration of 0 mean "until further notice"; a unified command needs an end.
        raise _refuse(OptOutReason.INVALID_WINDOW, "open-ended events (duration 0) not supported")
    shift = timedelta(seconds=startafter_s)
    if event.status == EventStatus.COMPLETED or event.end + shift <= now:
        raise _refuse(
            OptOutReason.ALREADY_ENDED, f"event ended at {(event.end + shift).isoformat()}"
        )
    signals = _check_signals(event, config)
    groups = _groups(event, config)
    if event.test_event:
        return []  # a test event is answered but moves no device
    prefix = _command_prefix(config, event)
    common: dict[str, Any] = {
        "program": config.program,
        "priority": config.priority,
        "issued_at": event.created,
    }
    commands: list[Command] = []
    try:
        dispatch = signals.get("LOAD_DISPATCH") or signals.get("SIMPLE")
        if dispatch is not None:
            commands.extend(
                _dispatches(dispatch, event, config, now, shift, groups, prefix, common, capacity)
            )
        limit = signals.get("LOAD_CONTROL")
        if limit is not None:
            commands.extend(_envelopes(limit, now, shift, groups, prefix, common, capacity))
        price = signals.get("ELECTRICITY_PRICE")
        if price is not None:  # no command: the VEN puts its prices in the price store
            factor = _price_factor(price)
            for interval in price.intervals:
                if abs(interval.value * factor) > MAX_ABS_PRICE:
                    raise _refuse(
                        OptOutReason.INVALID_VALUE,
                        f"ELECTRICITY_PRICE {interval.value:g} is beyond ±{MAX_ABS_PRICE:g}/kWh",
                    )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise _refuse(OptOutReason.INVALID_VALUE, first["msg"]) from None
    return commands


def _dispatches(
    signal: OadrSignal,
    event: OadrEvent,
    config: VenProgramConfig,
    now: datetime,
    shift: timedelta,
    groups: Sequence[str],
    prefix: str,
    common: Mapping[str, Any],
    capacity: Mapping[str, GroupCapacity] | None,
) -> Iterable[Dispatch]:
    simple = signal.name.upper() == "SIMPLE"
    factor = 1.0 if simple else _power_factor_kw(signal, config)
    mode = DispatchMode.TARGET if signal.type == "setpoint" else DispatchMode.DELTA
    for n, interval in enumerate(signal.intervals):
        start = interval.start + shift
        if start + timedelta(seconds=interval.duration_s) <= now:
            continue  # already over: the book would refuse it as already_ended
        # The ramp belongs to the event's first interval only: later ones continue from it.
        ramp = min(event.ramp_up_s, interval.duration_s, _MAX_RAMP_S) if n == 0 else 0.0
        for k, group in enumerate(groups):
            if simple:
                kw = _level_kw(interval.value, group, config, capacity)
                if kw is None:
                    continue
            else:
                kw = interval.value * factor
            suffix = f"-g{k}" if len(groups) > 1 else ""
            yield Dispatch(
                command_id=f"{prefix}-i{n}{suffix}",
                target=Target(group_id=group),
                mode=mode,
                kw=round(kw, 6),
                start=start,
                duration_s=interval.duration_s,
                ramp_s=max(ramp, 0.0),
                **common,
            )


def _level_kw(
    value: float,
    group: str,
    config: VenProgramConfig,
    capacity: Mapping[str, GroupCapacity] | None,
) -> float | None:
    level = int(value)
    if level != value or level not in config.simple_levels:
        raise _refuse(OptOutReason.INVALID_VALUE, f"SIMPLE level {value:g} is not configured")
    action = config.simple_levels[level]
    if action.kw is not None:
        return action.kw
    if action.fraction is None or action.fraction == 0:
        return None
    cap = (capacity or {}).get(group)
    if cap is None or cap.shed_kw <= 0:
        raise _refuse(OptOutReason.NO_CAPACITY, f"no shed capacity known for group {group}")
    return -action.fraction * cap.shed_kw


def _envelopes(
    signal: OadrSignal,
    now: datetime,
    shift: timedelta,
    groups: Sequence[str],
    prefix: str,
    common: Mapping[str, Any],
    capacity: Mapping[str, GroupCapacity] | None,
) -> Iterable[OperatingEnvelope]:
    """``x-loadControlCapacity``: load held to a fraction of its capacity → an import limit."""
    for k, group in enumerate(groups):
        cap = (capacity or {}).get(group)
        if cap is None or cap.import_kw <= 0:
            raise _refuse(OptOutReason.NO_CAPACITY, f"no import capacity known for group {group}")
        intervals = []
        for interval in signal.intervals:
            if not 0 <= interval.value <= 1:
                raise _refuse(
                    OptOutReason.INVALID_VALUE,
                    f"x-loadControlCapacity {interval.value:g} is not a fraction in [0, 1]",
                )
            start = interval.start + shift
            end = start + timedelta(seconds=interval.duration_s)
            if end <= now:
                continue
            intervals.append(
                EnvelopeInterval(
                    start=start, end=end, import_limit_kw=round(interval.value * cap.import_kw, 6)
                )
            )
        if intervals:
            suffix = f"-g{k}" if len(groups) > 1 else ""
            yield OperatingEnvelope(
                command_id=f"{prefix}-env{suffix}",
                target=Target(group_id=group),
                intervals=tuple(intervals),
                **common,
            )


# --------------------------------------------------------------------------- reconciliation


def _end_of(command: Command) -> datetime:
    if isinstance(command, Cancel):
        raise TypeError("a cancel has no window")
    return command.end


def _cancels(record: EventRecord, now: datetime, config: VenProgramConfig) -> list[Command]:
    """Cancel what this record issued and is not over yet (ended ones cannot be cancelled)."""
    return [
        Cancel(
            command_id=_cancel_id(issued.command_id),
            cancels=issued.command_id,
            program=config.program,
            priority=config.priority,
        )
        for issued in record.issued
        if issued.end > now
    ]


def _carried_cancels(record: EventRecord | None) -> list[Command]:
    return [c for c in record.outbox if isinstance(c, Cancel)] if record is not None else []


def reconcile(
    previous: VenState,
    distribution: Distribution,
    now: datetime,
    draw: StartAfterDraw,
    config: VenProgramConfig,
    capacity: Mapping[str, GroupCapacity] | None = None,
) -> tuple[VenState, list[Command], list[OptResponse]]:
    """Compare a distribution with what we did before.

    Returns the new state, the commands to submit (new commands first, then cancels of the ones
    they replace, so a modification never leaves a gap), and the opt responses owed to the VTN
    (only for events whose ``response_required`` is ``always``). Commands stay in each record's
    outbox until :func:`settle` confirms them.
    """
    records = dict(previous.events)
    commands: list[Command] = []
    responses: list[OptResponse] = []
    seen: set[str] = set()
    for item in distribution.events:
        if isinstance(item, MalformedEvent):
            if item.event_id is None:
                continue
            seen.add(item.event_id)
            old = records.get(item.event_id)
            if old is not None and old.modification_number >= item.modification_number:
                if item.response_required:
                    responses.append(old.response(item.modification_number))
                continue
            cancels = (_cancels(old, now, config) if old else []) + _carried_cancels(old)
            record = EventRecord(
                event_id=item.event_id,
                modification_number=item.modification_number,
                status=RecordStatus.OPTED_OUT,
                startafter_s=old.startafter_s if old else 0.0,
                opt=OptType.OPT_OUT,
                response_code=ResponseCode.INVALID_DATA,
                reason=OptOutReason.MALFORMED_EVENT,
                detail=item.detail,
                response_required=item.response_required,
                outbox=tuple(cancels),
                end=old.end if old else now,
                updated_at=now,
            )
        else:
            seen.add(item.event_id)
            old = records.get(item.event_id)
            cancelled = item.status == EventStatus.CANCELLED
            newly_cancelled = cancelled and (
                old is None or old.status is not RecordStatus.CANCELLED
            )
            if (
                old is not None
                and old.modification_number >= item.modification_number
                and not newly_cancelled
            ):
                # A repeat (or a stale copy): nothing new, answer as we did before.
                if item.response_required:
                    responses.append(old.response(item.modification_number))
                continue
            record = _apply(item, old, now, draw, config, capacity)
        records[record.event_id] = record
        commands.extend(record.outbox)
        if record.response_required:
            responses.append(record.response())

    for event_id, old in previous.events.items():
        if event_id in seen:
            continue
        if old.status is RecordStatus.ACTIVE:
            # Implied cancel: the VTN no longer lists the event.
            cancels = _cancels(old, now, config) + _carried_cancels(old)
            records[event_id] = old.model_copy(
                update={
                    "status": RecordStatus.CANCELLED,
                    "issued": (),
                    "outbox": tuple(cancels),
                    "detail": "implied cancel: missing from the distribution",
                    "updated_at": now,
                }
            )
            commands.extend(cancels)
        elif old.end + timedelta(seconds=config.retention_s) <= now and not old.outbox:
            del records[event_id]
    return VenState(events=records), commands, responses


def _apply(
    event: OadrEvent,
    old: EventRecord | None,
    now: datetime,
    draw: StartAfterDraw,
    config: VenProgramConfig,
    capacity: Mapping[str, GroupCapacity] | None,
) -> EventRecord:
    """A new event, a modification or a cancellation: the record that replaces ``old``."""
    cancels = (_cancels(old, now, config) if old else []) + _carried_cancels(old)
    if old is not None:
        # Drawn once per event; a modification may only narrow the window, never re-draw.
        startafter = min(old.startafter_s, max(event.startafter_s, 0.0))
    elif event.startafter_s > 0:
        startafter = min(max(draw(event.event_id, event.startafter_s), 0.0), event.startafter_s)
    else:
        startafter = 0.0
    base = {
        "event_id": event.event_id,
        "modification_number": event.modification_number,
        "startafter_s": startafter,
        "response_required": event.response_required,
        "end": event.end + timedelta(seconds=startafter),
        "updated_at": now,
    }
    if event.status == EventStatus.CANCELLED:
        # Acknowledge the cancellation with optIn: we comply with it.
        return EventRecord(
            **base, status=RecordStatus.CANCELLED, opt=OptType.OPT_IN, outbox=tuple(cancels)
        )
    try:
        new = translate(event, config, now, startafter, capacity)
    except EventRefused as refusal:
        return EventRecord(
            **base,
            status=RecordStatus.OPTED_OUT,
            opt=OptType.OPT_OUT,
            response_code=_REASON_CODES.get(refusal.reason, ResponseCode.OK),
            reason=refusal.reason.value,
            detail=refusal.detail,
            outbox=tuple(cancels),
        )
    return EventRecord(
        **base,
        status=RecordStatus.ACTIVE,
        opt=OptType.OPT_IN,
        issued=tuple(IssuedCommand(command_id=c.command_id, end=_end_of(c)) for c in new),
        outbox=(*new, *cancels),
    )


_FAILED: Final = frozenset({AckState.REJECTED, AckState.FAILED})


def settle(
    state: VenState,
    event_id: str,
    outcomes: Mapping[str, tuple[AckState, str | None, str | None]],
    now: datetime,
    config: VenProgramConfig,
) -> tuple[VenState, OptResponse | None]:
    """Take the gateway's answers to an event's outbox: ``command_id -> (state, reason, detail)``.

    If any new command was refused, the whole event is opted out with the gateway's reason and
    the commands it did accept are cancelled (they go into the outbox, to be submitted and
    settled in turn). A cancel that is refused is fine: the command already ended or was
    superseded. Returns the response to send if it changed.
    """
    record = state.events.get(event_id)
    if record is None:
        return state, None
    failures = [
        (cid, outcome)
        for cid, outcome in outcomes.items()
        if outcome[0] in _FAILED and any(i.command_id == cid for i in record.issued)
    ]
    if not failures:
        updated = record.model_copy(update={"outbox": (), "updated_at": now})
        return VenState(events={**state.events, event_id: updated}), None
    command_id, (_, reason, detail) = failures[0]
    accepted = record.model_copy(
        update={"issued": tuple(i for i in record.issued if i.command_id not in dict(failures))}
    )
    updated = record.model_copy(
        update={
            "status": RecordStatus.OPTED_OUT,
            "opt": OptType.OPT_OUT,
            "response_code": ResponseCode.OK,
            "reason": reason or "rejected",
            "detail": f"{command_id}: {detail}" if detail else command_id,
            "issued": (),
            "outbox": tuple(_cancels(accepted, now, config)),
            "updated_at": now,
        }
    )
    return VenState(events={**state.events, event_id: updated}), updated.response()


def pending_commands(state: VenState) -> dict[str, tuple[Command, ...]]:
    """Outboxes not yet confirmed (after a crash): resubmit them, the book is idempotent."""
    return {eid: r.outbox for eid, r in state.events.items() if r.outbox}
