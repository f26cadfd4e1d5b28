"""Settlement under the other rules: control groups, aggregate-load group baselines, the method
named in the report, per-program rules in the configuration. Expected numbers worked by hand."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from gateway.config import SettlementConfig
from gateway.flex import (
    BaselineConfig,
    BaselineMethod,
    DeviceHistory,
    EventCalendar,
    EventToSettle,
    GroupBaselineMode,
    method_baseline,
    settle_event,
)
from gateway.flex.settlement import FlagCode, history_span
from unified.model import AckState, DispatchMode

D = date
EVENT_DAY = D(2024, 6, 20)  # a Thursday
START = datetime(2024, 6, 20, 14, tzinfo=UTC)
END = START + timedelta(hours=2)
HISTORY_START = datetime(2024, 4, 1, tzinfo=UTC)
CALENDAR = EventCalendar(
    event_days=frozenset({D(2024, 6, 18)}), holidays=frozenset({D(2024, 6, 19)})
)


def flat_days(device_id: str, per_day: dict[date, float], event_kw: float) -> DeviceHistory:
    """Hourly: ``per_day[day]`` (else 1 kW) before the event day; on it, no data before the
    event (so no day-of adjustment) and ``event_kw`` during it."""
    hours = 84 * 24
    values = np.full(hours, np.nan)
    for i in range(hours):
        t = HISTORY_START + timedelta(hours=i)
        if t.date() < EVENT_DAY:
            values[i] = per_day.get(t.date(), 1.0)
        elif START <= t < END:
            values[i] = event_kw
    return DeviceHistory(device_id, HISTORY_START, 3600, values)


def event(devices: tuple[str, ...], allocations: dict[str, float]) -> EventToSettle:
    return EventToSettle(
        command_id="ev-1",
        program="mass-market",
        group_id="feeder:f1",
        mode=DispatchMode.DELTA,
        kw=-16.0,
        start=START,
        end=END,
        final_state=AckState.COMPLETED,
        devices=devices,
        allocations=allocations,
    )


def test_control_group_settlement() -> None:
    # Ten devices; control_share 0.2, seed 1: the two whose SHA-256("1:id") sorts first are
    # held out. Treated devices draw 1 kW in the event, the control devices 3 kW: each treated
    # device's baseline is the control mean, 3 kW; the group of 8 treated: 24 kW baseline,
    # 8 kW metered, delivered 8 - 24 = -16 kW, exactly the -16 kW asked: ratio 1.0.
    ids = tuple(f"h{i}" for i in range(10))
    control = sorted(ids, key=lambda d: hashlib.sha256(f"1:{d}".encode()).digest())[:2]
    treated = [d for d in ids if d not in control]
    histories = {d: flat_days(d, {}, 3.0 if d in control else 1.0) for d in ids}
    config = BaselineConfig(method=BaselineMethod.CONTROL_GROUP, control_share=0.2, control_seed=1)
    report = settle_event(
        event(ids, dict.fromkeys(treated, -2.0)),
        histories,
        CALENDAR,
        generated_at=END,
        config=config,
    )
    assert report.method is BaselineMethod.CONTROL_GROUP
    assert report.control_devices == tuple(sorted(control))
    assert [r.device_id for r in report.devices] == treated
    assert report.group is not None
    assert report.group.baseline_kw == pytest.approx((24.0, 24.0))
    assert report.group.metered_kw == pytest.approx((8.0, 8.0))
    assert report.mean_delivered_kw == pytest.approx(-16.0)
    assert report.performance_ratio == pytest.approx(1.0)
    assert report.baseline_method.startswith("control_group (control group: 20% of the group")


def test_a_called_control_device_is_settled_as_treated_and_flagged() -> None:
    ids = tuple(f"h{i}" for i in range(10))
    control = sorted(ids, key=lambda d: hashlib.sha256(f"1:{d}".encode()).digest())[:2]
    histories = {d: flat_days(d, {}, 3.0) for d in ids}
    config = BaselineConfig(method=BaselineMethod.CONTROL_GROUP, control_share=0.2, control_seed=1)
    report = settle_event(
        event(ids, dict.fromkeys(ids, -2.0)), histories, CALENDAR, generated_at=END, config=config
    )
    assert report.control_devices == ()
    codes = {(f.code, f.device_id) for f in report.flags}
    assert {(FlagCode.CONTROL_DEVICE_CALLED, d) for d in control} <= codes
    assert any(
        f.code is FlagCode.NO_BASELINE or f.code is FlagCode.FALLBACK_PRE_EVENT_MEAN
        for f in report.flags
    )


# Device a: 17 (6 kW), 14 (5), 13 (3), 12 (7), 11 (4); device b: 17 (1), 14 (2), 13 (6),
# 12 (2), 11 (3). (19 is a holiday, 18 an event day: the 5 most recent weekdays are these.)
A_DAYS = {D(2024, 6, 17): 6.0, D(2024, 6, 14): 5.0, D(2024, 6, 13): 3.0}
A_DAYS |= {D(2024, 6, 12): 7.0, D(2024, 6, 11): 4.0}
B_DAYS = {D(2024, 6, 17): 1.0, D(2024, 6, 14): 2.0, D(2024, 6, 13): 6.0}
B_DAYS |= {D(2024, 6, 12): 2.0, D(2024, 6, 11): 3.0}
PJM = BaselineConfig(method=BaselineMethod.PJM_HIGH_4_OF_5)


def test_sum_of_device_baselines_and_baseline_of_the_summed_load_differ() -> None:
    # Sum of devices (PJM High 4 of 5, no adjustment: no event-day data before the event):
    #   a: highest 4 = 12 (7), 17 (6), 14 (5), 11 (4) -> 5.5 kW
    #   b: highest 4 = 13 (6), 11 (3), 14 (2), 12 (2) (17 at 1 dropped) -> 3.25 kW
    #   group: 8.75 kW.
    # Summed load: 17: 7, 14: 7, 13: 9, 12: 9, 11: 7; highest 4 = 13, 12 (9 each), then of the
    #   7s the most recent, 17 and 14 -> (9 + 9 + 7 + 7) / 4 = 8.0 kW; device rows get it pro
    #   rata: a 8.0 x 5.5 / 8.75, b 8.0 x 3.25 / 8.75.
    histories = {"a": flat_days("a", A_DAYS, 2.0), "b": flat_days("b", B_DAYS, 1.0)}
    ev = event(("a", "b"), {"a": -2.0, "b": -2.0})
    by_device = settle_event(ev, histories, CALENDAR, generated_at=END, config=PJM)
    assert by_device.group is not None
    assert by_device.group.baseline_kw == pytest.approx((8.75, 8.75))
    assert by_device.group_baseline is GroupBaselineMode.SUM_OF_DEVICES

    aggregate = PJM.model_copy(update={"group": GroupBaselineMode.AGGREGATE_LOAD})
    summed = settle_event(ev, histories, CALENDAR, generated_at=END, config=aggregate)
    assert summed.group is not None
    assert summed.group.baseline_kw == pytest.approx((8.0, 8.0))
    rows = {r.device_id: r for r in summed.devices}
    a, b = rows["a"].baseline, rows["b"].baseline
    assert a is not None
    assert b is not None
    assert a.kw == pytest.approx((8.0 * 5.5 / 8.75,) * 2)
    assert b.kw == pytest.approx((8.0 * 3.25 / 8.75,) * 2)
    assert "aggregate-load baseline" in a.method
    # metered 3 kW against 8 kW: delivered -5 kW of the -16 asked (ratio 5/16).
    assert summed.mean_delivered_kw == pytest.approx(-5.0)
    assert summed.baseline_method.endswith("group baseline aggregate_load")
    # The summed load, settled by hand above, is also what the rule gives a pseudo-device.
    total = DeviceHistory("sum", HISTORY_START, 3600, histories["a"].kw + histories["b"].kw)
    assert method_baseline(total, CALENDAR, START, END, PJM).kw == pytest.approx((8.0, 8.0))


def test_report_names_the_method() -> None:
    histories = {"a": flat_days("a", A_DAYS, 2.0)}
    report = settle_event(
        event(("a",), {"a": -2.0}), histories, CALENDAR, generated_at=END, config=PJM
    )
    assert report.method is BaselineMethod.PJM_HIGH_4_OF_5
    assert report.baseline_method.startswith(
        "pjm_high4of5 (PJM High 4 of 5: highest 4 of 5 weekdays / 2 of 3 like weekend days"
    )
    row = report.devices[0]
    assert row.baseline is not None
    assert row.baseline.kw == pytest.approx((5.5, 5.5))
    assert '"method":"pjm_high4of5"' in report.model_dump_json()


def test_programs_take_their_own_rule_and_inherit_the_rest() -> None:
    config = SettlementConfig.model_validate(
        {
            "timezone": "America/New_York",
            "baseline": {"interval_s": 900, "adjustment_duration_s": 1800},
            "programs": {
                "pjm-elr": {"method": "pjm_high4of5"},
                "thermostats": {"method": "control_group", "control_share": 0.05},
            },
        }
    )
    assert config.baseline_for("other").method is BaselineMethod.CAISO_10_IN_10
    pjm = config.baseline_for("pjm-elr")
    assert pjm.method is BaselineMethod.PJM_HIGH_4_OF_5
    assert pjm.interval_s == 900  # from [settlement.baseline]
    assert config.baseline_for("thermostats").control_share == 0.05
    with pytest.raises(ValueError, match="method"):
        SettlementConfig.model_validate({"programs": {"x": {"method": "guess"}}})


def test_history_span_covers_each_rule() -> None:
    # PJM reads 45 days back and 3 h before the start; CAISO's default 45 days and 4 h.
    pjm = history_span(START, PJM, 3600)
    assert pjm == START - timedelta(days=46, hours=4)
    nyiso = BaselineConfig(method=BaselineMethod.NYISO_CBL, lookback_days=20)
    assert history_span(START, nyiso, 3600) == START - timedelta(days=31, hours=4)


def test_control_group_with_aggregate_load_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="already a baseline of the group"):
        BaselineConfig(method=BaselineMethod.CONTROL_GROUP, group=GroupBaselineMode.AGGREGATE_LOAD)


def test_aggregate_load_leaves_a_fallback_device_out_of_the_sum() -> None:
    # c joined on 17 June (2 kW since): one PJM weekday, too few, so its baseline is the
    # pre-event mean, 2 kW. It is not summed with a and b (its missing weeks would lower the
    # sum): the group is a and b's summed-load baseline, 8.0 kW (as above), plus c's 2.0.
    hours = 84 * 24
    values = np.full(hours, np.nan)
    joined = int((datetime(2024, 6, 17, tzinfo=UTC) - HISTORY_START).total_seconds() // 3600)
    before_event = int((START - HISTORY_START).total_seconds() // 3600)
    values[joined:before_event] = 2.0
    histories = {
        "a": flat_days("a", A_DAYS, 2.0),
        "b": flat_days("b", B_DAYS, 1.0),
        "c": DeviceHistory("c", HISTORY_START, 3600, values),
    }
    aggregate = PJM.model_copy(update={"group": GroupBaselineMode.AGGREGATE_LOAD})
    report = settle_event(
        event(("a", "b", "c"), {"a": -2.0, "b": -2.0, "c": -2.0}),
        histories,
        CALENDAR,
        generated_at=END,
        config=aggregate,
    )
    assert report.group is not None
    assert report.group.baseline_kw == pytest.approx((10.0, 10.0))
    rows = {r.device_id: r for r in report.devices}
    c = rows["c"].baseline
    assert c is not None
    assert c.kw == pytest.approx((2.0, 2.0))
    assert any(f.code is FlagCode.FALLBACK_PRE_EVENT_MEAN for f in rows["c"].flags)
