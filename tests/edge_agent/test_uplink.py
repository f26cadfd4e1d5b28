"""The outbox over a real MQTT uplink: cut, restored, every record once and in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from edge_agent.outbox import Forwarder, InOrderReceiver, Outbox
from edge_agent.uplink import MqttUplink, decode_record
from simulators.broker import BrokerEndpoint, free_port

pytestmark = pytest.mark.broker


class CuttableLink:
    """A TCP relay in front of the broker whose cable can be pulled and plugged back."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def plug(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def pull(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def link(broker_endpoint: BrokerEndpoint) -> AsyncIterator[CuttableLink]:
    relay = CuttableLink(broker_endpoint.port)
    await relay.plug()
    yield relay
    await relay.pull()


async def test_uplink_cut_then_restored_every_record_once_in_order(
    broker_endpoint: BrokerEndpoint, link: CuttableLink, tmp_path: Path
) -> None:
    rx = InOrderReceiver()
    uplink = MqttUplink("127.0.0.1", link.port, "site-1", backoff_max_s=0.5)
    async with aiomqtt.Client("127.0.0.1", broker_endpoint.port, identifier="head-end") as head:
        await head.subscribe(uplink.topic("+"), qos=1)

        async def listen() -> None:
            async for message in head.messages:
                assert isinstance(message.payload, bytes)
                rx.receive(*decode_record(message.payload))

        with Outbox(tmp_path / "out.sqlite") as box:
            forwarder = Forwarder(box, uplink.send, backfill_per_s=500, idle_s=0.01, retry_s=0.1)
            tasks = [
                asyncio.create_task(uplink.run()),
                asyncio.create_task(forwarder.run()),
                asyncio.create_task(listen()),
            ]
            try:
                await asyncio.wait_for(uplink.connected.wait(), 5)
                for i in range(200):
                    if i == 50:
                        await link.pull()
                    if i == 149:
                        # Cut for a second: nothing got through, everything is buffered.
                        assert not uplink.connected.is_set()
                        assert box.depth >= 90
                    if i == 150:
                        await link.plug()
                    box.append("telemetry", f"{i}".encode())
                    if i % 3 == 0:
                        box.append("events", f"e{i}".encode())
                    await asyncio.sleep(0.01)
                for _ in range(400):
                    if box.depth == 0 and len(rx.delivered) == 200 + 67:
                        break
                    await asyncio.sleep(0.025)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    telemetry = [r for r in rx.delivered if r.stream == "telemetry"]
    events = [r for r in rx.delivered if r.stream == "events"]
    assert [r.payload for r in telemetry] == [f"{i}".encode() for i in range(200)]
    assert [r.payload for r in events] == [f"e{i}".encode() for i in range(0, 200, 3)]
    assert [r.seq for r in telemetry] == list(range(1, 201))
