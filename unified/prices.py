"""Energy price schedules as Grid DERMS publishes them (``derms/v1/{gw}/prices``).

The wire model only; what the core does with them is :mod:`gateway.services.prices`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

from pydantic import Field, model_validator

from unified.model import SCHEMA_VERSION, Frozen, Identifier, UtcDatetime

__all__ = [
    "MAX_ABS_PRICE",
    "MAX_POINTS",
    "MAX_SPAN_S",
    "MIN_STEP_S",
    "PriceKind",
    "PricePoint",
    "PriceSchedule",
]

MAX_ABS_PRICE: Final = 20.0
"""Per kWh (20,000 per MWh: above every wholesale market's price cap)."""
MAX_SPAN_S: Final = 7 * 86_400
MIN_STEP_S: Final = 300
MAX_POINTS: Final = MAX_SPAN_S // MIN_STEP_S


class PriceKind(StrEnum):
    DAY_AHEAD = "day_ahead"
    REAL_TIME = "real_time"
    """Where a real-time schedule covers a step, it wins over the day-ahead one."""


class PricePoint(Frozen):
    start: UtcDatetime
    price: float = Field(
        ge=-MAX_ABS_PRICE,
        le=MAX_ABS_PRICE,
        allow_inf_nan=False,
        description="Import energy price over [start, start + step_s), currency per kWh",
    )
    export_price: float | None = Field(
        default=None,
        ge=-MAX_ABS_PRICE,
        le=MAX_ABS_PRICE,
        allow_inf_nan=False,
        description="Paid per kWh exported in the step; omitted: the import price",
    )


class PriceSchedule(Frozen):
    """Published by Grid DERMS on ``derms/v1/{gw}/prices`` (QoS 1, may be retained)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    issued_at: UtcDatetime = Field(
        description="When the schedule was made; one not newer than held for its scope and "
        "kind is ignored"
    )
    scope: Identifier | None = Field(
        default=None,
        description="A topology group id (substation:s1, feeder:f1, ...); omitted: the gateway",
    )
    kind: PriceKind = PriceKind.DAY_AHEAD
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    step_s: int = Field(default=3600, ge=MIN_STEP_S, le=86_400, description="Spacing of points")
    points: tuple[PricePoint, ...] = Field(min_length=1, max_length=MAX_POINTS)
    source: str | None = Field(default=None, max_length=128, description="Market or tariff")

    @model_validator(mode="after")
    def _fixed_step(self) -> PriceSchedule:
        first = self.points[0].start
        for k, point in enumerate(self.points[1:], start=1):
            if (point.start - first).total_seconds() != k * self.step_s:
                raise ValueError(
                    f"points[{k}].start is not {k} x step_s ({self.step_s} s) after points[0]"
                )
        if len(self.points) * self.step_s > MAX_SPAN_S:
            raise ValueError(f"the points span more than {MAX_SPAN_S // 86_400} days")
        return self

    @property
    def end_s(self) -> float:
        return self.points[0].start.timestamp() + len(self.points) * self.step_s

    @property
    def key(self) -> tuple[str, str]:
        """(scope, kind) as stored: ``*`` for the whole gateway."""
        return (self.scope or "*", self.kind.value)
