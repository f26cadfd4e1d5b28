"""The Grid DERMS uplink: MQTT topics in, the core's API called; the core's port, MQTT topics out.

Inbound, it routes by topic (commands, flex and performance requests, weather), decodes, calls
the core, and answers every message: a command that does not decode gets a ``rejected`` ack when
its ``command_id`` could be read and an ``errors`` message otherwise; a request the core refuses
(:class:`gateway.errors.CoreError`) gets an ``errors`` message naming the reason. Outbound it is
the core's :class:`gateway.ports.Publisher`: acks, on-request answers and reports are queued
reliably (kept while the link is down), periodic telemetry is dropped while the link is down
(a newer period follows), forecasts and reports are retained for late subscribers.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pydantic import ValidationError

from adapters.grid_derms.config import BrokerConfig
from adapters.grid_derms.link import Northbound, Outgoing, ReplyTo
from gateway.errors import CoreError
from gateway.flex import FlexForecast, FlexRequest, PerformanceRequest
from gateway.quota import TokenBucket
from protocols.mqtt import CommandDecodeError, Topics, decode_command, encode
from protocols.mqtt.northbound import WeatherDecodeError, decode_weather, response_topic_problem
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

if TYPE_CHECKING:
    from gateway.core import Gateway

log = logging.getLogger(__name__)

__all__ = ["GridDermsUplink"]


class GridDermsUplink:
    """The core's link to Grid DERMS. Build it, hand it to the core as its publisher, then
    :meth:`bind` it to that core before :meth:`run`."""

    def __init__(self, config: BrokerConfig, gateway_id: str, *, backoff_max_s: float) -> None:
        self.topics = Topics(gateway_id)
        self._response_prefix = config.response_topic_prefix
        self._bucket = TokenBucket(config.commands_per_s, config.commands_burst)
        self._core: Gateway | None = None
        self.link = Northbound(
            config,
            self.topics,
            on_command=self.handle,
            status=self._status,
            backoff_max_s=backoff_max_s,
        )

    def bind(self, core: Gateway) -> None:
        self._core = core

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
    async def handle(self, payload: bytes, reply: ReplyTo | None, topic: str) -> None:
        """One inbound message, answered whatever it holds."""
        if reply is not None:
            problem = response_topic_problem(reply.topic, self._response_prefix, self.topics.root)
            if problem is not None:
                log.warning("%s (on %s)", problem, topic)
                self._error(Reason.RESPONSE_TOPIC_REFUSED, problem, topic, payload)
                reply = None  # answered on the usual topics only
        if topic == self.topics.flex_requests:
            self._flex_request(payload, reply, topic)
        elif topic == self.topics.performance_requests:
            await self._performance_request(payload, reply, topic)
        elif topic == self.topics.weather:
            await self._weather(payload, topic)
        else:
            await self._command(payload, reply, topic)

    async def _command(self, payload: bytes, reply: ReplyTo | None, topic: str) -> None:
        try:
            command = decode_command(payload)
        except CommandDecodeError as exc:
            log.warning("bad command on %s: %s", topic, exc)
            if exc.command_id is not None:
                ack = Ack(
                    command_id=exc.command_id,
                    state=AckState.REJECTED,
                    timestamp=utcnow(),
                    reason=exc.reason,
                    detail=exc.detail,
                )
                self.ack(ack, reply)
            else:
                self._error(exc.reason, exc.detail, topic, payload)
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
            )
            return
        try:
            await self.core.submit(command, reply)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload, command.command_id)
        except Exception as exc:  # e.g. the store's disk is full: say so, keep the link up
            log.exception("could not handle command %s", command.command_id)
            self._error(
                Reason.INTERNAL, f"{type(exc).__name__}: {exc}", topic, payload, command.command_id
            )

    def _flex_request(self, payload: bytes, reply: ReplyTo | None, topic: str) -> None:
        try:
            request = FlexRequest.model_validate_json(payload)
        except ValidationError as exc:
            self._error(Reason.SCHEMA_VIOLATION, str(exc)[:1000], topic, payload)
            return
        try:
            forecast = self.core.request_flex(request)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload)
            return
        self.link.publish_reliable(
            Outgoing(self.topics.flex_forecast(request.group_id), encode(forecast), reply=reply)
        )

    async def _performance_request(self, payload: bytes, reply: ReplyTo | None, topic: str) -> None:
        try:
            request = PerformanceRequest.model_validate_json(payload)
        except ValidationError as exc:
            self._error(Reason.SCHEMA_VIOLATION, str(exc)[:1000], topic, payload)
            return
        try:
            report = await self.core.performance_report(request.command_id)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload, exc.command_id)
            return
        self.link.publish_reliable(
            Outgoing(self.topics.performance(request.command_id), report, retain=True, reply=reply)
        )

    async def _weather(self, payload: bytes, topic: str) -> None:
        """Validated whole, or rejected on ``errors`` with nothing changed."""
        try:
            forecast = decode_weather(payload)
        except WeatherDecodeError as exc:
            log.warning("bad weather forecast on %s: %s", topic, exc)
            self._error(exc.reason, exc.detail, topic, payload)
            return
        try:
            warning = await self.core.put_weather(forecast)
        except CoreError as exc:
            self._error(exc.reason, exc.detail, topic, payload)
            return
        if warning is not None:
            self._error(Reason.INTERNAL, warning, topic, payload)

    def _error(
        self, reason: Reason, detail: str, topic: str, payload: bytes, command_id: str | None = None
    ) -> None:
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
