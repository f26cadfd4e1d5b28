"""The Grid DERMS uplink: MQTT topics in, the core's API called; the core's port, MQTT topics out.

Inbound, it routes by topic (commands, flex and performance requests, weather), decodes, calls
the core, and answers every message: a command that does not decode gets a ``rejected`` ack when
its ``command_id`` could be read and an ``errors`` message otherwise; a request the core refuses
(:class:`gateway.errors.CoreError`) gets an ``errors`` message naming the reason. Outbound it is
the core's :class:`gateway.ports.Publisher`: acks, on-request answers and reports are queued
reliably (kept while the link is down), periodic telemetry is dropped while the link is down
(a newer period follows), forecasts and reports are retained for late subscribers.

Every command goes to the core with its sender as the link knows it (``mqtt:{topic}``, plus the
MQTT 5 response topic and user properties when present) for the audit log; whatever is refused
here, before the core sees it (undecodable, rate limited, a refused response topic, an invalid
request), is recorded here.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import ValidationError

from adapters.grid_derms.config import BrokerConfig
from adapters.grid_derms.link import Northbound, Outgoing, ReplyTo
from gateway.audit import AuditKind
from gateway.errors import CoreError
from gateway.flex import FlexForecast, FlexRequest, PerformanceRequest
from gateway.quota import TokenBucket
from protocols.mqtt import CommandDecodeError, Topics, decode_command, encode
from protocols.mqtt.northbound import (
    FeedDecodeError,
    PricesDecodeError,
    RegistryDecodeError,
    WeatherDecodeError,
    decode_feed,
    decode_prices,
    decode_registry_request,
    decode_weather,
    response_topic_problem,
)
from unified.model import (
    Ack,
    AckState,
    DeviceTelemetry,
    ErrorMessage,
    GatewayStatus,
    GroupTelemetry,
    Reason,
    utcnow,
)
from unified.registry import PendingEnrolment, RegistryAck, RegistryChange

if TYPE_CHECKING:
    from gateway.core import Gateway

log = logging.getLogger(__name__)

__all__ = ["GridDermsUplink", "UplinkStats", "mqtt_source"]

_MAX_USER_PROPERTIES = 8


def mqtt_source(
    topic: str, reply: ReplyTo | None = None, user_properties: tuple[tuple[str, str], ...] = ()
) -> str:
    """Who sent a message, as far as the link knows: the topic (which only Grid DERMS
    identities may publish to, by the broker's ACL), the MQTT 5 response topic and the user
    properties the sender set (its own claims, not authenticated)."""
    parts = [f"mqtt:{topic}"]
    if reply is not None:
        parts.append(f"response_topic={reply.topic[:256]}")
    parts += [f"{k[:64]}={v[:128]}" for k, v in user_properties[:_MAX_USER_PROPERTIES]]
    return ";".join(parts)


MessageKind = Literal[
    "command", "flex_request", "performance_request", "weather", "prices", "registry", "feed"
]


@dataclass(slots=True)
class UplinkStats:
    """What Grid DERMS sent us, by message kind, and what of it was refused, by kind and reason
    (for the operator's metrics; a few dict increments per message)."""

    received: Counter[str] = field(default_factory=Counter)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    """By (message kind, :class:`unified.model.Reason` value)."""


class GridDermsUplink:
    """The core's link to Grid DERMS. Build it, hand it to the core as its publisher, then
    :meth:`bind` it to that core before :meth:`run`."""

    def __init__(self, config: BrokerConfig, gateway_id: str, *, backoff_max_s: float) -> None:
        self.topics = Topics(gateway_id)
        self._response_prefix = config.response_topic_prefix
        self._bucket = TokenBucket(config.commands_per_s, config.commands_burst)
        self._core: Gateway | None = None
        self.stats = UplinkStats()
        self.link = Northbound(
            config,
            self.topics,
            on_command=self.handle,
            status=self._status,
            backoff_max_s=backoff_max_s,
        )

    def bind(self, core: Gateway) -> None:
        self._core = core
        core.registry_changes.append(self.registry_change)
        core.pending_listeners.append(self.registry_pending)
        core.registry_acks.append(lambda ack: self._registry_ack(ack, None))

    @property
    def core(self) -> Gateway:
        if self._core is None:
            raise RuntimeError("GridDermsUplink.bind(core) was not called")
        return self._core

    async def run(self) -> None:
        await self.link.run()

    def _status(self) -> GatewayStatus:
        return self.core.status()

    # ------------------------------------------------------------------ inbound
    async def handle(
        self,
        payload: bytes,
        reply: ReplyTo | None,
        topic: str,
        user_properties: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """One inbound message, answered whatever it holds."""
        source = mqtt_source(topic, reply, user_properties)
        if reply is not None:
            problem = response_topic_problem(reply.topic, self._response_prefix, self.topics.root)
            if problem is not None:
                log.warning("%s (on %s)", problem, topic)
                self._error(Reason.RESPONSE_TOPIC_REFUSED, problem, topic, payload, source=source)
                reply = None  # answered on the usual topics only
        kind = self._kind(topic)
        self.stats.received[kind] += 1
        if kind == "flex_request":
            self._flex_request(payload, reply, topic, source)
        elif kind == "performance_request":
            await self._performance_request(payload, reply, topic, source)
        elif kind == "weather":
            await self._weather(payload, topic, source)
        elif kind == "prices":
            await self._prices(payload, topic, source)
        elif kind == "feed":
            await self._feed(payload, topic, source)
        elif kind == "registry":
            await self._registry(payload, reply, topic, source)
        else:
            await self._command(payload, reply, topic, source)

    def _kind(self, topic: str) -> MessageKind:
        if topic == self.topics.flex_requests:
            return "flex_request"
        if topic == self.topics.performance_requests:
            return "performance_request"
        if topic == self.topics.weather:
            return "weather"
        if topic == self.topics.prices:
            return "prices"
        if self.topics.feed_name(topic) is not None:
            return "feed"
        if topic == self.topics.registry_requests:
            return "registry"
        return "command"

    async def _command(
        self, payload: bytes, reply: ReplyTo | None, topic: str, source: str
    ) -> None:
        try:
            command = decode_command(payload)
        except CommandDecodeError as exc:
            log.warning("bad command on %s: %s", topic, exc)
            if exc.command_id is not None:
                self.stats.refused["command", exc.reason.value] += 1
                self._audit_refusal(
                    AuditKind.COMMAND_REFUSED,
                    exc.reason,
                    exc.detail,
                    topic,
                    payload,
                    source,
                    exc.command_id,
                )
                ack = Ack(
                    command_id=exc.command_id,
                    state=AckState.REJECTED,
                    timestamp=utcnow(),
                    reason=exc.reason,
                    detail=exc.detail,
                )
                self.ack(ack, reply)
            else:
                self._error(exc.reason, exc.detail, topic, payload, source=source)
            return
        if not self._bucket.take(time.monotonic()):
            # A flood (a runaway script, a replay) must not queue hours of work ahead of the
            # commands that matter: refused at once, each with an answer.
            self._error(
                Reason.RATE_LIMITED,
                f"more than {self._bucket.rate_per_s:g} commands/s (burst "
                f"{self._bucket.burst}): not taken, send it again later",
                topic,
                payload,
                command.command_id,
                source=source,
                kind=AuditKind.COMMAND_REFUSED,
            )
            return
        try:
            ack = await self.core.submit(command, reply, source=source)
        except CoreError as exc:  # the core has recorded its refusal
            self._error(exc.reason, exc.detail, topic, payload, command.command_id, audit=False)
        except Exception as exc:  # e.g. the store's disk is full: say so, keep the link up
            log.exception("could not handle command %s", command.command_id)
            self._error(
                Reason.INTERNAL,
                f"{type(exc).__name__}: {exc}",
                topic,
                payload,
                command.command_id,
                source=source,
                kind=AuditKind.COMMAND_REFUSED,
            )
        else:
            if ack.state is AckState.REJECTED and ack.reason is not None:
                self.stats.refused["command", ack.reason.value] += 1

    def _flex_request(self, payload: bytes, reply: ReplyTo | None, topic: str, source: str) -> None:
        try:
            request = FlexRequest.model_validate_json(payload)
        except ValidationError as exc:
            self._error(Reason.SCHEMA_VIOLATION, str(exc)[:1000], topic, payload, source=source)
            return
        try:
            forecast = self.core.request_flex(request)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload, source=source)
            return
        self.link.publish_reliable(
            Outgoing(self.topics.flex_forecast(request.group_id), encode(forecast), reply=reply)
        )

    async def _performance_request(
        self, payload: bytes, reply: ReplyTo | None, topic: str, source: str
    ) -> None:
        try:
            request = PerformanceRequest.model_validate_json(payload)
        except ValidationError as exc:
            self._error(Reason.SCHEMA_VIOLATION, str(exc)[:1000], topic, payload, source=source)
            return
        try:
            report = await self.core.performance_report(request.command_id)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload, exc.command_id, source=source)
            return
        self.link.publish_reliable(
            Outgoing(self.topics.performance(request.command_id), report, retain=True, reply=reply)
        )

    async def _weather(self, payload: bytes, topic: str, source: str) -> None:
        """Validated whole, or rejected on ``errors`` with nothing changed."""
        try:
            forecast = decode_weather(payload)
        except WeatherDecodeError as exc:
            log.warning("bad weather forecast on %s: %s", topic, exc)
            self._error(exc.reason, exc.detail, topic, payload, source=source)
            return
        try:
            warning = await self.core.put_weather(forecast)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload, source=source)
            return
        if warning is not None:  # not a refusal
            self._error(Reason.INTERNAL, warning, topic, payload, audit=False, refused=False)

    async def _prices(self, payload: bytes, topic: str, source: str) -> None:
        """Validated whole, or rejected on ``errors`` with nothing changed."""
        try:
            schedule = decode_prices(payload)
        except PricesDecodeError as exc:
            log.warning("bad price schedule on %s: %s", topic, exc)
            self._error(exc.reason, exc.detail, topic, payload, source=source)
            return
        try:
            warning = await self.core.put_prices(schedule)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload, source=source)
            return
        if warning is not None:  # not a refusal
            self._error(Reason.INTERNAL, warning, topic, payload, audit=False, refused=False)

    async def _feed(self, payload: bytes, topic: str, source: str) -> None:
        """A feed value: validated, or rejected on ``errors`` with nothing changed."""
        try:
            value = decode_feed(payload, self.topics.feed_name(topic) or "")
        except FeedDecodeError as exc:
            log.warning("bad feed value on %s: %s", topic, exc)
            self._error(exc.reason, exc.detail, topic, payload, source=source)
            return
        try:
            warning = await self.core.put_feed(value)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload, source=source)
            return
        if warning is not None:  # not a refusal
            self._error(Reason.INTERNAL, warning, topic, payload, audit=False, refused=False)

    async def _registry(
        self, payload: bytes, reply: ReplyTo | None, topic: str, source: str
    ) -> None:
        """Enrolment and topology: every request answered on its ack topic (or on ``errors``
        when it names no usable request id)."""
        try:
            request = decode_registry_request(payload)
        except RegistryDecodeError as exc:
            log.warning("bad registry request on %s: %s", topic, exc)
            if exc.request_id is None:
                self._error(exc.reason, exc.detail, topic, payload, source=source)
                return
            self.stats.refused["registry", exc.reason.value] += 1
            self._audit_refusal(
                AuditKind.INPUT_REFUSED, exc.reason, exc.detail, topic, payload, source, None
            )
            refused = RegistryAck(
                request_id=exc.request_id,
                state="rejected",
                version=self.core.enrolment.version,
                timestamp=utcnow(),
                reason=exc.reason,
                detail=exc.detail[:2000],
            )
            self._registry_ack(refused, reply)
            return
        if not self._bucket.take(time.monotonic()):
            # The same budget as commands: a runaway script must not starve them.
            self._error(
                Reason.RATE_LIMITED,
                f"more than {self._bucket.rate_per_s:g} commands and registry requests/s: "
                "not taken, send it again later",
                topic,
                payload,
                source=source,
            )
            return
        try:
            ack, snapshot = await self.core.registry_request(request, source=source)
        except Exception as exc:  # e.g. the store's disk is full: say so, keep the link up
            log.exception("could not handle registry request %s", request.request_id)
            self._error(
                Reason.INTERNAL, f"{type(exc).__name__}: {exc}", topic, payload, source=source
            )
            return
        if ack.reason is not None:
            self.stats.refused["registry", ack.reason.value] += 1
        if snapshot is not None:
            self.link.publish_reliable(
                Outgoing(self.topics.registry_snapshot, encode(snapshot), retain=True)
            )
        self._registry_ack(ack, reply)

    def _registry_ack(self, ack: RegistryAck, reply: ReplyTo | None) -> None:
        self.link.publish_reliable(
            Outgoing(self.topics.registry_ack(ack.request_id), encode(ack), reply=reply)
        )

    def registry_change(self, change: RegistryChange) -> None:
        """Enrolment changes for Grid DERMS, in version order (kept while the link is down)."""
        self.link.publish_reliable(Outgoing(self.topics.registry_changes, encode(change)))

    def registry_pending(self, pending: PendingEnrolment) -> None:
        self.link.publish_reliable(Outgoing(self.topics.registry_pending, encode(pending)))

    def _audit_refusal(
        self,
        kind: AuditKind,
        reason: Reason,
        detail: str,
        topic: str,
        payload: bytes,
        source: str,
        command_id: str | None,
    ) -> None:
        self.core.audit.record(
            kind,
            source=source,
            command_id=command_id,
            details={
                "reason": reason,
                "detail": detail[:2000],
                "topic": topic,
                "payload_excerpt": payload[:256].decode("utf-8", errors="replace"),
            },
        )

    def _error(
        self,
        reason: Reason,
        detail: str,
        topic: str,
        payload: bytes,
        command_id: str | None = None,
        *,
        source: str | None = None,
        kind: AuditKind = AuditKind.INPUT_REFUSED,
        audit: bool = True,
        refused: bool = True,
    ) -> None:
        """An answer on ``errors``, and (unless the core has) a record of the refusal."""
        if refused:
            self.stats.refused[self._kind(topic), reason.value] += 1
        if audit:
            self._audit_refusal(
                kind, reason, detail, topic, payload, source or mqtt_source(topic), command_id
            )
        error = ErrorMessage(
            timestamp=utcnow(),
            reason=reason,
            detail=detail[:2000],
            topic=topic,
            payload_excerpt=payload[:256].decode("utf-8", errors="replace"),
            command_id=command_id,
        )
        self.link.publish_reliable(Outgoing(self.topics.errors, encode(error)))

    # ------------------------------------------------------------------ the core's port
    def ack(self, ack: Ack, reply: object | None) -> None:
        self.link.publish_reliable(
            Outgoing(
                self.topics.ack(ack.command_id),
                encode(ack),
                reply=reply if isinstance(reply, ReplyTo) else None,
            )
        )

    def group_telemetry(self, telemetry: GroupTelemetry) -> None:
        self.link.publish_telemetry(
            Outgoing(self.topics.group_telemetry(telemetry.group_id), encode(telemetry), qos=0)
        )

    def device_telemetry(self, telemetry: DeviceTelemetry) -> None:
        self.link.publish_telemetry(
            Outgoing(self.topics.device_telemetry(telemetry.device_id), encode(telemetry), qos=0)
        )

    def flex_forecast(self, forecast: FlexForecast) -> None:
        self.link.publish_telemetry(
            Outgoing(
                self.topics.flex_forecast(forecast.group_id), encode(forecast), qos=1, retain=True
            )
        )

    def performance_report(self, command_id: str, report: bytes) -> None:
        self.link.publish_reliable(
            Outgoing(self.topics.performance(command_id), report, qos=1, retain=True)
        )
