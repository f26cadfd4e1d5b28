"""The flexibility forecast follows the weather forecast of each thermostat's area."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from gateway.flex import (
    DeviceFlexInput,
    EnergyPolicy,
    FlexForecast,
    FlexRequest,
    TemperatureSource,
    forecast_group,
)
from gateway.weather import TemperatureSeries
from unified.model import DerClass
from unified.weather import WeatherForecast

from .conftest import NOW, make_device, make_state

# Default thermal model, 5 kW rated: duty = (T - 22) / (R·COP·rated) = (T - 22) / 30.
RATED = 5.0


def ac_kw(temp_c: float) -> float:
    return RATED * min(1.0, max(0.0, (temp_c - 22.0) / 30.0))


def series(
    temps: list[float], *, hours_from_now: int = 0, scope: str | None = None
) -> TemperatureSeries:
    start = NOW + timedelta(hours=hours_from_now)
    return TemperatureSeries.from_forecast(
        WeatherForecast.model_validate(
            {
                "issued_at": NOW - timedelta(hours=3),
                "scope": scope,
                "points": [
                    {"start": start + timedelta(hours=k), "temp_c": t} for k, t in enumerate(temps)
                ],
            }
        )
    )


def thermostat(
    device_id: str, weather: TemperatureSeries | None, headroom: float | None = 100.0
) -> DeviceFlexInput:
    device = make_device(device_id, DerClass.THERMOSTAT, discharge_kw=RATED)
    state = make_state(device_id, power_kw=1.0, soc_pct=headroom)
    return DeviceFlexInput(device, state, availability=1.0, weather=weather)


def run(
    inputs: list[DeviceFlexInput], outdoor_temp_c: float | None = None, hours: int = 6
) -> FlexForecast:
    request = FlexRequest(
        group_id="feeder:f1",
        horizon_s=hours * 3600,
        interval_s=3600,
        policy=EnergyPolicy.INDEPENDENT,  # each interval's flex on its own: comparable per hour
    )
    return forecast_group(inputs, request, now=NOW, outdoor_temp_c=outdoor_temp_c)


def p50(forecast: FlexForecast, name: str) -> list[float]:
    return [getattr(i, name).p50 for i in forecast.intervals]


def test_a_hotter_afternoon_raises_the_ac_baseline_and_the_flex_down() -> None:
    afternoon = [26.0, 29.0, 32.0, 35.0, 31.0, 27.0]
    forecast = run([thermostat("t1", series(afternoon)), thermostat("t2", series(afternoon))])
    baseline = p50(forecast, "baseline_kw")
    assert baseline == pytest.approx([2 * ac_kw(t) for t in afternoon])
    assert baseline[3] > baseline[2] > baseline[1] > baseline[0]
    # Comfort headroom 100 % of 6 °C, a 4 °C offset: the house coasts up to it for
    # R·C·ln(gap / (gap − 4)), over an hour at every temperature here, so each hour taken on
    # its own can shed all its AC load (and no more).
    down = p50(forecast, "flex_down_kw")
    assert down == pytest.approx(baseline)
    band = forecast.intervals[3].flex_down_kw
    assert band.p10 < band.p50 < band.p90  # the house model's own error
    # Pre-cooling is held by its energy (1 °C: 2 × 1 / 3 kWh per device), not by the AC's
    # spare power, at these temperatures.
    up = p50(forecast, "flex_up_kw")
    assert up == pytest.approx([min(2 * (RATED - ac_kw(t)), 2 * 2 / 3) for t in afternoon])
    assert [i.outdoor_temp_c for i in forecast.intervals] == pytest.approx(afternoon)
    assert {i.temperature_source for i in forecast.intervals} == {
        TemperatureSource.WEATHER_FORECAST
    }
    assert forecast.weather is not None
    (use,) = forecast.weather
    assert use.scope is None
    assert use.thermostats == 2
    assert use.intervals_covered == 6
    assert any("weather forecast for the gateway" in n for n in forecast.notes)


def test_the_configured_temperature_fills_what_the_forecast_does_not_cover() -> None:
    # The forecast starts two hours in and covers three hours.
    forecast = run([thermostat("t1", series([34.0, 34.0, 34.0], hours_from_now=2))], 25.0)
    expected = [ac_kw(25.0)] * 2 + [ac_kw(34.0)] * 3 + [ac_kw(25.0)]
    assert p50(forecast, "baseline_kw") == pytest.approx(expected)
    sources = [i.temperature_source for i in forecast.intervals]
    configured, weather = TemperatureSource.CONFIGURED, TemperatureSource.WEATHER_FORECAST
    assert sources == [configured, configured, weather, weather, weather, configured]
    assert forecast.weather is not None
    assert forecast.weather[0].intervals_covered == 3
    assert "configured outdoor temperature where no weather forecast covers" in forecast.notes


def test_without_any_temperature_uncovered_intervals_use_history() -> None:
    forecast = run([thermostat("t1", series([34.0], hours_from_now=1))], None, hours=3)
    # No history and no fallback: the current power (1 kW) outside the forecast.
    assert p50(forecast, "baseline_kw") == pytest.approx([1.0, ac_kw(34.0), 1.0])
    history, weather = TemperatureSource.HISTORY, TemperatureSource.WEATHER_FORECAST
    assert [i.temperature_source for i in forecast.intervals] == [history, weather, history]
    assert forecast.intervals[0].outdoor_temp_c is None
    assert any("no outdoor temperature in 2 interval(s)" in n for n in forecast.notes)


def test_areas_with_different_forecasts_mix_in_one_group() -> None:
    hot = series([36.0] * 4, scope="feeder:f1")
    mild = series([28.0] * 4, scope="feeder:f2")
    forecast = run([thermostat("t1", hot), thermostat("t2", mild), thermostat("t3", None)], 25.0)
    first = forecast.intervals[0]
    assert first.baseline_kw.p50 == pytest.approx(ac_kw(36.0) + ac_kw(28.0) + ac_kw(25.0))
    assert first.outdoor_temp_c == pytest.approx((36.0 + 28.0 + 25.0) / 3)
    assert first.temperature_source is TemperatureSource.MIXED
    assert forecast.intervals[5].temperature_source is TemperatureSource.CONFIGURED
    assert forecast.weather is not None
    assert [(u.scope, u.thermostats, u.intervals_covered) for u in forecast.weather] == [
        ("feeder:f1", 1, 4),
        ("feeder:f2", 1, 4),
    ]


def test_a_forecast_without_weather_or_thermostats_is_as_before() -> None:
    legacy = run([thermostat("t1", None)], 30.0)
    assert p50(legacy, "baseline_kw") == pytest.approx([ac_kw(30.0)] * 6)
    assert legacy.weather is None
    assert {i.temperature_source for i in legacy.intervals} == {TemperatureSource.CONFIGURED}
    battery = make_device("b1", DerClass.BATTERY)
    no_thermostat = run(
        [DeviceFlexInput(battery, make_state("b1", soc_pct=50, capacity_kwh=10.0))], 30.0
    )
    assert all(i.temperature_source is None for i in no_thermostat.intervals)
    assert all(i.outdoor_temp_c is None for i in no_thermostat.intervals)
    body = no_thermostat.model_dump(exclude_none=True)
    assert "weather" not in body
    assert "temperature_source" not in body["intervals"][0]
    # A series shared by many devices is evaluated once and counts each of them.
    shared = series([30.0] * 6)
    many = run([thermostat(f"t{i}", shared) for i in range(50)])
    assert many.weather is not None
    assert many.weather[0].thermostats == 50
    assert np.isclose(many.intervals[0].baseline_kw.p50, 50 * ac_kw(30.0))
