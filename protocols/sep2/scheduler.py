"""IEEE 2030.5 DER event scheduling: which control is in force now, and why. Pure, no I/O.

A 2030.5 client sees several DERPrograms, each with a list of DERControls (events) and a
DefaultDERControl. ``evaluate`` turns that, plus the current *server* time, into the effective
control per field, the event (or default) that supplied each field, the next instant anything
changes and the Responses the client still owes. The rules (IEEE 2030.5 §10.10 / CSIP-AUS, as
summarised in ``shared/PROTOCOLS.md``):

* **Precedence** between events: lower program ``primacy`` wins; at equal primacy the larger
  ``creationTime`` wins (envoy rewrites creationTime on every change, so "newest" really means
  "most recently changed"); the mRID breaks any remaining tie so the result is deterministic.
* **Per field**: precedence is decided for each DERControlBase field on its own, so an export
  limit from one event and an import limit from another can both be in force.
* **Randomization**: effective start = start + a draw in [0, randomizeStart] (the sign of
  randomizeStart gives the side of zero), effective end = nominal end + a draw in
  [0, randomizeDuration]. Draws are made once per event by ``draw_missing`` with an injected
  RNG and kept by the caller (persisted), so a poll or a restart never re-randomizes.
* **Back-to-back hand-over**: when an event B starts exactly where an event A ends and shares a
  field with it, A runs until B's *effective* start (2030.5: use the randomized start of the
  new event as the end of the previous one), so the default never shows through the gap that
  randomization would otherwise open.
* **Defaults**: a field no active event sets takes the DefaultDERControl value of the
  highest-precedence program whose default sets that field.
* **Cancellation**: a cancelled event (EventStatus 2) stays visible, is reported, and stops
  applying at once; "cancelled with randomization" (3) stops at the cancel time plus the
  event's own start draw, so a fleet does not step back in unison either.
* **Supersession**: an event is superseded when the server says so (EventStatus 4) or when, for
  the rest of its window, higher-precedence events set every field it sets (it would never
  apply). Partial overlaps are not supersession: the event applies where it wins.

Times are integer epoch seconds of the server's clock; ``ServerClock`` converts from local time
using the offset measured from ``/tm``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from protocols.sep2.models import DefaultDERControl, DERControl, DERControlBase, DERProgram
from protocols.sep2.units import to_watts

__all__ = [
    "CONTROL_FIELDS",
    "ControlSource",
    "CurrentStatus",
    "EventPhase",
    "EventState",
    "ProgramControls",
    "RandomDraw",
    "RandomSource",
    "ResponseDue",
    "ResponseStatus",
    "Schedule",
    "ServerClock",
    "SourceKind",
    "draw_for",
    "draw_missing",
    "evaluate",
    "event_key",
    "set_fields",
]

CONTROL_FIELDS: Final[tuple[str, ...]] = tuple(DERControlBase.model_fields)
"""Every DERControlBase field, in XSD order; the unit of conflict resolution."""

RandomSource = Callable[[int, int], int]
"""Returns an integer in [a, b] inclusive, like ``random.Random.randint``."""


class CurrentStatus(enum.IntEnum):
    """``EventStatus.currentStatus`` as the server reports it."""

    SCHEDULED = 0
    ACTIVE = 1
    CANCELLED = 2
    CANCELLED_WITH_RANDOMIZATION = 3
    SUPERSEDED = 4


class ResponseStatus(enum.IntEnum):
    """Response.status values for events (IEEE 2030.5 Table 27)."""

    RECEIVED = 1
    STARTED = 2
    COMPLETED = 3
    OPT_OUT = 4
    OPT_IN = 5
    CANCELLED = 6
    SUPERSEDED = 7
    PARTIAL_OPT_OUT = 8
    PARTIAL_OPT_IN = 9
    COMPLETED_NO_PARTICIPATION = 10
    ACKNOWLEDGED = 11
    NO_DISPLAY = 12
    ABORTED_BY_SERVER = 13
    ABORTED_BY_PROGRAM = 14
    REJECTED_NOT_APPLICABLE = 252
    REJECTED_INVALID = 253
    REJECTED_EXPIRED = 254


_TERMINAL: Final = frozenset(
    {ResponseStatus.COMPLETED, ResponseStatus.CANCELLED, ResponseStatus.SUPERSEDED}
)
# responseRequired bits: 0 = on receipt, 1 = on event status changes (start/complete/...).
_RESPOND_ON_RECEIPT: Final = 0x01
_RESPOND_ON_STATUS: Final = 0x02


class EventPhase(enum.StrEnum):
    """What an event is doing at the evaluation instant, from the client's point of view."""

    SCHEDULED = "scheduled"
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"


class SourceKind(enum.StrEnum):
    EVENT = "event"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class RandomDraw:
    """The offsets drawn once for one event, in seconds."""

    start_s: int = 0
    duration_s: int = 0


@dataclass(frozen=True, slots=True)
class ProgramControls:
    """One DERProgram as the client last saw it: its events and its default."""

    program: DERProgram
    controls: tuple[DERControl, ...] = ()
    default: DefaultDERControl | None = None


@dataclass(frozen=True, slots=True)
class ControlSource:
    """Where an effective field value came from, so an operator can ask "why this limit?"."""

    kind: SourceKind
    mrid: str
    """The event's mRID (or the DefaultDERControl's), as the server sent it."""
    program_mrid: str
    primacy: int
    href: str | None


@dataclass(frozen=True, slots=True)
class EventState:
    """One event's computed timing and phase at the evaluation instant."""

    mrid: str
    program_mrid: str
    phase: EventPhase
    effective_start: int
    effective_end: int
    """After randomization, hand-over and cancellation."""
    supplies: frozenset[str]
    """Fields this event supplies right now (empty unless it wins a field)."""


@dataclass(frozen=True, slots=True)
class ResponseDue:
    """A Response the client owes: POST ``status`` for ``subject`` to ``reply_to``."""

    key: str
    subject: str
    """The event's mRID exactly as received (envoy echoes and matches it as sent)."""
    reply_to: str
    status: ResponseStatus


@dataclass(frozen=True, slots=True)
class Schedule:
    """The result of one evaluation."""

    at: float
    controls: DERControlBase
    """The effective control: each field from its winning event or default; None = no limit."""
    sources: Mapping[str, ControlSource]
    """Field name → what supplied it (fields without a value are absent)."""
    next_change: int | None
    """The next server time at which the effective control or an event phase may change."""
    responses: tuple[ResponseDue, ...]
    events: Mapping[str, EventState]
    """By event key (lower-case mRID)."""

    def source_of(self, field: str) -> ControlSource | None:
        return self.sources.get(field)


@dataclass(frozen=True, slots=True)
class ServerClock:
    """The server's clock as seen from ours: ``server = local + offset_s``.

    2030.5 schedules are in server time, and devices' clocks drift; CSIP requires clients to
    follow the server's ``/tm``.
    """

    offset_s: float = 0.0

    @classmethod
    def from_exchange(cls, server_time: int, sent_at: float, received_at: float) -> ServerClock:
        """Offset from one GET of ``/tm`` sent at ``sent_at`` and answered at ``received_at``.

        The server read its clock somewhere in the round trip, so the midpoint is the best local
        estimate; ``currentTime`` is truncated to whole seconds, so its expected true value is
        half a second later.
        """
        return cls(server_time + 0.5 - (sent_at + received_at) / 2)

    def server_now(self, local_now: float) -> float:
        return local_now + self.offset_s

    def to_local(self, server_time: float) -> float:
        return server_time - self.offset_s


# --------------------------------------------------------------------------- helpers


def event_key(mrid: str) -> str:
    """The key of an event in draw/response ledgers: hex compares case-insensitively."""
    return mrid.strip().lower()


def set_fields(base: DERControlBase) -> frozenset[str]:
    """The DERControlBase fields that carry a value."""
    return frozenset(name for name in CONTROL_FIELDS if getattr(base, name) is not None)


def _bounds(limit: int | None) -> tuple[int, int]:
    value = limit or 0
    return (min(0, value), max(0, value))


def draw_for(control: DERControl, rng: RandomSource) -> RandomDraw:
    """Draw an event's randomization offsets (zero where it asks for none)."""
    start_lo, start_hi = _bounds(control.randomize_start)
    dur_lo, dur_hi = _bounds(control.randomize_duration)
    return RandomDraw(
        start_s=rng(start_lo, start_hi) if start_lo != start_hi else 0,
        duration_s=rng(dur_lo, dur_hi) if dur_lo != dur_hi else 0,
    )


def _randomized(control: DERControl) -> bool:
    return bool(control.randomize_start) or bool(control.randomize_duration)


def draw_missing(
    programs: Iterable[ProgramControls], draws: Mapping[str, RandomDraw], rng: RandomSource
) -> dict[str, RandomDraw]:
    """``draws`` plus a new draw for every randomized event that has none yet.

    Existing draws are never replaced: an event is randomized once for its lifetime, whatever
    happens to polls or to the process.
    """
    out = dict(draws)
    for program in programs:
        for control in program.controls:
            key = event_key(control.mrid)
            if key not in out and _randomized(control):
                out[key] = draw_for(control, rng)
    return out


def _clamp(value: int, limit: int | None) -> int:
    lo, hi = _bounds(limit)
    return max(lo, min(hi, value))


# --------------------------------------------------------------------------- evaluation


@dataclass(slots=True)
class _Event:
    key: str
    control: DERControl
    program: DERProgram
    fields: frozenset[str]
    rank: tuple[int, int, str]
    nominal_start: int
    nominal_end: int
    start: int
    end: int
    status: int | None
    stop_at: int | None  # cancellation instant, if cancelled

    @property
    def cancelled(self) -> bool:
        return self.status in (
            CurrentStatus.CANCELLED,
            CurrentStatus.CANCELLED_WITH_RANDOMIZATION,
        )

    @property
    def server_superseded(self) -> bool:
        return self.status == CurrentStatus.SUPERSEDED

    @property
    def window_end(self) -> int:
        return self.end if self.stop_at is None else max(self.start, min(self.end, self.stop_at))

    def in_force(self, t: float) -> bool:
        return not self.server_superseded and self.start <= t < self.window_end


def _events(programs: Sequence[ProgramControls], draws: Mapping[str, RandomDraw]) -> list[_Event]:
    events: list[_Event] = []
    seen: set[str] = set()
    for program in programs:
        for control in program.controls:
            key = event_key(control.mrid)
            if key in seen:  # the same event reachable through two FSAs
                continue
            seen.add(key)
            if _randomized(control) and key not in draws:
                raise ValueError(f"event {control.mrid} is randomized but has no draw")
            draw = draws.get(key, RandomDraw())
            nominal_start = control.interval.start
            nominal_end = nominal_start + control.interval.duration
            # Clamp: a server may change the randomization bounds of a known event.
            start = nominal_start + _clamp(draw.start_s, control.randomize_start)
            end = max(start, nominal_end + _clamp(draw.duration_s, control.randomize_duration))
            status = control.event_status.current_status if control.event_status else None
            stop_at: int | None = None
            if status == CurrentStatus.CANCELLED:
                stop_at = -(2**62)
            elif status == CurrentStatus.CANCELLED_WITH_RANDOMIZATION:
                assert control.event_status is not None
                stop_at = control.event_status.date_time + abs(draw.start_s)
            events.append(
                _Event(
                    key=key,
                    control=control,
                    program=program.program,
                    fields=set_fields(control.der_control_base),
                    rank=(program.program.primacy, -control.creation_time, key),
                    nominal_start=nominal_start,
                    nominal_end=nominal_end,
                    start=start,
                    end=end,
                    status=status,
                    stop_at=stop_at,
                )
            )
    _hand_over(events)
    return events


def _hand_over(events: list[_Event]) -> None:
    """End each event at the effective start of its back-to-back successor(s).

    Successors are events that start exactly at this one's nominal end, share a field with it
    and will run (not cancelled or superseded). With several, the latest effective start is
    used so that no shared field falls back to the default in between.
    """
    runnable = [e for e in events if not e.cancelled and not e.server_superseded]
    for event in events:
        starts = [
            other.start
            for other in runnable
            if other is not event
            and other.nominal_start == event.nominal_end
            and other.fields & event.fields
        ]
        if starts:
            event.end = max(event.start, *starts)


_LIMITS: Final = frozenset(
    {"op_mod_gen_lim_w", "op_mod_load_lim_w", "op_mod_exp_lim_w", "op_mod_imp_lim_w"}
)
"""Fields where, between events of equal primacy created at the same instant (several DERs'
programs, one per DER, at one site), the tighter value wins rather than the mRID's order."""


def _beats(event: _Event, current: _Event, name: str) -> bool:
    if name in _LIMITS and event.rank[:2] == current.rank[:2]:
        mine = getattr(event.control.der_control_base, name)
        theirs = getattr(current.control.der_control_base, name)
        if mine is not None and theirs is not None and to_watts(mine) != to_watts(theirs):
            return to_watts(mine) < to_watts(theirs)
    return event.rank < current.rank


def _winners(events: Sequence[_Event], t: float) -> dict[str, _Event]:
    winners: dict[str, _Event] = {}
    for event in events:
        if not event.in_force(t):
            continue
        for name in event.fields:
            current = winners.get(name)
            if current is None or _beats(event, current, name):
                winners[name] = event
    return winners


def _never_wins(event: _Event, events: Sequence[_Event], now: float) -> bool:
    """True if ``event`` sets fields but wins none of them for the rest of its window."""
    begin = max(float(event.start), now)
    end = event.window_end
    if not event.fields or begin >= end:
        return False
    instants = {begin}
    for other in events:
        for edge in (other.start, other.window_end):
            if begin < edge < end:
                instants.add(float(edge))
    for t in sorted(instants):
        winners = _winners(events, t)
        if any(winners.get(name) is event for name in event.fields):
            return False
    return True


def _phase(event: _Event, events: Sequence[_Event], now: float) -> EventPhase:
    if event.cancelled:
        return EventPhase.CANCELLED
    if event.server_superseded:
        return EventPhase.SUPERSEDED
    if now >= event.window_end:
        return EventPhase.COMPLETED
    if _never_wins(event, events, now):
        return EventPhase.SUPERSEDED
    if now < event.start:
        return EventPhase.SCHEDULED
    return EventPhase.ACTIVE


def _responses_for(
    event: _Event, phase: EventPhase, sent: frozenset[int], now: float
) -> list[ResponseStatus]:
    """What the client owes for one event, given what it already sent."""
    reply_to = event.control.reply_to
    required = int(event.control.response_required or "0", 16)
    if not reply_to or not required or sent & _TERMINAL:
        return []
    if not sent and now >= event.end:
        return []  # over before we ever saw it: nothing to acknowledge
    due: list[ResponseStatus] = []
    if required & _RESPOND_ON_RECEIPT and ResponseStatus.RECEIVED not in sent:
        due.append(ResponseStatus.RECEIVED)
    if required & _RESPOND_ON_STATUS:
        if phase is EventPhase.CANCELLED:
            due.append(ResponseStatus.CANCELLED)
        elif phase is EventPhase.SUPERSEDED:
            due.append(ResponseStatus.SUPERSEDED)
        elif phase is EventPhase.ACTIVE and ResponseStatus.STARTED not in sent:
            due.append(ResponseStatus.STARTED)
        elif phase is EventPhase.COMPLETED and ResponseStatus.STARTED in sent:
            due.append(ResponseStatus.COMPLETED)
    return due


def _defaults(programs: Sequence[ProgramControls]) -> dict[str, tuple[object, ControlSource]]:
    ordered = sorted(enumerate(programs), key=lambda ip: (ip[1].program.primacy, ip[0]))
    out: dict[str, tuple[object, ControlSource]] = {}
    for _, program in ordered:
        default = program.default
        if default is None:
            continue
        source = ControlSource(
            kind=SourceKind.DEFAULT,
            mrid=default.mrid,
            program_mrid=program.program.mrid,
            primacy=program.program.primacy,
            href=default.href,
        )
        for name in set_fields(default.der_control_base):
            if name not in out:
                out[name] = (getattr(default.der_control_base, name), source)
    return out


def evaluate(
    programs: Sequence[ProgramControls],
    now: float,
    draws: Mapping[str, RandomDraw],
    sent: Mapping[str, Iterable[int]] | None = None,
) -> Schedule:
    """The effective control at server time ``now``.

    ``draws`` must hold a draw for every randomized event (see ``draw_missing``); ``sent`` maps
    event keys to the Response statuses already posted, so only new ones are returned as due.
    """
    events = _events(programs, draws)
    winners = _winners(events, now)
    values: dict[str, object] = {}
    sources: dict[str, ControlSource] = {}
    for name, event in winners.items():
        values[name] = getattr(event.control.der_control_base, name)
        sources[name] = ControlSource(
            kind=SourceKind.EVENT,
            mrid=event.control.mrid,
            program_mrid=event.program.mrid,
            primacy=event.program.primacy,
            href=event.control.href,
        )
    for name, (value, source) in _defaults(programs).items():
        if name not in values:
            values[name] = value
            sources[name] = source

    states: dict[str, EventState] = {}
    responses: list[ResponseDue] = []
    sent = sent or {}
    for event in events:
        phase = _phase(event, events, now)
        states[event.key] = EventState(
            mrid=event.control.mrid,
            program_mrid=event.program.mrid,
            phase=phase,
            effective_start=event.start,
            effective_end=event.window_end,
            supplies=frozenset(n for n, w in winners.items() if w is event),
        )
        already = frozenset(sent.get(event.key, ()))
        for status in _responses_for(event, phase, already, now):
            assert event.control.reply_to is not None
            responses.append(
                ResponseDue(event.key, event.control.mrid, event.control.reply_to, status)
            )

    boundaries = [
        t for e in events if not e.server_superseded for t in (e.start, e.window_end) if t > now
    ]
    return Schedule(
        at=now,
        controls=DERControlBase.model_validate(values),
        sources=MappingProxyType(sources),
        next_change=min(boundaries) if boundaries else None,
        responses=tuple(responses),
        events=MappingProxyType(states),
    )
