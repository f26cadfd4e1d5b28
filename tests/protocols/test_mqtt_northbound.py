"""Northbound codec: precise reasons for bad payloads, topic layout, round trips."""

from __future__ import annotations

import json

import pytest

from protocols.mqtt import MAX_COMMAND_BYTES, CommandDecodeError, Topics, decode_command, encode
from protocols.mqtt.northbound import response_topic_problem
from unified.model import Cancel, Dispatch, Reason

GOOD = {
    "type": "dispatch",
    "command_id": "c1",
    "target": {"group_id": "feeder:f1"},
    "kw": -5,
    "start": "2026-07-01T16:00:00Z",
    "duration_s": 3600,
}


def test_topics() -> None:
    t = Topics("gw-1")
    assert t.commands == "derms/v1/gw-1/commands"
    assert t.ack("c1") == "derms/v1/gw-1/acks/c1"
    assert t.group_telemetry("feeder:f1") == "derms/v1/gw-1/telemetry/groups/feeder:f1"
    assert t.device_telemetry("b1") == "derms/v1/gw-1/telemetry/devices/b1"
    assert t.status == "derms/v1/gw-1/status"
    assert t.errors == "derms/v1/gw-1/errors"


def test_round_trip() -> None:
    command = decode_command(json.dumps(GOOD).encode())
    assert isinstance(command, Dispatch)
    assert command.start.utcoffset() is not None
    assert decode_command(encode(command)) == command


def test_times_are_normalised_to_utc() -> None:
    command = decode_command(json.dumps(GOOD | {"start": "2026-07-01T18:00:00+02:00"}).encode())
    assert isinstance(command, Dispatch)
    assert command.start.isoformat() == "2026-07-01T16:00:00+00:00"


@pytest.mark.parametrize(
    ("payload", "reason", "has_id", "fragment"),
    [
        (b"{not json", Reason.MALFORMED_JSON, False, "Expecting"),
        (b"\xff\xfe", Reason.MALFORMED_JSON, False, ""),
        (b"[1,2]", Reason.SCHEMA_VIOLATION, False, "JSON object"),
        (json.dumps({"command_id": "c1", "kw": 1}).encode(), Reason.SCHEMA_VIOLATION, True, ""),
        (json.dumps(GOOD | {"type": "explode"}).encode(), Reason.SCHEMA_VIOLATION, True, ""),
        (
            json.dumps(GOOD | {"start": "2026-07-01T16:00:00"}).encode(),
            Reason.SCHEMA_VIOLATION,
            True,
            "timezone",
        ),
        (json.dumps(GOOD | {"duration_s": -5}).encode(), Reason.WINDOW_INVALID, True, "duration_s"),
        (json.dumps(GOOD | {"kw": "lots"}).encode(), Reason.SCHEMA_VIOLATION, True, "kw"),
        (json.dumps(GOOD | {"kw": 1e12}).encode(), Reason.SCHEMA_VIOLATION, True, "kw"),
        (
            json.dumps(GOOD | {"schema_version": "9"}).encode(),
            Reason.UNSUPPORTED_VERSION,
            True,
            "9",
        ),
        (json.dumps(GOOD | {"surprise": 1}).encode(), Reason.SCHEMA_VIOLATION, True, "surprise"),
        (
            json.dumps(GOOD | {"target": {"group_id": "g", "device_ids": ["a"]}}).encode(),
            Reason.SCHEMA_VIOLATION,
            True,
            "exactly one",
        ),
        (
            json.dumps(
                {
                    "type": "envelope",
                    "command_id": "e1",
                    "target": {"group_id": "g"},
                    "intervals": [
                        {
                            "start": "2026-07-01T17:00:00Z",
                            "end": "2026-07-01T16:00:00Z",
                            "export_limit_kw": 5,
                        }
                    ],
                }
            ).encode(),
            Reason.WINDOW_INVALID,
            True,
            "after its start",
        ),
        (b" " * (MAX_COMMAND_BYTES + 1), Reason.PAYLOAD_TOO_LARGE, False, "exceeds"),
        # A timestamp that overflows converting to UTC is a reason, not an OverflowError.
        (
            json.dumps(GOOD | {"start": "9999-12-31T23:00:00-05:00"}).encode(),
            Reason.SCHEMA_VIOLATION,
            True,
            "out of range",
        ),
        (
            json.dumps(GOOD | {"start": "0001-01-01T00:00:00+05:00"}).encode(),
            Reason.SCHEMA_VIOLATION,
            True,
            "out of range",
        ),
        # An id that is a string but no identifier: never an ack topic, answered on errors.
        (
            json.dumps(GOOD | {"command_id": "bad id/#"}).encode(),
            Reason.SCHEMA_VIOLATION,
            False,
            "command_id",
        ),
        (
            json.dumps(GOOD | {"command_id": "c" * 129}).encode(),
            Reason.SCHEMA_VIOLATION,
            False,
            "command_id",
        ),
        # Not a window problem when the id is wrong too.
        (
            json.dumps(GOOD | {"command_id": "bad id", "duration_s": -5}).encode(),
            Reason.SCHEMA_VIOLATION,
            False,
            "command_id",
        ),
    ],
)
def test_bad_payloads_get_specific_reasons(
    payload: bytes, reason: Reason, has_id: bool, fragment: str
) -> None:
    with pytest.raises(CommandDecodeError) as info:
        decode_command(payload)
    assert info.value.reason is reason
    assert (info.value.command_id is not None) is has_id
    assert fragment in info.value.detail


def test_cancel_decodes() -> None:
    command = decode_command(b'{"type":"cancel","command_id":"x","cancels":"c1"}')
    assert isinstance(command, Cancel)


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("derms/v1/replies/grid-1", True),
        ("derms/v1/gw-1/commands", False),  # acks would be fed back in as commands
        ("derms/v1/gw-1/acks/x", False),
        ("derms/v1/gw-1", False),
        ("devices/t1/command", False),  # a device's command topic
        ("derms/v1/replies/#", False),
        ("derms/v1/replies/+/x", False),
        ("derms/v1/replies/" + "x" * 600, False),
    ],
)
def test_response_topics_only_under_the_prefix(topic: str, allowed: bool) -> None:
    problem = response_topic_problem(topic, "derms/v1/replies/", "derms/v1/gw-1")
    assert (problem is None) is allowed, problem
