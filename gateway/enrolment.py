"""The durable registry: enrolment, retirement and topology patches, kept in SQLite.

The registry's tables live in the command store's file (their own connection; WAL lets both
write). The config file only seeds them; the rule that merges the two at start is:

* a device the API has touched (enrolled, updated, moved or retired through the API) belongs to
  the API: its stored record wins over the config file, and a device retired through the API
  stays retired even while the config file still lists it;
* every other config device is defined by the config file: added when new, refreshed when its
  entry changed, retired when it is no longer listed.

Every applied request raises the registry version by one, is stored with its ack (a redelivery
gets the same ack and changes nothing) and is persisted before it is applied to the running
core, so a crash in between is repaired by the merge at the next start.

Regrouping needs nothing of the commands in force: group membership is resolved at each
control and telemetry cycle (:mod:`gateway.registry`), so an envelope on the old feeder and one
on the new feeder are both held over their new members at the next cycle. A retired device
leaves the registry at once: the next control cycle re-allocates its share of every dispatch to
the remaining members (the same rule as for a device that drops out), its setpoint is released,
and only then is its adapter stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.devices import DeviceAdapter
from gateway.store import SqliteStore, StoreError, store_errors
from unified.model import Device, Group, Reason, TopologyLevel
from unified.registry import (
    ApproveDevices,
    ClientRates,
    DeviceEnrolment,
    DiscoverDevices,
    EnrolDevices,
    GetRegistry,
    GroupDefaults,
    PendingEnrolment,
    ProgramEnrolment,
    RegistryAck,
    RegistryChange,
    RegistryEntry,
    RegistryRequest,
    RegistrySnapshot,
    RetireDevices,
    SetDefaults,
    SetEligibility,
    SetRates,
    TopologyPatch,
    UpdateDevices,
)

if TYPE_CHECKING:
    from gateway.core import Gateway

log = logging.getLogger(__name__)

__all__ = ["AdapterFactory", "Enrolment", "RegistryError", "RegistryStore", "Scanner"]

Scanner = Callable[[DiscoverDevices], Awaitable[list[PendingEnrolment]]]
"""Probes endpoints for devices (the composition root's SunSpec scan): what it finds."""

FAIRNESS_WINDOW = timedelta(days=30)
"""How far back the hours a device was called count for who is called first."""

AdapterFactory = Callable[[Device, Mapping[str, Any]], DeviceAdapter]
"""Builds the adapter of a device enrolled through the API from its ``reach`` settings (the
composition root knows every protocol); raises ``ValueError`` when they do not fit."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_devices (
    device_id   TEXT PRIMARY KEY,
    entry       TEXT NOT NULL,
    origin      TEXT NOT NULL,
    retired_at  TEXT,
    version     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_programs (
    device_id    TEXT NOT NULL,
    program_id   TEXT NOT NULL,
    enrolled_at  TEXT NOT NULL,
    eligibility  TEXT NOT NULL,
    PRIMARY KEY (device_id, program_id)
);
CREATE TABLE IF NOT EXISTS registry_requests (
    request_id  TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    ack         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_pending (
    device_id  TEXT PRIMARY KEY,
    pending    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS participation (
    device_id   TEXT NOT NULL,
    command_id  TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    ended_at    TEXT,
    PRIMARY KEY (device_id, command_id)
);
"""


class RegistryError(StoreError):
    """The registry's tables could not be read or written."""


@dataclass(frozen=True, slots=True)
class Participation:
    device_id: str
    command_id: str
    started_at: datetime
    ended_at: datetime | None


class RegistryStore(SqliteStore):
    schema = _SCHEMA
    name = "registry store"
    error = RegistryError

    @store_errors(RegistryError)
    async def load(self) -> tuple[int, dict[str, RegistryEntry], dict[str, str]]:
        """The version, the enrolled devices and the retired ones (id → origin)."""
        async with self.db.execute("SELECT value FROM registry_meta WHERE key = 'version'") as c:
            row = await c.fetchone()
        version = int(str(row[0])) if row else 0
        entries: dict[str, RegistryEntry] = {}
        retired: dict[str, str] = {}
        async with self.db.execute(
            "SELECT device_id, entry, origin, retired_at FROM registry_devices"
        ) as c:
            async for device_id, entry, origin, retired_at in c:
                if retired_at is None:
                    entries[str(device_id)] = RegistryEntry.model_validate_json(str(entry))
                else:
                    retired[str(device_id)] = str(origin)
        return version, entries, retired

    @store_errors(RegistryError)
    async def load_settings(self) -> tuple[dict[str, GroupDefaults], ClientRates | None]:
        """Group defaults and client rates set through the API (a row that no longer reads is
        skipped, with a warning)."""
        defaults: dict[str, GroupDefaults] = {}
        rates: ClientRates | None = None
        async with self.db.execute(
            "SELECT key, value FROM registry_meta WHERE key LIKE 'defaults:%' OR key = 'rates'"
        ) as c:
            async for key, value in c:
                try:
                    if key == "rates":
                        rates = ClientRates.model_validate_json(str(value))
                    else:
                        found = GroupDefaults.model_validate_json(str(value))
                        defaults[found.group_id] = found
                except ValueError:
                    log.warning("registry store: unreadable setting %s skipped", key)
        return defaults, rates

    @store_errors(RegistryError)
    async def load_pending(self) -> list[PendingEnrolment]:
        """Devices that announced themselves and wait for approval, oldest sighting first
        (a row that no longer reads is dropped, with a warning)."""
        found: list[PendingEnrolment] = []
        bad: list[tuple[str]] = []
        async with self.db.execute("SELECT device_id, pending FROM registry_pending") as c:
            async for device_id, body in c:
                try:
                    found.append(PendingEnrolment.model_validate_json(str(body)))
                except ValueError:
                    bad.append((str(device_id),))
        if bad:
            log.warning("registry store: %d unreadable pending enrolment(s) dropped", len(bad))
            await self.db.executemany("DELETE FROM registry_pending WHERE device_id = ?", bad)
            await self.db.commit()
        return sorted(found, key=lambda p: p.seen_at)

    @store_errors(RegistryError)
    async def save_pending(self, pending: PendingEnrolment) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO registry_pending (device_id, pending) VALUES (?, ?)",
            (pending.device_id, pending.model_dump_json()),
        )
        await self.db.commit()

    @store_errors(RegistryError)
    async def drop_pending(self, device_ids: Iterable[str]) -> None:
        await self.db.executemany(
            "DELETE FROM registry_pending WHERE device_id = ?", [(d,) for d in device_ids]
        )
        await self.db.commit()

    @store_errors(RegistryError)
    async def request(self, request_id: str) -> tuple[str, RegistryAck] | None:
        async with self.db.execute(
            "SELECT digest, ack FROM registry_requests WHERE request_id = ?", (request_id,)
        ) as c:
            row = await c.fetchone()
        return None if row is None else (str(row[0]), RegistryAck.model_validate_json(str(row[1])))

    @store_errors(RegistryError)
    async def commit(
        self,
        version: int,
        upserts: Sequence[RegistryEntry],
        retired: Sequence[tuple[str, str, datetime]] = (),
        answered: tuple[str, str, RegistryAck] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """One transaction: the new version, changed entries (and their programs), retired
        devices ``(id, origin, when)``, changed settings (key → JSON) and the request's ack."""
        db = self.db
        try:
            await db.executemany(
                "INSERT INTO registry_meta (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [("version", str(version)), *(settings or {}).items()],
            )
            await db.executemany(
                "INSERT INTO registry_devices (device_id, entry, origin, retired_at, version)"
                " VALUES (?, ?, ?, NULL, ?) ON CONFLICT(device_id) DO UPDATE SET"
                " entry = excluded.entry, origin = excluded.origin, retired_at = NULL,"
                " version = excluded.version",
                [(e.device.device_id, e.model_dump_json(), e.origin, version) for e in upserts],
            )
            changed = [(e.device.device_id,) for e in upserts] + [(r[0],) for r in retired]
            await db.executemany("DELETE FROM registry_programs WHERE device_id = ?", changed)
            # An enrolled (approved) or retired device no longer waits for approval.
            await db.executemany("DELETE FROM registry_pending WHERE device_id = ?", changed)
            await db.executemany(
                "INSERT INTO registry_programs (device_id, program_id, enrolled_at, eligibility)"
                " VALUES (?, ?, ?, ?)",
                [
                    (e.device.device_id, p.program_id, p.enrolled_at.isoformat(), p.eligibility)
                    for e in upserts
                    for p in e.programs
                ],
            )
            await db.executemany(
                "UPDATE registry_devices SET retired_at = ?, origin = ?, version = ?"
                " WHERE device_id = ?",
                [(when.isoformat(), origin, version, did) for did, origin, when in retired],
            )
            if answered is not None:
                request_id, dig, ack = answered
                await db.execute(
                    "INSERT OR REPLACE INTO registry_requests (request_id, digest, ack)"
                    " VALUES (?, ?, ?)",
                    (request_id, dig, ack.model_dump_json()),
                )
            await db.commit()
        except BaseException:
            await db.rollback()
            raise

    @store_errors(RegistryError)
    async def answer(self, request_id: str, dig: str, ack: RegistryAck) -> None:
        """A refused request's ack, so its redelivery gets the same answer."""
        await self.db.execute(
            "INSERT OR REPLACE INTO registry_requests (request_id, digest, ack) VALUES (?, ?, ?)",
            (request_id, dig, ack.model_dump_json()),
        )
        await self.db.commit()

    @store_errors(RegistryError)
    async def record_participation(
        self,
        started: Iterable[tuple[str, str]],
        ended: Iterable[tuple[str, str]],
        now: datetime,
    ) -> None:
        """Devices that began or stopped serving a command (``(device_id, command_id)``)."""
        at = now.isoformat()
        # A command resumed after a restart reopens its row (the start is kept).
        await self.db.executemany(
            "INSERT INTO participation (device_id, command_id, started_at) VALUES (?, ?, ?)"
            " ON CONFLICT(device_id, command_id) DO UPDATE SET ended_at = NULL",
            [(d, c, at) for d, c in started],
        )
        await self.db.executemany(
            "UPDATE participation SET ended_at = ? WHERE device_id = ? AND command_id = ?",
            [(at, d, c) for d, c in ended],
        )
        await self.db.commit()

    @store_errors(RegistryError)
    async def close_participation(self, now: datetime) -> None:
        """At start: rows left open by a stop end now (those still in force reopen at the
        first control cycle), so a crash does not count as hours called for ever."""
        await self.db.execute(
            "UPDATE participation SET ended_at = ? WHERE ended_at IS NULL", (now.isoformat(),)
        )
        await self.db.commit()

    @store_errors(RegistryError)
    async def called_seconds(self, since: datetime, now: datetime) -> dict[str, float]:
        """Seconds each device served commands that started since ``since`` (open ones up to
        ``now``)."""
        async with self.db.execute(
            "SELECT device_id, SUM((julianday(COALESCE(ended_at, ?)) - julianday(started_at))"
            " * 86400.0) FROM participation WHERE started_at >= ? GROUP BY device_id",
            (now.isoformat(), since.isoformat()),
        ) as c:
            rows = await c.fetchall()
        return {str(d): max(0.0, float(s or 0.0)) for d, s in rows}

    @store_errors(RegistryError)
    async def participation(self, device_id: str) -> list[Participation]:
        async with self.db.execute(
            "SELECT command_id, started_at, ended_at FROM participation WHERE device_id = ?"
            " ORDER BY started_at",
            (device_id,),
        ) as c:
            rows = await c.fetchall()
        return [
            Participation(
                device_id,
                str(cid),
                datetime.fromisoformat(str(s)),
                None if e is None else datetime.fromisoformat(str(e)),
            )
            for cid, s, e in rows
        ]


def request_digest(request: RegistryRequest) -> str:
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


class _Refused(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def in_group(device: Device, group_id: str, explicit: Mapping[str, Group]) -> bool:
    """Whether ``device`` is in a configured group or an implicit ``level:name`` one."""
    group = explicit.get(group_id)
    if group is not None:
        return group.contains(device)
    level, _, name = group_id.partition(":")
    try:
        return device.location.at(TopologyLevel(level)) == name
    except ValueError:
        return False


def _owned(entry: RegistryEntry) -> dict[str, Any]:
    """Who owns a device the API has changed: the API, unless its endpoint enrolled it (then
    the endpoint still reaches it and the API's changes are kept over the endpoint's)."""
    if entry.origin == "endpoint":
        return {"origin": "endpoint", "managed": True}
    return {"origin": "api"}


def _plain(device: Device) -> Device:
    return Device.model_validate(device.model_dump(exclude={"reach"}))


class Enrolment:
    """The registry's durable side and the API that changes it, applied to the running core."""

    def __init__(
        self,
        core: Gateway,
        path: Path,
        factory: AdapterFactory | None,
        seeded: Sequence[Device],
    ) -> None:
        self.core = core
        self.store = RegistryStore(path)
        self._factory = factory
        self._seeded = {d.device_id: d for d in seeded}
        self._rules = {r.program_id: r for r in core.config.programs}
        self._groups = {g.group_id: g for g in core.config.groups}
        self.version = 0
        self.entries: dict[str, RegistryEntry] = {}
        self._retired_by_api: set[str] = set()
        self._lock = asyncio.Lock()
        self.group_defaults: dict[str, GroupDefaults] = {}
        """Default controls per group set through the API (``defaults``), kept in the file."""
        self.rates: ClientRates | None = None
        """The client poll and post rates set through the API (``rates``)."""
        self.serves_defaults: Callable[[str], str | None] | None = None
        """Set by the composition root when an endpoint serves default controls (the 2030.5
        server): None when ``group_id`` can take one, else why not. Unset: refused."""
        self.settings_listeners: list[Callable[[GroupDefaults | ClientRates], None]] = []
        """Told each applied ``defaults`` / ``rates`` (and the stored ones at start)."""
        self._settings: dict[str, str] = {}
        self.pending: dict[str, PendingEnrolment] = {}
        """Devices that announced themselves (an MQTT birth, a SunSpec scan), by id; kept in
        the registry's file so an approval after a restart finds them (a retained birth is
        announced again anyway; a scan's finding would not be)."""

    MAX_PENDING = 10_000

    # ------------------------------------------------------------------ endpoints
    def from_endpoint(self, device: Device, now: datetime) -> tuple[Device, RegistryEntry | None]:
        """An endpoint enrols a device it reaches (an OCPP charger at boot, an OEM cloud's
        resource): the device to register, and its registry entry when that is new or
        changed (to be stored with :meth:`record_endpoint`). Its ratings are the endpoint's;
        where the API changed the device, its location, programs, rate class and constraints
        are the registry's. ``ValueError`` when the API retired it."""
        did = device.device_id
        if did in self._retired_by_api:
            raise ValueError(f"device {did!r} was retired through the registry API")
        stored = self.entries.get(did)
        if stored is not None and stored.origin != "endpoint":
            return device, None  # a config or API device's id: the core refuses the duplicate
        if stored is not None and stored.managed:
            kept = ("location", "programs", "rate_class", "constraints")
            device = device.model_copy(update={f: getattr(stored.device, f) for f in kept})
        if stored is not None and _plain(stored.device) == device:
            return device, None
        entry = RegistryEntry(
            device=DeviceEnrolment.model_validate(device.model_dump()),
            programs=self._programs(device, stored, now),
            origin="endpoint",
            managed=stored is not None and stored.managed,
            enrolled_at=now if stored is None else stored.enrolled_at,
            updated_at=now,
        )
        return device, entry

    async def record_endpoint(self, entry: RegistryEntry, now: datetime) -> RegistryChange:
        """Store an endpoint's device (a new registry version), after it was registered."""
        did = entry.device.device_id
        async with self._lock:
            new = did not in self.entries
            self.entries[did] = entry
            self._sync_eligibility()
            self.version += 1
            await self.store.commit(self.version, [entry])
            return RegistryChange(
                version=self.version,
                request_id="endpoint",
                op="endpoint",
                timestamp=now,
                enrolled=(did,) if new else (),
                updated=() if new else (did,),
            )

    # ------------------------------------------------------------------ programs
    def _rule_says(self, device: Device, program_id: str) -> str | None:
        """Why the program's rule refuses the device, or None when it passes (or has none)."""
        rule = self._rules.get(program_id)
        if rule is None:
            return None
        if rule.der_classes and device.der_class not in rule.der_classes:
            return f"der_class {device.der_class.value!r} is not one the program takes"
        if rule.rate_classes and device.rate_class not in rule.rate_classes:
            return f"rate class {device.rate_class!r} is not one the program takes"
        if rule.groups and not any(in_group(device, g, self._groups) for g in rule.groups):
            return "its location is outside the program's groups"
        return None

    def _programs(
        self, device: Device, before: RegistryEntry | None, now: datetime
    ) -> tuple[ProgramEnrolment, ...]:
        """Each program the device lists: the date it joined (kept across updates) and its
        eligibility by the program's rule, then by the customer system's decision if the rule
        asks for one (kept while the rule still passes)."""
        known = {p.program_id: p for p in before.programs} if before is not None else {}
        out = []
        for pid in device.programs:
            prev = known.get(pid)
            since = prev.enrolled_at if prev is not None else now
            refused = self._rule_says(device, pid)
            rule = self._rules.get(pid)
            if refused is not None:
                out.append(
                    ProgramEnrolment(
                        program_id=pid, enrolled_at=since, eligibility="ineligible", reason=refused
                    )
                )
            elif rule is not None and rule.customer_check:
                if prev is not None and prev.decided_by == "customer_system":
                    out.append(prev)
                else:
                    out.append(
                        ProgramEnrolment(
                            program_id=pid,
                            enrolled_at=since,
                            eligibility="pending",
                            reason="awaiting the customer system",
                        )
                    )
            else:
                out.append(ProgramEnrolment(program_id=pid, enrolled_at=since))
        return tuple(out)

    def _sync_eligibility(self) -> None:
        """Tell the registry which devices may serve each program that has a rule."""
        eligible: dict[str, set[str]] = {pid: set() for pid in self._rules}
        for did, entry in self.entries.items():
            for p in entry.programs:
                if p.eligibility == "eligible" and p.program_id in eligible:
                    eligible[p.program_id].add(did)
        self.core.registry.set_eligible({k: frozenset(v) for k, v in eligible.items()})

    def propose(self, pending: PendingEnrolment) -> bool:
        """A device announced itself; True when it is new (or announced something new)."""
        did = pending.device_id
        if did in self.entries or did in self.core.registry:
            return False
        before = self.pending.get(did)
        if before is not None and before.model_copy(update={"seen_at": pending.seen_at}) == (
            pending
        ):
            return False
        if before is None and len(self.pending) >= self.MAX_PENDING:
            return False
        self.pending[did] = pending
        return True

    # ------------------------------------------------------------------ start
    async def load(self, now: datetime) -> RegistryChange | None:
        """Merge the stored registry with the config's devices (the rule in the module doc) and
        bring the core's registry in line; returns what the merge changed, if anything."""
        version, stored, retired = await self.store.load()
        self.version = version
        await self.store.close_participation(now)
        called = await self.store.called_seconds(now - FAIRNESS_WINDOW, now)
        self.core.registry.called_s.update(called)
        self._retired_by_api = {d for d, origin in retired.items() if origin == "api"}
        upserts: list[RegistryEntry] = []
        gone: list[tuple[str, str, datetime]] = []
        enrolled: list[str] = []
        updated: list[str] = []
        for device_id, device in self._seeded.items():
            entry = stored.get(device_id)
            if retired.get(device_id) == "api":
                self.core.retire_device(device_id)
                continue
            if entry is not None and entry.origin == "api":
                if _plain(entry.device) != device:
                    self.core.update_device(_plain(entry.device))
                self.entries[device_id] = entry
                continue
            fresh = RegistryEntry(
                device=DeviceEnrolment.model_validate(device.model_dump()),
                programs=self._programs(device, entry, now),
                origin="config",
                enrolled_at=entry.enrolled_at if entry is not None else now,
                updated_at=now,
            )
            if entry is None or _plain(entry.device) != device:
                upserts.append(fresh)
                (updated if entry is not None else enrolled).append(device_id)
            else:
                fresh = entry
            self.entries[device_id] = fresh
        enrolled_before: list[tuple[Device, DeviceAdapter]] = []
        for device_id, entry in stored.items():
            if device_id in self._seeded:
                continue
            if entry.origin == "config":  # no longer in the config file
                gone.append((device_id, "config", now))
                continue
            if entry.origin == "endpoint":  # registered again when its endpoint enrols it
                self.entries[device_id] = entry
                continue
            try:
                adapter = self._adapter(entry.device)
            except _Refused as exc:
                log.error("enrolled device %s cannot be reached: %s", device_id, exc.detail)
                continue
            enrolled_before.append((_plain(entry.device), adapter))
            self.entries[device_id] = entry
        self.core.add_devices(enrolled_before)
        self.group_defaults, self.rates = await self.store.load_settings()
        stale: list[str] = []
        for pending in await self.store.load_pending():
            if pending.device_id in self.entries or pending.device_id in self.core.registry:
                stale.append(pending.device_id)  # enrolled since (by config or an approval)
            elif len(self.pending) < self.MAX_PENDING:
                self.pending[pending.device_id] = pending
        await self.store.drop_pending(stale)
        self._sync_eligibility()
        if not upserts and not gone:
            return None
        self.version += 1
        await self.store.commit(self.version, upserts, gone)
        return RegistryChange(
            version=self.version,
            request_id="config",
            op="config",
            timestamp=now,
            enrolled=tuple(enrolled),
            updated=tuple(updated),
            retired=tuple(d for d, _, _ in gone),
        )

    async def reseed(
        self, devices: Sequence[tuple[Device, DeviceAdapter | None]], now: datetime
    ) -> tuple[RegistryChange | None, list[str]]:
        """A reloaded config file's devices, merged by the same rule as at start, into the
        running core: new config devices are enrolled (``adapter`` is how to reach them),
        changed ones updated, ones no longer listed retired; what the API owns is untouched.
        Returns the change and what could not be applied without a restart."""
        upserts: list[RegistryEntry] = []
        gone: list[tuple[str, str, datetime]] = []
        enrolled: list[tuple[Device, DeviceAdapter]] = []
        updated: list[Device] = []
        notes: list[str] = []
        listed = {d.device_id for d, _ in devices}
        for device, adapter in devices:
            did = device.device_id
            entry = self.entries.get(did)
            if (entry is not None and entry.origin != "config") or did in self._retired_by_api:
                continue  # the API (or the device's endpoint) owns it
            if entry is None:
                if did in self.core.registry or did in self.core.supervisors:
                    notes.append(f"device {did!r}: already enrolled another way (or retiring)")
                    continue
                if adapter is None:
                    notes.append(f"device {did!r}: its adapter's endpoint needs a restart")
                    continue
                enrolled.append((device, adapter))
            elif _plain(entry.device) == device:
                continue
            elif device.adapter != entry.device.adapter:
                notes.append(f"device {did!r}: a new adapter needs a restart")
                continue
            else:
                updated.append(device)
            upserts.append(
                RegistryEntry(
                    device=DeviceEnrolment.model_validate(device.model_dump()),
                    programs=self._programs(device, entry, now),
                    origin="config",
                    enrolled_at=entry.enrolled_at if entry is not None else now,
                    updated_at=now,
                )
            )
        gone = [
            (did, "config", now)
            for did, entry in self.entries.items()
            if entry.origin == "config" and did not in listed
        ]
        self._seeded = {d.device_id: d for d, _ in devices}
        if not upserts and not gone:
            return None, notes
        self.version += 1
        await self.store.commit(self.version, upserts, gone)
        for entry in upserts:
            self.entries[entry.device.device_id] = entry
        self.core.add_devices(enrolled)
        self.core.update_devices(updated)
        for did, _, _ in gone:
            del self.entries[did]
            self.core.retire_device(did)
        self._sync_eligibility()
        change = RegistryChange(
            version=self.version,
            request_id="config",
            op="config",
            timestamp=now,
            enrolled=tuple(d.device_id for d, _ in enrolled),
            updated=tuple(d.device_id for d in updated),
            retired=tuple(d for d, _, _ in gone),
        )
        return change, notes

    def _adapter(self, device: DeviceEnrolment) -> DeviceAdapter:
        if self._factory is None:
            raise _Refused(Reason.ADAPTER_INVALID, "this gateway enrols no devices at run time")
        try:
            return self._factory(_plain(device), device.reach)
        except ValueError as exc:
            raise _Refused(
                Reason.ADAPTER_INVALID, f"device {device.device_id!r}: {exc}"[:1000]
            ) from None

    # ------------------------------------------------------------------ the API
    def snapshot(self, now: datetime) -> RegistrySnapshot:
        return RegistrySnapshot(
            version=self.version,
            timestamp=now,
            devices=tuple(self.entries[d] for d in sorted(self.entries)),
            pending=tuple(self.pending[d] for d in sorted(self.pending)),
            defaults=tuple(self.group_defaults[g] for g in sorted(self.group_defaults)),
            rates=self.rates,
        )

    def announce_settings(self) -> None:
        """Tell the settings listeners what is stored (at start, once they are listening)."""
        for defaults in self.group_defaults.values():
            self._tell(defaults)
        if self.rates is not None:
            self._tell(self.rates)

    def _tell(self, item: GroupDefaults | ClientRates) -> None:
        for listener in self.settings_listeners:
            try:
                listener(item)
            except Exception:  # an endpoint's failure must not undo an applied request
                log.exception("applying %s failed", type(item).__name__)

    async def handle(
        self, request: RegistryRequest, now: datetime
    ) -> tuple[RegistryAck, RegistryChange | None]:
        """Apply one request whole, or refuse it whole; a redelivery gets its first ack."""
        async with self._lock:  # one version at a time (endpoint enrolments also raise it)
            return await self._handle(request, now)

    async def _handle(
        self, request: RegistryRequest, now: datetime
    ) -> tuple[RegistryAck, RegistryChange | None]:
        dig = request_digest(request)
        prior = await self.store.request(request.request_id)
        if prior is not None:
            if prior[0] == dig:
                return prior[1], None
            return self._ack(
                request,
                now,
                Reason.DUPLICATE_ID_CONFLICT,
                f"request_id {request.request_id!r} was used for a different request",
            ), None
        if isinstance(request, GetRegistry | DiscoverDevices):
            return self._ack(request, now), None
        if request.expected_version is not None and request.expected_version != self.version:
            ack = self._ack(
                request,
                now,
                Reason.VERSION_CONFLICT,
                f"the registry is at version {self.version}, not {request.expected_version}",
            )
            await self.store.answer(request.request_id, dig, ack)
            return ack, None
        try:
            change, upserts, gone, apply = self._plan(request, now)
        except _Refused as exc:
            ack = self._ack(request, now, exc.reason, exc.detail)
            await self.store.answer(request.request_id, dig, ack)
            return ack, None
        self.version += 1
        change = change.model_copy(update={"version": self.version})
        devices = (*change.enrolled, *change.updated, *change.retired, *change.moved)
        ack = self._ack(request, now, devices=tuple(dict.fromkeys(devices)))
        settings, self._settings = self._settings, {}
        try:
            await self.store.commit(
                self.version, upserts, gone, (request.request_id, dig, ack), settings
            )
        except BaseException:
            self.version -= 1
            raise
        apply()
        self._sync_eligibility()
        return ack, change

    async def discovered(
        self, request: DiscoverDevices, found: Sequence[PendingEnrolment], now: datetime
    ) -> RegistryAck:
        """The answer to a scan: what it found (already enrolled devices left out), kept so
        that a redelivered scan gets the same answer without probing again."""
        ids = tuple(p.device_id for p in found)
        ack = self._ack(request, now, devices=ids).model_copy(
            update={"detail": f"{len(ids)} device(s) found; approve them to enrol"}
        )
        await self.store.answer(request.request_id, request_digest(request), ack)
        return ack

    async def answered(self, request: RegistryRequest) -> RegistryAck | None:
        """The ack a request already got (a redelivery), if any."""
        prior = await self.store.request(request.request_id)
        return None if prior is None else prior[1]

    def _ack(
        self,
        request: RegistryRequest,
        now: datetime,
        reason: Reason | None = None,
        detail: str | None = None,
        devices: tuple[str, ...] = (),
    ) -> RegistryAck:
        return RegistryAck(
            request_id=request.request_id,
            state="applied" if reason is None else "rejected",
            version=self.version,
            timestamp=now,
            devices=devices,
            reason=reason,
            detail=detail,
        )

    def _known(self, device_id: str) -> RegistryEntry:
        entry = self.entries.get(device_id)
        if entry is None:
            if device_id in self.core.registry:
                raise _Refused(
                    Reason.UNKNOWN_DEVICE,
                    f"device {device_id!r} was enrolled by its endpoint (an OCPP charger, an "
                    "OEM cloud's resource), not in the durable registry: change it there",
                )
            raise _Refused(Reason.UNKNOWN_DEVICE, f"device {device_id!r} is not enrolled")
        return entry

    def _plan(
        self, request: RegistryRequest, now: datetime
    ) -> tuple[
        RegistryChange,
        list[RegistryEntry],
        list[tuple[str, str, datetime]],
        Callable[[], None],
    ]:
        """Check everything first; the returned ``apply`` changes the core and cannot fail."""
        base = {"version": 0, "request_id": request.request_id, "timestamp": now}
        if isinstance(request, EnrolDevices):
            return self._plan_enrol(request, now, base)
        if isinstance(request, ApproveDevices):
            devices = []
            for approval in request.devices:
                pending = self.pending.get(approval.device_id)
                if pending is None:
                    raise _Refused(
                        Reason.UNKNOWN_DEVICE,
                        f"device {approval.device_id!r} has no pending enrolment",
                    )
                devices.append(
                    DeviceEnrolment(
                        device_id=pending.device_id,
                        der_class=pending.der_class,
                        adapter=pending.adapter,
                        ratings=pending.ratings,
                        location=approval.location,
                        programs=approval.programs,
                        rate_class=approval.rate_class,
                        constraints=approval.constraints,
                        reach=pending.reach,
                    )
                )
            enrol = EnrolDevices(op="enrol", request_id=request.request_id, devices=tuple(devices))
            change, upserts, gone, apply = self._plan_enrol(enrol, now, base)
            return change.model_copy(update={"op": "approve"}), upserts, gone, apply
        if isinstance(request, UpdateDevices):
            return self._plan_update(request, now, base)
        if isinstance(request, SetEligibility):
            return self._plan_eligibility(request, now, base)
        if isinstance(request, SetDefaults | SetRates):
            return self._plan_settings(request, base)
        if isinstance(request, RetireDevices):
            ids = tuple(dict.fromkeys(request.device_ids))
            for device_id in ids:
                self._known(device_id)
            gone = [(d, "api", now) for d in ids]

            def retire() -> None:
                for device_id in ids:
                    del self.entries[device_id]
                    self._retired_by_api.add(device_id)
                    if device_id in self.core.registry:  # an endpoint's may not be back yet
                        self.core.retire_device(device_id)

            return RegistryChange(op="retire", retired=ids, **base), [], gone, retire
        assert isinstance(request, TopologyPatch)
        return self._plan_topology(request, now, base)

    def _plan_settings(
        self, request: SetDefaults | SetRates, base: dict[str, Any]
    ) -> tuple[
        RegistryChange,
        list[RegistryEntry],
        list[tuple[str, str, datetime]],
        Callable[[], None],
    ]:
        self._settings = {}
        served = self.serves_defaults
        if isinstance(request, SetDefaults):
            new = request.defaults
            gid = new.group_id
            if self.core.registry.group(gid) is None:
                raise _Refused(Reason.UNKNOWN_GROUP, f"unknown group {gid!r}")
            why = "no endpoint of this gateway serves default controls" if served is None else (
                served(gid)
            )
            if why is not None:
                raise _Refused(Reason.UNKNOWN_GROUP, f"group {gid!r}: {why}")
            settings = {f"defaults:{gid}": new.model_dump_json()}

            def set_defaults() -> None:
                self.group_defaults[gid] = new
                self._tell(new)

            change = RegistryChange(op="defaults", defaults=new, **base)
            self._settings = settings
            return change, [], [], set_defaults
        if served is None:
            raise _Refused(
                Reason.UNKNOWN_GROUP, "no endpoint of this gateway has clients that poll"
            )
        given = request.rates.model_dump(exclude_none=True)
        rates = ClientRates.model_validate(
            {**(self.rates.model_dump() if self.rates else {}), **given}
        )

        def set_rates() -> None:
            self.rates = rates
            self._tell(rates)

        self._settings = {"rates": rates.model_dump_json()}
        return RegistryChange(op="rates", rates=rates, **base), [], [], set_rates

    def _plan_enrol(
        self, request: EnrolDevices, now: datetime, base: dict[str, Any]
    ) -> tuple[
        RegistryChange,
        list[RegistryEntry],
        list[tuple[str, str, datetime]],
        Callable[[], None],
    ]:
        seen: set[str] = set()
        adapters: list[tuple[DeviceEnrolment, DeviceAdapter]] = []
        for device in request.devices:
            did = device.device_id
            if did in seen or did in self.entries or did in self.core.registry:
                raise _Refused(Reason.ALREADY_ENROLLED, f"device {did!r} is already enrolled")
            if did in self.core.supervisors:
                raise _Refused(
                    Reason.ALREADY_ENROLLED, f"device {did!r} is still being retired: try later"
                )
            seen.add(did)
            adapters.append((device, self._adapter(device)))
        upserts = [
            RegistryEntry(
                device=device,
                programs=self._programs(device, None, now),
                origin="api",
                enrolled_at=now,
                updated_at=now,
            )
            for device, _ in adapters
        ]

        def enrol() -> None:
            for entry in upserts:
                self.entries[entry.device.device_id] = entry
                self.pending.pop(entry.device.device_id, None)
                self._retired_by_api.discard(entry.device.device_id)
            self.core.add_devices([(_plain(device), adapter) for device, adapter in adapters])

        ids = tuple(d.device_id for d, _ in adapters)
        return RegistryChange(op="enrol", enrolled=ids, **base), upserts, [], enrol

    def _plan_update(
        self, request: UpdateDevices, now: datetime, base: dict[str, Any]
    ) -> tuple[
        RegistryChange,
        list[RegistryEntry],
        list[tuple[str, str, datetime]],
        Callable[[], None],
    ]:
        upserts: list[RegistryEntry] = []
        for device in request.devices:
            before = self._known(device.device_id)
            old = before.device
            if device.adapter != old.adapter or (
                before.origin == "api" and device.reach != old.reach
            ):
                raise _Refused(
                    Reason.ADAPTER_INVALID,
                    f"device {device.device_id!r}: how a device is reached cannot be updated;"
                    " retire it and enrol it again",
                )
            reach = device.reach if before.origin == "api" else old.reach
            # An endpoint's device: its endpoint says what it can do.
            ratings = old.ratings if before.origin == "endpoint" else device.ratings
            upserts.append(
                before.model_copy(
                    update={
                        "device": device.model_copy(update={"reach": reach, "ratings": ratings}),
                        "programs": self._programs(device, before, now),
                        **_owned(before),
                        "updated_at": now,
                    }
                )
            )
        return (
            RegistryChange(op="update", updated=tuple(e.device.device_id for e in upserts), **base),
            upserts,
            [],
            self._replacer(upserts),
        )

    def _plan_topology(
        self, request: TopologyPatch, now: datetime, base: dict[str, Any]
    ) -> tuple[
        RegistryChange,
        list[RegistryEntry],
        list[tuple[str, str, datetime]],
        Callable[[], None],
    ]:
        located: dict[str, DeviceEnrolment] = {}

        def current(device_id: str) -> DeviceEnrolment:
            return located.get(device_id) or self._known(device_id).device

        for move in request.section_moves:
            members = [
                e.device
                for e in self.entries.values()
                if e.device.location.feeder_section == move.feeder_section
            ]
            if not members:
                raise _Refused(
                    Reason.UNKNOWN_GROUP,
                    f"no enrolled device is on feeder section {move.feeder_section!r}",
                )
            for device in members:
                location = current(device.device_id).location.model_copy(
                    update={"feeder": move.feeder, "substation": move.substation}
                )
                located[device.device_id] = current(device.device_id).model_copy(
                    update={"location": location}
                )
        for dmove in request.moves:
            located[dmove.device_id] = current(dmove.device_id).model_copy(
                update={"location": dmove.location}
            )
        upserts = [
            self.entries[d].model_copy(
                update={
                    "device": dev,
                    "programs": self._programs(dev, self.entries[d], now),
                    **_owned(self.entries[d]),
                    "updated_at": now,
                }
            )
            for d, dev in located.items()
        ]
        change = RegistryChange(op="topology", moved=tuple(located), **base)
        return change, upserts, [], self._replacer(upserts)

    def _plan_eligibility(
        self, request: SetEligibility, now: datetime, base: dict[str, Any]
    ) -> tuple[
        RegistryChange,
        list[RegistryEntry],
        list[tuple[str, str, datetime]],
        Callable[[], None],
    ]:
        changed: dict[str, RegistryEntry] = {}
        for decision in request.decisions:
            entry = changed.get(decision.device_id) or self._known(decision.device_id)
            programs = list(entry.programs)
            at = next(
                (i for i, p in enumerate(programs) if p.program_id == decision.program_id), None
            )
            if at is None:
                raise _Refused(
                    Reason.UNKNOWN_DEVICE,
                    f"device {decision.device_id!r} is not enrolled in {decision.program_id!r}",
                )
            refused = self._rule_says(_plain(entry.device), decision.program_id)
            if refused is not None and decision.eligibility == "eligible":
                raise _Refused(
                    Reason.NOT_ELIGIBLE,
                    f"device {decision.device_id!r} fails the rule of "
                    f"{decision.program_id!r}: {refused}",
                )
            programs[at] = programs[at].model_copy(
                update={
                    "eligibility": decision.eligibility,
                    "decided_by": "customer_system",
                    "reason": decision.reason,
                }
            )
            changed[decision.device_id] = entry.model_copy(
                update={"programs": tuple(programs), "updated_at": now}
            )
        upserts = list(changed.values())

        def decide() -> None:
            for entry in upserts:
                self.entries[entry.device.device_id] = entry

        change = RegistryChange(op="eligibility", updated=tuple(changed), **base)
        return change, upserts, [], decide

    def _replacer(self, upserts: Sequence[RegistryEntry]) -> Callable[[], None]:
        def replace() -> None:
            for entry in upserts:
                self.entries[entry.device.device_id] = entry
            # An endpoint's device that has not come back since a restart takes the change
            # when its endpoint enrols it again (:meth:`from_endpoint`).
            present = [e for e in upserts if e.device.device_id in self.core.registry]
            self.core.update_devices([_plain(entry.device) for entry in present])

        return replace
