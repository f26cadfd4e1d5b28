"""The audit log of a real gateway: a dispatch from Grid DERMS over a real broker to real Modbus
batteries, recorded from its sender to each device write; refusals recorded with their reason."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import read_lines, verify
from simulators.broker import BrokerEndpoint
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually, iso
from unified.model import AckState, Reason

pytestmark = pytest.mark.broker


@pytest.fixture
async def fleet(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Fleet]:
    sims = [
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10.0, max_charge_kw=5.0, max_discharge_kw=5.0, initial_soc_pct=60
        )
        for _ in range(4)
    ]
    async with Fleet(broker_endpoint, tmp_path / "gw.sqlite", sims) as f:
        yield f


def records(fleet: Fleet) -> list[dict[str, Any]]:
    assert fleet.gateway is not None
    assert fleet.gateway.audit_log is not None
    folder = fleet.gateway.audit_log.directory
    return [line.record for line in read_lines(folder) if line.record is not None]


def dispatch(cid: str, group: str, kw: float, duration: float) -> dict[str, object]:
    return {
        "type": "dispatch",
        "command_id": cid,
        "target": {"group_id": group},
        "kw": kw,
        "start": iso(0.5),
        "duration_s": duration,
    }


async def test_a_dispatch_is_recorded_from_its_sender_to_every_device_write_and_release(
    fleet: Fleet,
) -> None:
    f1 = [s for i, s in enumerate(fleet.sims) if fleet.feeder_of(i) == "f1"]
    await fleet.grid.send(
        dispatch("d1", "feeder:f1", -6.0, 2.0),
        reply=fleet.broker.protocol == "5",
        user_properties={"operator": "control-room-7"},
    )
    await fleet.grid.wait_for_state("d1", AckState.COMPLETED, 6)
    await eventually(lambda: all(not s.wset_enabled for s in f1), 3, "batteries released")
    await eventually(
        lambda: sum(r["kind"] == "device.write" for r in records(fleet)) >= 4, 3, "recorded"
    )

    about = [r for r in records(fleet) if r["command_id"] == "d1" or r["kind"] == "device.write"]
    kinds = [r["kind"] for r in about]
    received = about[0]
    assert received["kind"] == "command.received"
    assert received["source"].startswith(f"mqtt:{fleet.grid.topics.commands}")
    if fleet.broker.protocol == "5":  # what MQTT 5 tells us of the sender
        assert f"response_topic={fleet.grid.reply_topic}" in received["source"]
        assert received["source"].endswith(";operator=control-room-7")
    assert received["details"]["command"]["kw"] == -6.0
    assert received["details"]["command"]["target"] == {"group_id": "feeder:f1"}
    assert kinds[1:3] == ["command.accepted", "command.active"]

    writes = [r for r in about if r["kind"] == "device.write"]
    assert {r["device_id"] for r in writes} == {"bat-1", "bat-3"}, "f2 is never written"
    first = {r["device_id"]: r for r in reversed(writes)}
    for device_id in ("bat-1", "bat-3"):
        details = first[device_id]["details"]["command"]
        assert first[device_id]["command_id"] == "d1"
        assert details["power_kw"] == pytest.approx(-3.0)
        assert details["provenance"][0] == {"command_id": "d1", "kind": "dispatch"}
    assert kinds.index("command.active") < kinds.index("device.write")

    # Released when it completed: one release per device, naming what it releases.
    completed = kinds.index("command.completed")
    releases = [r for r in about[completed:] if r["kind"] == "device.write"]
    assert sorted(r["device_id"] for r in releases) == ["bat-1", "bat-3"]
    assert all(r["details"]["command"] is None for r in releases)
    assert all(r["details"]["released"]["provenance"][0]["command_id"] == "d1" for r in releases)
    # Only changes are recorded, not every control cycle's unchanged command.
    for device_id in ("bat-1", "bat-3"):
        mine = [r["details"] for r in writes if r["device_id"] == device_id]
        assert all(a != b for a, b in itertools.pairwise(mine)), mine
    assert fleet.gateway is not None
    assert fleet.gateway.audit_log is not None
    assert verify(fleet.gateway.audit_log.directory).ok


async def test_refused_commands_and_inputs_are_recorded_with_their_reason(fleet: Fleet) -> None:
    await fleet.grid.send(dispatch("bad-1", "feeder:nowhere", -1.0, 5.0))
    await fleet.grid.wait_for_state("bad-1", AckState.REJECTED, 5)
    await fleet.grid.send(b"{not json")
    await fleet.grid.send(b'{"type": "dispatch", "command_id": "bad-2", "kw": "lots"}')
    await fleet.grid.wait_for_state("bad-2", AckState.REJECTED, 5)
    await fleet.grid.wait_for(lambda o: any(e.reason is Reason.MALFORMED_JSON for e in o.errors), 5)
    await eventually(
        lambda: (
            {"bad-2", None}
            <= {r["command_id"] for r in records(fleet) if r["kind"].endswith(".refused")}
        ),
        3,
        "refusals recorded",
    )
    by_kind = {(r["kind"], r["command_id"]): r for r in records(fleet)}
    commands = f"mqtt:{fleet.grid.topics.commands}"

    assert by_kind["command.received", "bad-1"]["source"] == commands
    rejected = by_kind["command.rejected", "bad-1"]["details"]
    assert rejected["reason"] == "unknown_group"
    assert "nowhere" in rejected["detail"]

    undecodable = by_kind["input.refused", None]
    assert undecodable["source"] == commands
    assert undecodable["details"]["reason"] == "malformed_json"
    assert undecodable["details"]["payload_excerpt"] == "{not json"

    invalid = by_kind["command.refused", "bad-2"]
    assert invalid["details"]["reason"] == "schema_violation"
    assert ("command.received", "bad-2") not in by_kind, "it never reached the core"
