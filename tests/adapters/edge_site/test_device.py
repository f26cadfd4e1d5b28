"""The head end's edge-site adapter against a real broker: what it takes from the site's outbox
and what it sends to the site's command topic."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from adapters.edge_site import EdgeSiteDevice, EdgeSiteEndpoint
from composition.config import parse_config
from gateway.devices import AdapterError, DeviceRejected, DeviceUnavailable
from protocols.mqtt.outbox import Record, encode_record, outbox_topic
from simulators.broker import BrokerEndpoint
from tests.e2e.fleet import eventually
from unified.config import ConfigError
from unified.model import COMMAND_ADAPTER, Ack, AckState, DeviceCommand, Reason, utcnow

pytestmark = pytest.mark.broker


@pytest.fixture
async def device(broker_endpoint: BrokerEndpoint) -> AsyncIterator[EdgeSiteDevice]:
    adapter = EdgeSiteDevice(
        "site-7",
        EdgeSiteEndpoint(
            port=broker_endpoint.port,
            site_id="s7",
            gateway_id="s7-edge",
            site_group="substation:s7",
            first_sample_s=0,
        ),
    )
    await adapter.connect()
    yield adapter
    await adapter.close()


def _sample(seq: int, net_kw: float | None, **more: object) -> bytes:
    payload = json.dumps({"at": utcnow().isoformat(), "net_kw": net_kw, **more}).encode()
    return encode_record(Record("site", seq, 0.0, payload), 1)


async def test_malformed_site_records_are_counted_and_the_next_good_one_is_read(
    device: EdgeSiteDevice, broker_endpoint: BrokerEndpoint
) -> None:
    with pytest.raises(DeviceUnavailable, match="no site sample yet"):
        await device.read()
    topic = outbox_topic("s7", "site")
    async with aiomqtt.Client("127.0.0.1", broker_endpoint.port) as site:
        for garbage in (b"not json", b"[1]", b'{"stream": "site"}', _sample(1, 1.0)[:-5]):
            await site.publish(topic, garbage, qos=1)
        blind = _sample(1, None)
        await site.publish(topic, blind, qos=1)
        await eventually(lambda: device.receiver.next_seq.get("site") == 2, 5, "record 1")
        assert device.malformed == 4
        with pytest.raises(DeviceUnavailable, match="cannot read its meter"):
            await device.read()
        good = _sample(2, -2.5, soc_pct=61.5, capacity_kwh=20, max_charge_kw=5, max_discharge_kw=5)
        await site.publish(topic, good, qos=1)
        await eventually(lambda: device.receiver.next_seq.get("site") == 3, 5, "record 2")
    state = await device.read()
    assert state.power_kw == -2.5
    assert state.soc_pct == 61.5
    assert state.capacity_kwh == 20


async def test_setpoints_limits_and_release_reach_the_site_as_unified_commands(
    device: EdgeSiteDevice, broker_endpoint: BrokerEndpoint
) -> None:
    received: list[dict[str, object]] = []
    async with aiomqtt.Client("127.0.0.1", broker_endpoint.port) as site:
        await site.subscribe("derms/v1/s7-edge/commands", qos=1)

        async def listen() -> None:
            async for message in site.messages:
                assert isinstance(message.payload, bytes)
                received.append(json.loads(message.payload))

        task = asyncio.create_task(listen())
        try:
            await device.apply(DeviceCommand(device_id="site-7", power_kw=-3.0))
            await eventually(lambda: len(received) == 1, 5, "the dispatch")
            # The supervisor's refresh of the same setpoint: what stands has time left.
            await device.apply(DeviceCommand(device_id="site-7", power_kw=-3.0))
            await device.apply(
                DeviceCommand(device_id="site-7", power_kw=None, export_limit_kw=1.5)
            )
            await eventually(lambda: len(received) == 3, 5, "the envelope and a cancel")
            await device.apply(DeviceCommand(device_id="site-7", power_kw=None))
            await eventually(lambda: len(received) == 4, 5, "the release")
        finally:
            task.cancel()
    commands = [COMMAND_ADAPTER.validate_python(r) for r in received]
    dispatch, envelope, cancel_target, cancel_limits = commands
    assert dispatch.type == "dispatch"
    assert dispatch.model_dump()["kw"] == -3.0
    assert dispatch.model_dump()["mode"] == "target"
    assert dispatch.model_dump()["target"]["group_id"] == "substation:s7"
    assert envelope.type == "envelope"
    assert envelope.model_dump()["intervals"][0]["export_limit_kw"] == 1.5
    # The dispatch no longer stands once only limits are asked for; then the limits go too.
    assert cancel_target.model_dump()["cancels"] == dispatch.command_id
    assert cancel_limits.model_dump()["cancels"] == envelope.command_id


async def test_a_command_the_site_rejects_is_a_refusal_at_the_head_end(
    broker_endpoint: BrokerEndpoint,
) -> None:
    refused: list[tuple[DeviceCommand, AdapterError]] = []
    device = EdgeSiteDevice(
        "site-8",
        EdgeSiteEndpoint(
            port=broker_endpoint.port,
            site_id="s8",
            gateway_id="s8-edge",
            site_group="substation:s8",
            first_sample_s=0,
        ),
        on_refusal=lambda command, exc: refused.append((command, exc)),
    )
    await device.connect()
    try:
        async with aiomqtt.Client("127.0.0.1", broker_endpoint.port) as site:
            await site.subscribe("derms/v1/s8-edge/commands", qos=1)
            asked = DeviceCommand(device_id="site-8", power_kw=-4.0)
            await device.apply(asked)
            async for message in site.messages:
                assert isinstance(message.payload, bytes)
                command_id = json.loads(message.payload)["command_id"]
                break
            # The site's core answers on its ack topic: unknown group (say).
            answers = ((AckState.RECEIVED, None), (AckState.REJECTED, Reason.UNKNOWN_GROUP))
            for state, reason in answers:
                ack = Ack(
                    command_id=command_id,
                    state=state,
                    timestamp=utcnow(),
                    reason=reason,
                    detail=None if reason is None else "no group substation:s8",
                )
                topic = f"derms/v1/s8-edge/acks/{command_id}"
                await site.publish(topic, ack.model_dump_json().encode(), qos=1)
            await site.publish("derms/v1/s8-edge/acks/x", b"{not an ack", qos=1)
            await eventually(lambda: bool(refused), 5, "the refusal")
    finally:
        await device.close()
    ((command, exc),) = refused
    assert command == asked
    assert isinstance(exc, DeviceRejected)
    assert "unknown_group" in str(exc)


def test_a_hold_shorter_than_two_refreshes_is_refused_in_the_config() -> None:
    device = {
        "device_id": "site-9",
        "der_class": "battery",
        "adapter": "edge_site",
        "location": {"substation": "north"},
        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
        "edge_site": {"site_id": "s9", "gateway_id": "s9-edge", "site_group": "substation:s9"},
    }
    base = {"gateway_id": "head", "settlement": {"timezone": "UTC"}, "timing": {"refresh_s": 60}}
    parse_config(base | {"devices": [device]})  # 300 s against 60 s: fine
    short = device | {"edge_site": {**device["edge_site"], "hold_s": 100}}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"edge_site\.hold_s must exceed twice"):
        parse_config(base | {"devices": [short]})
    with pytest.raises(ConfigError, match=r"needs a \[devices\.edge_site\] endpoint"):
        parse_config(base | {"devices": [{k: v for k, v in device.items() if k != "edge_site"}]})
