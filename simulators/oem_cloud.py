"""An OEM cloud: a fleet of simulated thermostats and batteries behind one OpenADR 2.0b VEN.

The VEN is openleadr's ``OpenADRClient`` (what many OEMs actually run), driven by our own asyncio
loop instead of its APScheduler poll job, so a test can poll every 0.1 s and the loop stops
cleanly when cancelled. openleadr still renders and parses every message, answers events
(``on_event``: optIn / optOut) and runs the report jobs the VTN asks for.

Resources: one per device (not aggregated), so the gateway can allocate to each and an opt-out
concerns one customer. Each resource id carries the device's class, rating, capacity and grid
location in the grammar of :func:`protocols.openadr.vtn_events.format_resource_id`, since
OpenADR 2.0b has no field for either. TELEMETRY_USAGE reports real power (kW, + import);
TELEMETRY_STATUS reports one percentage per resource: a battery's state of charge, or a
thermostat's *thermal headroom* (how much of its comfort band is left to absorb a shed), which
the gateway's planner treats like a state of charge.

Physics (Euler steps of at most 30 simulated seconds; ``time_scale`` speeds the clock up):

* thermostat (cooling): ``C dT/dt = (T_out - T_in)/R - on·COP·P_rated``. The compressor switches
  on above ``setpoint + hysteresis`` and off below ``setpoint - hysteresis``. A shed event raises
  the setpoint (by ``event_offset_c`` or, for SIMPLE, one degree per level), so the compressor
  stays off while the house warms (load drops); when the event ends the house is above the
  normal setpoint and every compressor runs at once (the rebound).
* battery: holds the requested power within its rating, stops at its SoC limits.

A device opts out when it cannot follow: a customer override, a thermostat already at the top of
its comfort band, a battery asked beyond its rating or at its SoC limit. Beyond per-event
answers, the cloud can send EiOpt schedules (:meth:`OemCloud.opt_out`, :meth:`OemCloud.opt_in`,
:meth:`OemCloud.opt_out_of_event`, :meth:`OemCloud.cancel_opt`), e.g. a customer away for the
afternoon, and reads the VTN's answer code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from openleadr import OpenADRClient, objects  # type: ignore[import-untyped]

from protocols.openadr import MalformedEvent, OadrEvent, parse_event, quiet_openleadr
from protocols.openadr.vtn_events import format_resource_id
from unified.model import DerClass, TopologyLocation, utcnow

__all__ = [
    "ActiveInstruction",
    "OemCloud",
    "OptAnswer",
    "SimBattery",
    "SimDevice",
    "SimThermostat",
]

log = logging.getLogger(__name__)

_MAX_STEP_S: Final = 30.0
_USAGE_SPECIFIER: Final = "oem-telemetry-usage"
_STATUS_SPECIFIER: Final = "oem-telemetry-status"

Opt = Literal["optIn", "optOut"]


@dataclass(frozen=True, slots=True)
class OptAnswer:
    """The VTN's answer to an EiOpt message (``code`` None: no OpenADR answer at all)."""

    opt_id: str
    code: int | None
    description: str

    @property
    def ok(self) -> bool:
        return self.code == 200


@dataclass(frozen=True, slots=True)
class ActiveInstruction:
    """What one event asks of one device, with its start already randomized."""

    event_id: str
    modification_number: int
    start: datetime
    end: datetime
    signal_name: str
    signal_type: str
    value: float

    def active(self, now: datetime) -> bool:
        return self.start <= now < self.end


@dataclass(slots=True)
class SimThermostat:
    """A house with a cooling thermostat (first-order thermal model)."""

    name: str
    location: TopologyLocation
    rated_kw: float = 3.0
    cop: float = 3.0
    resistance_c_per_kw: float = 2.0
    capacitance_kwh_per_c: float = 2.0
    setpoint_c: float = 22.0
    hysteresis_c: float = 0.5
    comfort_max_c: float = 26.0
    event_offset_c: float = 2.0
    outdoor_c: float = 32.0
    indoor_c: float = 22.0
    on: bool = False
    override: bool = False
    """The customer overrides every event: the cloud opts out."""
    offset_c: float = 0.0

    der_class: DerClass = DerClass.THERMOSTAT

    @property
    def power_kw(self) -> float:
        return self.rated_kw if self.on else 0.0

    @property
    def status_pct(self) -> float:
        """Thermal headroom: share of the band between setpoint and comfort limit still free."""
        band = self.comfort_max_c - self.setpoint_c
        return max(0.0, min(100.0, 100.0 * (self.comfort_max_c - self.indoor_c) / band))

    def resource_id(self) -> str:
        return format_resource_id(self.name, self.der_class, self.rated_kw, location=self.location)

    def feasible(self, signal_name: str, value: float) -> str | None:
        """None if the device can follow, else why not."""
        if self.override:
            return "customer override"
        if _sheds(signal_name, value) and self.indoor_c >= self.comfort_max_c:
            return "no comfort headroom left"
        return None

    def step(self, dt_s: float, instruction: ActiveInstruction | None) -> None:
        self.offset_c = 0.0
        if instruction is not None:
            if instruction.signal_name == "SIMPLE":
                self.offset_c = float(instruction.value)
            elif _sheds(instruction.signal_name, instruction.value):
                self.offset_c = self.event_offset_c
            elif instruction.value > 0 and instruction.signal_type == "delta":
                self.offset_c = -self.event_offset_c  # pre-cool: absorb
        remaining = dt_s
        while remaining > 0:
            dt = min(remaining, _MAX_STEP_S)
            remaining -= dt
            gain_kw = (self.outdoor_c - self.indoor_c) / self.resistance_c_per_kw
            cool_kw = self.rated_kw * self.cop if self.on else 0.0
            self.indoor_c += (gain_kw - cool_kw) * (dt / 3600.0) / self.capacitance_kwh_per_c
            target = self.setpoint_c + self.offset_c
            if self.indoor_c > target + self.hysteresis_c:
                self.on = True
            elif self.indoor_c < target - self.hysteresis_c:
                self.on = False


@dataclass(slots=True)
class SimBattery:
    """A home battery: holds the requested power within its rating and SoC limits."""

    name: str
    location: TopologyLocation
    rated_kw: float = 5.0
    capacity_kwh: float = 13.5
    soc_pct: float = 60.0
    min_soc_pct: float = 10.0
    max_soc_pct: float = 100.0
    override: bool = False
    power_kw: float = 0.0
    der_class: DerClass = DerClass.BATTERY

    @property
    def status_pct(self) -> float:
        return self.soc_pct

    def resource_id(self) -> str:
        return format_resource_id(
            self.name,
            self.der_class,
            self.rated_kw,
            capacity_kwh=self.capacity_kwh,
            location=self.location,
        )

    def _requested(self, signal_name: str, value: float) -> float:
        if signal_name == "SIMPLE":
            return -self.rated_kw * min(3.0, max(0.0, value)) / 3.0
        return value

    def feasible(self, signal_name: str, value: float) -> str | None:
        if self.override:
            return "customer override"
        kw = self._requested(signal_name, value)
        if abs(kw) > self.rated_kw * 1.01:
            return f"{kw:g} kW beyond the {self.rated_kw:g} kW rating"
        if kw < 0 and self.soc_pct <= self.min_soc_pct + 1:
            return "at minimum state of charge"
        if kw > 0 and self.soc_pct >= self.max_soc_pct - 1:
            return "at maximum state of charge"
        return None

    def step(self, dt_s: float, instruction: ActiveInstruction | None) -> None:
        wanted = 0.0
        if instruction is not None:
            wanted = self._requested(instruction.signal_name, instruction.value)
        wanted = max(-self.rated_kw, min(self.rated_kw, wanted))
        energy = self.capacity_kwh * self.soc_pct / 100.0 + wanted * dt_s / 3600.0
        low = self.capacity_kwh * self.min_soc_pct / 100.0
        high = self.capacity_kwh * self.max_soc_pct / 100.0
        if energy < low or energy > high:
            # Only what fits before the limit this step; then the battery idles.
            energy = min(max(energy, low), high)
            wanted = 0.0
        self.soc_pct = 100.0 * energy / self.capacity_kwh
        self.power_kw = wanted


SimDevice = SimThermostat | SimBattery


def _sheds(signal_name: str, value: float) -> bool:
    return value > 0 if signal_name == "SIMPLE" else value < 0


@dataclass(slots=True)
class _EventLog:
    event_id: str
    modification_number: int
    status: str
    opt: Opt
    reason: str | None = None


@dataclass(slots=True)
class _Stats:
    polls: int = 0
    distributions: int = 0
    log: list[_EventLog] = field(default_factory=list)
    statuses: dict[str, list[str]] = field(default_factory=dict)
    """Per event id, each eventStatus it was distributed with, in order (without repeats):
    a status change is no modification, so openleadr's handlers never see it."""


class OemCloud:
    """The OEM cloud simulator. ``await run()`` until cancelled."""

    def __init__(
        self,
        ven_name: str,
        vtn_url: str,
        devices: Sequence[SimDevice],
        *,
        poll_interval_s: float | None = None,
        time_scale: float = 1.0,
        tick_s: float = 0.1,
        io_timeout_s: float = 5.0,
        retry_s: float = 1.0,
        cert_path: str | None = None,
        key_path: str | None = None,
        ca_path: str | None = None,
        seed: int | None = None,
        clock: Callable[[], datetime] = utcnow,
        sign_messages: bool = False,
        vtn_fingerprint: str | None = None,
        sampling_rate: tuple[timedelta, timedelta] = (timedelta(seconds=1), timedelta(hours=1)),
        plain_resource_ids: bool = False,
    ) -> None:
        quiet_openleadr()
        self.ven_name = ven_name
        self.devices = {d.name: d for d in devices}
        self._plain = plain_resource_ids
        """Like any standard VEN: a resource id is a name, not ``name;class=...;kw=...``."""
        self._resource_to_device = {self.resource_id_of(d): d.name for d in devices}
        self._poll_interval_s = poll_interval_s
        self._time_scale = time_scale
        self._tick_s = tick_s
        self._io_timeout_s = io_timeout_s
        self._retry_s = retry_s
        self._rng = random.Random(seed)
        self._clock = clock
        self._sampling_rate = sampling_rate
        self.client = OpenADRClient(
            ven_name=ven_name,
            vtn_url=vtn_url,
            cert=cert_path,
            key=key_path,
            ca_file=ca_path,
            show_fingerprint=False,
            disable_signature=not sign_messages,
            check_hostname=False,
            vtn_fingerprint=vtn_fingerprint,
        )
        quiet_openleadr()  # the client module resets its logger on import and construction
        # Its report jobs run on APScheduler, which logs every run at INFO.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self.client.add_handler("on_event", self._on_event)
        self.client.add_handler("on_update_event", self._on_event)
        self.instructions: dict[str, ActiveInstruction] = {}
        """Per device name: the event it follows."""
        self._startafter: dict[str, float] = {}
        self.stats = _Stats()
        self.registered = asyncio.Event()
        self.refused: str | None = None
        self._add_reports()

    def resource_id_of(self, device: SimDevice) -> str:
        return device.name if self._plain else device.resource_id()

    # ------------------------------------------------------------------ reports
    def _add_reports(self) -> None:
        # Offered as oadrSamplingRate; openleadr refuses a request outside it.
        low, high = self._sampling_rate
        sampling = objects.SamplingRate(min_period=low, max_period=high, on_change=False)
        for device in self.devices.values():
            resource_id = self.resource_id_of(device)
            # A fresh Measurement: openleadr's enums.MEASUREMENTS objects are shared and
            # add_report mutates their scale.
            power = objects.Measurement(
                name="powerReal",
                description="RealPower",
                unit="W",
                scale="k",
                power_attributes=objects.PowerAttributes(hertz=50, voltage=230, ac=True),
            )
            self.client.add_report(
                callback=_reader(device, "usage"),
                resource_id=resource_id,
                measurement=power,
                scale="k",
                r_id=f"usage:{device.name}",
                report_specifier_id=_USAGE_SPECIFIER,
                report_duration=timedelta(hours=1),
                sampling_rate=sampling,
            )
            self.client.add_report(
                callback=_reader(device, "status"),
                resource_id=resource_id,
                report_name="TELEMETRY_STATUS",
                reading_type="x-notApplicable",
                report_type="x-resourceStatus",
                r_id=f"status:{device.name}",
                report_specifier_id=_STATUS_SPECIFIER,
                report_duration=timedelta(hours=1),
                sampling_rate=sampling,
            )

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        client = self.client
        client.loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._physics(), name=f"oem:{self.ven_name}:physics")
                await self._register()
                client.scheduler.start()
                tg.create_task(client._report_queue_worker(), name=f"oem:{self.ven_name}:reports")
                tg.create_task(self._poll_loop(), name=f"oem:{self.ven_name}:poll")
        finally:
            with contextlib.suppress(Exception):
                if client.scheduler.running:
                    client.scheduler.shutdown(wait=False)
            if client.client_session is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await client.client_session.close()

    async def _io(self, coro: Any) -> Any:
        async with asyncio.timeout(self._io_timeout_s):
            return await coro

    async def _register(self) -> None:
        """Register (retrying while refused or unreachable), offer reports, fetch events."""
        client = self.client
        announced = False
        while True:
            try:
                await self._io(client.query_registration())
                await self._io(client.create_party_registration(ven_id=client.ven_id))
            except (TimeoutError, TypeError) as exc:
                log.debug("OEM cloud %s: registration attempt failed: %s", self.ven_name, exc)
            if client.registration_id:
                break
            self.refused = "registration refused or VTN unreachable"
            if not announced:
                log.warning("OEM cloud %s: %s; retrying", self.ven_name, self.refused)
                announced = True
            await asyncio.sleep(self._retry_s)
        self.refused = None
        await self._io(client.register_reports(client.reports))
        await self._io(client.sync_events())
        self.registered.set()
        log.info("OEM cloud %s registered as %s", self.ven_name, client.ven_id)

    async def _poll_loop(self) -> None:
        client = self.client
        while True:
            more = False
            try:
                result = await self._io(client.poll())
            except (TimeoutError, TypeError):
                result = None
            self.stats.polls += 1
            if isinstance(result, tuple) and result[0]:
                message_type, payload = result
                more = message_type != "oadrResponse"
                await self._handle(message_type, payload)
            interval = self._poll_interval_s
            if interval is None:
                freq = client.poll_frequency
                interval = freq.total_seconds() if isinstance(freq, timedelta) else 10.0
            # 2.0b delivers one message per poll: poll again at once while the VTN has more.
            await asyncio.sleep(0 if more else interval)

    async def _handle(self, message_type: str, payload: dict[str, Any]) -> None:
        client = self.client
        if message_type == "oadrDistributeEvent":
            self.stats.distributions += 1
            for raw in payload.get("events") or ():
                descriptor = raw.get("event_descriptor") or {}
                seen = self.stats.statuses.setdefault(str(descriptor.get("event_id")), [])
                status = str(descriptor.get("event_status"))
                if not seen or seen[-1] != status:
                    seen.append(status)
            if payload.get("events"):
                await self._io(client._on_event(payload))
            else:
                self.instructions.clear()  # an empty distribution cancels everything
        elif message_type == "oadrCreateReport":
            await self._io(client.create_report(payload))
        elif message_type == "oadrCancelReport":
            await self._io(client.cancel_report(payload))
        elif message_type == "oadrRequestReregistration":
            self.registered.clear()
            await self._io(client.send_response(service="EiRegisterParty"))
            client.registration_id = None
            await self._register()

    # ------------------------------------------------------------------ events
    async def _on_event(self, raw: dict[str, Any]) -> Opt:
        """Follow an event (new, modified or cancelled) if every targeted device can."""
        event = parse_event(raw)
        if isinstance(event, MalformedEvent):
            self._record(event.event_id or "?", event.modification_number, "malformed", "optOut")
            return "optOut"
        names = self._targets(event)
        if event.status == "cancelled":
            for name in names:
                held = self.instructions.get(name)
                if held is not None and held.event_id == event.event_id:
                    del self.instructions[name]
            self._record(event.event_id, event.modification_number, event.status, "optIn")
            return "optIn"
        usable = [s for s in event.signals if s.name in ("LOAD_DISPATCH", "SIMPLE")]
        if not names or not usable or not usable[0].intervals:
            self._record(event.event_id, event.modification_number, event.status, "optOut")
            return "optOut"
        signal = usable[0]
        value = signal.intervals[0].value
        for name in names:
            why = self.devices[name].feasible(signal.name, value)
            if why is not None:
                self._record(event.event_id, event.modification_number, event.status, "optOut", why)
                for other in names:  # refuse as a whole: drop what an earlier modification set
                    held = self.instructions.get(other)
                    if held is not None and held.event_id == event.event_id:
                        del self.instructions[other]
                return "optOut"
        # startafter is drawn once per event: a modification keeps the draw.
        delay = self._startafter.setdefault(
            event.event_id, self._rng.uniform(0, event.startafter_s)
        )
        start = event.start + timedelta(seconds=delay)
        instruction = ActiveInstruction(
            event_id=event.event_id,
            modification_number=event.modification_number,
            start=start,
            end=event.end + timedelta(seconds=delay),
            signal_name=signal.name,
            signal_type=signal.type,
            value=value,
        )
        for name in names:
            self.instructions[name] = instruction
        self._record(event.event_id, event.modification_number, event.status, "optIn")
        return "optIn"

    def _targets(self, event: OadrEvent) -> list[str]:
        names = []
        for target in event.targets:
            kind, _, value = target.partition(":")
            if kind == "resource_id" and value in self._resource_to_device:
                names.append(self._resource_to_device[value])
        return names

    def _record(
        self, event_id: str, modification: int, status: str, opt: Opt, reason: str | None = None
    ) -> None:
        self.stats.log.append(_EventLog(event_id, modification, status, opt, reason))
        if opt == "optOut":
            log.info("OEM cloud %s opts out of %s: %s", self.ven_name, event_id, reason or status)

    # ------------------------------------------------------------------ EiOpt
    async def opt_out(
        self,
        device: str | None,
        start: datetime,
        duration: timedelta,
        *,
        reason: str = "overrideStatus",
        opt_id: str | None = None,
        market_context: str | None = None,
    ) -> OptAnswer:
        """Take ``device`` (None: every resource) out of dispatch for one window."""
        return await self.send_opt(
            "optOut",
            device=device,
            windows=[(start, duration)],
            reason=reason,
            opt_id=opt_id,
            market_context=market_context,
        )

    async def opt_in(
        self,
        device: str | None,
        start: datetime,
        duration: timedelta,
        *,
        reason: str = "participating",
        opt_id: str | None = None,
    ) -> OptAnswer:
        """Make ``device`` available again for one window (ends an earlier opt-out early)."""
        return await self.send_opt(
            "optIn", device=device, windows=[(start, duration)], reason=reason, opt_id=opt_id
        )

    async def opt_out_of_event(
        self, event_id: str, modification_number: int, *, reason: str = "overrideStatus"
    ) -> OptAnswer:
        return await self.send_opt("optOut", event=(event_id, modification_number), reason=reason)

    async def send_opt(
        self,
        opt_type: Opt,
        *,
        device: str | None = None,
        resource_id: str | None = None,
        windows: Sequence[tuple[datetime, timedelta]] = (),
        event: tuple[str, int] | None = None,
        reason: str = "x-schedule",
        opt_id: str | None = None,
        market_context: str | None = None,
    ) -> OptAnswer:
        """One ``oadrCreateOpt`` (rendered and, if configured, signed by openleadr).

        openleadr's template renders one ``eiTarget`` per target, and the schema allows one, so
        an opt names one resource (``device``, or a raw ``resource_id``) or none (the whole VEN).
        """
        opt_id = opt_id or f"opt-{self._rng.getrandbits(64):016x}"
        rid = resource_id
        if device is not None:
            rid = self.resource_id_of(self.devices[device])
        payload: dict[str, Any] = {
            "request_id": f"req-{self._rng.getrandbits(64):016x}",
            "ven_id": self.client.ven_id,
            "opt_id": opt_id,
            "opt_type": opt_type,
            "opt_reason": reason,
            "market_context": market_context,
            "created_date_time": self._clock(),
            "targets": [{"resource_id": rid}] if rid is not None else None,
            "vavailability": (
                {"components": [{"dtstart": s, "duration": d} for s, d in windows]}
                if windows
                else None
            ),
            "event_id": event[0] if event else None,
            "modification_number": event[1] if event else None,
        }
        return await self._opt_exchange("oadrCreateOpt", payload, opt_id)

    async def cancel_opt(self, opt_id: str) -> OptAnswer:
        payload = {
            "request_id": f"req-{self._rng.getrandbits(64):016x}",
            "ven_id": self.client.ven_id,
            "opt_id": opt_id,
        }
        return await self._opt_exchange("oadrCancelOpt", payload, opt_id)

    async def _opt_exchange(
        self, message_type: str, payload: dict[str, Any], opt_id: str
    ) -> OptAnswer:
        message = self.client._create_message(message_type, **payload)
        result = await self._io(self.client._perform_request("EiOpt", message))
        answer_type, answer = result if isinstance(result, tuple) else (None, {})
        response = answer.get("response") if isinstance(answer, dict) else None
        if not answer_type or not isinstance(response, dict):
            return OptAnswer(opt_id, None, "no OpenADR answer (HTTP error or unreadable)")
        code = response.get("response_code")
        return OptAnswer(
            str(answer.get("opt_id") or opt_id),
            code if isinstance(code, int) else None,
            str(response.get("response_description") or ""),
        )

    # ------------------------------------------------------------------ physics
    async def _physics(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self._tick_s)
            now_mono = time.monotonic()
            self.step((now_mono - last) * self._time_scale)
            last = now_mono

    def step(self, sim_seconds: float) -> None:
        """Advance every device by ``sim_seconds`` under the events in force now."""
        now = self._clock()
        for name, device in self.devices.items():
            instruction = self.instructions.get(name)
            if instruction is not None and now >= instruction.end:
                del self.instructions[name]
                instruction = None
            device.step(
                sim_seconds, instruction if instruction and instruction.active(now) else None
            )

    def total_power_kw(self, der_class: DerClass | None = None) -> float:
        return sum(
            d.power_kw
            for d in self.devices.values()
            if der_class is None or d.der_class is der_class
        )


def _reader(device: SimDevice, kind: Literal["usage", "status"]) -> Callable[[], float]:
    def read() -> float:
        return round(device.power_kw if kind == "usage" else device.status_pct, 4)

    return read
