"""The core's audit trail: commands with their sender, every lifecycle step and refusal; and a
gateway that keeps taking commands whatever the audit log's disk does."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from composition.config import parse_config
from gateway.audit import verify
from gateway.commands import CommandRejected
from gateway.core import Gateway
from gateway.flex import FlexForecast
from tests.gateway.test_audit import eventually, records
from unified.model import (
    Ack,
    AckState,
    DeviceSetpoint,
    DeviceTelemetry,
    GroupTelemetry,
    utcnow,
)


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


class Acks:
    """The core's publisher: keeps the acks."""

    def __init__(self) -> None:
        self.acks: list[Ack] = []

    def ack(self, ack: Ack, reply: object | None) -> None:
        self.acks.append(ack)

    def group_telemetry(self, telemetry: GroupTelemetry) -> None:
        pass

    def device_telemetry(self, telemetry: DeviceTelemetry) -> None:
        pass

    def flex_forecast(self, forecast: FlexForecast) -> None:
        pass

    def performance_report(self, command_id: str, report: bytes) -> None:
        pass


def core(tmp_path: Path, audit: dict[str, Any]) -> tuple[Gateway, Acks]:
    config = parse_config(
        {
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "history": {"enabled": False},
            "audit": audit,
            "devices": [
                {
                    "device_id": "bat-1",
                    "der_class": "battery",
                    "adapter": "sunspec_battery",
                    "location": {"substation": "s1", "feeder": "f1"},
                    "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
                    "sunspec": {"port": 5020},
                }
            ],
        }
    )
    publisher = Acks()
    devices = [d.as_device() for d in config.devices]
    return Gateway(config, devices=devices, adapters={}, publisher=publisher), publisher


def setpoint(cid: str, device_id: str = "bat-1", start_in_s: float = 0.0) -> DeviceSetpoint:
    return DeviceSetpoint(
        command_id=cid,
        device_id=device_id,
        kw=-1.0,
        start=utcnow() + timedelta(seconds=start_in_s),
        duration_s=60,
    )


async def test_the_core_records_commands_with_their_source_and_every_lifecycle_step(
    tmp_path: Path,
) -> None:
    gateway, _ = core(tmp_path, {"path": str(tmp_path / "audit")})
    task = asyncio.create_task(gateway.run())
    try:
        await gateway.ready.wait()
        s1 = setpoint("s1", start_in_s=1.0)  # active once the others are in
        await gateway.submit(s1, source="mqtt:gw/commands;sender=ops")
        await gateway.submit(s1, source="mqtt:gw/commands")  # a redelivery
        await gateway.submit(setpoint("s2", device_id="nope"), source="openadr-vtn:vtn-1")
        with pytest.raises(CommandRejected):
            await gateway.submit(s1.model_copy(update={"kw": -2.0}), source="sep2-server:x")
        assert gateway.audit_log is not None
        folder = gateway.audit_log.directory
        await eventually(lambda: "command.active" in [r["kind"] for r in records(folder)])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert folder == tmp_path / "audit"  # the configured path
    seen = [
        (r["kind"], r["command_id"], r["source"], (r["details"] or {}).get("reason"))
        for r in records(folder)
        if r["kind"].startswith("command.")
    ]
    assert seen == [
        ("command.received", "s1", "mqtt:gw/commands;sender=ops", None),
        ("command.accepted", "s1", "core", None),
        ("command.redelivered", "s1", "mqtt:gw/commands", None),
        ("command.received", "s2", "openadr-vtn:vtn-1", None),
        ("command.rejected", "s2", "core", "unknown_device"),
        ("command.refused", "s1", "sep2-server:x", "duplicate_id_conflict"),
        ("command.active", "s1", "core", None),
    ]
    received = next(r for r in records(folder) if r["kind"] == "command.received")
    assert received["details"]["command"]["kw"] == -1.0  # what was asked, in full
    assert verify(folder).ok


async def test_a_failing_and_full_audit_log_never_stops_the_gateway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "disk"
    blocker.write_text("not a folder")
    gateway, publisher = core(
        tmp_path, {"path": str(blocker / "audit"), "max_queue": 100, "retry_s": 0.05}
    )
    task = asyncio.create_task(gateway.run())
    try:
        await gateway.ready.wait()
        log = gateway.audit_log
        assert log is not None
        for i in range(60):  # about 3 records each: beyond what the log may hold
            await gateway.submit(setpoint(f"s{i}"))
        assert all(
            any(a.command_id == f"s{i}" and a.state is AckState.ACCEPTED for a in publisher.acks)
            for i in range(60)
        ), "commands are taken whatever the audit log's disk does"
        assert log.failing
        assert log.dropped > 0
        assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1
        assert sum("dropping records" in r.getMessage() for r in caplog.records) == 1

        blocker.unlink()  # the disk is back
        await eventually(lambda: not log.failing)
        await gateway.submit(setpoint("after"))
        await eventually(lambda: any(r["command_id"] == "after" for r in records(log.directory)))
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    written = records(log.directory)
    gaps = [r["details"] for r in written if r["kind"] == "audit.gap"]
    assert [g["cause"] for g in gaps] == ["write failed", "queue full"]
    assert gaps[1]["dropped"] == log.dropped
    assert verify(log.directory).ok


def test_a_disabled_audit_log_writes_nothing(tmp_path: Path) -> None:
    gateway, _ = core(tmp_path, {"enabled": False})
    assert gateway.audit_log is None
    assert not (tmp_path / "gw-audit").exists()


def test_the_default_folder_is_next_to_the_store(tmp_path: Path) -> None:
    gateway, _ = core(tmp_path, {})
    assert gateway.audit_log is not None
    assert gateway.audit_log.directory == tmp_path / "gw-audit"
