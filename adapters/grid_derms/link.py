"""The Grid DERMS link: one MQTT session that takes commands in and puts acks and telemetry out.

The session is persistent (fixed client id, no clean start, session expiry) so QoS 1 commands
sent while the gateway is restarting wait in the broker. The retained ``status`` topic says
``online`` on connect and the broker's will says ``offline`` if the gateway dies. Acks are queued
while the link is down and flushed on reconnect before any telemetry; telemetry published while
the link is down is dropped, since a newer period will follow.

Each connect reads the password and TLS files afresh; while connected, a change to one of them
ends the session cleanly (no will: the status stays ``online``) and the link reconnects at once
with the new files (:mod:`adapters.broker_security`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.broker_security import (
    Credentials,
    CredentialsRotated,
    CredentialsUnavailable,
    raise_session_end,
    watch_rotation,
)
from adapters.grid_derms.config import BrokerConfig
from gateway.aio import raise_if_cancelling, wait_inside_task_group
from protocols.mqtt import Topics, encode
from unified.model import GatewayStatus, utcnow

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 3600
MAX_PENDING_ACKS = 10_000


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """MQTT 5 request/response: where the requester wants its answers, and its correlation."""

    topic: str
    correlation: bytes | None


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    reply: ReplyTo | None = None


UserProperties = tuple[tuple[str, str], ...]
CommandHandler = Callable[[bytes, ReplyTo | None, str, UserProperties], Awaitable[None]]
"""(payload, MQTT 5 reply context, topic, MQTT 5 user properties)."""


class Northbound:
    def __init__(
        self,
        config: BrokerConfig,
        topics: Topics,
        *,
        on_command: CommandHandler,
        status: Callable[[], GatewayStatus],
        backoff_max_s: float = 30.0,
    ) -> None:
        self._config = config
        self.topics = topics
        self._on_command = on_command
        self._status = status
        self._backoff_max_s = backoff_max_s
        self._acks: deque[Outgoing] = deque(maxlen=MAX_PENDING_ACKS)
        self._telemetry: deque[Outgoing] = deque(maxlen=5_000)
        self._pending = asyncio.Event()
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None

    @property
    def mqtt5(self) -> bool:
        return self._config.protocol == "5"

    @property
    def pending_acks(self) -> int:
        """Acks, answers and reports queued for the broker (kept while the link is down)."""
        return len(self._acks)

    @property
    def pending_telemetry(self) -> int:
        """Telemetry queued for the broker (dropped while the link is down)."""
        return len(self._telemetry)

    # ------------------------------------------------------------------ outbound API
    def publish_reliable(self, message: Outgoing) -> None:
        """Queue an ack-like message: kept while the link is down, sent in order."""
        if len(self._acks) == self._acks.maxlen:
            log.error("ack queue full (%d): dropping the oldest", len(self._acks))
        self._acks.append(message)
        self._pending.set()

    def publish_telemetry(self, message: Outgoing) -> None:
        """Queue a telemetry message; dropped if the link is down (a newer one will follow)."""
        if not self.connected.is_set():
            return
        self._telemetry.append(message)
        self._pending.set()

    # ------------------------------------------------------------------ the task
    async def run(self) -> None:
        for warning in self._config.warnings("broker", self._config.host):
            log.warning("%s", warning)
        attempt = 0
        while True:
            raise_if_cancelling()
            try:
                await self._session()
            except CredentialsRotated as rotated:
                log.info(
                    "%s changed: reconnecting to %s:%d with the new files",
                    ", ".join(rotated.settings),
                    self._config.host,
                    self._config.port,
                )
                attempt = 0
            except (aiomqtt.MqttError, CredentialsUnavailable) as exc:
                self.connected.clear()
                attempt += 1
                delay = random.uniform(0.5, 1.0) * min(
                    self._backoff_max_s, 0.5 * 2 ** min(attempt, 10)
                )
                if attempt == 1:
                    log.warning(
                        "MQTT link to %s:%d lost or refused: %s; retrying",
                        self._config.host,
                        self._config.port,
                        exc,
                    )
                await asyncio.sleep(delay)
            else:
                attempt = 0
            if attempt == 0:
                await asyncio.sleep(0.1)

    def _client_kwargs(self, credentials: Credentials) -> dict[str, object]:
        status_offline = GatewayStatus(
            gateway_id=self.topics.gateway_id, state="offline", timestamp=utcnow()
        )
        kwargs: dict[str, object] = {
            "hostname": self._config.host,
            "port": self._config.port,
            **credentials.client_kwargs(),
            "identifier": self._config.client_id or f"derms-gateway-{self.topics.gateway_id}",
            "keepalive": self._config.keepalive_s,
            "timeout": self._config.connect_timeout_s,
            "will": aiomqtt.Will(self.topics.status, encode(status_offline), qos=1, retain=True),
            "max_queued_incoming_messages": 10_000,
        }
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            kwargs |= {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": False,
                "properties": props,
            }
        else:
            kwargs |= {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}
        return kwargs

    async def _session(self) -> None:
        # Read now, not at start-up: a rotated password or certificate is used on reconnect.
        credentials = await asyncio.to_thread(self._config.credentials, "broker")
        client = aiomqtt.Client(**self._client_kwargs(credentials))  # type: ignore[arg-type]
        # PUBACK only once a command is handled (stored, or answered with an error): a gateway
        # that dies in between leaves it unacknowledged in its persistent session, and the
        # broker delivers it again on the next connect. aiomqtt 2 has no API for this; its
        # paho client does.
        client._client.manual_ack_set(True)
        async with client:
            self._client = client
            try:
                await client.publish(self.topics.status, encode(self._status()), qos=1, retain=True)
                await client.subscribe(self.topics.commands, qos=1)
                await client.subscribe(self.topics.flex_requests, qos=1)
                await client.subscribe(self.topics.performance_requests, qos=1)
                await client.subscribe(self.topics.weather, qos=1)
                await client.subscribe(self.topics.prices, qos=1)
                await client.subscribe(self.topics.feeds, qos=1)
                await client.subscribe(self.topics.registry_requests, qos=1)
                # aiomqtt's calls use asyncio.wait_for, which on 3.11 can swallow a cancellation
                # that lands as they complete: surface it before settling into the loops.
                raise_if_cancelling()
                self.connected.set()
                log.info(
                    "MQTT link up: %s:%d (MQTT %s), commands on %s",
                    self._config.host,
                    self._config.port,
                    self._config.protocol,
                    self.topics.commands,
                )
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._receive(client), name="mqtt-receive")
                        tg.create_task(self._send(client), name="mqtt-send")
                        tg.create_task(
                            watch_rotation(credentials.stamps, self._config.rotation_check_s),
                            name="mqtt-rotation",
                        )
                        await wait_inside_task_group()
                except ExceptionGroup as group:
                    raise_session_end(group, aiomqtt.MqttError)
            except asyncio.CancelledError:
                # A clean stop: say so ourselves, since the broker sends the will only when a
                # client vanishes without a DISCONNECT.
                await self._say_offline(client)
                raise
            finally:
                self.connected.clear()
                self._client = None

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            reply = _reply_to(message.properties)
            # Commands are handled one at a time, in arrival order: idempotency and
            # supersession depend on it.
            try:
                await self._on_command(
                    bytes(payload), reply, str(message.topic), _user_properties(message.properties)
                )
            except Exception:
                # A bug, not bad input (that gets an error message): acknowledge anyway, or the
                # broker would deliver the same message after every reconnect.
                log.exception("handling a message on %s failed", message.topic)
            raise_if_cancelling()
            if message.qos > 0:
                client._client.ack(message.mid, message.qos)

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            await self._pending.wait()
            while self._acks or self._telemetry:
                queue = self._acks if self._acks else self._telemetry
                message = queue[0]
                await self._publish(client, message)
                queue.popleft()  # only once the broker has it: a lost link keeps it queued
                raise_if_cancelling()
            self._pending.clear()

    async def _publish(self, client: aiomqtt.Client, message: Outgoing) -> None:
        await client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        if message.reply is not None:
            props = None
            if self.mqtt5 and message.reply.correlation is not None:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = message.reply.correlation
            await client.publish(
                message.reply.topic, message.payload, qos=message.qos, properties=props
            )

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        status = self._status().model_copy(update={"state": "offline", "timestamp": utcnow()})
        try:
            async with asyncio.timeout(2):
                await client.publish(self.topics.status, encode(status), qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.debug("could not publish offline status: %s", exc)


def _user_properties(properties: Properties | None) -> UserProperties:
    """MQTT 5 user properties as sent (what the sender says of itself: for the audit log)."""
    if properties is None:
        return ()
    pairs = getattr(properties, "UserProperty", None) or ()
    return tuple((str(k), str(v)) for k, v in pairs)


def _reply_to(properties: Properties | None) -> ReplyTo | None:
    if properties is None:
        return None
    topic = getattr(properties, "ResponseTopic", None)
    if not topic:
        return None
    correlation = getattr(properties, "CorrelationData", None)
    return ReplyTo(topic=str(topic), correlation=bytes(correlation) if correlation else None)
