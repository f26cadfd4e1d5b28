"""Fuzz: messages from MQTT thermostats and water heaters (birth, availability, telemetry, result).

Decoder level: every decoder of :mod:`protocols.mqtt.devices` returns its model or raises
:class:`DeviceMessageError`, never anything else.

Link level: the real :class:`DeviceMqttLink` with a real thermostat and water heater attached
(no broker: messages are handed to ``route``, as its receive loop does, and once through the
receive loop itself). Each message is counted as received; one that does not decode, names
another device or comes on an unknown topic is counted as dropped and changes nothing the
adapter knows; nothing raises out of the link, so the receive task never ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from adapters.mqtt_devices.devices import (
    DeviceMqttConfig,
    DeviceMqttLink,
    MqttThermostat,
    MqttWaterHeater,
)
from gateway.devices import AdapterError
from protocols.mqtt.devices import (
    DEFAULT_ROOT,
    DeviceMessageError,
    MessageKind,
    decode_availability,
    decode_birth,
    decode_command,
    decode_result,
    decode_telemetry,
)
from tests.fuzz.common import Tally, drive, dumps, fuzz_settings, json_payloads
from unified.model import DeviceCommand

TS = "2026-07-01T16:00:00Z"
DEEP = b"[" * 20_000  # within the 16 kB limit, past the JSON parser's recursion limit


def births() -> list[dict[str, Any]]:
    return [
        {
            "device_id": "t1",
            "timestamp": TS,
            "kind": "thermostat",
            "rated_kw": 3.5,
            "model": "T-1000",
            "firmware": "1.2.3",
            "min_setpoint_c": 10,
            "max_setpoint_c": 30,
        },
        {
            "device_id": "w1",
            "timestamp": TS,
            "kind": "water_heater",
            "rated_kw": 4.5,
            "tank_litres": 200,
        },
    ]


def telemetries() -> list[dict[str, Any]]:
    return [
        {
            "type": "thermostat",
            "device_id": "t1",
            "timestamp": TS,
            "mode": "cool",
            "hvac_state": "cooling",
            "setpoint_c": 22.0,
            "offset_c": 1.0,
            "indoor_c": 22.4,
            "outdoor_c": 31.0,
            "power_kw": 3.0,
            "override": False,
            "command_id": "gw1-abc",
        },
        {
            "type": "water_heater",
            "device_id": "w1",
            "timestamp": TS,
            "mode": "shed",
            "element_on": False,
            "tank_c": 55.0,
            "setpoint_c": 60.0,
            "power_kw": 0.0,
            "energy_take_kwh": 2.0,
            "energy_capacity_kwh": 10.0,
        },
    ]


def availabilities() -> list[dict[str, Any]]:
    return [{"device_id": d, "timestamp": TS, "online": on} for d in ("t1", "w1") for on in (1, 0)]


def results() -> list[dict[str, Any]]:
    return [
        {"device_id": "t1", "timestamp": TS, "command_id": "gw1-abc", "status": s, "reason": "r"}
        for s in ("accepted", "rejected", "completed", "opted_out")
    ]


def commands() -> list[dict[str, Any]]:
    return [
        {
            "command_id": "gw1-abc",
            "device_id": "t1",
            "issued_at": TS,
            "hold_s": 300,
            "body": {"action": "setpoint_offset", "offset_c": 2, "precondition_s": 600},
        },
        {
            "command_id": "gw2-abc",
            "device_id": "w1",
            "issued_at": TS,
            "hold_s": 300,
            "body": {"action": "water_heater", "mode": "load_up"},
        },
    ]


Decoder = Callable[[bytes, str | None], object]
DECODERS: dict[MessageKind, tuple[Decoder, list[dict[str, Any]]]] = {
    MessageKind.BIRTH: (decode_birth, births()),
    MessageKind.AVAILABILITY: (decode_availability, availabilities()),
    MessageKind.TELEMETRY: (decode_telemetry, telemetries()),
    MessageKind.RESULT: (decode_result, results()),
    MessageKind.COMMAND: (decode_command, commands()),
}
KINDS = tuple(DECODERS)
PAYLOADS = {kind: json_payloads(valid, max_depth=20_000) for kind, (_, valid) in DECODERS.items()}
ANY_PAYLOAD = st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), PAYLOADS[k]))


def test_device_decoders_raise_only_device_message_errors() -> None:
    tally = Tally("device_mqtt.decoders")

    @fuzz_settings(500)
    @given(ANY_PAYLOAD, st.sampled_from((None, "t1", "w1")))
    @example((MessageKind.TELEMETRY, DEEP), "t1")
    @example((MessageKind.BIRTH, DEEP), None)
    @example((MessageKind.RESULT, b'{"device_id":"t1","x":' + b"[" * 10_000), "t1")
    @example(
        (
            MessageKind.TELEMETRY,
            dumps(telemetries()[0] | {"timestamp": "9999-12-31T23:00:00-05:00"}),
        ),
        "t1",
    )
    def one(message: tuple[MessageKind, bytes], device_id: str | None) -> None:
        kind, payload = message
        decoder, _ = DECODERS[kind]
        try:
            decoder(payload, device_id)
        except DeviceMessageError as exc:
            tally(f"{kind.value}:{exc.reason}")
            return
        tally(f"{kind.value}:decoded")

    one()
    tally.check(400)


# --------------------------------------------------------------------------- link level

ROOT = DEFAULT_ROOT
INBOUND = (MessageKind.BIRTH, MessageKind.AVAILABILITY, MessageKind.TELEMETRY, MessageKind.RESULT)


@st.composite
def routed(draw: st.DrawFn) -> tuple[str, bytes]:
    """A topic (mostly a known device's inbound one; sometimes odd) and a payload for it."""
    device = draw(st.sampled_from(("t1", "w1", "t1", "w1", "stranger")))
    kind = draw(st.sampled_from(INBOUND))
    payload = draw(PAYLOADS[kind])
    topic = draw(
        st.sampled_from(
            (
                f"{ROOT}/{device}/{kind.value}",
                f"{ROOT}/{device}/{kind.value}",
                f"{ROOT}/{device}/{kind.value}",
                f"{ROOT}/{device}/command",  # our own direction: never taken in
                f"{ROOT}/{device}/{kind.value}/extra",
                f"{ROOT}//{kind.value}",
                f"elsewhere/{device}/{kind.value}",
            )
        )
    )
    return topic, payload


@dataclass
class Seen:
    birth: object
    online: object
    telemetry: object


def seen(adapter: MqttThermostat | MqttWaterHeater) -> Seen:
    s = adapter._seen
    return Seen(s.birth, s.online, s.telemetry)


def expected_drop(
    topic: str, payload: bytes, adapters: dict[str, MqttThermostat | MqttWaterHeater]
) -> bool:
    """Whether the link must drop this message, judged by the pure codec alone."""
    parts = topic.removeprefix(ROOT + "/").split("/")
    if not topic.startswith(ROOT + "/") or len(parts) != 2 or parts[0] not in adapters:
        return True
    try:
        kind = MessageKind(parts[1])
    except ValueError:
        return True
    if kind not in INBOUND:
        return True
    decoder, _ = DECODERS[kind]
    try:
        message = decoder(payload, parts[0])
    except DeviceMessageError:
        return True
    adapter = adapters[parts[0]]
    kind_of = getattr(message, "kind", None)
    type_of = getattr(message, "type", None)
    if kind is MessageKind.BIRTH and kind_of is not adapter.kind:
        return True
    return kind is MessageKind.TELEMETRY and type_of != adapter.kind.value


async def test_link_counts_every_message_and_drops_what_does_not_decode() -> None:
    link = DeviceMqttLink(DeviceMqttConfig(topic_root=ROOT))
    opt_outs: list[tuple[DeviceCommand, AdapterError]] = []

    def on_opt_out(command: DeviceCommand, error: AdapterError) -> None:
        opt_outs.append((command, error))

    adapters: dict[str, MqttThermostat | MqttWaterHeater] = {
        "t1": MqttThermostat("t1", link, on_opt_out=on_opt_out),
        "w1": MqttWaterHeater("w1", link, on_opt_out=on_opt_out),
    }
    tally = Tally("device_mqtt.link")
    fed: list[tuple[str, bytes]] = []

    @fuzz_settings(500)
    @given(routed())
    @example((f"{ROOT}/t1/telemetry", DEEP))
    @example((f"{ROOT}/w1/birth", DEEP))
    @example((f"{ROOT}/t1/result", b'{"device_id":"t1","x":' + b"[" * 10_000))
    def one(message: tuple[str, bytes]) -> None:
        topic, payload = message
        stats = link.stats
        received = stats.received
        dropped = stats.dropped_unknown + stats.dropped_invalid
        device = topic.removeprefix(ROOT + "/").split("/")[0]
        adapter = adapters.get(device)
        before = None if adapter is None else seen(adapter)
        link.route(topic, payload)  # must not raise, whatever it holds
        assert stats.received == received + 1
        now_dropped = stats.dropped_unknown + stats.dropped_invalid
        if expected_drop(topic, payload, adapters):
            assert now_dropped == dropped + 1, (topic, payload[:200])
            if adapter is not None:
                assert seen(adapter) == before, "a dropped message changed the device's state"
            tally("dropped")
        else:
            assert now_dropped == dropped, (topic, payload[:200])
            tally("taken")
        if len(fed) < 200:
            fed.append(message)

    await drive(one)
    tally.check(400)
    # No command was ever sent, so no result can opt a command out: the listener stays quiet.
    assert opt_outs == []

    # The receive loop itself over the same messages: it must end only when they run out.
    class Message:
        def __init__(self, topic: str, payload: bytes) -> None:
            self.topic, self.payload = topic, payload

    class Client:
        @property
        async def messages(self) -> AsyncIterator[Message]:  # aiomqtt's shape
            for topic, payload in fed:
                yield Message(topic, payload)
                await asyncio.sleep(0)

    received = link.stats.received
    await link._receive(Client())  # type: ignore[arg-type]
    assert link.stats.received == received + len(fed)
