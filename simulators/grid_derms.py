"""A Grid DERMS client: sends unified commands over MQTT and collects what comes back.

Used by the demo's script, by the end-to-end tests and by the benchmark, so all three exercise
the real northbound interface exactly as a utility's control system would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.aio import raise_if_cancelling
from gateway.flex import PerformanceReport
from protocols.mqtt import Topics
from unified.model import (
    Ack,
    AckState,
    EnvelopeReport,
    ErrorMessage,
    GatewayStatus,
    GroupTelemetry,
)
from unified.registry import PendingEnrolment, RegistryAck, RegistryChange, RegistrySnapshot


@dataclass
class Observed:
    acks: dict[str, list[Ack]] = field(default_factory=lambda: defaultdict(list))
    errors: list[ErrorMessage] = field(default_factory=list)
    groups: dict[str, GroupTelemetry] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    flex: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: GatewayStatus | None = None
    replies: list[tuple[str, bytes | None, Ack]] = field(default_factory=list)
    performance: dict[str, PerformanceReport] = field(default_factory=dict)
    envelopes: dict[str, EnvelopeReport] = field(default_factory=dict)
    """Envelope compliance reports (same topic as the dispatches' performance reports)."""
    registry_acks: dict[str, list[RegistryAck]] = field(default_factory=lambda: defaultdict(list))
    registry_changes: list[RegistryChange] = field(default_factory=list)
    registry: RegistrySnapshot | None = None
    pending: dict[str, PendingEnrolment] = field(default_factory=dict)


class GridDermsClient:
    def __init__(
        self,
        host: str,
        port: int,
        gateway_id: str,
        *,
        protocol: Literal["5", "3.1.1"] = "5",
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_ack: Callable[[Ack], None] | None = None,
        on_group: Callable[[GroupTelemetry], None] | None = None,
        on_error: Callable[[ErrorMessage], None] | None = None,
    ) -> None:
        self.topics = Topics(gateway_id)
        self._host, self._port, self._protocol = host, port, protocol
        self._username, self._password, self._tls = username, password, tls_context
        self.observed = Observed()
        self._on_ack, self._on_group, self._on_error = on_ack, on_group, on_error
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.reply_topic = f"derms/v1/replies/grid-derms-{uuid.uuid4().hex[:8]}"
        self._ids = itertools.count(1)

    async def __aenter__(self) -> GridDermsClient:
        version = (
            aiomqtt.ProtocolVersion.V5 if self._protocol == "5" else aiomqtt.ProtocolVersion.V311
        )
        self._client = aiomqtt.Client(
            self._host,
            self._port,
            protocol=version,
            identifier=f"grid-derms-{uuid.uuid4().hex[:8]}",
            username=self._username,
            password=self._password,
            tls_context=self._tls,
            timeout=10,
        )
        await self._client.__aenter__()
        root = self.topics.root
        for topic in (
            f"{root}/acks/+",
            f"{root}/errors",
            f"{root}/status",
            f"{root}/telemetry/#",
            f"{root}/performance/+",
            f"{root}/registry/#",
            self.reply_topic,
        ):
            await self._client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._receive(), name="grid-derms-receive")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def request_flex(self, request: dict[str, Any]) -> None:
        """Ask for a flexibility forecast; it arrives on ``telemetry/flex/{group_id}``."""
        assert self._client is not None
        await self._client.publish(
            f"{self.topics.root}/requests/flex", json.dumps(request).encode(), qos=1
        )

    async def send_registry(self, request: dict[str, Any] | bytes) -> None:
        """A registry request (enrol, update, retire, topology, get)."""
        assert self._client is not None
        payload = request if isinstance(request, bytes) else json.dumps(request).encode()
        await self._client.publish(self.topics.registry_requests, payload, qos=1)

    async def registry_request(
        self, request: dict[str, Any], timeout_s: float = 10.0
    ) -> RegistryAck:
        """Send a registry request and wait for its (latest) ack."""
        rid = str(request["request_id"])
        seen = len(self.observed.registry_acks.get(rid, []))
        await self.send_registry(request)
        await self.wait_for(lambda o: len(o.registry_acks.get(rid, [])) > seen, timeout_s)
        return self.observed.registry_acks[rid][-1]

    async def send(
        self,
        command: dict[str, Any] | bytes,
        *,
        reply: bool = False,
        correlation: bytes | None = None,
        user_properties: dict[str, str] | None = None,
    ) -> None:
        assert self._client is not None
        payload = command if isinstance(command, bytes) else json.dumps(command).encode()
        props = None
        if (reply or user_properties) and self._protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if reply:
                props.ResponseTopic = self.reply_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if user_properties:
                props.UserProperty = list(user_properties.items())
        await self._client.publish(self.topics.commands, payload, qos=1, properties=props)

    async def _receive(self) -> None:
        assert self._client is not None
        try:
            await self._consume(self._client)
        except aiomqtt.MqttError:
            return  # the broker went away; this test client does not reconnect

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else b""
            try:
                self._dispatch(topic, payload, message.properties)
            except ValueError:
                continue
            async with self._changed:
                self._changed.notify_all()
            raise_if_cancelling()

    def _dispatch(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        root = self.topics.root
        if topic == self.reply_topic:
            correlation = getattr(properties, "CorrelationData", None) if properties else None
            self.observed.replies.append((topic, correlation, Ack.model_validate_json(payload)))
        elif topic.startswith(f"{root}/acks/"):
            ack = Ack.model_validate_json(payload)
            self.observed.acks[ack.command_id].append(ack)
            if self._on_ack:
                self._on_ack(ack)
        elif topic == f"{root}/errors":
            error = ErrorMessage.model_validate_json(payload)
            self.observed.errors.append(error)
            if self._on_error:
                self._on_error(error)
        elif topic.startswith(f"{root}/performance/"):
            if b'"envelope_compliance"' in payload:
                envelope = EnvelopeReport.model_validate_json(payload)
                self.observed.envelopes[envelope.command_id] = envelope
            else:
                report = PerformanceReport.model_validate_json(payload)
                self.observed.performance[report.command_id] = report
        elif topic.startswith(f"{root}/registry/acks/"):
            registry_ack = RegistryAck.model_validate_json(payload)
            self.observed.registry_acks[registry_ack.request_id].append(registry_ack)
        elif topic == f"{root}/registry/changes":
            self.observed.registry_changes.append(RegistryChange.model_validate_json(payload))
        elif topic == f"{root}/registry/pending":
            pending = PendingEnrolment.model_validate_json(payload)
            self.observed.pending[pending.device_id] = pending
        elif topic == f"{root}/registry/snapshot":
            self.observed.registry = RegistrySnapshot.model_validate_json(payload)
        elif topic == f"{root}/status":
            self.observed.status = GatewayStatus.model_validate_json(payload)
        elif topic.startswith(f"{root}/telemetry/groups/"):
            group = GroupTelemetry.model_validate_json(payload)
            self.observed.groups[group.group_id] = group
            if self._on_group:
                self._on_group(group)
        elif topic.startswith(f"{root}/telemetry/flex/"):
            data = json.loads(payload)
            self.observed.flex[data["group_id"]] = data
        elif topic.startswith(f"{root}/telemetry/devices/"):
            data = json.loads(payload)
            self.observed.devices[data["device_id"]] = data

    async def wait_for(
        self, predicate: Callable[[Observed], bool], timeout_s: float = 10.0
    ) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self.observed))

    async def wait_for_state(
        self, command_id: str, state: AckState, timeout_s: float = 10.0
    ) -> Ack:
        def reached(o: Observed) -> bool:
            return any(a.state is state for a in o.acks.get(command_id, []))

        await self.wait_for(reached, timeout_s)
        return next(a for a in self.observed.acks[command_id] if a.state is state)

    def states(self, command_id: str) -> list[AckState]:
        return [a.state for a in self.observed.acks.get(command_id, [])]

    def new_id(self, prefix: str = "cmd") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:6]}-{next(self._ids)}"
