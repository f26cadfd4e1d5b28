"""The audit log on real files: format, hash chain, rotation, restarts, a line cut short, a full
queue and a failing disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import GENESIS, AuditKind, AuditLog, RefusalRecorder, read_lines, verify
from gateway.audit.files import FIELDS
from unified.model import (
    DeviceCommand,
    LimitSource,
    Reason,
)


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


def records(directory: Path) -> list[dict[str, Any]]:
    return [line.record for line in read_lines(directory) if line.record is not None]


def write(log: AuditLog, n: int, prefix: str = "c") -> None:
    command = DeviceCommand(
        device_id="bat-1",
        power_kw=-3.0,
        provenance=(LimitSource(command_id="d1", kind="dispatch"),),
    )
    for i in range(n):
        log.record(
            AuditKind.DEVICE_WRITE,
            source="core",
            command_id=f"{prefix}{i}",
            device_id="bat-1",
            details={"command": command},
        )


async def test_records_are_json_lines_chained_from_genesis_and_across_a_restart(
    tmp_path: Path,
) -> None:
    async with AuditLog(tmp_path) as log:
        log.record(
            AuditKind.COMMAND_RECEIVED,
            source="mqtt:derms/v1/gw/commands",
            command_id="d1",
            details={"reason": Reason.UNKNOWN_GROUP, "n": 1},
        )
        write(log, 2)
    first = lines(tmp_path / "audit.jsonl")
    parsed = [json.loads(line) for line in first]
    assert [tuple(r) for r in parsed] == [FIELDS] * 5  # every field, in this order
    assert [r["seq"] for r in parsed] == [1, 2, 3, 4, 5]
    assert [r["kind"] for r in parsed] == [
        "audit.started",
        "command.received",
        "device.write",
        "device.write",
        "audit.stopped",
    ]
    assert parsed[1]["source"] == "mqtt:derms/v1/gw/commands"
    assert parsed[1]["details"] == {"reason": "unknown_group", "n": 1}
    assert parsed[2]["details"]["command"] == {
        "power_kw": -3.0,
        "provenance": [{"command_id": "d1", "kind": "dispatch"}],
    }
    assert parsed[0]["ts"].endswith("+00:00")
    assert parsed[0]["prev"] == GENESIS
    for before, line in zip(first, parsed[1:], strict=False):
        assert line["prev"] == hashlib.sha256(before).hexdigest()

    async with AuditLog(tmp_path) as log:  # a restart appends and continues the chain
        write(log, 1)
    after = lines(tmp_path / "audit.jsonl")
    assert after[:5] == first, "never rewritten"
    resumed = json.loads(after[5])
    assert resumed["kind"] == "audit.started"
    assert resumed["seq"] == 6
    assert resumed["prev"] == hashlib.sha256(first[-1]).hexdigest()
    result = verify(tmp_path)
    assert result.ok, result.problems
    assert (result.records, result.first_seq, result.last_seq, result.from_genesis) == (
        8,
        1,
        8,
        True,
    )


async def test_rotation_keeps_n_files_and_the_chain_verifies_across_them(tmp_path: Path) -> None:
    async with AuditLog(tmp_path, max_bytes=4096, keep=2) as log:
        write(log, 150)
    assert sizes(tmp_path).keys() == {"audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"}
    assert max(sizes(tmp_path).values()) <= 4096
    oldest_kept = json.loads(lines(tmp_path / "audit.jsonl.2")[0])
    result = verify(tmp_path)
    assert result.ok, result.problems
    assert not result.from_genesis  # the first files were rotated away
    assert result.first_seq == oldest_kept["seq"] > 1
    assert result.last_seq == 152
    # The chain runs through the rotations: each file's first record names the previous
    # file's last line.
    last_of_1 = lines(tmp_path / "audit.jsonl.1")[-1]
    assert (
        json.loads(lines(tmp_path / "audit.jsonl")[0])["prev"]
        == hashlib.sha256(last_of_1).hexdigest()
    )


async def test_lowering_keep_deletes_the_oldest_files_at_the_next_rotation(
    tmp_path: Path,
) -> None:
    async with AuditLog(tmp_path, max_bytes=4096, keep=5) as log:
        write(log, 150)
    assert len(sizes(tmp_path)) == 6
    async with AuditLog(tmp_path, max_bytes=4096, keep=2) as log:
        write(log, 20)
    assert sizes(tmp_path).keys() == {"audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"}
    assert verify(tmp_path).ok


async def test_a_changed_line_and_a_removed_line_fail_verify_where_they_are(
    tmp_path: Path,
) -> None:
    async with AuditLog(tmp_path) as log:
        write(log, 6)
    path = tmp_path / "audit.jsonl"
    original = lines(path)
    assert verify(tmp_path).ok

    changed = list(original)
    changed[3] = changed[3].replace(b'"power_kw":-3.0', b'"power_kw":-1.0')
    assert changed[3] != original[3]
    path.write_bytes(b"\n".join(changed) + b"\n")
    result = verify(tmp_path)
    assert not result.ok
    assert result.problems[0].place == "audit.jsonl line 4"
    assert result.problems[0].seq == 4
    assert "changed" in result.problems[0].what
    assert len(result.problems) == 1

    removed = original[:2] + original[3:]
    path.write_bytes(b"\n".join(removed) + b"\n")
    result = verify(tmp_path)
    assert not result.ok
    assert result.problems[0].place == "audit.jsonl line 2"
    assert "removed" in result.problems[0].what


async def test_a_last_line_cut_short_is_reported_and_the_next_start_ends_it(
    tmp_path: Path,
) -> None:
    async with AuditLog(tmp_path) as log:
        write(log, 3)
    path = tmp_path / "audit.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])  # power loss in the middle of the last write
    result = verify(tmp_path)
    assert [(p.place, "cut short" in p.what) for p in result.problems] == [
        ("audit.jsonl line 5", True)
    ]
    assert [r["seq"] for r in records(tmp_path)] == [1, 2, 3, 4]  # readable ones only

    async with AuditLog(tmp_path) as log:
        write(log, 1)
    result = verify(tmp_path)
    # Only the cut line: the chain continues from it, the sequence from the last record.
    assert [p.place for p in result.problems] == ["audit.jsonl line 5"]
    assert [r["seq"] for r in records(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]
    assert path.read_bytes().startswith(whole[:-40] + b"\n")


async def test_a_full_queue_drops_counts_and_records_the_gap(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, max_queue=100)
    write(log, 130, prefix="before")  # nothing writes yet: 100 wait, 30 are dropped
    assert log.dropped == 30
    async with log:  # its own audit.started is dropped too: the queue is still full
        await eventually(lambda: log.written >= 100)
        write(log, 1, prefix="after")
    assert log.dropped == 31
    written = records(tmp_path)
    kinds = [r["kind"] for r in written]
    assert kinds.count("device.write") == 101
    gap = written[100]
    assert gap["kind"] == "audit.gap"
    assert gap["details"]["cause"] == "queue full"
    assert gap["details"]["dropped"] == 31
    assert written[99]["command_id"] == "before99"
    assert written[101]["command_id"] == "after0"
    assert verify(tmp_path).ok


async def test_an_unwritable_folder_keeps_the_records_and_writes_them_when_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "disk"
    blocker.write_text("a file where the audit folder should be")
    folder = blocker / "audit"
    log = AuditLog(folder, retry_s=0.05)
    async with log:
        write(log, 5)
        await eventually(lambda: log.failing)
        await asyncio.sleep(0.3)  # several retries
        assert log.written == 0
        errors = [r for r in caplog.records if "cannot be written" in r.getMessage()]
        assert len(errors) == 1, "said once, not at every retry"
        blocker.unlink()
        await eventually(lambda: not log.failing and log.written >= 7)
    written = records(folder)
    assert written[0]["kind"] == "audit.gap"
    assert written[0]["details"]["cause"] == "write failed"
    assert "NotADirectoryError" in written[0]["details"]["error"]
    assert [r["kind"] for r in written[1:3]] == ["audit.started", "device.write"]
    assert [r["command_id"] for r in written[2:7]] == [f"c{i}" for i in range(5)]
    assert written[-1]["kind"] == "audit.stopped"
    assert log.dropped == log.lost == 0
    assert verify(folder).ok


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def test_refusals_are_recorded_once_a_minute_per_source_and_reason_with_the_count() -> None:
    class Collect:
        def __init__(self) -> None:
            self.records: list[tuple[AuditKind, str | None, dict[str, object]]] = []

        def record(self, kind: AuditKind, *, source: str | None = None, **kw: Any) -> None:
            self.records.append((kind, source, dict(kw["details"])))

    clock = [100.0]
    trail = Collect()
    recorder = RefusalRecorder(trail, "ocpp_central", monotonic=lambda: clock[0])  # type: ignore[arg-type]
    for _ in range(5):
        recorder("ocpp:CP-1@10.0.0.9", "wrong_password", "bad credentials")
    recorder("ocpp:CP-2@10.0.0.9", "unknown_id", "no such charger")
    assert [(s, d["reason"]) for _, s, d in trail.records] == [
        ("ocpp:CP-1@10.0.0.9", "wrong_password"),
        ("ocpp:CP-2@10.0.0.9", "unknown_id"),
    ]
    assert all(k is AuditKind.ACCESS_REFUSED for k, _, _ in trail.records)
    clock[0] += 61
    recorder("ocpp:CP-1@10.0.0.9", "wrong_password", "bad credentials")
    last = trail.records[-1][2]
    assert last["refused_since_last_record"] == 4
    assert last["endpoint"] == "ocpp_central"
