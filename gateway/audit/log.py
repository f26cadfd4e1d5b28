"""The audit log: records taken on the event loop, written in order by one thread.

:meth:`AuditLog.record` costs a tuple and a deque append on the event loop; it never waits on
the disk. One writer thread takes what is queued, gives each record its ``seq`` and ``prev``
(the SHA-256 of the line before, :mod:`gateway.audit.files`), appends the lines to
``audit.jsonl`` (opened ``O_APPEND``, never rewritten) with one ``write`` per batch, and rotates
the file by renaming when it would grow beyond ``max_bytes``.

Durability: every batch is fsync'd before the next one is taken (a group commit: under load
the batches grow, so a dispatch to thousands of devices costs a few fsyncs, not thousands). A
record is on disk within one write and fsync of being recorded; a power loss loses at most the
records still queued and may cut the last line short, which ``verify`` reports and the next
start terminates (the chain continues from the cut line, so nothing else is reported broken).

Failures never stop the gateway. When the queue is full, records are dropped and counted
(:attr:`AuditLog.dropped`, a warning once per episode) and an ``audit.gap`` record says how many
and when, in the place they would have been. When the disk fails, the records taken are kept
(up to ``max_queue`` in all), the error is logged once, writing is retried every ``retry_s``,
and once it works again an ``audit.gap`` record says since when and why records were late;
records already on disk from a write cut short are not written twice (the writer re-reads the
file's end).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from pydantic import BaseModel

from gateway.audit.files import CURRENT, GENESIS, audit_files, last_line, line_hash
from gateway.audit.trail import CORE_SOURCE, AuditKind
from unified.model import DeviceCommand

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)

_Item = tuple[float, AuditKind, str | None, str | None, str | None, Mapping[str, object] | None]
"""(time.time(), kind, source, command_id, device_id, details): a record before its seq."""

_BATCH: Final = 4096
"""Records per write (and fsync)."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


def _device_command(command: DeviceCommand) -> dict[str, object]:
    # The hot path of a fleet-wide dispatch: a plain dict, not model_dump.
    out: dict[str, object] = {"power_kw": command.power_kw}
    if command.import_limit_kw is not None:
        out["import_limit_kw"] = command.import_limit_kw
    if command.export_limit_kw is not None:
        out["export_limit_kw"] = command.export_limit_kw
    out["provenance"] = [{"command_id": s.command_id, "kind": s.kind} for s in command.provenance]
    return out


def _jsonable(value: object) -> object:
    if isinstance(value, DeviceCommand):
        return _device_command(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return repr(value)


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), default=_jsonable)


def _encode(item: _Item, seq: int, prev: str) -> bytes:
    ts, kind, source, command_id, device_id, details = item
    record = {
        "ts": _iso(ts),
        "seq": seq,
        "kind": kind.value,
        "source": source,
        "command_id": command_id,
        "device_id": device_id,
        "details": details,
        "prev": prev,
    }
    try:
        return _ENCODER.encode(record).encode()
    except (TypeError, ValueError) as exc:  # a caller's odd details must not lose the record
        record["details"] = {"unserialisable": repr(details)[:2000], "error": str(exc)}
        return json.dumps(record, separators=(",", ":"), default=repr).encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class AuditLog:
    """The append-only audit log in ``directory`` (an :class:`~gateway.audit.AuditTrail`).

    Use it as an async context manager around the gateway's run: entering records
    ``audit.started`` and starts the writer thread, leaving records ``audit.stopped`` and waits
    (off the event loop) for the writer to finish. Records made before entering are kept and
    written once it starts.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 16 * 1024 * 1024,
        keep: int = 20,
        fsync: bool = True,
        max_queue: int = 100_000,
        retry_s: float = 2.0,
        name: str = CURRENT,
        identity: Mapping[str, object] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1: the chain continues in the rotated file")
        self.directory = directory
        self.path = directory / name
        self._name = name
        self._max_bytes = max_bytes
        self._keep = keep
        self._fsync = fsync
        self._max_queue = max_queue
        self._retry_s = retry_s
        self._identity = dict(identity or {})
        self._queue: deque[_Item] = deque()
        self._wakeup = threading.Event()
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Event-loop side: what was dropped since the last gap record.
        self.recorded = 0
        """Records queued (gap records included)."""
        self.dropped = 0
        """Records dropped since the start: the queue was full (or the log closed)."""
        self._gap = 0
        self._gap_from = 0.0
        self._gap_to = 0.0
        # Writer side (the thread only, but for the counters read by anyone).
        self.written = 0
        self.lost = 0
        """Records that could not be written before the writer stopped (disk failing)."""
        self.failing = False
        """The disk refuses writes now (records are kept in memory and retried)."""
        self._held = 0
        self._fd: int | None = None
        self._opened = False
        self._size = 0
        self._seq = 0
        self._prev = GENESIS
        self._failing_since: float | None = None
        self._error = ""
        self._noted = False
        self._retry_at = 0.0

    # ------------------------------------------------------------------ the event loop's side
    def record(
        self,
        kind: AuditKind,
        *,
        source: str | None = None,
        command_id: str | None = None,
        device_id: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        now = time.time()
        queue = self._queue
        if self._closed or len(queue) + self._held >= self._max_queue:
            self._drop(now)
            return
        if self._gap:
            queue.append(self._gap_record())
            self.recorded += 1
        queue.append((now, kind, source, command_id, device_id, details))
        self.recorded += 1
        if not self._wakeup.is_set():
            self._wakeup.set()

    def _drop(self, now: float) -> None:
        self.dropped += 1
        if not self._gap:
            self._gap_from = now
            if self._closed:
                log.warning("audit log %s is closed: records are dropped", self.path)
            else:
                log.warning(
                    "audit log %s: %d records wait for the writer: dropping records (counted; "
                    "an audit.gap record will say how many)",
                    self.path,
                    self._max_queue,
                )
        self._gap += 1
        self._gap_to = now

    def _gap_record(self) -> _Item:
        details = {
            "cause": "queue full",
            "dropped": self._gap,
            "from": _iso(self._gap_from),
            "to": _iso(self._gap_to),
        }
        log.warning("audit log %s: taking records again, %d dropped", self.path, self._gap)
        self._gap = 0
        return (self._gap_from, AuditKind.GAP, CORE_SOURCE, None, None, details)

    async def __aenter__(self) -> Self:
        self._closed = self._stopping = False
        self.record(
            AuditKind.STARTED,
            source=CORE_SOURCE,
            details=self._identity | {"pid": os.getpid(), "path": str(self.path)},
        )
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Record ``audit.stopped`` and wait for the writer to write everything queued (it gives
        up after ``timeout_s``: a hung disk must not hang the gateway's stop)."""
        if self._closed:
            return
        self.record(AuditKind.STOPPED, source=CORE_SOURCE)
        self._closed = True
        self._stopping = True
        self._wakeup.set()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, timeout_s)
            if thread.is_alive():
                log.error("audit log %s: the writer did not finish in %g s", self.path, timeout_s)

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        pending: deque[_Item] = deque()
        try:
            while True:
                if self.failing or not self._queue:  # else more is queued already
                    timeout = None
                    if pending and self.failing:
                        timeout = max(0.0, self._retry_at - time.monotonic())
                    self._wakeup.wait(timeout)
                self._wakeup.clear()
                stopping = self._stopping
                while self._queue and len(pending) < self._max_queue:
                    pending.append(self._queue.popleft())
                self._held = len(pending)
                if pending and (not self.failing or stopping or time.monotonic() >= self._retry_at):
                    self._flush(pending)
                # At a stop: everything written, or the disk still failing (then it is lost).
                if stopping and (self.failing or not (pending or self._queue)):
                    break
        finally:
            self.lost = len(pending) + len(self._queue)
            if self.lost:
                log.error(
                    "audit log %s: %d records could not be written before the stop (%s)",
                    self.path,
                    self.lost,
                    self._error,
                )
            self._close_file()

    def _flush(self, pending: deque[_Item]) -> None:
        try:
            if self._fd is None:
                self._open(pending)
                if self.failing and not self._noted:
                    assert self._failing_since is not None
                    pending.appendleft(
                        (
                            self._failing_since,
                            AuditKind.GAP,
                            CORE_SOURCE,
                            None,
                            None,
                            {
                                "cause": "write failed",
                                "error": self._error,
                                "from": _iso(self._failing_since),
                                "to": _iso(time.time()),
                                "late": len(pending),
                            },
                        )
                    )
                    self._noted = True
            self._write(pending)
        except Exception as exc:  # a disk error (or a bug): kept, retried, never lost silently
            self._fail(exc)
            return
        finally:
            self._held = len(pending)
        if self.failing:
            log.warning("audit log %s: writing again", self.path)
            self.failing = False
            self._failing_since = None
            self._noted = False

    def _open(self, pending: deque[_Item]) -> None:
        """Open the current file for appending and take the chain up where the files end."""
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size:
                with self.path.open("rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        # A write cut short (power loss): end that line, so the next record
                        # starts on its own; verify reports the cut line.
                        _write_all(fd, b"\n")
                        size += 1
                        log.warning("audit log %s: its last line was cut short", self.path)
            last, on_disk = self._file_end()
            if created:
                self._sync_directory()
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size = fd, size
        self._prev = GENESIS if last is None else line_hash(last)
        if self._opened:
            # Reopened after a failure: a write cut short may have put some of the pending
            # records on disk already; they must not be written twice.
            written = on_disk - self._seq
            if 0 < written <= len(pending):
                for _ in range(written):
                    pending.popleft()
                self.written += written
        self._seq = max(self._seq, on_disk)
        self._opened = True

    def _file_end(self) -> tuple[bytes | None, int]:
        """The log's last line and the seq of its last record (0: an empty log)."""
        last: bytes | None = None
        for path in reversed(audit_files(self.directory, self._name)):
            if not path.stat().st_size:
                continue
            line, seq = last_line(path)
            if last is None:
                last = line
            if seq is not None:
                return last, seq
        return last, 0

    def _write(self, pending: deque[_Item]) -> None:
        assert self._fd is not None
        while pending:
            size, seq, prev = self._size, self._seq, self._prev
            parts: list[bytes] = []
            full = False
            for item in itertools.islice(pending, _BATCH):
                line = _encode(item, seq + 1, prev)
                if size and size + len(line) + 1 > self._max_bytes:
                    full = True
                    break
                parts += (line, b"\n")
                size += len(line) + 1
                seq += 1
                prev = line_hash(line)
            if parts:
                _write_all(self._fd, b"".join(parts))
                if self._fsync:
                    os.fsync(self._fd)
                self._size, self._seq, self._prev = size, seq, prev
                n = len(parts) // 2
                for _ in range(n):
                    pending.popleft()
                self.written += n
                self._held = len(pending)
            if full:
                self._rotate()

    def _rotate(self) -> None:
        """``audit.jsonl`` → ``audit.jsonl.1`` → ``.2`` …, keeping ``keep`` rotated files."""
        self._close_file()
        for index in range(self._keep - 1, 0, -1):
            older = self.directory / f"{self._name}.{index}"
            if older.exists():
                os.replace(older, self.directory / f"{self._name}.{index + 1}")
        os.replace(self.path, self.directory / f"{self._name}.1")
        for path in audit_files(self.directory, self._name)[: -self._keep]:
            path.unlink()  # beyond ``keep`` (it was lowered since those were written)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = 0
        self._sync_directory()

    def _sync_directory(self) -> None:
        if not self._fsync:
            return
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fail(self, exc: Exception) -> None:
        self._close_file()
        self._error = f"{type(exc).__name__}: {exc}"
        self._retry_at = time.monotonic() + self._retry_s
        if not self.failing:
            self.failing = True
            self._failing_since = time.time()
            log.error(
                "audit log %s cannot be written (%s): records are kept in memory (up to %d) "
                "and writing is retried every %g s",
                self.path,
                self._error,
                self._max_queue,
                self._retry_s,
                exc_info=not isinstance(exc, OSError),  # not the disk: a bug, show where
            )

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if self._fsync:
                os.fsync(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
