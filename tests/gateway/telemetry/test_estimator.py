"""Group estimation on a seeded synthetic fleet with known truth."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gateway.telemetry import (
    DeviceProfile,
    DeviceStatus,
    EstimatorConfig,
    FleetIndex,
    FleetSnapshot,
    GroupEstimator,
    QualityClassifier,
)
from unified.model import DerClass, Quality

GROUPS = 4
PERIOD = 60.0


class OnOffFleet:
    """Half on/off loads (3-5 kW when on, Markov switching), half continuous AR batteries."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.n = n
        self.kind = rng.integers(0, 2, n)
        self.group = rng.integers(0, GROUPS, n)
        self.p_on = rng.uniform(3.0, 5.0, n)
        self.on = rng.random(n) < 0.4
        self.level = rng.normal(0.0, 1.0, n)
        self.power = np.zeros(n)
        self.step()

    def step(self) -> None:
        rng, n = self.rng, self.n
        flip = rng.random(n) < np.where(self.on, 0.10, 0.07)
        self.on ^= flip
        self.level = 0.9 * self.level + rng.normal(0.0, 0.3, n)
        self.power = np.where(self.kind == 0, np.where(self.on, self.p_on, 0.0), self.level)

    def index(self) -> FleetIndex:
        return FleetIndex(
            [
                DeviceProfile(
                    f"d{i}",
                    DerClass.THERMOSTAT if k == 0 else DerClass.BATTERY,
                    f"feeder:{g}",
                    -6.0,
                    6.0,
                    PERIOD,
                )
                for i, (k, g) in enumerate(zip(self.kind, self.group, strict=True))
            ]
        )


def run_cycles(
    fleet: OnOffFleet, loss: float, cycles: int, seed: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """Snapshots built directly (every reading is fresh and correct): estimator only."""
    est = GroupEstimator(fleet.index(), EstimatorConfig(period_s=PERIOD, seed=seed))
    rng = np.random.default_rng(seed + 100)
    last = np.full(fleet.n, np.nan)
    last_t = np.full(fleet.n, -np.inf)
    up = rng.random(fleet.n) >= loss
    truths, ests, bounds, ms = [], [], [], []
    for c in range(cycles):
        fleet.step()
        now = c * PERIOD
        # Markov outages with a mean of 5 periods and a stationary loss of ``loss``.
        u = rng.random(fleet.n)
        up = np.where(up, u >= loss / (1 - loss) / 5, u < 0.2)
        last = np.where(up, fleet.power, last)
        last_t = np.where(up, now, last_t)
        snap = FleetSnapshot(
            now=now,
            value=last.copy(),
            age_s=np.where(np.isfinite(last_t), now - last_t, np.inf),
            status=np.where(up, DeviceStatus.REPORTING, DeviceStatus.MISSING).astype(np.int8),
            stale=~up,
        )
        t0 = time.perf_counter()
        cyc = est.cycle(snap)
        total, lo, hi, _ = cyc.totals(np.zeros(fleet.n, dtype=np.intp), 1)
        ms.append(1000 * (time.perf_counter() - t0))
        truths.append(fleet.power.sum())
        ests.append(total[0])
        bounds.append((lo[0], hi[0]))
    return np.array(truths), np.array(ests), np.array(bounds), ms


def test_no_missing_device_gives_the_exact_sum_and_a_tight_interval() -> None:
    fleet = OnOffFleet(500, seed=3)
    truth, est, bounds, _ = run_cycles(fleet, loss=0.0, cycles=20)
    np.testing.assert_allclose(est, truth, rtol=1e-12, atol=1e-9)
    assert np.all(bounds[:, 1] - bounds[:, 0] <= 1e-6 * np.abs(truth).max())


def test_interval_coverage_and_bias_with_twenty_percent_missing() -> None:
    fleet = OnOffFleet(3000, seed=5)
    truth, est, bounds, ms = run_cycles(fleet, loss=0.2, cycles=400)
    warm = slice(100, None)
    t, e, b = truth[warm], est[warm], bounds[warm]
    inside = (b[:, 0] <= t) & (t <= b[:, 1])
    assert 0.80 <= inside.mean() <= 0.97, inside.mean()
    bias = (e - t).sum() / np.abs(t).sum()
    assert abs(bias) < 0.005, bias
    # The estimate is far better than scaling up the reporting devices would be.
    assert np.mean(np.abs(e - t) / np.abs(t)) < 0.02
    assert np.median(ms) < 50


def test_a_times_ten_value_barely_moves_the_estimate() -> None:
    n = 400
    profiles = [
        DeviceProfile(f"d{i}", DerClass.BATTERY, f"feeder:{i % 2}", -60.0, 60.0, PERIOD)
        for i in range(n)
    ]
    index = FleetIndex(profiles)
    qc = QualityClassifier(index)
    est = GroupEstimator(index, EstimatorConfig(period_s=PERIOD))
    rng = np.random.default_rng(11)
    base = rng.uniform(1.0, 4.0, n)
    rows = np.arange(n)
    for c in range(12):
        values = base * (1 + 0.02 * rng.standard_normal(n))
        if c == 11:
            values[7] *= 10.0  # within the (loose) ratings: only the outlier test can see it
        t = c * PERIOD
        qc.observe_batch(rows, np.full(n, t), np.full(n, t + 1.0), values)
        cyc = est.cycle(qc.snapshot(t + 2.0))
    total = cyc.group("all", rows)
    truth = float(values.sum() - values[7] * 0.9)
    excess = float(values[7] * 0.9)
    assert abs(total.power_kw - truth) < 0.1 * excess
    assert total.devices_excluded == 1
    assert total.quality is Quality.ESTIMATED
    assert total.lower_kw <= truth <= total.upper_kw


def test_group_estimates_add_up_and_count_devices() -> None:
    fleet = OnOffFleet(1000, seed=9)
    est = GroupEstimator(fleet.index(), EstimatorConfig(period_s=PERIOD))
    rng = np.random.default_rng(0)
    for c in range(5):
        fleet.step()
        up = rng.random(fleet.n) > 0.3
        snap = FleetSnapshot(
            now=c * PERIOD,
            value=fleet.power.copy(),
            age_s=np.where(up, 0.0, 120.0),
            status=np.where(up, DeviceStatus.REPORTING, DeviceStatus.MISSING).astype(np.int8),
            stale=~up,
        )
        cyc = est.cycle(snap)
    groups = cyc.group_estimates(fleet.group, [f"feeder:{g}" for g in range(GROUPS)])
    whole = cyc.group("all", np.arange(fleet.n))
    assert sum(g.power_kw for g in groups) == pytest.approx(whole.power_kw)
    assert sum(g.devices_total for g in groups) == fleet.n
    assert whole.devices_missing == int((~up).sum())
    assert whole.devices_estimated == whole.devices_missing + whole.devices_excluded
    assert whole.lower_kw < whole.power_kw < whole.upper_kw
    by_class = cyc.group("all", np.arange(fleet.n), DerClass.BATTERY)
    assert by_class.devices_total == int((fleet.kind == 1).sum())
    assert by_class.der_class is DerClass.BATTERY


def test_cycle_for_ten_thousand_devices_is_fast() -> None:
    fleet = OnOffFleet(10_000, seed=2)
    _, _, _, ms = run_cycles(fleet, loss=0.2, cycles=30)
    assert np.median(ms[10:]) < 100


def test_a_fast_decline_widens_the_interval_on_its_side_only() -> None:
    """Readings a fraction of a period old lag an evening decline (EV sessions ending, ACs
    off): the truth is below the estimate, so the interval reaches further down by the ramp
    term; the upper side, and every bound while the fleet is quiet, stay as they were."""
    n, sub = 1000, 6
    rng = np.random.default_rng(4)
    index = FleetIndex(
        [
            DeviceProfile(f"d{i}", DerClass.THERMOSTAT, f"feeder:{i % GROUPS}", 0.0, 6.0, PERIOD)
            for i in range(n)
        ]
    )
    ramp = GroupEstimator(index, EstimatorConfig(period_s=PERIOD, seed=4))
    flat = GroupEstimator(index, EstimatorConfig(period_s=PERIOD, seed=4, ramp_lag=0.0))
    assert ramp.config.ramp_lag > 0
    base = rng.uniform(1.0, 4.0, n)
    phase = rng.uniform(0.0, PERIOD, n)  # each device reports once a period, at its own phase

    def power(t: float) -> np.ndarray:
        x = max(t / PERIOD - 60.0, 0.0) / 60.0  # quiet for an hour, then a faster and faster fall
        return base * (1.0 - 0.8 * x * x)

    value, read_at = power(0.0), np.full(n, -PERIOD)
    rows: list[tuple[float, float, float, float, float, float]] = []
    for c in range(120):
        for k in range(sub):
            t = c * PERIOD + k * PERIOD / sub
            due = (phase >= k * PERIOD / sub) & (phase < (k + 1) * PERIOD / sub)
            due &= rng.random(n) >= 0.05
            value = np.where(due, power(t) + rng.normal(0.0, 0.05, n), value)
            read_at = np.where(due, t, read_at)
        now = (c + 1) * PERIOD
        age = now - read_at
        up = age < 2 * PERIOD
        snap = FleetSnapshot(
            now=now,
            value=value.copy(),
            age_s=age,
            status=np.where(up, DeviceStatus.REPORTING, DeviceStatus.MISSING).astype(np.int8),
            stale=~up,
        )
        labels = np.zeros(n, dtype=np.intp)
        total, lo, hi, _ = ramp.cycle(snap).totals(labels, 1)
        _, lo0, hi0, _ = flat.cycle(snap).totals(labels, 1)
        rows.append((float(power(now).sum()), total[0], lo[0], hi[0], lo0[0], hi0[0]))
    truth, est, lo, hi, lo0, hi0 = np.array(rows).T
    quiet, falling = slice(20, 60), slice(80, 120)
    # Quiet: the measured trend is noise, the width as good as unchanged.
    width, width0 = hi[quiet] - lo[quiet], hi0[quiet] - lo0[quiet]
    assert np.all(width >= width0)
    assert np.max(width / width0) < 1.05, np.max(width / width0)
    # Falling: the readings' lag puts the truth below the estimate ...
    assert np.all(truth[falling] < est[falling])
    # ... and the interval reaches further down there, not up.
    np.testing.assert_allclose(hi[falling], hi0[falling], rtol=1e-9)
    assert np.all(lo[falling] < lo0[falling])
    reach, reach0 = est[falling] - lo[falling], est[falling] - lo0[falling]
    assert np.mean(reach / reach0) > 1.2, np.mean(reach / reach0)
