"""What the 2030.5 server serves, kept in its own SQLite file so a restart serves the same.

A client that polled before a restart must find the same EndDevice, the same DERPrograms and
the same DERControls (same hrefs, same mRIDs, the active one still active) after it: a control
with a new mRID is a new event to a client (it would answer it again and, worse, a cancelled
control that disappeared is one whose cancellation the client never sees). So the server keeps
here, per device, its EndDevice id and every control it still lists or may still get a Response
for; per group, its DERProgram id and its DefaultDERControl (version included, as changed at
run time); and its id counters.

Blocking ``sqlite3`` calls: the server runs :meth:`Sep2ServerState.load` and
:meth:`Sep2ServerState.save` through ``asyncio.to_thread``. Rows are JSON: one per device (its
controls, a few hundred at most) and one per program.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Sep2ServerState", "StateSnapshot", "StoredDevice", "StoredProgram"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS programs (
    group_id TEXT PRIMARY KEY,
    program_id INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS end_devices (
    device_id TEXT PRIMARY KEY,
    edev_id INTEGER NOT NULL,
    body TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class StoredProgram:
    group_id: str
    program_id: int
    body: dict[str, Any]
    """The program's default (``default_base``, ``set_grad_w``, ``default_version``) and the
    configured default it was derived from (``config_base``, ``config_grad_w``)."""


@dataclass(frozen=True, slots=True)
class StoredDevice:
    device_id: str
    edev_id: int
    body: dict[str, Any]
    """``lfdi`` and ``controls``: every control the server knows for the device, oldest first,
    each with ``listed`` (still in its DERControlLists) or not (kept for late Responses)."""


@dataclass(slots=True)
class StateSnapshot:
    """Everything :meth:`Sep2ServerState.load` returns, or the part a save changes."""

    counters: dict[str, int] = field(default_factory=dict)
    programs: dict[str, StoredProgram] = field(default_factory=dict)
    devices: dict[str, StoredDevice] = field(default_factory=dict)


class Sep2ServerState:
    """The SQLite file behind one server (``[sep2_server] state_file``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def load(self) -> StateSnapshot:
        """All that was saved (empty for a new file). Rows that do not decode are skipped and
        counted in the returned snapshot's ``counters['unreadable']`` (never raised: a damaged
        row must not keep the server from starting)."""
        snapshot = StateSnapshot()
        unreadable = 0
        db = self._connect()
        try:
            for name, value in db.execute("SELECT name, value FROM counters"):
                snapshot.counters[str(name)] = int(value)
            for group_id, program_id, body in db.execute(
                "SELECT group_id, program_id, body FROM programs"
            ):
                try:
                    decoded = json.loads(body)
                except ValueError:
                    unreadable += 1
                    continue
                if isinstance(decoded, dict):
                    snapshot.programs[group_id] = StoredProgram(group_id, int(program_id), decoded)
                else:
                    unreadable += 1
            for device_id, edev_id, body in db.execute(
                "SELECT device_id, edev_id, body FROM end_devices"
            ):
                try:
                    decoded = json.loads(body)
                except ValueError:
                    unreadable += 1
                    continue
                if isinstance(decoded, dict):
                    snapshot.devices[device_id] = StoredDevice(device_id, int(edev_id), decoded)
                else:
                    unreadable += 1
        finally:
            db.close()
        snapshot.counters["unreadable"] = unreadable
        return snapshot

    def save(self, changes: StateSnapshot) -> None:
        """Write the counters, programs and devices in ``changes`` (others stay), atomically."""
        db = self._connect()
        try:
            with db:
                db.executemany(
                    "INSERT INTO counters (name, value) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    changes.counters.items(),
                )
                db.executemany(
                    "INSERT INTO programs (group_id, program_id, body) VALUES (?, ?, ?) "
                    "ON CONFLICT(group_id) DO UPDATE SET program_id = excluded.program_id, "
                    "body = excluded.body",
                    [
                        (p.group_id, p.program_id, json.dumps(p.body, separators=(",", ":")))
                        for p in changes.programs.values()
                    ],
                )
                db.executemany(
                    "INSERT INTO end_devices (device_id, edev_id, body) VALUES (?, ?, ?) "
                    "ON CONFLICT(device_id) DO UPDATE SET edev_id = excluded.edev_id, "
                    "body = excluded.body",
                    [
                        (d.device_id, d.edev_id, json.dumps(d.body, separators=(",", ":")))
                        for d in changes.devices.values()
                    ],
                )
        finally:
            db.close()
