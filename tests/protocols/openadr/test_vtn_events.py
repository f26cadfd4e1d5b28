"""Advance notice and dispatch windows in the VTN's pure event planning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from protocols.openadr import decode, encode
from protocols.openadr.vtn_events import (
    IssuedEvent,
    VtnProgram,
    announce_event,
    event_payload,
    event_status,
    plan_event,
    status_changes,
)
from unified.model import DeviceCommand, LimitSource

T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
PROGRAM = VtnProgram(signal="setpoint", near_s=600, notification_s=3600)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def announced() -> IssuedEvent:
    event = announce_event(
        None,
        command_id="d1",
        device_id="oem.b1",
        start=T0 + s(3600),
        end=T0 + s(4200),
        expected_kw=-2.0,
        ven_name="oem",
        resource_id="b1;class=battery;kw=5;kwh=10",
        rated_kw=5.0,
        program=PROGRAM,
        now=T0,
        new_event_id="ev-1",
    )
    assert event is not None
    return event


def setpoint(kw: float | None, command_id: str = "d1") -> DeviceCommand:
    return DeviceCommand(
        device_id="oem.b1",
        power_kw=kw,
        provenance=(LimitSource(command_id=command_id, kind="dispatch"),),
    )


def plan(
    previous: IssuedEvent | None, command: DeviceCommand, now: datetime, **kw: Any
) -> IssuedEvent | None:
    return plan_event(
        previous,
        command,
        ven_name="oem",
        resource_id="b1;class=battery;kw=5;kwh=10",
        rated_kw=5.0,
        program=PROGRAM,
        now=now,
        new_event_id="ev-2",
        **kw,
    )


def test_a_dispatch_an_hour_ahead_is_far_then_near_then_active_for_its_window() -> None:
    event = announced()
    assert (event.start, event.end, event.confirmed) == (T0 + s(3600), T0 + s(4200), False)
    assert event_status(event, T0) == "far"
    assert status_changes(event, T0) == T0 + s(3000)
    assert event_status(event, T0 + s(3000)) == "near"
    assert status_changes(event, T0 + s(3000)) == T0 + s(3600)
    assert event_status(event, T0 + s(3600)) == "active"
    assert event_status(event, T0 + s(4200)) == "completed"


def test_the_notice_goes_on_the_wire_with_x_ei_notification() -> None:
    payload = event_payload(announced(), T0, "ven-1")
    xml = encode("oadrDistributeEvent", {"request_id": "r", "vtn_id": "vtn", "events": [payload]})
    assert b"x-eiNotification" in xml
    assert b"PT1H" in xml
    _, parsed = decode(xml)
    (event,) = parsed["events"]
    assert event["event_descriptor"]["event_status"] == "far"
    assert event["active_period"]["duration"] == s(600)  # the window, not a fixed hour


def test_nothing_is_announced_once_started_or_over_another_live_event() -> None:
    assert announce_event(None, **_args(start=T0, end=T0 + s(60))) is None
    live = plan(None, setpoint(-1.0, "d0"), T0)
    assert live is not None
    assert announce_event(live, **_args(start=T0 + s(60), end=T0 + s(120))) is None


def _args(start: datetime, end: datetime) -> dict[str, Any]:
    return {
        "command_id": "d1",
        "device_id": "oem.b1",
        "start": start,
        "end": end,
        "expected_kw": -2.0,
        "ven_name": "oem",
        "resource_id": "b1;class=battery;kw=5;kwh=10",
        "rated_kw": 5.0,
        "program": PROGRAM,
        "now": T0,
        "new_event_id": "ev-1",
    }


def test_the_setpoint_at_the_start_confirms_the_notice() -> None:
    event = announced()
    start = event.start
    same = plan(event, setpoint(-2.0), start)
    assert same is not None
    assert (same.modification_number, same.confirmed) == (0, True)  # nothing new on the wire
    changed = plan(event, setpoint(-3.0), start)
    assert changed is not None
    assert (changed.event_id, changed.modification_number, changed.value) == ("ev-1", 1, -3.0)
    assert (changed.confirmed, changed.end) == (True, event.end)
    # Never extended past its dispatch, however close to its end.
    assert plan(changed, setpoint(-3.0), event.end - s(10)) is None


def test_a_release_of_another_command_leaves_the_notice() -> None:
    event = announced()
    assert plan(event, DeviceCommand(device_id="oem.b1", power_kw=None), T0) is None
    assert plan(event, setpoint(None, "d0"), T0) is None
    withdrawn = plan(event, setpoint(None, "d1"), T0)
    assert withdrawn is not None
    assert withdrawn.cancelled


def test_an_event_for_a_known_window_lasts_that_window() -> None:
    event = plan(None, setpoint(-2.0), T0, window_end=T0 + s(600))
    assert event is not None
    assert (event.duration_s, event.fixed_end) == (600, True)
    fallback = plan(None, setpoint(-2.0), T0)
    assert fallback is not None
    assert fallback.duration_s == PROGRAM.event_duration_s
