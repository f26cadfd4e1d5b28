"""EiOpt on the VTN side as pure functions: an ``oadrCreateOpt`` in, a schedule out (no I/O).

A VEN sends ``oadrCreateOpt`` either about one event (``qualifiedEventID``: the same as an
opt response to that event) or as an availability schedule: ``vavailability`` windows during
which the targeted resources are opted out of (or back into) dispatch. :func:`read_opt`
validates such a message against what the VTN knows about the VEN and returns an
:class:`OptSchedule`, or raises :class:`OptRefused` with the 2.0b response code to answer.

:func:`opt_out_in_force` answers "may the planner use this resource now?": among the windowed
schedules covering the resource at that instant, the one received last wins, so an opt-in
sent after an opt-out ends the opt-out early for the windows it covers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocols.openadr.messages import as_list

__all__ = [
    "MAX_OPT_WINDOWS",
    "OptRefused",
    "OptSchedule",
    "OptTarget",
    "OptWindow",
    "opt_out_in_force",
    "read_opt",
]

INVALID_ID: Final = 452
INVALID_DATA: Final = 454
NOT_AUTHORIZED: Final = 463

MAX_OPT_WINDOWS: Final = 100
_MAX_WINDOW: Final = timedelta(days=7)
_MAX_AHEAD: Final = timedelta(days=366)
_MAX_ID: Final = 128


class OptRefused(ValueError):
    """An opt message the VTN does not take; ``code`` is the 2.0b response code to answer."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


class OptWindow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    start: datetime
    end: datetime


class OptSchedule(BaseModel):
    """One opt a VEN sent, as persisted. Windowed (``windows``) or for one event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    opt_id: str
    ven_name: str
    opt_type: Literal["optIn", "optOut"]
    reason: str = ""
    market_context: str | None = None
    device_ids: tuple[str, ...]
    windows: tuple[OptWindow, ...] = ()
    event_id: str | None = None
    modification_number: int | None = Field(default=None, ge=0)
    received_at: datetime
    seq: int = Field(default=0, description="Order of receipt (ties on received_at)")

    def covers(self, device_id: str, now: datetime) -> bool:
        return device_id in self.device_ids and any(w.start <= now < w.end for w in self.windows)

    def expired(self, now: datetime) -> bool:
        """Every window is over (event opts are kept as long as their event)."""
        return bool(self.windows) and all(w.end <= now for w in self.windows)

    def window_at(self, now: datetime) -> OptWindow | None:
        return next((w for w in self.windows if w.start <= now < w.end), None)

    def same_request(self, other: OptSchedule) -> bool:
        """A repeated delivery of the same opt (receipt time aside)."""
        mine = self.model_dump(exclude={"received_at", "seq"})
        return mine == other.model_dump(exclude={"received_at", "seq"})


@dataclass(frozen=True, slots=True)
class OptTarget:
    """A resource of the VEN that an opt may name."""

    device_id: str
    resource_id: str
    market_context: str


def opt_out_in_force(
    schedules: Iterable[OptSchedule], device_id: str, now: datetime
) -> OptSchedule | None:
    """The opt-out schedule that keeps ``device_id`` out of dispatch at ``now``, if any."""
    covering = [s for s in schedules if s.windows and s.covers(device_id, now)]
    if not covering:
        return None
    last = max(covering, key=lambda s: (s.received_at, s.seq))
    return last if last.opt_type == "optOut" else None


def _short(value: object) -> str:
    return str(value)[:_MAX_ID]


def _windows(payload: Mapping[str, Any], now: datetime) -> tuple[OptWindow, ...]:
    availability = payload.get("vavailability")
    if availability is None:
        return ()
    components = availability.get("components") if isinstance(availability, Mapping) else None
    available = components.get("available") if isinstance(components, Mapping) else None
    items = as_list(available)
    if not items:
        raise OptRefused(INVALID_DATA, "vavailability has no available component")
    if len(items) > MAX_OPT_WINDOWS:
        raise OptRefused(INVALID_DATA, f"more than {MAX_OPT_WINDOWS} availability windows")
    windows = []
    for n, item in enumerate(items, 1):
        # openleadr's parser keeps ``properties`` for several components, drops it for one.
        properties = item.get("properties", item) if isinstance(item, Mapping) else None
        start = properties.get("dtstart") if isinstance(properties, Mapping) else None
        duration = properties.get("duration") if isinstance(properties, Mapping) else None
        if not isinstance(start, datetime) or start.tzinfo is None:
            raise OptRefused(INVALID_DATA, f"window {n}: dtstart is not a UTC date-time")
        if not isinstance(duration, timedelta) or duration <= timedelta(0):
            raise OptRefused(INVALID_DATA, f"window {n}: duration must be positive")
        if duration > _MAX_WINDOW:
            raise OptRefused(INVALID_DATA, f"window {n}: longer than {_MAX_WINDOW.days} days")
        if start > now + _MAX_AHEAD:
            raise OptRefused(INVALID_DATA, f"window {n}: starts more than a year ahead")
        windows.append(OptWindow(start=start, end=start + duration))
    if all(w.end <= now for w in windows):
        raise OptRefused(INVALID_DATA, "every availability window is already over")
    return tuple(sorted(windows, key=lambda w: w.start))


def _targeted_devices(
    payload: Mapping[str, Any],
    *,
    ven_id: str,
    targets: Iterable[OptTarget],
    market_context: str | None,
) -> tuple[str, ...]:
    own = list(targets)
    by_name: dict[str, str] = {}
    for t in own:
        by_name[t.resource_id] = t.device_id
        by_name.setdefault(t.resource_id.split(";", 1)[0], t.device_id)
    named: list[str] = []
    for target in as_list(payload.get("targets")):
        if not isinstance(target, Mapping):
            continue
        for key, value in target.items():
            if value is None:
                continue
            if key == "ven_id":
                if str(value) != ven_id:
                    raise OptRefused(
                        NOT_AUTHORIZED, f"a VEN may only opt for itself, not {_short(value)!r}"
                    )
            elif key == "resource_id":
                device = by_name.get(str(value))
                if device is None:
                    raise OptRefused(INVALID_ID, f"unknown resource {_short(value)!r}")
                named.append(device)
            else:
                raise OptRefused(INVALID_DATA, f"unsupported opt target {key}")
    if named:
        chosen = dict.fromkeys(named)
        if market_context is not None:
            outside = [
                t.device_id
                for t in own
                if t.device_id in chosen and t.market_context != market_context
            ]
            if outside:
                raise OptRefused(
                    INVALID_ID,
                    f"resource {outside[0]} is not in market context {market_context[:_MAX_ID]!r}",
                )
        return tuple(chosen)
    # No resource named: the whole VEN (within the market context, if one is given).
    chosen_all = [
        t.device_id for t in own if market_context is None or t.market_context == market_context
    ]
    return tuple(dict.fromkeys(chosen_all))


def _named_resources(payload: Mapping[str, Any]) -> bool:
    return any(
        isinstance(t, Mapping) and t.get("resource_id") is not None
        for t in as_list(payload.get("targets"))
    )


def read_opt(
    payload: Mapping[str, Any],
    *,
    ven_name: str,
    ven_id: str,
    targets: Iterable[OptTarget],
    market_contexts: Iterable[str],
    events: Mapping[str, tuple[int, str]],
    now: datetime,
    seq: int = 0,
) -> OptSchedule:
    """Validate an ``oadrCreateOpt`` payload (openleadr's parse) from VEN ``ven_name``.

    ``targets`` are the VEN's enrolled resources, ``market_contexts`` its programs' contexts and
    ``events`` its events (id → current modification number and the event's device).
    """
    opt_id = payload.get("opt_id")
    if not opt_id or len(str(opt_id)) > _MAX_ID:
        raise OptRefused(INVALID_ID, "optID missing or longer than 128 characters")
    opt_type = payload.get("opt_type")
    if opt_type not in ("optIn", "optOut"):
        raise OptRefused(INVALID_DATA, f"optType {_short(opt_type)!r} is neither optIn nor optOut")
    if str(payload.get("ven_id")) != ven_id:
        raise OptRefused(NOT_AUTHORIZED, "venID does not match the registration")
    market_context = payload.get("market_context")
    if market_context is not None:
        market_context = str(market_context)
        if market_context not in set(market_contexts):
            raise OptRefused(INVALID_ID, f"unknown market context {market_context[:_MAX_ID]!r}")
    event_id = payload.get("event_id")
    modification = payload.get("modification_number")
    if event_id is not None:
        event_id = str(event_id)
        known = events.get(event_id)
        if known is None:
            raise OptRefused(INVALID_ID, f"unknown event {event_id[:_MAX_ID]!r}")
        current, event_device = known
        if modification is None:
            modification = current
        if not isinstance(modification, int) or not 0 <= modification <= current:
            raise OptRefused(
                INVALID_DATA,
                f"event {event_id} has no modification {_short(modification)} (current {current})",
            )
        windows: tuple[OptWindow, ...] = ()
    else:
        windows = _windows(payload, now)
        if not windows:
            raise OptRefused(INVALID_DATA, "an opt needs either an event or vavailability windows")
        modification = None
    devices = _targeted_devices(
        payload, ven_id=ven_id, targets=targets, market_context=market_context
    )
    if event_id is not None:
        if set(devices) - {event_device} and _named_resources(payload):
            raise OptRefused(INVALID_ID, f"event {event_id} does not target those resources")
        devices = (event_device,)
    elif not devices:
        raise OptRefused(INVALID_ID, "the opt targets no resource of this VEN")
    return OptSchedule(
        opt_id=str(opt_id),
        ven_name=ven_name,
        opt_type=opt_type,
        reason=_short(payload.get("opt_reason") or ""),
        market_context=market_context,
        device_ids=devices,
        windows=windows,
        event_id=event_id,
        modification_number=modification,
        received_at=now,
        seq=seq,
    )
