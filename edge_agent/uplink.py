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
import time
from collections.abc import Callable
from typing import Literal

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
        backlog: Callable[[], int] | None = None,
    ) -> None:
        self._host, self._port = host, port
        self.site_id = site_id
        self._tls = tls_context
        self._backoff_max_s = backoff_max_s
        self._publish_timeout_s = publish_timeout_s
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self._backlog = backlog
        self.state: Literal["unknown", "up", "down"] = "unknown"
        """``unknown`` until the first attempt has connected or failed."""
        self.changed_at: float | None = None
        """``time.time()`` of the last change of state (first connection, loss, return)."""
        self.last_error: str | None = None
        self.losses = 0
        """How many times an established link went down."""

    def _buffered(self) -> str:
        if self._backlog is None:
            return ""
        try:
            return f"; {self._backlog()} record(s) in the outbox"
        except Exception:  # a log line must not end the link
            return ""

    def _up(self) -> None:
        now = time.time()
        if self.state == "down" and self.changed_at is not None:
            log.warning(
                "uplink to the head end %s:%s restored after %.1f s down%s",
                self._host,
                self._port,
                now - self.changed_at,
                self._buffered(),
            )
        else:
            log.info("uplink connected to %s:%s", self._host, self._port)
        self.state, self.changed_at = "up", now

    def _down(self, why: str) -> None:
        self.last_error = why
        if self.state == "down":
            return  # said once; retries are quiet
        if self.state == "up":
            self.losses += 1
            log.warning(
                "uplink to the head end %s:%s lost (%s): the site runs on its own, "
                "buffering in the outbox%s",
                self._host,
                self._port,
                why,
                self._buffered(),
            )
        else:
            log.warning(
                "uplink to the head end %s:%s not reachable (%s): the site runs on its own, "
                "buffering in the outbox",
                self._host,
                self._port,
                why,
            )
        self.state, self.changed_at = "down", time.time()

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
            self._down(str(exc))
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
                    self._up()
                    delay = 0.5
                    # Incoming messages are none of ours; this only notices the link dropping.
                    async for _ in client.messages:
                        pass
                # The broker closed the session cleanly: still a loss of the link.
                self.connected.clear()
                self._down("connection closed")
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self._down(str(exc) or type(exc).__name__)
            finally:
                self.connected.clear()
                self._client = None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(self._backoff_max_s, delay * 2)
