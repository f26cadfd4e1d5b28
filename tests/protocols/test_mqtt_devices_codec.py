"""The device topic scheme and payload codec (pure; no broker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from protocols.mqtt.devices import (
    DEFAULT_ROOT,
    MAX_DEVICE_PAYLOAD_BYTES,
    Availability,
    Birth,
    CommandResult,
    DeviceCommandMessage,
    DeviceKind,
    DeviceMessageError,
    DeviceTopics,
    HvacMode,
    HvacState,
    MessageKind,
    ResultStatus,
    SetpointOffset,
    ThermostatTelemetry,
    WaterHeaterAction,
    WaterHeaterMode,
    WaterHeaterTelemetry,
    decode_availability,
    decode_birth,
    decode_command,
    decode_result,
    decode_telemetry,
    encode,
    json_schemas,
)

T0 = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)


def thermostat(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "schema_version": "1",
        "type": "thermostat",
        "device_id": "t1",
        "timestamp": "2026-07-01T16:00:00Z",
        "mode": "cool",
        "hvac_state": "cooling",
        "setpoint_c": 22.0,
        "indoor_c": 22.4,
        "power_kw": 3.0,
    }
    base.update(kw)
    return base


def test_topics_build_and_parse() -> None:
    topics = DeviceTopics()
    assert topics.topic("t1", MessageKind.TELEMETRY) == f"{DEFAULT_ROOT}/t1/telemetry"
    assert topics.wildcard(MessageKind.RESULT) == f"{DEFAULT_ROOT}/+/result"
    assert topics.parse(f"{DEFAULT_ROOT}/t1/birth") == ("t1", MessageKind.BIRTH)
    assert topics.parse(f"{DEFAULT_ROOT}/t1/telemetry/x") is None
    assert topics.parse(f"{DEFAULT_ROOT}//telemetry") is None
    assert topics.parse(f"{DEFAULT_ROOT}/t1/gossip") is None
    assert topics.parse("elsewhere/t1/telemetry") is None
    for bad in ("", "a/#", "a/+/b", "a/"):
        with pytest.raises(ValueError, match="topic root"):
            DeviceTopics(bad)


def test_thermostat_telemetry_exact_bytes_round_trip() -> None:
    message = ThermostatTelemetry(
        device_id="t1",
        timestamp=T0,
        mode=HvacMode.COOL,
        hvac_state=HvacState.COOLING,
        setpoint_c=22.0,
        indoor_c=22.4,
        power_kw=3.0,
    )
    wire = encode(message)
    assert wire == (
        b'{"schema_version":"1","device_id":"t1","timestamp":"2026-07-01T16:00:00Z",'
        b'"type":"thermostat","mode":"cool","hvac_state":"cooling","setpoint_c":22.0,'
        b'"offset_c":0.0,"indoor_c":22.4,"power_kw":3.0,"override":false}'
    )
    assert decode_telemetry(wire, "t1") == message


def test_water_heater_telemetry_and_energy_take_bound() -> None:
    message = WaterHeaterTelemetry(
        device_id="wh1",
        timestamp=T0,
        mode=WaterHeaterMode.SHED,
        element_on=False,
        tank_c=48.0,
        setpoint_c=50.0,
        power_kw=0.0,
        energy_take_kwh=2.6,
        energy_capacity_kwh=4.4,
    )
    assert decode_telemetry(encode(message)) == message
    too_much = message.model_dump(mode="json") | {"energy_take_kwh": 9.0}
    with pytest.raises(DeviceMessageError) as err:
        decode_telemetry(json.dumps(too_much).encode())
    assert err.value.reason == "schema_violation"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"[1, 2]", "schema_violation"),
        (json.dumps(thermostat(indoor_c=900)).encode(), "schema_violation"),
        (json.dumps(thermostat(power_kw=-1)).encode(), "schema_violation"),
        (json.dumps(thermostat(mode="turbo")).encode(), "schema_violation"),
        (json.dumps(thermostat(timestamp="2026-07-01T16:00:00")).encode(), "schema_violation"),
        # Overflow converting to UTC: a refusal, not an OverflowError that ends the link's task.
        (
            json.dumps(thermostat(timestamp="9999-12-31T23:00:00-05:00")).encode(),
            "schema_violation",
        ),
        (
            json.dumps(thermostat(timestamp="0001-01-01T00:00:00+05:00")).encode(),
            "schema_violation",
        ),
        (json.dumps(thermostat(schema_version="2")).encode(), "schema_violation"),
        (json.dumps(thermostat(extra_field=1)).encode(), "schema_violation"),
        (json.dumps(thermostat(type="toaster")).encode(), "schema_violation"),
        (json.dumps(thermostat(device_id="t2")).encode(), "wrong_device"),
        (b" " * (MAX_DEVICE_PAYLOAD_BYTES + 1), "too_large"),
    ],
)
def test_bad_telemetry_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(DeviceMessageError) as err:
        decode_telemetry(payload, "t1")
    assert err.value.reason == reason


def test_commands_and_results_round_trip() -> None:
    command = DeviceCommandMessage(
        command_id="gw1-abc",
        device_id="t1",
        issued_at=T0,
        hold_s=300,
        body=SetpointOffset(offset_c=2.0, precondition_offset_c=-1.5, precondition_s=1800),
    )
    assert decode_command(encode(command), "t1") == command
    heater = DeviceCommandMessage(
        command_id="gw2",
        device_id="wh1",
        issued_at=T0,
        hold_s=60,
        body=WaterHeaterAction(mode=WaterHeaterMode.LOAD_UP),
    )
    wire = json.loads(encode(heater))
    assert wire["body"] == {"action": "water_heater", "mode": "load_up"}
    assert decode_command(encode(heater)) == heater
    with pytest.raises(DeviceMessageError, match="wrong_device"):
        decode_command(encode(heater), "t1")
    bad = wire | {"body": {"action": "self_destruct"}}
    with pytest.raises(DeviceMessageError, match="schema_violation"):
        decode_command(json.dumps(bad).encode())
    with pytest.raises(DeviceMessageError, match="schema_violation"):
        decode_command(json.dumps(wire | {"hold_s": 0}).encode())

    result = CommandResult(
        device_id="t1",
        timestamp=T0,
        command_id="gw1-abc",
        status=ResultStatus.OPTED_OUT,
        reason="occupant override",
    )
    assert decode_result(encode(result), "t1") == result


def test_birth_and_availability() -> None:
    birth = Birth(device_id="t1", timestamp=T0, kind=DeviceKind.THERMOSTAT, rated_kw=3.5)
    assert decode_birth(encode(birth), "t1") == birth
    with pytest.raises(DeviceMessageError):
        decode_birth(encode(birth).replace(b"3.5", b"500"))  # a 500 kW thermostat
    online = Availability(device_id="t1", timestamp=T0, online=False)
    assert decode_availability(encode(online), "t1").online is False


def test_json_schemas_cover_every_topic_kind() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"birth", "availability", "telemetry", "command", "result"}
    telemetry = schemas["telemetry"]
    assert telemetry["discriminator"]["propertyName"] == "type"
    indoor = telemetry["$defs"]["ThermostatTelemetry"]["properties"]["indoor_c"]
    assert (indoor["minimum"], indoor["maximum"]) == (-30, 60)
    actions = schemas["command"]["properties"]["body"]["discriminator"]["mapping"]
    assert set(actions) == {
        "set_mode",
        "set_setpoint",
        "setpoint_offset",
        "end_event",
        "water_heater",
    }
    json.dumps(schemas)  # serialisable as is
