"""The command book: validation, idempotency, supersession and the ack lifecycle.

Every inbound command ends up here exactly once per command id. The book decides whether it is
accepted, keeps it in SQLite, moves it through its lifecycle as time passes, and hands every ack
to a publisher. It does no MQTT and no device I/O, so it is tested without either. Every command
handed to it (with its sender's identity), every refusal and every lifecycle step goes to the
audit trail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from gateway.audit import CORE_SOURCE, NO_AUDIT, AuditKind, AuditTrail
from gateway.clock import STEP_DETAIL
from gateway.dispatch import (
    GENERATION_ONLY,
    ActiveCommand,
    Plan,
    allocations_changed,
    target_devices,
)
from gateway.errors import CoreError
from gateway.registry import Registry
from gateway.store import CommandStore, StoreError, digest
from unified.model import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATES,
    Ack,
    AckState,
    Allocation,
    Cancel,
    Command,
    DeviceSetpoint,
    Dispatch,
    DispatchMode,
    Reason,
    ScheduledCommand,
    Target,
)

log = logging.getLogger(__name__)

AckSink = Callable[[Ack, object | None], None]
"""Receives every ack to publish, with the requester's reply context (opaque here)."""

_RATING_TOLERANCE_KW = 1e-6


class CommandRejected(CoreError):
    """A command the book will not take (invalid, conflicting, unknown target, ...)."""


_CONFLICT_DETAIL = "devices held by higher-priority or earlier command(s)"
_PASSING_DETAILS = (_CONFLICT_DETAIL, STEP_DETAIL)


@dataclass(slots=True)
class Entry:
    command: ScheduledCommand
    seq: int
    ack: Ack
    reply: object | None = None
    excluded: set[str] = field(default_factory=set)
    last_published_allocations: tuple[Allocation, ...] = ()
    last_shortfall: float | None = None

    @property
    def state(self) -> AckState:
        return self.ack.state


class CommandBook:
    def __init__(
        self,
        store: CommandStore,
        registry: Registry,
        sink: AckSink,
        *,
        allocation_tolerance_kw: float = 0.5,
        progress_interval_s: float = 5.0,
        audit: AuditTrail = NO_AUDIT,
    ) -> None:
        self._store = store
        self._audit = audit
        self._registry = registry
        self._sink = sink
        self._tolerance = allocation_tolerance_kw
        self._progress_interval_s = progress_interval_s
        self._open: dict[str, Entry] = {}
        self._clock_note: str | None = None

    # ------------------------------------------------------------------ start-up
    async def load(self, now: datetime) -> int:
        """Take back the commands that were open when the gateway stopped."""
        for stored in await self._store.open_commands():
            command = stored.command
            if isinstance(command, Cancel):  # a cancel is never left open; defensive only
                continue
            self._open[command.command_id] = Entry(command, stored.seq, stored.ack)
        log.info("resumed %d open command(s) from the store", len(self._open))
        await self.tick(now, Plan())
        return len(self._open)

    # ------------------------------------------------------------------ inbound
    async def submit(
        self,
        command: Command,
        now: datetime,
        reply: object | None = None,
        *,
        source: str | None = None,
    ) -> Ack:
        """Handle one command. A redelivery (same id, same content) gets the same ack back.

        ``source`` says who sent it, for the audit trail (``mqtt:{topic}``, ``openadr-vtn:{id}``).
        """
        cid = command.command_id
        stored = await self._store.get(cid)
        if stored is not None:
            if stored.digest != digest(command):
                refused = CommandRejected(
                    Reason.DUPLICATE_ID_CONFLICT,
                    f"command_id {cid!r} was already used for a different command",
                )
                self._audit.record(
                    AuditKind.COMMAND_REFUSED,
                    source=source,
                    command_id=cid,
                    details={"reason": refused.reason, "detail": refused.detail},
                )
                raise refused
            entry = self._open.get(cid)
            ack = entry.ack if entry is not None else stored.ack
            self._audit.record(
                AuditKind.COMMAND_REDELIVERED,
                source=source,
                command_id=cid,
                details={"state": ack.state},
            )
            self._sink(ack, reply)
            return ack

        self._audit.record(
            AuditKind.COMMAND_RECEIVED, source=source, command_id=cid, details={"command": command}
        )
        self._sink(self._ack(cid, AckState.RECEIVED, now), reply)
        try:
            return await self._take(command, now, reply)
        except StoreError as exc:
            # Its ack says received: it must not stay there. Nothing of it was applied.
            failed = self._ack(
                cid,
                AckState.FAILED,
                now,
                Reason.INTERNAL,
                f"not applied: the command store could not record it ({exc})",
            )
            self._audit_step(failed)
            self._sink(failed, reply)
            raise

    async def _take(self, command: Command, now: datetime, reply: object | None) -> Ack:
        try:
            await self._validate(command, now)
        except CommandRejected as exc:
            ack = self._ack(command.command_id, AckState.REJECTED, now, exc.reason, exc.detail)
            await self._store.insert(command, ack)
            self._audit_step(ack)
            self._sink(ack, reply)
            log.info("rejected %s: %s", command.command_id, exc)
            return ack

        ack = self._ack(command.command_id, AckState.ACCEPTED, now)
        seq = await self._store.insert(command, ack)
        self._audit_step(ack)
        self._sink(ack, reply)
        if isinstance(command, Cancel):
            await self._cancel(command, now, reply)
            done = self._ack(command.command_id, AckState.COMPLETED, now)
            await self._store.update_ack(done)
            self._audit_step(done)
            self._sink(done, reply)
            return done
        self._open[command.command_id] = Entry(command, seq, ack, reply)
        return ack

    async def _validate(self, command: Command, now: datetime) -> None:
        if isinstance(command, Cancel):
            if command.cancels in self._open:
                return
            stored = await self._store.get(command.cancels)
            if stored is None:
                raise CommandRejected(
                    Reason.UNKNOWN_COMMAND, f"no command {command.cancels!r} to cancel"
                )
            raise CommandRejected(
                Reason.NOT_CANCELLABLE,
                f"command {command.cancels!r} is already {stored.ack.state.value}",
            )
        if command.end <= now:
            raise CommandRejected(
                Reason.ALREADY_ENDED,
                f"window ended at {command.end.isoformat()}, before it was received",
            )
        if isinstance(command, DeviceSetpoint):
            self._validate_setpoint(command)
            return
        self._validate_target(command.target)
        if isinstance(command, Dispatch):
            self._validate_dispatch(command)

    def _validate_target(self, target: Target) -> None:
        if target.group_id is not None:
            if self._registry.group(target.group_id) is None:
                known = ", ".join(sorted(self._registry.groups())[:20])
                raise CommandRejected(
                    Reason.UNKNOWN_GROUP, f"unknown group {target.group_id!r} (known: {known})"
                )
            if not self._registry.members(target.group_id):
                raise CommandRejected(Reason.NO_DEVICES, f"group {target.group_id!r} is empty")
            return
        unknown = [d for d in target.device_ids or () if d not in self._registry]
        if unknown:
            raise CommandRejected(Reason.UNKNOWN_DEVICE, f"unknown device(s): {', '.join(unknown)}")

    def _validate_setpoint(self, command: DeviceSetpoint) -> None:
        if command.device_id not in self._registry:
            raise CommandRejected(Reason.UNKNOWN_DEVICE, f"unknown device {command.device_id!r}")
        device = self._registry.device(command.device_id)
        ratings = device.ratings
        if device.der_class in GENERATION_ONLY and command.kw > 0:
            raise CommandRejected(
                Reason.BEYOND_RATINGS,
                f"{command.device_id} is {device.der_class.value} generation: it cannot import "
                f"{command.kw} kW",
            )
        if command.kw < -ratings.max_discharge_kw - _RATING_TOLERANCE_KW:
            raise CommandRejected(
                Reason.BEYOND_RATINGS,
                f"{command.kw} kW exceeds the rated discharge of {command.device_id} "
                f"({ratings.max_discharge_kw} kW)",
            )
        if command.kw > ratings.max_charge_kw + _RATING_TOLERANCE_KW:
            raise CommandRejected(
                Reason.BEYOND_RATINGS,
                f"{command.kw} kW exceeds the rated charge of {command.device_id} "
                f"({ratings.max_charge_kw} kW)",
            )

    def _validate_dispatch(self, command: Dispatch) -> None:
        if command.mode is DispatchMode.TARGET:
            # An absolute net power: what it asks of the devices depends on the baseline at
            # each moment, so it cannot be held against their ratings here. A target out of
            # reach shows as a shortfall on the ack.
            return
        devices = target_devices(self._registry, command.target)
        if command.kw < 0:
            rated = sum(d.ratings.max_discharge_kw for d in devices)
            direction = "discharge"
        else:
            rated = sum(
                d.ratings.max_charge_kw for d in devices if d.der_class not in GENERATION_ONLY
            )
            direction = "charge"
        if abs(command.kw) > rated + _RATING_TOLERANCE_KW:
            raise CommandRejected(
                Reason.BEYOND_RATINGS,
                f"{command.kw} kW exceeds the rated {direction} of the {len(devices)} targeted "
                f"device(s) ({rated:g} kW)",
            )

    async def _cancel(self, cancel: Cancel, now: datetime, reply: object | None) -> None:
        entry = self._open[cancel.cancels]
        await self._transition(entry, AckState.CANCELLED, now, detail=f"by {cancel.command_id}")

    # ------------------------------------------------------------------ time passing
    def active(self, now: datetime) -> list[ActiveCommand]:
        """Commands that should be in force at ``now`` (the caller plans with these)."""
        return [
            ActiveCommand(e.command, e.seq, frozenset(e.excluded))
            for e in self._open.values()
            if e.command.start <= now < e.command.end and e.state not in TERMINAL_STATES
        ]

    def clock_stepped(self, note: str) -> None:
        """The wall clock has just stepped: the next :meth:`tick` says so on every open
        command's ack (a transition it causes, or a progress ack), once."""
        self._clock_note = note

    async def tick(self, now: datetime, plan: Plan) -> None:
        """Move commands through their lifecycle and publish what changed."""
        note, self._clock_note = self._clock_note, None
        for entry in sorted(self._open.values(), key=lambda e: e.seq):
            command = entry.command
            if entry.state is AckState.ACCEPTED and command.end <= now:
                await self._transition(
                    entry,
                    AckState.FAILED,
                    now,
                    Reason.ALREADY_ENDED,
                    note or "its window passed while the gateway was not running",
                )
            elif entry.state is AckState.ACCEPTED and command.start <= now:
                await self._supersede_older(entry, now)
                await self._transition(entry, AckState.ACTIVE, now, detail=note, plan=plan)
            elif entry.state is AckState.ACTIVE and command.end <= now:
                await self._transition(entry, AckState.COMPLETED, now, detail=note, plan=plan)
            elif entry.state is AckState.ACTIVE:
                await self._report_progress(entry, now, plan, note)
            elif note is not None:
                # Accepted and still ahead: its start has moved as seen from here.
                await self._publish(
                    entry, entry.ack.model_copy(update={"timestamp": now, "detail": note})
                )
        for command_id in [c for c, e in self._open.items() if e.state in TERMINAL_STATES]:
            del self._open[command_id]

    async def _supersede_older(self, newer: Entry, now: datetime) -> None:
        """Within one program a newer command replaces older ones over the same devices."""
        new_devices = self._device_set(newer.command)
        for entry in list(self._open.values()):
            older = entry.command
            if (
                entry is newer
                or entry.seq > newer.seq
                or entry.state not in (AckState.ACCEPTED, AckState.ACTIVE)
                or older.program != newer.command.program
                or older.type != newer.command.type
                or older.start >= newer.command.end
                or older.end <= newer.command.start
                or not (self._device_set(older) & new_devices)
            ):
                continue
            await self._transition(
                entry, AckState.SUPERSEDED, now, detail=f"by {newer.command.command_id}"
            )

    def _device_set(self, command: ScheduledCommand) -> set[str]:
        if isinstance(command, DeviceSetpoint):
            return {command.device_id}
        return {d.device_id for d in target_devices(self._registry, command.target)}

    async def _report_progress(
        self, entry: Entry, now: datetime, plan: Plan, note: str | None = None
    ) -> None:
        allocations = plan.allocations.get(entry.command.command_id, ())
        shortfall = plan.shortfall_kw.get(entry.command.command_id)
        changed = allocations_changed(
            entry.last_published_allocations, allocations, self._tolerance
        ) or (
            shortfall is not None
            and (
                entry.last_shortfall is None
                or abs(shortfall - entry.last_shortfall) > self._tolerance
            )
        )
        delivery = plan.delivery.get(entry.command.command_id)
        before = entry.ack.delivery
        if delivery is not None and (
            before is None
            or abs(delivery.delivered_kw - before.delivered_kw) > self._tolerance
            or abs(delivery.committed_kw - before.committed_kw) > self._tolerance
        ):
            changed = True
        devices_changed = {a.device_id for a in allocations} != {
            a.device_id for a in entry.last_published_allocations
        }
        updated = self._with_plan(entry.ack, now, plan)
        if note is not None:
            updated = updated.model_copy(update={"detail": note})
        # A ramp or a drifting SoC changes allocations every cycle: report those at a bounded
        # rate, but a device joining or leaving the command at once.
        due = (now - entry.ack.timestamp).total_seconds() >= self._progress_interval_s
        # A conflict that starts or ends is said at once too, and so is delivery falling short
        # (or recovering).
        was_short = before is not None and before.short
        said_at_once = delivery is not None and delivery.short != was_short
        compliance = plan.compliance.get(entry.command.command_id)
        held = entry.ack.compliance
        if compliance is not None and (
            held is None
            or compliance.seconds_outside != held.seconds_outside
            or abs(compliance.measured_kw - held.measured_kw) > self._tolerance
        ):
            changed = True
        # Leaving (or coming back inside) an envelope is said at once.
        was_outside = held is not None and held.outside
        said_at_once = said_at_once or (
            compliance is not None and (held is None or compliance.outside != was_outside)
        )
        if (
            (changed and (due or devices_changed))
            or updated.detail != entry.ack.detail
            or said_at_once
        ):
            await self._publish(entry, updated)

    def device_refused(self, command_id: str, device_id: str, now: datetime) -> Entry | None:
        """A device refused its share: allocate around it from now on."""
        entry = self._open.get(command_id)
        if entry is None:
            return None
        entry.excluded.add(device_id)
        return entry

    async def fail(self, command_id: str, now: datetime, reason: Reason, detail: str) -> None:
        entry = self._open.get(command_id)
        if entry is not None and entry.state not in TERMINAL_STATES:
            await self._transition(entry, AckState.FAILED, now, reason, detail)
            del self._open[command_id]

    def open_entries(self) -> list[Entry]:
        return list(self._open.values())

    # ------------------------------------------------------------------ helpers
    async def _transition(
        self,
        entry: Entry,
        state: AckState,
        now: datetime,
        reason: Reason | None = None,
        detail: str | None = None,
        plan: Plan | None = None,
    ) -> None:
        if state not in ALLOWED_TRANSITIONS.get(entry.state, frozenset()):
            log.error(
                "refusing transition %s -> %s for %s", entry.state, state, entry.command.command_id
            )
            return
        ack = self._ack(entry.command.command_id, state, now, reason, detail)
        if plan is not None:
            ack = self._with_plan(ack, now, plan)
        elif entry.ack.allocations or entry.ack.compliance is not None:
            ack = ack.model_copy(
                update={
                    "allocations": entry.ack.allocations,
                    "shortfall_kw": entry.ack.shortfall_kw,
                    "delivery": entry.ack.delivery,
                    "compliance": entry.ack.compliance,
                }
            )
        await self._publish(entry, ack)
        self._audit_step(ack)
        log.info(
            "command %s: %s%s",
            entry.command.command_id,
            state.value,
            f" ({detail})" if detail else "",
        )

    def _with_plan(self, ack: Ack, now: datetime, plan: Plan) -> Ack:
        allocations = plan.allocations.get(ack.command_id)
        if allocations is None and ack.state is AckState.ACTIVE:
            # In force but allocated to nobody (every device refused or dropped out): say so.
            allocations = ()
        if allocations is None:
            # Ended commands are no longer planned: their last allocation is what they did.
            entry = self._open.get(ack.command_id)
            if entry is None or not (entry.ack.allocations or entry.ack.compliance):
                return ack
            return ack.model_copy(
                update={
                    "allocations": entry.ack.allocations,
                    "shortfall_kw": entry.ack.shortfall_kw,
                    "delivery": entry.ack.delivery,
                    "compliance": entry.ack.compliance,
                }
            )
        # Only blockers still in force: a plan made before this cycle's lifecycle may name a
        # command this one has just superseded, or one that has ended.
        conflicts = [
            c
            for c in plan.conflicts.get(ack.command_id, ())
            if (e := self._open.get(c)) is not None and e.state not in TERMINAL_STATES
        ]
        detail = ack.detail
        if conflicts:
            detail = f"{_CONFLICT_DETAIL}: {', '.join(conflicts)}"
        elif detail is not None and detail.startswith(_PASSING_DETAILS):
            detail = None  # the conflict is over, or the clock step has been said
        return ack.model_copy(
            update={
                "timestamp": now,
                "allocations": allocations,
                "shortfall_kw": plan.shortfall_kw.get(ack.command_id),
                "delivery": plan.delivery.get(ack.command_id, ack.delivery),
                "compliance": plan.compliance.get(ack.command_id, ack.compliance),
                "detail": detail,
            }
        )

    def _audit_step(self, ack: Ack) -> None:
        details: dict[str, object] = {}
        if ack.reason is not None:
            details["reason"] = ack.reason
        if ack.detail is not None:
            details["detail"] = ack.detail
        self._audit.record(
            AuditKind.lifecycle(ack.state),
            source=CORE_SOURCE,
            command_id=ack.command_id,
            details=details or None,
        )

    async def _publish(self, entry: Entry, ack: Ack) -> None:
        entry.ack = ack
        entry.last_published_allocations = ack.allocations
        entry.last_shortfall = ack.shortfall_kw
        await self._store.update_ack(ack)
        self._sink(ack, entry.reply)

    @staticmethod
    def _ack(
        command_id: str,
        state: AckState,
        now: datetime,
        reason: Reason | None = None,
        detail: str | None = None,
    ) -> Ack:
        return Ack(command_id=command_id, state=state, timestamp=now, reason=reason, detail=detail)
