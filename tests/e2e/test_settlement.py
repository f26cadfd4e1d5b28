"""End to end: a dispatch on real Modbus batteries is settled against history the running
gateway recorded, and the published report is checked against a baseline computed here.

The gateway runs with a `[settlement] timezone` whose calendar day differs from UTC's at the
moment the test runs (Honolulu, UTC-10, or Kiritimati, UTC+14), so a baseline on UTC days would
select other days; weeks of history are fed to
its history store while it runs (its own writer task puts them on disk) at the event's *local
clock time* on earlier local days, with 1-second buckets and 1-second settlement intervals so
the event can last seconds. One earlier day of bat-2 has no data and one earlier day of bat-1
was an event day. The test selects the similar days, averages them, and computes the day-of
adjustment from the readings the gateway saw before the event, all on its own (none of the
gateway's baseline code is called), and compares the report with that. The batteries idle
before the event, so the adjustment hits its -20 % cap.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.flex import PerformanceReport
from simulators.broker import BrokerEndpoint
from simulators.sunspec_battery import SunSpecBatterySimulator
from tests.e2e.fleet import Fleet, eventually
from unified.model import AckState, DeviceState, utcnow

pytestmark = pytest.mark.broker

# Whichever of the two puts the local day on another date than the UTC day right now.
ZONE = ZoneInfo("Pacific/Honolulu" if datetime.now(UTC).hour < 10 else "Pacific/Kiritimati")
DURATION_S = 8
LEAD_S = 25  # the gateway runs this long before the event: the day-of adjustment window
LOOKBACK_DAYS = 30
ADJ_OFFSET_S, ADJ_DURATION_S = 2, 10
MISSING = ("bat-2", 3)  # bat-2 has no data 3 local days back
EVENT_DAY = ("bat-1", 1)  # bat-1 had an event 1 local day back


def seeded_kw(device: str, back: int) -> float:
    """What each device drew at the event's clock time ``back`` local days ago (kW, +import)."""
    return 1.0 + 0.05 * back if device == "bat-1" else 0.5 + 0.1 * back


def same_clock_time(when: datetime, back: int) -> datetime:
    """``when``'s local clock time ``back`` local days earlier, in UTC."""
    local = when.astimezone(ZONE)
    day = local.date() - timedelta(days=back)
    return datetime.combine(day, local.time(), ZONE).astimezone(UTC)


def similar_days(device: str, event_day: date) -> list[int]:
    """10-in-10 (weekday) or 4-in-4 (weekend), days back, skipping the device's event day and
    the day it has no data: computed here, independently of the gateway."""
    weekend = event_day.weekday() >= 5
    want = 4 if weekend else 10
    picked = [
        back
        for back in range(1, LOOKBACK_DAYS + 1)
        if ((event_day - timedelta(days=back)).weekday() >= 5) == weekend
        and (device, back) not in (MISSING, EVENT_DAY)
    ]
    return picked[:want]


class ReportListener:
    """A second Grid DERMS client: performance reports, and MQTT 5 requests for them."""

    def __init__(self, broker: BrokerEndpoint, gateway_id: str) -> None:
        self.root = f"derms/v1/{gateway_id}"
        self.reply_topic = f"derms/v1/replies/settlement-test-{uuid.uuid4().hex[:8]}"
        self.reports: dict[str, bytes] = {}
        self.replies: list[tuple[bytes, bytes | None]] = []
        self._client = aiomqtt.Client(
            broker.host,
            broker.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            identifier=f"settlement-test-{uuid.uuid4().hex[:8]}",
            timeout=10,
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReportListener:
        await self._client.__aenter__()
        await self._client.subscribe(f"{self.root}/performance/+", qos=1)
        await self._client.subscribe(self.reply_topic, qos=1)
        self._task = asyncio.create_task(self._receive(), name="settlement-test-receive")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.__aexit__(None, None, None)

    async def _receive(self) -> None:
        async for message in self._client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if str(message.topic) == self.reply_topic:
                corr = getattr(message.properties, "CorrelationData", None)
                self.replies.append((payload, bytes(corr) if corr else None))
            else:
                self.reports[str(message.topic).rsplit("/", 1)[-1]] = payload

    async def request(self, command_id: str, correlation: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        await self._client.publish(
            f"{self.root}/requests/performance",
            json.dumps({"command_id": command_id}).encode(),
            qos=1,
            properties=props,
        )


def seed_through(fleet: Fleet, event_start: datetime) -> None:
    """One reading per second at the event's local clock time, every earlier day of the
    look-back, into the running gateway's history (its writer task flushes them)."""
    gateway = fleet.gateway
    assert gateway is not None
    assert gateway.history is not None
    for back in range(1, LOOKBACK_DAYS + 1):
        day_start = same_clock_time(event_start, back)
        for s in range(-(ADJ_OFFSET_S + ADJ_DURATION_S), DURATION_S):
            for device in ("bat-1", "bat-2"):
                if (device, back) == MISSING:
                    continue
                when = day_start + timedelta(seconds=s + 0.5)
                gateway.history.observe(device, when, seeded_kw(device, back))


@pytest.fixture
async def fleet_and_event(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> AsyncIterator[tuple[Fleet, datetime]]:
    event_start = datetime.fromtimestamp(math.ceil(time.time()) + LEAD_S, UTC)
    sims = [
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10.0, max_charge_kw=5.0, max_discharge_kw=5.0, initial_soc_pct=60
        )
        for _ in range(2)
    ]
    extra: dict[str, Any] = {
        "history": {"path": str(tmp_path / "history.sqlite"), "interval_s": 1, "flush_s": 0.5},
        "settlement": {
            "timezone": ZONE.key,
            "delay_s": 1.0,
            "fallback_window_s": 10,
            "baseline": {
                "interval_s": 1,
                "lookback_days": LOOKBACK_DAYS,
                "adjustment_offset_s": ADJ_OFFSET_S,
                "adjustment_duration_s": ADJ_DURATION_S,
                "min_coverage": 0.5,
            },
        },
    }
    async with Fleet(
        broker_endpoint, tmp_path / "gw.sqlite", sims, feeders=("f1",), extra_config=extra
    ) as fleet:
        gateway = fleet.gateway
        assert gateway is not None
        assert gateway.history is not None
        seed_through(fleet, event_start)
        event_day = event_start.astimezone(ZONE).date()
        await gateway.history.add_event_days(
            "ev-0", {EVENT_DAY[0]: [event_day - timedelta(days=EVENT_DAY[1])]}
        )
        history = gateway.history
        await eventually(lambda: history.pending < 100, 10, "the gateway's writer to flush")
        yield fleet, event_start


async def test_dispatch_is_settled_against_an_independently_computed_baseline(
    fleet_and_event: tuple[Fleet, datetime], broker_endpoint: BrokerEndpoint
) -> None:
    fleet, event_start = fleet_and_event
    gateway = fleet.gateway
    assert gateway is not None
    seen: list[DeviceState] = []
    gateway.state_listeners.append(seen.append)
    event_end = event_start + timedelta(seconds=DURATION_S)
    event_day = event_start.astimezone(ZONE).date()
    assert event_day != event_start.date(), "the zone must put the event on another date"

    async with ReportListener(broker_endpoint, fleet.gateway_id) as listener:
        await fleet.grid.send(
            {
                "type": "dispatch",
                "command_id": "ev-1",
                "target": {"group_id": "feeder:f1"},
                "kw": -6.0,
                "start": event_start.isoformat(),
                "duration_s": DURATION_S,
            }
        )
        # What the batteries really do, sampled straight from the simulators.
        physical: list[tuple[datetime, float]] = []
        await asyncio.sleep(max(0.0, (event_start - utcnow()).total_seconds()))
        while utcnow() < event_end:
            physical.append((utcnow(), sum(s.power_kw for s in fleet.sims)))
            await asyncio.sleep(0.05)
        await fleet.grid.wait_for_state("ev-1", AckState.COMPLETED, 15)
        await eventually(lambda: "ev-1" in listener.reports, 30, "the performance report")
        report = PerformanceReport.model_validate_json(listener.reports["ev-1"])

        # ---- the window and the event
        assert report.final_state is AckState.COMPLETED
        assert (report.start, report.end) == (event_start, event_end)
        assert report.interval_s == 1
        assert report.requested_kw == pytest.approx(-6.0)
        assert {d.device_id for d in report.devices} == {"bat-1", "bat-2"}
        assert all(d.allocated and d.requested_kw == pytest.approx(-3.0) for d in report.devices)

        # ---- the baseline, computed here: similar local days, their mean, the capped ratio
        def bucket_means(device: str, t0: datetime, t1: datetime) -> list[float]:
            out = []
            for k in range(int((t1 - t0).total_seconds())):
                a = t0 + timedelta(seconds=k)
                vals = [
                    s.power_kw
                    for s in seen
                    if s.device_id == device and a <= s.timestamp < a + timedelta(seconds=1)
                ]
                if vals:
                    out.append(float(np.mean(vals)))
            return out

        adj_end = event_start - timedelta(seconds=ADJ_OFFSET_S)
        adj_start = adj_end - timedelta(seconds=ADJ_DURATION_S)
        expected_group = 0.0
        for row in report.devices:
            assert row.baseline is not None
            days_back = similar_days(row.device_id, event_day)
            mean = float(np.mean([seeded_kw(row.device_id, b) for b in days_back]))
            actual = bucket_means(row.device_id, adj_start, adj_end)
            raw = float(np.mean(actual)) / mean
            factor = min(1.2, max(0.8, raw))
            assert row.baseline.event_day == event_day
            assert row.baseline.selected_days == tuple(
                event_day - timedelta(days=b) for b in days_back
            )
            assert row.baseline.unadjusted_kw == pytest.approx([mean] * DURATION_S, abs=1e-9)
            assert row.baseline.raw_adjustment_factor == pytest.approx(raw, abs=1e-9)
            assert row.baseline.adjustment_factor == pytest.approx(factor)
            assert row.baseline.kw == pytest.approx([factor * mean] * DURATION_S, abs=1e-9)
            assert row.baseline.quality.value == "good"
            expected_group += factor * mean
        group = report.group
        assert group is not None
        assert group.baseline_kw == pytest.approx([expected_group] * DURATION_S, abs=1e-9)
        assert not any(f.code.value == "window_widened" for f in report.flags)

        # ---- the metered side is exactly what the gateway read, second by second
        for row in report.devices:
            assert row.performance is not None
            for i, metered in enumerate(row.performance.metered_kw):
                t0 = event_start + timedelta(seconds=i)
                values = bucket_means(row.device_id, t0, t0 + timedelta(seconds=1))
                if values:
                    assert metered == pytest.approx(values[0], abs=1e-9)
                else:
                    assert metered is None
        # ... and close to what the batteries physically did (poll lag blurs the edges only).
        physical_mean = float(np.mean([kw for _, kw in physical]))
        assert physical_mean < -4.5, "the batteries discharged during the event"
        metered_mean = float(np.mean(group.metered_kw))
        assert metered_mean == pytest.approx(physical_mean, abs=1.0)

        # ---- delivered = metered - baseline; ratio against the -6 kW request
        assert group.mean_delivered_kw == pytest.approx(metered_mean - expected_group, abs=1e-9)
        assert report.delivered_kwh == pytest.approx(
            (metered_mean - expected_group) * DURATION_S / 3600, abs=1e-9
        )
        assert report.performance_ratio == pytest.approx(group.mean_delivered_kw / -6.0)
        assert report.performance_ratio is not None
        assert report.performance_ratio > 1.0

        # ---- the event's local day is now an event day of both devices
        history = gateway.history
        assert history is not None
        days = await history.event_days(event_day - timedelta(days=LOOKBACK_DAYS))
        assert event_day in days["bat-1"]
        assert days["bat-2"] == frozenset({event_day})

        # ---- after a restart the report is served from SQLite on request
        await fleet.stop_gateway()
        await fleet.start_gateway()
        await listener.request("ev-1", b"corr-1")
        await eventually(lambda: bool(listener.replies), 15, "the reply to requests/performance")
        payload, correlation = listener.replies[0]
        assert correlation == b"corr-1"
        assert PerformanceReport.model_validate_json(payload) == report


async def test_control_group_program_holds_out_its_devices_and_settles_on_them(
    broker_endpoint: BrokerEndpoint, tmp_path: Path
) -> None:
    """A program settled on a control group: the held-out battery is never called (it idles),
    the report lists it and settles the two treated batteries against its metered load."""
    ids = ["bat-1", "bat-2", "bat-3"]
    seed = 11
    # The draw, written out: round(0.34 x 3) = 1 device, the first by SHA-256 of "seed:id".
    held_out = sorted(ids, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).digest())[0]
    treated = [d for d in ids if d != held_out]
    sims = [
        SunSpecBatterySimulator(
            port=0, capacity_kwh=10.0, max_charge_kw=5.0, max_discharge_kw=5.0, initial_soc_pct=60
        )
        for _ in ids
    ]
    extra: dict[str, Any] = {
        "history": {"path": str(tmp_path / "history.sqlite"), "interval_s": 1, "flush_s": 0.5},
        "settlement": {
            "timezone": ZONE.key,
            "delay_s": 1.0,
            "fallback_window_s": 4,
            "baseline": {"interval_s": 2, "adjustment_duration_s": 0, "min_coverage": 0.5},
            "programs": {
                "mass-market": {
                    "method": "control_group",
                    "control_share": 0.34,
                    "control_seed": seed,
                }
            },
        },
    }
    async with (
        Fleet(
            broker_endpoint, tmp_path / "gw.sqlite", sims, feeders=("f1",), extra_config=extra
        ) as fleet,
        ReportListener(broker_endpoint, fleet.gateway_id) as listener,
    ):
        event_start = datetime.fromtimestamp(math.ceil(time.time()) + 4, UTC)
        await fleet.grid.send(
            {
                "type": "dispatch",
                "command_id": "mm-1",
                "program": "mass-market",
                "target": {"group_id": "feeder:f1"},
                "kw": -4.0,
                "start": event_start.isoformat(),
                "duration_s": DURATION_S,
            }
        )
        await fleet.grid.wait_for_state("mm-1", AckState.COMPLETED, 30)
        await eventually(lambda: "mm-1" in listener.reports, 30, "the performance report")
        report = PerformanceReport.model_validate_json(listener.reports["mm-1"])
        assert report.method.value == "control_group"
        assert report.control_devices == (held_out,)
        assert [d.device_id for d in report.devices] == treated
        assert all(d.allocated for d in report.devices)
        # The held-out battery idled (0 kW), so each treated battery's baseline is ~0 kW and
        # the group delivered what the two treated batteries discharged.
        group = report.group
        assert group is not None
        assert group.baseline_kw == pytest.approx([0.0] * len(group.baseline_kw), abs=0.05)
        assert report.mean_delivered_kw is not None
        assert report.mean_delivered_kw < -3.0
