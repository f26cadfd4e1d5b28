"""Run ``service`` commands: keep each one's schedule solved, and hand the planner its setpoints.

Each control cycle the core passes the commands in force through :meth:`ServiceRunner.expand`:
a :class:`unified.model.GridService` is replaced by one :class:`unified.model.DeviceSetpoint`
per device for the current step of its schedule, named after the service (so every device's
provenance says which service set it) and ordered after every other command (``seq`` offset),
so a dispatch of equal or higher priority takes the devices and hours it covers; every envelope
still applies after. The schedule is re-solved off the event loop (``asyncio.to_thread``) when
there is none yet, when a step has passed since it was made, or when prices have changed; until
the new one lands the old one is used (a service with no schedule yet sets nothing, and its
devices run on their own).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from gateway.dispatch import ActiveCommand
from gateway.registry import Registry
from gateway.services.feeds import FeedBook
from gateway.services.horizon import group_problem, setpoints_at
from gateway.services.prices import PriceBook
from gateway.services.schedule import Schedule, ScheduleError, solve_schedule
from gateway.services.settlement import ServiceLedger
from unified.model import (
    DeviceSetpoint,
    DeviceState,
    EnvelopeInterval,
    GridService,
    OperatingEnvelope,
    ServiceMode,
    Target,
    utcnow,
)
from unified.services import ServiceReport

log = logging.getLogger(__name__)

SERVICE_SEQ_OFFSET = 1_000_000_000
"""Added to a service's setpoints' ``seq``: between equal priorities, every other command first."""


@dataclass
class _Run:
    schedule: Schedule | None = None
    start: datetime | None = None
    prices_version: int = -1
    task: asyncio.Task[None] | None = None
    problem_error: str | None = None
    solved: int = 0
    triggered: bool = False
    """feed_trigger: responding now."""


@dataclass
class ServiceRunner:
    prices: PriceBook
    on_solved: Callable[[], None] = lambda: None
    on_report: Callable[[ServiceReport], None] = lambda report: None
    """A service has ended (its window, a cancel, a supersession): its settlement."""
    feeds: FeedBook = field(default_factory=FeedBook)
    spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]] = (
        lambda coro, name: asyncio.create_task(coro, name=name)
    )
    """Where solve tasks run: the core's task group (so they end with it)."""
    runs: dict[str, _Run] = field(default_factory=dict)
    ledgers: dict[str, ServiceLedger] = field(default_factory=dict)
    prices_version: int = 0

    def prices_changed(self) -> None:
        self.prices_version += 1

    def expand(
        self,
        now: datetime,
        active: Sequence[ActiveCommand],
        states: Mapping[str, DeviceState | None],
        envelopes: Sequence[OperatingEnvelope],
        registry: Registry,
    ) -> list[ActiveCommand]:
        out: list[ActiveCommand] = []
        live: set[str] = set()
        for entry in active:
            command = entry.command
            if not isinstance(command, GridService):
                out.append(entry)
                continue
            live.add(command.command_id)
            run = self.runs.setdefault(command.command_id, _Run())
            ledger = self.ledgers.setdefault(command.command_id, ServiceLedger(command))
            ledger.observe(now, states, self._price_for(command), envelopes, registry)
            if command.mode is ServiceMode.AGGREGATOR_LIMIT:
                out += [
                    ActiveCommand(envelope, SERVICE_SEQ_OFFSET + entry.seq)
                    for envelope in _device_caps(command, now, registry)
                    if envelope.target.device_ids is not None
                    and envelope.target.device_ids[0] not in entry.excluded
                ]
                continue
            if command.mode is ServiceMode.FEED_TRIGGER:
                out += [
                    ActiveCommand(setpoint, SERVICE_SEQ_OFFSET + entry.seq)
                    for setpoint in self._feed_response(command, run, now, registry)
                    if setpoint.device_id not in entry.excluded
                ]
                continue
            step_s = float(command.step_s)
            aligned = _align(now, step_s)
            if run.task is None and (
                run.start is None
                or run.start != aligned
                or run.prices_version != self.prices_version
            ):
                run.task = self.spawn(
                    self._solve(
                        registry, command, run, aligned, dict(states), list(envelopes)
                    ),
                    f"service-{command.command_id}",
                )
            if run.schedule is None or run.start is None:
                continue
            k = int((now - run.start).total_seconds() // step_s)
            if not 0 <= k < run.schedule.setpoints_kw.shape[1]:
                continue
            for setpoint in setpoints_at(
                run.schedule,
                k,
                command_id=command.command_id,
                start=run.start,
                step_s=step_s,
                program=command.program,
                priority=command.priority,
            ):
                if setpoint.device_id not in entry.excluded:
                    out.append(ActiveCommand(setpoint, SERVICE_SEQ_OFFSET + entry.seq))
        for command_id in [c for c in self.runs if c not in live]:
            run = self.runs.pop(command_id)
            if run.task is not None:
                run.task.cancel()
        for command_id in [c for c in self.ledgers if c not in live]:
            ledger = self.ledgers.pop(command_id)
            try:
                self.on_report(ledger.report(utcnow()))
            except Exception:  # a report must not end the control loop
                log.exception("service %s: its settlement could not be reported", command_id)
        return out

    def _feed_response(
        self, command: GridService, run: _Run, now: datetime, registry: Registry
    ) -> list[DeviceSetpoint]:
        """A ``feed_trigger`` service: respond while its feed is past the threshold; release
        once it is back past the threshold by the hysteresis, or has no fresh value."""
        assert command.feed is not None
        assert command.threshold is not None
        value = self.feeds.fresh(command.feed, now)
        was = run.triggered
        if value is None:
            run.triggered = False
        elif command.trigger == "above":
            if value.value > command.threshold:
                run.triggered = True
            elif value.value < command.threshold - command.hysteresis:
                run.triggered = False
        elif value.value < command.threshold:
            run.triggered = True
        elif value.value > command.threshold + command.hysteresis:
            run.triggered = False
        if run.triggered != was:
            log.info(
                "service %s: feed %s %s -> %s",
                command.command_id,
                command.feed,
                "stale or missing" if value is None else f"{value.value:g}",
                "responding" if run.triggered else "released",
            )
        if not run.triggered or command.target.group_id is None:
            return []
        out: list[DeviceSetpoint] = []
        for device in registry.members(command.target.group_id):
            if device.der_class.value == "battery" and command.response != "pause_ev":
                kw = -device.ratings.max_discharge_kw
            elif device.der_class.value == "evse" and command.response != "discharge":
                kw = 0.0
            else:
                continue
            out.append(
                DeviceSetpoint(
                    command_id=command.command_id,
                    program=command.program,
                    priority=command.priority,
                    device_id=device.device_id,
                    kw=kw,
                    start=now,
                    duration_s=float(command.step_s),
                )
            )
        return out

    def _price_for(self, command: GridService) -> Callable[[datetime], tuple[float, float]]:
        scopes = [command.target.group_id or ""]

        def price(when: datetime) -> tuple[float, float]:
            imp, exp = self.prices.series(scopes, when.timestamp() - 0.5, 1.0, 1)
            return float(imp[0]), float(exp[0])

        return price

    async def _solve(
        self,
        registry: Registry,
        command: GridService,
        run: _Run,
        start: datetime,
        states: dict[str, DeviceState | None],
        envelopes: list[OperatingEnvelope],
    ) -> None:
        version = self.prices_version
        try:
            solved, batteries, ev_need = await asyncio.to_thread(
                _solve, registry, self.prices, command, start, states, envelopes
            )
            ledger = self.ledgers.get(command.command_id)
            if ledger is not None:
                ledger.record_plan(solved, start, float(command.step_s), batteries, ev_need)
            schedule: Schedule | None = solved
        except ScheduleError as exc:
            if run.problem_error != str(exc):
                log.warning("service %s cannot be planned: %s", command.command_id, exc)
            run.problem_error = str(exc)
            schedule = None
        except Exception:  # a solver failure must not end the control loop's task group
            log.exception("service %s: the schedule could not be solved", command.command_id)
            schedule = None
        finally:
            run.task = None
        run.schedule, run.start, run.prices_version = schedule, start, version
        run.solved += 1
        if schedule is not None:
            run.problem_error = None
            log.info(
                "service %s planned %d devices over %d steps: cost %.2f (unmanaged %.2f)",
                command.command_id,
                len(schedule.device_ids),
                schedule.setpoints_kw.shape[1],
                schedule.cost,
                schedule.unmanaged_cost,
            )
        self.on_solved()


def _device_caps(
    command: GridService, now: datetime, registry: Registry
) -> list[OperatingEnvelope]:
    """An ``aggregator_limit`` service: one envelope per device of its group, for this step,
    so every setpoint the device is given (a dispatch's, another service's) stays within the
    caps, and a device left alone is given them as standing limits."""
    if command.target.group_id is None:
        return []
    interval = EnvelopeInterval(
        start=now,
        end=now + timedelta(seconds=float(command.step_s)),
        import_limit_kw=command.device_import_limit_kw,
        export_limit_kw=command.device_export_limit_kw,
    )
    out = []
    for device in registry.members(command.target.group_id):
        cid = f"{command.command_id}.{device.device_id}"
        if len(cid) > 128:  # an Identifier's length: keep it unique and valid
            cid = f"{command.command_id[:100]}.{hashlib.sha1(cid.encode()).hexdigest()[:16]}"
        out.append(
            OperatingEnvelope(
                command_id=cid,
                program=command.program,
                priority=command.priority,
                target=Target(device_ids=(device.device_id,)),
                intervals=(interval,),
            )
        )
    return out


def _align(now: datetime, step_s: float) -> datetime:
    ts = math.floor(now.timestamp() / step_s) * step_s
    return datetime.fromtimestamp(ts, UTC)


def _solve(
    registry: Registry,
    book: PriceBook,
    command: GridService,
    start: datetime,
    states: Mapping[str, DeviceState | None],
    envelopes: Sequence[OperatingEnvelope],
) -> tuple[Schedule, list[str], dict[str, float]]:
    group_id = command.target.group_id
    if group_id is None:
        raise ScheduleError("a service targets a group")
    step_s = float(command.step_s)
    end = min(command.end.timestamp(), start.timestamp() + command.horizon_s)
    steps = max(1, math.ceil((end - start.timestamp()) / step_s))
    imp, exp = book.series([group_id], start.timestamp(), step_s, steps)
    priced = int(np.argmin(np.isfinite(imp))) if not np.isfinite(imp).all() else steps
    if priced == 0:
        raise ScheduleError(f"no price schedule covers {group_id} now")
    imp, exp = imp[:priced], exp[:priced]
    members = registry.members(group_id)
    scheduled_classes = {
        ServiceMode.EV_COST: {"evse"},
    }.get(command.mode)
    plan_states = {
        d.device_id: states.get(d.device_id)
        for d in members
        if scheduled_classes is None or d.der_class.value in scheduled_classes
    }
    problem = group_problem(
        registry,
        group_id,
        plan_states,
        start=start,
        step_s=step_s,
        prices=imp,
        export_prices=exp,
        envelopes=envelopes,
        peak_threshold_kw=command.peak_threshold_kw
        if command.mode is ServiceMode.PEAK_SHAVE
        else None,
        peak_price_per_kw=command.peak_price_per_kw,
    )
    scheduled = {b.device_id for b in problem.batteries} | {e.device_id for e in problem.evs}

    def other_load(group_key: str) -> float:
        """What a group's unscheduled members draw now, held over the horizon."""
        group_key = group_key.split("#", maxsplit=1)[0]
        if registry.group(group_key) is None:
            return 0.0
        return sum(
            s.power_kw
            for d in registry.members(group_key)
            if d.device_id not in scheduled and (s := states.get(d.device_id)) is not None
        )

    groups = [
        replace(g, baseline_kw=np.full(priced, other_load(g.group_id))) for g in problem.groups
    ]
    return (
        solve_schedule(replace(problem, groups=groups)),
        [b.device_id for b in problem.batteries],
        {e.device_id: e.energy_needed_kwh for e in problem.evs},
    )
