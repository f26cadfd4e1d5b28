"""Outdoor temperature forecasts, per area, for the flexibility forecast.

Grid DERMS (or a weather service integration) publishes a :class:`WeatherForecast` on
``derms/v1/{gw}/weather``: fixed-step points of outdoor temperature for the whole gateway or for
one topology group (``substation:s1``, ``feeder:f1``...), so areas far apart can differ. The
gateway keeps the latest forecast per scope (:class:`WeatherBook`; the core stores it in the
history file so it survives a restart) and gives each thermostat the series of the most specific
scope that covers it.

Each point is the mean temperature over ``[start, start + step_s)``. A forecast interval takes
the time-weighted mean of the points it overlaps (:meth:`TemperatureSeries.means`), provided the
forecast covers at least half of it; elsewhere the flexibility forecast falls back to the
configured temperature, and says so.

Everything here is pure (no I/O, no clock), like :mod:`gateway.flex`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from unified.model import (
    TOPOLOGY_LEVELS,
    Device,
    Group,
)
from unified.weather import (
    GATEWAY_SCOPE,
    MIN_COVERAGE,
    WeatherForecast,
)

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True, slots=True, eq=False)
class TemperatureSeries:
    """One forecast as numbers: ``temps_c[k]`` is the mean over the k-th step from ``start_s``."""

    start_s: float
    step_s: int
    temps_c: FloatArray
    scope: str | None = None
    issued_at: datetime | None = None
    _knots: FloatArray = field(init=False, repr=False)
    _integral: FloatArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        temps = np.asarray(self.temps_c, dtype=np.float64)
        if temps.ndim != 1 or not len(temps) or not np.isfinite(temps).all() or self.step_s <= 0:
            raise ValueError("a temperature series needs finite values and a positive step")
        object.__setattr__(self, "temps_c", temps)
        knots = self.start_s + self.step_s * np.arange(len(temps) + 1, dtype=np.float64)
        object.__setattr__(self, "_knots", knots)
        object.__setattr__(self, "_integral", np.concatenate(([0.0], np.cumsum(temps))))

    @classmethod
    def from_forecast(cls, forecast: WeatherForecast) -> TemperatureSeries:
        return cls(
            start_s=forecast.points[0].start.timestamp(),
            step_s=forecast.step_s,
            temps_c=np.array([p.temp_c for p in forecast.points], dtype=np.float64),
            scope=forecast.scope,
            issued_at=forecast.issued_at,
        )

    @property
    def end_s(self) -> float:
        return float(self._knots[-1])

    def at(self, when: datetime) -> float | None:
        """The temperature of the step containing ``when``; None outside the forecast."""
        t = when.timestamp()
        if not self.start_s <= t < self.end_s:
            return None
        return float(self.temps_c[int((t - self.start_s) // self.step_s)])

    def means(self, starts: FloatArray, interval_s: float) -> FloatArray:
        """Mean temperature over each ``[s, s + interval_s)`` (epoch seconds), NaN where the
        forecast covers less than :data:`MIN_COVERAGE` of the interval."""
        starts = np.asarray(starts, dtype=np.float64)
        a = np.clip(starts, self.start_s, self.end_s)
        b = np.clip(starts + interval_s, self.start_s, self.end_s)
        covered = b - a
        # The integral of a step function is piecewise linear: exact through np.interp.
        integral = np.interp(b, self._knots, self._integral) - np.interp(
            a, self._knots, self._integral
        )
        mean = np.divide(
            integral * self.step_s, covered, out=np.full(len(starts), np.nan), where=covered > 0
        )
        return np.where(covered >= MIN_COVERAGE * interval_s - 1e-9, mean, np.nan)


@dataclass(frozen=True, slots=True, eq=False)
class TemperatureRecord:
    """Past outdoor temperatures of one scope, pieced together from every forecast received.

    Each moment takes the newest-issued forecast point that covered it (the nearest thing to an
    observation the gateway has); NaN where no forecast did. On the greatest common step of the
    points, so forecasts of different steps mix. Answers :meth:`means` like
    :class:`TemperatureSeries`, NaN where less than :data:`MIN_COVERAGE` of an interval is known.
    """

    start_s: float
    step_s: int
    temps_c: FloatArray
    _knots: FloatArray = field(init=False, repr=False)
    _sum: FloatArray = field(init=False, repr=False)
    _known: FloatArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        temps = np.asarray(self.temps_c, dtype=np.float64)
        object.__setattr__(self, "temps_c", temps)
        have = ~np.isnan(temps)
        knots = self.start_s + self.step_s * np.arange(len(temps) + 1, dtype=np.float64)
        object.__setattr__(self, "_knots", knots)
        total = np.cumsum(np.where(have, temps, 0.0))
        object.__setattr__(self, "_sum", np.concatenate(([0.0], total)))
        object.__setattr__(self, "_known", np.concatenate(([0.0], np.cumsum(have))))

    @classmethod
    def from_points(
        cls, points: Iterable[tuple[float, int, float, float]]
    ) -> TemperatureRecord | None:
        """From ``(start_s, step_s, temp_c, issued_at)`` points; None without any."""
        pts = sorted(points, key=lambda p: p[3])  # older issues first: newer overwrite them
        if not pts:
            return None
        start = int(min(p[0] for p in pts))
        end = int(max(p[0] + p[1] for p in pts))
        step = 0
        for a, width, _, _ in pts:
            step = math.gcd(step, int(width), int(a) - start)
        temps = np.full((end - start) // step, np.nan)
        for a, width, t, _ in pts:
            i = (int(a) - start) // step
            temps[i : i + int(width) // step] = t
        return cls(float(start), step, temps)

    def means(self, starts: FloatArray, interval_s: float) -> FloatArray:
        """Mean known temperature over each ``[s, s + interval_s)`` (epoch seconds); NaN where
        less than :data:`MIN_COVERAGE` of the interval is known (or ``s`` is NaN)."""
        starts = np.asarray(starts, dtype=np.float64)
        a, b = starts, starts + interval_s
        known = np.interp(b, self._knots, self._known) - np.interp(a, self._knots, self._known)
        total = np.interp(b, self._knots, self._sum) - np.interp(a, self._knots, self._sum)
        mean = np.divide(total, known, out=np.full(len(starts), np.nan), where=known > 0)
        return np.where(known * self.step_s >= MIN_COVERAGE * interval_s - 1e-9, mean, np.nan)


class _Groups(Protocol):
    """What :meth:`WeatherBook.for_devices` needs of the registry."""

    def group(self, group_id: str) -> Group | None: ...

    def members(self, group_id: str) -> list[Device]: ...


class WeatherBook:
    """The latest forecast per scope, and which one applies to each device."""

    def __init__(self, forecasts: Iterable[WeatherForecast] = ()) -> None:
        self._held: dict[str, WeatherForecast] = {}
        self._series: dict[str, TemperatureSeries] = {}
        for forecast in forecasts:
            self.put(forecast)

    def __len__(self) -> int:
        return len(self._held)

    def get(self, scope: str | None) -> WeatherForecast | None:
        return self._held.get(scope or GATEWAY_SCOPE)

    def is_newer(self, forecast: WeatherForecast) -> bool:
        """False for a forecast not newer than the one held for its scope (a redelivery)."""
        held = self._held.get(forecast.scope_key)
        return held is None or forecast.issued_at > held.issued_at

    def put(self, forecast: WeatherForecast) -> bool:
        """Hold ``forecast`` if it is newer than the one held for its scope; say whether it was."""
        if not self.is_newer(forecast):
            return False
        self._held[forecast.scope_key] = forecast
        self._series[forecast.scope_key] = TemperatureSeries.from_forecast(forecast)
        return True

    def for_devices(
        self, devices: Sequence[Device], registry: _Groups
    ) -> dict[str, TemperatureSeries]:
        """Per device id, the series of the most specific scope that covers it.

        Deeper topology levels win (transformer over feeder over substation over the gateway);
        between groups of the same level, the newer forecast. Scopes the registry does not know
        (any more) cover nobody. Devices no forecast covers are left out.
        """
        wanted = {d.device_id for d in devices}
        out: dict[str, TemperatureSeries] = {}
        gateway = self._series.get(GATEWAY_SCOPE)
        if gateway is not None:
            out = dict.fromkeys(wanted, gateway)
        ranked: list[tuple[int, float, str]] = []
        for key, forecast in self._held.items():
            group = registry.group(key) if key != GATEWAY_SCOPE else None
            if group is not None:
                depth = TOPOLOGY_LEVELS.index(group.level)
                ranked.append((depth, forecast.issued_at.timestamp(), key))
        for _, _, key in sorted(ranked):  # most specific last, so it wins
            series = self._series[key]
            for device in registry.members(key):
                if device.device_id in wanted:
                    out[device.device_id] = series
        return out


def forecast_excerpt(forecast: WeatherForecast) -> str:
    """A one-line summary for logs."""
    first, last = forecast.points[0], forecast.points[-1]
    span_h = len(forecast.points) * forecast.step_s / 3600
    temps = [p.temp_c for p in forecast.points]
    return (
        f"{forecast.scope or 'gateway'}: {len(temps)} point(s) over {span_h:g} h from "
        f"{first.start.isoformat()} ({min(temps):g}..{max(temps):g} °C, last "
        f"{last.temp_c:g} °C), issued {forecast.issued_at.isoformat()}"
    )


__all__ = ["TemperatureRecord", "TemperatureSeries", "WeatherBook", "forecast_excerpt"]
