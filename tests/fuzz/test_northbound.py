"""Fuzz: Grid DERMS JSON on the northbound topics (commands, flex, performance, weather).

Decoder level: :func:`decode_command` and :func:`decode_weather` return a model or raise their
own decode error, never anything else; a command whose ``command_id`` is an identifier keeps it
on the error (so its rejection goes to its ack topic).

Handler level: the real :class:`GridDermsUplink` bound to a real :class:`Gateway` core (SQLite
command store, control loop, recording battery adapters), with a collecting link standing in for
the MQTT client. Every message gets its answer while it is handled: one ``rejected`` ack or one
``errors`` message for what does not decode (and nothing stored), acks for what does; nothing
escapes the handler; every device write comes from a command the core accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from adapters.grid_derms.config import BrokerConfig
from adapters.grid_derms.link import Outgoing, ReplyTo
from adapters.grid_derms.uplink import GridDermsUplink
from gateway.config import (
    CoreConfig,
    HistoryConfig,
    SettlementConfig,
    StoreConfig,
    TimingConfig,
)
from gateway.core import Gateway
from protocols.mqtt import CommandDecodeError, decode_command
from protocols.mqtt.northbound import (
    FeedDecodeError,
    WeatherDecodeError,
    decode_feed,
    decode_weather,
)
from tests.fuzz.common import (
    LoopBridge,
    Tally,
    drive,
    dumps,
    fuzz_settings,
    json_payloads,
)
from unified.model import (
    ID_PATTERN,
    Ack,
    AckState,
    BatteryRatings,
    Command,
    DerClass,
    Device,
    DeviceCommand,
    DeviceState,
    ErrorMessage,
    TopologyLocation,
    utcnow,
)

GATEWAY_ID = "gw-fuzz"
DEVICES = ("bat-1", "bat-2")
_ID = re.compile(ID_PATTERN)


def _iso(seconds_from_now: float) -> str:
    return (utcnow() + timedelta(seconds=seconds_from_now)).isoformat()


def valid_commands() -> list[dict[str, Any]]:
    """One of each command type, valid for the rig's fleet (start within the hour)."""
    return [
        {
            "type": "dispatch",
            "command_id": "d1",
            "target": {"group_id": "feeder:f1"},
            "kw": -4.0,
            "start": _iso(600),
            "duration_s": 900,
            "ramp_s": 60,
            "program": "p1",
        },
        {
            "type": "envelope",
            "command_id": "e1",
            "target": {"device_ids": ["bat-1", "bat-2"]},
            "intervals": [
                {"start": _iso(60), "end": _iso(960), "import_limit_kw": 3.0},
                {"start": _iso(960), "end": _iso(1860), "export_limit_kw": 2.0},
            ],
        },
        {
            "type": "setpoint",
            "command_id": "s1",
            "device_id": "bat-1",
            "kw": 2.5,
            "start": _iso(1),
            "duration_s": 120,
            "priority": 5,
            "issued_at": _iso(0),
        },
        {"type": "cancel", "command_id": "x1", "cancels": "d1"},
    ]


def valid_flex() -> list[dict[str, Any]]:
    return [
        {"group_id": "feeder:f1", "horizon_s": 7200, "interval_s": 3600},
        {
            "request_id": "r1",
            "group_id": "substation:s1",
            "start": _iso(0),
            "horizon_s": 3600,
            "interval_s": 900,
            "window_start": _iso(0),
            "window_end": _iso(1800),
        },
    ]


def valid_weather() -> list[dict[str, Any]]:
    start = utcnow().replace(minute=0, second=0, microsecond=0)
    return [
        {
            "issued_at": _iso(0),
            "scope": "feeder:f1",
            "step_s": 3600,
            "points": [
                {"start": (start + timedelta(hours=h)).isoformat(), "temp_c": 20.0 + h}
                for h in range(3)
            ],
        }
    ]


# --------------------------------------------------------------------------- decoder level

COMMAND_PAYLOADS = json_payloads(valid_commands())
WEATHER_PAYLOADS = json_payloads(valid_weather())
# Nested past the JSON parser's recursion limit: a RecursionError, not a JSONDecodeError.
DEEP = b"[" * 100_000
DEEP_IN_ID = b'{"command_id":"c1","type":"cancel","cancels":' + b"[" * 50_000


def test_decode_command_raises_only_its_own_error() -> None:
    tally = Tally("northbound.decode_command")

    @fuzz_settings(600)
    @given(COMMAND_PAYLOADS)
    @example(DEEP)
    @example(DEEP_IN_ID)
    @example(dumps(valid_commands()[0] | {"start": "9999-12-31T23:00:00-05:00"}))
    @example(dumps(valid_commands()[0] | {"kw": float("nan")}))
    def one(payload: bytes) -> None:
        result = _decoded(payload)  # raises anything but CommandDecodeError
        if isinstance(result, CommandDecodeError):
            tally(result.reason.value)
            raw = _json_object(payload)
            cid = None if raw is None else raw.get("command_id")
            if isinstance(cid, str) and _ID.fullmatch(cid):
                assert result.command_id == cid, (result, cid)
            return
        tally("decoded")
        assert _ID.fullmatch(result.command_id)

    one()
    tally.check(400)


def test_decode_weather_raises_only_its_own_error() -> None:
    tally = Tally("northbound.decode_weather")

    @fuzz_settings(300)
    @given(WEATHER_PAYLOADS)
    @example(DEEP)
    def one(payload: bytes) -> None:
        try:
            decode_weather(payload)
        except WeatherDecodeError as exc:
            tally(exc.reason.value)
            return
        tally("decoded")

    one()
    tally.check(200)


FEED_PAYLOADS = json_payloads(
    [
        {"value": 49.9, "timestamp": _iso(0), "valid_s": 60, "unit": "Hz"},
        {"schema_version": "1", "name": "frequency", "value": -3, "timestamp": _iso(-5)},
    ]
)


def test_decode_feed_raises_only_its_own_error() -> None:
    tally = Tally("northbound.decode_feed")

    @fuzz_settings(300)
    @given(FEED_PAYLOADS)
    @example(DEEP)
    def one(payload: bytes) -> None:
        try:
            value = decode_feed(payload, "frequency")
        except FeedDecodeError as exc:
            tally(exc.reason.value)
            return
        assert value.name == "frequency"
        tally("decoded")

    one()
    tally.check(200)


def _decoded(payload: bytes) -> Command | CommandDecodeError:
    try:
        return decode_command(payload)
    except CommandDecodeError as exc:
        return exc


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


# --------------------------------------------------------------------------- handler level


class CollectingLink:
    """Stands in for the MQTT link: what the uplink would publish, in order."""

    def __init__(self) -> None:
        self.reliable: list[Outgoing] = []
        self.telemetry: list[Outgoing] = []

    def publish_reliable(self, message: Outgoing) -> None:
        self.reliable.append(message)

    def publish_telemetry(self, message: Outgoing) -> None:
        self.telemetry.append(message)


@dataclass
class RecordingBattery:
    """A battery that always answers and records every write it is given."""

    device_id: str
    writes: list[DeviceCommand] = field(default_factory=list)

    async def connect(self) -> None:
        await asyncio.sleep(0)

    async def close(self) -> None:
        await asyncio.sleep(0)

    async def read(self) -> DeviceState:
        await asyncio.sleep(0)
        return DeviceState(
            device_id=self.device_id,
            timestamp=utcnow(),
            power_kw=0.0,
            soc_pct=50.0,
            capacity_kwh=10.0,
            max_charge_kw=5.0,
            max_discharge_kw=5.0,
            source="fuzz",
        )

    async def apply(self, command: DeviceCommand) -> None:
        await asyncio.sleep(0)
        self.writes.append(command)


@dataclass
class UplinkRig:
    uplink: GridDermsUplink
    link: CollectingLink
    core: Gateway
    batteries: dict[str, RecordingBattery]
    accepted: set[str] = field(default_factory=set)
    """Commands the core accepted (a device write must come from one of them)."""


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[UplinkRig]:
    broker = BrokerConfig(commands_per_s=100_000, commands_burst=1_000_000)
    uplink = GridDermsUplink(broker, GATEWAY_ID, backoff_max_s=1.0)
    link = CollectingLink()
    uplink.link = link  # type: ignore[assignment]
    batteries = {d: RecordingBattery(d) for d in DEVICES}
    config = CoreConfig(
        gateway_id=GATEWAY_ID,
        store=StoreConfig(path=tmp_path / "commands.sqlite"),
        history=HistoryConfig(enabled=False),
        settlement=SettlementConfig(enabled=False),
        timing=TimingConfig(
            control_period_s=0.05, poll_interval_s=0.05, telemetry_period_s=0.5, stale_after_s=5
        ),
    )
    devices = [
        Device(
            device_id=d,
            der_class=DerClass.BATTERY,
            location=TopologyLocation(substation="s1", feeder="f1"),
            adapter="fuzz",
            ratings=BatteryRatings(max_charge_kw=5, max_discharge_kw=5, capacity_kwh=10),
        )
        for d in DEVICES
    ]
    core = Gateway(config, devices=devices, adapters=batteries, publisher=uplink)
    uplink.bind(core)
    task = asyncio.create_task(core.run(), name="fuzz:core")
    try:
        await asyncio.wait_for(core.ready.wait(), 10)
        yield UplinkRig(uplink, link, core, batteries)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def _topics() -> dict[str, str]:
    root = f"derms/v1/{GATEWAY_ID}"
    return {
        "commands": f"{root}/commands",
        "flex": f"{root}/requests/flex",
        "performance": f"{root}/requests/performance",
        "weather": f"{root}/weather",
        "errors": f"{root}/errors",
    }


TOPICS = _topics()
ANSWER_PREFIXES = (
    f"derms/v1/{GATEWAY_ID}/telemetry/flex/",
    f"derms/v1/{GATEWAY_ID}/performance/",
)

MESSAGES = st.one_of(
    st.tuples(st.just(TOPICS["commands"]), COMMAND_PAYLOADS),
    st.tuples(st.just(TOPICS["commands"]), COMMAND_PAYLOADS),
    st.tuples(st.just(TOPICS["flex"]), json_payloads(valid_flex())),
    st.tuples(
        st.just(TOPICS["performance"]),
        json_payloads([{"command_id": "d1"}, {"command_id": "nope"}]),
    ),
    st.tuples(st.just(TOPICS["weather"]), WEATHER_PAYLOADS),
)
REPLIES = st.one_of(
    st.none(),
    st.builds(
        ReplyTo,
        st.sampled_from(
            [
                "derms/v1/replies/grid-1",
                f"derms/v1/{GATEWAY_ID}/commands",  # back into our own tree: refused
                "derms/v1/replies/#",
                "elsewhere",
            ]
        ),
        st.none() | st.binary(max_size=8),
    ),
)


def _answers(sent: list[Outgoing]) -> tuple[list[ErrorMessage], list[Ack]]:
    errors, acks = [], []
    for message in sent:
        if message.topic == TOPICS["errors"]:
            errors.append(ErrorMessage.model_validate_json(message.payload))
        elif "/acks/" in message.topic:
            acks.append(Ack.model_validate_json(message.payload))
    return errors, acks


async def _handle(rig: UplinkRig, topic: str, payload: bytes, reply: ReplyTo | None) -> str:
    """Feed one message; check its answer; return what became of it (for the tally)."""
    link, errors_topic = rig.link, TOPICS["errors"]
    before, stored_before = len(link.reliable), await rig.core.store.count()
    await rig.uplink.handle(payload, reply, topic)  # must not raise, whatever it holds
    sent = link.reliable[before:]
    # A response topic that is refused gets its own errors message; take it out first.
    refused = [
        m
        for m in sent
        if m.topic == errors_topic and b'"reason":"response_topic_refused"' in m.payload
    ]
    if reply is not None and refused:
        assert len(refused) == 1
    sent = [m for m in sent if m not in refused]
    errors, acks = _answers(sent)
    for error in errors:
        assert error.topic == topic
        assert error.payload_excerpt == payload[:256].decode("utf-8", errors="replace")
    if topic != TOPICS["commands"]:
        return _request_answered(topic, payload, sent, errors)
    result = _decoded(payload)
    if isinstance(result, CommandDecodeError):
        # Exactly one answer, on the command's ack topic when its id could be read.
        mine_errors = [e for e in errors if e.reason is result.reason]
        mine_acks = [
            a
            for a in acks
            if a.command_id == result.command_id
            and a.state is AckState.REJECTED
            and a.reason is result.reason
            and a.detail == result.detail
        ]
        assert len(mine_errors) + len(mine_acks) == 1, (payload[:200], sent)
        assert (len(mine_acks) == 1) == (result.command_id is not None)
        assert await rig.core.store.count() == stored_before, "an invalid command was stored"
        return f"command:{result.reason.value}"
    cid = result.command_id
    mine_acks = [a for a in acks if a.command_id == cid]
    mine_errors = [e for e in errors if e.command_id == cid]
    assert mine_acks or mine_errors, (payload[:200], sent)
    if any(a.state is AckState.ACCEPTED for a in mine_acks):
        rig.accepted.add(cid)
    return "command:" + (mine_errors[0].reason.value if mine_errors else "acked")


_COMMAND_KINDS = frozenset({"dispatch", "setpoint", "envelope", "release"})


def _weather_error(payload: bytes) -> WeatherDecodeError | None:
    try:
        decode_weather(payload)
    except WeatherDecodeError as exc:
        return exc
    return None


def _request_answered(
    topic: str, payload: bytes, sent: list[Outgoing], errors: list[ErrorMessage]
) -> str:
    kind = topic.rsplit("/", 1)[1]
    # (acks of earlier commands may go out meanwhile: the control loop runs)
    answers = [m for m in sent if m.topic.startswith(ANSWER_PREFIXES)]
    if kind == "weather":
        refused = _weather_error(payload)
        if refused is not None:
            assert [e.reason for e in errors] == [refused.reason], (payload[:200], sent)
            return f"weather:{refused.reason.value}"
        # A forecast that is taken is not answered (only a refusal or a warning is).
        assert len(errors) <= 1
        return "weather:" + (errors[0].reason.value if errors else "taken")
    assert len(errors) + len(answers) == 1, (topic, payload[:200], sent)
    return f"{kind}:" + (errors[0].reason.value if errors else "answered")


async def test_uplink_answers_every_message_and_writes_only_accepted_commands(
    rig: UplinkRig,
) -> None:
    bridge = LoopBridge(asyncio.get_running_loop())
    tally = Tally("northbound.uplink")

    @fuzz_settings(400)
    @given(MESSAGES, REPLIES)
    @example((TOPICS["commands"], DEEP), None)
    @example((TOPICS["commands"], DEEP_IN_ID), None)
    @example((TOPICS["flex"], DEEP), None)
    @example((TOPICS["weather"], DEEP), None)
    @example(
        (TOPICS["commands"], dumps(valid_commands()[2] | {"start": "9999-12-31T23:00:00-05:00"})),
        None,
    )
    def one(message: tuple[str, bytes], reply: ReplyTo | None) -> None:
        topic, payload = message
        tally(bridge.run(_handle(rig, topic, payload, reply)))

    await drive(one)
    tally.check(300)
    # Let the control loop act on what was accepted, then check every write's provenance.
    await asyncio.sleep(0.3)
    writes = [w for b in rig.batteries.values() for w in b.writes]
    causes = {s.command_id for w in writes for s in w.provenance if s.kind in _COMMAND_KINDS}
    assert causes <= rig.accepted, causes - rig.accepted
    print(f"fuzz[northbound.uplink]: {len(writes)} device writes, all from accepted commands")
