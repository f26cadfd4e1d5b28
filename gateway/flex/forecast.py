"""Available flexibility per group and interval: baseline, flex down, flex up, with p10/p50/p90.

Answers Grid DERMS' "how much can substation X shed or absorb from 16:00 to 19:00?" (use case 1).
For every interval of a horizon (default 24 h) a :class:`FlexForecast` gives, for one group:

* ``baseline_kw``: the load the group will draw if nobody intervenes (load convention, kW);
* ``flex_down_kw``: how far that load can be *reduced* (a non-negative magnitude, like an
  envelope's ``export_limit_kw``): shed thermostats and water heaters, deferred EV charging,
  battery discharge;
* ``flex_up_kw``: how far it can be *raised* (pre-cooling, water-heater load-up, extra EV
  charging, battery charging, PV curtailment);
* ``rebound_kw``: the extra load *after* the window that using the flex down causes (thermal
  loads re-cool, deferred EV energy is still owed). Operators need it because a shed that
  relieves 17:00 can overload 19:00.

**Energy budgets.** Flex from storage is energy-limited, so using it in one interval leaves less
for later ones. Each device has a down and an up budget (kWh above the battery reserve, comfort
headroom as deferrable electric energy, EV slack before departure), spent according to
:class:`EnergyPolicy`, only inside the request's window (default: the whole horizon):
``sequential`` spends it greedily from the window start (what you get if you call everything
at once), ``sustained`` spreads it into the highest level that lasts the whole window (what you
can hold for a 3 h event), ``independent`` gives each interval the whole budget (an upper bound
per interval; intervals are then not additive). Down and up budgets are alternatives: each is
computed as if the other were not used.

**Device models** (simple on purpose: they must run for 10,000 devices per cycle and be
explainable to an operator):

* battery: idle baseline (0 kW: the planner's convention for dispatchable storage); down =
  discharge rating, up = charge rating, energy ``(SoC − reserve) × capacity`` and
  ``(max SoC − SoC) × capacity``. Conversion losses are ignored (a few % optimistic).
* thermostat (cooling, or heating): with an outdoor temperature forecast, load =
  ``rated × duty``, ``duty = (T_out − T_set) / (R · COP · rated)`` clipped to [0, 1] — the
  steady state of the first-order house ``C dT/dt = (T_out − T_in)/R − COP · P`` the simulators
  use. ``T_out`` is per interval: the weather forecast of the device's area where it covers the
  interval (:mod:`gateway.weather`), else the configured temperature; each interval of the
  output says which (``temperature_source``). Without any, the history profile, else the
  current power. A shed raises the setpoint by ``Δ = min(max_offset_c, headroom_°C)``, where
  ``headroom_°C = soc_pct/100 × comfort_band_c`` (adapters report comfort headroom in
  ``soc_pct``), what the thermostat adapter's offset mapping does for a full shed. Flex down is
  then (a) *sustained*, for as long as the window lasts: the change of the steady-state duty,
  ``load − rated × duty(T_set + Δ)`` ≈ ``load × Δ / (T_out − T_set)``, and (b) on top of it the
  *transient* of the house coasting up to the new setpoint with the compressor off (the whole
  load for ``τ = R·C·ln((T_out − T_set) / (T_out − T_set − Δ))``): an energy budget of
  ``(load − sustained) × τ`` spent by the policy (without a temperature, ``C × Δ / COP``);
  never more than the load. Zero headroom or an occupant override (``soc_pct`` None) means
  no flex; without an outdoor temperature only the transient. Flex up (pre-cooling) is
  ``rated − load`` with a budget of ``C × precool_c / COP``. The rebound pays the stored heat
  back (at most ``C × Δ / COP``, the re-cooling) at up to ``rated − load``; the sustained part
  is not owed.
* water heater: same shape with stored energy (``soc_pct`` of ``capacity_kwh``) as the budget.
* EV charger: plugged in when the charger reports a charge rating > 0; the energy needed and
  the departure are the EV's (``state.ev``). Baseline = charging at
  full rate until the energy needed is delivered (what an unmanaged charger does). Charging can
  be deferred only by the slack ``rate × time to departure − energy needed``; with no known
  departure nothing is deferrable (the car may leave any minute). Flex up is extra charging into
  the battery beyond the need, when its SoC and capacity are known.
* PV: flex up = curtailing its export; C&I sites: baseline only.

Baselines of loads come from the device's history (mean of the same local time on the last
``history_days`` days of the same day type, event days excluded) with the spread across those
days as uncertainty; modelled baselines get a ``model_cv`` relative uncertainty.

**Uncertainty.** A device contributes its flex only if it is online and participates, which the
core estimates from its recent availability ratio (:func:`availability_ratio`). A group's flex in
an interval is then ``Σ B_i c_i`` with independent ``B_i ~ Bernoulli(p_i)``. Its p10/p50/p90
come from a seeded Monte Carlo over participation draws for small groups (the distribution is
lumpy and skewed when a few large devices dominate) and from the normal approximation (mean
``Σ p c``, variance ``Σ p(1−p) c²``, clipped to ``[0, Σ c]``) for large ones, where it is
accurate and costs nothing. The models themselves are uncertain too (a house model learnt
without history, a tank's draw): each class has a relative sd (``flex_cv``: thermostats 0.25,
so p10..p90 ≈ ±32 %; water heaters 0.2; EVs 0.15; PV 0.1; batteries 0.03), scaled by
``history_cv_scale`` for a device whose baseline comes from its own history. That error is
shared by the devices of a class, so it adds linearly (``σ = Σ cv p c``) and then in
quadrature with the participation spread; the band may pass ``Σ c`` except for batteries,
whose ratings bound it. The baseline band is normal with the summed per-device variances.

**Checked against delivery.** After each settled dispatch the core asks :class:`FlexCoverage`
whether the flexibility the group delivered fell within the p10..p90 the forecast in force at
the dispatch's start gave for its intervals; the running share is published with every forecast
(``coverage``) and in the operator metrics. The p10/p90 spread of later forecasts of the group is
scaled (split-conformal) so that ``nominal`` (80 %) of the recorded deliveries would have fallen
inside: a forecast whose band proves too narrow widens, one too wide narrows.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from gateway.flex.baseline import (
    BaselineConfig,
    DeviceBaseline,
    DeviceHistory,
    EventCalendar,
    FloatArray,
    GroupBaseline,
    epoch_s,
    from_epoch,
)
from gateway.weather import TemperatureSeries
from unified.model import (
    SCHEMA_VERSION,
    DerClass,
    Device,
    DeviceState,
    Frozen,
    Identifier,
    UtcDatetime,
)
from unified.weather import WeatherForecast

_Z90 = NormalDist().inv_cdf(0.9)
_DAY_S = 86_400
# Relative sd of the modelled flex per class: a house model learnt without history is right
# to ±25–35 % (p10..p90) for a group; a tank to ±20–25 %; a battery's SoC and ratings are measured.
_FLEX_CV: dict[DerClass, float] = {
    DerClass.THERMOSTAT: 0.25,
    DerClass.WATER_HEATER: 0.2,
    DerClass.EVSE: 0.15,
    DerClass.PV: 0.1,
    DerClass.BATTERY: 0.03,
}


class EnergyPolicy(StrEnum):
    SEQUENTIAL = "sequential"
    SUSTAINED = "sustained"
    INDEPENDENT = "independent"


class QuantileMethod(StrEnum):
    AUTO = "auto"
    NORMAL = "normal"
    MONTE_CARLO = "monte_carlo"


class TemperatureSource(StrEnum):
    """Where an interval's outdoor temperature came from, over the group's thermostats."""

    WEATHER_FORECAST = "weather_forecast"
    CONFIGURED = "configured"
    HISTORY = "history"
    """No temperature: thermostat baselines from their history (or current power)."""
    MIXED = "mixed"


class ThermalParams(Frozen):
    """First-order house model of a thermostat; the comfort band and offset default to the MQTT
    thermostat adapter's (comfort 20–26 °C, offsets up to 4 °C)."""

    mode: Literal["cool", "heat"] = "cool"
    setpoint_c: float = Field(default=22.0, ge=5, le=35)
    comfort_band_c: float = Field(
        default=6.0,
        gt=0,
        le=20,
        description="Degrees that soc_pct = 100 % of headroom stands for (the MQTT thermostat "
        "adapter's comfort_max_c − comfort_min_c)",
    )
    precool_c: float = Field(default=1.0, ge=0, le=10, description="Accepted pre-conditioning")
    max_offset_c: float = Field(
        default=4.0,
        gt=0,
        le=10,
        description="Largest setpoint offset a shed uses (the thermostat adapter's max_offset_c)",
    )
    resistance_c_per_kw: float = Field(default=2.0, gt=0)
    capacitance_kwh_per_c: float = Field(default=2.0, gt=0)
    cop: float = Field(default=3.0, gt=0)


class FlexConfig(Frozen):
    """Tuning of the flexibility forecast; see the module docstring for the models."""

    history_days: int = Field(default=10, ge=1, le=60, description="Similar days per profile")
    lookback_days: int = Field(default=21, ge=1, le=90)
    model_cv: float = Field(
        default=0.25, ge=0, le=2, description="Relative sd of a modelled (not measured) baseline"
    )
    quantile_method: QuantileMethod = QuantileMethod.AUTO
    monte_carlo_max_devices: int = Field(
        default=500, ge=0, description="AUTO uses Monte Carlo up to this many devices"
    )
    samples: int = Field(default=4000, ge=100, le=100_000)
    seed: int = 0
    thermal: ThermalParams = ThermalParams()
    flex_cv: dict[DerClass, float] = Field(
        default_factory=lambda: dict(_FLEX_CV),
        description="Relative sd of a device's modelled flex by class (the model's own error, "
        "shared by the devices of a class: it does not average out over a group); a class "
        "not listed has none",
    )
    history_cv_scale: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="flex_cv of a device whose baseline comes from its own history, relative",
    )

    @model_validator(mode="after")
    def _cv_range(self) -> FlexConfig:
        if any(not 0 <= v <= 2 for v in self.flex_cv.values()):
            raise ValueError("flex_cv values must be within 0 and 2")
        return self


class FlexRequest(Frozen):
    """What Grid DERMS asks on ``derms/v1/{gw}/requests/flex`` (and the periodic default)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    request_id: Identifier | None = None
    group_id: Identifier
    start: UtcDatetime | None = Field(
        default=None, description="Start of the horizon; default: now (floored to the interval)"
    )
    horizon_s: int = Field(default=_DAY_S, ge=300, le=7 * _DAY_S)
    interval_s: int = Field(default=3600, ge=300, le=_DAY_S)
    window_start: UtcDatetime | None = Field(
        default=None, description="Flex is used (budgets spent) only in [window_start, window_end)"
    )
    window_end: UtcDatetime | None = None
    policy: EnergyPolicy = EnergyPolicy.SEQUENTIAL

    @model_validator(mode="after")
    def _consistent(self) -> FlexRequest:
        if self.horizon_s % self.interval_s:
            raise ValueError("horizon_s must be a whole number of intervals")
        if (
            self.window_start is not None
            and self.window_end is not None
            and self.window_end <= self.window_start
        ):
            raise ValueError("window_end must be after window_start")
        return self


class Band(Frozen):
    p10: float
    p50: float
    p90: float

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if self.p10 > self.p50 + 1e-9 or self.p50 > self.p90 + 1e-9:
            raise ValueError("quantiles must be ordered p10 <= p50 <= p90")
        return self


class FlexInterval(Frozen):
    start: UtcDatetime
    end: UtcDatetime
    in_window: bool
    baseline_kw: Band = Field(description="Expected load, load convention")
    flex_down_kw: Band = Field(description="Possible load reduction, non-negative kW")
    flex_up_kw: Band = Field(description="Possible load increase, non-negative kW")
    rebound_kw: Band = Field(description="Extra load after the window from using flex down")
    outdoor_temp_c: float | None = Field(
        default=None, description="Mean outdoor temperature the group's thermostats were given"
    )
    temperature_source: TemperatureSource | None = Field(
        default=None, description="Where that temperature came from; absent: no thermostats"
    )


class WeatherUse(Frozen):
    """One weather forecast a flexibility forecast used."""

    scope: str | None = Field(default=None, description="Its scope; absent: the whole gateway")
    issued_at: UtcDatetime | None = None
    thermostats: int = Field(ge=0, description="Thermostats it applied to")
    intervals_covered: int = Field(ge=0, description="Intervals it covered")


class FlexCoverageStat(Frozen):
    """How often the flexibility a group delivered fell within its forecast's p10..p90."""

    group_id: str
    checked: int = Field(ge=0, description="Dispatches checked against their forecast")
    within: int = Field(ge=0, description="Of those, deliveries within p10..p90")
    coverage: float | None = Field(
        default=None, description="Running share within p10..p90 (nominal 0.8); None: none yet"
    )
    width_factor: float = Field(
        gt=0, description="Scale applied to the p10/p90 spread around p50 (1: as modelled)"
    )


class FlexForecast(Frozen):
    """Published on ``derms/v1/{gw}/telemetry/flex/{group_id}``."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    request_id: str | None = None
    group_id: str
    generated_at: UtcDatetime
    start: UtcDatetime
    interval_s: int
    horizon_s: int
    window_start: UtcDatetime
    window_end: UtcDatetime
    policy: EnergyPolicy
    quantile_method: QuantileMethod
    devices_total: int
    devices_with_state: int
    expected_participants: float = Field(description="Sum of the devices' availabilities")
    intervals: tuple[FlexInterval, ...]
    weather: tuple[WeatherUse, ...] | None = Field(
        default=None, description="Weather forecasts used for thermostats; absent: none"
    )
    notes: tuple[str, ...] = ()
    coverage: FlexCoverageStat | None = Field(
        default=None, description="How this group's past forecasts held against delivery"
    )


@dataclass(frozen=True, slots=True)
class SentForecast:
    """What a coverage check needs of a forecast that was sent (a few arrays, not the message:
    a day of forecasts of a hundred groups is kept)."""

    group_id: str
    generated_at: float
    width_factor: float
    starts: FloatArray
    ends: FloatArray
    bands: FloatArray
    """(intervals, 2, 3): flex down / up × p10, p50, p90."""

    @classmethod
    def of(cls, forecast: FlexForecast) -> SentForecast:
        ivs = forecast.intervals
        return cls(
            group_id=forecast.group_id,
            generated_at=epoch_s(forecast.generated_at),
            width_factor=forecast.coverage.width_factor if forecast.coverage else 1.0,
            starts=np.array([epoch_s(iv.start) for iv in ivs]),
            ends=np.array([epoch_s(iv.end) for iv in ivs]),
            bands=np.array(
                [
                    [[b.p10, b.p50, b.p90] for b in (iv.flex_down_kw, iv.flex_up_kw)]
                    for iv in ivs
                ],
                dtype=np.float64,
            ).reshape(len(ivs), 2, 3),
        )


class FlexCoverage:
    """Running coverage of the forecast's p10..p90 by delivered flexibility, per group, and the
    width calibration it implies (see the module docstring)."""

    def __init__(
        self,
        *,
        nominal: float = 0.8,
        window: int = 200,
        min_checks: int = 10,
        halflife_checks: float = 20.0,
        max_factor: float = 4.0,
    ) -> None:
        self.nominal, self.window, self.min_checks = nominal, window, min_checks
        self.max_factor = max_factor
        self._decay = 0.5 ** (1.0 / halflife_checks)
        self._checked: dict[str, int] = {}
        self._within: dict[str, int] = {}
        self._ewma: dict[str, tuple[float, float]] = {}
        self._scores: dict[str, deque[float]] = {}
        self._forecasts: dict[str, deque[SentForecast]] = {}

    def remember(self, forecast: FlexForecast, keep: int = 200, min_gap_s: float = 600.0) -> None:
        """A forecast sent for its group: a dispatch is checked against the one in force.

        At most one per ``min_gap_s`` is kept (the one in force is then at most that much
        older than the newest sent), ``keep`` per group (33 h at the defaults)."""
        sent = SentForecast.of(forecast)
        kept = self._forecasts.setdefault(forecast.group_id, deque(maxlen=keep))
        if kept and sent.generated_at - kept[-1].generated_at < min_gap_s:
            return
        kept.append(sent)

    def in_force(self, group_id: str, at: datetime) -> SentForecast | None:
        """The newest remembered forecast of ``group_id`` generated at or before ``at``."""
        t = epoch_s(at)
        found = [f for f in self._forecasts.get(group_id, ()) if f.generated_at <= t]
        return max(found, key=lambda f: f.generated_at) if found else None

    def check(
        self,
        forecast: FlexForecast | SentForecast,
        start: datetime,
        end: datetime,
        requested_kw: float,
        delivered_kw: float,
    ) -> bool | None:
        """Record whether the mean flexibility delivered over ``[start, end)`` (load convention:
        negative = load reduced) fell within the forecast's p10..p90 over those intervals.

        ``requested_kw`` is what the dispatch asked (its sign says which band: down or up). A
        request below the forecast's p10 says nothing about the band (the group was not asked
        for what it could give): ``None``, nothing recorded. When the request was below p90
        the delivery is capped by it, so only its lower side calibrates the width.
        """
        sent = forecast if isinstance(forecast, SentForecast) else SentForecast.of(forecast)
        down = requested_kw < 0
        t0, t1 = epoch_s(start), epoch_s(end)
        overlap = np.minimum(t1, sent.ends) - np.maximum(t0, sent.starts)
        use = overlap > 0
        if not use.any():
            return None
        w = overlap[use] / overlap[use].sum()
        p10, p50, p90 = (float(x) for x in w @ sent.bands[use, 0 if down else 1, :])
        asked = abs(requested_kw)
        if asked < p10:
            return None
        got = -delivered_kw if down else delivered_kw
        tol = 1e-6 * max(abs(p90), 1.0)
        within = p10 - tol <= got <= p90 + tol
        gid = sent.group_id
        self._checked[gid] = self._checked.get(gid, 0) + 1
        self._within[gid] = self._within.get(gid, 0) + int(within)
        n, s = self._ewma.get(gid, (0.0, 0.0))
        self._ewma[gid] = (self._decay * n + 1.0, self._decay * s + float(within))
        # Scores against the band as modelled (the forecast may carry a width already applied).
        f = sent.width_factor
        scores = self._scores.setdefault(gid, deque(maxlen=self.window))
        if got < p50:
            scores.append(f * (p50 - got) / max(p50 - p10, tol))
        elif asked >= p90:
            scores.append(f * (got - p50) / max(p90 - p50, tol))
        return within

    def width_factor(self, group_id: str) -> float:
        """Scale of the p10/p90 spread that would have covered ``nominal`` of the deliveries."""
        scores = self._scores.get(group_id)
        if not scores or len(scores) < self.min_checks:
            return 1.0
        q = float(np.quantile(np.array(scores), self.nominal))
        return float(np.clip(q, 1.0 / self.max_factor, self.max_factor))

    def stat(self, group_id: str) -> FlexCoverageStat:
        n, s = self._ewma.get(group_id, (0.0, 0.0))
        return FlexCoverageStat(
            group_id=group_id,
            checked=self._checked.get(group_id, 0),
            within=self._within.get(group_id, 0),
            coverage=s / n if n > 0 else None,
            width_factor=self.width_factor(group_id),
        )

    def stats(self) -> list[FlexCoverageStat]:
        return [self.stat(g) for g in sorted(self._checked)]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class EvNeed:
    """Energy an EV still needs (kWh, beyond what it has) and when it leaves (None: unknown)."""

    energy_kwh: float
    departure: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeviceFlexInput:
    """Everything the forecast needs about one device; the core fills it from the registry,
    the supervisors' latest :class:`DeviceState` and the telemetry history.

    ``availability`` is the probability the device is online and follows a request over the
    horizon (e.g. :func:`availability_ratio` of its recent reports). ``state`` None means
    nothing recent is known: the device still has a baseline (from history) but no flex.
    """

    device: Device
    state: DeviceState | None
    availability: float = 1.0
    history: DeviceHistory | None = None
    ev_need: EvNeed | None = None
    thermal: ThermalParams | None = None
    weather: TemperatureSeries | None = None
    """Outdoor temperature forecast for the device's area; where it does not cover an
    interval, the group-wide ``outdoor_temp_c`` of :func:`forecast_group` applies."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.availability <= 1.0:
            raise ValueError(f"{self.device.device_id}: availability must be in [0, 1]")


def availability_ratio(
    reported: int, expected: int, prior_online: float = 1.0, prior_offline: float = 1.0
) -> float:
    """Smoothed share of expected reports that arrived: ``(k + a) / (n + a + b)``.

    The Beta(a, b) prior keeps a new device (0 of 0) at an agnostic 0.5 instead of 0 or 1, and
    keeps one lucky report from making a device look certain.
    """
    if reported < 0 or expected < 0 or reported > expected:
        raise ValueError("need 0 <= reported <= expected")
    return (reported + prior_online) / (expected + prior_online + prior_offline)


# --------------------------------------------------------------------------- per device


@dataclass(frozen=True, slots=True, eq=False)
class DeviceFlex:
    """One device's contribution per interval, *given that it participates*."""

    device_id: str
    availability: float
    baseline_kw: FloatArray
    baseline_var: FloatArray
    flex_down_kw: FloatArray
    flex_up_kw: FloatArray
    rebound_kw: FloatArray
    has_state: bool
    notes: tuple[str, ...] = ()
    flex_cv: float = 0.0
    """Relative sd of its flex from the model's own error (shared across its class)."""
    rating_bound: bool = False
    """Its flex is bounded by its ratings (a battery's): the model's error never exceeds it."""


@dataclass(frozen=True, slots=True, eq=False)
class ForecastGrid:
    """The interval grid of one forecast, with what is shared by every device on it."""

    starts: FloatArray
    interval_s: int
    window: np.ndarray[Any, np.dtype[np.bool_]]
    after: np.ndarray[Any, np.dtype[np.bool_]]
    calendar: EventCalendar | None
    lookback_days: int
    same_day: np.ndarray[Any, np.dtype[np.bool_]] = field(repr=False)
    past_days: tuple[tuple[date, ...], ...] = field(repr=False)

    @property
    def dt_h(self) -> float:
        return self.interval_s / 3600.0

    @property
    def n(self) -> int:
        return len(self.starts)

    @classmethod
    def build(
        cls,
        start: datetime,
        horizon_s: int,
        interval_s: int,
        window_start: datetime | None = None,
        window_end: datetime | None = None,
        calendar: EventCalendar | None = None,
        lookback_days: int = 21,
    ) -> ForecastGrid:
        t0 = (epoch_s(start) // interval_s) * interval_s
        starts = t0 + interval_s * np.arange(horizon_s // interval_s, dtype=np.float64)
        ends = starts + interval_s
        w0 = starts[0] if window_start is None else epoch_s(window_start)
        w1 = ends[-1] if window_end is None else epoch_s(window_end)
        window = (starts < w1) & (ends > w0)
        after = starts >= w1
        # Which past days count as "similar" for each interval: same day type, not an event day.
        ks = np.arange(1, lookback_days + 1)
        same = np.ones((lookback_days, len(starts)), dtype=np.bool_)
        past: list[tuple[date, ...]] = []
        if calendar is not None:
            for j, s in enumerate(starts):
                day = calendar.local_day(from_epoch(s))
                kind = calendar.day_type(day)
                days = tuple(day - timedelta(days=int(k)) for k in ks)
                past.append(days)
                same[:, j] = [
                    calendar.day_type(d) is kind and d not in calendar.event_days for d in days
                ]
        return cls(starts, interval_s, window, after, calendar, lookback_days, same, tuple(past))


def _spend(
    cap: FloatArray,
    energy_kwh: float,
    dt_h: float,
    mask: np.ndarray[Any, np.dtype[np.bool_]],
    policy: EnergyPolicy,
) -> FloatArray:
    """Power per interval (≤ ``cap``, only where ``mask``) drawing on one energy budget."""
    cap = np.where(mask, np.maximum(cap, 0.0), 0.0)
    energy = max(0.0, energy_kwh)
    if policy is EnergyPolicy.INDEPENDENT:
        return np.minimum(cap, energy / dt_h)
    if energy >= cap.sum() * dt_h:
        return cap
    if policy is EnergyPolicy.SEQUENTIAL:
        used = np.minimum(np.cumsum(cap) * dt_h, energy)
        out: FloatArray = np.diff(used, prepend=0.0) / dt_h
        return out
    # SUSTAINED: water-filling — the level L with Σ min(cap, L)·dt = energy.
    c = np.sort(cap[mask])
    m = len(c)
    prefix = np.cumsum(c)
    filled = prefix + c * (m - np.arange(m) - 1)
    k = int(np.searchsorted(filled, energy / dt_h))
    below = prefix[k - 1] if k > 0 else 0.0
    level = (energy / dt_h - below) / (m - k)
    return np.minimum(cap, level)


def _history_profile(
    history: DeviceHistory, grid: ForecastGrid, history_days: int
) -> tuple[FloatArray, FloatArray] | None:
    """Mean and predictive variance of the device's load at each interval's time of day."""
    ks = np.arange(1, grid.lookback_days + 1, dtype=np.float64)
    times = grid.starts[None, :] - ks[:, None] * _DAY_S
    try:
        means, coverage, _ = history.window(times, grid.interval_s)
    except ValueError:
        return None
    valid = (coverage >= 0.5) & ~np.isnan(means) & grid.same_day
    cal = grid.calendar
    if cal is not None and history.device_id in cal.device_event_days:
        own = cal.device_event_days[history.device_id]
        valid &= np.array([[d not in own for d in days] for days in grid.past_days]).T
    use = valid & (np.cumsum(valid, axis=0) <= history_days)
    n = use.sum(axis=0)
    if not n.any():
        return None
    x = np.where(use, means, 0.0)
    mean = np.divide(x.sum(axis=0), n, out=np.full(grid.n, np.nan), where=n > 0)
    dev = np.where(use, means - mean, 0.0)
    var = np.divide((dev**2).sum(axis=0), n - 1, out=np.zeros(grid.n), where=n > 1)
    var = var * (1 + 1 / np.maximum(n, 1))
    return mean, var


def _base_load(
    inp: DeviceFlexInput,
    grid: ForecastGrid,
    config: FlexConfig,
    notes: list[str],
    measured: list[bool] | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Baseline of a load from history, falling back to the current power (or 0); appends
    True to ``measured`` when the history profile was used."""
    current = inp.state.power_kw if inp.state is not None else 0.0
    fallback_var = (config.model_cv * current) ** 2
    if inp.history is not None:
        profile = _history_profile(inp.history, grid, config.history_days)
        if profile is not None:
            mean, var = profile
            if measured is not None:
                measured.append(True)
            gaps = np.isnan(mean)
            if gaps.any():
                notes.append(f"{int(gaps.sum())} interval(s) without history: current power")
            return np.where(gaps, current, mean), np.where(gaps, fallback_var, var)
        notes.append("history unusable: baseline from current power")
    elif inp.state is None:
        notes.append("no state and no history: baseline 0")
    return np.full(grid.n, current), np.full(grid.n, fallback_var)


def _rated(inp: DeviceFlexInput) -> float:
    """Power the device can run at now: the state's rating when reported (0 when it is off)."""
    if inp.state is not None and inp.state.max_discharge_kw is not None:
        return inp.state.max_discharge_kw
    return inp.device.ratings.max_discharge_kw


def device_flex(
    inp: DeviceFlexInput,
    grid: ForecastGrid,
    *,
    outdoor_temp_c: FloatArray | None = None,
    policy: EnergyPolicy = EnergyPolicy.SEQUENTIAL,
    config: FlexConfig | None = None,
) -> DeviceFlex:
    """One device's baseline and flex per interval, assuming it participates.

    ``outdoor_temp_c`` may be NaN in some intervals: a thermostat's baseline there comes from
    its history, as it does everywhere without a temperature.
    """
    config = config or FlexConfig()
    dev, state, dt = inp.device, inp.state, grid.dt_h
    zeros = np.zeros(grid.n)
    notes: list[str] = []
    measured: list[bool] = []
    base, var = zeros, zeros
    down, up, rebound = zeros, zeros, zeros
    deferred = 0.0
    rebound_cap = zeros

    if dev.der_class is DerClass.BATTERY:
        if state is None or state.soc_pct is None:
            notes.append("no state of charge: no flex")
        else:
            cap_kwh = state.capacity_kwh or dev.ratings.capacity_kwh
            dis = dev.ratings.max_discharge_kw
            chg = dev.ratings.max_charge_kw
            if state.max_discharge_kw is not None:
                dis = min(dis, state.max_discharge_kw)
            if state.max_charge_kw is not None:
                chg = min(chg, state.max_charge_kw)
            c = dev.constraints
            e_down = max(0.0, state.soc_pct - c.reserve_soc_pct) / 100 * cap_kwh
            e_up = max(0.0, c.max_soc_pct - state.soc_pct) / 100 * cap_kwh
            down = _spend(np.full(grid.n, dis), e_down, dt, grid.window, policy)
            up = _spend(np.full(grid.n, chg), e_up, dt, grid.window, policy)

    elif dev.der_class is DerClass.THERMOSTAT:
        p = inp.thermal or config.thermal
        rated = _rated(inp)
        known = (
            np.zeros(grid.n, dtype=np.bool_)
            if outdoor_temp_c is None
            else np.isfinite(outdoor_temp_c)
        )
        if known.any():
            assert outdoor_temp_c is not None
            sign = 1.0 if p.mode == "cool" else -1.0
            if rated > 0:
                temps = np.where(known, outdoor_temp_c, p.setpoint_c)
                duty = sign * (temps - p.setpoint_c)
                duty = duty / (p.resistance_c_per_kw * p.cop * rated)
                base = rated * np.clip(duty, 0.0, 1.0)
            var = (config.model_cv * base) ** 2
        if not known.all():
            hist_base, hist_var = _base_load(inp, grid, config, notes, measured)
            base, var = np.where(known, base, hist_base), np.where(known, var, hist_var)
        headroom = None if state is None else state.soc_pct
        if headroom is None:
            notes.append("no comfort headroom (offline or occupant override): no flex")
        elif rated > 0:
            # The shed raises the setpoint by up to max_offset_c, within the comfort headroom.
            offset_c = min(p.max_offset_c, headroom / 100 * p.comfort_band_c)
            # Sustained: the house then holds T_set + offset, its steady-state draw lower by
            # rated × offset / (R · COP · rated) for as long as the event lasts (a power).
            sustained = np.zeros(grid.n)
            # Transient: the house coasting up to the new setpoint with the compressor off
            # (on top of the sustained part, the whole load meanwhile). Without a temperature
            # only the heat the headroom stores, C·offset/COP, as an energy budget.
            e_down = p.capacitance_kwh_per_c * offset_c / p.cop
            e_coast = e_down
            if known.any():
                assert outdoor_temp_c is not None
                temps = np.where(known, outdoor_temp_c, p.setpoint_c)
                gap = sign * (temps - p.setpoint_c)
                scale = p.resistance_c_per_kw * p.cop * rated
                held = rated * np.clip((gap - offset_c) / scale, 0.0, 1.0)
                sustained = np.where(
                    known & grid.window, np.clip(base - held, 0.0, np.maximum(base, 0.0)), 0.0
                )
                # The first-order house reaches T_set + offset after
                # τ = R·C·ln(gap / (gap − offset)) with the compressor off.
                inside = known & grid.window & (gap > 0)
                e_coast = 0.0
                if inside.any():
                    g = float(gap[inside].mean())
                    extra = float((base - sustained)[inside].mean())
                    if offset_c < g:
                        rc = p.resistance_c_per_kw * p.capacitance_kwh_per_c
                        e_coast = extra * rc * math.log(g / (g - offset_c))
            e_up = p.capacitance_kwh_per_c * p.precool_c / p.cop
            coast = _spend(base - sustained, e_coast, dt, grid.window, policy)
            down = sustained + coast
            up = _spend(rated - base, e_up, dt, grid.window, policy)
            # What is paid back is the heat the house stored, re-cooling it by at most
            # offset_c: beyond that the shed is energy the warmer house never needed.
            deferred = min(e_down, float(down.sum() * dt))
            rebound_cap = np.maximum(rated - base, 0.0)

    elif dev.der_class is DerClass.WATER_HEATER:
        base, var = _base_load(inp, grid, config, notes, measured)
        rated = _rated(inp)
        if state is None or state.soc_pct is None:
            notes.append("no stored-energy state: no flex")
        elif rated > 0:
            cap_kwh = state.capacity_kwh or dev.ratings.capacity_kwh
            c = dev.constraints
            e_down = max(0.0, state.soc_pct - c.reserve_soc_pct) / 100 * cap_kwh
            e_up = max(0.0, c.max_soc_pct - state.soc_pct) / 100 * cap_kwh
            down = _spend(base, e_down, dt, grid.window, policy)
            up = _spend(rated - base, e_up, dt, grid.window, policy)
            deferred = min(e_down, float(np.where(grid.window, base, 0).sum() * dt))
            rebound_cap = np.maximum(rated - base, 0.0)

    elif dev.der_class is DerClass.EVSE:
        rate = 0.0
        if state is not None and state.max_charge_kw is not None:
            rate = min(dev.ratings.max_charge_kw, state.max_charge_kw)
        need, departure = None, None
        if inp.ev_need is not None:
            need, departure = max(0.0, inp.ev_need.energy_kwh), inp.ev_need.departure
        elif state is not None and state.ev is not None:
            need, departure = state.ev.energy_needed_kwh, state.ev.departure
        if rate <= 0 or need is None:
            base, var = _base_load(inp, grid, config, notes, measured)
            notes.append("no EV plugged in or energy need unknown: no flex")
        else:
            frac = np.ones(grid.n)
            to_departure_h = float("inf")
            if departure is not None:
                frac = np.clip((epoch_s(departure) - grid.starts) / grid.interval_s, 0.0, 1.0)
                to_departure_h = max(0.0, (epoch_s(departure) - grid.starts[0]) / 3600)
            else:
                notes.append("departure unknown: charging not deferrable")
            reachable = rate * frac
            everywhere = np.ones(grid.n, dtype=np.bool_)
            base = _spend(reachable, need, dt, everywhere, EnergyPolicy.SEQUENTIAL)
            slack = 0.0 if departure is None else max(0.0, rate * to_departure_h - need)
            down = _spend(base, slack, dt, grid.window, policy)
            extra = 0.0
            if state is not None and state.soc_pct is not None and state.capacity_kwh:
                room = max(0.0, dev.constraints.max_soc_pct - state.soc_pct) / 100
                extra = max(0.0, room * state.capacity_kwh - need)
            up = _spend(reachable - base, extra, dt, grid.window, policy)
            deferred = min(slack, float(np.where(grid.window, base, 0).sum() * dt))
            rebound_cap = np.maximum(reachable - base, 0.0)

    elif dev.der_class is DerClass.PV:
        base, var = _base_load(inp, grid, config, notes, measured)
        if state is not None:
            up = np.where(grid.window, np.maximum(-base, 0.0), 0.0)

    else:  # C&I site and anything without a flex model yet
        base, var = _base_load(inp, grid, config, notes, measured)

    if deferred > 0:
        rebound = _spend(rebound_cap, deferred, dt, grid.after, EnergyPolicy.SEQUENTIAL)
    flex_cv = config.flex_cv.get(dev.der_class, 0.0)
    if measured:
        flex_cv *= config.history_cv_scale  # its baseline measured, not modelled
    return DeviceFlex(
        device_id=dev.device_id,
        availability=inp.availability,
        baseline_kw=np.asarray(base, dtype=np.float64),
        baseline_var=np.asarray(var, dtype=np.float64),
        flex_down_kw=down,
        flex_up_kw=up,
        rebound_kw=rebound,
        has_state=state is not None,
        notes=tuple(notes),
        flex_cv=flex_cv,
        rating_bound=dev.der_class is DerClass.BATTERY,
    )


# --------------------------------------------------------------------------- aggregation


def _bernoulli_quantiles(
    contributions: FloatArray,
    p: FloatArray,
    method: QuantileMethod,
    samples: int,
    rng: np.random.Generator,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """p10/p50/p90 per interval of ``Σ_i B_i c_i[t]`` with ``B_i ~ Bernoulli(p_i)``.

    ``contributions`` is (devices × intervals), non-negative.
    """
    n_t = contributions.shape[1]
    if contributions.shape[0] == 0:
        z = np.zeros(n_t)
        return z, z, z
    if method is QuantileMethod.MONTE_CARLO:
        draws = (rng.random((samples, len(p))) < p).astype(np.float64)
        totals = draws @ contributions
        q = np.quantile(totals, [0.1, 0.5, 0.9], axis=0)
        return q[0], q[1], q[2]
    mean = p @ contributions
    sd = np.sqrt((p * (1 - p)) @ contributions**2)
    top = contributions.sum(axis=0)
    return (
        np.clip(mean - _Z90 * sd, 0.0, top),
        np.clip(mean, 0.0, top),
        np.clip(mean + _Z90 * sd, 0.0, top),
    )


def aggregate(
    group_id: str,
    flexes: Sequence[DeviceFlex],
    grid: ForecastGrid,
    *,
    now: datetime,
    policy: EnergyPolicy = EnergyPolicy.SEQUENTIAL,
    config: FlexConfig | None = None,
    request_id: str | None = None,
    notes: Sequence[str] = (),
    outdoor_temp_c: FloatArray | None = None,
    temperature_sources: Sequence[TemperatureSource | None] | None = None,
    weather: tuple[WeatherUse, ...] | None = None,
    coverage: FlexCoverageStat | None = None,
) -> FlexForecast:
    """Combine per-device contributions into a group's forecast with p10/p50/p90 bands.

    ``outdoor_temp_c`` (NaN: none) and ``temperature_sources`` are per interval, reported as is.
    ``coverage``: how the group's forecasts held against delivery; its ``width_factor`` scales
    the flex bands' p10/p90 spread around p50 (within 0 and what every device could give).
    """
    config = config or FlexConfig()
    n_t = grid.n
    p = np.array([f.availability for f in flexes], dtype=np.float64)

    def stack(name: str) -> FloatArray:
        if not flexes:
            return np.zeros((0, n_t))
        return np.vstack([getattr(f, name) for f in flexes])

    method = config.quantile_method
    if method is QuantileMethod.AUTO:
        small = len(flexes) <= config.monte_carlo_max_devices
        method = QuantileMethod.MONTE_CARLO if small else QuantileMethod.NORMAL
    base_mean = stack("baseline_kw").sum(axis=0)
    base_sd = np.sqrt(stack("baseline_var").sum(axis=0))
    bands: dict[str, tuple[FloatArray, FloatArray, FloatArray]] = {}
    for name in ("flex_down_kw", "flex_up_kw", "rebound_kw"):
        # One generator per quantity, same seed: the same participation draws for all three.
        rng = np.random.default_rng(config.seed)
        bands[name] = _bernoulli_quantiles(stack(name), p, method, config.samples, rng)
    cv = np.array([f.flex_cv for f in flexes], dtype=np.float64)
    rated_cap = np.array([f.rating_bound for f in flexes], dtype=np.bool_)
    if cv.any():
        # The model's own error: shared by the devices it models, so it adds linearly over
        # them (σ = Σ cv_i p_i c_i), then in quadrature with the participation spread.
        for name in ("flex_down_kw", "flex_up_kw", "rebound_kw"):
            lo, mid, hi = bands[name]
            c = stack(name)
            m = _Z90 * ((cv * p) @ c)
            # Capped at Σ c only where that is a rating (a battery's); a modelled load's Σ c
            # is the model's too.
            ceiling = np.where(rated_cap, 1.0, 1.0 + _Z90 * cv) @ c
            bands[name] = (
                np.clip(mid - np.hypot(mid - lo, m), 0.0, mid),
                mid,
                np.clip(mid + np.hypot(hi - mid, m), mid, np.maximum(ceiling, mid)),
            )
    if coverage is not None and coverage.width_factor != 1.0:
        f = coverage.width_factor
        for name in ("flex_down_kw", "flex_up_kw"):
            lo, mid, hi = bands[name]
            top = stack(name).sum(axis=0)
            bands[name] = (
                np.clip(mid - f * (mid - lo), 0.0, mid),
                mid,
                np.clip(mid + f * (hi - mid), mid, np.maximum(top, mid)),
            )

    def band(q: tuple[FloatArray, FloatArray, FloatArray], i: int) -> Band:
        return Band(p10=float(q[0][i]), p50=float(q[1][i]), p90=float(q[2][i]))

    intervals = []
    base_q = (base_mean - _Z90 * base_sd, base_mean, base_mean + _Z90 * base_sd)
    for i, s in enumerate(grid.starts):
        intervals.append(
            FlexInterval(
                start=from_epoch(s),
                end=from_epoch(s + grid.interval_s),
                in_window=bool(grid.window[i]),
                baseline_kw=band(base_q, i),
                flex_down_kw=band(bands["flex_down_kw"], i),
                flex_up_kw=band(bands["flex_up_kw"], i),
                rebound_kw=band(bands["rebound_kw"], i),
                outdoor_temp_c=(
                    float(outdoor_temp_c[i])
                    if outdoor_temp_c is not None and np.isfinite(outdoor_temp_c[i])
                    else None
                ),
                temperature_source=temperature_sources[i] if temperature_sources else None,
            )
        )
    in_window = np.flatnonzero(grid.window)
    w0 = grid.starts[in_window[0]] if len(in_window) else grid.starts[0]
    w1 = grid.starts[in_window[-1]] + grid.interval_s if len(in_window) else grid.starts[0]
    return FlexForecast(
        request_id=request_id,
        group_id=group_id,
        generated_at=now,
        start=from_epoch(grid.starts[0]),
        interval_s=grid.interval_s,
        horizon_s=grid.interval_s * n_t,
        window_start=from_epoch(w0),
        window_end=from_epoch(w1),
        policy=policy,
        quantile_method=method,
        devices_total=len(flexes),
        devices_with_state=sum(f.has_state for f in flexes),
        expected_participants=float(p.sum()),
        intervals=tuple(intervals),
        weather=weather,
        notes=tuple(notes),
        coverage=coverage,
    )


def forecast_group(
    inputs: Sequence[DeviceFlexInput],
    request: FlexRequest,
    *,
    now: datetime,
    outdoor_temp_c: float | Sequence[float] | None = None,
    calendar: EventCalendar | None = None,
    config: FlexConfig | None = None,
    coverage: FlexCoverage | None = None,
) -> FlexForecast:
    """The flexibility forecast of one group (``inputs``: its members, resolved by the core).

    A thermostat's outdoor temperature in an interval is its input's ``weather`` series where
    that covers the interval, else ``outdoor_temp_c`` (one temperature for the whole horizon or
    one per interval); without either its baseline comes from its history. Each interval of
    the result says which it was (``temperature_source``). ``calendar`` (event days, holidays,
    local time zone) shapes the history profiles; without it every past day counts as similar.
    """
    config = config or FlexConfig()
    start = request.start or now
    grid = ForecastGrid.build(
        start,
        request.horizon_s,
        request.interval_s,
        request.window_start,
        request.window_end,
        calendar,
        config.lookback_days,
    )
    fallback: FloatArray | None = None
    if outdoor_temp_c is not None:
        fallback = np.broadcast_to(np.asarray(outdoor_temp_c, dtype=np.float64), (grid.n,)).copy()
    temperature = _OutdoorTemperature(grid, fallback)
    flexes = [
        device_flex(
            inp,
            grid,
            outdoor_temp_c=temperature.for_device(inp),
            policy=request.policy,
            config=config,
        )
        for inp in inputs
    ]
    notes: list[str] = []
    if not grid.window.any():
        notes.append("the window does not overlap the horizon: no flex")
    notes.extend(temperature.notes())
    without = sum(not f.has_state for f in flexes)
    if without:
        notes.append(f"{without} device(s) without a recent state: baseline only")
    return aggregate(
        request.group_id,
        flexes,
        grid,
        now=now,
        policy=request.policy,
        config=config,
        request_id=request.request_id,
        notes=notes,
        outdoor_temp_c=temperature.group_mean(),
        temperature_sources=temperature.sources(),
        weather=temperature.uses(),
        coverage=None if coverage is None else coverage.stat(request.group_id),
    )


class _OutdoorTemperature:
    """Each thermostat's temperature per interval (its area's weather forecast where that
    covers the interval, else the fallback), and a record of what was used for the output."""

    def __init__(self, grid: ForecastGrid, fallback: FloatArray | None) -> None:
        self.grid = grid
        self.fallback = fallback
        n = grid.n
        self._means: dict[int, FloatArray] = {}
        self._used: dict[int, tuple[TemperatureSeries, int]] = {}
        self.thermostats = 0
        self.total = np.zeros(n)
        self.known = np.zeros(n, dtype=np.int64)
        self.from_weather = np.zeros(n, dtype=np.int64)

    def for_device(self, inp: DeviceFlexInput) -> FloatArray | None:
        if inp.device.der_class is not DerClass.THERMOSTAT:
            return self.fallback
        self.thermostats += 1
        temps = self.fallback
        series = inp.weather
        if series is not None:
            key = id(series)
            means = self._means.get(key)
            if means is None:
                means = self._means[key] = series.means(self.grid.starts, self.grid.interval_s)
            covered = np.isfinite(means)
            base = self.fallback if self.fallback is not None else np.full(self.grid.n, np.nan)
            temps = np.where(covered, means, base)
            self.from_weather += covered
            _, count = self._used.get(key, (series, 0))
            self._used[key] = (series, count + 1)
        if temps is not None:
            have = np.isfinite(temps)
            self.total += np.where(have, temps, 0.0)
            self.known += have
        return temps

    def group_mean(self) -> FloatArray:
        out: FloatArray = np.full(self.grid.n, np.nan)
        np.divide(self.total, self.known, out=out, where=self.known > 0)
        return out

    def sources(self) -> list[TemperatureSource | None]:
        if not self.thermostats:
            return [None] * self.grid.n
        out: list[TemperatureSource | None] = []
        for weather, known in zip(self.from_weather, self.known, strict=True):
            if weather == self.thermostats:
                out.append(TemperatureSource.WEATHER_FORECAST)
            elif known == 0:
                out.append(TemperatureSource.HISTORY)
            elif weather == 0 and known == self.thermostats:
                out.append(TemperatureSource.CONFIGURED)
            else:
                out.append(TemperatureSource.MIXED)
        return out

    def uses(self) -> tuple[WeatherUse, ...] | None:
        if not self._used:
            return None
        merged: dict[tuple[str, datetime | None], tuple[int, int]] = {}
        for key, (series, count) in self._used.items():
            # Equal forecasts held as distinct objects still report as one.
            ident = (series.scope or "", series.issued_at)
            covered = int(np.isfinite(self._means[key]).sum())
            before = merged.get(ident, (0, 0))
            merged[ident] = (before[0] + count, max(before[1], covered))
        return tuple(
            WeatherUse(
                scope=scope or None,
                issued_at=issued_at,
                thermostats=count,
                intervals_covered=covered,
            )
            for (scope, issued_at), (count, covered) in sorted(merged.items(), key=_use_order)
        )

    def notes(self) -> list[str]:
        if not self.thermostats:
            return []
        out = []
        n = self.grid.n
        for use in self.uses() or ():
            issued = f" issued {use.issued_at.isoformat()}" if use.issued_at else ""
            out.append(
                f"outdoor temperature from the weather forecast for "
                f"{use.scope or 'the gateway'}{issued} ({use.intervals_covered} of {n} interval(s))"
            )
        if self.fallback is not None and (self.from_weather < self.thermostats).any():
            out.append("configured outdoor temperature where no weather forecast covers")
        missing = int((self.known < self.thermostats).sum())
        if missing == n:
            out.append("no outdoor temperature: thermostat baselines from history")
        elif missing:
            out.append(
                f"no outdoor temperature in {missing} interval(s): thermostat baselines from "
                "history there"
            )
        return out


def _use_order(item: tuple[tuple[str, datetime | None], tuple[int, int]]) -> tuple[str, float]:
    (scope, issued_at), _ = item
    return scope, issued_at.timestamp() if issued_at is not None else 0.0


def flex_json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of the flexibility and settlement messages, by name."""
    from gateway.flex.performance import DevicePerformance, GroupPerformance
    from gateway.flex.settlement import PerformanceReport, PerformanceRequest
    from unified.feeds import FeedValue
    from unified.prices import PriceSchedule
    from unified.services import ServiceReport

    models: dict[str, type[BaseModel]] = {
        "flex_request": FlexRequest,
        "flex_forecast": FlexForecast,
        "device_baseline": DeviceBaseline,
        "group_baseline": GroupBaseline,
        "device_performance": DevicePerformance,
        "group_performance": GroupPerformance,
        "performance_report": PerformanceReport,
        "performance_request": PerformanceRequest,
        "baseline_config": BaselineConfig,
        "flex_config": FlexConfig,
        "weather_forecast": WeatherForecast,
        "price_schedule": PriceSchedule,
        "service_report": ServiceReport,
        "feed_value": FeedValue,
    }
    return {name: model.model_json_schema() for name, model in models.items()}


__all__ = [
    "Band",
    "DeviceFlex",
    "DeviceFlexInput",
    "EnergyPolicy",
    "EvNeed",
    "FlexConfig",
    "FlexForecast",
    "FlexInterval",
    "FlexRequest",
    "ForecastGrid",
    "QuantileMethod",
    "TemperatureSource",
    "ThermalParams",
    "WeatherUse",
    "aggregate",
    "availability_ratio",
    "device_flex",
    "flex_json_schemas",
    "forecast_group",
]
