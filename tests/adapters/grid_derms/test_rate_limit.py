"""A flood of commands is refused beyond the configured rate, each with an answer."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.grid_derms.uplink import TokenBucket
from gateway.audit import read_lines
from simulators.broker import BrokerEndpoint
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually, iso
from unified.model import AckState, Reason


def test_token_bucket_gives_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 of a token
    assert bucket.take(0.5)  # one token after 0.5 s
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]  # never above burst


@pytest.fixture
async def fleet(broker_endpoint: BrokerEndpoint, tmp_path: Path) -> AsyncIterator[Fleet]:
    broker = {
        "host": broker_endpoint.host,
        "port": broker_endpoint.port,
        "protocol": broker_endpoint.protocol,
        "commands_per_s": 1.0,
        "commands_burst": 3,
    }
    sims = [
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10.0, max_charge_kw=5.0, max_discharge_kw=5.0, initial_soc_pct=60
        )
    ]
    async with Fleet(
        broker_endpoint, tmp_path / "gw.sqlite", sims, extra_config={"broker": broker}
    ) as f:
        yield f


async def test_a_flood_is_refused_beyond_the_rate_and_every_command_is_answered(
    fleet: Fleet,
) -> None:
    ids = [f"flood-{i}" for i in range(10)]
    started = time.monotonic()
    for cid in ids:
        await fleet.grid.send(
            json.dumps(
                {
                    "type": "setpoint",
                    "command_id": cid,
                    "device_id": "bat-1",
                    "kw": -1.0,
                    "start": iso(60),
                    "duration_s": 60,
                }
            ).encode()
        )

    def answered(cid: str) -> bool:
        o = fleet.grid.observed
        return bool(o.acks.get(cid)) or any(e.command_id == cid for e in o.errors)

    await fleet.grid.wait_for(lambda o: all(answered(c) for c in ids), 10)
    elapsed = time.monotonic() - started
    limited = {e.command_id for e in fleet.grid.observed.errors if e.reason is Reason.RATE_LIMITED}
    taken = {c for c in ids if AckState.ACCEPTED in fleet.grid.states(c)}
    assert taken | limited == set(ids)
    assert not taken & limited
    # The burst, and what the rate (1/s) refilled while they were being handled.
    assert 3 <= len(taken) <= 3 + elapsed + 1, (len(taken), elapsed)
    assert limited
    assert fleet.gateway is not None
    assert await fleet.gateway.store.count() == len(taken)
    # Each refusal is in the audit log, with its sender and reason; none reached the core.
    log = fleet.gateway.audit_log
    assert log is not None

    def audited() -> dict[str, dict[str, object]]:
        return {
            str(r.record["command_id"]): r.record
            for r in read_lines(log.directory)
            if r.record is not None and r.record["kind"] == "command.refused"
        }

    await eventually(lambda: set(audited()) == limited, 3, "refusals recorded")
    for record in audited().values():
        assert record["source"] == f"mqtt:{fleet.grid.topics.commands}"
        assert record["details"]["reason"] == "rate_limited"  # type: ignore[index]
