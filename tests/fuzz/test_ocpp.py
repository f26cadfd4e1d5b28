"""Fuzz: OCPP-J frames from chargers, at the codec and at the central system's websocket.

Codec level: :func:`decode_meter_values` never raises and gives finite values or None;
:func:`decode_data_transfer_needs` and :func:`decode_ev_charging_needs` raise only
:class:`InvalidChargingNeeds` and give finite, non-negative needs; :func:`parse_time` never
raises and gives a UTC time in the sane range or None.

Central level: the real :class:`OcppCentral` on a real websocket, one booted 1.6 charger and one
booted 2.0.1 charger speaking raw frames: valid requests (BootNotification, StatusNotification,
MeterValues, TransactionEvent, StartTransaction, DataTransfer, ...) mutated (overflowing
timestamps, NaN, wrong types, extra fields, deep nesting), malformed JSON, wrong message type
ids, unknown actions, raw bytes. Every frame that is a request, or cannot be read, gets exactly
one answer (a CALLRESULT or a CALLERROR with its id when readable, ``-1`` otherwise); a
well-formed CALLRESULT / CALLERROR from the charger gets none; the connection stays up and the
central asks nothing of the charger because of what it sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from ocpp.messages import Call, unpack  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection

from adapters.ocpp.central import OcppVersion
from protocols.ocpp import (
    InvalidChargingNeeds,
    decode_data_transfer_needs,
    decode_ev_charging_needs,
    decode_meter_values,
    parse_time,
)
from tests.adapters.ocpp.test_central import Harness, central_config, exchange, raw_client, running
from tests.fuzz.common import (
    BAD_TIMES,
    LoopBridge,
    Tally,
    corrupted,
    deep_json,
    drive,
    dumps,
    fuzz_settings,
    json_values,
    mutated,
    nested,
)
from unified.model import EARLIEST, LATEST

pytestmark = pytest.mark.timeout(120)

TS = "2026-07-01T16:00:00Z"
OVERFLOW = "9999-12-31T23:00:00-05:00"


def meter_values_16() -> list[dict[str, Any]]:
    return [
        {
            "timestamp": TS,
            "sampledValue": [
                {"value": "7400", "measurand": "Power.Active.Import", "unit": "W"},
                {"value": "12.5", "measurand": "Energy.Active.Import.Register", "unit": "kWh"},
                {"value": "55", "measurand": "SoC", "unit": "Percent"},
                {"value": "2400", "measurand": "Power.Active.Import", "unit": "W", "phase": "L1"},
            ],
        }
    ]


def meter_values_201() -> list[dict[str, Any]]:
    return [
        {
            "timestamp": TS,
            "sampledValue": [
                {
                    "value": 7.4,
                    "measurand": "Power.Active.Import",
                    "unitOfMeasure": {"unit": "kW", "multiplier": 0},
                },
                {"value": 12500, "measurand": "Energy.Active.Import.Register"},
                {"value": 55, "measurand": "SoC"},
            ],
        }
    ]


NEEDS_DATA = json.dumps(
    {
        "energyAmountWh": 20000,
        "departureTime": "2026-07-01T20:00:00Z",
        "evEnergyCapacityWh": 60000,
        "evMaxPowerW": 7400,
    }
)


def requests_16() -> list[list[Any]]:
    return [
        [2, "boot", "BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}],
        [2, "hb", "Heartbeat", {}],
        [
            2,
            "st",
            "StatusNotification",
            {"connectorId": 1, "errorCode": "NoError", "status": "Charging", "timestamp": TS},
        ],
        [2, "mv", "MeterValues", {"connectorId": 1, "meterValue": meter_values_16()}],
        [
            2,
            "start",
            "StartTransaction",
            {"connectorId": 1, "idTag": "tag-1", "meterStart": 1000, "timestamp": TS},
        ],
        [
            2,
            "stop",
            "StopTransaction",
            {"meterStop": 5000, "timestamp": TS, "transactionId": 1, "reason": "Local"},
        ],
        [2, "auth", "Authorize", {"idTag": "tag-1"}],
        [
            2,
            "dt",
            "DataTransfer",
            {"vendorId": "org.derms-gateway", "messageId": "EVChargingNeeds", "data": NEEDS_DATA},
        ],
        [3, "res", {"status": "Accepted"}],
        [4, "err", "InternalError", "boom", {}],
    ]


def requests_201() -> list[list[Any]]:
    return [
        [
            2,
            "boot",
            "BootNotification",
            {"chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"},
        ],
        [2, "hb", "Heartbeat", {}],
        [
            2,
            "st",
            "StatusNotification",
            {"timestamp": TS, "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1},
        ],
        [2, "mv", "MeterValues", {"evseId": 1, "meterValue": meter_values_201()}],
        [
            2,
            "tx",
            "TransactionEvent",
            {
                "eventType": "Updated",
                "timestamp": TS,
                "triggerReason": "MeterValuePeriodic",
                "seqNo": 3,
                "transactionInfo": {"transactionId": "tx-1"},
                "evse": {"id": 1, "connectorId": 1},
                "meterValue": meter_values_201(),
            },
        ],
        [
            2,
            "needs",
            "NotifyEVChargingNeeds",
            {
                "evseId": 1,
                "chargingNeeds": {
                    "requestedEnergyTransfer": "AC_three_phase",
                    "departureTime": "2026-07-01T20:00:00Z",
                    "acChargingParameters": {
                        "energyAmount": 20000,
                        "evMinCurrent": 6,
                        "evMaxCurrent": 16,
                        "evMaxVoltage": 230,
                    },
                },
            },
        ],
        [2, "auth", "Authorize", {"idToken": {"idToken": "tok", "type": "ISO14443"}}],
        [3, "res", {"status": "Accepted"}],
    ]


# --------------------------------------------------------------------------- codec level

TIME_VALUES = st.sampled_from(BAD_TIMES) | json_values(2)


def test_codec_decoders_raise_only_their_own_errors() -> None:
    tally = Tally("ocpp.codec")
    needs_201 = requests_201()[5][3]["chargingNeeds"]
    snake_needs = {
        "requested_energy_transfer": "AC_three_phase",
        "departure_time": needs_201["departureTime"],
        "ac_charging_parameters": {
            "energy_amount": 20000,
            "ev_max_current": 16,
            "ev_max_voltage": 230,
        },
        "dc_charging_parameters": {"ev_max_power": 50000, "ev_energy_capacity": 60000},
    }
    snake_meter = [
        {
            "timestamp": TS,
            "sampled_value": [
                {
                    "value": 7.4,
                    "measurand": "Power.Active.Import",
                    "unit_of_measure": {"unit": "kW"},
                },
                {"value": "12500", "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
                {"value": 55, "measurand": "SoC"},
            ],
        }
    ]
    inputs = st.one_of(
        st.tuples(st.just("meter"), mutated(snake_meter)),
        st.tuples(st.just("dt"), mutated(json.loads(NEEDS_DATA)).map(lambda d: dumps(d).decode())),
        st.tuples(st.just("dt"), st.text(max_size=40) | deep_json(5000).map(bytes.decode)),
        # (a mapping, as its signature says: the ocpp package validated it against the schema)
        st.tuples(st.just("needs"), mutated(snake_needs).filter(lambda d: isinstance(d, dict))),
        st.tuples(st.just("time"), TIME_VALUES),
    )

    @fuzz_settings(800)
    @given(inputs, st.sampled_from(("ocpp1.6", "ocpp2.0.1")))
    @example(("dt", "[" * 5000), "ocpp1.6")
    @example(
        (
            "needs",
            {
                "ac_charging_parameters": {
                    "energy_amount": 1,
                    "ev_max_current": 1e308,
                    "ev_max_voltage": 1e308,
                }
            },
        ),
        "ocpp2.0.1",
    )
    @example(("needs", {"ac_charging_parameters": [1, 2]}), "ocpp2.0.1")
    @example(("meter", [{"timestamp": OVERFLOW, "sampled_value": [{"value": 1}]}]), "ocpp1.6")
    def one(item: tuple[str, Any], version: OcppVersion) -> None:
        kind, value = item
        if kind == "meter":
            reading = decode_meter_values(value, version)
            if reading is not None:
                for v in (reading.power_kw, reading.energy_kwh, reading.soc_pct):
                    assert v is None or math.isfinite(v)
            tally(f"meter:{'reading' if reading else 'none'}")
            return
        if kind == "time":
            parsed = parse_time(value)
            assert parsed is None or EARLIEST <= parsed < LATEST
            tally(f"time:{'parsed' if parsed else 'none'}")
            return
        try:
            if kind == "dt":
                needs = decode_data_transfer_needs(value)
            else:
                needs = decode_ev_charging_needs(value, phases=3)
        except InvalidChargingNeeds as exc:
            tally(f"{kind}:{exc.problem}")
            return
        assert math.isfinite(needs.energy_kwh)
        assert needs.energy_kwh >= 0
        for v in (needs.ev_capacity_kwh, needs.ev_max_kw):
            assert v is None or math.isfinite(v)
        assert needs.departure is None or isinstance(needs.departure, datetime)
        tally(f"{kind}:decoded")

    one()
    tally.check(600)


# --------------------------------------------------------------------------- central level


@dataclass
class Charger:
    ws: ClientConnection
    version: OcppVersion
    calls_from_central: int = 0


@dataclass
class CentralRig:
    harness: Harness
    chargers: dict[OcppVersion, Charger]


@pytest.fixture
async def central_rig() -> AsyncIterator[CentralRig]:
    async with running(central_config()) as h:
        chargers: dict[OcppVersion, Charger] = {}
        for cp, version in (("CP-1", "ocpp1.6"), ("CP-2", "ocpp2.0.1")):
            ws = await raw_client(h, cp, version)
            boot = (requests_16() if version == "ocpp1.6" else requests_201())[0]
            reply = await exchange(ws, json.dumps(boot))
            assert reply[0] == 3
            chargers[version] = Charger(ws, version)  # type: ignore[index]
        try:
            yield CentralRig(h, chargers)
        finally:
            for charger in chargers.values():
                await charger.ws.close()


_barriers = itertools.count()


def _expects_answer(frame: str | bytes) -> bool:
    """A frame the central must answer: anything but a CALLRESULT / CALLERROR the ocpp package
    reads as one (those are answers to the central's own calls, and unsolicited ones are
    dropped)."""
    try:
        msg = unpack(frame)
    except Exception:  # any frame it cannot read is answered with a CALLERROR
        return True
    return isinstance(msg, Call)


async def _send(rig: CentralRig, version: OcppVersion, frame: str | bytes) -> str:
    """Send one frame, then a Heartbeat as a barrier; the answers in between are this frame's."""
    charger = rig.chargers[version]
    ws = charger.ws
    barrier = f"barrier-{next(_barriers)}"
    await ws.send(frame)
    await ws.send(json.dumps([2, barrier, "Heartbeat", {}]))
    answers: list[list[Any]] = []
    async with asyncio.timeout(10):
        while True:
            reply = json.loads(await ws.recv())
            if reply[0] == 2:  # the central asks the charger something
                charger.calls_from_central += 1
                await ws.send(json.dumps([3, reply[1], {"status": "Accepted"}]))
                continue
            if reply[1] == barrier:
                assert reply[0] == 3, reply  # the connection and the session still work
                break
            answers.append(reply)
    wanted = 1 if _expects_answer(frame) else 0
    assert len(answers) == wanted, (frame[:300], answers)
    assert charger.calls_from_central == 0, "the central asked the charger something"
    if not answers:
        return "ignored"
    answer = answers[0]
    if answer[0] == 4:
        return f"CALLERROR:{answer[2]}"
    return "CALLRESULT"


def _frames(requests: list[list[Any]]) -> st.SearchStrategy[str | bytes]:
    docs = st.sampled_from(requests)
    text = st.one_of(
        docs.map(json.dumps),
        docs.flatmap(mutated).map(lambda d: dumps(d).decode()),
        docs.flatmap(mutated).map(lambda d: dumps(d).decode()),
        docs.flatmap(mutated).map(lambda d: dumps(d).decode()),
        docs.map(lambda d: json.dumps(d).encode())
        .flatmap(corrupted)
        .map(lambda b: b.decode("utf-8", "replace")),
        st.sampled_from(("[]", "{}", "null", '"x"', "[5]", '[2,"a"]', '[2,"a",5,{}]')),
        deep_json(30_000).map(bytes.decode),
        json_values().map(lambda v: dumps(v).decode()),
    )
    frames = text | st.binary(max_size=64) | docs.map(lambda d: json.dumps(d).encode())
    # Past max_message_bytes the websocket itself closes with 1009, as it should: not fuzzed.
    return frames.filter(lambda f: len(f) < MAX_FRAME)


MAX_FRAME = central_config().max_message_bytes - 1024


async def test_central_answers_every_frame_and_keeps_the_connection(
    central_rig: CentralRig,
) -> None:
    bridge = LoopBridge(asyncio.get_running_loop())
    tally = Tally("ocpp.central")
    frames = st.one_of(
        st.tuples(st.just("ocpp1.6"), _frames(requests_16())),
        st.tuples(st.just("ocpp2.0.1"), _frames(requests_201())),
    )

    @fuzz_settings(400)
    @given(frames)
    @example(("ocpp1.6", "[" * 30_000))
    @example(("ocpp2.0.1", "[" * 30_000))
    @example(("ocpp1.6", '[2,"x",[],{}]'))  # an action that is not a string
    @example(("ocpp1.6", json.dumps([2, "d1", "Heartbeat", nested(900)])))
    @example(
        (
            "ocpp2.0.1",
            json.dumps([2, "d2", "MeterValues", {"evseId": 1, "meterValue": [nested(900)]}]),
        )
    )
    @example(
        (
            "ocpp1.6",
            json.dumps(
                [
                    2,
                    "d3",
                    "DataTransfer",
                    {
                        "vendorId": "org.derms-gateway",
                        "messageId": "EVChargingNeeds",
                        "data": "[" * 30_000,
                    },
                ]
            ),
        )
    )
    @example(("ocpp2.0.1", '[2,"x",{"a":1},{}]'))
    @example(
        (
            "ocpp2.0.1",
            json.dumps([*requests_201()[4][:3], {**requests_201()[4][3], "timestamp": OVERFLOW}]),
        )
    )
    def one(item: tuple[OcppVersion, str | bytes]) -> None:
        version, frame = item
        tally(f"{version}:{bridge.run(_send(central_rig, version, frame))}")

    await drive(one)
    tally.check(300)
    for charger in central_rig.chargers.values():
        reply = await exchange(charger.ws, '[2,"last","Heartbeat",{}]')
        assert reply[:2] == [3, "last"]
