"""Table-driven tests of the 2030.5 event scheduler: precedence, per-field mixing, randomization,
hand-over, cancellation, supersession, defaults and the Responses a client owes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from protocols.sep2 import (
    ActivePower,
    DateTimeInterval,
    DefaultDERControl,
    DERControl,
    DERControlBase,
    DERControlList,
    DERProgram,
    EventStatus,
    decode_as,
    from_watts,
    to_watts,
)
from protocols.sep2.scheduler import (
    ControlSource,
    EventPhase,
    ProgramControls,
    RandomDraw,
    ResponseStatus,
    Schedule,
    ServerClock,
    SourceKind,
    draw_for,
    draw_missing,
    evaluate,
)
from tests.protocols.sep2.envoy_fixtures import load

T0 = 1_795_822_020  # the envoy capture minute


# --------------------------------------------------------------------------- builders


def base(
    exp: float | None = None,
    imp: float | None = None,
    gen: float | None = None,
    load_w: float | None = None,
    *,
    connect: bool | None = None,
    energize: bool | None = None,
    fixed_pct: int | None = None,
    max_pct: int | None = None,
    target: float | None = None,
) -> DERControlBase:
    def w(x: float | None) -> ActivePower | None:
        return None if x is None else from_watts(x)

    return DERControlBase(
        op_mod_exp_lim_w=w(exp),
        op_mod_imp_lim_w=w(imp),
        op_mod_gen_lim_w=w(gen),
        op_mod_load_lim_w=w(load_w),
        op_mod_connect=connect,
        op_mod_energize=energize,
        op_mod_fixed_w=fixed_pct,
        op_mod_max_lim_w=max_pct,
        op_mod_target_w=w(target),
    )


def event(
    mrid: str,
    start: int,
    duration: int,
    controls: DERControlBase,
    *,
    created: int = T0 - 1000,
    status: int = 0,
    status_time: int | None = None,
    rs: int | None = None,
    rd: int | None = None,
    required: str | None = "03",
    reply_to: str | None = "/rsp",
) -> DERControl:
    return DERControl(
        href=f"/derc/{mrid}",
        reply_to=reply_to,
        response_required=required,
        mrid=mrid,
        creation_time=created,
        event_status=EventStatus(
            current_status=status,
            date_time=created if status_time is None else status_time,
            potentially_superseded=False,
        ),
        interval=DateTimeInterval(start=start, duration=duration),
        randomize_start=rs,
        randomize_duration=rd,
        der_control_base=controls,
    )


def default(mrid: str, controls: DERControlBase) -> DefaultDERControl:
    return DefaultDERControl(href=f"/dderc/{mrid}", mrid=mrid, der_control_base=controls)


def program(
    mrid: str,
    primacy: int,
    *controls: DERControl,
    dflt: DefaultDERControl | None = None,
) -> ProgramControls:
    return ProgramControls(
        program=DERProgram(href=f"/derp/{mrid}", mrid=mrid, primacy=primacy),
        controls=controls,
        default=dflt,
    )


def value_of(schedule: Schedule, name: str) -> float | bool | int | None:
    raw = getattr(schedule.controls, name)
    if isinstance(raw, ActivePower):
        return to_watts(raw)
    assert raw is None or isinstance(raw, bool | int)
    return raw


def supplier(schedule: Schedule, name: str) -> str | None:
    source = schedule.source_of(name)
    return None if source is None else source.mrid


# --------------------------------------------------------------------------- effective values

EXP = "op_mod_exp_lim_w"
IMP = "op_mod_imp_lim_w"
GEN = "op_mod_gen_lim_w"
LOAD = "op_mod_load_lim_w"
CONNECT = "op_mod_connect"
ENERGIZE = "op_mod_energize"
FIXED = "op_mod_fixed_w"
MAXLIM = "op_mod_max_lim_w"
TARGET = "op_mod_target_w"

D1 = default("d1", base(exp=5000, imp=9000))


@dataclass(frozen=True)
class Case:
    id: str
    programs: tuple[ProgramControls, ...]
    now: float
    expect: dict[str, tuple[float | bool | int | None, str | None]]
    """field → (value in W / bool / hundredths %, mRID of the supplier or None)."""
    draws: dict[str, RandomDraw] = field(default_factory=dict)


CASES = [
    Case("nothing at all", (), T0, {EXP: (None, None), IMP: (None, None)}),
    Case(
        "program without events or default",
        (program("a0", 0),),
        T0,
        {EXP: (None, None)},
    ),
    Case(
        "one active event",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1500, imp=7000))),),
        T0,
        {EXP: (1500, "e1"), IMP: (7000, "e1"), GEN: (None, None)},
    ),
    Case(
        "future event: the default applies",
        (program("a0", 0, event("e1", T0 + 60, 600, base(exp=1500)), dflt=D1),),
        T0,
        {EXP: (5000, "d1"), IMP: (9000, "d1")},
    ),
    Case(
        "past event: the default applies",
        (program("a0", 0, event("e1", T0 - 700, 600, base(exp=1500)), dflt=D1),),
        T0,
        {EXP: (5000, "d1")},
    ),
    Case(
        "start is inclusive",
        (program("a0", 0, event("e1", T0, 600, base(exp=1500)), dflt=D1),),
        T0,
        {EXP: (1500, "e1")},
    ),
    Case(
        "end is exclusive",
        (program("a0", 0, event("e1", T0 - 600, 600, base(exp=1500)), dflt=D1),),
        T0,
        {EXP: (5000, "d1")},
    ),
    Case(
        "event field wins, default fills the others",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1500)), dflt=D1),),
        T0,
        {EXP: (1500, "e1"), IMP: (9000, "d1")},
    ),
    Case(
        "lower primacy wins even when created earlier",
        (
            program("a0", 0, event("e1", T0 - 60, 600, base(exp=1000), created=T0 - 500)),
            program("b0", 1, event("e2", T0 - 60, 600, base(exp=4000), created=T0 - 10)),
        ),
        T0,
        {EXP: (1000, "e1")},
    ),
    Case(
        "primacy order does not depend on list order",
        (
            program("b0", 1, event("e2", T0 - 60, 600, base(exp=4000))),
            program("a0", 0, event("e1", T0 - 60, 600, base(exp=1000))),
        ),
        T0,
        {EXP: (1000, "e1")},
    ),
    Case(
        "equal primacy across programs: newer creationTime wins",
        (
            program("a0", 1, event("e1", T0 - 60, 600, base(exp=1000), created=T0 - 500)),
            program("b0", 1, event("e2", T0 - 60, 600, base(exp=4000), created=T0 - 10)),
        ),
        T0,
        {EXP: (4000, "e2")},
    ),
    Case(
        "same program: newer creationTime wins",
        (
            program(
                "a0",
                0,
                event("e1", T0 - 60, 600, base(exp=3000), created=T0 - 10),
                event("e2", T0 - 120, 900, base(exp=2800), created=T0 - 500),
            ),
        ),
        T0,
        {EXP: (3000, "e1")},
    ),
    Case(
        "per field: export from one event, import from another",
        (
            program("a0", 0, event("e1", T0 - 60, 600, base(exp=1000))),
            program("b0", 1, event("e2", T0 - 60, 600, base(exp=4000, imp=6000))),
        ),
        T0,
        {EXP: (1000, "e1"), IMP: (6000, "e2")},
    ),
    Case(
        "per field: site and device limits and on/off from three events",
        (
            program("a0", 0, event("e1", T0 - 60, 600, base(exp=0))),
            program("b0", 1, event("e2", T0 - 60, 600, base(gen=3000, load_w=4000))),
            program("c0", 2, event("e3", T0 - 60, 600, base(gen=1, connect=True, energize=False))),
        ),
        T0,
        {
            EXP: (0, "e1"),
            GEN: (3000, "e2"),
            LOAD: (4000, "e2"),
            CONNECT: (True, "e3"),
            ENERGIZE: (False, "e3"),
            IMP: (None, None),
        },
    ),
    Case(
        "percent controls pass through in hundredths",
        (program("a0", 0, event("e1", T0 - 60, 600, base(fixed_pct=5000, max_pct=8000))),),
        T0,
        {FIXED: (5000, "e1"), MAXLIM: (8000, "e1")},
    ),
    Case(
        "target W",
        (program("a0", 0, event("e1", T0 - 60, 600, base(target=-2500))),),
        T0,
        {TARGET: (-2500, "e1")},
    ),
    Case(
        "defaults per field from the highest-precedence program that sets it",
        (
            program("a0", 0, dflt=default("d1", base(exp=1500))),
            program("b0", 1, dflt=default("d2", base(exp=9999, imp=2020))),
        ),
        T0,
        {EXP: (1500, "d1"), IMP: (2020, "d2")},
    ),
    Case(
        "an empty default (envoy's 'no group default') shadows nothing",
        (
            program("a0", 0, dflt=default("d1", DERControlBase())),
            program("b0", 1, dflt=default("d2", base(exp=1919))),
        ),
        T0,
        {EXP: (1919, "d2")},
    ),
    Case(
        "an event in a lower-precedence program still beats a default",
        (
            program("a0", 0, dflt=default("d1", base(exp=1500))),
            program("b0", 5, event("e2", T0 - 60, 600, base(exp=4000))),
        ),
        T0,
        {EXP: (4000, "e2")},
    ),
    Case(
        "randomized start: not yet",
        (program("a0", 0, event("e1", T0 - 10, 600, base(exp=1500), rs=60), dflt=D1),),
        T0,
        {EXP: (5000, "d1")},
        {"e1": RandomDraw(start_s=30)},
    ),
    Case(
        "randomized start: started at start + draw",
        (program("a0", 0, event("e1", T0 - 30, 600, base(exp=1500), rs=60), dflt=D1),),
        T0,
        {EXP: (1500, "e1")},
        {"e1": RandomDraw(start_s=30)},
    ),
    Case(
        "negative randomizeStart starts early",
        (program("a0", 0, event("e1", T0 + 20, 600, base(exp=1500), rs=-60), dflt=D1),),
        T0,
        {EXP: (1500, "e1")},
        {"e1": RandomDraw(start_s=-20)},
    ),
    Case(
        "randomized duration extends the end",
        (program("a0", 0, event("e1", T0 - 630, 600, base(exp=1500), rd=60), dflt=D1),),
        T0,
        {EXP: (1500, "e1")},
        {"e1": RandomDraw(duration_s=45)},
    ),
    Case(
        "a draw outside new, narrower bounds is clamped",
        (program("a0", 0, event("e1", T0 - 10, 600, base(exp=1500), rs=10), dflt=D1),),
        T0,
        {EXP: (1500, "e1")},
        {"e1": RandomDraw(start_s=50)},
    ),
    Case(
        "back-to-back: the first event runs until the randomized start of the second",
        (
            program(
                "a0",
                0,
                event("e1", T0 - 620, 600, base(exp=1000)),
                event("e2", T0 - 20, 600, base(exp=2000), rs=60),
                dflt=D1,
            ),
        ),
        T0,
        {EXP: (1000, "e1")},
        {"e2": RandomDraw(start_s=40)},
    ),
    Case(
        "back-to-back: hand-over at the randomized start",
        (
            program(
                "a0",
                0,
                event("e1", T0 - 640, 600, base(exp=1000)),
                event("e2", T0 - 40, 600, base(exp=2000), rs=60),
                dflt=D1,
            ),
        ),
        T0,
        {EXP: (2000, "e2")},
        {"e2": RandomDraw(start_s=40)},
    ),
    Case(
        "back-to-back across programs: no gap either",
        (
            program("a0", 0, event("e1", T0 - 620, 600, base(exp=1000)), dflt=D1),
            program("b0", 1, event("e2", T0 - 20, 600, base(exp=2000), rs=60)),
        ),
        T0,
        {EXP: (1000, "e1")},
        {"e2": RandomDraw(start_s=40)},
    ),
    Case(
        "back-to-back with a negative draw: the first event ends early",
        (
            program(
                "a0",
                0,
                event("e1", T0 - 590, 600, base(exp=1000), created=T0 - 10),
                event("e2", T0 + 10, 600, base(exp=2000), rs=-60, created=T0 - 900),
                dflt=D1,
            ),
        ),
        T0,
        {EXP: (2000, "e2")},
        {"e2": RandomDraw(start_s=-30)},
    ),
    Case(
        "adjacent events on different fields are not a hand-over",
        (
            program(
                "a0",
                0,
                event("e1", T0 - 620, 600, base(exp=1000)),
                event("e2", T0 - 20, 600, base(imp=2000), rs=60),
                dflt=D1,
            ),
        ),
        T0,
        {EXP: (5000, "d1"), IMP: (9000, "d1")},
        {"e2": RandomDraw(start_s=40)},
    ),
    Case(
        "a cancelled successor is not handed over to",
        (
            program(
                "a0",
                0,
                event("e1", T0 - 620, 600, base(exp=1000)),
                event("e2", T0 - 20, 600, base(exp=2000), rs=60, status=2),
                dflt=D1,
            ),
        ),
        T0,
        {EXP: (5000, "d1")},
        {"e2": RandomDraw(start_s=40)},
    ),
    Case(
        "a cancelled event stops applying at once",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1500), status=2), dflt=D1),),
        T0,
        {EXP: (5000, "d1")},
    ),
    Case(
        "a cancelled event yields to a lower-precedence event",
        (
            program("a0", 0, event("e1", T0 - 60, 600, base(exp=1500), status=2)),
            program("b0", 1, event("e2", T0 - 60, 600, base(exp=4000))),
        ),
        T0,
        {EXP: (4000, "e2")},
    ),
    Case(
        "cancelled with randomization: still in force until cancel time + draw",
        (
            program(
                "a0",
                0,
                event("e1", T0 - 100, 600, base(exp=1500), rs=60, status=3, status_time=T0 - 20),
                dflt=D1,
            ),
        ),
        T0,
        {EXP: (1500, "e1")},
        {"e1": RandomDraw(start_s=0 + 30)},
    ),
    Case(
        "cancelled with randomization: gone after cancel time + draw",
        (
            program(
                "a0",
                0,
                event("e1", T0 - 100, 600, base(exp=1500), rs=60, status=3, status_time=T0 - 40),
                dflt=D1,
            ),
        ),
        T0,
        {EXP: (5000, "d1")},
        {"e1": RandomDraw(start_s=30)},
    ),
    Case(
        "a superseded event (status 4) is ignored; its successor applies",
        (
            program(
                "a0",
                0,
                event("e2", T0 - 60, 600, base(exp=2800), created=T0 - 10),
                event("e1", T0 - 60, 600, base(exp=3000), status=4, created=T0 - 10),
                dflt=D1,
            ),
        ),
        T0,
        {EXP: (2800, "e2")},
    ),
    Case(
        "a superseded event with nothing else falls back to the default",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=3000), status=4), dflt=D1),),
        T0,
        {EXP: (5000, "d1")},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_effective_values(case: Case) -> None:
    schedule = evaluate(case.programs, case.now, case.draws)
    for name, (value, mrid) in case.expect.items():
        assert value_of(schedule, name) == value, name
        assert supplier(schedule, name) == mrid, name


def test_sources_name_program_primacy_and_kind() -> None:
    programs = (
        program("a0", 0, event("e1", T0 - 60, 600, base(exp=1500)), dflt=D1),
        program("b0", 3, event("e2", T0 - 60, 600, base(gen=2000))),
    )
    schedule = evaluate(programs, T0, {})
    assert schedule.source_of(EXP) == ControlSource(SourceKind.EVENT, "e1", "a0", 0, "/derc/e1")
    assert schedule.source_of(GEN) == ControlSource(SourceKind.EVENT, "e2", "b0", 3, "/derc/e2")
    assert schedule.source_of(IMP) == ControlSource(SourceKind.DEFAULT, "d1", "a0", 0, "/dderc/d1")
    assert schedule.events["e1"].supplies == frozenset({EXP})
    assert schedule.events["e2"].supplies == frozenset({GEN})


@pytest.mark.parametrize("order", ["aa-bb", "bb-aa"])
def test_equal_primacy_and_creation_the_tighter_limit_wins_whatever_the_mrids(order: str) -> None:
    """Two DERs' programs at one site (one program per DER, same primacy, created together):
    which limit is in force must not depend on the mRIDs' order; the tighter one holds."""
    loose, tight = order.split("-")
    programs = (
        program("a1", 100, event(loose, T0 - 60, 600, base(gen=3000, target=3000))),
        program("a2", 100, event(tight, T0 - 60, 600, base(gen=2000))),
    )
    schedule = evaluate(programs, T0, {})
    assert value_of(schedule, GEN) == 2000
    assert supplier(schedule, GEN) == tight
    assert value_of(schedule, "op_mod_target_w") == 3000  # not a limit: rank decides


# --------------------------------------------------------------------------- next change


@pytest.mark.parametrize(
    ("programs", "now", "draws", "expected"),
    [
        pytest.param((), T0, {}, None, id="nothing scheduled"),
        pytest.param(
            (program("a0", 0, event("e1", T0 + 60, 600, base(exp=1))),), T0, {}, T0 + 60, id="start"
        ),
        pytest.param(
            (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1))),), T0, {}, T0 + 540, id="end"
        ),
        pytest.param(
            (program("a0", 0, event("e1", T0 + 60, 600, base(exp=1), rs=60)),),
            T0,
            {"e1": RandomDraw(start_s=17)},
            T0 + 77,
            id="randomized start",
        ),
        pytest.param(
            (
                program(
                    "a0",
                    0,
                    event("e1", T0 - 60, 600, base(exp=1)),
                    event("e2", T0 + 540, 600, base(exp=2), rs=60),
                ),
            ),
            T0,
            {"e2": RandomDraw(start_s=25)},
            T0 + 565,
            id="hand-over at the successor's effective start",
        ),
        pytest.param(
            (program("a0", 0, event("e1", T0 - 700, 600, base(exp=1))),), T0, {}, None, id="past"
        ),
    ],
)
def test_next_change(
    programs: tuple[ProgramControls, ...],
    now: float,
    draws: dict[str, RandomDraw],
    expected: int | None,
) -> None:
    assert evaluate(programs, now, draws).next_change == expected


def test_walking_next_change_never_falls_back_to_default_between_back_to_back_events() -> None:
    programs = (
        program(
            "a0",
            0,
            event("e1", T0, 600, base(exp=1000)),
            event("e2", T0 + 600, 600, base(exp=2000), rs=120),
            event("e3", T0 + 1200, 600, base(exp=3000), rs=120),
            dflt=D1,
        ),
    )
    draws = draw_missing(programs, {}, random.Random(7).randint)
    now: float = T0
    suppliers = []
    while True:
        schedule = evaluate(programs, now, draws)
        suppliers.append(supplier(schedule, EXP))
        if schedule.next_change is None:
            break
        now = schedule.next_change
    assert suppliers == ["e1", "e2", "e3", "d1"]


# --------------------------------------------------------------------------- randomization


def test_draws_are_made_once_and_kept() -> None:
    programs = (program("a0", 0, event("e1", T0, 600, base(exp=1), rs=60, rd=30)),)
    calls: list[tuple[int, int]] = []

    def rng(a: int, b: int) -> int:
        calls.append((a, b))
        return b

    first = draw_missing(programs, {}, rng)
    assert first == {"e1": RandomDraw(start_s=60, duration_s=30)}
    assert calls == [(0, 60), (0, 30)]
    again = draw_missing(programs, first, lambda a, b: a)
    assert again == first  # never re-randomized
    assert len(calls) == 2


def test_negative_bounds_and_no_randomization() -> None:
    assert draw_for(event("e1", T0, 60, base(exp=1), rs=-60), lambda a, b: a) == RandomDraw(-60)
    assert draw_missing((program("a0", 0, event("e1", T0, 60, base(exp=1))),), {}, min) == {}


def test_mrid_case_does_not_cause_a_second_draw() -> None:
    upper = (program("a0", 0, event("AB", T0, 600, base(exp=1), rs=60)),)
    lower = (program("a0", 0, event("ab", T0, 600, base(exp=1), rs=60)),)
    draws = draw_missing(upper, {}, lambda a, b: 11)
    assert draw_missing(lower, draws, lambda a, b: 22) == {"ab": RandomDraw(11)}


def test_a_missing_draw_is_an_error_not_silently_zero() -> None:
    programs = (program("a0", 0, event("e1", T0, 600, base(exp=1), rs=60)),)
    with pytest.raises(ValueError, match="e1"):
        evaluate(programs, T0, {})


def test_draws_are_spread_over_the_window() -> None:
    rng = random.Random(1)
    control = event("e1", T0, 600, base(exp=1), rs=100)
    starts = {draw_for(control, rng.randint).start_s for _ in range(200)}
    assert min(starts) >= 0
    assert max(starts) <= 100
    assert len(starts) > 50


# --------------------------------------------------------------------------- server time


def test_server_clock_offset_applies_to_schedules() -> None:
    # Our clock is an hour behind the server's: the event runs by the server's clock.
    local_sent, local_received = T0 - 3600.2, T0 - 3599.8
    clock = ServerClock.from_exchange(T0, local_sent, local_received)
    assert clock.offset_s == pytest.approx(3600.5)
    programs = (program("a0", 0, event("e1", T0 + 10, 600, base(exp=1500)), dflt=D1),)
    local_now = T0 - 3600 + 20
    assert supplier(evaluate(programs, local_now, {}), EXP) == "d1"  # local time: wrong
    server_now = clock.server_now(local_now)
    assert supplier(evaluate(programs, server_now, {}), EXP) == "e1"
    assert clock.to_local(server_now) == pytest.approx(local_now)


# --------------------------------------------------------------------------- phases, responses

R, S, C, X, SUP = (
    ResponseStatus.RECEIVED,
    ResponseStatus.STARTED,
    ResponseStatus.COMPLETED,
    ResponseStatus.CANCELLED,
    ResponseStatus.SUPERSEDED,
)


@dataclass(frozen=True)
class ResponseCase:
    id: str
    programs: tuple[ProgramControls, ...]
    now: float
    sent: dict[str, set[int]]
    due: list[tuple[str, ResponseStatus]]
    phase: dict[str, EventPhase] = field(default_factory=dict)


RESPONSE_CASES = [
    ResponseCase(
        "new scheduled event: received",
        (program("a0", 0, event("e1", T0 + 60, 600, base(exp=1))),),
        T0,
        {},
        [("e1", R)],
        {"e1": EventPhase.SCHEDULED},
    ),
    ResponseCase(
        "first seen while active: received then started",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1))),),
        T0,
        {},
        [("e1", R), ("e1", S)],
        {"e1": EventPhase.ACTIVE},
    ),
    ResponseCase(
        "started once",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1))),),
        T0,
        {"e1": {1, 2}},
        [],
    ),
    ResponseCase(
        "completed after it was started",
        (program("a0", 0, event("e1", T0 - 600, 600, base(exp=1))),),
        T0,
        {"e1": {1, 2}},
        [("e1", C)],
        {"e1": EventPhase.COMPLETED},
    ),
    ResponseCase(
        "nothing after a terminal response",
        (program("a0", 0, event("e1", T0 - 600, 600, base(exp=1))),),
        T0,
        {"e1": {1, 2, 3}},
        [],
    ),
    ResponseCase(
        "an event over before we saw it: nothing",
        (program("a0", 0, event("e1", T0 - 700, 600, base(exp=1))),),
        T0,
        {},
        [],
    ),
    ResponseCase(
        "cancelled after receipt",
        (program("a0", 0, event("e1", T0 + 60, 600, base(exp=1), status=2)),),
        T0,
        {"e1": {1}},
        [("e1", X)],
        {"e1": EventPhase.CANCELLED},
    ),
    ResponseCase(
        "cancelled while active",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1), status=2)),),
        T0,
        {"e1": {1, 2}},
        [("e1", X)],
    ),
    ResponseCase(
        "first seen already cancelled",
        (program("a0", 0, event("e1", T0 + 60, 600, base(exp=1), status=2)),),
        T0,
        {},
        [("e1", R), ("e1", X)],
    ),
    ResponseCase(
        "superseded by the server",
        (
            program(
                "a0",
                0,
                event("e1", T0 + 60, 600, base(exp=1), status=4),
                event("e2", T0 + 60, 600, base(exp=2)),
            ),
        ),
        T0,
        {"e1": {1}, "e2": {1}},
        [("e1", SUP)],
        {"e1": EventPhase.SUPERSEDED, "e2": EventPhase.SCHEDULED},
    ),
    ResponseCase(
        "superseded: a higher-precedence event covers all its fields for all its window",
        (
            program("a0", 0, event("e1", T0 - 60, 1200, base(exp=1, imp=1))),
            program("b0", 1, event("e2", T0, 600, base(exp=2, imp=2))),
        ),
        T0,
        {"e1": {1, 2}, "e2": {1}},
        [("e2", SUP)],
        {"e1": EventPhase.ACTIVE, "e2": EventPhase.SUPERSEDED},
    ),
    ResponseCase(
        "not superseded while it still supplies one field",
        (
            program("a0", 0, event("e1", T0 - 60, 1200, base(exp=1))),
            program("b0", 1, event("e2", T0, 600, base(exp=2, imp=2))),
        ),
        T0,
        {"e1": {1, 2}, "e2": {1}},
        [("e2", S)],
        {"e2": EventPhase.ACTIVE},
    ),
    ResponseCase(
        "not superseded by a partial overlap in time",
        (
            program("a0", 0, event("e1", T0 + 300, 1200, base(exp=1))),
            program("b0", 1, event("e2", T0, 600, base(exp=2))),
        ),
        T0,
        {"e1": {1}, "e2": {1}},
        [("e2", S)],
        {"e2": EventPhase.ACTIVE},
    ),
    ResponseCase(
        "responseRequired 00: nothing",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1), required="00")),),
        T0,
        {},
        [],
    ),
    ResponseCase(
        "responseRequired 01: receipt only",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1), required="01")),),
        T0,
        {},
        [("e1", R)],
    ),
    ResponseCase(
        "responseRequired 02: status only",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1), required="02")),),
        T0,
        {},
        [("e1", S)],
    ),
    ResponseCase(
        "no replyTo: nowhere to send",
        (program("a0", 0, event("e1", T0 - 60, 600, base(exp=1), reply_to=None)),),
        T0,
        {},
        [],
    ),
]


@pytest.mark.parametrize("case", RESPONSE_CASES, ids=[c.id for c in RESPONSE_CASES])
def test_responses_and_phases(case: ResponseCase) -> None:
    schedule = evaluate(case.programs, case.now, {}, case.sent)
    assert [(r.subject, r.status) for r in schedule.responses] == case.due
    assert all(r.reply_to == "/rsp" for r in schedule.responses)
    for key, phase in case.phase.items():
        assert schedule.events[key].phase is phase


def test_response_lifecycle_over_time() -> None:
    programs = (program("a0", 0, event("e1", T0 + 60, 600, base(exp=1), rs=30)),)
    draws = {"e1": RandomDraw(start_s=10)}
    sent: dict[str, set[int]] = {}
    posted: list[tuple[float, int]] = []
    for now in (T0, T0 + 30, T0 + 69, T0 + 70, T0 + 300, T0 + 659, T0 + 660, T0 + 900):
        for due in evaluate(programs, now, draws, sent).responses:
            posted.append((now, due.status))
            sent.setdefault(due.key, set()).add(due.status)
    assert posted == [(T0, R), (T0 + 70, S), (T0 + 660, C)]


def test_subject_is_echoed_as_received() -> None:
    programs = (program("a0", 0, event("ABCDEF", T0 + 60, 600, base(exp=1))),)
    (due,) = evaluate(programs, T0, {}).responses
    assert due.subject == "ABCDEF"
    assert due.key == "abcdef"


# --------------------------------------------------------------------------- envoy documents


def _envoy_programs() -> tuple[ProgramControls, ...]:
    from protocols.sep2 import DERProgramList

    derps = decode_as(DERProgramList, load("derp-list.xml")).items
    derp1 = decode_as(DERControlList, load("derc-list-all.xml")).items
    derp2 = decode_as(DERControlList, load("derc-list-derp2.xml")).items
    dderc1 = decode_as(DefaultDERControl, load("dderc.xml"))
    dderc2 = decode_as(DefaultDERControl, load("dderc-derp2-no-group-default.xml"))
    dderc3 = decode_as(DefaultDERControl, load("dderc-derp3-seed-fractional.xml"))
    return (
        ProgramControls(derps[0], derp1, dderc1),
        ProgramControls(derps[1], derp2, dderc2),
        ProgramControls(derps[2], (), dderc3),
    )


@pytest.mark.parametrize(
    ("offset", "expect"),
    [
        # derc/6 (primacy 0, export 1500/import 7000) beats derp/2's export 4000 (primacy 1).
        (0, {EXP: (1500, "30000000000000000000000600000000"), IMP: (7000, None)}),
        # derc/7: export 0 W is a real limit, not "no limit".
        (1800 + 30, {EXP: (0, "30000000000000000000000700000000")}),
        # derc/8: device limits; site export falls back to derp/1's default 1500 W.
        (3600 + 30, {GEN: (3000, None), LOAD: (4000, None), EXP: (1500, "dflt")}),
        # derc/12 cancelled: the default applies.
        (10800 + 30, {EXP: (1500, "dflt")}),
        # derc/14 superseded by derc/15 (2800 W).
        (14400 + 30, {EXP: (2800, "30000000000000000000000f00000000")}),
    ],
)
def test_envoy_capture(offset: int, expect: dict[str, tuple[float, str | None]]) -> None:
    programs = _envoy_programs()
    draws = draw_missing(programs, {}, lambda a, b: 0)
    schedule = evaluate(programs, T0 + offset, draws)
    for name, (value, mrid) in expect.items():
        assert value_of(schedule, name) == value, name
        source = schedule.source_of(name)
        assert source is not None
        if mrid == "dflt":
            assert source.kind is SourceKind.DEFAULT
            assert source.program_mrid == "20000000000000010000000800000000"
        elif mrid is not None:
            assert source.mrid.lower() == mrid
    # Envoy's seed default of derp/3 supplies what derp/1 and derp/2's defaults do not.
    assert value_of(schedule, IMP) is not None
