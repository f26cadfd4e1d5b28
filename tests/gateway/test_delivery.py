"""The closed loop on a dispatch (pure): delivered response, correction, the truth on the ack."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.delivery import (
    BaselineTracker,
    DeliveryLoop,
    DeliveryTuning,
    DeviceBaseline,
    EnvelopeWatch,
    ReleaseGovernor,
    baseline_taus,
)
from unified.model import (
    BatteryRatings,
    DerClass,
    Device,
    DeviceState,
    EnvelopeInterval,
    OperatingEnvelope,
    Target,
    TopologyLocation,
)

NOW = datetime(2026, 7, 1, 16, 0, tzinfo=UTC)
TUNING = DeliveryTuning(smoothing_s=60.0, integral_s=300.0, settle_s=300.0)


def run_plant(
    loop: DeliveryLoop,
    request: float,
    respond: float,
    *,
    devices: int = 10,
    available: float = 1000.0,
    minutes: int = 60,
) -> list[float]:
    """Each of ``devices`` gives ``respond`` × its share of what the loop commits; returns what
    was committed each 10 s period."""
    baseline = {f"d{i}": DeviceBaseline(3.0, 0.01) for i in range(devices)}
    loop.hold(baseline)
    committed: list[float] = []
    total = request
    for k in range(minutes * 6):
        now = NOW + timedelta(seconds=10 * k)
        measured = dict.fromkeys(baseline, 3.0 + respond * total / devices)
        delivery = loop.update(now, request, measured, available)
        total = delivery.committed_kw
        committed.append(total)
    return committed


def test_a_device_that_does_as_told_needs_no_correction() -> None:
    loop = DeliveryLoop(TUNING)
    committed = run_plant(loop, -100.0, respond=1.0)
    assert all(c == pytest.approx(-100.0, abs=0.5) for c in committed)
    assert loop.correction_kw == pytest.approx(0.0, abs=0.5)


def test_over_delivery_is_corrected_down_and_under_delivery_up() -> None:
    # Thermostats that all stop give twice what each was asked: the loop asks for half.
    over = DeliveryLoop(TUNING)
    committed = run_plant(over, -100.0, respond=2.0)
    assert committed[-1] == pytest.approx(-50.0, rel=0.05)
    # Houses whose response has decayed give half: the loop asks for twice as much.
    under = DeliveryLoop(TUNING)
    committed = run_plant(under, -100.0, respond=0.5)
    assert committed[-1] == pytest.approx(-200.0, rel=0.05)
    assert under.delivered_kw == pytest.approx(-100.0, rel=0.05)


def test_the_correction_never_turns_a_shed_into_a_load_up_nor_exceeds_the_devices() -> None:
    loop = DeliveryLoop(TUNING)
    committed = run_plant(loop, -100.0, respond=-1.0)  # devices do the opposite of what is asked
    assert all(-1000.0 <= c <= 0.0 for c in committed)
    assert committed[-1] == pytest.approx(-1000.0)  # all it can ask, never a load-up
    capped = DeliveryLoop(TUNING)
    committed = run_plant(capped, -100.0, respond=0.2, available=150.0)
    assert min(committed) >= -150.0
    assert committed[-1] == pytest.approx(-150.0)


def test_short_is_flagged_once_settled_and_the_interval_holds_the_truth() -> None:
    loop = DeliveryLoop(TUNING)
    baseline = {f"d{i}": DeviceBaseline(3.0, 0.25) for i in range(10)}
    loop.hold(baseline)
    # Only 40 kW can be had (the devices are at their limit), 100 kW asked.
    reports = [
        loop.update(NOW + timedelta(seconds=10 * k), -100.0, dict.fromkeys(baseline, -1.0), 40.0)
        for k in range(60)
    ]
    assert not reports[5].short  # not before settle_s
    assert reports[-1].short
    last = reports[-1]
    assert last.delivered_kw == pytest.approx(-40.0, abs=0.5)
    assert last.delivered_lower_kw < -40.0 < last.delivered_upper_kw
    assert last.devices == 10


def test_a_device_back_from_a_dropout_keeps_its_pre_event_baseline() -> None:
    loop = DeliveryLoop(TUNING)
    loop.hold({"a": DeviceBaseline(3.0), "b": DeviceBaseline(2.0)})
    loop.hold({"a": DeviceBaseline(3.0)})
    # While it was away its tracker learnt the event (0.5 kW): that is not its baseline.
    loop.hold({"a": DeviceBaseline(3.0), "b": DeviceBaseline(0.5)})
    assert loop.baselines["b"].mean_kw == 2.0


def test_baseline_tracker_learns_only_while_the_device_is_left_alone() -> None:
    tracker = BaselineTracker(tau_s=600.0)
    for k in range(360):  # one hour of a compressor on 6 min of every 10
        power = 3.0 if k % 60 < 36 else 0.0
        tracker.observe("t", NOW + timedelta(seconds=10 * k), power, held=False)
    mean_before = tracker.mean_kw["t"]
    assert mean_before == pytest.approx(1.8, abs=0.4)
    assert tracker.var_kw2["t"] > 0.5  # a cycling compressor has a wide baseline
    for k in range(360, 720):
        tracker.observe("t", NOW + timedelta(seconds=10 * k), 0.0, held=True)
    assert tracker.mean_kw["t"] == mean_before


def test_envelope_watch_counts_time_outside_and_the_worst_excursion() -> None:
    watch = EnvelopeWatch()
    readings = [90.0, 99.0, 101.5, 110.0, 104.0, 95.0]  # import limit 100 kW, 2 % tolerance
    reports = [
        watch.update(NOW + timedelta(seconds=10 * k), (100.0, None), kw, 5, 1)
        for k, kw in enumerate(readings)
    ]
    assert [r.outside for r in reports] == [False, False, False, True, True, False]
    assert reports[-1].seconds_in_force == 50.0
    assert reports[-1].seconds_outside == 20.0
    assert reports[-1].worst_excursion_kw == pytest.approx(10.0)
    export = EnvelopeWatch().update(NOW, (None, 50.0), -60.0, 5, 2)
    assert export.outside
    assert export.worst_excursion_kw == pytest.approx(10.0)


def _reading(device_id: str, kw: float, at: datetime) -> DeviceState:
    return DeviceState(device_id=device_id, timestamp=at, power_kw=kw, source="test")


def test_release_governor_counts_a_released_house_until_it_is_seen_running() -> None:
    governor = ReleaseGovernor(
        limit_kw=3.0, baselines={f"t{i}": DeviceBaseline(1.5) for i in range(4)}, smoothing_s=1.0
    )
    # Four houses held off (0 kW each against 1.5 kW baselines): the group is 6 kW below.
    off = {f"t{i}": _reading(f"t{i}", 0.0, NOW) for i in range(4)}
    assert governor.allowance(NOW, off) == pytest.approx(9.0)
    # Two are let go (each to go from 0 to 3 kW). Their compressors have not started yet: what
    # they are about to draw is counted all the same, so the room is gone.
    later = NOW + timedelta(seconds=30)
    room = governor.allowance(later, off, {"t0": 3.0, "t1": 3.0})
    assert room == pytest.approx(3.0 - (3.0 + 3.0 - 1.5 - 1.5 - 1.5 - 1.5), abs=0.01)
    # Once seen running the measurement takes over (and it is the same).
    running = {**off, "t0": _reading("t0", 3.0, later), "t1": _reading("t1", 3.0, later)}
    again = governor.allowance(later + timedelta(seconds=30), running)
    assert again == pytest.approx(room, abs=0.01)
    # A house let go that never starts stops counting after pending_s.
    stuck = governor.allowance(later + timedelta(seconds=60), off, {"t2": 3.0})
    gone = governor.allowance(later + timedelta(seconds=60 + governor.pending_s + 30), off)
    assert gone > stuck


def test_envelope_report_says_interval_by_interval_whether_it_held_and_who_acted() -> None:
    envelope = OperatingEnvelope(
        command_id="cap",
        target=Target(group_id="feeder:f1"),
        intervals=(
            EnvelopeInterval(start=NOW, end=NOW + timedelta(minutes=10), import_limit_kw=100.0),
            EnvelopeInterval(
                start=NOW + timedelta(minutes=20),
                end=NOW + timedelta(minutes=25),
                import_limit_kw=80.0,
            ),
        ),
    )
    watch = EnvelopeWatch(interval_s=300)
    # First 5 minutes held at 99 kW by b1; the next 5 at 110 kW (outside), b2 joins.
    for k in range(31):
        watch.update(NOW + timedelta(seconds=10 * k), (100.0, None), 99.0, 3, {"b1"})
    for k in range(31, 60):
        watch.update(NOW + timedelta(seconds=10 * k), (100.0, None), 110.0, 3, {"b1", "b2"})
    watch.pause()  # a gap of ten minutes without a limit: not counted
    for k in range(120, 150):
        watch.update(NOW + timedelta(seconds=10 * k), (80.0, None), 79.0, 3, set())
    report = watch.report(envelope, NOW + timedelta(minutes=26))
    assert [i.held for i in report.intervals] == [True, False, True]
    assert [i.start for i in report.intervals] == [
        NOW,
        NOW + timedelta(minutes=5),
        NOW + timedelta(minutes=20),
    ]
    first, second, third = report.intervals
    assert first.mean_measured_kw == pytest.approx(99.0)
    assert second.mean_measured_kw == pytest.approx(110.0, abs=0.5)
    assert second.seconds_outside == pytest.approx(290.0)
    assert third.import_limit_kw == 80.0
    assert report.seconds_in_force == pytest.approx(590 + 290)  # the gap is not counted
    assert report.worst_excursion_kw == pytest.approx(10.0)
    assert (report.intervals_total, report.intervals_held) == (3, 2)
    assert report.devices_acted == ("b1", "b2")
    assert report.start == NOW
    assert report.end == NOW + timedelta(minutes=25)


def test_a_water_heater_seen_for_an_hour_is_drawn_toward_its_class_until_seen_longer() -> None:
    # Two heaters of one class, an hour of readings: one heated for 12 minutes of it (4.5 kW),
    # the other not at all. Neither hour says what it draws on average (about 0.45 kW each).
    tracker = BaselineTracker(tau_s=900.0, tau_of=baseline_taus([_heater("w1"), _heater("w2")]))
    at = NOW
    for k in range(360):
        at = NOW + timedelta(seconds=10 * k)
        tracker.observe("w1", at, 4.5 if k < 72 else 0.0, held=False)
        tracker.observe("w2", at, 0.0, held=False)
    own_w1 = 4.5 * 72 / 360
    assert 0.0 < tracker.mean_kw["w2"] < tracker.mean_kw["w1"] < own_w1
    # An hour of a four-hour time constant: three quarters of the way to the class mean.
    pooled = own_w1 / 2
    assert tracker.mean_kw["w1"] == pytest.approx(pooled + 0.25 * (own_w1 - pooled), rel=0.05)
    assert tracker.mean_kw["w1"] + tracker.mean_kw["w2"] == pytest.approx(own_w1, rel=0.03)
    # Seen long enough (every hour alike), each is its own again.
    for k in range(360, 360 * 6):
        at = NOW + timedelta(seconds=10 * k)
        tracker.observe("w1", at, 4.5 if k % 360 < 72 else 0.0, held=False)
        tracker.observe("w2", at, 0.0, held=False)
    assert tracker.mean_kw["w1"] == pytest.approx(own_w1, rel=0.15)
    assert tracker.mean_kw["w2"] < 0.05 * own_w1
    # A thermostat is learnt over the tracker's own quarter of an hour, as before.
    assert baseline_taus([_heater("t1", DerClass.THERMOSTAT)]) == {}


def _heater(device_id: str, der_class: DerClass = DerClass.WATER_HEATER) -> Device:
    return Device(
        device_id=device_id,
        der_class=der_class,
        adapter="mqtt_water_heater",
        location=TopologyLocation(substation="s1", feeder="f1"),
        ratings=BatteryRatings(max_charge_kw=4.5, max_discharge_kw=4.5, capacity_kwh=4.4),
    )


def test_resting_houses_do_not_count_while_batteries_alone_carry_a_dispatch() -> None:
    """The optimiser meets a shed with batteries and calls no house: the houses' drift (here
    each draws 1 kW more than its baseline) is not the dispatch's doing, and the loop must not
    chase it. Once a house is called, every house of the dispatch counts."""
    from gateway.delivery import close_loops
    from gateway.dispatch import Plan
    from unified.model import Allocation

    tracker = BaselineTracker()
    houses = [f"t{i}" for i in range(4)]
    for did in houses:
        tracker.observe(did, NOW - timedelta(minutes=10), 1.0, held=False)

    def plan(house_kw: float) -> Plan:
        p = Plan()
        p.requested_kw["shed"] = -6.0
        p.available_kw["shed"] = 20.0
        p.allocations["shed"] = (
            Allocation(device_id="b1", requested_kw=-6.0, commanded_kw=-6.0),
            *(
                Allocation(device_id=d, requested_kw=house_kw, commanded_kw=house_kw)
                for d in houses
            ),
        )
        return p

    states = {"b1": _reading("b1", -6.0, NOW)} | {d: _reading(d, 2.0, NOW) for d in houses}
    loops: dict[str, DeliveryLoop] = {}
    out = close_loops(NOW, plan(0.0), states, tracker, loops, TUNING, set(houses))
    assert out["shed"].delivered_kw == pytest.approx(-6.0)  # the battery's, not -2 kW
    called = close_loops(NOW, plan(-1.0), states, tracker, {}, TUNING, set(houses))
    assert called["shed"].delivered_kw == pytest.approx(-6.0 + 4 * 1.0)  # houses count now
