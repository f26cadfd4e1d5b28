"""A resource behind an OEM cloud, reached as an OpenADR 2.0b VEN of the gateway's VTN.

The OEM cloud (a thermostat, battery or EV-charger vendor) lists its resources in a METADATA
report; the VTN (:mod:`adapters.oem_vtn.vtn`) enrols each one as a device with this adapter, so
the planner allocates to it exactly as to a Modbus battery. ``apply`` becomes an event (new,
modified or cancelled) for that VEN, targeted at the resource; ``read`` returns the latest
TELEMETRY_USAGE / TELEMETRY_STATUS values the VEN reported.

OpenADR is pull-based and asynchronous: ``apply`` returns once the event is persisted and queued
for the VEN's next poll, not when the customer's device acted. An opt-out arrives later and goes
to ``Gateway.report_refusal`` from the VTN, not from here.

While an EiOpt opt-out schedule covers the resource, ``read`` reports no state of charge (so the
planner commits nothing to it, while its power still counts in telemetry) and ``apply`` refuses
a setpoint with :class:`gateway.devices.DeviceRejected`; a release still goes through.

The adapter talks to the VTN only through :class:`ResourceChannel`, so it can be tested without
HTTP and the VTN implementation (2.0b today, 3.x beside it later) can change behind it.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.devices import (
    DeviceRejected,
    DeviceUnavailable,
    DispatchNotice,
    UnsafeCommand,
)
from unified.model import DeviceCommand, DeviceState, utcnow

__all__ = ["RATING_TOLERANCE", "OadrResource", "ResourceChannel", "ResourceTelemetry"]

#: Same tolerance as the SunSpec adapter: rounding in allocation may exceed a rating by 1 %.
RATING_TOLERANCE = 0.01


@dataclass(frozen=True, slots=True)
class ResourceTelemetry:
    """What the VEN last reported for one resource."""

    power_kw: float | None
    power_at: datetime | None
    soc_pct: float | None
    soc_at: datetime | None


class ResourceChannel(Protocol):
    """What the adapter needs from the VTN."""

    def ven_ready(self, device_id: str) -> str | None:
        """None when the resource's VEN is registered and polling; otherwise why not."""

    def telemetry(self, device_id: str) -> ResourceTelemetry | None: ...

    def opted_out(self, device_id: str) -> str | None:
        """None unless an opt-out schedule of the VEN covers the resource now; then why."""

    async def issue(self, command: DeviceCommand) -> None:
        """Create, modify or cancel the resource's event; idempotent for a repeated command."""

    def announce(self, device_id: str, notice: DispatchNotice) -> None:
        """A dispatch ahead (an event issued before its start), or its withdrawal."""


class OadrResource:
    """:class:`gateway.devices.DeviceAdapter` for one resource of an OEM cloud VEN."""

    def __init__(
        self,
        device_id: str,
        channel: ResourceChannel,
        *,
        ven_name: str,
        resource_id: str,
        rated_kw: float,
        capacity_kwh: float,
        stale_after_s: float,
    ) -> None:
        self._device_id = device_id
        self._channel = channel
        self.ven_name = ven_name
        self.resource_id = resource_id
        self.rated_kw = rated_kw
        self.capacity_kwh = capacity_kwh
        self.stale_after_s = stale_after_s
        """Telemetry older than this is stale: at least a few of the report periods the VEN
        accepted, which may be longer than the VTN's own wish (its ``oadrSamplingRate``)."""

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def source(self) -> str:
        return f"openadr:{self.ven_name}/{self.resource_id.split(';', 1)[0]}"

    async def connect(self) -> None:
        """Succeeds once the VEN is registered and reporting this resource.

        Nothing here waits on I/O, so a failure must happen *here*, where the supervisor backs
        off, rather than in the first ``read`` (which it would retry at once, forever).
        """
        await asyncio.sleep(0)  # the supervisor's loop needs a yield point in every call
        self._fresh_telemetry()

    async def close(self) -> None:
        """Nothing to release: the VTN owns the HTTP side."""

    async def read(self) -> DeviceState:
        """The latest reported values; stale telemetry means the VEN stopped reporting."""
        await asyncio.sleep(0)
        seen, power_kw, power_at = self._fresh_telemetry()
        now = utcnow()
        soc = seen.soc_pct
        if seen.soc_at is None or (now - seen.soc_at).total_seconds() > self.stale_after_s:
            soc = None  # without a fresh state of charge the planner commits nothing
        if self._channel.opted_out(self._device_id) is not None:
            soc = None  # opted out: the same, for as long as the window lasts
        return DeviceState(
            device_id=self._device_id,
            timestamp=power_at,
            power_kw=power_kw,
            soc_pct=None if soc is None else min(100.0, max(0.0, soc)),
            capacity_kwh=self.capacity_kwh,
            max_charge_kw=self.rated_kw,
            max_discharge_kw=self.rated_kw,
            setpoint_kw=None,
            source=self.source,
        )

    def _fresh_telemetry(self) -> tuple[ResourceTelemetry, float, datetime]:
        why = self._channel.ven_ready(self._device_id)
        if why is not None:
            raise DeviceUnavailable(self._device_id, why)
        seen = self._channel.telemetry(self._device_id)
        if seen is None or seen.power_kw is None or seen.power_at is None:
            raise DeviceUnavailable(self._device_id, "no TELEMETRY_USAGE report yet")
        age = (utcnow() - seen.power_at).total_seconds()
        if age > self.stale_after_s:
            raise DeviceUnavailable(self._device_id, f"last usage report is {age:.0f} s old")
        return seen, seen.power_kw, seen.power_at

    def notice(self, notice: DispatchNotice) -> None:
        """:class:`gateway.devices.TakesNotice`: the VEN hears of a dispatch when it is accepted."""
        self._channel.announce(self._device_id, notice)

    async def apply(self, command: DeviceCommand) -> None:
        if command.device_id != self._device_id:
            raise UnsafeCommand(self._device_id, f"command is for {command.device_id}")
        if command.power_kw is not None:
            if not math.isfinite(command.power_kw):
                raise UnsafeCommand(self._device_id, f"setpoint {command.power_kw} kW")
            if abs(command.power_kw) > self.rated_kw * (1 + RATING_TOLERANCE):
                raise UnsafeCommand(
                    self._device_id,
                    f"setpoint {command.power_kw} kW beyond the rating of {self.rated_kw} kW",
                )
        else:
            # A release of a resource that has no event must not fail because the VEN is away.
            await self._channel.issue(command)
            return
        why = self._channel.ven_ready(self._device_id)
        if why is not None:
            raise DeviceUnavailable(self._device_id, why)
        opted_out = self._channel.opted_out(self._device_id)
        if opted_out is not None:
            raise DeviceRejected(self._device_id, opted_out)
        await self._channel.issue(command)
