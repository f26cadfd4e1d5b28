"""Durable command store (SQLite through aiosqlite, so the event loop never blocks on disk).

A command is written before its ack is published, and its latest ack is written before the ack
goes out, so after a restart the gateway republishes exactly what Grid DERMS last saw and carries
on with the commands that were still open.

The latest ack of a dispatch lists an allocation per device (about 27 KB of JSON for 210
devices), rewritten on every lifecycle step: acks are kept zlib-compressed (:func:`pack`, about
5 KB for the same ack, byte for byte the same JSON when read back; rows written as text by an
earlier version are still read). Commands that ended longer ago than ``[store] retention_days``
are deleted (:meth:`CommandStore.prune`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import ClassVar, ParamSpec, Self, TypeVar

import aiosqlite

from unified.model import COMMAND_ADAPTER, TERMINAL_STATES, Ack, AckState, Command

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id   TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,
    payload      TEXT NOT NULL,
    digest       TEXT NOT NULL,
    state        TEXT NOT NULL,
    ack          TEXT NOT NULL,
    received_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_open ON commands(state);
"""


class StoreError(Exception):
    """A SQLite store could not do what was asked (disk full, file corrupt, not open): the
    store's one exception family, raised instead of ``sqlite3``'s, ``OSError`` or decoding
    errors of what was read back."""


_P = ParamSpec("_P")
_T = TypeVar("_T")


def store_errors(
    error: type[StoreError],
) -> Callable[[Callable[_P, Awaitable[_T]]], Callable[_P, Awaitable[_T]]]:
    """Translate what SQLite, the file system and JSON decoding raise into ``error`` (one
    translation point per store method; the original is chained as the cause)."""

    def decorate(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
        @functools.wraps(method)
        async def translated(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            try:
                return await method(*args, **kwargs)
            except StoreError:
                raise
            except (sqlite3.Error, OSError, json.JSONDecodeError) as exc:
                raise error(f"{method.__qualname__}: {type(exc).__name__}: {exc}") from exc

        return translated

    return decorate


def pack(text: str) -> bytes:
    """The compact form of a JSON text kept in a store (zlib; lossless)."""
    return zlib.compress(text.encode(), 6)


def unpack(value: object) -> str:
    """A stored JSON text: packed (bytes) or, from before packing, plain text."""
    if isinstance(value, bytes):
        try:
            return zlib.decompress(value).decode()
        except zlib.error as exc:
            raise json.JSONDecodeError(f"not a packed JSON text: {exc}", "", 0) from exc
    return str(value)


def digest(command: Command) -> str:
    """Content fingerprint used to tell a redelivery from a different command reusing an id."""
    return hashlib.sha256(command.model_dump_json().encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredCommand:
    seq: int
    command: Command
    digest: str
    ack: Ack


class SqliteStore:
    """One SQLite file through aiosqlite: opened with WAL and full sync, its schema applied.

    Subclasses set ``schema`` and ``name`` (used in "not open" errors) and add their queries.
    """

    schema: ClassVar[str] = ""
    name: ClassVar[str] = "store"
    error: ClassVar[type[StoreError]] = StoreError
    """What this store raises, for every failure of SQLite or the file system."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self._path)
        except (sqlite3.Error, OSError) as exc:
            raise self.error(f"{self.name} {self._path}: {type(exc).__name__}: {exc}") from exc
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(self.schema)
            await db.commit()
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise self.error(f"{self.name} {self._path}: {type(exc).__name__}: {exc}") from exc
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise self.error(f"{self.name} is not open")
        return self._db


class CommandStore(SqliteStore):
    schema = _SCHEMA
    name = "command store"

    @store_errors(StoreError)
    async def get(self, command_id: str) -> StoredCommand | None:
        async with self.db.execute(
            "SELECT seq, payload, digest, ack FROM commands WHERE command_id = ?", (command_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else _row(row)

    @store_errors(StoreError)
    async def insert(self, command: Command, ack: Ack) -> int:
        cur = await self.db.execute(
            "INSERT INTO commands (command_id, kind, payload, digest, state, ack, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                command.command_id,
                command.type,
                command.model_dump_json(),
                digest(command),
                ack.state.value,
                pack(ack.model_dump_json()),
                ack.timestamp.isoformat(),
            ),
        )
        await self.db.commit()
        assert cur.lastrowid is not None
        return cur.lastrowid

    @store_errors(StoreError)
    async def update_ack(self, ack: Ack) -> None:
        await self.db.execute(
            "UPDATE commands SET state = ?, ack = ? WHERE command_id = ?",
            (ack.state.value, pack(ack.model_dump_json()), ack.command_id),
        )
        await self.db.commit()

    @store_errors(StoreError)
    async def open_commands(self) -> list[StoredCommand]:
        """Commands not yet in a terminal state, oldest first."""
        placeholders = ",".join("?" for _ in TERMINAL_STATES)
        async with self.db.execute(
            f"SELECT seq, payload, digest, ack FROM commands WHERE state NOT IN ({placeholders})"
            " ORDER BY seq",
            tuple(s.value for s in TERMINAL_STATES),
        ) as cur:
            rows = await cur.fetchall()
        return [_row(r) for r in rows]

    @store_errors(StoreError)
    async def prune(self, before: datetime) -> int:
        """Delete commands in a terminal state received before ``before``; returns how many.

        Open commands are never deleted, whatever their age. A pruned id is forgotten: the same
        id sent again afterwards is a new command (retention is days; a redelivery comes within
        seconds)."""
        placeholders = ",".join("?" for _ in TERMINAL_STATES)
        cur = await self.db.execute(
            f"DELETE FROM commands WHERE state IN ({placeholders}) AND received_at < ?",
            (*(s.value for s in TERMINAL_STATES), before.astimezone(UTC).isoformat()),
        )
        await self.db.commit()
        return int(cur.rowcount)

    @store_errors(StoreError)
    async def count(self, state: AckState | None = None) -> int:
        query, args = "SELECT COUNT(*) FROM commands", ()
        if state is not None:
            query, args = query + " WHERE state = ?", (state.value,)  # type: ignore[assignment]
        async with self.db.execute(query, args) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0


def _row(row: aiosqlite.Row | tuple[object, ...]) -> StoredCommand:
    seq, payload, dig, ack = row
    return StoredCommand(
        seq=int(str(seq)),
        command=COMMAND_ADAPTER.validate_json(str(payload)),
        digest=str(dig),
        ack=Ack.model_validate_json(unpack(ack)),
    )
