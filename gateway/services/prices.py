"""Price schedules per area for the grid services' schedules (pure: no I/O, no clock).

Grid DERMS publishes :class:`unified.prices.PriceSchedule` on ``derms/v1/{gw}/prices``: a
day-ahead or real-time schedule of energy prices for the whole gateway or for one topology
group. The gateway keeps the newest schedule per (scope, kind) (:class:`PriceBook`; the core
stores it in the history file so it survives a restart); a redelivered or older one is ignored,
and so is one that has already ended (stale). :meth:`PriceBook.series` gives a horizon's
prices: where schedules overlap, a group's own wins over the gateway's, and within a scope a
real-time price wins over the day-ahead one. Each horizon step takes the time-weighted mean of
the points it overlaps, provided they cover at least half of it; elsewhere NaN (no price: a
schedule must not invent one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from unified.prices import PriceKind, PriceSchedule

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
GATEWAY_SCOPE = "*"
MIN_COVERAGE = 0.5


class PriceBook:
    def __init__(self) -> None:
        self._held: dict[tuple[str, str], PriceSchedule] = {}

    def __len__(self) -> int:
        return len(self._held)

    def is_newer(self, schedule: PriceSchedule) -> bool:
        held = self._held.get(schedule.key)
        return held is None or schedule.issued_at > held.issued_at

    @staticmethod
    def is_stale(schedule: PriceSchedule, now_s: float) -> bool:
        """Every point of it is over: nothing left to plan with."""
        return schedule.end_s <= now_s

    def put(self, schedule: PriceSchedule) -> bool:
        """Hold it unless one as new or newer is held for its scope and kind."""
        if not self.is_newer(schedule):
            return False
        self._held[schedule.key] = schedule
        return True

    def schedules(self) -> list[PriceSchedule]:
        return list(self._held.values())

    def series(
        self, scopes: Sequence[str], start_s: float, step_s: float, steps: int
    ) -> tuple[FloatArray, FloatArray]:
        """Import and export price per horizon step for the first of ``scopes`` that has one
        (most specific first; the gateway's scope ``*`` is tried last whether listed or not);
        NaN where no schedule covers a step."""
        # Layered on a 5-min grid (sampled at each slot's middle), so a step that one schedule
        # covers in part and another in the rest reads each where it wins.
        per_step = max(1, math.ceil(step_s / SLOT_S))
        slot = step_s / per_step
        mids: FloatArray = start_s + slot * (np.arange(steps * per_step, dtype=np.float64) + 0.5)
        imp = np.full(len(mids), np.nan)
        exp = np.full(len(mids), np.nan)
        order = [s for s in scopes if s != GATEWAY_SCOPE] + [GATEWAY_SCOPE]
        for scope in reversed(order):  # least specific first: the more specific overwrite
            for kind in (PriceKind.DAY_AHEAD, PriceKind.REAL_TIME):
                schedule = self._held.get((scope, kind.value))
                if schedule is not None:
                    _overlay(schedule, mids, imp, exp)
        return _means(imp, steps, per_step), _means(exp, steps, per_step)


SLOT_S = 300


def _overlay(schedule: PriceSchedule, mids: FloatArray, imp: FloatArray, exp: FloatArray) -> None:
    first = schedule.points[0].start.timestamp()
    k = np.floor((mids - first) / schedule.step_s)
    inside = (k >= 0) & (k < len(schedule.points))
    if not inside.any():
        return
    idx = k[inside].astype(np.int64)
    price = np.array([p.price for p in schedule.points])
    export = np.array(
        [p.price if p.export_price is None else p.export_price for p in schedule.points]
    )
    imp[inside] = price[idx]
    exp[inside] = export[idx]


def _means(slots: FloatArray, steps: int, per_step: int) -> FloatArray:
    grid = slots.reshape(steps, per_step)
    known = ~np.isnan(grid)
    count = known.sum(axis=1)
    total = np.where(known, grid, 0.0).sum(axis=1)
    out = np.full(steps, np.nan)
    use = count >= MIN_COVERAGE * per_step
    out[use] = total[use] / count[use]
    return out
