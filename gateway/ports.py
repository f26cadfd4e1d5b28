"""The core's outbound port: what it says northbound, without knowing how it travels.

The Grid DERMS uplink (MQTT topics, QoS, retain, MQTT 5 reply properties) implements it; the
core only knows *what* it publishes and when. ``reply`` is the requester's opaque reply context,
handed in with the command and handed back with every ack for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway.flex import FlexForecast
from unified.model import Ack, DeviceTelemetry, GroupTelemetry

RefusalHook = Callable[[str, str, str], None]
"""What an endpoint peers connect to calls when it refuses one: ``(source, reason, detail)``
(:class:`gateway.audit.RefusalRecorder` puts it in the audit trail)."""


class Publisher(Protocol):
    def ack(self, ack: Ack, reply: object | None) -> None:
        """An ack for a command: must not be lost (queued while the link is down)."""

    def group_telemetry(self, telemetry: GroupTelemetry) -> None:
        """One group's periodic telemetry (may be dropped: a newer period follows)."""

    def device_telemetry(self, telemetry: DeviceTelemetry) -> None:
        """One device's periodic telemetry (may be dropped: a newer period follows)."""

    def flex_forecast(self, forecast: FlexForecast) -> None:
        """A group's periodic flexibility forecast (the latest one is kept for late readers)."""

    def performance_report(self, command_id: str, report: bytes) -> None:
        """A dispatch's performance report, once settled (kept for late readers)."""
