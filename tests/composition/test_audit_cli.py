"""``derms-gateway audit show|verify`` over a real log: filters, rotated files, a config file's
``[audit] path``, exit codes, and a log whose last line was cut short."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from composition.cli import main
from gateway.audit import AuditKind, AuditLog
from unified.model import DeviceCommand, LimitSource


def write_log(folder: Path, *, max_bytes: int = 1 << 20) -> dict[str, str]:
    """A small log; returns the times taken between its records (ISO)."""
    marks: dict[str, str] = {}

    def writes(device_id: str, *sources: tuple[str, str]) -> DeviceCommand:
        return DeviceCommand(
            device_id=device_id,
            power_kw=-2.5,
            provenance=tuple(LimitSource(command_id=c, kind=k) for c, k in sources),  # type: ignore[arg-type]
        )

    async def main() -> None:
        async with AuditLog(folder, max_bytes=max_bytes, keep=5) as log:
            log.record(
                AuditKind.COMMAND_RECEIVED,
                source="mqtt:derms/v1/gw/commands",
                command_id="d1",
                details={"command": {"type": "dispatch", "command_id": "d1", "kw": -5.0}},
            )
            log.record(AuditKind.COMMAND_ACCEPTED, source="core", command_id="d1")
            log.record(
                AuditKind.DEVICE_WRITE,
                source="core",
                command_id="d1",
                device_id="bat-1",
                details={"command": writes("bat-1", ("d1", "dispatch"))},
            )
            await asyncio.sleep(0.02)
            marks["middle"] = datetime.now(UTC).isoformat()
            await asyncio.sleep(0.02)
            # An envelope's write that also carries d1's share: found by --command d1.
            log.record(
                AuditKind.DEVICE_WRITE,
                source="core",
                command_id="env-1",
                device_id="bat-2",
                details={"command": writes("bat-2", ("env-1", "envelope"), ("d1", "dispatch"))},
            )
            log.record(
                AuditKind.COMMAND_RECEIVED,
                source="mqtt:derms/v1/gw/commands",
                command_id="x1",
                details={"command": {"type": "cancel", "command_id": "x1", "cancels": "d1"}},
            )
            log.record(
                AuditKind.COMMAND_REJECTED,
                source="core",
                command_id="d2",
                details={"reason": "unknown_group"},
            )

    asyncio.run(main())
    return marks


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["audit", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def shown(output: str) -> list[tuple[str, str, str]]:
    """(kind, command id, device id) of each printed record."""
    return [tuple(line.split()[2:5]) for line in output.splitlines()]  # type: ignore[misc]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "audit"


def test_show_prints_every_record_in_order_and_filters(folder: Path) -> None:
    marks = write_log(folder)
    code, out, _ = run("show", "--path", str(folder))
    assert code == 0
    assert [k for k, _, _ in shown(out)] == [
        "audit.started",
        "command.received",
        "command.accepted",
        "device.write",
        "device.write",
        "command.received",
        "command.rejected",
        "audit.stopped",
    ]
    assert "mqtt:derms/v1/gw/commands" in out.splitlines()[1]

    _, out, _ = run("show", "--path", str(folder), "--command", "d1")
    assert shown(out) == [
        ("command.received", "d1", "-"),
        ("command.accepted", "d1", "-"),
        ("device.write", "d1", "bat-1"),
        ("device.write", "env-1", "bat-2"),  # d1 is in its provenance
        ("command.received", "x1", "-"),  # it cancels d1
    ]
    _, out, _ = run("show", "--path", str(folder), "--device", "bat-2")
    assert shown(out) == [("device.write", "env-1", "bat-2")]
    _, out, _ = run("show", "--path", str(folder), "--kind", "command")
    assert [k for k, _, _ in shown(out)] == [
        "command.received",
        "command.accepted",
        "command.received",
        "command.rejected",
    ]
    _, out, _ = run(
        "show", "--path", str(folder), "--kind", "command.rejected", "--kind", "audit.started"
    )
    assert [k for k, _, _ in shown(out)] == ["audit.started", "command.rejected"]
    _, out, _ = run("show", "--path", str(folder), "--since", marks["middle"])
    assert [c for _, c, _ in shown(out)] == ["env-1", "x1", "d2", "-"]
    _, out, _ = run("show", "--path", str(folder), "--until", marks["middle"])
    assert [c for _, c, _ in shown(out)] == ["-", "d1", "d1", "d1"]


def test_show_json_prints_the_stored_lines(folder: Path) -> None:
    write_log(folder)
    code, out, _ = run("show", "--path", str(folder / "audit.jsonl"), "--json", "--device", "bat-1")
    assert code == 0
    stored = (folder / "audit.jsonl").read_text().splitlines()
    assert out.splitlines() == [line for line in stored if '"device_id":"bat-1"' in line]
    assert json.loads(out)["details"]["command"]["power_kw"] == -2.5


def test_show_and_verify_read_across_rotated_files(folder: Path) -> None:
    for _ in range(8):  # eight gateway runs, rotating every ~1 KiB
        write_log(folder, max_bytes=1024)
    assert len(list(folder.iterdir())) == 6  # audit.jsonl and the 5 kept
    code, out, _ = run("show", "--path", str(folder))
    seqs = [int(line.split()[1][1:]) for line in out.splitlines()]
    assert code == 0
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # oldest file first, no gap
    assert seqs[-1] == 64
    code, out, _ = run("verify", "--path", str(folder))
    assert code == 0, out
    assert out.startswith(f"ok: {len(seqs)} records (seq {seqs[0]}..64) in 6 file(s)")
    assert "older files were rotated away" in out


def test_verify_exits_1_at_a_changed_line(folder: Path) -> None:
    write_log(folder)
    code, out, _ = run("verify", "--path", str(folder))
    assert code == 0
    assert out.split(";")[1].strip() == "the chain is intact from the log's first record"
    path = folder / "audit.jsonl"
    text = path.read_text().splitlines()
    assert '"bat-1"' in text[3]
    text[3] = text[3].replace('"bat-1"', '"bat-9"')
    path.write_text("\n".join(text) + "\n")
    code, out, _ = run("verify", "--path", str(folder))
    assert code == 1
    assert out.splitlines()[0].startswith("broken: audit.jsonl line 4 (seq 4): changed after")


def test_a_cut_last_line_fails_verify_but_not_show(folder: Path) -> None:
    write_log(folder)
    path = folder / "audit.jsonl"
    path.write_bytes(path.read_bytes()[:-30])
    code, out, err = run("show", "--path", str(folder))
    assert code == 0
    assert len(out.splitlines()) == 7
    assert "audit.jsonl line 8: not an audit record, skipped" in err
    code, out, _ = run("verify", "--path", str(folder))
    assert code == 1
    assert out.startswith("broken: audit.jsonl line 8: not a complete line: a write cut short")


def test_the_log_is_found_from_a_config_file_relative_to_it(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "gw.toml").write_text(
        """
[store]
path = "gw.sqlite"
[audit]
path = "audit-trail"
[settlement]
timezone = "UTC"
[[devices]]
device_id = "bat-1"
der_class = "battery"
adapter = "sunspec_battery"
location = { substation = "s1", feeder = "f1" }
ratings = { max_charge_kw = 5, max_discharge_kw = 5, capacity_kwh = 10 }
sunspec = { port = 5020 }
"""
    )
    write_log(site / "audit-trail")
    code, out, _ = run("show", "--config", str(site / "gw.toml"), "--kind", "command.rejected")
    assert (code, shown(out)) == (0, [("command.rejected", "d2", "-")])
    code, out, _ = run("verify", "--config", str(site / "gw.toml"))
    assert code == 0, out
    # DERMS_CONFIG stands for --config; an explicit --path wins over it.
    env = {"DERMS_CONFIG": str(site / "gw.toml")}
    code, out, _ = run("show", "--kind", "command.rejected", env=env)
    assert (code, shown(out)) == (0, [("command.rejected", "d2", "-")])
    write_log(tmp_path / "other")
    code, out, _ = run("show", "--path", str(tmp_path / "other"), "--json", env=env)
    assert code == 0
    assert out == (tmp_path / "other" / "audit.jsonl").read_text()


def test_it_says_what_is_missing(tmp_path: Path) -> None:
    code, _, err = run("show")
    assert code == 2
    assert "--path or a gateway's --config" in err
    code, _, err = run("verify", "--path", str(tmp_path))
    assert code == 1
    assert "no audit log in" in err
    write_log(tmp_path / "a")
    code, _, err = run("show", "--path", str(tmp_path / "a"), "--since", "yesterday")
    assert code == 2
    assert "not an ISO 8601 time" in err
