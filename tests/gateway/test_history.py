"""The reading history on a real SQLite file: buckets, batches, bounds, retention, restarts."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from composition.app import GatewayApp
from composition.config import GatewayConfig, parse_config
from gateway.flex import FlexRequest
from gateway.history import HistoryError, ReadingClass, ReadingHistory
from gateway.telemetry import Detail
from unified.model import DeviceState

T0 = datetime(2024, 6, 20, 12, 0, tzinfo=UTC)  # a Thursday


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
async def history(tmp_path: Path) -> AsyncIterator[ReadingHistory]:
    async with ReadingHistory(tmp_path / "h.sqlite", interval_s=60) as h:
        yield h


async def test_readings_fold_into_buckets_with_quality_counts(history: ReadingHistory) -> None:
    history.observe("a", at(1), 2.0)
    history.observe("a", at(30), 4.0, ReadingClass.QUESTIONABLE)
    history.observe("a", at(59.5), 1000.0, ReadingClass.INVALID)  # counted, not averaged
    history.observe("a", at(60), 10.0)  # the next bucket
    history.observe("b", at(10), -3.0)
    assert history.pending == 3
    assert await history.flush() == 3
    assert history.pending == 0

    rows = await history.buckets("a", T0, at(600))
    assert [(r.start, r.samples, r.good, r.questionable, r.invalid) for r in rows] == [
        (T0, 2, 1, 1, 1),
        (at(60), 1, 1, 0, 0),
    ]
    assert rows[0].mean_kw == pytest.approx(3.0)
    assert rows[0].first == at(1)
    assert rows[0].last == at(59.5)
    assert rows[1].mean_kw == pytest.approx(10.0)
    (b,) = await history.buckets("b", T0, at(600))
    assert b.mean_kw == pytest.approx(-3.0)


async def test_a_bucket_flushed_while_filling_is_completed_by_the_next_flush(
    history: ReadingHistory, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = 0
    real_commit = history.db.commit

    async def counting_commit() -> None:
        nonlocal commits
        commits += 1
        await real_commit()

    monkeypatch.setattr(history.db, "commit", counting_commit)
    for i in range(10):
        history.observe(f"d{i}", at(5), 1.0)
    assert await history.flush() == 10
    assert commits == 1, "one transaction per flush, however many buckets"
    history.observe("d0", at(20), 3.0)
    history.observe("d0", at(40), 5.0, ReadingClass.QUESTIONABLE)
    assert await history.flush() == 1
    assert commits == 2
    assert await history.flush() == 0
    assert commits == 2, "nothing buffered, nothing written"
    (row,) = await history.buckets("d0", T0, at(60))
    assert (row.samples, row.good, row.questionable) == (3, 2, 1)
    assert row.mean_kw == pytest.approx(3.0)
    assert (row.first, row.last) == (at(5), at(40))


async def test_full_buffer_drops_the_oldest_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with ReadingHistory(tmp_path / "h.sqlite", interval_s=60, max_pending=10) as history:
        with caplog.at_level(logging.WARNING, logger="gateway.history"):
            for minute in range(15):
                history.observe("a", at(60 * minute), float(minute))
        assert history.pending == 10
        assert history.dropped == 5
        full = [r for r in caplog.records if "buffer full" in r.getMessage()]
        assert len(full) == 1, "one warning per episode, not one per reading"
        await history.flush()
        rows = await history.buckets("a", T0, at(3600))
        assert [r.mean_kw for r in rows] == [float(m) for m in range(5, 15)]


async def test_a_failed_write_keeps_the_buffer_for_the_next_flush(
    history: ReadingHistory, monkeypatch: pytest.MonkeyPatch
) -> None:
    history.observe("a", at(0), 1.0)
    real = history.db.executemany

    async def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(history.db, "executemany", disk_full)
    with pytest.raises(HistoryError, match="disk full") as raised:
        await history.flush()
    assert isinstance(raised.value.__cause__, OSError)
    history.observe("a", at(1), 3.0)  # arrives while the disk is failing
    assert history.pending == 1
    monkeypatch.setattr(history.db, "executemany", real)
    assert await history.flush() == 1
    (row,) = await history.buckets("a", T0, at(60))
    assert row.samples == 2
    assert row.mean_kw == pytest.approx(2.0)


async def test_a_corrupt_history_file_raises_the_history_error(tmp_path: Path) -> None:
    """What SQLite raises never leaves the store: callers catch one family."""
    path = tmp_path / "h.sqlite"
    history = ReadingHistory(path, interval_s=60)
    async with history:
        history.observe("a", at(0), 1.0)
        await history.flush()
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(HistoryError):
        async with ReadingHistory(path, interval_s=60) as broken:
            await broken.report("x")
    with pytest.raises(HistoryError, match="not open"):
        await ReadingHistory(tmp_path / "never-opened.sqlite", interval_s=60).report("x")


async def test_retention_prunes_old_buckets_only(tmp_path: Path) -> None:
    async with ReadingHistory(tmp_path / "h.sqlite", interval_s=60, retention_days=7) as history:
        for days in (10, 8, 6, 1):
            history.observe("a", T0 - timedelta(days=days), float(days))
        await history.add_event_days("ev-old", {"a": [(T0 - timedelta(days=9)).date()]})
        await history.add_event_days("ev-new", {"a": [(T0 - timedelta(days=2)).date()]})
        await history.flush()
        assert await history.prune(T0) == 2
        rows = await history.buckets("a", T0 - timedelta(days=30), T0)
        assert [r.mean_kw for r in rows] == [6.0, 1.0]
        event_days = await history.event_days((T0 - timedelta(days=30)).date())
        assert event_days == {"a": frozenset({(T0 - timedelta(days=2)).date()})}


async def test_reports_are_kept_compactly_for_their_own_retention(tmp_path: Path) -> None:
    async with ReadingHistory(
        tmp_path / "h.sqlite", interval_s=60, retention_days=7, report_retention_days=30
    ) as history:
        report = '{"devices": [' + ",".join(f'{{"device_id": "d{i}"}}' for i in range(500)) + "]}"
        await history.save_report("old", T0 - timedelta(days=31), report)
        await history.save_report("kept", T0 - timedelta(days=29), report)
        await history.prune(T0)
        assert await history.report("old") is None
        assert await history.report("kept") == report, "read back exactly"
        async with history.db.execute("SELECT length(payload) FROM performance_reports") as cur:
            (size,) = await cur.fetchone() or (0,)
        assert size < len(report) / 4


async def test_history_survives_a_restart_including_what_was_buffered(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    async with ReadingHistory(path, interval_s=60) as history:
        history.observe("a", at(0), 1.0)
        await history.flush()
        history.observe("a", at(61), 5.0)  # still buffered at close: written by close()
        await history.add_pending("cmd-1", {"x": 1})
        await history.save_report("cmd-0", T0, '{"command_id": "cmd-0"}')
    async with ReadingHistory(path, interval_s=60) as history:
        rows = await history.buckets("a", T0, at(600))
        assert [r.mean_kw for r in rows] == [1.0, 5.0]
        assert await history.pending_settlements() == {"cmd-1": {"x": 1}}
        assert await history.report("cmd-0") == '{"command_id": "cmd-0"}'
        assert await history.report("nope") is None
        await history.save_report("cmd-1", T0, "{}")
        assert await history.pending_settlements() == {}, "a saved report clears its pending"


async def test_histories_give_exact_sample_weighted_means_on_a_coarser_grid(
    history: ReadingHistory,
) -> None:
    # Three 60 s buckets per 180 s interval. Interval 0: buckets of (2 samples mean 1) and
    # (1 sample of 4) -> (1 + 1 + 4) / 3 = 2. Interval 1: nothing. Interval 2: one
    # questionable reading of -6.
    history.observe("a", at(0), 0.5)
    history.observe("a", at(30), 1.5)
    history.observe("a", at(150), 4.0)
    history.observe("a", at(170), 99.0, ReadingClass.INVALID)
    history.observe("a", at(400), -6.0, ReadingClass.QUESTIONABLE)
    history.observe("b", at(200), 7.0)
    history.observe("a", at(540), 123.0)  # outside [T0, T0 + 540 s)
    await history.flush()

    got = await history.histories(["a", "b", "silent"], T0, at(540), 180)
    a = got["a"]
    assert a.interval_s == 180
    assert a.start == T0
    assert a.kw[0] == pytest.approx(2.0)
    assert math.isnan(a.kw[1])
    assert a.kw[2] == pytest.approx(-6.0)
    assert a.estimated is not None
    assert a.estimated.tolist() == [False, False, True]
    assert np.isnan(got["b"].kw).tolist() == [True, False, True]
    assert got["b"].kw[1] == pytest.approx(7.0)
    assert np.isnan(got["silent"].kw).all(), "asked but silent: a history of gaps"

    series = await history.group_series(["a", "b", "silent"], T0, at(540), 180)
    assert series.kw[0] == pytest.approx(2.0)
    assert series.kw[1] == pytest.approx(7.0)
    assert series.kw[2] == pytest.approx(-6.0)
    assert series.devices_reporting.tolist() == [1, 1, 1]
    assert series.devices_total == 3

    with pytest.raises(ValueError, match="does not fall on"):
        await history.histories(["a"], at(30), at(540), 180)
    with pytest.raises(ValueError, match="does not fall on"):
        await history.histories(["a"], T0, at(540), 90)


async def test_forecast_baseline_comes_from_history_at_the_same_time_of_day(
    tmp_path: Path,
) -> None:
    """The gateway reads history once per flex period; the forecast's baseline band follows it."""
    config = parse_config(
        {
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "settlement": {"timezone": "UTC"},
            "history": {"interval_s": 300},
            "device_mqtt": {},
            "devices": [
                {
                    "device_id": "wh-1",
                    "der_class": "water_heater",
                    "location": {"substation": "s1", "feeder": "f1"},
                    "adapter": "mqtt_water_heater",
                    "ratings": {"max_charge_kw": 4.5, "max_discharge_kw": 4.5, "capacity_kwh": 10},
                }
            ],
        }
    )
    gateway = GatewayApp(config, adapters={}).core
    now = datetime(2024, 6, 20, 12, 10, tzinfo=UTC)
    assert gateway.history is not None
    async with gateway.history:
        # 14 previous days: 1.0 kW from 13:00 to 14:00 UTC, 3.0 + 0.1 * days back otherwise;
        # one reading per 5-min bucket.
        for back in range(1, 15):
            day = datetime(2024, 6, 20, tzinfo=UTC) - timedelta(days=back)
            for minute in range(0, 24 * 60, 5):
                t = day + timedelta(minutes=minute)
                gateway.history.observe("wh-1", t, 1.0 if t.hour == 13 else 3.0 + 0.1 * back)
        await gateway.history.flush()
        assert await gateway.refresh_flex_history(now) == 1
    forecast = gateway.flex_forecast(
        FlexRequest(group_id="feeder:f1", horizon_s=4 * 3600, interval_s=3600), now
    )
    p50 = [i.baseline_kw.p50 for i in forecast.intervals]
    # The event is on a Thursday: the profile is over the 10 most recent *weekdays* (the
    # weekends 15/16 and 8/9 June are skipped), days back 1, 2, 3, 6, 7, 8, 9, 10, 13, 14.
    weekdays_back = [1, 2, 3, 6, 7, 8, 9, 10, 13, 14]
    expected = float(np.mean([3.0 + 0.1 * b for b in weekdays_back]))
    assert p50[0] == pytest.approx(expected)
    assert p50[1] == pytest.approx(1.0)
    assert p50[2] == pytest.approx(expected)
    first = forecast.intervals[0].baseline_kw
    assert first.p10 < first.p50 < first.p90, "the spread across days is the band"
    assert forecast.intervals[1].baseline_kw.p90 == pytest.approx(1.0), "no spread at 13:00"
    # Without the history the baseline is the current power (none: 0 kW).
    gateway._flex_history = {}
    bare = gateway.flex_forecast(
        FlexRequest(group_id="feeder:f1", horizon_s=4 * 3600, interval_s=3600), now
    )
    assert bare.intervals[0].baseline_kw.p50 == 0.0


def _gateway_config(tmp_path: Path) -> GatewayConfig:
    return parse_config(
        {
            "store": {"path": str(tmp_path / "gw.sqlite")},
            "settlement": {"timezone": "UTC"},
            "history": {"interval_s": 60},
            "devices": [
                {
                    "device_id": "bat-1",
                    "der_class": "battery",
                    "location": {"substation": "s1", "feeder": "f1"},
                    "adapter": "sunspec_battery",
                    "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
                    "sunspec": {"port": 1502},
                }
            ],
        }
    )


async def test_gateway_feeds_device_states_into_the_history(tmp_path: Path) -> None:
    config = _gateway_config(tmp_path)
    gateway = GatewayApp(config).core
    assert gateway.history is not None
    assert gateway.history._path == tmp_path / "gw.history.sqlite"
    async with gateway.history:
        for i, kw in enumerate([1.0, 2.0, 6.0]):
            gateway._on_device_state(
                DeviceState(device_id="bat-1", timestamp=at(i), power_kw=kw, source="t")
            )
        await gateway.history.flush()
        (row,) = await gateway.history.buckets("bat-1", T0, at(60))
    assert row.samples == 3
    assert row.mean_kw == pytest.approx(3.0)


async def test_a_reading_polled_again_is_judged_and_recorded_once(tmp_path: Path) -> None:
    """Pushed devices (MQTT, OpenADR, 2030.5) hand the supervisor the same reading until a new
    one arrives: the repeats are neither duplicates the device sent nor extra samples."""
    config = _gateway_config(tmp_path)
    gateway = GatewayApp(config).core
    assert gateway.history is not None
    seen: list[DeviceState] = []
    gateway.state_listeners.append(seen.append)
    async with gateway.history:
        for i, kw in [(0, 1.0), (0, 1.0), (0, 1.0), (1, 5.0), (1, 5.0)]:
            gateway._on_device_state(
                DeviceState(device_id="bat-1", timestamp=at(i), power_kw=kw, source="t")
            )
        await gateway.history.flush()
        (row,) = await gateway.history.buckets("bat-1", T0, at(60))
    assert len(seen) == 5  # listeners still see every poll
    assert row.samples == 2
    assert row.mean_kw == pytest.approx(3.0)
    gateway.estimate_cycle(at(2))
    quality = gateway.reading_quality["bat-1"]
    assert Detail.DUPLICATE not in quality.detail, quality
