"""Outdoor temperature forecasts as Grid DERMS publishes them (``derms/v1/{gw}/weather``).

The wire model only; what the core does with them is :mod:`gateway.weather`.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, model_validator

from unified.model import SCHEMA_VERSION, Frozen, Identifier, UtcDatetime

__all__ = [
    "GATEWAY_SCOPE",
    "MAX_POINTS",
    "MAX_SPAN_S",
    "MAX_TEMP_C",
    "MIN_COVERAGE",
    "MIN_STEP_S",
    "MIN_TEMP_C",
    "TemperaturePoint",
    "WeatherForecast",
]

MIN_TEMP_C: Final = -60.0
MAX_TEMP_C: Final = 60.0
MAX_SPAN_S: Final = 14 * 86_400
"""A forecast may cover at most 14 days."""
MIN_STEP_S: Final = 300
MAX_POINTS: Final = MAX_SPAN_S // MIN_STEP_S
MIN_COVERAGE: Final = 0.5
"""Share of a forecast interval the weather forecast must cover to be used for it."""
GATEWAY_SCOPE: Final = "*"
"""How the whole-gateway scope is keyed in storage (``scope`` omitted on the wire)."""


class TemperaturePoint(Frozen):
    start: UtcDatetime
    temp_c: float = Field(
        ge=MIN_TEMP_C,
        le=MAX_TEMP_C,
        allow_inf_nan=False,
        description="Mean outdoor temperature over [start, start + step_s), °C",
    )


class WeatherForecast(Frozen):
    """Published by Grid DERMS on ``derms/v1/{gw}/weather`` (QoS 1, may be retained)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    issued_at: UtcDatetime = Field(
        description="When the forecast was made; an older one than held for the scope is ignored"
    )
    scope: Identifier | None = Field(
        default=None,
        description="A topology group id (substation:s1, feeder:f1, ...); omitted: the gateway",
    )
    step_s: int = Field(default=3600, ge=MIN_STEP_S, le=86_400, description="Spacing of points")
    points: tuple[TemperaturePoint, ...] = Field(min_length=1, max_length=MAX_POINTS)
    source: str | None = Field(default=None, max_length=128, description="Provider, for people")

    @model_validator(mode="after")
    def _fixed_step(self) -> WeatherForecast:
        first = self.points[0].start
        for k, point in enumerate(self.points[1:], start=1):
            gap = (point.start - self.points[k - 1].start).total_seconds()
            if gap <= 0:
                raise ValueError(f"points[{k}].start is not after points[{k - 1}].start")
            if (point.start - first).total_seconds() != k * self.step_s:
                raise ValueError(
                    f"points[{k}].start is {gap:g} s after the previous point; step_s is "
                    f"{self.step_s}"
                )
        if len(self.points) * self.step_s > MAX_SPAN_S:
            raise ValueError(f"the points span more than {MAX_SPAN_S // 86_400} days")
        return self

    @property
    def scope_key(self) -> str:
        return self.scope or GATEWAY_SCOPE
