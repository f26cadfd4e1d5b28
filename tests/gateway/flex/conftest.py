"""Shared builders for the flex tests: devices, states and hourly histories."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import numpy as np

from gateway.flex import DeviceHistory
from unified.model import (
    BatteryConstraints,
    BatteryRatings,
    DerClass,
    Device,
    DeviceState,
    TopologyLocation,
)

NOW = datetime(2024, 6, 20, 12, 0, tzinfo=UTC)
HISTORY_START = datetime(2024, 4, 1, tzinfo=UTC)


def make_device(
    device_id: str,
    der_class: DerClass,
    *,
    charge_kw: float = 5.0,
    discharge_kw: float = 5.0,
    capacity_kwh: float = 10.0,
    reserve: float = 20.0,
    max_soc: float = 100.0,
) -> Device:
    return Device(
        device_id=device_id,
        der_class=der_class,
        location=TopologyLocation(substation="s1", feeder="f1"),
        adapter="sim",
        ratings=BatteryRatings(
            max_charge_kw=charge_kw, max_discharge_kw=discharge_kw, capacity_kwh=capacity_kwh
        ),
        constraints=BatteryConstraints(reserve_soc_pct=reserve, max_soc_pct=max_soc),
    )


def make_state(
    device_id: str,
    *,
    power_kw: float = 0.0,
    soc_pct: float | None = None,
    capacity_kwh: float | None = None,
    max_charge_kw: float | None = None,
    max_discharge_kw: float | None = None,
) -> DeviceState:
    return DeviceState(
        device_id=device_id,
        timestamp=NOW,
        power_kw=power_kw,
        soc_pct=soc_pct,
        capacity_kwh=capacity_kwh,
        max_charge_kw=max_charge_kw,
        max_discharge_kw=max_discharge_kw,
        source="test",
    )


def hourly_history(
    device_id: str,
    kw_at: Callable[[date, int], float | None],
    start: datetime = HISTORY_START,
    end: datetime = NOW + timedelta(days=2),
) -> DeviceHistory:
    """History whose value in hour ``h`` of UTC day ``d`` is ``kw_at(d, h)`` (None: missing)."""
    n = int((end - start).total_seconds() // 3600)
    values = np.empty(n)
    for i in range(n):
        t = start + timedelta(hours=i)
        v = kw_at(t.date(), t.hour)
        values[i] = np.nan if v is None else v
    return DeviceHistory("d1" if device_id == "" else device_id, start, 3600, values)
