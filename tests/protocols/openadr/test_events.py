"""The OpenADR event reconciler: a table of distributions and what each must do (pure, no I/O)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from openleadr import enums, objects  # type: ignore[import-untyped]
from openleadr.messaging import create_message, parse_message  # type: ignore[import-untyped]

from protocols.openadr import (
    Distribution,
    GroupCapacity,
    MalformedEvent,
    OptOutReason,
    OptType,
    RecordStatus,
    ResponseCode,
    SimpleLevel,
    VenProgramConfig,
    VenState,
    parse_distribution,
    parse_event,
    pending_commands,
    reconcile,
    settle,
)
from unified.model import AckState, Cancel, Command, Dispatch, DispatchMode, OperatingEnvelope

NOW = datetime(2026, 7, 1, 15, 0, tzinfo=UTC)
START = NOW + timedelta(hours=1)

CONFIG = VenProgramConfig(
    ven_name="site-1",
    program="utility-dr",
    priority=20,
    default_group="feeder:f1",
    targets={"resource_id:r1": "feeder:f1", "resource_id:r2": "feeder:f2"},
    signals=frozenset({"LOAD_DISPATCH", "SIMPLE", "LOAD_CONTROL"}),
)
CAPACITY = {
    "feeder:f1": GroupCapacity(shed_kw=40.0, import_kw=60.0),
    "feeder:f2": GroupCapacity(shed_kw=10.0, import_kw=10.0),
}


def no_draw(event_id: str, max_s: float) -> float:
    raise AssertionError("startafter must not be drawn here")


def draw_of(seconds: float) -> Any:
    calls: list[str] = []

    def draw(event_id: str, max_s: float) -> float:
        calls.append(event_id)
        return seconds

    draw.calls = calls  # type: ignore[attr-defined]
    return draw


def event(
    event_id: str = "ev1",
    *,
    mod: int = 0,
    status: str = "far",
    start: datetime = START,
    values: tuple[float, ...] = (-5.0, -2.5),
    interval_s: float = 1800,
    signal_name: str = "LOAD_DISPATCH",
    signal_type: str = "delta",
    unit: str | None = "W",
    scale: str | None = "k",
    measurement: str = "powerReal",
    targets: list[dict[str, Any]] | None = None,
    startafter_s: float | None = None,
    ramp_up_s: float | None = None,
    duration_s: float | None = None,
    test_event: bool = False,
) -> dict[str, Any]:
    """An event as openleadr's parse_message gives it (snake_case dicts, timedelta durations)."""
    intervals = [
        {"duration": timedelta(seconds=interval_s), "signal_payload": v, "uid": i}
        for i, v in enumerate(values)
    ]
    signal: dict[str, Any] = {
        "signal_name": signal_name,
        "signal_type": signal_type,
        "signal_id": "sig-1",
        "current_value": 0.0,
        "intervals": intervals,
    }
    if unit is not None:
        signal["measurement"] = {
            "name": measurement,
            "description": "RealPower",
            "unit": unit,
            "scale": scale,
        }
    active: dict[str, Any] = {
        "dtstart": start,
        "duration": timedelta(
            seconds=duration_s if duration_s is not None else interval_s * len(values)
        ),
    }
    if startafter_s is not None:
        active["tolerance"] = {"tolerate": {"startafter": timedelta(seconds=startafter_s)}}
    if ramp_up_s is not None:
        active["ramp_up"] = timedelta(seconds=ramp_up_s)
    return {
        "event_descriptor": {
            "event_id": event_id,
            "modification_number": mod,
            "event_status": status,
            "priority": 1,
            "market_context": "http://utility/dr",
            "created_date_time": NOW - timedelta(minutes=5),
            "test_event": test_event,
        },
        "active_period": active,
        "event_signals": [signal],
        "targets": targets if targets is not None else [{"ven_id": "ven-123"}],
        "response_required": "always",
    }


def dist(*events: dict[str, Any]) -> Distribution:
    return parse_distribution({"request_id": "req-1", "vtn_id": "VTN", "events": list(events)})


def run(
    state: VenState,
    *events: dict[str, Any],
    now: datetime = NOW,
    draw: Any = no_draw,
    config: VenProgramConfig = CONFIG,
) -> tuple[VenState, list[Command], list[Any]]:
    return reconcile(state, dist(*events), now, draw, config, CAPACITY)


def accept_all(state: VenState, now: datetime = NOW) -> VenState:
    """What the service does after submitting: every outbox command was accepted."""
    for event_id, outbox in pending_commands(state).items():
        outcomes = {c.command_id: (AckState.ACCEPTED, None, None) for c in outbox}
        state, _ = settle(state, event_id, outcomes, now, CONFIG)
    return state


def dispatches(commands: list[Command]) -> list[Dispatch]:
    return [c for c in commands if isinstance(c, Dispatch)]


# --------------------------------------------------------------------------- new events


def test_new_event_becomes_one_dispatch_per_interval() -> None:
    state, commands, responses = run(VenState(), event())
    assert [c.command_id for c in commands] == ["oadr-site-1-ev1-m0-i0", "oadr-site-1-ev1-m0-i1"]
    first, second = dispatches(commands)
    assert first.target.group_id == "feeder:f1"
    assert first.mode is DispatchMode.DELTA
    assert (first.kw, first.start, first.duration_s) == (-5.0, START, 1800)
    assert (second.kw, second.start) == (-2.5, START + timedelta(minutes=30))
    assert first.program == "utility-dr"
    assert first.priority == 20
    assert first.issued_at == NOW - timedelta(minutes=5)
    assert [(r.event_id, r.modification_number, r.opt_type) for r in responses] == [
        ("ev1", 0, OptType.OPT_IN)
    ]
    assert state.events["ev1"].status is RecordStatus.ACTIVE
    assert len(state.events["ev1"].outbox) == 2


@pytest.mark.parametrize(
    ("unit", "scale", "values", "expected_kw"),
    [
        ("W", "k", (-5.0,), -5.0),
        ("W", "none", (-2500.0,), -2.5),
        ("W", None, (-2500.0,), -2.5),
        ("W", "M", (-0.5,), -500.0),
        ("kW", "none", (-7.0,), -7.0),
        ("MW", "none", (0.25,), 250.0),
    ],
)
def test_units_w_with_scale_and_kw(
    unit: str, scale: str | None, values: tuple[float, ...], expected_kw: float
) -> None:
    _, commands, _ = run(VenState(), event(values=values, unit=unit, scale=scale))
    assert dispatches(commands)[0].kw == pytest.approx(expected_kw)


def test_setpoint_signal_is_a_target_dispatch() -> None:
    _, commands, _ = run(VenState(), event(signal_type="setpoint", values=(3.0,)))
    assert dispatches(commands)[0].mode is DispatchMode.TARGET


def test_simple_levels_map_to_fractions_of_shed_capacity_or_kw() -> None:
    config = CONFIG.model_copy(
        update={
            "simple_levels": {0: SimpleLevel(), 1: SimpleLevel(kw=-3), 3: SimpleLevel(fraction=1)}
        }
    )
    ev = event(signal_name="SIMPLE", signal_type="level", values=(1, 0, 3), unit=None)
    _, commands, responses = run(VenState(), ev, config=config)
    # Level 0 is normal operation: no command for that interval.
    assert [(c.command_id, c.kw) for c in dispatches(commands)] == [
        ("oadr-site-1-ev1-m0-i0", -3.0),
        ("oadr-site-1-ev1-m0-i2", -40.0),
    ]
    assert responses[0].opt_type is OptType.OPT_IN


def test_load_control_capacity_becomes_an_envelope() -> None:
    ev = event(signal_name="LOAD_CONTROL", signal_type="x-loadControlCapacity", values=(0.5, 0.25))
    _, commands, _ = run(VenState(), ev)
    (envelope,) = commands
    assert isinstance(envelope, OperatingEnvelope)
    assert envelope.command_id == "oadr-site-1-ev1-m0-env"
    assert [i.import_limit_kw for i in envelope.intervals] == [30.0, 15.0]
    assert envelope.intervals[1].end == START + timedelta(hours=1)


def test_resource_targets_map_to_their_groups() -> None:
    ev = event(
        targets=[{"resource_id": "r1"}, {"resource_id": "r2"}, {"ven_id": "v"}], values=(-1,)
    )
    _, commands, _ = run(VenState(), ev)
    assert [(c.command_id, c.target.group_id) for c in dispatches(commands)] == [
        ("oadr-site-1-ev1-m0-i0-g0", "feeder:f1"),
        ("oadr-site-1-ev1-m0-i0-g1", "feeder:f2"),
    ]


def test_test_event_is_answered_but_moves_nothing() -> None:
    _state, commands, responses = run(VenState(), event(test_event=True))
    assert commands == []
    assert responses[0].opt_type is OptType.OPT_IN


def test_event_ids_are_made_safe_and_stay_distinct() -> None:
    _, a, _ = run(VenState(), event("evt/1 a", values=(-1,)))
    _, b, _ = run(VenState(), event("evt 1/a", values=(-1,)))
    assert a[0].command_id != b[0].command_id
    assert a[0].command_id.startswith("oadr-site-1-evt_1_a-")


# --------------------------------------------------------------------------- repeats & changes


def test_repeat_of_same_modification_does_nothing_new() -> None:
    state, _, _ = run(VenState(), event())
    state = accept_all(state)
    again, commands, responses = run(state, event(), now=NOW + timedelta(minutes=1))
    assert commands == []
    assert again == state
    assert [(r.event_id, r.opt_type) for r in responses] == [("ev1", OptType.OPT_IN)]


def test_modification_cancels_old_commands_after_new_ones() -> None:
    state, _, _ = run(VenState(), event())
    state = accept_all(state)
    state, commands, responses = run(state, event(mod=1, values=(-8.0,)))
    assert [c.command_id for c in commands] == [
        "oadr-site-1-ev1-m1-i0",
        "oadr-site-1-ev1-m0-i0-cancel",
        "oadr-site-1-ev1-m0-i1-cancel",
    ]
    assert [c.cancels for c in commands if isinstance(c, Cancel)] == [
        "oadr-site-1-ev1-m0-i0",
        "oadr-site-1-ev1-m0-i1",
    ]
    assert responses[0].modification_number == 1
    assert [i.command_id for i in state.events["ev1"].issued] == ["oadr-site-1-ev1-m1-i0"]


def test_explicit_cancel_cancels_what_is_not_over() -> None:
    state, _, _ = run(VenState(), event())
    state = accept_all(state)
    # Half an hour into the event the first interval is over: only the second can be cancelled.
    later = START + timedelta(minutes=40)
    state, commands, responses = run(state, event(mod=1, status="cancelled"), now=later)
    assert [(c.command_id, getattr(c, "cancels", None)) for c in commands] == [
        ("oadr-site-1-ev1-m0-i1-cancel", "oadr-site-1-ev1-m0-i1")
    ]
    assert responses[0].opt_type is OptType.OPT_IN
    assert state.events["ev1"].status is RecordStatus.CANCELLED
    # The VTN keeps listing the cancelled event: nothing more happens.
    state = accept_all(state, later)
    _, commands, _ = run(state, event(mod=1, status="cancelled"), now=later)
    assert commands == []


def test_implied_cancel_when_missing_from_a_later_distribution() -> None:
    state, _, _ = run(VenState(), event("ev1"), event("ev2", values=(-1,)))
    state = accept_all(state)
    state, commands, responses = run(state, event("ev2", values=(-1,)))
    assert sorted(c.command_id for c in commands) == [
        "oadr-site-1-ev1-m0-i0-cancel",
        "oadr-site-1-ev1-m0-i1-cancel",
    ]
    assert [r.event_id for r in responses] == ["ev2"]
    assert state.events["ev1"].status is RecordStatus.CANCELLED
    # An empty distribution cancels everything left.
    state = accept_all(state)
    _, commands, _ = run(state)
    assert [c.command_id for c in commands] == ["oadr-site-1-ev2-m0-i0-cancel"]


def test_ended_records_are_forgotten_after_the_retention() -> None:
    state, _, _ = run(VenState(), event(values=(-1,)))
    state = accept_all(state)
    state, _, _ = run(state, event(values=(-1,), mod=1, status="cancelled"))
    state = accept_all(state)
    much_later = START + timedelta(days=2)
    state, commands, _ = run(state, now=much_later)
    assert commands == []
    assert state.events == {}


# --------------------------------------------------------------------------- startafter & ramp


def test_startafter_is_drawn_once_and_shifts_every_interval() -> None:
    draw = draw_of(120.0)
    state, commands, _ = run(VenState(), event(startafter_s=300), draw=draw)
    assert draw.calls == ["ev1"]
    assert [c.start for c in dispatches(commands)] == [
        START + timedelta(seconds=120),
        START + timedelta(minutes=30, seconds=120),
    ]
    state = accept_all(state)
    # A modification keeps the draw (a restart reloads it from the persisted state).
    restored = VenState.model_validate_json(state.model_dump_json())
    restored, commands, _ = run(restored, event(startafter_s=300, mod=1, values=(-9,)))
    assert draw.calls == ["ev1"]
    assert dispatches(commands)[0].start == START + timedelta(seconds=120)
    assert restored.events["ev1"].startafter_s == 120.0


def test_startafter_draw_is_clamped_to_the_tolerance() -> None:
    _, commands, _ = run(VenState(), event(startafter_s=60), draw=draw_of(1e9))
    assert dispatches(commands)[0].start == START + timedelta(seconds=60)


def test_ramp_up_applies_to_the_first_interval_only() -> None:
    _, commands, _ = run(VenState(), event(ramp_up_s=300))
    assert [c.ramp_s for c in dispatches(commands)] == [300.0, 0.0]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kwargs", "reason", "code"),
    [
        (
            {"signal_name": "ELECTRICITY_PRICE", "signal_type": "price"},
            OptOutReason.UNSUPPORTED_SIGNAL,
            ResponseCode.SIGNAL_NOT_SUPPORTED,
        ),
        (
            {"signal_name": "x-custom", "signal_type": "level"},
            OptOutReason.UNSUPPORTED_SIGNAL,
            ResponseCode.SIGNAL_NOT_SUPPORTED,
        ),
        (
            {"signal_type": "multiplier"},
            OptOutReason.UNSUPPORTED_SIGNAL_TYPE,
            ResponseCode.SIGNAL_NOT_SUPPORTED,
        ),
        ({"unit": "Wh", "scale": "k"}, OptOutReason.UNSUPPORTED_UNITS, 460),
        ({"unit": "W", "measurement": "energyReal"}, OptOutReason.UNSUPPORTED_UNITS, 460),
        ({"unit": None}, OptOutReason.UNSUPPORTED_UNITS, 460),
        ({"duration_s": -60}, OptOutReason.INVALID_WINDOW, ResponseCode.INVALID_DATA),
        ({"interval_s": -60}, OptOutReason.INVALID_WINDOW, ResponseCode.INVALID_DATA),
        (
            {"signal_name": "SIMPLE", "signal_type": "level", "values": (7,), "unit": None},
            OptOutReason.INVALID_VALUE,
            ResponseCode.INVALID_DATA,
        ),
        ({"values": (-5e9,)}, OptOutReason.INVALID_VALUE, ResponseCode.INVALID_DATA),
        (
            {"targets": [{"resource_id": "elsewhere"}]},
            OptOutReason.UNKNOWN_TARGET,
            ResponseCode.TARGET_MISMATCH,
        ),
        ({"start": NOW - timedelta(hours=2)}, OptOutReason.ALREADY_ENDED, ResponseCode.OK),
        ({"status": "completed"}, OptOutReason.ALREADY_ENDED, ResponseCode.OK),
    ],
)
def test_refusals_opt_out_with_a_reason_and_submit_nothing(
    kwargs: dict[str, Any], reason: OptOutReason, code: int
) -> None:
    state, commands, responses = run(VenState(), event(**kwargs))
    assert commands == []
    (response,) = responses
    assert response.opt_type is OptType.OPT_OUT
    assert response.reason == reason.value
    assert response.response_code == code
    assert response.description.startswith(reason.value)
    assert state.events["ev1"].status is RecordStatus.OPTED_OUT
    # Seen again: still nothing, same answer.
    _, commands, responses = run(state, event(**kwargs))
    assert commands == []
    assert responses[0].reason == reason.value


def test_simple_fraction_without_capacity_is_refused() -> None:
    ev = event(signal_name="SIMPLE", signal_type="level", values=(2,), unit=None)
    _, commands, responses = reconcile(VenState(), dist(ev), NOW, no_draw, CONFIG, {})
    assert commands == []
    assert responses[0].reason == OptOutReason.NO_CAPACITY


def test_malformed_event_with_an_id_is_opted_out() -> None:
    broken = event()
    del broken["active_period"]["dtstart"]
    distribution = dist(broken)
    assert isinstance(distribution.events[0], MalformedEvent)
    _, commands, responses = reconcile(VenState(), distribution, NOW, no_draw, CONFIG, CAPACITY)
    assert commands == []
    assert (responses[0].reason, responses[0].response_code) == (
        OptOutReason.MALFORMED_EVENT,
        ResponseCode.INVALID_DATA,
    )


def test_a_partly_over_event_submits_only_the_rest() -> None:
    _, commands, responses = run(VenState(), event(), now=START + timedelta(minutes=31))
    assert [c.command_id for c in commands] == ["oadr-site-1-ev1-m0-i1"]
    assert responses[0].opt_type is OptType.OPT_IN


def test_response_never_is_not_answered() -> None:
    ev = event()
    ev["response_required"] = "never"
    _, commands, responses = run(VenState(), ev)
    assert len(commands) == 2
    assert responses == []


# --------------------------------------------------------------------------- settling acks


def test_a_rejected_command_opts_out_and_cancels_the_accepted_ones() -> None:
    state, commands, _ = run(VenState(), event())
    first, second = (c.command_id for c in commands)
    outcomes = {
        first: (AckState.ACCEPTED, None, None),
        second: (AckState.REJECTED, "beyond_ratings", "-2.5 kW exceeds ..."),
    }
    state, response = settle(state, "ev1", outcomes, NOW, CONFIG)
    assert response is not None
    assert (response.opt_type, response.reason) == (OptType.OPT_OUT, "beyond_ratings")
    record = state.events["ev1"]
    assert record.status is RecordStatus.OPTED_OUT
    assert [c.command_id for c in record.outbox] == [f"{first}-cancel"]
    # The cancels are settled in turn (a refused cancel is fine), then nothing is pending.
    state, response = settle(
        state, "ev1", {f"{first}-cancel": (AckState.COMPLETED, None, None)}, NOW, CONFIG
    )
    assert response is None
    assert pending_commands(state) == {}
    # A later repeat answers with the opt-out.
    _, commands, responses = run(state, event())
    assert commands == []
    assert responses[0].reason == "beyond_ratings"


def test_unsettled_outbox_survives_a_restart_for_resubmission() -> None:
    state, commands, _ = run(VenState(), event())
    restored = VenState.model_validate_json(state.model_dump_json())
    assert list(pending_commands(restored)["ev1"]) == commands


# --------------------------------------------------------------------------- openleadr input


def test_parses_what_openleadr_renders_and_parses() -> None:
    """Round trip through openleadr's own templates and parser: the shapes we rely on."""
    ev = objects.Event(
        event_descriptor=objects.EventDescriptor(
            event_id="ev-x",
            modification_number=3,
            market_context="http://utility/dr",
            event_status="far",
            priority=2,
            created_date_time=NOW,
        ),
        active_period=objects.ActivePeriod(
            dtstart=START,
            duration=timedelta(hours=1),
            tolerance={"startafter": timedelta(minutes=5)},
            ramp_up_period=timedelta(minutes=2),
            recovery_period=timedelta(minutes=3),
        ),
        event_signals=[
            objects.EventSignal(
                intervals=[
                    objects.Interval(
                        dtstart=START, duration=timedelta(minutes=30), signal_payload=-5000.0
                    ),
                    objects.Interval(
                        dtstart=START + timedelta(minutes=30),
                        duration=timedelta(minutes=30),
                        signal_payload=-2500.0,
                    ),
                ],
                signal_name="LOAD_DISPATCH",
                signal_type="delta",
                signal_id="s1",
                measurement=enums.MEASUREMENTS.POWER_REAL,
            )
        ],
        targets=[objects.Target(resource_id="r2")],
    )
    # openleadr derives the status from the wall clock; our NOW is fixed.
    ev.event_descriptor.event_status = "far"
    xml = create_message("oadrDistributeEvent", request_id="rq", vtn_id="VTN", events=[asdict(ev)])
    message_type, payload = parse_message(xml)
    assert message_type == "oadrDistributeEvent"
    (parsed,) = parse_distribution(payload).events
    assert not isinstance(parsed, MalformedEvent)
    assert (parsed.event_id, parsed.modification_number, parsed.priority) == ("ev-x", 3, 2)
    assert (parsed.startafter_s, parsed.ramp_up_s, parsed.recovery_s) == (300, 120, 180)
    assert parsed.targets == ("resource_id:r2",)
    (signal,) = parsed.signals
    assert (signal.units, signal.scale, signal.measurement) == ("W", "none", "powerReal")
    # The objects themselves parse the same way.
    direct = parse_event(ev)
    assert not isinstance(direct, MalformedEvent)
    assert direct.signals[0].intervals == signal.intervals
    _, commands, _ = reconcile(
        VenState(), parse_distribution(payload), NOW, draw_of(0.0), CONFIG, CAPACITY
    )
    assert [(c.command_id, c.kw, c.target.group_id) for c in dispatches(commands)] == [
        ("oadr-site-1-ev-x-m3-i0", -5.0, "feeder:f2"),
        ("oadr-site-1-ev-x-m3-i1", -2.5, "feeder:f2"),
    ]
