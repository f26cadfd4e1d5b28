"""An edge site as one device of the head end, over the head end's MQTT broker.

The edge agent publishes its site loop's samples through its durable outbox to
``derms/v1/edge/{site_id}/outbox/site`` (each record once, numbered per stream) and takes
unified commands on its own Grid DERMS link, ``derms/v1/{gateway_id}/commands``. This adapter
is the head end's side of both:

* :meth:`EdgeSiteDevice.read` is the newest sample: the site's net power **at its meter** (load
  convention), its storage's aggregate SoC, energy and rates as the site reported them. A sample
  older than ``stale_after_s`` (the site or its uplink is gone) makes the device unavailable;
  the backfill after an outage is taken in order (:class:`~protocols.mqtt.outbox.InOrderReceiver`)
  but only the newest sample is the device's state.
* :meth:`EdgeSiteDevice.apply` sends a setpoint as a ``dispatch`` (``target``) on the site's
  group, limits as an ``envelope`` on it, each lasting ``hold_s`` and renewed by the head end's
  supervisor, so a head end that goes away leaves the site to its own defaults once they end;
  a release cancels what stands. The site's acks come back on its ack topics: one that
  rejects or fails a command we sent is a refusal (``on_refusal``, the core's), so the head end
  re-allocates around the site and its own ack says so. The site, not this adapter, decides
  what its devices do.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
from pydantic import Field, ValidationError

from gateway.devices import AdapterError, DeviceRejected, DeviceUnavailable, UnsafeCommand
from protocols.mqtt.northbound import Topics
from protocols.mqtt.outbox import InOrderReceiver, decode_record, outbox_topic
from unified.config import Section
from unified.model import (
    Ack,
    AckState,
    Cancel,
    CommandBase,
    DeviceCommand,
    DeviceState,
    Dispatch,
    DispatchMode,
    EnvelopeInterval,
    Identifier,
    OperatingEnvelope,
    Target,
)

__all__ = ["EdgeSiteDevice", "EdgeSiteEndpoint"]

log = logging.getLogger(__name__)

PROGRAM = "head-end"
"""The program the head end's commands carry at the site (a newer one supersedes the older)."""


class EdgeSiteEndpoint(Section):
    """``[devices.edge_site]``: where the head end finds the site on its broker."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    site_id: Identifier = Field(description="The site's [uplink_mqtt] site_id (outbox topics)")
    gateway_id: Identifier = Field(description="The edge agent's gateway_id (its command topic)")
    site_group: Identifier = Field(description="The site's group at the edge, e.g. substation:x")
    hold_s: float = Field(
        default=300.0,
        ge=5,
        le=86_400,
        description="Each command's duration, renewed at half time while it holds; how long the "
        "site keeps a head end's command after losing it",
    )
    stale_after_s: float = Field(default=10.0, gt=0, le=3600)
    first_sample_s: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="How long a (re)connect waits for the site's next sample before reading",
    )


Refusal = Callable[[DeviceCommand, AdapterError], None]

_KEEP_SENT = 16
"""Commands remembered for their acks (a few hold periods' worth)."""


class EdgeSiteDevice:
    def __init__(
        self, device_id: str, endpoint: EdgeSiteEndpoint, *, on_refusal: Refusal | None = None
    ) -> None:
        self._device_id = device_id
        self._endpoint = endpoint
        self._topics = Topics(endpoint.gateway_id)
        self._client: aiomqtt.Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._listener: asyncio.Task[None] | None = None
        self.receiver = InOrderReceiver()
        """Each site record once and in order (the backfill after an outage included)."""
        self._latest: dict[str, Any] | None = None
        self._latest_at: datetime | None = None
        self._standing: list[str] = []
        self._numbers = itertools.count(1)
        self.malformed = 0
        self._sampled = asyncio.Event()
        self._on_refusal = on_refusal
        self._asked: dict[str, DeviceCommand] = {}
        """Command id sent to the site → what the head end asked (for the site's acks)."""
        self._sent: tuple[tuple[float | None, ...], datetime] | None = None
        """What was last sent and when (the supervisor's refreshes renew it at half time)."""

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def stale_after_s(self) -> float:
        return self._endpoint.stale_after_s

    async def connect(self) -> None:
        await self.close()
        stack = contextlib.AsyncExitStack()
        client = aiomqtt.Client(
            self._endpoint.host,
            self._endpoint.port,
            identifier=f"head-end-edge-{self._endpoint.site_id}-{id(self):x}",
        )
        try:
            await stack.enter_async_context(client)
            await client.subscribe(outbox_topic(self._endpoint.site_id, "site"), qos=1)
            await client.subscribe(self._topics.ack("+"), qos=1)
        except aiomqtt.MqttError as exc:
            await stack.aclose()
            raise DeviceUnavailable(self._device_id, f"broker: {exc}") from exc
        self._stack, self._client = stack, client
        self._sampled.clear()
        self._listener = asyncio.create_task(self._listen(client), name=f"edge-{self._device_id}")
        # The site publishes every loop period: the first read after a (re)subscription should
        # find a sample rather than fail and tear the subscription down again.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._endpoint.first_sample_s):
                await self._sampled.wait()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await listener
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await stack.aclose()

    async def _listen(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                if not isinstance(message.payload, bytes):
                    continue
                if message.topic.matches(self._topics.ack("+")):
                    self._take_ack(message.payload)
                else:
                    self._take(message.payload)

    def _take_ack(self, data: bytes) -> None:
        """The site's ack of a command we sent: a rejection or failure is a refusal, handed to
        the core (it re-allocates around the site, and the command's ack says so)."""
        try:
            ack = Ack.model_validate_json(data)
        except ValidationError:
            self.malformed += 1
            return
        asked = self._asked.get(ack.command_id)
        if asked is None or ack.state not in (AckState.REJECTED, AckState.FAILED):
            return
        del self._asked[ack.command_id]
        why = " ".join(str(p) for p in (ack.reason, ack.detail) if p) or ack.state.value
        log.warning("%s: the site %s %s: %s", self._device_id, ack.state, ack.command_id, why)
        if self._on_refusal is not None:
            self._on_refusal(
                asked, DeviceRejected(self._device_id, f"site {ack.state}: {why}")
            )

    def _take(self, data: bytes) -> None:
        try:
            record, floor = decode_record(data)
            sample = json.loads(record.payload)
            at = datetime.fromisoformat(str(sample["at"]))
        except (ValueError, KeyError, TypeError) as exc:
            self.malformed += 1
            if self.malformed == 1:
                log.warning("%s: malformed site record ignored: %s", self._device_id, exc)
            return
        self.receiver.receive(record, floor)
        if not isinstance(sample, dict) or at.tzinfo is None:
            self.malformed += 1
            return
        if self._latest_at is None or at > self._latest_at:
            self._latest, self._latest_at = sample, at
            self._sampled.set()

    async def read(self) -> DeviceState:
        if self._listener is None or self._listener.done():
            raise DeviceUnavailable(self._device_id, "not subscribed to the site's outbox")
        sample, at = self._latest, self._latest_at
        if sample is None or at is None:
            raise DeviceUnavailable(self._device_id, "no site sample yet")
        age = (datetime.now(UTC) - at).total_seconds()
        if age > self._endpoint.stale_after_s:
            raise DeviceUnavailable(self._device_id, f"last site sample {age:.0f} s ago")
        net = sample.get("net_kw")
        if not isinstance(net, int | float) or not math.isfinite(net):
            raise DeviceUnavailable(self._device_id, "the site cannot read its meter")
        try:
            return DeviceState(
                device_id=self._device_id,
                timestamp=at,
                power_kw=float(net),
                soc_pct=sample.get("soc_pct"),
                capacity_kwh=sample.get("capacity_kwh"),
                max_charge_kw=sample.get("max_charge_kw"),
                max_discharge_kw=sample.get("max_discharge_kw"),
                source=f"edge-site:{self._endpoint.site_id}",
            )
        except ValidationError as exc:
            raise DeviceUnavailable(self._device_id, f"site sample out of range: {exc}") from exc

    async def apply(self, command: DeviceCommand) -> None:
        if command.device_id != self._device_id:
            raise UnsafeCommand(self._device_id, f"command is for {command.device_id}")
        client = self._client
        if client is None:
            raise DeviceUnavailable(self._device_id, "not connected")
        now = datetime.now(UTC)
        hold = self._endpoint.hold_s
        asked = (command.power_kw, command.import_limit_kw, command.export_limit_kw)
        if (
            self._sent is not None
            and self._sent[0] == asked
            and (now - self._sent[1]).total_seconds() < hold / 2
        ):
            return  # what stands at the site still has more than half its time to run
        target = Target(group_id=self._endpoint.site_group)
        number = next(self._numbers)
        stem = f"{self._device_id}-{int(now.timestamp())}-{number}"
        commands: list[CommandBase] = []
        if command.power_kw is not None:
            commands.append(
                Dispatch(
                    command_id=f"{stem}-target",
                    program=PROGRAM,
                    target=target,
                    mode=DispatchMode.TARGET,
                    kw=command.power_kw,
                    start=now,
                    duration_s=hold,
                )
            )
        if command.import_limit_kw is not None or command.export_limit_kw is not None:
            commands.append(
                OperatingEnvelope(
                    command_id=f"{stem}-limits",
                    program=f"{PROGRAM}-limits",
                    target=target,
                    intervals=(
                        EnvelopeInterval(
                            start=now,
                            end=now + timedelta(seconds=hold),
                            import_limit_kw=command.import_limit_kw,
                            export_limit_kw=command.export_limit_kw,
                        ),
                    ),
                )
            )
        kinds = self._kinds(commands)
        for previous in self._standing:
            if previous.rsplit("-", 1)[1] not in kinds:
                kind = previous.rsplit("-", 1)[1]
                commands.append(Cancel(command_id=f"{stem}-end-{kind}", cancels=previous))
        try:
            for one in commands:
                await client.publish(
                    self._topics.commands, one.model_dump_json().encode(), qos=1, timeout=5
                )
        except aiomqtt.MqttError as exc:
            raise DeviceUnavailable(self._device_id, f"broker: {exc}") from exc
        self._standing = [c.command_id for c in commands if not isinstance(c, Cancel)]
        for command_id in self._standing:
            self._asked[command_id] = command
        while len(self._asked) > _KEEP_SENT:
            del self._asked[next(iter(self._asked))]
        self._sent = (asked, now)

    @staticmethod
    def _kinds(commands: list[CommandBase]) -> set[str]:
        """Which kinds of standing command the new ones supersede by themselves (same
        program): the rest must be cancelled."""
        return {c.command_id.rsplit("-", 1)[1] for c in commands if not isinstance(c, Cancel)}
