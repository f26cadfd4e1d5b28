"""The domain core: the command book, the planner, the device supervisors, telemetry, flex and
settlement, behind one API and one outbound port.

Whoever commands us (the Grid DERMS uplink, our OpenADR VEN, the edge agent's 2030.5 client)
calls the API: :meth:`Gateway.submit`, :meth:`Gateway.request_flex`, :meth:`Gateway.put_weather`,
:meth:`Gateway.performance_report`, :meth:`Gateway.group_telemetry`. What the core has to say
northbound (acks, telemetry, forecasts, reports) goes out through the :class:`Publisher` port it
is given. Devices come in as :class:`DeviceAdapter` ports, built by the composition root; the
core knows no socket, topic, XML or protocol status code.

Loops (one named task each, in one TaskGroup): one supervisor per device, the control loop
(plan → lifecycle → setpoints, every ``control_period_s`` and at once when a command arrives),
the telemetry loop, and with history the history writer, flex-history and settlement loops.
Nothing here blocks the event loop. Commands, their lifecycle and every device write go to the
audit trail (:mod:`gateway.audit`; its writer is a thread of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import lru_cache, partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from pydantic import ValidationError

from gateway import dispatch
from gateway.aio import wait_inside_task_group
from gateway.audit import CORE_SOURCE, NO_AUDIT, AuditKind, AuditLog, AuditTrail
from gateway.clock import ClockStep, ClockWatch
from gateway.commands import CommandBook
from gateway.config import CoreConfig
from gateway.cycles import CycleStats
from gateway.delivery import (
    BaselineTracker,
    DeliveryLoop,
    EnvelopeWatch,
    ReleaseGovernor,
    baseline_taus,
    close_loops,
    govern_releases,
    planning_baselines,
)
from gateway.devices import (
    AdapterError,
    DeviceAdapter,
    DispatchNotice,
    Regroups,
    ReportsOnItsOwnSchedule,
    Retires,
    TakesNotice,
)
from gateway.enrolment import AdapterFactory, Enrolment, Scanner
from gateway.errors import CoreError
from gateway.flex import (
    DeviceFlexInput,
    DeviceHistory,
    EventCalendar,
    EventToSettle,
    FlexConfig,
    FlexCoverage,
    FlexForecast,
    FlexRequest,
    PerformanceReport,
    forecast_group,
    settle_event,
)
from gateway.flex.baseline import BaselineConfig, BaselineMethod, epoch_s, from_epoch
from gateway.flex.methods import Temperatures, control_group
from gateway.flex.profiles import BaselineProfile, loop_profiles
from gateway.flex.settlement import event_days, history_span, settlement_window
from gateway.history import (
    HISTORY_CHUNK_DEVICES,
    HistoryError,
    ReadingClass,
    ReadingHistory,
    run_history_writer,
)
from gateway.ports import Publisher
from gateway.registry import Registry
from gateway.services.feeds import FeedBook
from gateway.services.prices import PriceBook
from gateway.services.runner import ServiceRunner
from gateway.store import CommandStore, StoreError
from gateway.supervisor import DeviceSupervisor
from gateway.telemetry import (
    CommandBoard,
    CommandInForce,
    CycleEstimate,
    DeviceProfile,
    EstimatorConfig,
    FleetIndex,
    GroupEstimator,
    QualityClassifier,
    RawReading,
    TelemetryQuality,
)
from gateway.weather import TemperatureRecord, WeatherBook, forecast_excerpt
from unified.feeds import FeedValue
from unified.model import (
    TERMINAL_STATES,
    Ack,
    AckState,
    Command,
    Delivery,
    DerClass,
    Device,
    DeviceCommand,
    DeviceSetpoint,
    DeviceState,
    DeviceTelemetry,
    Dispatch,
    EnvelopeCompliance,
    EnvelopeInterval,
    GatewayStatus,
    GroupTelemetry,
    OperatingEnvelope,
    Quality,
    Reason,
    TopologyLevel,
    utcnow,
)
from unified.prices import PriceSchedule
from unified.registry import (
    Approval,
    ApproveDevices,
    DiscoverDevices,
    GetRegistry,
    PendingEnrolment,
    RegistryAck,
    RegistryChange,
    RegistryEntry,
    RegistryRequest,
    RegistrySnapshot,
)
from unified.services import ServiceReport
from unified.weather import GATEWAY_SCOPE, WeatherForecast

log = logging.getLogger(__name__)

_BASELINE_TAU_S = 900.0
LOOP_PROFILE_REFRESH_S = 3600.0
"""A running dispatch's same-hour profiles are read again this often (a new hour of history)."""
LOOP_PROFILE_RETRY_S = 300.0
LOOP_PROFILE_CHECK_S = 60.0
"""Time constant of the autonomous-power average (a thermostat's duty cycle is minutes)."""

_RELEASE_COHORT_S = 900.0
"""How long devices released from a command are estimated as one cohort (their snapback)."""

_QUALITY_BATCH = 4096
"""Readings queued for classification before a flush ahead of the telemetry cycle."""


def _version() -> str:
    try:
        return version("derms-gateway")
    except PackageNotFoundError:
        return "0+unknown"


@lru_cache(maxsize=64)
def _control_group(members: tuple[str, ...], share: float, seed: int) -> frozenset[str]:
    # Cached: every control period asks again for every running dispatch of the program.
    return control_group(members, share, seed)


def _in_force(active: Sequence[dispatch.ActiveCommand]) -> list[tuple[str, int, frozenset[str]]]:
    return [(a.command.command_id, a.seq, a.excluded) for a in active]


@dataclass(frozen=True, slots=True)
class _Refusal:
    command: DeviceCommand
    error: AdapterError


class Gateway:
    def __init__(
        self,
        config: CoreConfig,
        *,
        devices: Sequence[Device],
        adapters: Mapping[str, DeviceAdapter],
        publisher: Publisher,
        adapter_factory: AdapterFactory | None = None,
        scanner: Scanner | None = None,
    ) -> None:
        """``devices`` are the configured fleet (the registry's seed), ``adapters`` how to
        reach each of them (a device without one is planned around as never reporting),
        ``publisher`` where acks, telemetry, forecasts and reports go, and ``adapter_factory``
        how to reach a device enrolled through the registry API (none: no such enrolment)."""
        self.config = config
        self.publisher = publisher
        self.registry = Registry(list(devices), config.groups)
        self.store = CommandStore(config.store.path)
        self.enrolment = Enrolment(self, config.store.path, adapter_factory, devices)
        self._scanner = scanner
        self._scans: set[str] = set()
        self.registry_acks: list[Callable[[RegistryAck], None]] = []
        """Told of registry acks that come later than their request (a scan's result)."""
        """The durable registry and its API (:mod:`gateway.enrolment`)."""
        self.registry_changes: list[Callable[[RegistryChange], None]] = []
        """Told of every change of the durable registry (the uplink publishes them)."""
        self.pending_listeners: list[Callable[[PendingEnrolment], None]] = []
        """Told of every device that announced itself and waits for approval."""
        self._device_tasks: dict[str, asyncio.Task[None]] = {}
        self._retiring: dict[str, float] = {}
        """Retired devices whose adapter runs until their setpoint is released (by id: the
        monotonic time it is stopped regardless)."""
        self._serving: set[tuple[str, str]] = set()
        self._serving_since: dict[tuple[str, str], datetime] = {}
        """(device, command) pairs in the current plan: participation records."""
        self.version = _version()
        self.audit_log: AuditLog | None = None
        self.audit: AuditTrail = NO_AUDIT
        """Where the core and the uplinks record commands, refusals and device writes."""
        if config.audit.enabled:
            audit = config.audit
            self.audit = self.audit_log = AuditLog(
                audit.resolved_path(config.store.path),
                max_bytes=audit.max_bytes,
                keep=audit.keep,
                fsync=audit.fsync,
                max_queue=audit.max_queue,
                retry_s=audit.retry_s,
                identity={"gateway_id": config.gateway_id, "version": self.version},
            )
        self.book = CommandBook(self.store, self.registry, self._publish_ack, audit=self.audit)
        self._wake = asyncio.Event()
        self.clock = ClockWatch()
        """Wall-clock steps between control cycles (:mod:`gateway.clock`)."""
        timing = config.timing
        self.control_cycles = CycleStats(timing.control_period_s)
        self.telemetry_cycles = CycleStats(timing.telemetry_period_s)
        """What each control and telemetry cycle took, and when the last ended (for the
        operator's metrics and health checks)."""
        self.last_group_telemetry: tuple[GroupTelemetry, ...] = ()
        """What the last telemetry cycle published for each group."""
        self.supervisors: dict[str, DeviceSupervisor] = {}
        self._own_schedule: dict[str, ReportsOnItsOwnSchedule] = {}
        """Adapters whose devices report on their own schedule, found once: a runtime check
        against a Protocol costs ~20 µs, and device_states asks for every device each cycle."""
        self._tasks: asyncio.TaskGroup | None = None
        for adapter in adapters.values():
            self._supervise(adapter)
        self._build_estimation()
        self._availability: dict[str, float] = {}
        self.flex_coverage = FlexCoverage()
        """Each group's flex forecasts checked against the flexibility its dispatches delivered
        (published with the forecasts and in the operator metrics; calibrates their width)."""
        self.state_listeners: list[Callable[[DeviceState], None]] = []
        """Called with every fresh device poll (telemetry quality, benchmarks)."""
        self.ack_listeners: list[Callable[[Ack], None]] = []
        """Called with every ack as it is published (the operator's live view). A listener
        must return at once: it runs inside the command book's lifecycle step."""
        self.plan = dispatch.Plan()
        self.delegated: frozenset[str] = frozenset()
        """Devices a local controller drives (the edge agent's metered site loop): the core
        still polls and plans them, but writes its plan for them to nobody; the controller
        reads it with :meth:`planned` and writes through the device's supervisor."""
        self._noticed: dict[str, tuple[DispatchNotice, tuple[TakesNotice, ...]]] = {}
        """Dispatches told ahead to the devices that take notice, until they end."""
        self._refusals: list[_Refusal] = []
        self._last_reading: dict[str, datetime] = {}
        self._baselines = BaselineTracker(_BASELINE_TAU_S, baseline_taus(self.registry.devices()))
        """Each device's power while left alone (no setpoint, no limit): the baseline a
        ``target`` dispatch plans a thermal device from, and that a dispatch's delivered
        response is measured against."""
        self._autonomous_kw = self._baselines.mean_kw
        self._loops: dict[str, DeliveryLoop] = {}
        self._governors: dict[str, ReleaseGovernor] = {}
        """Ended dispatches whose thermal loads are still being released, paced on the measured
        rebound (by command id)."""
        self._profiles: dict[str, dict[str, BaselineProfile]] = {}
        """Each running dispatch's thermal loads' same-hour profiles (by command id), read off
        the control loop (:meth:`load_loop_profiles`) for its closed loop's baselines."""
        self._profiles_at: dict[str, float] = {}
        self._profiles_wake = asyncio.Event()
        self._watches: dict[str, EnvelopeWatch] = {}
        self._watched: dict[str, OperatingEnvelope] = {}
        """How each envelope in force holds at the meter (by command id)."""
        """The closed loop of each running dispatch (by command id)."""
        self.history: ReadingHistory | None = None
        if config.history.enabled:
            self.history = ReadingHistory(
                config.history.resolved_path(config.store.path),
                interval_s=config.history.interval_s,
                retention_days=config.history.retention_days,
                report_retention_days=config.settlement.report_retention_days,
                max_pending=config.history.max_pending,
            )
        self._was_active: set[str] = set()
        self._allocated: dict[str, dict[str, float]] = {}
        self._to_settle: dict[str, dict[str, Any]] = {}
        self._settle_wake = asyncio.Event()
        self._flex_history: dict[str, DeviceHistory] = {}
        self._flex_calendar: EventCalendar | None = None
        self._flex_history_end = -1
        self.weather = WeatherBook()
        self.prices = PriceBook()
        """Newest price schedule per (scope, kind), for the grid services' schedules."""
        self.feeds = FeedBook()
        """Newest value per external feed, for the ``feed_trigger`` services."""
        self._services = ServiceRunner(
            self.prices,
            on_solved=self._wake.set,
            on_report=self._service_ended,
            feeds=self.feeds,
            spawn=self._spawn,
        )
        self.price_listeners: list[Callable[[PriceSchedule], object]] = []
        """Told of every price schedule the core takes up (and of those loaded at start), e.g.
        the 2030.5 server serving it as Pricing. A listener that raises is logged and skipped."""
        self._flex_outdated = False
        """Latest outdoor temperature forecast per scope, for the flex forecast."""
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Run until cancelled. Active setpoints stay on the devices (each armed with a revert
        timeout), so a restart inside that time resumes events without a blip.

        ``ready`` is set once the command book is loaded and every loop is started: the API
        may be called from then on."""
        async with contextlib.AsyncExitStack() as stack:
            if self.audit_log is not None:
                await stack.enter_async_context(self.audit_log)
            await stack.enter_async_context(self.store)
            await stack.enter_async_context(self.enrolment.store)
            merged = await self.enrolment.load(utcnow())
            if merged is not None:
                self._registry_changed(merged)
            self.enrolment.announce_settings()
            if self.history is not None:
                await stack.enter_async_context(self.history)
                await self._load_weather()
                await self._load_prices()
                await self._load_feeds()
            await self.book.load(utcnow())
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                if self.history is not None:
                    h = self.config.history
                    tg.create_task(
                        run_history_writer(
                            self.history,
                            flush_s=h.flush_s,
                            prune_s=h.prune_s,
                            io_timeout_s=h.io_timeout_s,
                        ),
                        name="history-writer",
                    )
                    tg.create_task(self._flex_history_loop(), name="flex-history")
                    tg.create_task(self._loop_profiles_loop(), name="loop-profiles")
                    if self.config.settlement.enabled:
                        tg.create_task(self._settlement_loop(), name="settlement")
                for device_id, supervisor in self.supervisors.items():
                    self._device_tasks[device_id] = tg.create_task(
                        supervisor.run(), name=f"device:{device_id}"
                    )
                tg.create_task(self._control_loop(), name="control")
                tg.create_task(self._store_retention_loop(), name="store-retention")
                tg.create_task(self._telemetry_loop(), name="telemetry")
                self.ready.set()
                try:
                    await wait_inside_task_group()
                finally:
                    self._tasks = None

    def _supervise(self, adapter: DeviceAdapter) -> DeviceSupervisor:
        timing = self.config.timing
        supervisor = DeviceSupervisor(
            adapter,
            poll_interval_s=timing.poll_interval_s,
            io_timeout_s=timing.io_timeout_s,
            refresh_s=timing.refresh_s,
            backoff_max_s=timing.backoff_max_s,
            on_state=self._on_device_state,
            on_result=self._on_device_result,
        )
        self.supervisors[adapter.device_id] = supervisor
        if isinstance(adapter, ReportsOnItsOwnSchedule):
            self._own_schedule[adapter.device_id] = adapter
        return supervisor

    # ------------------------------------------------------------------ telemetry quality
    def _report_interval_s(self, device_id: str) -> float:
        supervisor = self.supervisors.get(device_id)
        if supervisor is not None and isinstance(supervisor.adapter, ReportsOnItsOwnSchedule):
            own = supervisor.adapter.stale_after_s
            return max(self.config.timing.poll_interval_s, float(own) / 3.0)
        return self.config.timing.poll_interval_s

    def _profile(self, device: Device) -> DeviceProfile:
        interval = self._report_interval_s(device.device_id)
        return DeviceProfile.from_device(device, report_interval_s=interval)

    def _build_estimation(self) -> None:
        """Per-reading quality and the group estimator, over the registry as it is now.

        Devices enrolled at run time are appended (:meth:`_enrol_for_estimation`), every
        device's history kept; regrouping needs nothing because group members are resolved at
        each telemetry cycle.
        """
        index = FleetIndex([self._profile(d) for d in self.registry.devices()])
        self._fleet_index = index
        self._commands_in_force = CommandBoard(index)
        """The plan's commands, as screening and estimation need them (told every control
        cycle by :meth:`_tell_telemetry`)."""
        self._released: dict[str, tuple[float, CommandInForce]] = {}
        self._classifier = QualityClassifier(index, commands=self._commands_in_force)
        self._estimator = GroupEstimator(
            index,
            EstimatorConfig(period_s=self.config.timing.telemetry_period_s),
            commands=self._commands_in_force,
        )
        self._cycle: CycleEstimate | None = None
        self.reading_quality: dict[str, TelemetryQuality] = {}

    def _enrol_for_estimation(self, devices: Sequence[Device]) -> None:
        # A device enrolled again after a retirement keeps its row (and its history).
        new = [self._profile(d) for d in devices if d.device_id not in self._fleet_index.row]
        if not new:
            return
        self._flush_quality()  # queued readings refer to the rows as they are
        index = self._fleet_index.extended(new)
        self._classifier.extend(index)
        self._estimator.extend(index)
        self._fleet_index = index

    def _tell_telemetry(
        self,
        now: datetime,
        previous: dispatch.Plan,
        plan: dispatch.Plan,
        states: Mapping[str, DeviceState | None],
    ) -> None:
        """Tell screening and estimation which commands are in force (the arrow runs core →
        telemetry): each device's cohort (the command it serves), the power expected of it
        and whether it should hold that power; devices just let go form a release cohort
        for a while, since they step back together."""
        t = now.timestamp()
        for device_id, (cid, rise) in plan.released.items():
            state = states.get(device_id)
            expected = None if state is None else state.power_kw + rise
            self._released[device_id] = (t, CommandInForce(f"release:{cid}", expected))
        for device_id, old in previous.setpoints.items():
            if device_id in plan.setpoints or device_id in plan.releasing:
                continue
            if device_id not in self._released and old.provenance:
                cohort = f"release:{old.provenance[0].command_id}"
                self._released[device_id] = (t, CommandInForce(cohort))
        self._released = {
            d: entry for d, entry in self._released.items() if t - entry[0] <= _RELEASE_COHORT_S
        }
        commands = {d: command for d, (_, command) in self._released.items()}
        for device_id, setpoint in plan.setpoints.items():
            self._released.pop(device_id, None)
            cohort = setpoint.provenance[0].command_id if setpoint.provenance else "setpoint"
            thermal = (
                device_id in self.registry
                and self.registry.device(device_id).der_class in dispatch.SHIFTS_FROM_BASELINE
            )
            commands[device_id] = CommandInForce(
                cohort, setpoint.power_kw, held=setpoint.power_kw is not None and not thermal
            )
        self._commands_in_force.update(now, commands)

    def _flush_quality(self) -> None:
        self.reading_quality.update(self._classifier.flush())

    def estimate_cycle(self, now: datetime) -> CycleEstimate:
        """Run one estimation cycle (once per telemetry period: it learns from each)."""
        self._flush_quality()
        self._cycle = self._estimator.cycle(self._classifier.snapshot(now))
        return self._cycle

    def add_device(self, device: Device, adapter: DeviceAdapter) -> None:
        """Enrol a device discovered at run time (e.g. a resource an OEM cloud reports).

        It joins its topology groups at once, so the next control cycle may allocate to it;
        commands already active are re-planned over the new membership, not rewritten.
        It is kept in the durable registry (origin ``endpoint``): the registry API can move it,
        change its programs or retire it, and that holds when it comes again after a restart.
        """
        now = utcnow()
        device, entry = self.enrolment.from_endpoint(device, now)
        self.add_devices([(device, adapter)])
        if entry is not None:
            coro = self._record_endpoint(entry, now)
            if self._tasks is not None:
                self._tasks.create_task(coro, name=f"registry-endpoint:{device.device_id}")
            else:
                coro.close()

    async def _record_endpoint(self, entry: RegistryEntry, now: datetime) -> None:
        try:
            change = await self.enrolment.record_endpoint(entry, now)
        except StoreError as exc:
            log.error("%s not stored in the registry: %s", entry.device.device_id, exc)
            return
        self._registry_changed(change, entry.device.adapter)

    def add_devices(self, enrolled: Sequence[tuple[Device, DeviceAdapter]]) -> None:
        """Enrol many devices at once (a bulk enrolment): checked first, then added together,
        so estimation is extended once, not once per device."""
        ids: set[str] = set()
        for device, adapter in enrolled:
            if device.device_id != adapter.device_id:
                raise ValueError("device and adapter disagree on the device id")
            if device.device_id in self.registry or device.device_id in ids:
                raise ValueError(f"device {device.device_id!r} is already registered")
            if device.device_id in self.supervisors:
                raise ValueError(f"device {device.device_id!r} is still being retired")
            ids.add(device.device_id)
        for device, adapter in enrolled:
            self.registry.add(device)
            supervisor = self._supervise(adapter)
            if self._tasks is not None:
                self._device_tasks[device.device_id] = self._tasks.create_task(
                    supervisor.run(), name=f"device:{device.device_id}"
                )
        self._enrol_for_estimation([d for d, _ in enrolled])
        self._baselines.tau_of.update(baseline_taus(d for d, _ in enrolled))
        self._wake.set()

    def update_device(self, device: Device) -> None:
        """A registered device's new record (location, ratings, constraints, programs): the
        next control cycle plans over it; commands in force are not rewritten."""
        self.update_devices([device])

    def update_devices(self, devices: Sequence[Device]) -> None:
        """Many devices' new records at once (a feeder section moved): as
        :meth:`update_device`, with screening and estimation regrouped once."""
        for device in devices:
            self.registry.replace(device)
        self._regroup_for_estimation(devices)
        groups = self.registry.groups()
        for device in devices:
            supervisor = self.supervisors.get(device.device_id)
            if supervisor is not None and isinstance(supervisor.adapter, Regroups):
                supervisor.adapter.regroup(
                    tuple(gid for gid, g in groups.items() if g.contains(device))
                )
        self._wake.set()

    def _regroup_for_estimation(self, devices: Sequence[Device]) -> None:
        """Screening and estimation take moved devices' new peer groups and changed ratings'
        bounds from the next reading on (every device's history and state kept)."""
        index = self._fleet_index
        changed = {
            d.device_id: self._profile(d) for d in devices if d.device_id in index.row
        }
        profiles = [changed.get(p.device_id, p) for p in index.profiles]
        if profiles == list(index.profiles):
            return
        self._flush_quality()  # queued readings were screened against the old groups
        regrouped = FleetIndex(profiles, index.peer_groups)
        self._commands_in_force.extend(regrouped)
        self._classifier.extend(regrouped)
        self._estimator.extend(regrouped)
        self._fleet_index = regrouped

    def retire_device(self, device_id: str, *, release_within_s: float = 30.0) -> None:
        """Take a device out of the fleet. It leaves every group at once, so the next control
        cycle re-allocates its share of the commands in force to the other members; its
        adapter runs until the release of its setpoint is written (at most
        ``release_within_s``), then stops."""
        self.registry.remove(device_id)
        if device_id not in self.supervisors:
            return
        if self._tasks is None:  # not started: nothing was written to it
            self._stop_supervisor(device_id)
        else:
            self._retiring[device_id] = time.monotonic() + release_within_s
        self._wake.set()

    def _stop_supervisor(self, device_id: str) -> None:
        supervisor = self.supervisors.pop(device_id, None)
        if supervisor is not None and isinstance(supervisor.adapter, Retires):
            supervisor.adapter.retire()
        self._own_schedule.pop(device_id, None)
        self._retiring.pop(device_id, None)
        task = self._device_tasks.pop(device_id, None)
        if task is not None:
            task.cancel()

    def _reap_retired(self) -> None:
        now = time.monotonic()
        for device_id, deadline in list(self._retiring.items()):
            supervisor = self.supervisors.get(device_id)
            if supervisor is None or supervisor.released or now >= deadline:
                self._stop_supervisor(device_id)
                log.info("device %s retired", device_id)

    def _registry_changed(self, change: RegistryChange, source: str | None = None) -> None:
        self.audit.record(
            AuditKind.REGISTRY_CHANGED,
            source=source or CORE_SOURCE,
            details=change.model_dump(mode="json", exclude_none=True),
        )
        for listener in self.registry_changes:
            listener(change)

    async def reload_devices(
        self, devices: Sequence[tuple[Device, DeviceAdapter | None]]
    ) -> list[str]:
        """A reloaded config file's devices (SIGHUP): merged into the registry at run time by
        the start's rule, without touching the commands in force; returns what needs a
        restart instead."""
        change, notes = await self.enrolment.reseed(devices, utcnow())
        if change is not None:
            self._registry_changed(change)
        return notes

    def propose_enrolment(self, pending: PendingEnrolment) -> None:
        """A device announced itself (an unknown MQTT device's birth): it waits for an
        ``approve`` request, and Grid DERMS is told."""
        if not self.enrolment.propose(pending):
            return
        log.info("device %s announced itself: pending enrolment", pending.device_id)
        if self._tasks is not None:
            self._tasks.create_task(self._keep_pending(pending), name="registry-pending")
        self.audit.record(
            AuditKind.REGISTRY_PENDING,
            source=pending.source,
            device_id=pending.device_id,
            details=pending.model_dump(mode="json"),
        )
        for listener in self.pending_listeners:
            listener(pending)
        rule = next(
            (r for r in self.config.auto_approve if r.matches(pending.device_id, pending.adapter)),
            None,
        )
        if rule is not None and self._tasks is not None:
            request = ApproveDevices(
                op="approve",
                request_id=f"auto-approve.{pending.device_id}"[:128],
                devices=(
                    Approval(
                        device_id=pending.device_id,
                        location=rule.location,
                        programs=rule.programs,
                        rate_class=rule.rate_class,
                    ),
                ),
            )
            self._tasks.create_task(self._auto_approve(request), name="auto-approve")

    async def _keep_pending(self, pending: PendingEnrolment) -> None:
        """Store an announced device, so it still waits for approval after a restart."""
        try:
            await self.enrolment.store.save_pending(pending)
        except StoreError as exc:
            log.warning("pending enrolment of %s not stored: %s", pending.device_id, exc)

    async def _auto_approve(self, request: ApproveDevices) -> None:
        """An approval by rule, answered like one by API (on the registry's ack topic)."""
        try:
            ack, _ = await self.registry_request(request, source="auto-approve")
        except StoreError:
            log.exception("auto-approval %s could not be stored", request.request_id)
            return
        for listener in self.registry_acks:
            listener(ack)

    async def registry_request(
        self, request: RegistryRequest, *, source: str | None = None
    ) -> tuple[RegistryAck, RegistrySnapshot | None]:
        """Apply one request of the registry API (:mod:`gateway.enrolment`); answers with its
        ack and, for a ``get``, the snapshot. Raises :class:`gateway.enrolment.RegistryError`
        when the registry's tables cannot be written (nothing is then applied)."""
        now = utcnow()
        if isinstance(request, DiscoverDevices):
            return await self._discover(request, now), None
        ack, change = await self.enrolment.handle(request, now)
        if change is not None:
            log.info("registry %s by %s: version %d", change.op, source, change.version)
            self._registry_changed(change, source)
        snapshot = None
        if isinstance(request, GetRegistry) and ack.state == "applied":
            snapshot = self.enrolment.snapshot(now)
        return ack, snapshot

    async def _discover(self, request: DiscoverDevices, now: datetime) -> RegistryAck:
        """Scans run in the background (a slow endpoint must not hold up the commands behind
        it): ``accepted`` now, ``applied`` with the devices found when the scan is over."""
        answered = await self.enrolment.answered(request)
        if answered is not None:
            return (await self.enrolment.handle(request, now))[0]  # same id: same rules
        refused = None
        if self._scanner is None:
            refused = "this gateway cannot scan for devices"
        elif self._tasks is None:
            refused = "the gateway is not running"
        if refused is not None:
            return RegistryAck(
                request_id=request.request_id,
                state="rejected",
                version=self.enrolment.version,
                timestamp=now,
                reason=Reason.ADAPTER_INVALID,
                detail=refused,
            )
        accepted = RegistryAck(
            request_id=request.request_id,
            state="accepted",
            version=self.enrolment.version,
            timestamp=now,
            detail="scanning; found devices are announced on registry/pending",
        )
        if request.request_id not in self._scans:
            assert self._tasks is not None
            self._scans.add(request.request_id)
            self._tasks.create_task(self._scan(request), name=f"scan:{request.request_id}")
        return accepted

    async def _scan(self, request: DiscoverDevices) -> None:
        assert self._scanner is not None
        try:
            found = [
                p
                for p in await self._scanner(request)
                if p.device_id not in self.registry and p.device_id not in self.enrolment.entries
            ]
            for pending in found:
                self.propose_enrolment(pending)
            ack = await self.enrolment.discovered(request, found, utcnow())
        except Exception as exc:  # a scan must not end the gateway
            log.exception("scan %s failed", request.request_id)
            ack = RegistryAck(
                request_id=request.request_id,
                state="rejected",
                version=self.enrolment.version,
                timestamp=utcnow(),
                reason=Reason.INTERNAL,
                detail=f"{type(exc).__name__}: {exc}"[:1000],
            )
        finally:
            self._scans.discard(request.request_id)
        for listener in self.registry_acks:
            listener(ack)

    async def _record_participation(self, now: datetime, plan: dispatch.Plan) -> None:
        serving = {
            (device_id, source.command_id)
            for device_id, setpoint in plan.setpoints.items()
            for source in setpoint.provenance
        }
        if serving == self._serving:
            return
        started, ended = serving - self._serving, self._serving - serving
        try:
            await self.enrolment.store.record_participation(started, ended, now)
        except StoreError:
            log.exception("could not record participation")
            return
        self._serving = serving
        for pair in started:
            self._serving_since[pair] = now
        for device_id, command_id in ended:
            since = self._serving_since.pop((device_id, command_id), None)
            if since is not None:
                self.registry.add_called(device_id, (now - since).total_seconds())

    def report_refusal(self, command: DeviceCommand, error: AdapterError) -> None:
        """A device (or the cloud behind it) refused a setpoint after it was handed over, e.g.
        an OpenADR opt-out: its commands are re-allocated to other devices from now on."""
        self._on_device_result(command, error)

    def status(self) -> GatewayStatus:
        return GatewayStatus(
            gateway_id=self.config.gateway_id,
            state="online",
            timestamp=utcnow(),
            version=self.version,
            devices=len(self.registry),
            groups=tuple(sorted(self.registry.groups())),
        )

    # ------------------------------------------------------------------ API
    async def submit(
        self, command: Command, reply: object | None = None, *, source: str | None = None
    ) -> Ack:
        """Take a command into the book and plan it at once.

        Raises :class:`gateway.commands.CommandRejected` (a :class:`CoreError`) for a command
        the book will not take; acks (with ``reply``) go out through the publisher either way
        the command goes from here. Anything else raised (the store's disk is full) is the
        caller's to report: the command was not taken. ``source`` is the sender's identity as
        the uplink knows it (``mqtt:{topic}``, a VTN id, an LFDI), for the audit trail.
        """
        ack = await self.book.submit(command, utcnow(), reply, source=source)
        if ack.state is AckState.ACCEPTED and isinstance(command, Dispatch):
            self._give_notice(command)
        elif ack.state is AckState.ACCEPTED and isinstance(command, OperatingEnvelope):
            self._give_envelope_notice(command)
        self._wake.set()
        return ack

    def _give_notice(self, command: Dispatch) -> None:
        """Tell the devices that take notice of a dispatch they may be called for, with a
        provisional share: their rating in its direction, pro rata over its devices."""
        devices = dispatch.target_devices(self.registry, command.target)
        takers: list[tuple[TakesNotice, float]] = []
        total = 0.0
        for device in devices:
            rating = (
                device.ratings.max_discharge_kw if command.kw < 0 else device.ratings.max_charge_kw
            )
            total += rating
            supervisor = self.supervisors.get(device.device_id)
            if supervisor is not None and isinstance(supervisor.adapter, TakesNotice):
                takers.append((supervisor.adapter, rating))
        if not takers or total <= 0:
            return
        share = max(-1.0, min(1.0, command.kw / total))
        for adapter, rating in takers:
            notice = DispatchNotice(
                command.command_id,
                command.start,
                command.end,
                round(share * rating, 3),
                ramp_s=command.ramp_s,
                group_id=command.target.group_id,
            )
            try:
                adapter.notice(notice)
            except Exception:  # a notice is a courtesy: it must never fail a command
                log.exception("notice of %s to %s failed", command.command_id, adapter)
        self._noticed[command.command_id] = (
            DispatchNotice(command.command_id, command.start, command.end, 0.0, withdrawn=True),
            tuple(adapter for adapter, _ in takers),
        )

    def _give_envelope_notice(self, command: OperatingEnvelope) -> None:
        """Tell the devices that take notice which group and window an envelope concerns (a
        2030.5 server puts its limits into that group's program)."""
        takers = []
        devices = dispatch.target_devices(self.registry, command.target)
        for device in devices:
            supervisor = self.supervisors.get(device.device_id)
            if supervisor is not None and isinstance(supervisor.adapter, TakesNotice):
                takers.append(supervisor.adapter)
        if not takers:
            return
        notice = DispatchNotice(
            command.command_id,
            command.start,
            command.end,
            0.0,
            group_id=command.target.group_id,
            kind="envelope",
            intervals=command.intervals,
            devices=len(devices),
        )
        for adapter in takers:
            try:
                adapter.notice(notice)
            except Exception:  # a notice is a courtesy: it must never fail a command
                log.exception("notice of %s to %s failed", command.command_id, adapter)
        self._noticed[command.command_id] = (
            dataclasses.replace(notice, withdrawn=True),
            tuple(takers),
        )

    def _withdraw_notice(self, command_id: str) -> None:
        noticed = self._noticed.pop(command_id, None)
        if noticed is None:
            return
        withdrawal, adapters = noticed
        for adapter in adapters:
            try:
                adapter.notice(withdrawal)
            except Exception:
                log.exception("withdrawing notice of %s from %s failed", command_id, adapter)

    def request_flex(self, request: FlexRequest) -> FlexForecast:
        """A flexibility forecast asked for now; :class:`CoreError` for an unknown group."""
        if self.registry.group(request.group_id) is None:
            raise CoreError(Reason.UNKNOWN_GROUP, f"unknown group {request.group_id!r}")
        return self.flex_forecast(request)

    def _publish_ack(self, ack: Ack, reply: object | None) -> None:
        if ack.state in TERMINAL_STATES:
            self._withdraw_notice(ack.command_id)
        self.publisher.ack(ack, reply)
        self._track_for_settlement(ack)
        for listener in self.ack_listeners:
            try:
                listener(ack)
            except Exception:  # an observer must never stop a lifecycle step
                log.exception("ack listener failed")

    # ------------------------------------------------------------------ flexibility
    def flex_forecast(self, request: FlexRequest, now: datetime | None = None) -> FlexForecast:
        """Available flexibility of one group over the request's horizon (p10/p50/p90)."""
        now = now or utcnow()
        return self._flex_job(request, now)()

    async def flex_forecast_off_loop(self, request: FlexRequest, now: datetime) -> FlexForecast:
        """:meth:`flex_forecast` with its inputs taken on the loop and the forecast computed in
        a worker thread (seconds for a substation of 10,000 devices: the loop keeps polling,
        acking and controlling meanwhile)."""
        return await asyncio.to_thread(self._flex_job(request, now))

    def _flex_job(self, request: FlexRequest, now: datetime) -> Callable[[], FlexForecast]:
        """A group's forecast on a snapshot of what it needs, taken now (frozen states, the
        history cache's arrays, which are replaced and never changed in place)."""
        states = self.device_states(now)
        members = self.registry.members(request.group_id)
        weather = self.weather.for_devices(members, self.registry)
        inputs = [
            DeviceFlexInput(
                device=d,
                state=states.get(d.device_id),
                availability=self._availability.get(d.device_id, 0.5),
                history=self._flex_history.get(d.device_id),
                weather=weather.get(d.device_id),
            )
            for d in members
        ]
        return partial(
            forecast_group,
            inputs,
            request,
            now=now,
            outdoor_temp_c=self.config.flex.outdoor_temp_c,
            calendar=self._flex_calendar,
            coverage=self.flex_coverage,
        )

    async def put_weather(self, forecast: WeatherForecast) -> str | None:
        """Use an outdoor temperature forecast for the flex forecasts of its scope.

        :class:`CoreError` for an unknown scope (nothing changes); one not newer than the
        forecast held for its scope (a redelivery) is ignored. Returns a warning for the
        sender when the forecast is used but could not be stored (it will not survive a
        restart), else None.
        """
        if forecast.scope is not None and self.registry.group(forecast.scope) is None:
            raise CoreError(Reason.UNKNOWN_GROUP, f"unknown weather scope {forecast.scope!r}")
        if not self.weather.is_newer(forecast):
            log.info(
                "weather forecast for %s not newer than the one held: ignored",
                forecast.scope or "the gateway",
            )
            return None
        warning = None
        if self.history is not None:
            try:
                async with asyncio.timeout(self.config.history.io_timeout_s):
                    await self.history.save_weather(
                        forecast.scope_key, forecast.issued_at, forecast.model_dump_json()
                    )
                    await self.history.save_temperatures(
                        forecast.scope_key,
                        forecast.issued_at,
                        [
                            (round(p.start.timestamp()), forecast.step_s, p.temp_c)
                            for p in forecast.points
                        ],
                    )
            except (HistoryError, TimeoutError) as exc:  # still use it; say it is not stored
                log.exception("could not store the weather forecast")
                warning = f"weather forecast used but not stored: {type(exc).__name__}: {exc}"
        self.weather.put(forecast)
        log.info("weather forecast %s", forecast_excerpt(forecast))
        # The retained forecasts were made with the old temperatures: republish them at the
        # next telemetry cycle rather than at the end of the flex period.
        self._flex_outdated = True
        return warning

    async def put_prices(self, schedule: PriceSchedule) -> str | None:
        """Use a price schedule for the grid services of its scope (``docs/mqtt-api.md``).

        :class:`CoreError` for an unknown scope or a schedule that has already ended (stale:
        nothing changes); one not newer than the schedule held for its scope and kind (a
        redelivery) is ignored. Returns a warning for the sender when the schedule is used but
        could not be stored (it will not survive a restart), else None.
        """
        if schedule.scope is not None and self.registry.group(schedule.scope) is None:
            raise CoreError(Reason.UNKNOWN_GROUP, f"unknown price scope {schedule.scope!r}")
        if self.prices.is_stale(schedule, utcnow().timestamp()):
            raise CoreError(Reason.ALREADY_ENDED, "every point of the price schedule has ended")
        if not self.prices.is_newer(schedule):
            log.info("price schedule %s not newer than the one held: ignored", schedule.key)
            return None
        warning = None
        if self.history is not None:
            try:
                async with asyncio.timeout(self.config.history.io_timeout_s):
                    scope, kind = schedule.key
                    await self.history.save_prices(
                        scope, kind, schedule.issued_at, schedule.model_dump_json()
                    )
            except (HistoryError, TimeoutError) as exc:  # still use it; say it is not stored
                log.exception("could not store the price schedule")
                warning = f"price schedule used but not stored: {type(exc).__name__}: {exc}"
        self.prices.put(schedule)
        self._services.prices_changed()
        self._wake.set()
        self._tell_price_listeners(schedule)
        log.info(
            "price schedule %s/%s: %d points from %s",
            *schedule.key,
            len(schedule.points),
            schedule.points[0].start.isoformat(),
        )
        return warning

    async def put_feed(self, value: FeedValue) -> str | None:
        """Use an external feed value for the ``feed_trigger`` services (``docs/mqtt-api.md``).

        :class:`CoreError` ``ALREADY_ENDED`` for a stale value (past its ``valid_s``) and
        ``WINDOW_INVALID`` for one stamped in the future; one not newer than the value held is
        ignored. Returns a warning when the value is used but could not be stored.
        """
        now = utcnow()
        if self.feeds.is_stale(value, now):
            raise CoreError(Reason.ALREADY_ENDED, f"feed {value.name!r}: the value is stale")
        if self.feeds.is_ahead(value, now):
            raise CoreError(Reason.WINDOW_INVALID, f"feed {value.name!r}: stamped in the future")
        if not self.feeds.is_newer(value):
            log.info("feed %s value not newer than the one held: ignored", value.name)
            return None
        warning = None
        if self.history is not None:
            try:
                async with asyncio.timeout(self.config.history.io_timeout_s):
                    await self.history.save_feed(
                        value.name, value.timestamp, value.model_dump_json()
                    )
            except (HistoryError, TimeoutError) as exc:  # still use it; say it is not stored
                log.exception("could not store the feed value")
                warning = f"feed value used but not stored: {type(exc).__name__}: {exc}"
        self.feeds.put(value)
        self._wake.set()
        return warning

    async def _load_feeds(self) -> None:
        assert self.history is not None
        try:
            async with asyncio.timeout(self.config.history.io_timeout_s):
                stored = await self.history.feed_values()
        except (HistoryError, TimeoutError):
            log.exception("could not read the stored feed values")
            return
        for payload in stored:
            try:
                self.feeds.put(FeedValue.model_validate_json(payload))
            except ValidationError as exc:
                log.warning("stored feed value is unusable: %s", exc)

    async def _load_prices(self) -> None:
        assert self.history is not None
        try:
            async with asyncio.timeout(self.config.history.io_timeout_s):
                stored = await self.history.price_schedules()
        except (HistoryError, TimeoutError):
            log.exception("could not read the stored price schedules")
            return
        for payload in stored:
            try:
                schedule = PriceSchedule.model_validate_json(payload)
            except ValidationError as exc:
                log.warning("stored price schedule is unusable: %s", exc)
                continue
            if self.prices.put(schedule):
                self._tell_price_listeners(schedule)

    def _tell_price_listeners(self, schedule: PriceSchedule) -> None:
        for listener in self.price_listeners:
            try:
                listener(schedule)
            except Exception:
                log.exception("price listener %r failed", listener)

    async def _load_weather(self) -> None:
        assert self.history is not None
        try:
            async with asyncio.timeout(self.config.history.io_timeout_s):
                stored = await self.history.weather_forecasts()
        except (HistoryError, TimeoutError):  # forecasts fall back to the configuration
            log.exception("could not read the stored weather forecasts")
            return
        for scope, payload in stored.items():
            try:
                self.weather.put(WeatherForecast.model_validate_json(payload))
            except ValidationError as exc:
                log.warning("stored weather forecast for %s is unusable: %s", scope, exc)

    def _calendar(
        self, device_event_days: Mapping[str, frozenset[Any]], tz: ZoneInfo | None = None
    ) -> EventCalendar:
        settlement = self.config.settlement
        # Forecasts only sort days into types; without a settlement zone they use UTC's.
        zone = tz or settlement.zone_for(()) or ZoneInfo("UTC")
        return EventCalendar(
            holidays=frozenset(settlement.holidays),
            tz=zone,
            device_event_days=dict(device_event_days),
        )

    def settlement_zone(self, event: EventToSettle) -> ZoneInfo:
        """The time zone whose days and clock hours settle ``event``: its target group's
        (``[settlement] group_timezones``), else the one zone its devices' groups agree on,
        else ``[settlement] timezone``; :class:`CoreError` when none applies."""
        settlement = self.config.settlement
        if event.group_id is not None and event.group_id in settlement.group_timezones:
            return ZoneInfo(settlement.group_timezones[event.group_id])
        default = settlement.zone_for(())
        zoned = [
            g for g in self.registry.groups().values() if g.group_id in settlement.group_timezones
        ]
        zones: set[str | None] = set()
        for device_id in event.devices:
            if device_id in self.registry:
                device = self.registry.device(device_id)
                own = {settlement.group_timezones[g.group_id] for g in zoned if g.contains(device)}
                zones.update(own or {None if default is None else default.key})
        if len(zones) == 1 and (only := zones.pop()) is not None:
            return ZoneInfo(only)
        if default is None:
            raise CoreError(
                Reason.INTERNAL,
                f"no settlement time zone for {event.group_id or event.command_id!r}: neither "
                "[settlement] group_timezones (one zone for the target group or all its devices) "
                "nor [settlement] timezone gives one",
                command_id=event.command_id,
            )
        return default

    async def refresh_flex_history(self, now: datetime) -> int:
        """Read each device's hourly (``[flex] interval_s``) history for the forecasts.

        Done here, asynchronously, once per flex period: forecasts (periodic or on request) then
        use this cache and never wait on SQLite. Returns how many devices have history.
        """
        history = self.history
        interval = self.config.flex.interval_s
        if history is None or interval % history.interval_s:
            return 0
        lookback = FlexConfig().lookback_days
        end = math.floor(epoch_s(now) / interval) * interval
        if end == self._flex_history_end:
            return len(self._flex_history)  # nothing new on the forecast's grid yet
        start = end - lookback * 86_400
        ids = [d.device_id for d in self.registry.devices()]
        async with asyncio.timeout(self._history_read_timeout(len(ids))):
            found = await history.histories(ids, from_epoch(start), from_epoch(end), interval)
            days = await history.event_days(from_epoch(start).date())
        self._flex_history = {d: h for d, h in found.items() if not np.isnan(h.kw).all()}
        self._flex_calendar = self._calendar(days)
        self._flex_history_end = end
        return len(self._flex_history)

    async def _flex_history_loop(self) -> None:
        while True:
            try:
                await self.refresh_flex_history(utcnow())
            except Exception:  # TimeoutError included: forecasts keep the previous cache
                log.exception("reading history for the flexibility forecast failed")
            await asyncio.sleep(self.config.flex.period_s)

    def _flex_groups(self) -> list[str]:
        configured = self.config.flex.groups
        if configured:
            return [g for g in configured if self.registry.group(g) is not None]
        return sorted(
            gid
            for gid, g in self.registry.groups().items()
            if g.level in (TopologyLevel.SUBSTATION, TopologyLevel.FEEDER)
        )

    def _track_availability(self, now: datetime) -> None:
        # The chance a device is there when asked, learnt from what we see each telemetry
        # period (an exponential average; new devices start at an agnostic 0.5).
        states = self.device_states(now)
        for device_id, state in states.items():
            seen = 1.0 if state is not None else 0.0
            prev = self._availability.get(device_id, 0.5)
            self._availability[device_id] = round(0.95 * prev + 0.05 * seen, 4)

    async def _publish_flex(self, now: datetime) -> None:
        flex = self.config.flex
        for group_id in self._flex_groups():
            request = FlexRequest(
                group_id=group_id, horizon_s=flex.horizon_s, interval_s=flex.interval_s
            )
            forecast = await self.flex_forecast_off_loop(request, now)
            self.flex_coverage.remember(forecast)
            self.publisher.flex_forecast(forecast)

    # ------------------------------------------------------------------ settlement
    def _track_for_settlement(self, ack: Ack) -> None:
        """Follow every ack; a dispatch that ran and has ended is queued for settlement."""
        cid = ack.command_id
        if ack.allocations:
            shares = self._allocated.setdefault(cid, {})
            shares.update({a.device_id: a.commanded_kw for a in ack.allocations})
        if ack.state is AckState.ACTIVE:
            self._was_active.add(cid)
        if ack.state not in TERMINAL_STATES:
            return
        ran = ack.state is AckState.COMPLETED or cid in self._was_active
        self._was_active.discard(cid)
        allocated = self._allocated.pop(cid, {})
        if not ran or self.history is None or not self.config.settlement.enabled:
            return
        entry = next((e for e in self.book.open_entries() if e.command.command_id == cid), None)
        if entry is None or not isinstance(entry.command, Dispatch):
            return
        command = entry.command
        members = {d.device_id for d in dispatch.target_devices(self.registry, command.target)}
        self._to_settle[cid] = {
            "command": command.model_dump(mode="json"),
            "state": ack.state.value,
            "end": min(command.end, ack.timestamp).isoformat(),
            "allocations": allocated,
            "devices": sorted(members | set(allocated)),
        }
        self._settle_wake.set()

    def _event_to_settle(self, pending: Mapping[str, Any]) -> EventToSettle:
        command = Dispatch.model_validate(pending["command"])
        return EventToSettle(
            command_id=command.command_id,
            program=command.program,
            group_id=command.target.group_id,
            mode=command.mode,
            kw=command.kw,
            start=command.start,
            end=datetime.fromisoformat(pending["end"]),
            final_state=AckState(pending["state"]),
            devices=tuple(pending["devices"]),
            allocations={str(k): float(v) for k, v in pending["allocations"].items()},
        )

    def _settle_due(self, event: EventToSettle) -> float:
        """Epoch seconds when the last settlement interval is over and its readings are in."""
        settlement = self.config.settlement
        rule = settlement.baseline_for(event.program)
        _, end = settlement_window(event.start, event.end, rule.interval_s)
        return epoch_s(end) + settlement.delay_s

    def _history_read_timeout(self, devices: int) -> float:
        """``[history] io_timeout_s`` bounds reading one chunk of devices; a fleet-wide read
        gets it once per chunk (measured here: ~3.4 s for 200 devices x 46 days of 5-minute
        buckets, so 10,000 devices take minutes, off the event loop)."""
        chunks = max(1, math.ceil(devices / HISTORY_CHUNK_DEVICES))
        return self.config.history.io_timeout_s * chunks

    async def _settlement_temperatures(
        self, event: EventToSettle, rule: BaselineConfig, since: datetime, until: datetime
    ) -> dict[str, Temperatures]:
        """The weather-matched rule's outdoor temperatures: per device, the temperature record
        of the scope whose forecast covers it now (the most specific, as for flex forecasts)."""
        if rule.method is not BaselineMethod.WEATHER_MATCHED:
            return {}
        assert self.history is not None
        devices = [self.registry.device(d) for d in event.devices if d in self.registry]
        scopes = {
            d: series.scope or GATEWAY_SCOPE
            for d, series in self.weather.for_devices(devices, self.registry).items()
        }
        records: dict[str, Temperatures] = {}
        for scope in set(scopes.values()):
            record = TemperatureRecord.from_points(
                await self.history.temperatures(scope, since, until)
            )
            if record is not None:
                records[scope] = record
        return {d: records[s] for d, s in scopes.items() if s in records}

    def _hold_out(self, active: list[dispatch.ActiveCommand]) -> list[dispatch.ActiveCommand]:
        """Dispatches of control-group programs leave their held-out devices alone: the planner
        sees them as not eligible (``ActiveCommand.excluded``), the only planner change the
        control group needs. Drawn from the target's members, as settlement draws them."""
        settlement = self.config.settlement
        if not settlement.enabled or (
            not settlement.programs
            and (settlement.baseline.method is not BaselineMethod.CONTROL_GROUP)
        ):
            return active
        out = []
        for original in active:
            entry, command = original, original.command
            if isinstance(command, Dispatch):
                rule = settlement.baseline_for(command.program)
                if rule.method is BaselineMethod.CONTROL_GROUP:
                    members = dispatch.target_devices(self.registry, command.target)
                    held = _control_group(
                        tuple(sorted(d.device_id for d in members)),
                        rule.control_share,
                        rule.control_seed,
                    )
                    entry = replace(entry, excluded=entry.excluded | held)
            out.append(entry)
        return out

    async def settle(self, event: EventToSettle) -> bytes:
        """Compute, keep and publish the performance report of one finished dispatch."""
        history = self.history
        assert history is not None
        settlement = self.config.settlement
        timeout = self.config.history.io_timeout_s
        rule = settlement.baseline_for(event.program)
        start, end = settlement_window(event.start, event.end, rule.interval_s)
        # Read on the baseline's grid (a multiple of the buckets), not the buckets': 46 days of
        # 5-minute buckets for 10,000 devices would be arrays of ~4 GB; of hours, ~350 MB.
        grid = rule.interval_s
        since = epoch_s(history_span(start, rule, settlement.fallback_window_s))
        since = math.floor(since / grid) * grid
        zone = self.settlement_zone(event)
        calendar = self._calendar({}, zone)
        async with asyncio.timeout(timeout + self._history_read_timeout(len(event.devices))):
            await history.flush()  # the event's last readings may still be buffered
            # Every device the event concerned, allocated or not: a called device's day is not
            # a normal day for its baseline (it may have been held, pre-conditioned, or only
            # waiting to be used), so later baselines must not take it as a similar day.
            await history.add_event_days(
                event.command_id,
                {d: event_days(event.start, event.end, calendar) for d in event.devices},
            )
            histories = await history.histories(event.devices, from_epoch(since), end, grid)
            # The settlement window again on the buckets' grid: the part of a partial interval
            # inside the event is then metered exactly (an event at 16:10 on hourly baselines).
            metered = None
            if grid > history.interval_s:
                metered = await history.histories(event.devices, start, end)
            days = await history.event_days(from_epoch(since).date(), excluding=event.command_id)
            temperatures = await self._settlement_temperatures(event, rule, from_epoch(since), end)
        report = await asyncio.to_thread(
            settle_event,
            event,
            histories,
            self._calendar(days, zone),
            generated_at=utcnow(),
            config=rule,
            fallback_window_s=settlement.fallback_window_s,
            metered=metered,
            temperatures=temperatures,
        )
        payload = report.model_dump_json(exclude_none=True).encode()
        async with asyncio.timeout(timeout):
            await history.save_report(event.command_id, report.generated_at, payload.decode())
        self.publisher.performance_report(event.command_id, payload)
        self._check_flex_forecast(report)
        log.info(
            "settled %s: delivered %s kWh, %s of request, quality %s",
            event.command_id,
            "?" if report.delivered_kwh is None else f"{report.delivered_kwh:.3f}",
            "?" if report.performance_ratio is None else f"{report.performance_ratio:.0%}",
            report.quality.value,
        )
        return payload

    def _check_flex_forecast(self, report: PerformanceReport) -> None:
        """Did the group deliver within the p10..p90 its flex forecast gave at the start?"""
        if report.group_id is None or report.mean_delivered_kw is None:
            return
        forecast = self.flex_coverage.in_force(report.group_id, report.event_start)
        if forecast is None:
            return
        within = self.flex_coverage.check(
            forecast,
            report.event_start,
            report.event_end,
            report.requested_kw,
            report.mean_delivered_kw,
        )
        if within is False:
            log.info(
                "%s: %s delivered %.1f kW, outside its flex forecast's p10..p90",
                report.group_id, report.command_id, report.mean_delivered_kw,
            )  # fmt: skip

    async def _settlement_loop(self) -> None:
        """Settle each finished dispatch once its last interval is over (one named task).

        Events waiting for settlement are kept in the history file, so a restart settles what
        the previous run could not; a settlement that fails is retried twice a minute apart,
        then dropped with its error logged (it must neither retry forever nor stop the others).
        """
        history = self.history
        assert history is not None
        timeout = self.config.history.io_timeout_s
        persisted: set[str] = set()
        attempts: dict[str, int] = {}
        retry_at: dict[str, float] = {}
        try:
            async with asyncio.timeout(timeout):
                stored = await history.pending_settlements()
        except (HistoryError, TimeoutError):
            log.exception("could not read the events waiting for settlement")
            stored = {}
        for cid, pending in stored.items():
            self._to_settle.setdefault(cid, pending)
            persisted.add(cid)
        while True:
            self._settle_wake.clear()
            for cid, pending in list(self._to_settle.items()):
                if cid in persisted:
                    continue
                try:
                    async with asyncio.timeout(timeout):
                        await history.add_pending(cid, pending)
                    persisted.add(cid)
                except (HistoryError, TimeoutError):  # kept in memory; retried next round
                    log.exception("could not keep %s for settlement", cid)
            now = epoch_s(utcnow())
            due: dict[str, float] = {}
            for cid, pending in list(self._to_settle.items()):
                try:
                    event = self._event_to_settle(pending)
                except (KeyError, TypeError, ValueError) as exc:
                    log.error("dropping unreadable settlement entry %s: %s", cid, exc)
                    del self._to_settle[cid]
                    await self._drop_pending(cid)
                    continue
                when = max(self._settle_due(event), retry_at.get(cid, 0.0))
                if when > now:
                    due[cid] = when
                    continue
                try:
                    await self.settle(event)
                except Exception:  # loop boundary: one event's failure (any) must not stop others
                    attempts[cid] = attempts.get(cid, 0) + 1
                    if attempts[cid] < 3:
                        log.exception("settling %s failed; retrying in a minute", cid)
                        retry_at[cid] = due[cid] = now + 60.0
                        continue
                    log.exception("settling %s failed %d times: giving up", cid, attempts[cid])
                    await self._drop_pending(cid)
                del self._to_settle[cid]
                persisted.discard(cid)
                attempts.pop(cid, None)
                retry_at.pop(cid, None)
            wait = min(due.values(), default=now + 3600.0) - epoch_s(utcnow())
            with contextlib.suppress(TimeoutError):
                # Re-read the wall clock at least once a minute: a step of it moves what is due.
                async with asyncio.timeout(min(60.0, max(0.05, wait))):
                    await self._settle_wake.wait()

    async def _drop_pending(self, command_id: str) -> None:
        assert self.history is not None
        try:
            async with asyncio.timeout(self.config.history.io_timeout_s):
                await self.history.drop_pending(command_id)
        except (HistoryError, TimeoutError):
            log.exception("could not drop %s from the settlement queue", command_id)

    async def performance_report(self, cid: str) -> bytes:
        """The stored performance report of a settled dispatch (its JSON).

        :class:`CoreError` ``UNKNOWN_COMMAND`` when there is none (yet: the detail says when
        it is due, or that settlement is off), ``INTERNAL`` when the history cannot be read.
        """
        stored: str | None = None
        if self.history is not None:
            try:
                async with asyncio.timeout(self.config.history.io_timeout_s):
                    stored = await self.history.report(cid)
            except (HistoryError, TimeoutError) as exc:  # the caller is told
                log.exception("could not read the performance report of %s", cid)
                raise CoreError(Reason.INTERNAL, f"{type(exc).__name__}: {exc}") from exc
        if stored is None:
            if cid in self._to_settle:
                due = from_epoch(self._settle_due(self._event_to_settle(self._to_settle[cid])))
                detail = f"settlement of {cid!r} is due at {due.isoformat()}"
            elif self.history is None or not self.config.settlement.enabled:
                detail = "settlement is disabled ([history] / [settlement] enabled = false)"
            else:
                detail = f"no performance report for {cid!r}"
            raise CoreError(Reason.UNKNOWN_COMMAND, detail, command_id=cid)
        return stored.encode()

    # ------------------------------------------------------------------ control
    def stale_after_s(self, device_id: str) -> float:
        """How old a reading may be: the gateway's setting, or longer for an adapter whose
        devices report slowly by design (a 2030.5 client posts every minute or five)."""
        base = self.config.timing.stale_after_s
        adapter = self._own_schedule.get(device_id)
        if adapter is not None:
            return max(base, float(adapter.stale_after_s))
        return base

    def device_states(self, now: datetime) -> dict[str, DeviceState | None]:
        return {
            d.device_id: (
                s.fresh_state(self.stale_after_s(d.device_id), now)
                if (s := self.supervisors.get(d.device_id))
                else None
            )
            for d in self.registry.devices()
        }

    async def control_once(self) -> dispatch.Plan:
        now = utcnow()
        step = self.clock.observe(now)
        if step is not None:
            self._clock_stepped(step)
        await self._handle_refusals(now)
        states = self.device_states(now)
        deliveries = self._close_loops(now, states)
        allowance = govern_releases(now, self.plan, states, self._governors)
        compliance = self._watch_envelopes(now, states)
        corrections = {cid: loop.correction_kw for cid, loop in self._loops.items()}
        autonomous = planning_baselines(now, self._loops, self._autonomous_kw)
        turn_s = self.config.delivery.thermal_turn_s
        active = self._with_services(now, self._hold_out(self.book.active(now)), states)
        first = dispatch.plan(
            now,
            self.registry,
            states,
            active,
            autonomous,
            corrections,
            self.plan,
            turn_s,
            self.config.delivery.release_s,
            allowance,
            allocator=self.config.dispatch.allocator,
        )
        first.delivery = deliveries
        first.compliance = compliance
        await self.book.tick(now, first)
        plan = first
        after = self._with_services(now, self._hold_out(self.book.active(now)), states)
        if _in_force(after) != _in_force(active):
            # The lifecycle has just started, ended or superseded commands (or a device refused):
            # plan again so the devices never see a setpoint from a command no longer in force.
            plan = dispatch.plan(
                now,
                self.registry,
                states,
                after,
                autonomous,
                corrections,
                self.plan,
                turn_s,
                self.config.delivery.release_s,
                allowance,
                allocator=self.config.dispatch.allocator,
            )
            plan.delivery = {c: d for c, d in deliveries.items() if c in plan.requested_kw}
            plan.compliance = {c: x for c, x in compliance.items() if c in plan.envelopes}
        self._apply(plan)
        self._reap_retired()
        self._tell_telemetry(now, self.plan, plan, states)
        self.plan = plan
        await self._record_participation(now, plan)
        return plan

    def _with_services(
        self,
        now: datetime,
        active: list[dispatch.ActiveCommand],
        states: Mapping[str, DeviceState | None],
    ) -> list[dispatch.ActiveCommand]:
        """Each ``service`` in force as its schedule's setpoints now (:mod:`gateway.services`)."""
        envelopes = [
            e.command for e in self.book.open_entries() if isinstance(e.command, OperatingEnvelope)
        ]
        return self._services.expand(now, active, states, envelopes, self.registry)

    def _clock_stepped(self, step: ClockStep) -> None:
        """Elapsed time in the control state stays true; lifecycles follow the new clock, and
        every open command's next ack says so."""
        log.warning("%s", step.describe())
        self.audit.record(
            AuditKind.CLOCK_STEPPED,
            source=CORE_SOURCE,
            details={"step_s": round(step.step.total_seconds(), 3), "at": step.at.isoformat()},
        )
        self.plan.shift(step.step)
        for loop in self._loops.values():
            loop.shift(step.step)
        for watch in self._watches.values():
            watch.shift(step.step)
        for governor in self._governors.values():
            governor.shift(step.step)
        self.book.clock_stepped(step.describe())
        self._settle_wake.set()

    def _watch_envelopes(
        self, now: datetime, states: Mapping[str, DeviceState | None]
    ) -> dict[str, EnvelopeCompliance]:
        """Each envelope in force against its group's measured net power (what the last plan
        left it to hold)."""
        previous = self.plan
        in_force = {
            e.command.command_id: e.command
            for e in self.book.active(now)
            if isinstance(e.command, OperatingEnvelope)
        }
        for cid in [c for c in self._watches if c not in in_force]:
            self._envelope_ended(cid, self._watches.pop(cid), now)
        acting: dict[str, set[str]] = {}
        for device_id, setpoint in previous.setpoints.items():
            for source in {s.command_id for s in setpoint.provenance if s.kind == "envelope"}:
                acting.setdefault(source, set()).add(device_id)
        out: dict[str, EnvelopeCompliance] = {}
        for cid, command in in_force.items():
            if cid not in previous.envelopes:
                if cid in self._watches:
                    self._watches[cid].pause()  # between two of its intervals
                continue
            measured, reporting = 0.0, 0
            for device in dispatch.target_devices(self.registry, command.target):
                state = states.get(device.device_id)
                if state is not None:
                    measured += state.power_kw
                    reporting += 1
                else:
                    measured += self._autonomous_kw.get(device.device_id, 0.0)
            watch = self._watches.get(cid)
            if watch is None:
                watch = self._watches[cid] = EnvelopeWatch(
                    interval_s=self.config.delivery.compliance_interval_s
                )
                self._watched[cid] = command
            out[cid] = watch.update(
                now, previous.envelopes[cid], measured, reporting, acting.get(cid, set())
            )
        return out

    def _envelope_ended(self, cid: str, watch: EnvelopeWatch, now: datetime) -> None:
        """An envelope has ended (or was cancelled or superseded): its compliance report goes
        northbound, retained, and into the history file beside the dispatches' reports."""
        command = self._watched.pop(cid, None)
        if command is None:
            return
        report = watch.report(command, now)
        payload = report.model_dump_json().encode()
        self.publisher.performance_report(cid, payload)
        log.info(
            "envelope %s: %d of %d intervals held, worst excursion %.3f kW, %d device(s) acted",
            cid,
            report.intervals_held,
            report.intervals_total,
            report.worst_excursion_kw,
            report.devices_acted_count,
        )
        if self.history is not None and self._tasks is not None:
            self._tasks.create_task(
                self._save_report(cid, now, payload.decode()), name=f"envelope-report:{cid}"
            )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task in the core's task group once it runs (it ends with the core)."""
        if self._tasks is not None:
            return self._tasks.create_task(coro, name=name)
        return asyncio.create_task(coro, name=name)

    def _service_ended(self, report: ServiceReport) -> None:
        """A grid service has ended: its settlement goes northbound on the performance path,
        retained, and into the history file beside the dispatches' reports."""
        payload = report.model_dump_json().encode()
        self.publisher.performance_report(report.command_id, payload)
        log.info(
            "service %s settled: cost %.2f against %.2f unmanaged, saved %.2f; EV energy %s; "
            "%d envelope violation(s)",
            report.command_id,
            report.energy_cost,
            report.unmanaged_cost,
            report.cost_saved,
            "-" if report.ev_delivered_pct is None else f"{report.ev_delivered_pct:.1f} %",
            report.envelope_violations,
        )
        if self.history is not None and self._tasks is not None:
            self._tasks.create_task(
                self._save_report(report.command_id, report.generated_at, payload.decode()),
                name=f"service-report:{report.command_id}",
            )

    async def _save_report(self, cid: str, generated_at: datetime, payload: str) -> None:
        assert self.history is not None
        try:
            async with asyncio.timeout(self.config.history.io_timeout_s):
                await self.history.save_report(cid, generated_at, payload)
        except (HistoryError, TimeoutError):  # published already; a request will not find it
            log.exception("could not store the compliance report of envelope %s", cid)

    def _close_loops(
        self, now: datetime, states: Mapping[str, DeviceState | None]
    ) -> dict[str, Delivery]:
        if not self.config.delivery.closed_loop:
            self._loops.clear()
            self._governors.clear()
            return {}
        thermal = {
            d.device_id
            for d in self.registry.devices()
            if d.der_class in dispatch.SHIFTS_FROM_BASELINE
        }
        for cid in [c for c in self._profiles_at if c not in self.plan.requested_kw]:
            self._profiles.pop(cid, None)
            del self._profiles_at[cid]
        if any(c not in self._profiles_at for c in self.plan.requested_kw):
            self._profiles_wake.set()  # a dispatch has become active: read its profiles
        return close_loops(
            now,
            self.plan,
            states,
            self._baselines,
            self._loops,
            self.config.delivery.tuning(),
            thermal,
            self._governors,
            self._profiles,
        )

    async def load_loop_profiles(self, now: datetime) -> int:
        """Read the same-hour profiles of each running dispatch's thermal loads (those its
        target holds or may rotate in) for its closed loop: when the dispatch becomes active and
        hourly after, from the flex forecasts' hourly history cache (refreshed first if a
        new hour has ended), computed in a worker thread. Thermostats with recorded outdoor
        temperatures take the weather-matched rule. Returns how many dispatches were read."""
        running = {
            e.command.command_id: e.command
            for e in self.book.active(now)
            if isinstance(e.command, Dispatch) and e.command.command_id in self.plan.requested_kw
        }
        due = [
            cid
            for cid in running
            if epoch_s(now) - self._profiles_at.get(cid, -math.inf) >= LOOP_PROFILE_REFRESH_S
        ]
        if not due or self.history is None:
            return 0
        for cid in due:  # a read that fails is tried again in a few minutes, not every period
            self._profiles_at[cid] = epoch_s(now) - LOOP_PROFILE_REFRESH_S + LOOP_PROFILE_RETRY_S
        await self.refresh_flex_history(now)
        calendar = self._flex_calendar
        if calendar is None:
            return 0
        for cid in due:
            command = running[cid]
            devices = [
                d
                for d in dispatch.target_devices(self.registry, command.target)
                if d.der_class in dispatch.SHIFTS_FROM_BASELINE
            ]
            # From before the devices were held (their pre-event level anchors the profile) to
            # the end, a day at most (refreshed hourly).
            start = min(now, command.start) - timedelta(hours=2)
            end = min(command.end, now + timedelta(days=1))
            thermostats = [d for d in devices if d.der_class is DerClass.THERMOSTAT]
            temperatures = await self._temperature_records(
                thermostats, now - timedelta(days=FlexConfig().lookback_days), end
            )
            self._profiles[cid] = await asyncio.to_thread(
                loop_profiles,
                self._flex_history,
                calendar,
                start,
                end,
                [d.device_id for d in devices],
                temperatures=temperatures,
            )
            self._profiles_at[cid] = epoch_s(now)
            log.info(
                "dispatch %s: %d of %d thermal load(s) measured against their same-hour profile",
                cid,
                len(self._profiles[cid]),
                len(devices),
            )
        return len(due)

    async def _temperature_records(
        self, devices: Sequence[Device], since: datetime, until: datetime
    ) -> dict[str, Temperatures]:
        """Per device, the outdoor temperature record of the scope whose forecast covers it."""
        if not devices or self.history is None:
            return {}
        scopes = {
            d: series.scope or GATEWAY_SCOPE
            for d, series in self.weather.for_devices(devices, self.registry).items()
        }
        records: dict[str, Temperatures] = {}
        for scope in set(scopes.values()):
            async with asyncio.timeout(self.config.history.io_timeout_s):
                points = await self.history.temperatures(scope, since, until)
            record = TemperatureRecord.from_points(points)
            if record is not None:
                records[scope] = record
        return {d: records[s] for d, s in scopes.items() if s in records}

    async def _loop_profiles_loop(self) -> None:
        while True:
            try:
                await self.load_loop_profiles(utcnow())
            except Exception:  # TimeoutError included: the loops keep what they have
                log.exception("reading the closed loop's baseline profiles failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOOP_PROFILE_CHECK_S):
                    await self._profiles_wake.wait()
            self._profiles_wake.clear()

    def delegate(self, device_ids: frozenset[str]) -> None:
        """Hand ``device_ids`` to a local controller (see :attr:`delegated`)."""
        unknown = device_ids - self.supervisors.keys()
        if unknown:
            raise ValueError(f"cannot delegate unsupervised device(s) {sorted(unknown)}")
        self.delegated = device_ids

    def planned(self, device_id: str) -> DeviceCommand | None:
        """The core's current plan for one device (what it would write)."""
        return self.plan.setpoints.get(device_id)

    def _apply(self, plan: dispatch.Plan) -> None:
        deadband = self.config.timing.deadband_kw
        record = self.audit.record
        for device_id, supervisor in self.supervisors.items():
            if device_id in self.delegated:
                continue
            new = plan.setpoints.get(device_id)
            old = supervisor.desired
            if new is old or new == old:
                continue  # unchanged (the planner reuses an unchanged device's command)
            if (
                new is not None
                and old is not None
                and old.power_kw is not None
                and new.power_kw is not None
                and abs(new.power_kw - old.power_kw) < deadband
                and new.provenance == old.provenance
            ):
                continue
            supervisor.command(new)
            # Only what changed reaches here: one record per device per change, written off
            # the event loop (a fleet-wide dispatch is thousands of these at once).
            cause = new if new is not None else old
            record(
                AuditKind.DEVICE_WRITE,
                source=CORE_SOURCE,
                command_id=cause.provenance[0].command_id
                if cause is not None and cause.provenance
                else None,
                device_id=device_id,
                details={"command": new} if new is not None else {"command": None, "released": old},
            )

    def wake_control(self) -> None:
        self._wake.set()

    def _on_device_state(self, state: DeviceState) -> None:
        # Supervisors poll; an adapter whose device pushes (MQTT, OpenADR, 2030.5) hands back
        # the same reading until a new one arrives. Judge and record each reading once: a
        # repeat is neither a duplicate the device sent nor a second sample for the history.
        previous = self._last_reading.get(state.device_id)
        new = previous != state.timestamp
        self._last_reading[state.device_id] = state.timestamp
        if new:
            supervisor = self.supervisors.get(state.device_id)
            held = supervisor is None or supervisor.desired is not None
            self._baselines.observe(state.device_id, state.timestamp, state.power_kw, held=held)
            self._judge_and_record(state)
        for listener in self.state_listeners:
            listener(state)

    def _judge_and_record(self, state: DeviceState) -> None:
        if state.device_id in self._fleet_index.row:
            # What the device was told to do, the classifier learns from the commands in
            # force (``_tell_telemetry``): a frozen meter away from its setpoint is stuck.
            # Queued, classified in one vectorised batch per telemetry cycle (a batch costs
            # about what one reading does alone); arrival order and times are kept.
            self._classifier.enqueue(
                RawReading(
                    device_id=state.device_id,
                    device_time=state.timestamp,
                    received_at=utcnow(),
                    value_kw=state.power_kw,
                    # A zero while the device's own state says it must draw is stuck.
                    demand=self._classifier.demand_of(state),
                    soc_pct=state.soc_pct,
                )
            )
            if self._classifier.queued >= _QUALITY_BATCH:
                self._flush_quality()
        if self.history is not None:
            self._record_history(state)

    def _record_history(self, state: DeviceState) -> None:
        # Readings are classified in batches, so the verdict at hand is the device's latest
        # (at most one telemetry period old): the faults that matter for settlement (stuck,
        # out of bounds, skewed) persist across readings, so that is close enough.
        assert self.history is not None
        verdict = self.reading_quality.get(state.device_id)
        cls = ReadingClass.GOOD if verdict is None else ReadingClass(int(verdict.validity))
        self.history.observe(state.device_id, state.timestamp, state.power_kw, cls)

    def _on_device_result(self, command: DeviceCommand, error: AdapterError | None) -> None:
        if error is not None:
            self.audit.record(
                AuditKind.DEVICE_REFUSED,
                source=f"device:{command.device_id}",
                command_id=command.provenance[0].command_id if command.provenance else None,
                device_id=command.device_id,
                details={"command": command, "error": f"{type(error).__name__}: {error}"},
            )
            self._refusals.append(_Refusal(command, error))
            self._wake.set()

    async def _handle_refusals(self, now: datetime) -> None:
        refusals, self._refusals = self._refusals, []
        for refusal in refusals:
            for source in refusal.command.provenance:
                if source.kind not in ("dispatch", "setpoint"):
                    continue
                entry = self.book.device_refused(source.command_id, refusal.command.device_id, now)
                if entry is not None and isinstance(entry.command, DeviceSetpoint):
                    await self.book.fail(
                        source.command_id, now, Reason.DEVICE_REJECTED, str(refusal.error)
                    )

    async def _store_retention_loop(self) -> None:
        """Delete commands that ended longer ago than ``[store] retention_days``."""
        config = self.config.store
        while True:
            await asyncio.sleep(config.prune_s)
            before = utcnow() - timedelta(days=config.retention_days)
            try:
                async with asyncio.timeout(config.io_timeout_s):
                    removed = await self.store.prune(before)
            except (StoreError, TimeoutError) as exc:  # the next round tries again
                log.warning("command store: pruning failed (%s); retrying later", exc)
                continue
            if removed:
                log.info("command store: %d command(s) older than %s pruned", removed, before)

    async def _control_loop(self) -> None:
        period = self.config.timing.control_period_s
        while True:
            started, failed = time.perf_counter(), False
            try:
                await self.control_once()
            except Exception:  # the control loop must outlive any one bad cycle
                failed = True
                log.exception("control cycle failed")
            self.control_cycles.observe(time.perf_counter() - started, failed=failed)
            try:
                async with asyncio.timeout(period):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    # ------------------------------------------------------------------ telemetry
    def group_telemetry(self, now: datetime) -> list[GroupTelemetry]:
        states = self.device_states(now)
        active_by_group: dict[str, list[str]] = {}
        envelope_by_group: dict[str, EnvelopeInterval] = {}
        for entry in self.book.active(now):
            command = entry.command
            target = getattr(command, "target", None)
            if target is not None and target.group_id is not None:
                active_by_group.setdefault(target.group_id, []).append(command.command_id)
                interval = getattr(command, "interval_at", None)
                if interval is not None and (current := interval(now)) is not None:
                    envelope_by_group[target.group_id] = current
        out = []
        cycle = self._cycle
        for group_id in sorted(self.registry.groups()):
            members = self.registry.members(group_id)
            reporting = [states[d.device_id] for d in members if states[d.device_id] is not None]
            measured = sum(s.power_kw for s in reporting if s is not None)
            estimate = None
            if cycle is not None and members:
                rows = self._fleet_index.rows(
                    d.device_id for d in members if d.device_id in self._fleet_index.row
                )
                # A device enrolled since the last cycle joins the estimate at the next one.
                estimate = cycle.group(group_id, rows[rows < len(cycle.value)])
            setpoint = sum(
                (sp.power_kw or 0.0)
                for d in members
                if (sp := self.plan.setpoints.get(d.device_id)) is not None
            )
            energy = 0.0
            for device in members:
                state = states[device.device_id]
                # Only batteries hold energy the grid can have back; an EV's or a
                # thermostat's "state of charge" is headroom, not stored energy for export.
                if device.der_class is not DerClass.BATTERY:
                    continue
                if state is not None and state.soc_pct is not None:
                    margin = state.soc_pct - device.constraints.reserve_soc_pct
                    energy += max(0.0, margin) / 100.0 * device.ratings.capacity_kwh
            missing = len(members) - len(reporting)
            common = {
                "group_id": group_id,
                "timestamp": now,
                "measured_kw": round(measured, 3),
                "setpoint_kw": round(setpoint, 3),
                "devices_total": len(members),
                "energy_available_kwh": round(energy, 3),
                "active_commands": tuple(active_by_group.get(group_id, ())),
                "envelope": envelope_by_group.get(group_id),
            }
            if estimate is not None:
                telemetry = GroupTelemetry(
                    **common,
                    power_kw=round(estimate.power_kw, 3),
                    power_lower_kw=round(estimate.lower_kw, 3),
                    power_upper_kw=round(estimate.upper_kw, 3),
                    confidence=estimate.confidence,
                    devices_reporting=estimate.devices_reporting,
                    devices_missing=estimate.devices_missing,
                    devices_excluded=estimate.devices_excluded,
                    devices_estimated=estimate.devices_estimated,
                    method=estimate.method,
                    quality=estimate.quality,
                )
            else:
                # Before the first estimation cycle: a plain sum, honest about what it lacks.
                telemetry = GroupTelemetry(
                    **common,
                    power_kw=round(measured, 3),
                    devices_reporting=len(reporting),
                    devices_missing=missing,
                    quality=Quality.GOOD if missing == 0 else Quality.SUSPECT,
                )
            out.append(telemetry)
        return out

    def group_baselines(self, now: datetime) -> dict[str, float]:
        """Each group's net power without the gateway's setpoints, by group id: a member left
        alone at its measured power (its learnt baseline when it does not report), a held
        thermal load at its learnt baseline, a held battery, EV or inverter at nothing (its
        setpoint is its power). The counterfactual a ``target`` dispatch plans from
        (:func:`gateway.dispatch.group_baseline`)."""
        states = self.device_states(now)
        held = self.plan.setpoints.keys()
        return {
            group_id: round(
                dispatch.group_baseline(
                    self.registry.members(group_id), states, self._autonomous_kw, controlled=held
                ),
                3,
            )
            for group_id in sorted(self.registry.groups())
        }

    def device_telemetry(self, now: datetime) -> list[DeviceTelemetry]:
        self._flush_quality()
        out = []
        for device_id, supervisor in self.supervisors.items():
            state = supervisor.fresh_state(self.stale_after_s(device_id), now)
            last = supervisor.latest
            desired = supervisor.desired
            out.append(
                DeviceTelemetry(
                    device_id=device_id,
                    timestamp=state.timestamp if state else now,
                    available=state is not None,
                    power_kw=state.power_kw if state else (last.power_kw if last else None),
                    soc_pct=state.soc_pct if state else (last.soc_pct if last else None),
                    setpoint_kw=desired.power_kw if desired else None,
                    quality=(
                        q.to_core()
                        if state and (q := self.reading_quality.get(device_id)) is not None
                        else Quality.GOOD
                        if state
                        else Quality.STALE
                    ),
                    provenance=desired.provenance if desired else (),
                )
            )
        return out

    async def _telemetry_loop(self) -> None:
        period = self.config.timing.telemetry_period_s
        flex_due = time.monotonic() + min(self.config.flex.period_s, 2 * period)
        while True:
            await asyncio.sleep(period)
            now = utcnow()
            started, failed = time.perf_counter(), False
            try:
                self.estimate_cycle(now)
                self._track_availability(now)
            except Exception:  # loop boundary: one bad cycle must not end telemetry (or control)
                failed = True
                log.exception("telemetry estimation cycle failed")
            if time.monotonic() >= flex_due or self._flex_outdated:
                flex_due = time.monotonic() + self.config.flex.period_s
                self._flex_outdated = False
                try:
                    await self._publish_flex(now)
                except Exception:  # a forecast must never take telemetry down with it
                    failed = True
                    log.exception("flexibility forecast failed")
            try:
                groups = self.group_telemetry(now)
                self.last_group_telemetry = tuple(groups)
                for group in groups:
                    self.publisher.group_telemetry(group)
                for device in self.device_telemetry(now):
                    self.publisher.device_telemetry(device)
            except Exception:  # loop boundary: the next period publishes again
                failed = True
                log.exception("publishing telemetry failed")
            self.telemetry_cycles.observe(time.perf_counter() - started, failed=failed)
