"""Store-and-forward: a durable SQLite outbox for what the edge agent sends upstream.

Every record gets the next sequence number of its stream (telemetry, event responses, ...) in
the same transaction that stores it, so after a ``kill -9`` or a power cut a record is either
stored with its number or was never acknowledged to its producer; numbers never repeat and never
skip. The database runs in WAL mode with ``synchronous=FULL``: a committed record survives a
power cut, and a write torn by one is rolled back by SQLite on the next open.

Delivery is at least once on the wire and exactly once at the receiver: the :class:`Forwarder`
sends each stream's records in sequence order and removes them only once the uplink has taken
them, so a crash between the two sends a record again; :class:`InOrderReceiver` (what the head end
runs) drops what it has already seen by ``(stream, seq)``. After an outage the newest record of a
stream goes out first (live data) as well as in its place, and the backlog drains at
``backfill_per_s``, so the backlog never starves live data.

The outbox is bounded (``max_records``, and ``max_bytes`` of payload when given). When full, the
oldest records are dropped to make room (``drop_oldest``), or new ones refused (``refuse_new``);
either way it is logged once per episode, and :attr:`Outbox.dropped` / :attr:`Outbox.refused`
count it for the health view.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Self

from protocols.mqtt.outbox import InOrderReceiver, Record

__all__ = [
    "Forwarder",
    "FullPolicy",
    "InOrderReceiver",
    "Outbox",
    "OutboxFull",
    "Record",
]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created REAL NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (stream, seq)
);
"""


class FullPolicy(StrEnum):
    DROP_OLDEST = "drop_oldest"
    REFUSE_NEW = "refuse_new"


class OutboxFull(Exception):
    """The outbox is full and its policy is to refuse new records."""

    def __init__(self, stream: str, max_records: int) -> None:
        super().__init__(f"outbox full ({max_records} records): {stream} record refused")
        self.stream = stream
        self.max_records = max_records


class Outbox:
    """The durable queue (synchronous and short: call it from a thread in async code)."""

    def __init__(
        self,
        path: Path,
        *,
        max_records: int = 100_000,
        max_bytes: int | None = None,
        policy: FullPolicy = FullPolicy.DROP_OLDEST,
    ) -> None:
        if max_records < 1 or (max_bytes is not None and max_bytes < 1):
            raise ValueError("max_records and max_bytes must be at least 1")
        self.path = path
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.policy = policy
        self.dropped = 0
        self.refused = 0
        self._full_episode = False
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._recount()

    def _recount(self) -> None:
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records"
        ).fetchone()
        self._count, self._bytes = int(count), int(size)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def depth(self) -> int:
        """Records waiting to be delivered."""
        return self._count

    @property
    def size_bytes(self) -> int:
        """Payload bytes waiting to be delivered."""
        return self._bytes

    def _full(self, adding: int) -> bool:
        if self._count >= self.max_records:
            return True
        return self.max_bytes is not None and self._bytes + adding > self.max_bytes

    def append(self, stream: str, payload: bytes, *, now: float | None = None) -> int:
        """Store one record; returns its sequence number once it is durable."""
        created = time.time() if now is None else now
        db = self._db
        if self.max_bytes is not None and len(payload) > self.max_bytes:
            raise OutboxFull(stream, self.max_records)
        db.execute("BEGIN IMMEDIATE")
        try:
            while self._count > 0 and self._full(len(payload)):
                self._make_room(stream)
            row = db.execute("SELECT next_seq FROM streams WHERE stream = ?", (stream,)).fetchone()
            seq = 1 if row is None else int(row[0])
            db.execute(
                "INSERT INTO streams (stream, next_seq) VALUES (?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET next_seq = excluded.next_seq",
                (stream, seq + 1),
            )
            db.execute(
                "INSERT INTO records (stream, seq, created, payload) VALUES (?, ?, ?, ?)",
                (stream, seq, created, payload),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()  # what _make_room took off is back
            raise
        self._count += 1
        self._bytes += len(payload)
        if self._full_episode and not self._full(0):
            self._full_episode = False
        return seq

    def _make_room(self, stream: str) -> None:
        if self.policy is FullPolicy.REFUSE_NEW:
            self.refused += 1
            if not self._full_episode:
                log.warning("outbox full (%d records): refusing new records", self.max_records)
                self._full_episode = True
            raise OutboxFull(stream, self.max_records)
        # The oldest record of all streams goes: the backlog loses its tail, live data stays.
        rowid, size = self._db.execute(
            "SELECT rowid, LENGTH(payload) FROM records ORDER BY created, seq LIMIT 1"
        ).fetchone()
        self._db.execute("DELETE FROM records WHERE rowid = ?", (rowid,))
        self._count -= 1
        self._bytes -= int(size)
        self.dropped += 1
        if not self._full_episode:
            log.warning(
                "outbox full (%d records, %s bytes at most): dropping the oldest",
                self.max_records,
                self.max_bytes,
            )
            self._full_episode = True

    def pending(self, stream: str, limit: int = 100) -> list[Record]:
        rows = self._db.execute(
            "SELECT stream, seq, created, payload FROM records WHERE stream = ? "
            "ORDER BY seq LIMIT ?",
            (stream, limit),
        ).fetchall()
        return [Record(r[0], int(r[1]), float(r[2]), bytes(r[3])) for r in rows]

    def newest(self, stream: str) -> Record | None:
        row = self._db.execute(
            "SELECT stream, seq, created, payload FROM records WHERE stream = ? "
            "ORDER BY seq DESC LIMIT 1",
            (stream,),
        ).fetchone()
        return None if row is None else Record(row[0], int(row[1]), float(row[2]), bytes(row[3]))

    def streams(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT stream FROM records ORDER BY 1")]

    def ack(self, stream: str, upto_seq: int) -> None:
        """The uplink has taken every record of ``stream`` up to ``upto_seq``."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            (size,) = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM records "
                "WHERE stream = ? AND seq <= ?",
                (stream, upto_seq),
            ).fetchone()
            cursor = self._db.execute(
                "DELETE FROM records WHERE stream = ? AND seq <= ?", (stream, upto_seq)
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._count -= cursor.rowcount
        self._bytes -= int(size)


Send = Callable[[Record, int], Awaitable[None]]
"""Sends one record with its stream's floor: the oldest sequence number still stored (every
number below it was delivered or dropped, so the receiver need not wait for it)."""


class Forwarder:
    """Drains the outbox through ``send`` (which raises while the uplink is down)."""

    def __init__(
        self,
        outbox: Outbox,
        send: Send,
        *,
        backfill_per_s: float = 50.0,
        idle_s: float = 0.1,
        retry_s: float = 1.0,
    ) -> None:
        self.outbox = outbox
        self._send = send
        self._interval = 1.0 / backfill_per_s
        self._idle_s = idle_s
        self._retry_s = retry_s
        self._live_sent: dict[str, int] = {}
        self.uplink_up = True
        self.sent = 0

    async def run(self) -> None:
        while True:
            try:
                moved = await self.drain_once()
            except Exception as exc:  # the uplink is down: keep everything, try again
                if self.uplink_up:  # the uplink itself logs the loss, once
                    log.debug("forwarder paused: %s", exc)
                self.uplink_up = False
                await asyncio.sleep(self._retry_s)
                continue
            if not self.uplink_up:
                log.debug("forwarder resumed: %d record(s) to backfill", self.outbox.depth)
                self.uplink_up = True
            await asyncio.sleep(self._interval if moved else self._idle_s)

    async def drain_once(self) -> int:
        """Send the live record of each stream once, then one backlog record per stream."""
        moved = 0
        for stream in await asyncio.to_thread(self.outbox.streams):
            batch = await asyncio.to_thread(self.outbox.pending, stream, 1)
            if not batch:
                continue
            newest = await asyncio.to_thread(self.outbox.newest, stream)
            if (
                newest is not None
                and newest.seq != batch[0].seq
                and self._live_sent.get(stream) != newest.seq
            ):
                # Live first; the receiver holds it back until the backlog reaches it.
                await self._send(newest, batch[0].seq)
                self._live_sent[stream] = newest.seq
            record = batch[0]
            await self._send(record, record.seq)
            await asyncio.to_thread(self.outbox.ack, stream, record.seq)
            self.sent += 1
            moved += 1
        return moved
