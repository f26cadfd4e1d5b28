"""Horizon schedules for batteries and EVs under nested envelopes: one LP solved by HiGHS.

A grid service that runs by itself (price arbitrage, cost-optimal EV charging, peak shaving)
is a plan over hours, not a setpoint for now: a battery charges at 03:00 because it will
discharge at 18:00, and an EV is left idle at 17:00 because it can charge after 22:00 and
still leave full. :func:`solve_schedule` plans every device over a horizon of fixed steps
(e.g. 24 h in 15-min steps) in one linear program:

* every device is a store of energy: ``c[d,t]`` charge and ``e[d,t]`` discharge kW at the meter,
  and ``s[d,t]`` the energy stored at the end of step t (kWh),
  ``s[t] = s[t-1] + dt * (eta_c * c[t] - e[t] / eta_d)``;
* a battery stays within its reserve and maximum state of charge (a battery that starts outside
  them may stay there but go no further), its ratings, and ends the horizon no emptier than it
  began (else every plan would sell the battery's energy at the horizon's end);
* an EV charges only while plugged in, at most ``max_kw`` (or 0 or at least ``min_kw``: a
  semi-continuous variable, and then the problem is a MILP), never discharges unless it can
  (``v2g_kw``), and has ``energy_needed_kwh`` by departure; energy that cannot come after the
  horizon ends (departure beyond it) must come within it;
* every group (site, transformer, feeder section, feeder: nested through the devices they hold)
  keeps its net power — its uncontrolled baseline plus its devices' power — within its import
  and export limits at every step;
* the objective is the energy cost at the price schedule, plus a tiny throughput cost
  (degradation, and it stops a battery from charging and discharging in one step) and, where a
  group has a peak-shaving threshold, a demand charge on its highest excess over it.

Envelopes are safety limits: they win over departure energy, which wins over cost. Both are
written as soft constraints with large penalties (envelope 10,000 $/kWh, departure 100 $/kWh),
so a problem that cannot be met (the baseline alone above a limit, an EV that cannot physically
get its energy) still has a plan: the one that breaks the limit least, and the schedule says by
how much (``envelope_excess_kw``, ``shortfall_kwh``). Nothing is ever silently dropped.

Power is in kW with the load convention (+ import / - export), energy in kWh, prices in currency
per kWh. Everything here is pure: no clock, no I/O; callers run it off the event loop
(``asyncio.to_thread``), since a day for a few thousand devices takes seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp  # type: ignore[import-untyped, unused-ignore]
from scipy.optimize import linprog  # type: ignore[import-untyped, unused-ignore]

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
AnyArray = np.ndarray[Any, Any]

ENVELOPE_PENALTY_PER_KWH = 10_000.0
"""Cost of one kWh (one kW for an hour) outside an envelope: above any price a plan may see."""
DEPARTURE_PENALTY_PER_KWH = 100.0
"""Cost of one kWh an EV leaves without: above any energy price, below an envelope's."""
DEFAULT_DEGRADATION_PER_KWH = 0.001
_TIE_BREAK = 1e-7
"""Per kWh and per step of delay: between equally cheap steps, charge the earlier one (an early
plan is the one a late arrival or a forecast error can least upset)."""


class ScheduleError(ValueError):
    """A problem that cannot be posed (wrong lengths, non-finite prices) or a solver failure."""


@dataclass(frozen=True, slots=True)
class BatteryPlan:
    """A battery as the scheduler sees it: ratings, efficiencies and its state now."""

    device_id: str
    capacity_kwh: float
    soc_kwh: float
    max_charge_kw: float
    max_discharge_kw: float
    reserve_kwh: float = 0.0
    max_kwh: float | None = None
    """Highest energy the customer allows (max SoC); None: the capacity."""
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95
    end_min_kwh: float | None = None
    """Energy the battery must hold at the horizon's end; None: what it holds now (clipped to
    its reserve and maximum), so a plan never sells energy it did not buy."""


@dataclass(frozen=True, slots=True)
class EvPlan:
    """A plugged-in (or expected) EV on a charger: its window and what the driver needs.

    ``arrival_step`` and ``departure_step`` count steps from the horizon's start; the EV charges
    in steps ``arrival_step <= t < departure_step``. A departure past the horizon is allowed:
    only what cannot be delivered after the horizon ends must be delivered within it.
    """

    device_id: str
    max_kw: float
    energy_needed_kwh: float
    departure_step: int
    arrival_step: int = 0
    min_kw: float = 0.0
    """Lowest rate a charger can hold while charging (e.g. 6 A); 0 or at least this."""
    v2g_kw: float = 0.0
    """Discharge rating when the EV and charger can export (V2G); 0: never discharges."""
    v2g_energy_kwh: float = 0.0
    """How far below its arrival energy a V2G EV may be drawn down within its window."""
    efficiency: float = 1.0
    """Energy the EV gets per kWh at the meter (the need is counted at the EV)."""


@dataclass(frozen=True, slots=True)
class GroupLimits:
    """A topology group's limits and uncontrolled load over the horizon.

    ``device_ids`` are the scheduled devices inside the group (a feeder's include its
    transformers'; that is how groups nest). Limit arrays hold ``inf`` (or NaN) where the group
    has no limit in a step.
    """

    group_id: str
    device_ids: frozenset[str]
    baseline_kw: FloatArray
    import_limit_kw: FloatArray | None = None
    export_limit_kw: FloatArray | None = None
    peak_threshold_kw: float | None = None
    peak_price_per_kw: float = 0.0
    """Demand charge on the group's largest net import above ``peak_threshold_kw``."""


@dataclass(frozen=True, slots=True)
class ScheduleProblem:
    step_s: float
    prices: FloatArray
    """Import price per kWh in each step."""
    batteries: Sequence[BatteryPlan] = ()
    evs: Sequence[EvPlan] = ()
    groups: Sequence[GroupLimits] = ()
    export_prices: FloatArray | None = None
    """Price paid per kWh exported (discharged) in each step; None: the import price."""
    degradation_per_kwh: float = DEFAULT_DEGRADATION_PER_KWH

    @property
    def steps(self) -> int:
        return len(self.prices)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A solved plan: ``setpoints_kw[i, t]`` for ``device_ids[i]`` (load convention)."""

    device_ids: tuple[str, ...]
    setpoints_kw: FloatArray
    energy_kwh: FloatArray
    """Stored energy at the end of each step (an EV's: delivered since the horizon's start)."""
    cost: float
    """Energy cost of the scheduled devices at the problem's prices."""
    unmanaged_cost: float
    """The same devices left alone: batteries idle, EVs at full rate from arrival until full."""
    unmanaged_kw: FloatArray
    shortfall_kwh: dict[str, float] = field(default_factory=dict)
    """EVs that will leave (or reach the horizon's end) short of their need, and by how much."""
    envelope_excess_kw: dict[str, FloatArray] = field(default_factory=dict)
    """Groups a plan cannot keep inside a limit (their baseline alone breaks it), per step."""
    message: str = ""

    def row(self, device_id: str) -> FloatArray:
        return np.asarray(self.setpoints_kw[self.device_ids.index(device_id)], dtype=np.float64)

    @property
    def saving(self) -> float:
        return self.unmanaged_cost - self.cost


def _per_step(values: FloatArray | None, n: int, name: str) -> FloatArray:
    if values is None:
        return np.full(n, np.inf)
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise ScheduleError(f"{name}: {arr.shape[0] if arr.ndim else 0} values for {n} steps")
    return np.where(np.isnan(arr), np.inf, arr)


def unmanaged_profile(problem: ScheduleProblem) -> FloatArray:
    """Each device's power left alone: a battery idles, an EV charges flat out until full."""
    n, dt = problem.steps, problem.step_s / 3600.0
    out = np.zeros((len(problem.batteries) + len(problem.evs), n))
    for k, ev in enumerate(problem.evs, start=len(problem.batteries)):
        left = ev.energy_needed_kwh
        for t in range(max(ev.arrival_step, 0), min(ev.departure_step, n)):
            if left <= 1e-9:
                break
            kw = min(ev.max_kw, left / (dt * ev.efficiency))
            out[k, t] = kw
            left -= kw * dt * ev.efficiency
    return out


def _solve_whole(
    problem: ScheduleProblem,
    *,
    time_limit_s: float | None,
    exact_min_rate: bool,
    pattern: AnyArray | None = None,
) -> Schedule:
    """One LP (or MILP) over every device and group of ``problem``.

    With ``exact_min_rate`` off, minimum charging rates are first relaxed to a plain bound
    ``0..max``; EVs whose rate then falls strictly between 0 and their minimum are repaired:
    the steps each keeps on are fixed (``pattern``), and the LP solved again (see
    :func:`_on_pattern`).
    """
    n = problem.steps
    if n == 0:
        raise ScheduleError("an empty horizon")
    if problem.step_s <= 0:
        raise ScheduleError("step_s must be positive")
    prices = np.asarray(problem.prices, dtype=np.float64)
    if not np.isfinite(prices).all():
        raise ScheduleError("prices must be finite")
    export_prices = (
        prices
        if problem.export_prices is None
        else np.asarray(problem.export_prices, dtype=np.float64)
    )
    if export_prices.shape != (n,) or not np.isfinite(export_prices).all():
        raise ScheduleError("export_prices must be finite, one per step")
    dt = problem.step_s / 3600.0
    bats, evs = list(problem.batteries), list(problem.evs)
    ids = tuple([b.device_id for b in bats] + [e.device_id for e in evs])
    if len(set(ids)) != len(ids):
        raise ScheduleError("a device is scheduled twice")
    index = {d: i for i, d in enumerate(ids)}
    n_dev = len(ids)

    # ------------------------------------------------------------------ per-device arrays
    eta_c = np.ones(n_dev)
    eta_d = np.ones(n_dev)
    init = np.zeros(n_dev)
    c_lb = np.zeros((n_dev, n))
    c_ub = np.zeros((n_dev, n))
    e_ub = np.zeros((n_dev, n))
    s_lb = np.zeros((n_dev, n))
    s_ub = np.zeros((n_dev, n))
    semi = np.zeros((n_dev, n), dtype=bool)
    for i, b in enumerate(bats):
        if not (0 < b.charge_efficiency <= 1 and 0 < b.discharge_efficiency <= 1):
            raise ScheduleError(f"{b.device_id}: efficiencies must be in (0, 1]")
        eta_c[i], eta_d[i] = b.charge_efficiency, b.discharge_efficiency
        top = b.capacity_kwh if b.max_kwh is None else min(b.max_kwh, b.capacity_kwh)
        init[i] = b.soc_kwh
        low, high = min(b.reserve_kwh, b.soc_kwh), max(top, b.soc_kwh)
        c_ub[i] = b.max_charge_kw
        e_ub[i] = b.max_discharge_kw
        s_lb[i], s_ub[i] = low, high
        end = min(max(b.soc_kwh, b.reserve_kwh), top) if b.end_min_kwh is None else b.end_min_kwh
        s_lb[i, -1] = max(low, min(end, high))
    departure_need: list[tuple[int, float]] = []
    for k, ev in enumerate(evs):
        i = len(bats) + k
        if not 0 < ev.efficiency <= 1:
            raise ScheduleError(f"{ev.device_id}: efficiency must be in (0, 1]")
        eta_c[i] = ev.efficiency
        window = slice(max(ev.arrival_step, 0), max(min(ev.departure_step, n), 0))
        c_ub[i, window] = ev.max_kw
        if ev.min_kw > 0:
            c_lb[i, window] = min(ev.min_kw, ev.max_kw)
            semi[i, window] = True
        e_ub[i, window] = ev.v2g_kw
        s_lb[i] = -ev.v2g_energy_kwh if ev.v2g_kw > 0 else 0.0
        s_ub[i] = ev.energy_needed_kwh
        after = max(ev.departure_step - max(n, ev.arrival_step), 0) * dt * ev.max_kw * eta_c[i]
        need = max(ev.energy_needed_kwh - after, 0.0) if ev.arrival_step < n else 0.0
        if need > 0:
            departure_need.append((i, need))

    # ------------------------------------------------------------------ variables
    # device block i: c = [3ni, 3ni+n), e = [3ni+n, 3ni+2n), s = [3ni+2n, 3ni+3n)
    base = 3 * n * n_dev
    n_short = len(departure_need)
    groups = list(problem.groups)
    g_imp = [_per_step(g.import_limit_kw, n, f"{g.group_id} import") for g in groups]
    g_exp = [_per_step(g.export_limit_kw, n, f"{g.group_id} export") for g in groups]
    g_base = []
    for g in groups:
        bl = np.asarray(g.baseline_kw, dtype=np.float64)
        if bl.shape != (n,) or not np.isfinite(bl).all():
            raise ScheduleError(f"{g.group_id}: baseline must be finite, one value per step")
        g_base.append(bl)
    slack_at: list[tuple[int, int, int]] = []  # (group, sign +1 import / -1 export, first var)
    n_vars = base + n_short
    for gi in range(len(groups)):
        if np.isfinite(g_imp[gi]).any():
            slack_at.append((gi, 1, n_vars))
            n_vars += n
        if np.isfinite(g_exp[gi]).any():
            slack_at.append((gi, -1, n_vars))
            n_vars += n
    peak_at: list[tuple[int, int]] = []
    for gi, g in enumerate(groups):
        if g.peak_threshold_kw is not None and g.peak_price_per_kw > 0:
            peak_at.append((gi, n_vars))
            n_vars += 1
    # Each group's net power is a variable of its own, summed from the groups nested in it and
    # its other devices: a feeder's rows then hold its transformers' sums, not every device's
    # power (a row over thousands of devices makes the solver's factorisations dense).
    member_sets: list[frozenset[int]] = []
    for g in groups:
        unknown = [d for d in g.device_ids if d not in index]
        if unknown:
            raise ScheduleError(f"{g.group_id}: devices not in the schedule: {sorted(unknown)[:5]}")
        member_sets.append(frozenset(index[d] for d in g.device_ids))
    agg_first = [n_vars + gi * n for gi in range(len(groups))]
    n_vars += len(groups) * n
    nesting: list[tuple[list[int], AnyArray]] = []  # per group: child groups, own devices
    by_size = sorted(range(len(groups)), key=lambda gi: (len(member_sets[gi]), gi))
    for rank, gi in enumerate(by_size):
        chosen: list[int] = []
        covered: set[int] = set()
        for ci in sorted(by_size[:rank], key=lambda c: -len(member_sets[c])):
            child = member_sets[ci]
            if child and child <= member_sets[gi] and not (child & covered):
                chosen.append(ci)
                covered |= child
        own = np.array(sorted(member_sets[gi] - covered), dtype=np.int64)
        nesting.append((chosen, own))
    nest_of = dict(zip(by_size, nesting, strict=True))

    steps = np.arange(n)
    dev = np.arange(n_dev)
    c_idx = (3 * n * dev)[:, None] + steps[None, :]
    e_idx = c_idx + n
    s_idx = c_idx + 2 * n

    cost = np.zeros(n_vars)
    tie = _TIE_BREAK * steps / max(n, 1)
    cost[c_idx] = dt * (prices + problem.degradation_per_kwh + tie)[None, :]
    cost[e_idx] = dt * (problem.degradation_per_kwh - export_prices)[None, :]
    cost[base : base + n_short] = DEPARTURE_PENALTY_PER_KWH
    for _gi, _sign, first in slack_at:
        cost[first : first + n] = ENVELOPE_PENALTY_PER_KWH * dt
    for gi, var in peak_at:
        cost[var] = groups[gi].peak_price_per_kw

    lb = np.zeros(n_vars)
    ub = np.full(n_vars, np.inf)
    lb[c_idx], ub[c_idx] = c_lb, c_ub
    for first in agg_first:
        lb[first : first + n] = -np.inf  # a group's net power: free, bound by its rows
    ub[e_idx] = e_ub
    lb[s_idx], ub[s_idx] = s_lb, s_ub
    # Semi-continuous charge rates keep lb = min rate ("0 or in [lb, ub]") only as integrality 2.
    integrality: FloatArray | None = None
    if semi.any() and exact_min_rate:
        integrality = np.zeros(n_vars)
        integrality[c_idx[semi]] = 2
    elif semi.any() and pattern is None:
        lb[c_idx[semi]] = 0.0  # the relaxation: 0..max
    elif semi.any() and pattern is not None:
        lb[c_idx[semi & ~pattern]] = 0.0
        ub[c_idx[semi & ~pattern]] = 0.0

    # ------------------------------------------------------------------ energy balance (equality)
    rows = (dev[:, None] * n + steps[None, :]).ravel()
    eq_r: list[AnyArray] = [rows, rows, rows]
    eq_c: list[AnyArray] = [s_idx.ravel(), c_idx.ravel(), e_idx.ravel()]
    eq_v: list[AnyArray] = [
        np.ones(n_dev * n),
        np.repeat(-dt * eta_c, n),
        np.repeat(dt / eta_d, n),
    ]
    if n > 1:
        prev_rows = (dev[:, None] * n + steps[None, 1:]).ravel()
        eq_r.append(prev_rows)
        eq_c.append(s_idx[:, :-1].ravel())
        eq_v.append(-np.ones(n_dev * (n - 1)))
    for gi in range(len(groups)):
        rows_at = n_dev * n + gi * n + steps
        children, own = nest_of[gi]
        eq_r.append(rows_at)
        eq_c.append(agg_first[gi] + steps)
        eq_v.append(np.ones(n))
        for ci in children:
            eq_r.append(rows_at)
            eq_c.append(agg_first[ci] + steps)
            eq_v.append(-np.ones(n))
        if len(own):
            r = np.tile(rows_at, len(own))
            eq_r += [r, r]
            eq_c += [c_idx[own].ravel(), e_idx[own].ravel()]
            eq_v += [-np.ones(r.shape), np.ones(r.shape)]
    n_eq = n_dev * n + len(groups) * n
    a_eq = sp.csr_matrix(
        (np.concatenate(eq_v), (np.concatenate(eq_r), np.concatenate(eq_c))),
        shape=(n_eq, n_vars),
    )
    b_eq = np.zeros(n_eq)
    b_eq[dev * n] = init

    # ------------------------------------------------------------------ inequalities
    ub_r: list[AnyArray] = []
    ub_c: list[AnyArray] = []
    ub_v: list[AnyArray] = []
    b_ub: list[FloatArray] = []
    n_rows = 0

    def add(r: AnyArray, c: AnyArray, v: AnyArray) -> None:
        ub_r.append(r)
        ub_c.append(c)
        ub_v.append(v)

    # departure: s[last] + short >= need  ->  -s[last] - short <= -need
    for k, (i, need) in enumerate(departure_need):
        add(np.array([n_rows, n_rows]), np.array([s_idx[i, -1], base + k]), np.array([-1.0, -1.0]))
        b_ub.append(np.array([-need]))
        n_rows += 1

    def net_rows(gi: int, sign: float, rows_at: AnyArray) -> None:
        add(rows_at, agg_first[gi] + steps, np.full(n, sign))

    for gi, sign, first in slack_at:
        rows_at = n_rows + steps
        net_rows(gi, float(sign), rows_at)
        add(rows_at, first + steps, -np.ones(n))
        rhs = g_imp[gi] - g_base[gi] if sign > 0 else g_exp[gi] + g_base[gi]
        b_ub.append(np.where(np.isfinite(rhs), rhs, 1e12))
        n_rows += n
    for gi, var in peak_at:
        rows_at = n_rows + steps
        net_rows(gi, 1.0, rows_at)
        add(rows_at, np.full(n, var), -np.ones(n))
        threshold = groups[gi].peak_threshold_kw
        assert threshold is not None
        b_ub.append(threshold - g_base[gi])
        n_rows += n

    a_ub = (
        sp.csr_matrix(
            (np.concatenate(ub_v), (np.concatenate(ub_r), np.concatenate(ub_c))),
            shape=(n_rows, n_vars),
        )
        if n_rows
        else None
    )
    options: dict[str, Any] = {"presolve": True}
    if time_limit_s is not None:
        options["time_limit"] = time_limit_s
    if integrality is not None:
        options["mip_rel_gap"] = 1e-4
    result = linprog(
        cost,
        A_ub=a_ub,
        b_ub=np.concatenate(b_ub) if n_rows else None,
        A_eq=a_eq,
        b_eq=b_eq,
        bounds=np.column_stack([lb, ub]),
        method="highs",
        integrality=integrality,
        options=options,
    )
    if result.x is None:
        raise ScheduleError(f"HiGHS found no plan: {result.message}")
    x = np.asarray(result.x, dtype=np.float64)
    if semi.any() and not exact_min_rate and pattern is None:
        on = _on_pattern(x[c_idx], c_lb, semi, dt)
        if on is not None:
            return _solve_whole(
                problem, time_limit_s=time_limit_s, exact_min_rate=False, pattern=on
            )
    setpoints = x[c_idx] - x[e_idx]
    setpoints[np.abs(setpoints) < 1e-9] = 0.0
    energy = x[s_idx]
    managed_cost = float(dt * ((x[c_idx] * prices).sum() - (x[e_idx] * export_prices).sum()))
    unmanaged = unmanaged_profile(problem)
    unmanaged_cost = float(dt * (np.clip(unmanaged, 0, None) * prices).sum())
    shortfall = {
        ids[i]: float(x[base + k]) for k, (i, _need) in enumerate(departure_need)
        if x[base + k] > 1e-6
    }
    excess: dict[str, FloatArray] = {}
    for gi, _sign, first in slack_at:
        over = x[first : first + n]
        if (over > 1e-6).any():
            gid = groups[gi].group_id
            excess[gid] = excess.get(gid, np.zeros(n)) + np.where(over > 1e-6, over, 0.0)
    return Schedule(
        device_ids=ids,
        setpoints_kw=setpoints,
        energy_kwh=energy,
        cost=managed_cost,
        unmanaged_cost=unmanaged_cost,
        unmanaged_kw=unmanaged,
        shortfall_kwh=shortfall,
        envelope_excess_kw=excess,
        message=str(result.message),
    )


def _on_pattern(c: FloatArray, c_min: FloatArray, semi: AnyArray, dt: float) -> AnyArray | None:
    """The steps each EV charges in, from a relaxed plan with rates below their minimum.

    Steps at or above the minimum stay on; of an EV's steps strictly between 0 and its minimum,
    the ``floor(energy / minimum)`` steps the plan liked most (highest rate) are turned on and
    the rest off. With the on-steps fixed, the LP re-solved can still deliver at least the
    same energy up to one step at the minimum (the on-steps rise above their minimum where
    there is room), never more than the need (the fixed minimums add up to no more than the
    relaxed plan delivered), and no rate can fall below the minimum again. None: no repair
    needed.
    """
    eps = 1e-6
    frac = semi & (c > eps) & (c < c_min - eps)
    if not frac.any():
        return None
    on: AnyArray = semi & (c >= c_min - eps)
    for i in np.unique(np.nonzero(frac)[0]):
        cells = np.nonzero(frac[i])[0]
        k = int(np.floor(c[i, cells].sum() / c_min[i, cells[0]] + 1e-9))
        if k:
            on[i, cells[np.argsort(-c[i, cells], kind="stable")[:k]]] = True
    return on


EXACT_MIN_RATE_MAX_EVS = 24
"""Up to this many EVs with a minimum charging rate, the MILP is solved exactly by default;
above it, the LP relaxation with a repair (a MILP at 1,000 EVs takes minutes)."""
_COUPLING_ROUNDS = 8
_COUPLING_TOL_KW = 1e-6


def _coupling_groups(groups: Sequence[GroupLimits]) -> set[int]:
    """Groups that hold two or more groups side by side (a feeder of transformers), or hold
    such a group: the limits that couple otherwise independent parts of the problem."""
    order = sorted(range(len(groups)), key=lambda g: (len(groups[g].device_ids), g))
    coupling: set[int] = set()
    for rank, gi in enumerate(order):
        mine = groups[gi].device_ids
        inner = [ci for ci in order[:rank] if groups[ci].device_ids < mine]
        if not inner:
            continue
        if any(ci in coupling for ci in inner):
            coupling.add(gi)
            continue
        biggest = groups[max(inner, key=lambda ci: len(groups[ci].device_ids))].device_ids
        if any(not groups[ci].device_ids <= biggest for ci in inner):
            coupling.add(gi)
    return coupling


def _components(
    ids: Sequence[str], groups: Sequence[GroupLimits], skip: set[int]
) -> list[list[str]]:
    """Devices joined by the groups not in ``skip``; the devices in none form one more part."""
    parent = {d: d for d in ids}

    def find(d: str) -> str:
        while parent[d] != d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    grouped: set[str] = set()
    for gi, g in enumerate(groups):
        if gi in skip or not g.device_ids:
            continue
        members = [d for d in g.device_ids if d in parent]
        grouped.update(members)
        root = find(members[0]) if members else ""
        for d in members[1:]:
            other = find(d)
            if other != root:
                parent[other] = root
    parts: dict[str, list[str]] = {}
    for d in ids:
        parts.setdefault(find(d) if d in grouped else "", []).append(d)
    return list(parts.values())


def solve_schedule(
    problem: ScheduleProblem,
    *,
    time_limit_s: float | None = None,
    exact_min_rate: bool | None = None,
    decompose: bool = True,
) -> Schedule:
    """Plan every device over the horizon (see the module docstring for the model).

    ``exact_min_rate``: solve EV minimum rates as the MILP (True), as the LP relaxation with a
    repair (False), or by size (None: exact up to :data:`EXACT_MIN_RATE_MAX_EVS` such EVs).

    ``decompose``: where groups couple otherwise independent parts (a feeder's transformers),
    each part is solved alone under its own limits, and the coupling limits checked on the sum.
    Where a coupling limit would be exceeded, its room (limit minus baseline) at those steps is
    shared among the parts in proportion to their planned draw there, and the parts solved
    again with their shares as limits, until no coupling limit is exceeded (at most a few
    rounds; what still is, is reported in ``envelope_excess_kw``). The plan is then optimal
    when no coupling limit binds, and feasible but not always optimal when one does. A
    coupling group with a demand charge is solved whole.
    """
    if exact_min_rate is None:
        with_min = sum(1 for ev in problem.evs if ev.min_kw > 0)
        exact_min_rate = with_min <= EXACT_MIN_RATE_MAX_EVS
    groups = list(problem.groups)
    coupling = _coupling_groups(groups) if decompose else set()
    if any(
        groups[gi].peak_threshold_kw is not None and groups[gi].peak_price_per_kw > 0
        for gi in coupling
    ):
        coupling = set()
    ids = [b.device_id for b in problem.batteries] + [e.device_id for e in problem.evs]
    known = set(ids)
    for g in groups:
        unknown = g.device_ids - known
        if unknown:
            raise ScheduleError(f"{g.group_id}: devices not in the schedule: {sorted(unknown)[:5]}")
    parts = _components(ids, groups, coupling) if coupling else [ids]
    if len(parts) <= 1:
        return _solve_whole(problem, time_limit_s=time_limit_s, exact_min_rate=exact_min_rate)
    return _solve_parts(problem, parts, coupling, time_limit_s, exact_min_rate)


def _solve_parts(
    problem: ScheduleProblem,
    parts: list[list[str]],
    coupling: set[int],
    time_limit_s: float | None,
    exact_min_rate: bool,
) -> Schedule:
    import time

    n = problem.steps
    if n == 0:
        raise ScheduleError("an empty horizon")
    dt = problem.step_s / 3600.0
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    groups = list(problem.groups)
    bat_of = {b.device_id: b for b in problem.batteries}
    ev_of = {e.device_id: e for e in problem.evs}
    if len(bat_of) + len(ev_of) != len(problem.batteries) + len(problem.evs):
        raise ScheduleError("a device is scheduled twice")
    part_sets = [frozenset(p) for p in parts]
    own_groups = [
        [g for gi, g in enumerate(groups) if gi not in coupling and g.device_ids <= ps]
        for ps in part_sets
    ]
    imp = {gi: _per_step(groups[gi].import_limit_kw, n, f"{groups[gi].group_id} import")
           for gi in coupling}
    exp = {gi: _per_step(groups[gi].export_limit_kw, n, f"{groups[gi].group_id} export")
           for gi in coupling}
    base = {}
    for gi in coupling:
        bl = np.asarray(groups[gi].baseline_kw, dtype=np.float64)
        if bl.shape != (n,) or not np.isfinite(bl).all():
            raise ScheduleError(
                f"{groups[gi].group_id}: baseline must be finite, one value per step"
            )
        base[gi] = bl
    # shares[(gi, part)] = [import cap, export cap] of that part's devices in group gi
    shares: dict[tuple[int, int], list[FloatArray]] = {}
    results: list[Schedule | None] = [None] * len(parts)
    dirty = set(range(len(parts)))
    draw: dict[tuple[int, int], FloatArray] = {}
    capped: set[tuple[int, int, int]] = set()
    rating: dict[tuple[int, int], tuple[float, float]] = {}
    for gi in coupling:
        for pi, ps in enumerate(part_sets):
            inner = groups[gi].device_ids & ps
            rating[gi, pi] = (
                sum(bat_of[d].max_charge_kw if d in bat_of else ev_of[d].max_kw for d in inner),
                sum(bat_of[d].max_discharge_kw if d in bat_of else ev_of[d].v2g_kw for d in inner),
            )
    messages: list[str] = []
    for _round in range(_COUPLING_ROUNDS):
        for pi in sorted(dirty):
            extra = [
                GroupLimits(
                    f"{groups[gi].group_id}#share",
                    groups[gi].device_ids & part_sets[pi],
                    np.zeros(n),
                    import_limit_kw=cap[0],
                    export_limit_kw=cap[1],
                )
                for (gi, pj), cap in shares.items()
                if pj == pi
            ]
            sub = ScheduleProblem(
                step_s=problem.step_s,
                prices=problem.prices,
                batteries=[bat_of[d] for d in parts[pi] if d in bat_of],
                evs=[ev_of[d] for d in parts[pi] if d in ev_of],
                groups=own_groups[pi] + extra,
                export_prices=problem.export_prices,
                degradation_per_kwh=problem.degradation_per_kwh,
            )
            left = None if deadline is None else max(deadline - time.monotonic(), 1.0)
            res = _solve_whole(sub, time_limit_s=left, exact_min_rate=exact_min_rate)
            results[pi] = res
            for gi in coupling:
                rows = [k for k, d in enumerate(res.device_ids) if d in groups[gi].device_ids]
                draw[gi, pi] = (
                    res.setpoints_kw[rows].sum(axis=0) if rows else np.zeros(n)
                )
        dirty = set()
        for gi in coupling:
            total = sum((draw[gi, pi] for pi in range(len(parts))), np.zeros(n))
            room_imp = imp[gi] - base[gi]
            room_exp = -exp[gi] - base[gi]  # devices' sum must stay at or above this
            over = np.nonzero(total > room_imp + _COUPLING_TOL_KW)[0]
            under = np.nonzero(total < room_exp - _COUPLING_TOL_KW)[0]
            inside = [pi for pi in range(len(parts)) if groups[gi].device_ids & part_sets[pi]]
            for side, found in ((0, over), (1, under)):
                if not len(found):
                    continue
                sign = 1.0 if side == 0 else -1.0
                room = room_imp if side == 0 else -room_exp
                first = all((gi, pi, side) not in capped for pi in inside)
                # A limit found binding is shared at every step, not only where it was
                # exceeded (else the parts move their draw to the next steps, and the next
                # round finds those exceeded): where it was, each part's draw is cut in
                # proportion to it; elsewhere the room left is shared by the parts' ratings.
                for t in np.arange(n) if first else found:
                    mine = np.array([sign * draw[gi, pi][t] for pi in inside])
                    free = room[t] - mine.sum()
                    weight = (
                        np.clip(mine, 0, None)
                        if np.isfinite(free) and free < 0
                        else np.array([rating[gi, pi][side] for pi in inside])
                    )
                    weight = (
                        weight / weight.sum()
                        if weight.sum() > 0
                        else np.full(len(inside), 1 / len(inside))
                    )
                    for k, pi in enumerate(inside):
                        cap = shares.setdefault((gi, pi), [np.full(n, np.inf) for _ in (0, 1)])
                        cap[side][t] = mine[k] + free * weight[k] if np.isfinite(free) else np.inf
                        capped.add((gi, pi, side))
                        dirty.add(pi)
        if not dirty:
            break
    solved = [r for r in results if r is not None]
    order = {d: i for i, d in enumerate(
        [b.device_id for b in problem.batteries] + [e.device_id for e in problem.evs]
    )}
    ids = tuple(order)
    setpoints = np.zeros((len(ids), n))
    energy = np.zeros((len(ids), n))
    shortfall: dict[str, float] = {}
    excess: dict[str, FloatArray] = {}
    for res in solved:
        rows = [order[d] for d in res.device_ids]
        setpoints[rows] = res.setpoints_kw
        energy[rows] = res.energy_kwh
        shortfall.update(res.shortfall_kwh)
        for gid, over_kw in res.envelope_excess_kw.items():
            if not gid.endswith("#share"):
                excess[gid] = excess.get(gid, np.zeros(n)) + over_kw
        if res.message not in messages:
            messages.append(res.message)
    for gi in coupling:
        net = group_net_kw(setpoints, ids, groups[gi])
        out = np.clip(net - imp[gi], 0, None) + np.clip(-exp[gi] - net, 0, None)
        out = np.where(np.isfinite(out) & (out > _COUPLING_TOL_KW), out, 0.0)
        if out.any():
            gid = groups[gi].group_id
            excess[gid] = excess.get(gid, np.zeros(n)) + out
    prices = np.asarray(problem.prices, dtype=np.float64)
    export_prices = (
        prices if problem.export_prices is None
        else np.asarray(problem.export_prices, dtype=np.float64)
    )
    cost = float(dt * (np.clip(setpoints, 0, None) * prices
                       + np.clip(setpoints, None, 0) * export_prices).sum())
    unmanaged = unmanaged_profile(problem)
    return Schedule(
        device_ids=ids,
        setpoints_kw=setpoints,
        energy_kwh=energy,
        cost=cost,
        unmanaged_cost=float(dt * (np.clip(unmanaged, 0, None) * prices).sum()),
        unmanaged_kw=unmanaged,
        shortfall_kwh=shortfall,
        envelope_excess_kw=excess,
        message=f"{len(parts)} parts, {_round + 1} rounds: " + "; ".join(messages),
    )


def group_net_kw(schedule_kw: FloatArray, ids: Sequence[str], group: GroupLimits) -> FloatArray:
    """A group's net power per step for a plan (``schedule_kw`` rows in ``ids`` order)."""
    rows = [i for i, d in enumerate(ids) if d in group.device_ids]
    total = schedule_kw[rows].sum(axis=0) if rows else np.zeros(schedule_kw.shape[1])
    return np.asarray(group.baseline_kw, dtype=np.float64) + total
