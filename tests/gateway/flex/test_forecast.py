"""Flexibility forecast: device models, energy budgets and the p10/p50/p90 bands."""

from __future__ import annotations

import itertools
from datetime import timedelta

import numpy as np
import pytest

from gateway.flex import (
    DeviceFlexInput,
    EnergyPolicy,
    EvNeed,
    FlexConfig,
    FlexCoverage,
    FlexForecast,
    FlexRequest,
    ForecastGrid,
    QuantileMethod,
    availability_ratio,
    device_flex,
    flex_json_schemas,
    forecast_group,
)
from unified.model import DerClass, EvSession

from .conftest import NOW, hourly_history, make_device, make_state


def grid(
    hours: int = 6, interval_s: int = 3600, window_h: tuple[int, int] | None = None
) -> ForecastGrid:
    ws = we = None
    if window_h is not None:
        ws, we = NOW + timedelta(hours=window_h[0]), NOW + timedelta(hours=window_h[1])
    return ForecastGrid.build(NOW, hours * 3600, interval_s, ws, we)


def battery(soc: float, reserve: float = 20.0, max_soc: float = 100.0) -> DeviceFlexInput:
    device = make_device("b1", DerClass.BATTERY, reserve=reserve, max_soc=max_soc)
    return DeviceFlexInput(device, make_state("b1", soc_pct=soc, capacity_kwh=10.0))


@pytest.mark.parametrize(
    ("soc", "reserve", "interval_s", "down", "up"),
    [
        # 10 kWh, 5 kW: (50 - 20) % -> 3 kWh down; (100 - 50) % -> 5 kWh up.
        (50, 20, 3600, [3, 0, 0], [5, 0, 0]),
        (50, 20, 900, [5, 5, 2, 0], [5, 5, 5, 5]),  # 1.25 kWh per quarter hour at 5 kW
        (20, 20, 3600, [0, 0, 0], [5, 3, 0]),  # at reserve: nothing to discharge
        (10, 20, 3600, [0, 0, 0], [5, 4, 0]),  # below reserve: still nothing
        (95, 30, 3600, [5, 1.5, 0], [0.5, 0, 0]),
    ],
)
def test_battery_respects_reserve_and_spends_energy_sequentially(
    soc: float, reserve: float, interval_s: int, down: list[float], up: list[float]
) -> None:
    g = grid(hours=3, interval_s=interval_s)
    flex = device_flex(battery(soc, reserve), g)
    assert flex.flex_down_kw[: len(down)] == pytest.approx(down)
    assert flex.flex_up_kw[: len(up)] == pytest.approx(up)
    hours = interval_s / 3600
    assert flex.flex_down_kw.sum() * hours == pytest.approx(max(0, soc - reserve) / 10)
    assert np.all(flex.baseline_kw == 0)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (EnergyPolicy.SEQUENTIAL, [0, 5, 1, 0, 0, 0]),  # nothing before the window
        (EnergyPolicy.SUSTAINED, [0, 2, 2, 2, 0, 0]),  # 6 kWh over 3 h
        (EnergyPolicy.INDEPENDENT, [0, 5, 5, 5, 0, 0]),
    ],
)
def test_battery_budget_policies_inside_the_window(
    policy: EnergyPolicy, expected: list[float]
) -> None:
    flex = device_flex(battery(80), grid(window_h=(1, 4)), policy=policy)
    assert flex.flex_down_kw == pytest.approx(expected)


def thermostat(headroom: float | None) -> DeviceFlexInput:
    device = make_device("t1", DerClass.THERMOSTAT, charge_kw=3.0, discharge_kw=3.0)
    state = make_state("t1", power_kw=3.0, soc_pct=headroom, max_discharge_kw=3.0)
    return DeviceFlexInput(device, state)


@pytest.mark.parametrize("outdoor", [25.0, 32.0, 40.0])
def test_thermostat_without_headroom_has_no_flex(outdoor: float) -> None:
    for headroom in (0.0, None):
        flex = device_flex(thermostat(headroom), grid(), outdoor_temp_c=np.full(6, outdoor))
        assert not flex.flex_down_kw.any()
        assert flex.baseline_kw.sum() > 0  # it still draws load
        if headroom is None:  # occupant override: no pre-cooling either
            assert not flex.flex_up_kw.any()


def test_thermostat_flex_grows_with_outdoor_temperature() -> None:
    g = grid(hours=2, interval_s=900)
    temps = [20.0, 24.0, 28.0, 32.0, 36.0]
    first = []
    for t in temps:
        flex = device_flex(thermostat(100.0), g, outdoor_temp_c=np.full(g.n, t))
        assert np.all(
            flex.flex_down_kw <= flex.baseline_kw + 1e-12
        )  # cannot shed more than it draws
        first.append(float(flex.flex_down_kw[0]))
    assert first[0] == 0.0  # no cooling load below the setpoint
    assert all(b > a for a, b in itertools.pairwise(first))


def test_thermostat_rebound_repays_the_shed_after_the_window() -> None:
    g = grid(hours=6, window_h=(0, 1))
    flex = device_flex(thermostat(100.0), g, outdoor_temp_c=np.full(6, 32.0))
    shed = flex.flex_down_kw.sum()
    assert shed > 0
    assert flex.rebound_kw[0] == 0
    assert flex.rebound_kw[1:].sum() == pytest.approx(shed)
    assert np.all(flex.baseline_kw + flex.rebound_kw <= 3.0 + 1e-9)


def ev(need: float, departure_h: float | None, rate: float = 7.0) -> DeviceFlexInput:
    device = make_device("e1", DerClass.EVSE, charge_kw=11.0, discharge_kw=0.1)
    state = make_state("e1", power_kw=rate, max_charge_kw=rate, max_discharge_kw=0.0)
    departure = None if departure_h is None else NOW + timedelta(hours=departure_h)
    return DeviceFlexInput(device, state, ev_need=EvNeed(need, departure))


@pytest.mark.parametrize(
    ("need", "departure_h", "base", "down"),
    [
        (14, 4, [7, 7, 0, 0], [7, 7, 0, 0]),  # slack 28 - 14 = 14 kWh
        (14, 3, [7, 7, 0, 0], [7, 0, 0, 0]),  # slack 7 kWh
        (14, 2, [7, 7, 0, 0], [0, 0, 0, 0]),  # no slack: must charge flat out
        (14, 1.5, [7, 3.5, 0, 0], [0, 0, 0, 0]),  # cannot even meet it: no deferral
        (14, None, [7, 7, 0, 0], [0, 0, 0, 0]),  # departure unknown: not deferrable
        (3.5, 10, [3.5, 0, 0, 0], [3.5, 0, 0, 0]),
    ],
)
def test_ev_deferral_is_bounded_by_departure(
    need: float, departure_h: float | None, base: list[float], down: list[float]
) -> None:
    flex = device_flex(ev(need, departure_h), grid(hours=4))
    assert flex.baseline_kw == pytest.approx(base)
    assert flex.flex_down_kw == pytest.approx(down)
    if departure_h is not None:
        slack = max(0.0, 7.0 * departure_h - need)
        assert flex.flex_down_kw.sum() <= slack + 1e-9
        # After deferring, the need still fits before departure at the charger's rate.
        rebound_room = 7.0 * min(departure_h, 4) - flex.baseline_kw.sum()
        assert flex.flex_down_kw.sum() <= rebound_room + (7.0 * max(0, departure_h - 4)) + 1e-9


def test_ev_need_and_departure_come_from_the_chargers_state() -> None:
    # What the OCPP adapter reports (the EV nature) gives the same forecast as an explicit need.
    device = make_device("e1", DerClass.EVSE, charge_kw=11.0, discharge_kw=0.1)
    state = make_state("e1", power_kw=7.0, max_charge_kw=7.0, max_discharge_kw=0.0)
    session = EvSession(energy_needed_kwh=14.0, departure=NOW + timedelta(hours=3))
    inp = DeviceFlexInput(device, state.model_copy(update={"ev": session}))
    flex = device_flex(inp, grid(hours=4))
    assert flex.baseline_kw == pytest.approx([7, 7, 0, 0])
    assert flex.flex_down_kw == pytest.approx([7, 0, 0, 0])


def test_unplugged_ev_has_no_flex() -> None:
    device = make_device("e1", DerClass.EVSE, charge_kw=11.0, discharge_kw=0.1)
    state = make_state("e1", max_charge_kw=0.0, max_discharge_kw=0.0)
    flex = device_flex(DeviceFlexInput(device, state, ev_need=EvNeed(10, None)), grid())
    assert not flex.flex_down_kw.any()
    assert not flex.flex_up_kw.any()


def test_load_baseline_from_history() -> None:
    device = make_device("w1", DerClass.WATER_HEATER, charge_kw=4.5, discharge_kw=4.5)
    history = hourly_history("w1", lambda d, h: 1.0 + h / 10 + (d.day % 2) * 0.2)
    state = make_state("w1", power_kw=0.0, soc_pct=60.0, capacity_kwh=12.0)
    flex = device_flex(DeviceFlexInput(device, state, history=history), grid(hours=3))
    # 12:00-15:00: mean of alternating days (+0.2 on odd days), spread from those days.
    assert flex.baseline_kw == pytest.approx([2.3, 2.4, 2.5], abs=0.011)
    assert np.all(flex.baseline_var > 0)
    assert flex.flex_down_kw.sum() == pytest.approx(min(flex.baseline_kw.sum(), 0.4 * 12))
    # Its own history measured its load: its flex is less uncertain than a modelled one's.
    modelled = device_flex(DeviceFlexInput(device, state), grid(hours=3))
    assert modelled.flex_cv == pytest.approx(0.2)
    assert flex.flex_cv == pytest.approx(0.2 * 0.6)


def synthetic_fleet(n: int, seed: int) -> list[DeviceFlexInput]:
    rng = np.random.default_rng(seed)
    inputs = []
    for i in range(n):
        cap = float(rng.uniform(5, 20))
        device = make_device(
            f"b{i}", DerClass.BATTERY, discharge_kw=float(rng.uniform(2, 8)), capacity_kwh=cap
        )
        state = make_state(f"b{i}", soc_pct=float(rng.uniform(20, 100)), capacity_kwh=cap)
        inputs.append(DeviceFlexInput(device, state, availability=float(rng.uniform(0.5, 1.0))))
    return inputs


def truth(inputs: list[DeviceFlexInput], g: ForecastGrid, draws: int, seed: int) -> np.ndarray:
    """Monte-Carlo truth: the fleet's flex down under independent participation draws."""
    flexes = [device_flex(i, g) for i in inputs]
    c = np.vstack([f.flex_down_kw for f in flexes])
    p = np.array([i.availability for i in inputs])
    rng = np.random.default_rng(seed)
    return (rng.random((draws, len(p))) < p).astype(float) @ c


@pytest.mark.parametrize(
    ("n", "method"),
    [(400, QuantileMethod.NORMAL), (400, QuantileMethod.MONTE_CARLO), (40, QuantileMethod.AUTO)],
)
def test_bands_are_ordered_and_cover_a_monte_carlo_truth(n: int, method: QuantileMethod) -> None:
    inputs = synthetic_fleet(n, seed=7)
    request = FlexRequest(group_id="feeder:f1", horizon_s=4 * 3600, interval_s=3600)
    # Participation only (the truth draws no model error).
    config = FlexConfig(quantile_method=method, seed=1, flex_cv={})
    forecast = forecast_group(inputs, request, now=NOW, config=config)
    g = grid(hours=4)
    sims = truth(inputs, g, draws=20_000, seed=99)
    for i, interval in enumerate(forecast.intervals[:2]):  # later hours: most are empty
        band = interval.flex_down_kw
        assert band.p10 <= band.p50 <= band.p90
        assert band.p10 < band.p90
        below = float(np.mean(sims[:, i] < band.p10))
        above = float(np.mean(sims[:, i] > band.p90))
        assert below == pytest.approx(0.10, abs=0.03), (i, below)
        assert above == pytest.approx(0.10, abs=0.03), (i, above)


def test_monte_carlo_quantiles_match_the_exact_distribution_of_a_small_group() -> None:
    inputs = synthetic_fleet(10, seed=3)
    request = FlexRequest(group_id="g", horizon_s=3600, interval_s=3600)
    config = FlexConfig(quantile_method=QuantileMethod.MONTE_CARLO, samples=20_000, flex_cv={})
    band = forecast_group(inputs, request, now=NOW, config=config).intervals[0].flex_down_kw
    c = np.array([device_flex(i, grid(hours=1)).flex_down_kw[0] for i in inputs])
    p = np.array([i.availability for i in inputs])
    values, probs = [], []
    for on in itertools.product([0, 1], repeat=len(c)):
        mask = np.array(on, dtype=bool)
        values.append(c[mask].sum())
        probs.append(np.prod(np.where(mask, p, 1 - p)))
    values_a, probs_a = np.array(values), np.array(probs)

    def cdf(x: float) -> float:
        return float(probs_a[values_a <= x + 1e-9].sum())

    assert cdf(band.p10) == pytest.approx(0.10, abs=0.03)
    assert cdf(band.p90) == pytest.approx(0.90, abs=0.03)


def test_forecast_message_round_trips_and_has_a_schema() -> None:
    inputs = [battery(60), thermostat(50.0), ev(14, 4)]
    request = FlexRequest(
        request_id="r1",
        group_id="feeder:f1",
        window_start=NOW + timedelta(hours=4),
        window_end=NOW + timedelta(hours=7),
        policy=EnergyPolicy.SUSTAINED,
    )
    forecast = forecast_group(inputs, request, now=NOW, outdoor_temp_c=30.0)
    assert len(forecast.intervals) == 24
    assert [i.in_window for i in forecast.intervals[3:8]] == [False, True, True, True, False]
    assert forecast.window_start == NOW + timedelta(hours=4)
    assert forecast.intervals[0].flex_down_kw.p90 == 0.0
    assert forecast.intervals[4].flex_down_kw.p50 > 0
    assert FlexForecast.model_validate_json(forecast.model_dump_json()) == forecast
    schemas = flex_json_schemas()
    assert {"flex_request", "flex_forecast", "group_performance"} <= set(schemas)


@pytest.mark.parametrize(
    ("reported", "expected", "ratio"), [(0, 0, 0.5), (10, 10, 11 / 12), (0, 10, 1 / 12)]
)
def test_availability_ratio(reported: int, expected: int, ratio: float) -> None:
    assert availability_ratio(reported, expected) == pytest.approx(ratio)


def test_the_band_is_checked_against_delivery_and_widens_when_it_proves_too_narrow() -> None:
    # Participation that moves together (a hot evening, an app outage): the independent-draw
    # band is far too narrow for what the group really delivers.
    inputs = synthetic_fleet(200, seed=11)
    request = FlexRequest(group_id="feeder:f1", horizon_s=3600, interval_s=3600)
    g = grid(hours=1)
    c = np.vstack([device_flex(i, g).flex_down_kw for i in inputs])[:, 0]
    p = np.array([i.availability for i in inputs])
    rng = np.random.default_rng(4)

    def delivered() -> float:
        common = rng.uniform(0.55, 1.25)
        return float((rng.random(len(p)) < np.clip(p * common, 0, 1)) @ c)

    coverage = FlexCoverage()
    end = NOW + timedelta(hours=1)

    def inside(forecast: FlexForecast, draws: list[float]) -> float:
        band = forecast.intervals[0].flex_down_kw
        return float(np.mean([band.p10 <= d <= band.p90 for d in draws]))

    test_draws = [delivered() for _ in range(400)]
    first = forecast_group(inputs, request, now=NOW, coverage=coverage)
    assert first.coverage is not None
    assert first.coverage.checked == 0
    assert first.coverage.width_factor == 1.0
    before = inside(first, test_draws)
    assert before < 0.6
    # A request below p10 says nothing about the band; one for everything does.
    p10 = first.intervals[0].flex_down_kw.p10
    assert coverage.check(first, NOW, end, -0.5 * p10, -0.4 * p10) is None
    for _ in range(60):
        forecast = forecast_group(inputs, request, now=NOW, coverage=coverage)
        assert coverage.check(forecast, NOW, end, -1e6, -delivered()) is not None
    stat = coverage.stat("feeder:f1")
    assert stat.checked == 60
    assert stat.within <= 60
    assert stat.width_factor > 1.5
    after = forecast_group(inputs, request, now=NOW, coverage=coverage)
    assert after.coverage == stat
    band, old = after.intervals[0].flex_down_kw, first.intervals[0].flex_down_kw
    assert band.p50 == pytest.approx(old.p50)
    assert band.p10 < old.p10
    assert band.p90 > old.p90
    assert 0.7 <= inside(after, test_draws) <= 0.95
    # The running coverage (recent checks weigh most) climbs once the band is calibrated.
    assert stat.coverage is not None
    for _ in range(60):
        forecast = forecast_group(inputs, request, now=NOW, coverage=coverage)
        coverage.check(forecast, NOW, end, -1e6, -delivered())
    late = coverage.stat("feeder:f1").coverage
    assert late is not None
    assert late >= 0.6


def test_a_raised_setpoint_still_sheds_in_the_third_hour_of_a_hot_event() -> None:
    # 35 °C outdoors, a 2 °C offset's worth of headroom (1/3 of the 6 °C band): the house holds
    # T_set + 2 and draws less for as long as the event lasts, not only while it coasts.
    g = grid(hours=6, window_h=(0, 3))
    flex = device_flex(thermostat(100 / 3), g, outdoor_temp_c=np.full(6, 35.0))
    base = flex.baseline_kw[0]
    assert base == pytest.approx(3.0 * 13 / 18)  # duty (35 − 22) / (R · COP · rated)
    # Sustained: baseline × offset / (T_out − T_set), the steady-state duty's change.
    assert flex.flex_down_kw[2] == pytest.approx(base * 2 / 13, rel=1e-6)
    # The first hour adds the coasting up to the new setpoint, and never sheds beyond the load.
    assert flex.flex_down_kw[2] < flex.flex_down_kw[0] <= base + 1e-9
    assert not flex.flex_down_kw[3:].any()  # outside the window
    # What is paid back after is the heat stored (C × offset / COP), not the sustained shed.
    assert flex.rebound_kw.sum() == pytest.approx(2.0 * 2 / 3.0)
    assert flex.rebound_kw.sum() < flex.flex_down_kw.sum()


def test_the_band_carries_the_house_models_error_not_only_participation() -> None:
    # 500 houses that all participate: participation is certain, the model is not. A group's
    # p10..p90 spans about ±30 % of its p50, narrower once the houses' own history is known.
    g_request = FlexRequest(group_id="feeder:f1", horizon_s=3 * 3600, interval_s=3600)
    houses = [
        DeviceFlexInput(
            make_device(f"t{i}", DerClass.THERMOSTAT, charge_kw=3.0, discharge_kw=3.0),
            make_state(f"t{i}", power_kw=3.0, soc_pct=60.0, max_discharge_kw=3.0),
        )
        for i in range(500)
    ]
    band = forecast_group(houses, g_request, now=NOW, outdoor_temp_c=32.0).intervals[2]
    down = band.flex_down_kw
    assert down.p50 > 0
    assert 0.25 <= (down.p50 - down.p10) / down.p50 <= 0.4
    assert 0.25 <= (down.p90 - down.p50) / down.p50 <= 0.4
    exact = FlexConfig(flex_cv={})
    tight = forecast_group(houses, g_request, now=NOW, outdoor_temp_c=32.0, config=exact)
    assert tight.intervals[2].flex_down_kw.p90 - tight.intervals[2].flex_down_kw.p10 < 1e-6
