"""Durable reading history: per-device interval aggregates in their own SQLite file.

Settlement baselines need weeks of each device's load at the same time of day, and forecasts
need the same for their baseline band; neither can come from the latest state. Every power
reading the supervisors produce is folded, in memory and in O(1), into a bucket of
``interval_s`` (5 min by default): sample count, sum of kW, counts of good / questionable /
invalid readings, first and last timestamp. A named task writes the buffered buckets every
``flush_s`` in one transaction, merging them into rows already on disk (a bucket flushed while
it was still filling is completed by the next flush), and prunes rows older than the retention.

The state callback never waits on the disk: if writes fall behind, the buffer is bounded and the
oldest buckets are dropped with one warning per episode. Readings of ``invalid`` quality are
counted but kept out of the mean; ``questionable`` ones are used and flag their interval as
estimated in :class:`~gateway.flex.baseline.DeviceHistory` (so settlement says how much of a
result rests on doubtful data).

The same file keeps what settlement produces and needs across restarts: performance reports,
events still waiting to be settled, and which days each device had an event (those days are
not "similar days" for later baselines); and the latest weather forecast per scope
(:mod:`gateway.weather`), which the flexibility forecast uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.flex.baseline import DeviceHistory, epoch_s, from_epoch
from gateway.store import SqliteStore, StoreError, pack, store_errors, unpack
from unified.model import utcnow

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    device_id       TEXT    NOT NULL,
    bucket          INTEGER NOT NULL,  -- epoch seconds of the bucket start
    interval_s      INTEGER NOT NULL,
    n               INTEGER NOT NULL,  -- readings used in the mean (good + questionable)
    sum_kw          REAL    NOT NULL,
    n_good          INTEGER NOT NULL,
    n_questionable  INTEGER NOT NULL,
    n_invalid       INTEGER NOT NULL,
    first_ts        REAL    NOT NULL,
    last_ts         REAL    NOT NULL,
    PRIMARY KEY (device_id, bucket)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_bucket ON readings(bucket);
CREATE TABLE IF NOT EXISTS event_days (
    device_id   TEXT NOT NULL,
    day         TEXT NOT NULL,
    command_id  TEXT NOT NULL,
    PRIMARY KEY (device_id, day, command_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_settlements (
    command_id  TEXT PRIMARY KEY,
    payload     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS performance_reports (
    command_id    TEXT PRIMARY KEY,
    generated_at  TEXT NOT NULL,
    payload       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS temperatures (
    scope      TEXT    NOT NULL,  -- as weather_forecasts.scope
    start_s    INTEGER NOT NULL,  -- epoch seconds of a forecast point
    step_s     INTEGER NOT NULL,
    temp_c     REAL    NOT NULL,
    issued_at  REAL    NOT NULL,  -- of the forecast it came from: the newest one is kept
    PRIMARY KEY (scope, start_s, step_s)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS weather_forecasts (
    scope      TEXT PRIMARY KEY,  -- a group id, or '*' for the whole gateway
    issued_at  REAL NOT NULL,     -- epoch seconds
    payload    TEXT NOT NULL      -- the forecast as received (validated JSON)
);
CREATE TABLE IF NOT EXISTS price_schedules (
    scope      TEXT NOT NULL,     -- a group id, or '*' for the whole gateway
    kind       TEXT NOT NULL,     -- day_ahead / real_time
    issued_at  REAL NOT NULL,     -- epoch seconds
    payload    TEXT NOT NULL,     -- the schedule as received (validated JSON)
    PRIMARY KEY (scope, kind)
);
CREATE TABLE IF NOT EXISTS feed_values (
    name       TEXT PRIMARY KEY,
    timestamp  REAL NOT NULL,     -- epoch seconds of the value
    payload    TEXT NOT NULL      -- the value as received (validated JSON)
);
"""

_UPSERT = """
INSERT INTO readings (device_id, bucket, interval_s, n, sum_kw, n_good, n_questionable,
                      n_invalid, first_ts, last_ts)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(device_id, bucket) DO UPDATE SET
    n = n + excluded.n,
    sum_kw = sum_kw + excluded.sum_kw,
    n_good = n_good + excluded.n_good,
    n_questionable = n_questionable + excluded.n_questionable,
    n_invalid = n_invalid + excluded.n_invalid,
    first_ts = min(first_ts, excluded.first_ts),
    last_ts = max(last_ts, excluded.last_ts)
"""

HISTORY_CHUNK_DEVICES: Final = 500
"""Device ids per ``IN (...)`` query (well under SQLite's parameter limit)."""
_DAY_S = 86_400


class ReadingClass(IntEnum):
    """IEC 61850 validity of one reading, as far as history cares."""

    GOOD = 0
    QUESTIONABLE = 1
    INVALID = 2


@dataclass(slots=True)
class _Bucket:
    n: int = 0
    sum_kw: float = 0.0
    n_good: int = 0
    n_questionable: int = 0
    n_invalid: int = 0
    first_ts: float = math.inf
    last_ts: float = -math.inf

    def add(self, ts: float, kw: float, cls: ReadingClass) -> None:
        if cls is ReadingClass.INVALID:
            self.n_invalid += 1
        else:
            self.n += 1
            self.sum_kw += kw
            if cls is ReadingClass.GOOD:
                self.n_good += 1
            else:
                self.n_questionable += 1
        self.first_ts = min(self.first_ts, ts)
        self.last_ts = max(self.last_ts, ts)

    def merge(self, other: _Bucket) -> None:
        self.n += other.n
        self.sum_kw += other.sum_kw
        self.n_good += other.n_good
        self.n_questionable += other.n_questionable
        self.n_invalid += other.n_invalid
        self.first_ts = min(self.first_ts, other.first_ts)
        self.last_ts = max(self.last_ts, other.last_ts)


@dataclass(frozen=True, slots=True)
class BucketRow:
    """One stored bucket, as :meth:`ReadingHistory.buckets` returns it."""

    device_id: str
    start: datetime
    interval_s: int
    samples: int
    mean_kw: float | None
    good: int
    questionable: int
    invalid: int
    first: datetime
    last: datetime


@dataclass(frozen=True, slots=True, eq=False)
class GroupSeries:
    """Sum over devices of their interval-mean kW; NaN where no device had data."""

    start: datetime
    interval_s: int
    kw: np.ndarray
    devices_reporting: np.ndarray
    devices_total: int


class HistoryError(StoreError):
    """The reading history could not be read or written (see :class:`StoreError`)."""


_translated = store_errors(HistoryError)


class ReadingHistory(SqliteStore):
    """The history file: buffered writes from the state callback, async queries."""

    schema = _SCHEMA
    name = "history store"
    error = HistoryError

    def __init__(
        self,
        path: Path,
        *,
        interval_s: int = 300,
        retention_days: float = 60.0,
        report_retention_days: float = 400.0,
        max_pending: int = 200_000,
    ) -> None:
        super().__init__(path)
        if interval_s <= 0 or 3600 % interval_s:
            raise ValueError("interval_s must divide 3600")
        self.interval_s = interval_s
        self.retention_days = retention_days
        self.report_retention_days = report_retention_days
        self.max_pending = max_pending
        self._pending: dict[tuple[str, int], _Bucket] = {}
        self._write_lock = asyncio.Lock()
        self._overflowing = False
        self.dropped = 0
        """Buckets dropped because the buffer was full (writes fell behind)."""

    # ------------------------------------------------------------------ intake (sync, O(1))
    def observe(
        self, device_id: str, when: datetime, kw: float, cls: ReadingClass = ReadingClass.GOOD
    ) -> None:
        """Fold one power reading into its bucket; never blocks, never raises on a full buffer."""
        if not math.isfinite(kw):
            cls = ReadingClass.INVALID
            kw = 0.0
        ts = epoch_s(when)
        key = (device_id, int(ts // self.interval_s) * self.interval_s)
        bucket = self._pending.get(key)
        if bucket is None:
            if len(self._pending) >= self.max_pending:
                self._drop_oldest()
            bucket = self._pending[key] = _Bucket()
        bucket.add(ts, kw, cls)

    def _drop_oldest(self) -> None:
        # Dicts keep insertion order: the first key is the bucket buffered longest ago.
        del self._pending[next(iter(self._pending))]
        self.dropped += 1
        if not self._overflowing:
            self._overflowing = True
            log.warning(
                "history buffer full (%d buckets): writes are falling behind, dropping the "
                "oldest buffered readings",
                self.max_pending,
            )

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ writes
    @_translated
    async def flush(self) -> int:
        """Write every buffered bucket in one transaction; returns how many were written.

        On a failed write the buckets go back into the buffer (merged with whatever arrived
        meanwhile, still bounded) and the error propagates.
        """
        async with self._write_lock:
            batch, self._pending = self._pending, {}
            if not batch:
                return 0
            rows = [
                (
                    device_id,
                    start,
                    self.interval_s,
                    b.n,
                    b.sum_kw,
                    b.n_good,
                    b.n_questionable,
                    b.n_invalid,
                    b.first_ts,
                    b.last_ts,
                )
                for (device_id, start), b in batch.items()
            ]
            try:
                await self.db.executemany(_UPSERT, rows)
                await self.db.commit()
            except BaseException:
                await self._requeue(batch)
                raise
            if self._overflowing:
                log.warning("history buffer drained; %d bucket(s) were dropped", self.dropped)
                self._overflowing = False
            return len(rows)

    async def _requeue(self, batch: dict[tuple[str, int], _Bucket]) -> None:
        try:
            await self.db.rollback()
        # aiosqlite raises ValueError once its connection is gone; the buffer is what matters.
        except (sqlite3.Error, ValueError) as exc:
            log.debug("history rollback failed: %s", exc)
        newer, self._pending = self._pending, {}
        for key, bucket in batch.items():
            if len(self._pending) >= self.max_pending:
                self._drop_oldest()
            self._pending[key] = bucket
        for key, bucket in newer.items():
            if key in self._pending:
                self._pending[key].merge(bucket)
            else:
                if len(self._pending) >= self.max_pending:
                    self._drop_oldest()
                self._pending[key] = bucket

    @_translated
    async def prune(self, now: datetime) -> int:
        """Delete buckets and event days older than the retention, and performance reports
        generated longer ago than the report retention; returns buckets deleted."""
        cutoff = epoch_s(now) - self.retention_days * _DAY_S
        reports_cutoff = from_epoch(epoch_s(now) - self.report_retention_days * _DAY_S)
        async with self._write_lock:
            cur = await self.db.execute("DELETE FROM readings WHERE bucket < ?", (int(cutoff),))
            await self.db.execute(
                "DELETE FROM event_days WHERE day < ?", (from_epoch(cutoff).date().isoformat(),)
            )
            await self.db.execute("DELETE FROM temperatures WHERE start_s < ?", (int(cutoff),))
            reports = await self.db.execute(
                "DELETE FROM performance_reports WHERE generated_at < ?",
                (reports_cutoff.isoformat(),),
            )
            await self.db.commit()
        if reports.rowcount:
            log.info("history: %d performance report(s) past retention deleted", reports.rowcount)
        return cur.rowcount

    async def close(self) -> None:
        """Write what is buffered, then close (a clean stop loses nothing)."""
        if self._db is not None and self._pending:
            try:
                async with asyncio.timeout(10):
                    await self.flush()
            except (HistoryError, TimeoutError):  # a stuck disk must not hang a shutdown
                log.exception("history: final flush failed; %d bucket(s) lost", self.pending)
        await super().close()

    # ------------------------------------------------------------------ queries
    @_translated
    async def buckets(self, device_id: str, start: datetime, end: datetime) -> list[BucketRow]:
        """The stored buckets of one device in ``[start, end)``, oldest first."""
        async with self.db.execute(
            "SELECT bucket, interval_s, n, sum_kw, n_good, n_questionable, n_invalid,"
            " first_ts, last_ts FROM readings WHERE device_id = ? AND bucket >= ? AND bucket < ?"
            " ORDER BY bucket",
            (device_id, math.floor(epoch_s(start)), math.ceil(epoch_s(end))),
        ) as cur:
            rows = await cur.fetchall()
        return [
            BucketRow(
                device_id=device_id,
                start=from_epoch(int(r[0])),
                interval_s=int(r[1]),
                samples=int(r[2]),
                mean_kw=float(r[3]) / int(r[2]) if int(r[2]) else None,
                good=int(r[4]),
                questionable=int(r[5]),
                invalid=int(r[6]),
                first=from_epoch(float(r[7])),
                last=from_epoch(float(r[8])),
            )
            for r in rows
        ]

    @_translated
    async def histories(
        self,
        device_ids: Iterable[str],
        start: datetime,
        end: datetime,
        interval_s: int | None = None,
    ) -> dict[str, DeviceHistory]:
        """Each device's interval-mean kW over ``[start, end)`` on an ``interval_s`` grid.

        ``interval_s`` (default: the bucket width) must be a multiple of the bucket width and
        ``start`` must fall on the bucket grid; a coarser interval is the sample-weighted mean
        of its buckets. An interval with no usable reading is NaN; one with any questionable
        reading is marked ``estimated``. Every requested device gets a history (all NaN if it
        never reported), so callers can tell "no data" from "not asked".
        """
        width = interval_s or self.interval_s
        t0, t1 = epoch_s(start), epoch_s(end)
        if width % self.interval_s or t0 % self.interval_s:
            raise ValueError(
                f"history query on a {width} s grid from {start.isoformat()} does not fall on "
                f"the {self.interval_s} s buckets"
            )
        n = max(0, math.ceil((t1 - t0) / width))
        ids = list(dict.fromkeys(device_ids))
        sums = {d: np.zeros(n) for d in ids}
        counts = {d: np.zeros(n) for d in ids}
        doubtful = {d: np.zeros(n, dtype=np.bool_) for d in ids}
        for i in range(0, len(ids), HISTORY_CHUNK_DEVICES):
            chunk = ids[i : i + HISTORY_CHUNK_DEVICES]
            marks = ",".join("?" for _ in chunk)
            async with self.db.execute(
                f"SELECT device_id, (bucket - ?) / ?, SUM(sum_kw), SUM(n), SUM(n_questionable)"
                f" FROM readings WHERE device_id IN ({marks}) AND bucket >= ? AND bucket < ?"
                f" GROUP BY device_id, (bucket - ?) / ?",
                (int(t0), width, *chunk, int(t0), math.ceil(t1), int(t0), width),
            ) as cur:
                rows = await cur.fetchall()
            # 500 devices x 3 weeks of hours is 250,000 rows: fill the arrays off the loop.
            await asyncio.to_thread(_fill, rows, n, sums, counts, doubtful)
        out: dict[str, DeviceHistory] = {}
        for d in ids:
            kw = np.full(n, np.nan)
            np.divide(sums[d], counts[d], out=kw, where=counts[d] > 0)
            out[d] = DeviceHistory(d, start, width, kw, doubtful[d] & (counts[d] > 0))
        return out

    @_translated
    async def device_history(
        self, device_id: str, start: datetime, end: datetime, interval_s: int | None = None
    ) -> DeviceHistory:
        return (await self.histories([device_id], start, end, interval_s))[device_id]

    @_translated
    async def group_series(
        self,
        device_ids: Sequence[str],
        start: datetime,
        end: datetime,
        interval_s: int | None = None,
    ) -> GroupSeries:
        """A group's load per interval: the sum of its members' interval means.

        Members without data in an interval are left out of that interval's sum (the count of
        those that reported comes with it), so a gap reads as a gap, not as zero load.
        """
        hist = await self.histories(device_ids, start, end, interval_s)
        width = interval_s or self.interval_s
        n = max(0, math.ceil((epoch_s(end) - epoch_s(start)) / width))
        if not hist:
            return GroupSeries(start, width, np.full(n, np.nan), np.zeros(n, np.int64), 0)
        stack = np.vstack([h.kw for h in hist.values()])
        have = ~np.isnan(stack)
        reporting = have.sum(axis=0)
        total = np.where(have, stack, 0.0).sum(axis=0)
        kw = np.where(reporting > 0, total, np.nan)
        return GroupSeries(start, width, kw, reporting, len(hist))

    # ------------------------------------------------------------------ settlement records
    @_translated
    async def add_event_days(
        self, command_id: str, device_days: Mapping[str, Iterable[date]]
    ) -> None:
        rows = [
            (device_id, day.isoformat(), command_id)
            for device_id, days in device_days.items()
            for day in days
        ]
        async with self._write_lock:
            await self.db.executemany(
                "INSERT OR IGNORE INTO event_days (device_id, day, command_id) VALUES (?, ?, ?)",
                rows,
            )
            await self.db.commit()

    @_translated
    async def event_days(
        self, since: date, *, excluding: str | None = None
    ) -> dict[str, frozenset[date]]:
        """Per device, the days since ``since`` on which it took part in an event."""
        async with self.db.execute(
            "SELECT device_id, day FROM event_days WHERE day >= ? AND command_id != ?",
            (since.isoformat(), excluding or ""),
        ) as cur:
            rows = await cur.fetchall()
        out: dict[str, set[date]] = {}
        for device_id, day in rows:
            out.setdefault(str(device_id), set()).add(date.fromisoformat(str(day)))
        return {d: frozenset(days) for d, days in out.items()}

    @_translated
    async def add_pending(self, command_id: str, payload: Mapping[str, object]) -> None:
        async with self._write_lock:
            await self.db.execute(
                "INSERT OR REPLACE INTO pending_settlements (command_id, payload) VALUES (?, ?)",
                (command_id, json.dumps(payload)),
            )
            await self.db.commit()

    @_translated
    async def pending_settlements(self) -> dict[str, dict[str, object]]:
        async with self.db.execute("SELECT command_id, payload FROM pending_settlements") as cur:
            rows = await cur.fetchall()
        return {str(cid): json.loads(str(payload)) for cid, payload in rows}

    @_translated
    async def save_report(self, command_id: str, generated_at: datetime, payload: str) -> None:
        """Store a report (packed: :func:`gateway.store.pack`) and clear the event's pending
        entry, in one transaction."""
        async with self._write_lock:
            await self.db.execute(
                "INSERT OR REPLACE INTO performance_reports (command_id, generated_at, payload)"
                " VALUES (?, ?, ?)",
                (command_id, from_epoch(epoch_s(generated_at)).isoformat(), pack(payload)),
            )
            await self.db.execute(
                "DELETE FROM pending_settlements WHERE command_id = ?", (command_id,)
            )
            await self.db.commit()

    @_translated
    async def drop_pending(self, command_id: str) -> None:
        async with self._write_lock:
            await self.db.execute(
                "DELETE FROM pending_settlements WHERE command_id = ?", (command_id,)
            )
            await self.db.commit()

    @_translated
    async def report(self, command_id: str) -> str | None:
        async with self.db.execute(
            "SELECT payload FROM performance_reports WHERE command_id = ?", (command_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else unpack(row[0])

    # ------------------------------------------------------------------ weather forecasts
    @_translated
    async def save_weather(self, scope: str, issued_at: datetime, payload: str) -> bool:
        """Keep ``payload`` as the forecast of ``scope`` unless a newer one is stored; returns
        whether it was stored (the check and the write are one statement)."""
        async with self._write_lock:
            cur = await self.db.execute(
                "INSERT INTO weather_forecasts (scope, issued_at, payload) VALUES (?, ?, ?)"
                " ON CONFLICT(scope) DO UPDATE SET issued_at = excluded.issued_at,"
                " payload = excluded.payload"
                " WHERE excluded.issued_at > weather_forecasts.issued_at",
                (scope, epoch_s(issued_at), payload),
            )
            await self.db.commit()
        return cur.rowcount > 0

    @_translated
    async def save_temperatures(
        self, scope: str, issued_at: datetime, points: Sequence[tuple[int, int, float]]
    ) -> None:
        """Record a forecast's ``(start_s, step_s, temp_c)`` points as the temperature record
        of ``scope``; a point already recorded from a newer forecast is kept. The record is what
        the weather-matched baseline compares past days by (the newest forecast of an hour is
        the closest to an observation the gateway has); pruned with the readings."""
        issued = epoch_s(issued_at)
        async with self._write_lock:
            await self.db.executemany(
                "INSERT INTO temperatures (scope, start_s, step_s, temp_c, issued_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(scope, start_s, step_s) DO UPDATE SET temp_c = excluded.temp_c,"
                " issued_at = excluded.issued_at WHERE excluded.issued_at > temperatures.issued_at",
                [(scope, int(a), int(step), float(t), issued) for a, step, t in points],
            )
            await self.db.commit()

    @_translated
    async def temperatures(
        self, scope: str, since: datetime, until: datetime
    ) -> list[tuple[int, int, float, float]]:
        """``(start_s, step_s, temp_c, issued_at)`` of the record of ``scope`` overlapping
        ``[since, until)``, oldest issue first."""
        async with self.db.execute(
            "SELECT start_s, step_s, temp_c, issued_at FROM temperatures WHERE scope = ?"
            " AND start_s < ? AND start_s + step_s > ? ORDER BY issued_at, start_s",
            (scope, epoch_s(until), epoch_s(since)),
        ) as cur:
            rows = await cur.fetchall()
        return [(int(a), int(b), float(c), float(d)) for a, b, c, d in rows]

    @_translated
    async def weather_forecasts(self) -> dict[str, str]:
        """The stored forecast of each scope (JSON, as saved)."""
        async with self.db.execute("SELECT scope, payload FROM weather_forecasts") as cur:
            rows = await cur.fetchall()
        return {str(scope): str(payload) for scope, payload in rows}


    # ------------------------------------------------------------------ price schedules
    @_translated
    async def save_prices(self, scope: str, kind: str, issued_at: datetime, payload: str) -> bool:
        """Keep ``payload`` as the (scope, kind) price schedule unless a newer one is stored."""
        async with self._write_lock:
            cur = await self.db.execute(
                "INSERT INTO price_schedules (scope, kind, issued_at, payload) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(scope, kind) DO UPDATE SET issued_at = excluded.issued_at,"
                " payload = excluded.payload"
                " WHERE excluded.issued_at > price_schedules.issued_at",
                (scope, kind, epoch_s(issued_at), payload),
            )
            await self.db.commit()
        return cur.rowcount > 0

    @_translated
    async def save_feed(self, name: str, timestamp: datetime, payload: str) -> bool:
        """Keep ``payload`` as feed ``name``'s value unless a newer one is stored."""
        async with self._write_lock:
            cur = await self.db.execute(
                "INSERT INTO feed_values (name, timestamp, payload) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET timestamp = excluded.timestamp,"
                " payload = excluded.payload WHERE excluded.timestamp > feed_values.timestamp",
                (name, epoch_s(timestamp), payload),
            )
            await self.db.commit()
        return cur.rowcount > 0

    @_translated
    async def feed_values(self) -> list[str]:
        """Every stored feed value (JSON, as saved)."""
        async with self.db.execute("SELECT payload FROM feed_values") as cur:
            rows = await cur.fetchall()
        return [str(payload) for (payload,) in rows]

    @_translated
    async def price_schedules(self) -> list[str]:
        """Every stored price schedule (JSON, as saved)."""
        async with self.db.execute("SELECT payload FROM price_schedules") as cur:
            rows = await cur.fetchall()
        return [str(payload) for (payload,) in rows]


async def run_history_writer(
    history: ReadingHistory, *, flush_s: float, prune_s: float, io_timeout_s: float
) -> None:
    """The named task behind the history: flush every ``flush_s``, prune every ``prune_s``.

    A failed or slow write is logged and retried at the next flush (the buffer holds the data,
    bounded); it never ends the task, so a full disk does not take the gateway down with it.
    """
    prune_due = time.monotonic()
    while True:
        await asyncio.sleep(flush_s)
        try:
            async with asyncio.timeout(io_timeout_s):
                await history.flush()
            if time.monotonic() >= prune_due:
                prune_due = time.monotonic() + prune_s
                async with asyncio.timeout(io_timeout_s):
                    removed = await history.prune(utcnow())
                if removed:
                    log.info("history: pruned %d expired bucket(s)", removed)
        except Exception:  # loop boundary (TimeoutError included): the next flush retries
            log.exception("history write failed; retrying at the next flush")


__all__ = [
    "BucketRow",
    "GroupSeries",
    "HistoryError",
    "ReadingClass",
    "ReadingHistory",
    "run_history_writer",
]


def _fill(
    rows: Iterable[Any],
    n: int,
    sums: dict[str, npt.NDArray[np.float64]],
    counts: dict[str, npt.NDArray[np.float64]],
    doubtful: dict[str, npt.NDArray[np.bool_]],
) -> None:
    for device_id, k, total, count, questionable in rows:
        j = int(k)
        if 0 <= j < n:
            sums[str(device_id)][j] = float(total)
            counts[str(device_id)][j] = float(count)
            doubtful[str(device_id)][j] = int(questionable) > 0
