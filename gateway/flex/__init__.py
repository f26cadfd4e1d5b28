"""Flexibility forecasts, event baselines and settlement (use cases 1 and 6).

* :mod:`gateway.flex.forecast` — per group and interval: baseline, flex down / up and rebound,
  each with p10/p50/p90, from device state, history, availability and the outdoor temperature
  (per area and interval from :mod:`gateway.weather`).
* :mod:`gateway.flex.baseline` — CAISO-style 10-in-10 / 4-in-4 customer baselines with a
  day-of adjustment capped at ±20 %.
* :mod:`gateway.flex.methods` — the other baseline rules utilities settle on (PJM High 4 of 5,
  NYISO CBL, weather-matched, control group), chosen by ``BaselineConfig.method``.
* :mod:`gateway.flex.performance` — per-device and per-group event performance against those
  baselines, with data-quality flags.
* :mod:`gateway.flex.settlement` — the performance report of one finished dispatch (window,
  baselines with their fallback, performance, flags).

All of it is pure (no I/O, no clock: ``now`` is a parameter), so the core can call it from any
task and tests can pin every number.
"""

from gateway.flex.baseline import (
    BaselineConfig,
    BaselineFallback,
    BaselineMethod,
    ControlScaling,
    DayType,
    DeviceBaseline,
    DeviceHistory,
    EventCalendar,
    ExcludedDevice,
    GroupBaseline,
    GroupBaselineMode,
    InsufficientHistory,
    device_baseline,
    group_baseline,
)
from gateway.flex.forecast import (
    Band,
    DeviceFlex,
    DeviceFlexInput,
    EnergyPolicy,
    EvNeed,
    FlexConfig,
    FlexCoverage,
    FlexCoverageStat,
    FlexForecast,
    FlexInterval,
    FlexRequest,
    ForecastGrid,
    QuantileMethod,
    TemperatureSource,
    ThermalParams,
    WeatherUse,
    aggregate,
    availability_ratio,
    device_flex,
    flex_json_schemas,
    forecast_group,
)
from gateway.flex.methods import (
    control_group,
    control_group_baseline,
    high_of_baseline,
    method_baseline,
    weather_matched_baseline,
)
from gateway.flex.performance import (
    DevicePerformance,
    GroupPerformance,
    device_performance,
    event_performance,
    group_performance,
)
from gateway.flex.settlement import (
    DeviceSettlement,
    EventToSettle,
    GroupSettlement,
    PerformanceReport,
    PerformanceRequest,
    SettlementFlag,
    settle_event,
)

__all__ = [
    "Band",
    "BaselineConfig",
    "BaselineFallback",
    "BaselineMethod",
    "ControlScaling",
    "DayType",
    "DeviceBaseline",
    "DeviceFlex",
    "DeviceFlexInput",
    "DeviceHistory",
    "DevicePerformance",
    "DeviceSettlement",
    "EnergyPolicy",
    "EvNeed",
    "EventCalendar",
    "EventToSettle",
    "ExcludedDevice",
    "FlexConfig",
    "FlexCoverage",
    "FlexCoverageStat",
    "FlexForecast",
    "FlexInterval",
    "FlexRequest",
    "ForecastGrid",
    "GroupBaseline",
    "GroupBaselineMode",
    "GroupPerformance",
    "GroupSettlement",
    "InsufficientHistory",
    "PerformanceReport",
    "PerformanceRequest",
    "QuantileMethod",
    "SettlementFlag",
    "TemperatureSource",
    "ThermalParams",
    "WeatherUse",
    "aggregate",
    "availability_ratio",
    "control_group",
    "control_group_baseline",
    "device_baseline",
    "device_flex",
    "device_performance",
    "event_performance",
    "flex_json_schemas",
    "forecast_group",
    "group_baseline",
    "group_performance",
    "high_of_baseline",
    "method_baseline",
    "settle_event",
    "weather_matched_baseline",
]
