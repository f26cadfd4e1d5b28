"""Horizon schedules on small cases whose optimum is known by hand (1-h steps unless said)."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.services.schedule import (
    EXACT_MIN_RATE_MAX_EVS,
    BatteryPlan,
    EvPlan,
    GroupLimits,
    ScheduleError,
    ScheduleProblem,
    group_net_kw,
    solve_schedule,
)


def prices(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def battery(device_id: str = "b1", **kw: float) -> BatteryPlan:
    args: dict[str, float] = {
        "capacity_kwh": 10.0,
        "soc_kwh": 0.0,
        "max_charge_kw": 10.0,
        "max_discharge_kw": 10.0,
        "charge_efficiency": 1.0,
        "discharge_efficiency": 1.0,
    }
    args.update(kw)
    return BatteryPlan(device_id, **args)  # type: ignore[arg-type]


def test_arbitrage_counts_round_trip_losses() -> None:
    # Charge 10 kW for 1 h at 0.1 (9 kWh stored at 90 %), sell all of it at 0.5: 9 * 0.9 = 8.1 kW.
    b = battery(charge_efficiency=0.9, discharge_efficiency=0.9)
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=prices(0.1, 0.5), batteries=[b]))
    np.testing.assert_allclose(plan.row("b1"), [10.0, -8.1], atol=1e-6)
    assert plan.cost == pytest.approx(1.0 - 8.1 * 0.5)
    assert plan.unmanaged_cost == 0.0
    assert plan.saving == pytest.approx(3.05)


def test_no_arbitrage_when_the_spread_does_not_pay_the_losses() -> None:
    # 0.81 round trip: buying at 0.1 to sell at 0.12 loses 0.1 - 0.0972 per kWh bought.
    b = battery(charge_efficiency=0.9, discharge_efficiency=0.9)
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=prices(0.1, 0.12), batteries=[b]))
    np.testing.assert_allclose(plan.row("b1"), [0.0, 0.0], atol=1e-6)


def test_reserve_soc_is_kept_and_the_horizon_ends_no_emptier() -> None:
    # 5 kWh, reserve 4: only 1 kWh may be sold in the dear first hour, bought back after.
    b = battery(soc_kwh=5.0, reserve_kwh=4.0)
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=prices(0.5, 0.1), batteries=[b]))
    np.testing.assert_allclose(plan.row("b1"), [-1.0, 1.0], atol=1e-6)
    assert plan.energy_kwh[0].min() >= 4.0 - 1e-6
    assert plan.energy_kwh[0, -1] >= 5.0 - 1e-6


def test_ratings_bound_every_step() -> None:
    b = battery(soc_kwh=0.0, max_charge_kw=3.0, max_discharge_kw=2.0)
    plan = solve_schedule(
        ScheduleProblem(step_s=3600, prices=prices(0.1, 0.1, 0.9, 0.9), batteries=[b])
    )
    # 4 kWh to sell at 2 kW in the dear hours: 3 kW, then the 1 kWh left, in the cheap ones.
    np.testing.assert_allclose(plan.row("b1"), [3.0, 1.0, -2.0, -2.0], atol=1e-6)


def test_ev_gets_its_energy_by_departure_in_the_cheapest_plugged_in_hours() -> None:
    # Plugged in steps 0..2, leaves at 3; the cheapest hour (step 3) is after departure.
    ev = EvPlan("ev1", max_kw=7.0, energy_needed_kwh=10.0, departure_step=3)
    day = prices(0.3, 0.1, 0.2, 0.05)
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=day, evs=[ev]))
    np.testing.assert_allclose(plan.row("ev1"), [0.0, 7.0, 3.0, 0.0], atol=1e-6)
    assert plan.cost == pytest.approx(7 * 0.1 + 3 * 0.2)
    # Left alone it charges flat out from arrival: 7 kW at 0.3, then 3 kW at 0.1.
    assert plan.unmanaged_cost == pytest.approx(7 * 0.3 + 3 * 0.1)
    assert plan.shortfall_kwh == {}


def test_ev_arrival_window_and_departure_beyond_the_horizon() -> None:
    # Arrives at step 1, leaves 2 steps after the horizon: 2 * 7 kWh can come later, so only
    # 20 - 14 = 6 kWh must come within the horizon, in its cheapest plugged-in step.
    ev = EvPlan("ev1", max_kw=7.0, energy_needed_kwh=20.0, arrival_step=1, departure_step=5)
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=prices(0.01, 0.3, 0.2), evs=[ev]))
    np.testing.assert_allclose(plan.row("ev1"), [0.0, 0.0, 6.0], atol=1e-6)


def test_ev_never_discharges_unless_it_can() -> None:
    ev = EvPlan("ev1", max_kw=7.0, energy_needed_kwh=5.0, departure_step=3)
    dear_first = prices(0.9, 0.1, 0.1)
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=dear_first, evs=[ev]))
    assert (plan.row("ev1") >= 0).all()
    v2g = EvPlan(
        "ev1", max_kw=7.0, energy_needed_kwh=5.0, departure_step=3, v2g_kw=5.0, v2g_energy_kwh=4.0
    )
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=dear_first, evs=[v2g]))
    # Sells 4 kWh of what it came with, buys back 4 + 5 in the cheap hours.
    assert plan.row("ev1")[0] == pytest.approx(-4.0)
    assert plan.row("ev1")[1:].sum() == pytest.approx(9.0)


def test_nested_envelopes_hold_at_every_level() -> None:
    # a, b under transformer t1 (10 kW), c under t2; the feeder holds all three (15 kW).
    # The cheap first hour is shared: t1 gets its 10, the feeder's 5 left go to c.
    evs = [EvPlan(d, max_kw=7.0, energy_needed_kwh=7.0, departure_step=2) for d in "abc"]
    zero = np.zeros(2)
    t1 = GroupLimits("transformer:t1", frozenset("ab"), zero, import_limit_kw=np.full(2, 10.0))
    feeder = GroupLimits("feeder:f1", frozenset("abc"), zero, import_limit_kw=np.full(2, 15.0))
    problem = ScheduleProblem(step_s=3600, prices=prices(0.1, 0.2), evs=evs, groups=[t1, feeder])
    plan = solve_schedule(problem)
    assert group_net_kw(plan.setpoints_kw, plan.device_ids, t1).max() <= 10.0 + 1e-6
    np.testing.assert_allclose(
        group_net_kw(plan.setpoints_kw, plan.device_ids, feeder), [15.0, 6.0], atol=1e-6
    )
    assert plan.cost == pytest.approx(15 * 0.1 + 6 * 0.2)
    assert plan.shortfall_kwh == {}
    assert plan.envelope_excess_kw == {}


def test_nested_limits_each_bind_where_the_need_is_now() -> None:
    # All three must charge 7 kWh in one hour. t1 lets a + b have 10 kW; the feeder (15 kW)
    # leaves c the other 5. Both limits win over departure energy: 4 + 2 kWh short.
    evs = [EvPlan(d, max_kw=7.0, energy_needed_kwh=7.0, departure_step=1) for d in "abc"]
    zero = np.zeros(1)
    t1 = GroupLimits("transformer:t1", frozenset("ab"), zero, import_limit_kw=np.full(1, 10.0))
    feeder = GroupLimits("feeder:f1", frozenset("abc"), zero, import_limit_kw=np.full(1, 15.0))
    plan = solve_schedule(
        ScheduleProblem(step_s=3600, prices=prices(0.1), evs=evs, groups=[t1, feeder])
    )
    assert plan.row("a")[0] + plan.row("b")[0] == pytest.approx(10.0)
    assert plan.row("c")[0] == pytest.approx(5.0)
    assert sum(plan.shortfall_kwh.values()) == pytest.approx(6.0)
    assert plan.shortfall_kwh["c"] == pytest.approx(2.0)


def test_batteries_offset_uncontrolled_load_to_hold_an_envelope() -> None:
    # The baseline goes 2 kW over the import limit in the second hour: the battery covers it
    # even at a price that would not pay for the round trip.
    b = battery(soc_kwh=5.0, reserve_kwh=0.0, charge_efficiency=0.9, discharge_efficiency=0.9)
    site = GroupLimits(
        "transformer:t1",
        frozenset({"b1"}),
        np.array([8.0, 12.0, 8.0]),
        import_limit_kw=np.full(3, 10.0),
    )
    plan = solve_schedule(
        ScheduleProblem(step_s=3600, prices=prices(0.2, 0.2, 0.2), batteries=[b], groups=[site])
    )
    net = group_net_kw(plan.setpoints_kw, plan.device_ids, site)
    assert net.max() <= 10.0 + 1e-6
    assert plan.row("b1")[1] <= -2.0 + 1e-6


def test_an_envelope_wins_over_departure_energy_and_both_are_reported() -> None:
    # 10 kWh wanted in one hour under a 6 kW limit: the EV leaves 4 kWh short, and says so.
    ev = EvPlan("ev1", max_kw=7.0, energy_needed_kwh=10.0, departure_step=1)
    site = GroupLimits("site:s", frozenset({"ev1"}), np.zeros(1), import_limit_kw=np.full(1, 6.0))
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=prices(0.1), evs=[ev], groups=[site]))
    assert plan.row("ev1")[0] == pytest.approx(6.0)
    assert plan.shortfall_kwh == pytest.approx({"ev1": 4.0})
    # A baseline alone over the limit cannot be planned away: the excess is reported.
    over = GroupLimits(
        "site:s", frozenset({"ev1"}), np.full(1, 9.0), import_limit_kw=np.full(1, 6.0)
    )
    plan = solve_schedule(ScheduleProblem(step_s=3600, prices=prices(0.1), evs=[ev], groups=[over]))
    assert plan.row("ev1")[0] == pytest.approx(0.0)
    np.testing.assert_allclose(plan.envelope_excess_kw["site:s"], [3.0], atol=1e-6)


def test_export_limit_caps_discharge() -> None:
    b = battery(soc_kwh=10.0)
    site = GroupLimits(
        "site:s", frozenset({"b1"}), np.zeros(2), export_limit_kw=np.array([3.0, np.nan])
    )
    plan = solve_schedule(
        ScheduleProblem(step_s=3600, prices=prices(0.9, 0.1), batteries=[b], groups=[site])
    )
    np.testing.assert_allclose(plan.row("b1"), [-3.0, 3.0], atol=1e-6)


def test_minimum_charging_rate_is_zero_or_at_least_the_minimum() -> None:
    # 3 kWh over two hours; the first (cheaper) hour is capped at 1 kW by the envelope. A
    # charger that cannot run below 2 kW cannot use it: all 3 kWh in the second hour.
    ev = EvPlan("ev1", max_kw=7.0, min_kw=2.0, energy_needed_kwh=3.0, departure_step=2)
    site = GroupLimits(
        "site:s", frozenset({"ev1"}), np.zeros(2), import_limit_kw=np.array([1.0, 7.0])
    )
    problem = ScheduleProblem(step_s=3600, prices=prices(0.1, 0.2), evs=[ev], groups=[site])
    plan = solve_schedule(problem)
    np.testing.assert_allclose(plan.row("ev1"), [0.0, 3.0], atol=1e-6)


def test_peak_shaving_keeps_the_group_under_its_threshold() -> None:
    # Baseline 5 then 15 kW, threshold 10 at a demand charge: the battery (empty) charges 5 in
    # the first hour and covers the 5 kW above the threshold in the second.
    b = battery(soc_kwh=0.0, max_charge_kw=5.0, max_discharge_kw=5.0)
    site = GroupLimits(
        "site:s",
        frozenset({"b1"}),
        np.array([5.0, 15.0]),
        peak_threshold_kw=10.0,
        peak_price_per_kw=10.0,
    )
    plan = solve_schedule(
        ScheduleProblem(step_s=3600, prices=prices(0.2, 0.2), batteries=[b], groups=[site])
    )
    np.testing.assert_allclose(group_net_kw(plan.setpoints_kw, plan.device_ids, site), [10.0, 10.0])


def test_malformed_problems_are_refused_with_a_reason() -> None:
    with pytest.raises(ScheduleError, match="finite"):
        solve_schedule(ScheduleProblem(step_s=900, prices=prices(0.1, np.nan)))
    site = GroupLimits("site:s", frozenset({"nobody"}), np.zeros(2))
    with pytest.raises(ScheduleError, match="not in the schedule"):
        solve_schedule(ScheduleProblem(step_s=900, prices=prices(0.1, 0.2), groups=[site]))
    short = GroupLimits("site:s", frozenset(), np.zeros(2), import_limit_kw=np.zeros(3))
    with pytest.raises(ScheduleError, match="3 values for 2 steps"):
        solve_schedule(ScheduleProblem(step_s=900, prices=prices(0.1, 0.2), groups=[short]))


def test_a_feeder_limit_is_shared_between_transformers_solved_apart() -> None:
    # Two transformers, one EV each, both want the cheap first hour (7 + 7 kW); the feeder
    # allows 10. Solved per transformer, the feeder's limit is found binding and shared: the
    # plan keeps it, delivers every kWh, and costs what the one whole LP costs.
    evs = [EvPlan(d, max_kw=7.0, energy_needed_kwh=7.0, departure_step=2) for d in "ab"]
    zero = np.zeros(2)
    groups = [
        GroupLimits("transformer:t1", frozenset("a"), zero, import_limit_kw=np.full(2, 9.0)),
        GroupLimits("transformer:t2", frozenset("b"), zero, import_limit_kw=np.full(2, 9.0)),
        GroupLimits("feeder:f1", frozenset("ab"), np.full(2, 1.0), import_limit_kw=np.full(2, 11)),
    ]
    problem = ScheduleProblem(step_s=3600, prices=prices(0.1, 0.2), evs=evs, groups=groups)
    plan = solve_schedule(problem)
    whole = solve_schedule(problem, decompose=False)
    assert plan.message.startswith("2 parts")
    assert group_net_kw(plan.setpoints_kw, plan.device_ids, groups[2]).max() <= 11.0 + 1e-6
    assert plan.shortfall_kwh == {}
    assert plan.envelope_excess_kw == {}
    assert plan.cost == pytest.approx(whole.cost) == pytest.approx(10 * 0.1 + 4 * 0.2)


def test_a_feeder_limit_that_cannot_bind_leaves_the_transformers_apart_and_optimal() -> None:
    rng = np.random.default_rng(3)
    day = rng.uniform(0.05, 0.4, 24)
    bats = [battery(f"b{i}", soc_kwh=float(rng.uniform(2, 8))) for i in range(6)]
    evs = [
        EvPlan(f"e{i}", max_kw=7.0, energy_needed_kwh=float(rng.uniform(5, 30)), departure_step=20)
        for i in range(6)
    ]
    base = np.full(24, 5.0)
    groups = [
        GroupLimits(
            f"transformer:t{k}",
            frozenset({f"b{k}", f"b{k + 3}", f"e{k}", f"e{k + 3}"}),
            base,
            import_limit_kw=np.full(24, 20.0),
        )
        for k in range(3)
    ]
    groups.append(
        GroupLimits(
            "feeder:f1",
            frozenset().union(*(g.device_ids for g in groups)),
            3 * base,
            import_limit_kw=np.full(24, 1000.0),
        )
    )
    problem = ScheduleProblem(step_s=3600, prices=day, batteries=bats, evs=evs, groups=groups)
    plan = solve_schedule(problem)
    assert plan.message.startswith("3 parts, 1 rounds")
    assert plan.cost == pytest.approx(solve_schedule(problem, decompose=False).cost, abs=1e-4)


def test_minimum_rates_relaxed_at_fleet_size_are_repaired_to_zero_or_the_minimum() -> None:
    # As above, for more EVs than the exact MILP is used for: the LP relaxation would charge
    # each at 1 kW (below its 2 kW minimum) in the cheap hour; the repair turns that hour off
    # and the energy moves to the next.
    evs = [
        EvPlan(f"ev{i}", max_kw=7.0, min_kw=2.0, energy_needed_kwh=3.0, departure_step=2)
        for i in range(EXACT_MIN_RATE_MAX_EVS + 1)
    ]
    sites = [
        GroupLimits(
            f"site:s{i}", frozenset({ev.device_id}), np.zeros(2),
            import_limit_kw=np.array([1.0, 7.0]),
        )
        for i, ev in enumerate(evs)
    ]
    problem = ScheduleProblem(step_s=3600, prices=prices(0.1, 0.2), evs=evs, groups=sites)
    plan = solve_schedule(problem)
    rates = plan.setpoints_kw
    assert ((rates < 1e-6) | (rates >= 2.0 - 1e-6)).all()
    np.testing.assert_allclose(rates, np.tile([0.0, 3.0], (len(evs), 1)), atol=1e-6)
    assert plan.shortfall_kwh == {}
    small = ScheduleProblem(step_s=3600, prices=prices(0.1, 0.2), evs=evs[:1], groups=sites[:1])
    np.testing.assert_allclose(
        solve_schedule(small, exact_min_rate=False).row("ev0"), [0.0, 3.0], atol=1e-6
    )
