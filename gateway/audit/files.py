"""The audit log on disk: file names, the record format and its hash chain, reading, verifying.

One record per line, a JSON object with the keys of :data:`FIELDS` in that order. ``prev`` is
the SHA-256 (hex) of the bytes of the line before it (without its newline), across rotated
files and restarts, so changing, removing or inserting a line breaks the chain at that place.
The very first record of a log has ``prev`` :data:`GENESIS` and ``seq`` 1.

The current file is ``audit.jsonl``; rotation renames it ``audit.jsonl.1`` (the previous ``.1``
becoming ``.2``, and so on), so the files in write order are ``.N`` … ``.1``, then
``audit.jsonl``. Nothing here writes; :class:`gateway.audit.AuditLog` does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CURRENT",
    "FIELDS",
    "GENESIS",
    "AuditLine",
    "Problem",
    "Verification",
    "audit_files",
    "last_line",
    "line_hash",
    "parse_record",
    "read_lines",
    "verify",
]

CURRENT: Final = "audit.jsonl"
GENESIS: Final = "0" * 64
FIELDS: Final = ("ts", "seq", "kind", "source", "command_id", "device_id", "details", "prev")


def line_hash(line: bytes) -> str:
    """What the next record's ``prev`` must be: SHA-256 of the line without its newline."""
    return hashlib.sha256(line).hexdigest()


def _rotated_index(path: Path, name: str) -> int | None:
    suffix = path.name[len(name) + 1 :]
    if not path.name.startswith(f"{name}.") or not suffix.isdigit():
        return None
    return int(suffix)


def audit_files(directory: Path, name: str = CURRENT) -> list[Path]:
    """The log's files in write order: the oldest rotated file first, the current one last."""
    if not directory.is_dir():
        return []
    rotated = sorted(
        (index, p)
        for p in directory.iterdir()
        if (index := _rotated_index(p, name)) is not None and p.is_file()
    )
    files = [p for _, p in reversed(rotated)]
    current = directory / name
    if current.is_file():
        files.append(current)
    return files


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """The record on one line, or None when the line is not one (torn, edited into garbage)."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    seq, ts, kind, prev = (record.get(k) for k in ("seq", "ts", "kind", "prev"))
    if (
        not isinstance(seq, int)
        or isinstance(seq, bool)
        or not isinstance(ts, str)
        or not isinstance(kind, str)
        or not isinstance(prev, str)
        or not isinstance(record.get("details", {}), dict | None)
    ):
        return None
    return record


@dataclass(frozen=True, slots=True)
class AuditLine:
    path: Path
    number: int
    """1-based line number in ``path``."""
    raw: bytes
    """The line's bytes without the newline (what the next record's ``prev`` hashes)."""
    record: dict[str, Any] | None
    """None: the line is not a record."""
    terminated: bool = True
    """False for a last line without its newline: a write cut short."""

    @property
    def place(self) -> str:
        return f"{self.path.name} line {self.number}"


def read_lines(directory: Path, name: str = CURRENT) -> Iterator[AuditLine]:
    """Every line of the log in write order, records parsed (one file open at a time)."""
    for path in audit_files(directory, name):
        with path.open("rb") as fh:
            for number, line in enumerate(fh, start=1):
                terminated = line.endswith(b"\n")
                raw = line[:-1] if terminated else line
                yield AuditLine(path, number, raw, parse_record(raw), terminated)


def last_line(path: Path) -> tuple[bytes | None, int | None]:
    """The last line of ``path`` (without newline) and the ``seq`` of its last readable record,
    reading from the end (a file's tail, not the whole file, unless its end is unreadable)."""
    size = path.stat().st_size
    window = 64 * 1024
    last: bytes | None = None
    with path.open("rb") as fh:
        while size:
            start = max(0, size - window)
            fh.seek(start)
            lines = fh.read(size - start).split(b"\n")
            if lines[-1] == b"":
                lines.pop()  # the file ends with a newline
            if start > 0:
                lines = lines[1:]  # the first may be the end of a longer line
            if last is None and lines:
                last = lines[-1]
            for raw in reversed(lines):
                if (record := parse_record(raw)) is not None:
                    return last, int(record["seq"])
            if start == 0:
                break
            window *= 4
    return last, None


@dataclass(frozen=True, slots=True)
class Problem:
    place: str
    """``audit.jsonl.2 line 17``."""
    seq: int | None
    what: str

    def __str__(self) -> str:
        where = self.place if self.seq is None else f"{self.place} (seq {self.seq})"
        return f"{where}: {self.what}"


@dataclass(slots=True)
class Verification:
    files: list[Path] = field(default_factory=list)
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    from_genesis: bool = False
    """The first record is the log's very first (nothing was rotated away)."""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(directory: Path, name: str = CURRENT) -> Verification:
    """Check the hash chain and the sequence over every file of the log.

    A changed line breaks the link to the line after it (that line's ``prev`` is no longer the
    changed line's hash): it is reported at the changed line. Removed or inserted lines break
    the chain and the sequence where they were. A line that is not a record (a write cut short
    by a power loss, or garbage) is reported as such; the writer chains the next record to it,
    so only that line is reported. The first record's ``prev`` can only be checked when it is
    the log's first record (:data:`GENESIS`); older files may have been rotated away.
    """
    result = Verification(files=audit_files(directory, name))
    before: AuditLine | None = None
    seq: int | None = None
    for line in read_lines(directory, name):
        record = line.record
        if record is None:
            what = (
                "not a complete line: a write cut short (power loss or crash while writing)"
                if not line.terminated
                else "not an audit record (a write cut short, or the line was changed)"
            )
            result.problems.append(Problem(line.place, None, what))
            before = line
            continue
        result.records += 1
        current = int(record["seq"])
        if before is None:
            result.first_seq = current
            result.from_genesis = record["prev"] == GENESIS and current == 1
            if record["prev"] == GENESIS and current != 1:
                result.problems.append(
                    Problem(line.place, current, "starts a new chain but is not seq 1")
                )
        elif record["prev"] != line_hash(before.raw):
            gone = seq is not None and current != seq + 1
            result.problems.append(
                Problem(
                    before.place,
                    None if before.record is None else int(before.record["seq"]),
                    "records between this line and the next were removed or inserted "
                    f"(seq {seq} then {current})"
                    if gone
                    else f"changed after it was written ({line.place}'s prev is not its hash)",
                )
            )
        elif seq is not None and current != seq + 1:
            result.problems.append(Problem(line.place, current, f"seq {current} follows seq {seq}"))
        seq = current
        result.last_seq = current
        before = line
    return result
