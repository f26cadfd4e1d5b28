"""The site control loop: hold the net power at the meter inside the envelope, every period.

The gateway's planner shares an envelope out as standing limits from device readings; on a site
with a meter at the connection point the edge agent can do better, because it measures what the
envelope is about. Each period (1 s by default) the loop reads the meter, the PV inverters and
the battery, infers the load it does not control (meter − PV − battery), and sets:

* the battery to the dispatch setpoint it is given, moved only as far as the envelope requires
  (the envelope wins), within its ratings and state of charge, changing by at most
  ``battery_ramp_kw_per_s``;
* the PV inverters' generation cap so that, with the battery where it actually is, the export
  limit holds: ``load + battery + export limit``. A cap falls at once (safety) but rises by at
  most ``pv_ramp_kw_per_s``, so a cloud that passes never finds the limit open: the cap does not
  depend on how much the sun gives, only on what the site can take;
* while PV is held at its cap and the battery can charge, the battery charges a ramp step more,
  so the energy that curtailment would waste goes into storage and the cap rises with it.

:class:`SiteController` is the control law, pure (measurements and time step in, actions out);
:class:`SiteLoop` runs it against adapters. The PV cap carries no reversion timer: if this loop
dies the limit must still hold, so the inverters stay capped until told otherwise. A period in which
the loop cannot read the site (the meter is gone) caps the PV at the export limit itself, which
holds whatever the load and the battery do.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from pydantic import Field

from adapters.sunspec.connection import SunSpecEndpoint
from adapters.sunspec.site_meter import SunSpecSiteMeter
from gateway.audit import AuditKind
from gateway.core import Gateway
from gateway.devices import AdapterError, DeviceUnavailable
from unified.config import Section
from unified.model import (
    DerClass,
    DeviceCommand,
    DeviceState,
    Identifier,
    OperatingEnvelope,
    utcnow,
)

__all__ = [
    "Curtailable",
    "LimitsInForce",
    "LoopSample",
    "ReconnectingMeter",
    "SiteController",
    "SiteInputs",
    "SiteLoop",
    "SiteLoopConfig",
    "SiteLoopSettings",
    "SiteOutputs",
    "SupervisedBattery",
    "SupervisedPv",
    "build_site_loop",
    "core_dispatch",
    "core_envelope",
]

log = logging.getLogger(__name__)

SITE_LOOP_SOURCE = "edge-site-loop"
"""Who wrote, in the audit log, when the site loop drives a device."""


class SiteLoopConfig(Section):
    """``[site_loop]``: the metered site control loop."""

    period_s: float = Field(default=1.0, gt=0, le=60)
    margin_kw: float = Field(
        default=0.1, ge=0, description="Aim this far inside each limit (meter and step noise)"
    )
    battery_ramp_kw_per_s: float = Field(default=2.0, gt=0)
    pv_ramp_kw_per_s: float = Field(default=1.0, gt=0, description="How fast a PV cap may rise")
    deadband_kw: float = Field(default=0.05, ge=0, description="Smaller changes are not written")
    fallback_import_kw: float | None = Field(
        default=None,
        ge=0,
        description="Import limit held while no envelope in force sets one (the site's default "
        "control, as a CSIP-AUS DefaultDERControl: also what holds after the head end's last "
        "envelope ends with the uplink down); None: no limit",
    )
    fallback_export_kw: float | None = Field(
        default=None,
        ge=0,
        description="Export limit held while no envelope in force sets one; None: no limit",
    )


@runtime_checkable
class Curtailable(Protocol):
    """A generator whose output can be capped (a PV inverter)."""

    @property
    def device_id(self) -> str: ...

    @property
    def rated_kw(self) -> float | None: ...

    async def read(self) -> DeviceState: ...

    async def curtail(self, limit_kw: float | None, *, revert_s: int | None = None) -> None: ...


class Meter(Protocol):
    async def read(self) -> DeviceState: ...


class Battery(Protocol):
    @property
    def device_id(self) -> str: ...

    async def read(self) -> DeviceState: ...

    async def apply(self, command: DeviceCommand) -> None: ...


@dataclass(frozen=True, slots=True)
class SiteInputs:
    """One period's measurements (kW, load convention: + importing)."""

    net_kw: float
    pv_kw: float
    """All PV together (≤ 0 while generating)."""
    pv_rated_kw: float
    battery_kw: float
    battery_max_charge_kw: float
    battery_max_discharge_kw: float
    import_limit_kw: float | None
    export_limit_kw: float | None
    dispatch_kw: float | None = None
    """What dispatch asks of the battery (None: idle)."""


@dataclass(frozen=True, slots=True)
class SiteOutputs:
    battery_kw: float
    pv_cap_kw: float | None
    """None: no cap."""
    load_kw: float


@dataclass
class SiteController:
    """The control law; keeps the previous outputs for its ramp limits."""

    config: SiteLoopConfig = field(default_factory=SiteLoopConfig)
    battery_kw: float | None = None
    pv_cap_kw: float | None = None
    load_kw: float | None = None

    def step(self, inputs: SiteInputs, dt_s: float) -> SiteOutputs:
        cfg = self.config
        m = cfg.margin_kw
        load = inputs.net_kw - inputs.pv_kw - inputs.battery_kw
        generation = max(0.0, -inputs.pv_kw)
        imp, exp = inputs.import_limit_kw, inputs.export_limit_kw

        # Battery: dispatch, moved as far as the envelope requires, within its ratings.
        low, high = -inputs.battery_max_discharge_kw, inputs.battery_max_charge_kw
        target = inputs.dispatch_kw if inputs.dispatch_kw is not None else 0.0
        previous = self.battery_kw if self.battery_kw is not None else inputs.battery_kw
        step = cfg.battery_ramp_kw_per_s * dt_s
        capped = self.pv_cap_kw is not None and generation >= self.pv_cap_kw - 0.05 * max(
            inputs.pv_rated_kw, 1e-9
        )
        if exp is not None:
            target = max(target, -exp + m - load + generation)  # net >= -exp
            if capped:
                # The PV is held back: charge a step more and let the cap rise with it.
                target = max(target, previous + step)
        if imp is not None:
            target = min(target, imp - m - load + generation)  # net <= imp
        target = min(high, max(low, target))
        battery = previous + min(step, max(-step, target - previous))
        battery = min(high, max(low, battery))

        # PV: a cap that holds the export limit with the battery where it really is.
        cap: float | None = None
        if exp is not None:
            absorbing = min(inputs.battery_kw, battery)
            # The meter and the devices are read a few milliseconds apart: a cloud edge between
            # the reads shows as a load spike for one period. The smaller of the last two load
            # estimates errs on the safe side (a real load rise opens the cap one period later).
            steady_load = load if self.load_kw is None else min(load, self.load_kw)
            cap = max(0.0, steady_load + absorbing + exp - m)
            if self.pv_cap_kw is not None and cap > self.pv_cap_kw:
                cap = min(cap, self.pv_cap_kw + cfg.pv_ramp_kw_per_s * dt_s)
            if cap >= inputs.pv_rated_kw and (
                self.pv_cap_kw is None or self.pv_cap_kw >= inputs.pv_rated_kw
            ):
                cap = None
        elif self.pv_cap_kw is not None:
            # Released: rise at the ramp until the rating, then lift the cap.
            cap = self.pv_cap_kw + cfg.pv_ramp_kw_per_s * dt_s
            if cap >= inputs.pv_rated_kw:
                cap = None
        self.battery_kw, self.pv_cap_kw, self.load_kw = battery, cap, load
        return SiteOutputs(battery_kw=battery, pv_cap_kw=cap, load_kw=load)


@dataclass(frozen=True, slots=True)
class LimitsInForce:
    """The limits the loop holds at one instant, and where each comes from."""

    import_limit_kw: float | None
    export_limit_kw: float | None
    import_source: str | None
    """``"envelope"`` (a command in force), ``"fallback"`` (the configured default), None."""
    export_source: str | None


@dataclass(frozen=True, slots=True)
class LoopSample:
    """What one period saw and did (for tests, the health view and the bench)."""

    at: datetime
    net_kw: float
    outputs: SiteOutputs | None
    duration_s: float
    error: str | None = None
    limits: LimitsInForce | None = None


EnvelopeSource = Callable[[datetime], tuple[float | None, float | None]]
DispatchSource = Callable[[datetime], float | None]


class SiteLoop:
    """Runs :class:`SiteController` every ``period_s`` against a meter, PV and a battery."""

    def __init__(
        self,
        meter: Meter,
        pv: Sequence[Curtailable],
        battery: Battery | None,
        envelope: EnvelopeSource,
        *,
        dispatch: DispatchSource | None = None,
        config: SiteLoopConfig | None = None,
        keep_samples: int = 3600,
        on_sample: Callable[[LoopSample], None] | None = None,
    ) -> None:
        self.config = config or SiteLoopConfig()
        self.controller = SiteController(self.config)
        self._meter, self._pv, self._battery = meter, list(pv), battery
        self.envelope = envelope
        """Where the loop takes its limits from (the health view shows them)."""
        self._dispatch = dispatch or (lambda now: None)
        self.samples: list[LoopSample] = []
        self.on_sample = on_sample
        """Told of every period's sample (the edge agent puts them in its outbox)."""
        self._keep = keep_samples
        self._written_battery: float | None = None
        self._written_caps: dict[str, float | None] = {}
        self._last_step: float | None = None

    async def run(self) -> None:
        period = self.config.period_s
        next_at = time.monotonic()
        while True:
            await self.step_once()
            next_at += period
            delay = next_at - time.monotonic()
            if delay < 0:  # overran: skip the missed periods rather than bunch them
                next_at, delay = time.monotonic(), 0.0
            await asyncio.sleep(delay)

    async def step_once(self) -> LoopSample:
        started = time.monotonic()
        dt = self.config.period_s if self._last_step is None else started - self._last_step
        self._last_step = started
        now = utcnow()
        try:
            sample = await self._step(now, dt, started)
        except AdapterError as exc:
            # Blind this period: nothing says what the load or the battery absorb, so the PV
            # may make no more than the export limit itself (safe whatever else happens), and
            # the battery keeps its last setpoint until its own reversion timer.
            log.warning("site loop: %s", exc)
            error = f"{type(exc).__name__}: {exc}"
            try:
                await self._fail_safe(now)
            except AdapterError as also:
                error += f"; fail-safe cap not written: {also}"
            sample = LoopSample(
                now, math.nan, None, time.monotonic() - started, error, self.limits(now)
            )
        self.samples.append(sample)
        if self.on_sample is not None:
            self.on_sample(sample)
        if len(self.samples) > self._keep:
            del self.samples[: len(self.samples) - self._keep]
        return sample

    async def _step(self, now: datetime, dt: float, started: float) -> LoopSample:
        meter = await self._meter.read()
        pv_states = [await p.read() for p in self._pv]
        battery = await self._battery.read() if self._battery is not None else None
        limits = self.limits(now)
        imp, exp = limits.import_limit_kw, limits.export_limit_kw
        pv_rated = sum(p.rated_kw or 0.0 for p in self._pv)
        inputs = SiteInputs(
            net_kw=meter.power_kw,
            pv_kw=sum(s.power_kw for s in pv_states),
            pv_rated_kw=pv_rated,
            battery_kw=0.0 if battery is None else battery.power_kw,
            battery_max_charge_kw=0.0 if battery is None else battery.max_charge_kw or 0.0,
            battery_max_discharge_kw=0.0 if battery is None else battery.max_discharge_kw or 0.0,
            import_limit_kw=imp,
            export_limit_kw=exp,
            dispatch_kw=self._dispatch(now),
        )
        out = self.controller.step(inputs, dt)
        await self._write_pv(out.pv_cap_kw, pv_rated)
        await self._write_battery(out.battery_kw)
        return LoopSample(now, meter.power_kw, out, time.monotonic() - started, limits=limits)

    async def _fail_safe(self, now: datetime) -> None:
        exp = self.limits(now).export_limit_kw
        if exp is None or not self._pv:
            return
        cap = max(0.0, exp - self.config.margin_kw)
        if self.controller.pv_cap_kw is None or self.controller.pv_cap_kw > cap:
            self.controller.pv_cap_kw = cap
            await self._write_pv(cap, sum(p.rated_kw or 0.0 for p in self._pv))

    async def _write_pv(self, cap_kw: float | None, rated_kw: float) -> None:
        for pv in self._pv:
            share = None
            if cap_kw is not None and rated_kw > 0:
                share = cap_kw * (pv.rated_kw or 0.0) / rated_kw
            before = self._written_caps.get(pv.device_id, math.inf)
            if pv.device_id in self._written_caps and _same(before, share, self.config.deadband_kw):
                continue
            await pv.curtail(share)
            self._written_caps[pv.device_id] = share

    async def _write_battery(self, kw: float) -> None:
        if self._battery is None:
            return
        if self._written_battery is not None and abs(kw - self._written_battery) < (
            self.config.deadband_kw
        ):
            return
        await self._battery.apply(DeviceCommand(device_id=self._battery.device_id, power_kw=kw))
        self._written_battery = kw

    def limits(self, now: datetime) -> LimitsInForce:
        """The envelope in force, each limit it leaves open filled by the configured fallback.

        Per field, as CSIP-AUS fills a control's missing modes from the DefaultDERControl: an
        envelope that only limits import leaves the default export limit in force. Nothing here
        depends on the uplink: an envelope received before a comms loss holds to its end, and
        the default after it, whether or not the head end is reachable."""
        imp, exp = self.envelope(now)
        cfg = self.config
        imp_source = "envelope" if imp is not None else None
        exp_source = "envelope" if exp is not None else None
        if imp is None and cfg.fallback_import_kw is not None:
            imp, imp_source = cfg.fallback_import_kw, "fallback"
        if exp is None and cfg.fallback_export_kw is not None:
            exp, exp_source = cfg.fallback_export_kw, "fallback"
        return LimitsInForce(imp, exp, imp_source, exp_source)

    def latency_percentiles(self) -> dict[str, float]:
        """Loop step duration percentiles (s) over the kept samples."""
        durations = sorted(s.duration_s for s in self.samples)
        if not durations:
            return {}

        def pct(p: float) -> float:
            return durations[min(len(durations) - 1, int(p / 100 * len(durations)))]

        return {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": durations[-1]}


def _same(before: float | None, after: float | None, deadband: float) -> bool:
    if before is None or after is None:
        return before is after
    # A cap that falls is written at once (it protects a limit); one that rises may wait.
    return abs(after - before) < deadband and after >= before - 1e-9


# --------------------------------------------------------------------------- bound to the core


def core_envelope(gateway: Gateway, group_id: str) -> EnvelopeSource:
    """The tightest import and export limits of the envelopes in force on ``group_id``."""

    def limits(now: datetime) -> tuple[float | None, float | None]:
        imp: float | None = None
        exp: float | None = None
        for active in gateway.book.active(now):
            command = active.command
            if not isinstance(command, OperatingEnvelope) or command.target.group_id != group_id:
                continue
            interval = command.interval_at(now)
            if interval is None:
                continue
            imp = _tighter(imp, interval.import_limit_kw)
            exp = _tighter(exp, interval.export_limit_kw)
        return imp, exp

    return limits


def core_dispatch(gateway: Gateway, device_id: str) -> DispatchSource:
    """The battery setpoint the core's plan holds for ``device_id`` (None: none)."""

    def setpoint(now: datetime) -> float | None:
        planned = gateway.planned(device_id)
        return None if planned is None else planned.power_kw

    return setpoint


class _Supervised:
    """A device the core supervises, driven by the site loop through its supervisor: one
    connection and one writer per device, and the core's polls are the loop's readings."""

    def __init__(self, gateway: Gateway, device_id: str) -> None:
        self._gateway = gateway
        self._device_id = device_id
        self._supervisor = gateway.supervisors[device_id]

    @property
    def device_id(self) -> str:
        return self._device_id

    async def read(self) -> DeviceState:
        state = self._supervisor.fresh_state(self._gateway.stale_after_s(self._device_id))
        if state is None:
            raise DeviceUnavailable(self._device_id, "no fresh reading")
        return state

    def _command(self, command: DeviceCommand) -> None:
        """Ask the supervisor to write, and say so in the audit log as the core does."""
        if command == self._supervisor.desired:
            return
        self._supervisor.command(command)
        self._gateway.audit.record(
            AuditKind.DEVICE_WRITE,
            source=SITE_LOOP_SOURCE,
            command_id=None,
            device_id=self._device_id,
            details={"command": command},
        )


class SupervisedBattery(_Supervised):
    async def apply(self, command: DeviceCommand) -> None:
        self._command(command)


class SupervisedPv(_Supervised):
    @property
    def rated_kw(self) -> float | None:
        return self._gateway.registry.device(self._device_id).ratings.max_discharge_kw

    async def curtail(self, limit_kw: float | None, *, revert_s: int | None = None) -> None:
        # A standing export limit: the PV adapter writes it without reversion.
        self._command(
            DeviceCommand(device_id=self._device_id, power_kw=None, export_limit_kw=limit_kw)
        )


def _tighter(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


# --------------------------------------------------------------------------- deployment


class SiteLoopSettings(SiteLoopConfig):
    """``[site_loop]`` of the edge agent: the meter, the devices the loop drives, the group whose
    envelope it holds (default: the upstream site group)."""

    meter: SunSpecEndpoint
    meter_import_positive: bool = Field(
        default=True, description="The meter's 20x W is positive when importing"
    )
    battery: Identifier | None = None
    pv: tuple[Identifier, ...] = ()
    group: Identifier | None = None


class ReconnectingMeter:
    """The meter, reconnected on the next read after any failure (the loop's own supervisor)."""

    def __init__(self, meter: SunSpecSiteMeter) -> None:
        self._meter = meter
        self._connected = False

    async def read(self) -> DeviceState:
        try:
            if not self._connected:
                await self._meter.connect()
                self._connected = True
            return await self._meter.read()
        except AdapterError:
            if self._connected:
                self._connected = False
                await self._meter.close()
            raise

    async def close(self) -> None:
        self._connected = False
        await self._meter.close()


def build_site_loop(gateway: Gateway, settings: SiteLoopSettings, group: str) -> SiteLoop:
    """A site loop over the core's supervised devices, which it takes over from the core."""
    registry = gateway.registry
    ids = [*settings.pv, *([settings.battery] if settings.battery else [])]
    for device_id in ids:
        if device_id not in registry:
            raise ValueError(f"site_loop names unknown device {device_id!r}")
    for device_id in settings.pv:
        if registry.device(device_id).der_class is not DerClass.PV:
            raise ValueError(f"site_loop.pv: {device_id!r} is not der_class 'pv'")
    if settings.battery and registry.device(settings.battery).der_class is not DerClass.BATTERY:
        raise ValueError(f"site_loop.battery: {settings.battery!r} is not der_class 'battery'")
    gateway.delegate(frozenset(ids))
    meter = SunSpecSiteMeter(
        "site-meter", settings.meter, import_positive=settings.meter_import_positive
    )
    return SiteLoop(
        ReconnectingMeter(meter),
        [SupervisedPv(gateway, d) for d in settings.pv],
        SupervisedBattery(gateway, settings.battery) if settings.battery else None,
        core_envelope(gateway, group),
        dispatch=core_dispatch(gateway, settings.battery) if settings.battery else None,
        config=SiteLoopConfig.model_validate(
            settings.model_dump(include=set(SiteLoopConfig.model_fields))
        ),
    )
