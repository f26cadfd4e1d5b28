"""Per-reading classification on hand-built sequences."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.telemetry import (
    Detail,
    DeviceProfile,
    DeviceStatus,
    FleetIndex,
    QualityClassifier,
    RawReading,
    TelemetryQuality,
    Validity,
)
from unified.model import DerClass, Quality

T0 = datetime(2025, 7, 15, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fleet(n_peers: int = 0, max_kw: float = 6.0) -> QualityClassifier:
    profiles = [DeviceProfile("dev", DerClass.BATTERY, "feeder:A", -max_kw, max_kw)]
    profiles += [
        DeviceProfile(f"peer{i}", DerClass.BATTERY, "feeder:A", -max_kw, max_kw)
        for i in range(n_peers)
    ]
    return QualityClassifier(FleetIndex(profiles))


def reading(
    t: float,
    value: float,
    *,
    device: str = "dev",
    delay: float = 1.0,
    skew: float = 0.0,
    fingerprint: int | None = None,
    should_change: bool | None = None,
) -> RawReading:
    return RawReading(
        device_id=device,
        device_time=at(t + skew),
        received_at=at(t + delay),
        value_kw=value,
        fingerprint=fingerprint,
        should_change=should_change,
    )


def test_clean_sequence_is_good() -> None:
    qc = fleet()
    for k in range(5):
        verdict = qc.observe(reading(60 * k, 1.0 + 0.1 * k))
        assert verdict.quality == TelemetryQuality(Validity.GOOD)
        assert verdict.accepted
    assert verdict.quality.to_core() is Quality.GOOD


def test_duplicate_is_flagged_and_ignored() -> None:
    qc = fleet()
    qc.observe(reading(0, 1.0))
    dup = qc.observe(reading(0, 1.0, delay=30.0))
    assert Detail.DUPLICATE in dup.quality.detail
    assert dup.quality.validity is Validity.QUESTIONABLE
    assert not dup.accepted
    # A duplicate does not count as a frozen value either.
    nxt = qc.observe(reading(60, 1.0))
    assert nxt.quality.validity is Validity.GOOD


def test_out_of_order_does_not_replace_the_current_value() -> None:
    qc = fleet()
    qc.observe(reading(60, 2.0))
    old = qc.observe(reading(0, 5.0, delay=70.0))
    assert Detail.OUT_OF_ORDER in old.quality.detail
    assert old.quality.to_core() is Quality.STALE
    snap = qc.snapshot(at(70))
    assert snap.value[0] == 2.0


def test_late_reading_is_flagged_but_still_current() -> None:
    qc = fleet()
    qc.observe(reading(0, 1.0))
    late = qc.observe(reading(60, 2.0, delay=100.0))
    assert late.quality.detail == Detail.LATE
    assert late.quality.validity is Validity.GOOD
    assert late.accepted
    assert qc.snapshot(at(161)).value[0] == 2.0


def test_stale_reading_and_stale_device() -> None:
    qc = fleet()
    qc.observe(reading(0, 1.0))
    snap = qc.snapshot(at(60))
    assert snap.status[0] == DeviceStatus.REPORTING
    assert not snap.stale[0]
    snap = qc.snapshot(at(400))  # nothing for more than 3 report intervals
    assert snap.stale[0]
    assert snap.status[0] == DeviceStatus.MISSING
    assert qc.device_quality("dev", at(400)).to_core() is Quality.STALE
    very_late = qc.observe(reading(300, 1.5, delay=300.0))
    assert Detail.STALE in very_late.quality.detail
    assert very_late.quality.to_core() is Quality.STALE


def test_frozen_value_while_the_device_says_it_changed_is_stuck() -> None:
    qc = fleet()
    qc.observe(reading(0, 3.2, should_change=False))
    first = qc.observe(reading(60, 3.2, should_change=True))
    assert Detail.STUCK not in first.quality.detail  # one announcement might be a race
    second = qc.observe(reading(120, 3.2, should_change=True))
    assert Detail.STUCK in second.quality.detail
    assert second.quality.to_core() is Quality.SUSPECT
    assert qc.snapshot(at(121)).status[0] == DeviceStatus.EXCLUDED
    # The same value with no state change is just a steady device.
    qc2 = fleet()
    for k in range(5):
        assert qc2.observe(reading(60 * k, 3.2, should_change=False)).quality.validity == 0


def test_frozen_payload_fingerprint_is_stuck() -> None:
    qc = fleet()
    verdicts = [qc.observe(reading(60 * k, 2.0 + k, fingerprint=1234)) for k in range(3)]
    assert [Detail.STUCK in v.quality.detail for v in verdicts] == [False, False, True]


def test_long_run_of_one_nonzero_value_is_stuck_but_zero_is_not() -> None:
    qc = fleet()
    verdicts = [qc.observe(reading(600 * k, 2.5)) for k in range(30)]  # 5 h at 2.5 kW
    assert Detail.STUCK in verdicts[-1].quality.detail
    assert Detail.STUCK not in verdicts[5].quality.detail
    qc0 = fleet()
    verdicts = [qc0.observe(reading(600 * k, 0.0)) for k in range(30)]  # idle battery
    assert all(v.quality.validity is Validity.GOOD for v in verdicts)


def test_out_of_bounds_is_invalid() -> None:
    qc = fleet(max_kw=5.0)
    bad = qc.observe(reading(0, 50.0))
    assert bad.quality.validity is Validity.INVALID
    assert Detail.OUT_OF_RANGE in bad.quality.detail
    assert bad.quality.to_core() is Quality.INVALID
    nan = qc.observe(reading(60, float("nan")))
    assert nan.quality.validity is Validity.INVALID


def _warm(qc: QualityClassifier, n_peers: int, cycles: int = 10) -> None:
    for k in range(cycles):
        qc.observe(reading(60 * k, 2.0 + 0.05 * (k % 3)))
        for i in range(n_peers):
            qc.observe(reading(60 * k, 1.5 + 0.1 * i, device=f"peer{i}"))


def test_times_ten_outlier_against_history_and_peers() -> None:
    qc = fleet(n_peers=12, max_kw=100.0)  # loose ratings: the bounds cannot catch it
    _warm(qc, 12)
    qc.refresh_peers(T0.timestamp() + 600)
    spike = qc.observe(reading(600, 20.0))
    assert Detail.OUTLIER in spike.quality.detail
    assert spike.quality.to_core() is Quality.SUSPECT
    assert qc.snapshot(at(601)).value[0] == pytest.approx(2.0, abs=0.11)
    # A value the device then holds is a real level change, not corruption.
    held = qc.observe(reading(660, 20.5))
    assert Detail.OUTLIER not in held.quality.detail


def test_unusual_for_itself_but_normal_for_peers_is_not_an_outlier() -> None:
    qc = fleet(n_peers=12, max_kw=10.0)
    _warm(qc, 12)
    qc.refresh_peers(T0.timestamp() + 600)
    # The device has sat near 2 kW; peers span 1.5-2.6 kW; 0 kW (switching off) is fine.
    assert Detail.OUTLIER not in qc.observe(reading(600, 0.0)).quality.detail


def test_skewed_clock_is_estimated_and_corrected() -> None:
    qc = fleet()
    verdicts = [qc.observe(reading(60 * k, 1.0 + k, skew=-300.0, delay=2.0)) for k in range(6)]
    assert Detail.CLOCK_SKEW not in verdicts[0].quality.detail  # could be latency at first
    last = verdicts[-1]
    assert Detail.CLOCK_SKEW in last.quality.detail
    assert Detail.LATE not in last.quality.detail
    assert last.quality.validity is Validity.GOOD
    assert last.corrected_time == at(300 + 2.0)
    assert qc.clock_offset_s("dev") == pytest.approx(302.0)
    assert qc.snapshot(at(303)).status[0] == DeviceStatus.REPORTING


def test_clock_ahead_is_corrected_at_once() -> None:
    qc = fleet()
    first = qc.observe(reading(0, 1.0, skew=+240.0, delay=1.0))
    assert Detail.CLOCK_SKEW in first.quality.detail
    assert first.corrected_time == at(1.0)


def test_core_quality_mapping() -> None:
    assert TelemetryQuality(Validity.GOOD, estimated=True).to_core() is Quality.ESTIMATED
    assert TelemetryQuality(Validity.GOOD, Detail.CLOCK_SKEW).to_core() is Quality.GOOD
    assert TelemetryQuality(Validity.QUESTIONABLE, Detail.OUTLIER).to_core() is Quality.SUSPECT
    assert TelemetryQuality(Validity.QUESTIONABLE, Detail.STALE).to_core() is Quality.STALE
    assert TelemetryQuality(Validity.INVALID, Detail.OUT_OF_RANGE).reasons == ("out_of_range",)


def test_naive_timestamps_are_rejected() -> None:
    qc = fleet()
    with pytest.raises(ValueError, match="naive"):
        qc.observe(RawReading("dev", datetime(2025, 1, 1), datetime(2025, 1, 1, tzinfo=UTC), 1.0))


def test_normal_for_itself_but_unusual_for_peers_is_not_an_outlier() -> None:
    qc = fleet(n_peers=12, max_kw=30.0)
    for k in range(10):  # a big site swinging between 14 and 22 kW among ~2 kW peers
        qc.observe(reading(60 * k, 14.0 if k % 2 else 22.0))
        for i in range(12):
            qc.observe(reading(60 * k, 1.5 + 0.1 * i, device=f"peer{i}"))
    qc.refresh_peers(T0.timestamp() + 600)
    verdict = qc.observe(reading(600, 22.0))  # a jump from 14, far above its peers
    assert Detail.OUTLIER not in verdict.quality.detail


def _messy_sequence(n_peers: int) -> list[RawReading]:
    """Duplicates, out-of-order, a skewed clock, a frozen value, a x10 spike, peers beside."""
    out: list[RawReading] = []
    for k in range(40):
        value = 2.0 + 0.05 * (k % 3)
        if k == 25:
            value = 20.0  # spike
        if 30 <= k < 36:
            value = 2.2  # frozen while the device says it changed
        out.append(reading(60 * k, value, skew=-300.0, delay=2.0, should_change=k >= 30))
        if k % 7 == 3:
            out.append(reading(60 * k, value, skew=-300.0, delay=4.0))  # duplicate
        if k % 11 == 5:
            out.append(reading(60 * (k - 2) + 30, 1.9, skew=-300.0, delay=130.0))  # out of order
        out.extend(reading(60 * k, 1.5 + 0.1 * i, device=f"peer{i}") for i in range(n_peers))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_queued_readings_get_the_verdicts_of_one_by_one(chunk: int) -> None:
    """The gateway queues readings and classifies once per cycle: nothing may change by it."""
    sequence = _messy_sequence(n_peers=12)
    one_by_one, queued = fleet(n_peers=12, max_kw=100.0), fleet(n_peers=12, max_kw=100.0)
    expected = [one_by_one.observe(r).quality for r in sequence]
    got: list[TelemetryQuality] = []
    for start in range(0, len(sequence), chunk):
        part = sequence[start : start + chunk]
        for r in part:
            queued.enqueue(r)
        assert queued.queued == len(part)
        verdicts = queued.flush()
        assert queued.queued == 0
        # flush() gives the newest verdict per device; collect the device's in order.
        got.extend(verdicts[r.device_id] for r in part if r.device_id == "dev")
        newest = {
            r.device_id: q for q, r in zip(expected[start : start + chunk], part, strict=True)
        }
        assert verdicts == newest
    assert queued.flush() == {}
    snap_a, snap_b = one_by_one.snapshot(at(2500)), queued.snapshot(at(2500))
    assert (snap_a.status == snap_b.status).all()
    assert snap_a.value == pytest.approx(snap_b.value, nan_ok=True)
    # The sequence really exercises the checks it claims to.
    seen = Detail(0)
    for q in expected:
        seen |= q.detail
    for flag in (Detail.DUPLICATE, Detail.OUT_OF_ORDER, Detail.CLOCK_SKEW, Detail.OUTLIER):
        assert flag in seen, flag
    assert got  # the device's readings were classified


def test_enqueue_refuses_unknown_devices_and_naive_times() -> None:
    qc = fleet()
    with pytest.raises(KeyError, match="ghost"):
        qc.enqueue(reading(0, 1.0, device="ghost"))
    with pytest.raises(ValueError, match="naive"):
        qc.enqueue(
            RawReading(
                device_id="dev",
                device_time=datetime(2025, 1, 1),
                received_at=at(0),
                value_kw=1.0,
            )
        )
    assert qc.queued == 0
