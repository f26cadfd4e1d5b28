"""The outbox's MQTT uplink to the head end: each record published at QoS 1, taken once acked.

Topic ``derms/v1/edge/{site}/outbox/{stream}``; payload JSON ``{"stream", "seq", "floor",
"created", "payload"}`` (``payload`` base64). :meth:`MqttUplink.send` returns only once the broker
has acknowledged the publish (PUBACK), which is when the :class:`~edge_agent.outbox.Forwarder`
forgets the record; while the link is down it raises at once, so the forwarder keeps buffering.
The connection is kept by :meth:`MqttUplink.run` with a jittered backoff; mutual TLS is an
``ssl.SSLContext`` from the composition root (per-site certificate, the broker's CA).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl

import aiomqtt

from protocols.mqtt.outbox import Record, decode_record, encode_record, outbox_topic

__all__ = ["MqttUplink", "UplinkDown", "decode_record"]

log = logging.getLogger(__name__)


class UplinkDown(ConnectionError):
    """The head end's broker is not reachable right now."""


class MqttUplink:
    def __init__(
        self,
        host: str,
        port: int,
        site_id: str,
        *,
        tls_context: ssl.SSLContext | None = None,
        backoff_max_s: float = 30.0,
        publish_timeout_s: float = 10.0,
    ) -> None:
        self._host, self._port = host, port
        self.site_id = site_id
        self._tls = tls_context
        self._backoff_max_s = backoff_max_s
        self._publish_timeout_s = publish_timeout_s
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    def topic(self, stream: str) -> str:
        return outbox_topic(self.site_id, stream)

    async def send(self, record: Record, floor: int) -> None:
        client = self._client
        if client is None or not self.connected.is_set():
            raise UplinkDown("uplink not connected")
        try:
            await client.publish(
                self.topic(record.stream),
                encode_record(record, floor),
                qos=1,
                timeout=self._publish_timeout_s,
            )
        except aiomqtt.MqttError as exc:
            self.connected.clear()
            raise UplinkDown(str(exc)) from exc

    async def run(self) -> None:
        """Keep the connection; reconnect with a jittered backoff after any loss."""
        delay = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    self._host,
                    self._port,
                    identifier=f"edge-{self.site_id}",
                    tls_context=self._tls,
                    keepalive=10,
                ) as client:
                    self._client = client
                    self.connected.set()
                    log.info("uplink connected to %s:%s", self._host, self._port)
                    delay = 0.5
                    # Incoming messages are none of ours; this only notices the link dropping.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                if self.connected.is_set():
                    log.warning("uplink lost: %s", exc)
            finally:
                self.connected.clear()
                self._client = None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(self._backoff_max_s, delay * 2)
