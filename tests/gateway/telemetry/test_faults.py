"""Faults no fingerprint reveals: unit errors, sensors stuck at zero, frozen registers under a
setpoint, and steps at the start of a command; on small synthetic fleets with known faults."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from gateway.telemetry import (
    CommandBoard,
    CommandInForce,
    Detail,
    DeviceProfile,
    DeviceStatus,
    EstimatorConfig,
    FleetIndex,
    FleetSnapshot,
    GroupEstimator,
    QualityClassifier,
    RawReading,
    Validity,
)
from unified.model import DerClass, DeviceState, EvSession, Quality

T0 = datetime(2025, 7, 15, 12, 0, tzinfo=UTC)
PERIOD = 60.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def profiles(
    der_class: DerClass, n: int, lo: float, hi: float, prefix: str = "p"
) -> list[DeviceProfile]:
    return [DeviceProfile(f"{prefix}{i}", der_class, "feeder:A", lo, hi) for i in range(n)]


class Feed:
    """A classifier over one device ``dev`` and ``n_peers`` peers of the same class."""

    def __init__(
        self, der_class: DerClass, lo: float, hi: float, n_peers: int = 20, seed: int = 0
    ) -> None:
        index = FleetIndex(
            [
                DeviceProfile("dev", der_class, "feeder:A", lo, hi),
                *profiles(der_class, n_peers, lo, hi),
            ]
        )
        self.board = CommandBoard(index)
        self.qc = QualityClassifier(index, commands=self.board)
        self.n_peers = n_peers
        self.rng = np.random.default_rng(seed)
        self.t = 0.0

    def step(
        self,
        dev_value: float,
        peer_values: np.ndarray,
        demand: bool | None = None,
        soc_pct: float | None = None,
    ) -> Validity | None:
        """One report period: every peer reports, then the device; the device's verdict."""
        for i, v in enumerate(peer_values):
            self.qc.observe(RawReading(f"p{i}", at(self.t), at(self.t + 1), float(v)))
        verdict = self.qc.observe(
            RawReading(
                "dev", at(self.t), at(self.t + 1), dev_value, demand=demand, soc_pct=soc_pct
            )
        )
        self.last = verdict
        self.t += PERIOD
        return verdict.quality.validity


def cycling(
    rng: np.random.Generator, n: int, p_on: float, on_kw: float, off_kw: float
) -> np.ndarray:
    on = rng.random(n) < p_on
    return np.where(on, on_kw * (1 + 0.01 * rng.standard_normal(n)), off_kw)


# ---------------------------------------------------------------------------- unit errors


def test_watts_reported_as_kilowatts_are_corrected_once_certain() -> None:
    f = Feed(DerClass.EVSE, -0.1, 12.0)
    peers = lambda: cycling(f.rng, f.n_peers, 0.5, 7.2, 0.0)  # noqa: E731
    for _ in range(10):
        f.step(0.0, peers())
    # The first W-as-kW readings are rejected, flagged as a unit error, not yet corrected.
    f.step(7200.0, peers())
    assert f.last.quality.validity is Validity.INVALID
    assert Detail.UNIT_ERROR in f.last.quality.detail
    f.step(7190.0, peers())
    # The third in a row makes it certain: corrected to kW, substituted, used.
    f.step(7210.0, peers())
    q = f.last.quality
    assert q.validity is Validity.GOOD
    assert Detail.UNIT_ERROR in q.detail
    assert q.to_core() is Quality.SUBSTITUTED
    snap = f.qc.snapshot(at(f.t))
    assert snap.value[0] == 7.21
    assert snap.status[0] == DeviceStatus.REPORTING
    # From then on, its readings are kW at once; its zeros stay zeros.
    f.step(3600.0, peers())
    assert f.last.quality.validity is Validity.GOOD
    assert f.qc.snapshot(at(f.t)).value[0] == 3.6
    f.step(0.0, peers())
    assert f.qc.snapshot(at(f.t)).value[0] == 0.0


def test_a_single_corrupted_value_never_rescales_a_device() -> None:
    f = Feed(DerClass.EVSE, -0.1, 12.0)
    for _ in range(10):
        f.step(7.2, np.full(f.n_peers, 7.2))
    f.step(720.0, np.full(f.n_peers, 7.2))  # one x100 value: not even W-as-kW evidence
    f.step(7200.0, np.full(f.n_peers, 7.2))  # one W-as-kW-looking value
    assert f.last.quality.validity is Validity.INVALID
    f.step(7.2, np.full(f.n_peers, 7.2))
    assert f.last.quality.validity is Validity.GOOD
    assert Detail.UNIT_ERROR not in f.last.quality.detail
    assert f.qc.snapshot(at(f.t)).value[0] == 7.2


def test_kilowatts_reported_as_megawatts_are_doubted_then_corrected() -> None:
    f = Feed(DerClass.WATER_HEATER, -0.1, 6.0)
    peers = lambda: cycling(f.rng, f.n_peers, 0.3, 4.5, 0.0)  # noqa: E731
    for _ in range(10):
        f.step(0.0, peers())
    f.step(0.0045, peers())
    # In range as a number, but a thousandth of a real draw: suspect and left out.
    assert f.last.quality.to_core() is Quality.SUSPECT
    assert f.qc.snapshot(at(f.t)).status[0] == DeviceStatus.EXCLUDED
    f.step(0.0045, peers())
    f.step(0.0046, peers())
    assert f.last.quality.to_core() is Quality.SUBSTITUTED
    assert f.qc.snapshot(at(f.t)).value[0] == 4.6


def test_a_load_reporting_generator_convention_is_flipped() -> None:
    f = Feed(DerClass.THERMOSTAT, -0.1, 7.0)
    peers = lambda: cycling(f.rng, f.n_peers, 0.7, 3.5, 0.03)  # noqa: E731
    for _ in range(10):
        f.step(3.5, peers())
    for v in (-3.5, -3.4, -3.6):
        f.step(v, peers())
    assert f.last.quality.validity is Validity.GOOD
    assert f.qc.snapshot(at(f.t)).value[0] == 3.6


def test_a_battery_reading_the_mirror_of_its_setpoint_is_flipped() -> None:
    f = Feed(DerClass.BATTERY, -5.0, 5.0)
    peers = lambda: f.rng.normal(0.0, 1.0, f.n_peers)  # noqa: E731
    for _ in range(10):
        f.step(0.5, peers())
    f.board.update(at(f.t), {"dev": CommandInForce("dispatch-1", -2.0, held=True)})
    f.t += 180.0  # time to follow
    for v in (2.0, 2.01, 1.99, 2.0):
        f.step(v, peers())
    assert Detail.UNIT_ERROR in f.last.quality.detail
    assert f.qc.snapshot(at(f.t)).value[0] == -2.0


# ---------------------------------------------------------------------------- stuck


def test_a_zero_that_neither_the_device_nor_its_peers_ever_read_is_stuck() -> None:
    # Air conditioners whose fan keeps them above zero even when the compressor is off.
    f = Feed(DerClass.THERMOSTAT, -0.1, 7.0)
    peers = lambda: cycling(f.rng, f.n_peers, 0.7, 3.5, 0.03)  # noqa: E731
    for k in range(12):
        f.step(3.5 if k % 3 else 0.03, peers())
    f.step(3.5, peers())
    verdicts = [f.step(0.0, peers()) for _ in range(3)]
    assert verdicts[:2] == [Validity.GOOD, Validity.GOOD]
    assert Detail.STUCK in f.last.quality.detail
    snap = f.qc.snapshot(at(f.t))
    assert snap.status[0] == DeviceStatus.EXCLUDED
    # What stands for it is its last value before the zeros began, not the zeros.
    assert snap.value[0] == 3.5


def test_zeros_of_a_class_that_idles_at_zero_are_not_stuck() -> None:
    f = Feed(DerClass.WATER_HEATER, -0.1, 6.0)
    peers = lambda: cycling(f.rng, f.n_peers, 0.2, 4.5, 0.0)  # noqa: E731
    for k in range(12):
        f.step(4.5 if k % 4 == 0 else 0.0, peers())
    for _ in range(30):
        assert f.step(0.0, peers()) is Validity.GOOD


def test_a_long_zero_while_the_peers_run_is_stuck_but_not_while_they_rest() -> None:
    # Compressors that read exactly 0 when off: zero itself is normal here.
    def run(p_on: float) -> list[Validity | None]:
        f = Feed(DerClass.THERMOSTAT, -0.1, 7.0, seed=3)
        peers = lambda: cycling(f.rng, f.n_peers, p_on, 3.5, 0.0)  # noqa: E731
        for k in range(40):
            f.step(3.5 if k % 4 else 0.0, peers())
        return [f.step(0.0, peers()) for _ in range(150)]  # 2.5 h at zero

    hot = run(0.8)  # a hot afternoon: peers run 80 % of the time
    assert set(hot[:30]) == {Validity.GOOD}  # half an hour off is normal
    assert set(hot[-30:]) == {Validity.QUESTIONABLE}  # two hours is not
    assert set(run(0.05)) == {Validity.GOOD}  # a cool night: nobody runs


def test_a_frozen_register_away_from_its_setpoint_is_stuck() -> None:
    f = Feed(DerClass.BATTERY, -5.0, 5.0)
    peers = lambda: f.rng.normal(-1.0, 0.05, f.n_peers)  # noqa: E731
    for _ in range(10):
        f.step(-0.7, peers())
    f.board.update(at(f.t), {"dev": CommandInForce("dispatch-1", -1.0, held=True)})
    verdicts = [f.step(-0.7, peers()) for _ in range(6)]
    assert verdicts[0] is Validity.GOOD  # still settling
    assert Detail.STUCK in f.last.quality.detail


def test_a_battery_holding_its_setpoint_or_empty_is_not_stuck() -> None:
    for value in (-1.0, 0.0):  # exactly what it was told / nothing left to give
        f = Feed(DerClass.BATTERY, -5.0, 5.0)
        for _ in range(10):
            f.step(-0.4, f.rng.normal(-1.0, 0.05, f.n_peers))
        f.board.update(at(f.t), {"dev": CommandInForce("dispatch-1", -1.0, held=True)})
        for _ in range(10):
            assert f.step(value, f.rng.normal(-1.0, 0.05, f.n_peers)) is Validity.GOOD


def test_a_water_heater_at_zero_with_a_cold_tank_is_stuck_until_it_draws_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = Feed(DerClass.WATER_HEATER, -0.1, 6.0)
    peers = lambda: cycling(f.rng, f.n_peers, 0.2, 4.5, 0.0)  # noqa: E731
    for k in range(12):
        f.step(4.5 if k % 4 == 0 else 0.0, peers(), demand=k % 4 == 0)
    # A full tank: zero is what a healthy heater reads.
    for _ in range(5):
        assert f.step(0.0, peers(), demand=False) is Validity.GOOD
    caplog.set_level(logging.INFO, logger="gateway.telemetry.quality")
    # The tank goes cold (its state says heat) and the power stays at 0 kW.
    verdicts = [f.step(0.0, peers(), demand=True) for _ in range(10)]
    assert verdicts[:2] == [Validity.GOOD, Validity.GOOD]
    assert set(verdicts[2:]) == {Validity.QUESTIONABLE}
    assert Detail.STUCK in f.last.quality.detail
    snap = f.qc.snapshot(at(f.t))
    assert snap.status[0] == DeviceStatus.EXCLUDED
    # It stays stuck while the value stays frozen, whatever the tank says next.
    assert f.step(0.0, peers(), demand=False) is Validity.QUESTIONABLE
    f.step(4.5, peers(), demand=True)
    assert f.last.quality.validity is Validity.GOOD
    went = [r for r in caplog.records if "is stuck" in r.getMessage()]
    back = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(went) == 1
    assert went[0].levelno == logging.WARNING
    assert "dev" in went[0].getMessage()
    assert "must draw power" in went[0].getMessage()
    assert len(back) == 1


def test_the_state_of_a_device_says_when_it_must_draw() -> None:
    index = FleetIndex(
        [
            DeviceProfile("wh", DerClass.WATER_HEATER, "feeder:A", -0.1, 6.0),
            DeviceProfile("ev", DerClass.EVSE, "feeder:A", 0.0, 11.0),
            DeviceProfile("bat", DerClass.BATTERY, "feeder:A", -5.0, 5.0),
        ]
    )
    qc = QualityClassifier(index)

    def state(device_id: str, **kw: object) -> DeviceState:
        return DeviceState.model_validate(
            {"device_id": device_id, "timestamp": T0, "power_kw": 0.0, "source": "t", **kw}
        )

    assert qc.demand_of(state("wh", soc_pct=30.0)) is True  # the tank is cold
    assert qc.demand_of(state("wh", soc_pct=90.0)) is False
    assert qc.demand_of(state("wh", soc_pct=30.0, setpoint_kw=0.0)) is False  # shed
    assert qc.demand_of(state("wh")) is None
    need = EvSession(energy_needed_kwh=12.0)
    assert qc.demand_of(state("ev", ev=need, setpoint_kw=7.2)) is True
    assert qc.demand_of(state("ev", ev=need, setpoint_kw=0.0)) is False  # paused
    assert qc.demand_of(state("ev", ev=need)) is None  # nothing says it may charge
    assert qc.demand_of(state("ev", ev=EvSession(energy_needed_kwh=0.0), setpoint_kw=7.2)) is False
    assert qc.demand_of(state("ev", setpoint_kw=7.2)) is False  # nothing plugged in
    assert qc.demand_of(state("bat", soc_pct=50.0)) is None  # its setpoint says


def test_an_ev_charger_at_zero_while_it_should_charge_is_stuck_not_while_unplugged() -> None:
    def run(demand: bool | None) -> list[Validity | None]:
        f = Feed(DerClass.EVSE, -0.1, 12.0)
        peers = lambda: cycling(f.rng, f.n_peers, 0.4, 7.2, 0.0)  # noqa: E731
        for k in range(12):
            f.step(7.2 if k % 2 else 0.0, peers(), demand=bool(k % 2))
        return [f.step(0.0, peers(), demand=demand) for _ in range(6)]

    assert set(run(True)[2:]) == {Validity.QUESTIONABLE}  # plugged in, allowed, needs energy
    assert set(run(False)) == {Validity.GOOD}  # unplugged, full or paused
    assert set(run(None)) == {Validity.GOOD}  # nothing says


def test_a_battery_at_zero_under_a_setpoint_its_charge_allows_is_stuck() -> None:
    def run(soc_pct: float | None, setpoint: float = -2.0) -> list[Validity | None]:
        f = Feed(DerClass.BATTERY, -5.0, 5.0)
        peers = lambda: f.rng.normal(-2.0, 0.05, f.n_peers)  # noqa: E731
        for _ in range(10):
            f.step(0.0, peers(), soc_pct=soc_pct)
        f.board.update(at(f.t), {"dev": CommandInForce("dispatch-1", setpoint, held=True)})
        return [f.step(0.0, peers(), soc_pct=soc_pct) for _ in range(8)]

    held = run(80.0)
    assert held[0] is Validity.GOOD  # still settling
    assert set(held[-3:]) == {Validity.QUESTIONABLE}
    assert set(run(12.0)) == {Validity.GOOD}  # at its reserve: nothing left to give
    assert set(run(97.0, setpoint=2.0)) == {Validity.GOOD}  # full: cannot charge
    assert set(run(50.0, setpoint=0.0)) == {Validity.GOOD}  # told to idle


# ---------------------------------------------------------------------------- estimation


def battery_fleet(n: int) -> FleetIndex:
    return FleetIndex(profiles(DerClass.BATTERY, n, -5.0, 5.0, prefix="b"))


def snapshot(now: float, value: np.ndarray, read_at: np.ndarray) -> FleetSnapshot:
    fresh = now - read_at <= 1.5 * PERIOD
    return FleetSnapshot(
        now=now,
        value=value.copy(),
        age_s=now - read_at,
        status=np.where(fresh, DeviceStatus.REPORTING, DeviceStatus.MISSING).astype(np.int8),
        stale=~fresh,
    )


def warm(est: GroupEstimator, rng: np.random.Generator, n: int, cycles: int) -> float:
    now = 0.0
    for c in range(cycles):
        now = c * PERIOD
        est.cycle(snapshot(now, rng.normal(1.0, 0.2, n), np.full(n, now - 20.0)))
    return now


def test_the_expected_response_carries_the_step_before_any_report_shows_it() -> None:
    n, rng = 400, np.random.default_rng(5)
    index = battery_fleet(n)
    board = CommandBoard(index)
    est = GroupEstimator(index, EstimatorConfig(period_s=PERIOD, seed=1), commands=board)
    now = warm(est, rng, n, 40) + PERIOD
    cohort = {f"b{i}": CommandInForce("dispatch-1", -3.0, held=True) for i in range(n // 2)}
    board.update(now - 5.0, cohort)  # the event starts 5 s before this cycle
    # Every reading at hand was taken before the step.
    truth = np.r_[np.full(n // 2, -3.0), rng.normal(1.0, 0.2, n - n // 2)]
    stale_readings = np.r_[np.full(n // 2, 1.0), truth[n // 2 :]]
    cyc = est.cycle(snapshot(now, stale_readings, np.full(n, now - 30.0)))
    g = cyc.group("event", np.arange(n // 2))
    assert g.power_kw == np.float64(-3.0 * (n // 2))
    assert g.lower_kw <= truth[: n // 2].sum() <= g.upper_kw
    assert g.devices_estimated == n // 2


def test_a_cohort_step_reaches_its_missing_devices_from_its_reporting_ones() -> None:
    n, rng = 600, np.random.default_rng(6)
    index = battery_fleet(n)
    board = CommandBoard(index)
    est = GroupEstimator(index, EstimatorConfig(period_s=PERIOD, seed=2), commands=board)
    now = warm(est, rng, n, 40)
    event = n // 2
    # No expected power given: only the cohort's reporting devices show the step.
    board.update(now + 1.0, {f"b{i}": CommandInForce("dispatch-1") for i in range(event)})
    for _ in range(3):
        now += PERIOD
        truth = np.r_[rng.normal(-3.0, 0.2, event), rng.normal(1.0, 0.2, n - event)]
        read_at = np.full(n, now - 20.0)
        read_at[: event // 2] = now - 10 * PERIOD  # half the cohort went dark before the step
        value = np.where(np.arange(n) < event // 2, 1.0, truth)
        cyc = est.cycle(snapshot(now, value, read_at))
    g = cyc.group("dark half", np.arange(event // 2))
    assert abs(g.power_kw - truth[: event // 2].sum()) < 0.1 * abs(truth[: event // 2].sum())


def test_intervals_under_command_start_as_wide_as_the_last_command_proved_them() -> None:
    # A cohort held at a setpoint wanders together (-3 kW give or take a common 1 kW): the
    # held-out errors of those cycles are not those of quiet hours. Long after, in another
    # hour of the day, the next command's intervals start as wide as the last one measured.
    n, rng = 400, np.random.default_rng(8)
    index = battery_fleet(n)
    board = CommandBoard(index)
    config = EstimatorConfig(period_s=PERIOD, seed=3, calibration_window=100, min_calibration=20)
    est = GroupEstimator(index, config, commands=board)
    cohort = {f"b{i}": CommandInForce("dispatch-1", -2.0, held=True) for i in range(n // 2)}

    def cycle(c: int, shift: float) -> float:
        now = c * PERIOD
        value = rng.normal(1.0, 0.2, n)
        value[: n // 2] += shift
        read_at = np.where(rng.random(n) < 0.3, now - 10 * PERIOD, now - 20.0)
        return est.cycle(snapshot(now, value, read_at)).multiplier

    for c in range(60):
        cycle(c, 0.0)
    board.update(60 * PERIOD - 1, cohort)
    for c in range(60, 100):
        during = cycle(c, -3.0 + rng.normal(0.0, 1.0))
    board.update(100 * PERIOD - 1, {})
    for c in range(100, 240):
        quiet = cycle(c, 0.0)
    assert during > 1.5 * quiet  # the quiet hours forgot the event
    board.update(240 * PERIOD - 1, cohort)
    assert cycle(240, -3.0 + rng.normal(0.0, 1.0)) >= 0.9 * during


def test_a_group_with_too_many_excluded_devices_is_suspect() -> None:
    n, rng = 200, np.random.default_rng(7)
    index = battery_fleet(n)
    est = GroupEstimator(index, EstimatorConfig(period_s=PERIOD, suspect_excluded_share=0.1))
    now = warm(est, rng, n, 20) + PERIOD
    for excluded, expected in ((10, Quality.ESTIMATED), (30, Quality.SUSPECT)):
        status = np.full(n, DeviceStatus.REPORTING, dtype=np.int8)
        status[:excluded] = DeviceStatus.EXCLUDED
        snap = FleetSnapshot(now, rng.normal(1.0, 0.2, n), np.full(n, 20.0), status, status < 0)
        assert est.cycle(snap).group("g", np.arange(n)).quality is expected
        now += PERIOD


# ---------------------------------------------------------------------------- enrolment


def test_enrolment_appends_devices_and_keeps_every_history() -> None:
    f = Feed(DerClass.THERMOSTAT, -0.1, 7.0)
    peers = lambda: cycling(f.rng, f.n_peers, 0.7, 3.5, 0.03)  # noqa: E731
    for k in range(12):
        f.step(3.5 if k % 3 else 0.03, peers())
    est = GroupEstimator(f.qc.index, commands=f.board)
    est.cycle(f.qc.snapshot(at(f.t)))
    new = DeviceProfile("new", DerClass.BATTERY, "feeder:B", -5.0, 5.0)
    index = f.qc.index.extended([new])
    assert index.peer_groups == ("feeder:A", "feeder:B")
    f.qc.extend(index)
    est.extend(index)
    assert len(f.board.index) == len(index)
    # The old device's history survives: its sensor dying at zero is still recognised.
    f.step(3.5, peers())
    for _ in range(3):
        f.step(0.0, peers())
    assert Detail.STUCK in f.last.quality.detail
    f.qc.observe(RawReading("new", at(f.t), at(f.t + 1), 1.5))
    snap = f.qc.snapshot(at(f.t + 2))
    assert snap.value[-1] == 1.5
    assert snap.status[-1] == DeviceStatus.REPORTING
    cyc = est.cycle(snap)
    assert cyc.value[-1] == 1.5
    assert np.isfinite(est._ring_v[0]).any()  # the estimator kept what it had learnt
