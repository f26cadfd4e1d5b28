"""Automated grid services: a day of price-driven schedules for 1,000 EVs and 1,000 batteries.

One feeder of ``--transformers`` transformers (EVs and batteries spread evenly), a residential
baseline with an evening peak, a day of prices with an evening peak (cheap midday and night),
import limits on the feeder and on every transformer and an export limit on the feeder. The
horizon runs from 12:00 to 12:00 the next day in 15-min steps; every EV plugs in between 14:00
and 22:00 and leaves between 05:00 and 09:00 with its need. Four ways to run the same day, all
executed by the same step-by-step simulation (battery SoC physics, EVs charge only while
plugged in and never past their need, and the gateway's real-time envelope stage, which cuts
charging — then discharges batteries — in any group its limit would see exceeded, and counts
each such intervention):

* **unmanaged**: EVs charge flat out from plug-in, batteries idle; no envelope stage (the
  counterfactual without a DERMS);
* **greedy**: each device alone, cheapest hours first (an EV its need in the cheapest steps of
  its window; a battery charges in the cheapest and discharges in the dearest steps), the
  envelope checked only after, by the real-time stage;
* **rolling**: ours — :func:`gateway.services.schedule.solve_schedule` re-solved every
  ``--replan-every`` steps from the states measured then, over the rest of the day, on a
  baseline forecast with errors (growing with lead time) and on forecast arrivals (EVs not yet
  plugged in, each kept with probability 0.9, arrival shifted and need scaled at random, plus
  10 % phantoms); an EV that plugs in between re-plans waits for the next one; limits planned
  with a ``--margin`` below them;
* **offline**: one LP over the day with perfect foresight (the limit no online plan can beat).

Costs are the devices' energy at the day's prices, with each battery's end-of-day energy
change valued at the day's mean price (a plan that ends emptier sold energy it did not buy).

    python -m bench.grid_services [--evs 1000] [--batteries 1000] [--transformers 20] [--only ...]
        [--replan-every 4] [--margin 0.04] [--seed 7] [--json FILE] [--whole]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.common import arg_parser, machine_summary
from gateway.services.schedule import (
    BatteryPlan,
    EvPlan,
    GroupLimits,
    ScheduleProblem,
    solve_schedule,
)

STEP_S = 900
N = 96
DT = STEP_S / 3600.0
START_HOUR = 12.0
DECOMPOSE = True
"""Solve per transformer (``--whole``: one LP over the feeder, as before)."""


def hours() -> np.ndarray[Any, Any]:
    return (START_HOUR + DT * np.arange(N)) % 24


def day_prices(rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """$/kWh: cheap solar midday, a steep 17-21 h peak, cheap night, a morning shoulder."""
    h = hours()
    p = 0.11 + 0.30 * np.exp(-(((h - 19.0) / 1.6) ** 2))
    p -= 0.05 * np.exp(-(((h - 13.0) / 2.0) ** 2))
    p -= 0.04 * np.exp(-((((h - 3.5) % 24 - 0) / 2.5) ** 2)) + 0.03 * ((h >= 0) & (h < 6))
    p += 0.06 * np.exp(-(((h - 7.5) / 1.2) ** 2))
    return np.round(p + rng.normal(0, 0.004, N), 4)


def residential_baseline(homes: float, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """kW: ~1 kW a home at night, ~2.6 kW at the evening peak."""
    h = hours()
    per_home = 1.0 + 1.6 * np.exp(-(((h - 19.0) / 2.5) ** 2))
    per_home += 0.4 * np.exp(-(((h - 8) / 1.5) ** 2))
    return np.asarray(homes * per_home * (1 + rng.normal(0, 0.01, N)))


@dataclass
class Fleet:
    bats: list[BatteryPlan]
    evs: list[EvPlan]
    bat_tx: np.ndarray[Any, Any]
    ev_tx: np.ndarray[Any, Any]
    tx_base: np.ndarray[Any, Any]  # (transformers, N) true baseline
    tx_limit: float
    feeder_limit: float
    feeder_export: float
    prices: np.ndarray[Any, Any]


def build(n_evs: int, n_bats: int, n_tx: int, rng: np.random.Generator) -> Fleet:
    bats = [
        BatteryPlan(
            f"bat{i}",
            capacity_kwh=13.5,
            soc_kwh=float(rng.uniform(4.0, 9.0)),
            max_charge_kw=5.0,
            max_discharge_kw=5.0,
            reserve_kwh=2.7,
        )
        for i in range(n_bats)
    ]
    evs = []
    for i in range(n_evs):
        arrival_h = float(np.clip(rng.normal(18.0, 1.6), 14.0, 22.0))
        departure_h = float(np.clip(rng.normal(7.0, 0.9), 5.0, 9.0)) + 24.0
        arrival = round((arrival_h - START_HOUR) / DT)
        departure = round((departure_h - START_HOUR) / DT)
        max_kw = float(rng.choice([7.2, 7.2, 11.0, 3.7]))
        window_kwh = (departure - arrival) * DT * max_kw
        need = float(min(rng.uniform(6.0, 40.0), 0.8 * window_kwh))
        evs.append(EvPlan(f"ev{i}", max_kw, need, departure, arrival_step=arrival))
    homes_per_tx = 60.0
    tx_base = np.stack([residential_baseline(homes_per_tx, rng) for _ in range(n_tx)])
    feeder_peak = tx_base.sum(axis=0).max()
    return Fleet(
        bats=bats,
        evs=evs,
        bat_tx=np.arange(n_bats) % n_tx,
        ev_tx=np.arange(n_evs) % n_tx,
        tx_base=tx_base,
        # A transformer has ~40 % headroom over its evening peak; the feeder a little less:
        # enough for every EV by morning, not for every EV at plug-in or at the cheapest hour.
        tx_limit=float(tx_base.max() * 1.4),
        feeder_limit=float(feeder_peak * 1.25),
        feeder_export=float(0.25 * feeder_peak),
        prices=day_prices(rng),
    )


# ----------------------------------------------------------------------------- execution


@dataclass
class Outcome:
    cost: float
    interventions: int
    violations: int
    delivered_pct: float
    feeder_peak_kw: float
    solve_s: list[float]


def execute(
    fleet: Fleet, plan_at: Any, *, enforce: bool = True
) -> Outcome:
    """Step through the day: ``plan_at(t, soc, delivered, plugged)`` gives every device's wanted
    kW at step t (batteries then EVs); physics and the envelope stage make it real."""
    nb, ne = len(fleet.bats), len(fleet.evs)
    n_tx = fleet.tx_base.shape[0]
    soc = np.array([b.soc_kwh for b in fleet.bats])
    soc0 = soc.copy()
    cap = np.array([b.capacity_kwh for b in fleet.bats])
    reserve = np.array([b.reserve_kwh for b in fleet.bats])
    bmax_c = np.array([b.max_charge_kw for b in fleet.bats])
    bmax_d = np.array([b.max_discharge_kw for b in fleet.bats])
    eta = 0.95
    need = np.array([e.energy_needed_kwh for e in fleet.evs])
    emax = np.array([e.max_kw for e in fleet.evs])
    arr = np.array([e.arrival_step for e in fleet.evs])
    dep = np.array([e.departure_step for e in fleet.evs])
    delivered = np.zeros(ne)
    cost = 0.0
    interventions = violations = 0
    peak = 0.0
    tx_of = np.concatenate([fleet.bat_tx, fleet.ev_tx])
    for t in range(N):
        plugged = (arr <= t) & (t < dep)
        want = np.asarray(plan_at(t, soc.copy(), delivered.copy(), plugged), dtype=np.float64)
        kw = want.copy()
        # physics: ratings, SoC bounds, EVs only while plugged in and never past their need
        b = kw[:nb]
        b = np.clip(b, -bmax_d, bmax_c)
        b = np.minimum(b, np.maximum(cap - soc, 0) / (DT * eta))
        b = np.maximum(b, -np.maximum(soc - np.minimum(reserve, soc), 0) * eta / DT)
        e = np.where(plugged, np.clip(kw[nb:], 0, emax), 0.0)
        e = np.minimum(e, np.maximum(need - delivered, 0) / DT)
        kw = np.concatenate([b, e])
        if enforce:
            kw, acted = envelope_stage(fleet, t, kw, tx_of, soc, reserve, bmax_d)
            interventions += acted
        tx_net = fleet.tx_base[:, t] + np.bincount(tx_of, weights=kw, minlength=n_tx)
        feeder = tx_net.sum()
        violations += int((tx_net > fleet.tx_limit + 1e-6).sum())
        outside = feeder > fleet.feeder_limit + 1e-6 or feeder < -fleet.feeder_export - 1e-6
        violations += int(outside)
        peak = max(peak, float(feeder))
        b, e = kw[:nb], kw[nb:]
        soc = soc + DT * np.where(b > 0, b * eta, b / eta)
        delivered = delivered + DT * e
        cost += DT * fleet.prices[t] * kw.sum()
    cost -= float((soc - soc0).sum() * fleet.prices.mean())
    return Outcome(
        cost=cost,
        interventions=interventions,
        violations=violations,
        delivered_pct=100.0 * float(np.minimum(delivered, need).sum() / need.sum()),
        feeder_peak_kw=peak,
        solve_s=[],
    )


def envelope_stage(
    fleet: Fleet,
    t: int,
    kw: np.ndarray[Any, Any],
    tx_of: np.ndarray[Any, Any],
    soc: np.ndarray[Any, Any],
    reserve: np.ndarray[Any, Any],
    bmax_d: np.ndarray[Any, Any],
) -> tuple[np.ndarray[Any, Any], int]:
    """The gateway's real-time stage on true load: cut charging, then discharge batteries, in
    each transformer and then the feeder over its limit; cut discharge under the export limit."""
    nb = len(fleet.bats)
    kw = kw.copy()
    acted = 0
    max_dis = -np.maximum(soc - reserve, 0) * 0.95 / DT
    floor = np.concatenate([np.maximum(max_dis, -bmax_d), np.zeros(len(kw) - nb)])
    groups = [(tx_of == k, fleet.tx_base[k, t], fleet.tx_limit) for k in range(len(fleet.tx_base))]
    groups.append((np.ones(len(kw), dtype=bool), fleet.tx_base[:, t].sum(), fleet.feeder_limit))
    for members, base, limit in groups:
        over = base + kw[members].sum() - limit
        if over <= 1e-6:
            continue
        acted += 1
        pos = np.where(members, np.maximum(kw, 0), 0.0)
        cut = min(over, pos.sum())
        if pos.sum() > 0:
            kw -= pos * (cut / pos.sum())
        over -= cut
        room = np.where(members, np.minimum(kw, 0) - floor, 0.0)
        room = np.maximum(room, 0)
        if over > 1e-9 and room.sum() > 0:
            kw -= room * min(1.0, over / room.sum())
    feeder = fleet.tx_base[:, t].sum() + kw.sum()
    if feeder < -fleet.feeder_export - 1e-6:  # a plan that sits on the limit is not over it
        acted += 1
        neg = np.minimum(kw, 0)
        kw -= neg * min(1.0, (-fleet.feeder_export - feeder) / neg.sum())
    return kw, acted


# ----------------------------------------------------------------------------- strategies


def unmanaged(fleet: Fleet) -> Outcome:
    nb = len(fleet.bats)
    emax = np.array([e.max_kw for e in fleet.evs])

    def plan_at(t: int, soc: Any, delivered: Any, plugged: Any) -> Any:
        return np.concatenate([np.zeros(nb), np.where(plugged, emax, 0.0)])

    return execute(fleet, plan_at, enforce=False)


def greedy(fleet: Fleet) -> Outcome:
    nb, ne = len(fleet.bats), len(fleet.evs)
    plan = np.zeros((nb + ne, N))
    order = np.argsort(fleet.prices, kind="stable")
    for i, b in enumerate(fleet.bats):
        k = int(np.ceil((b.capacity_kwh - b.reserve_kwh) / (b.max_charge_kw * DT)))
        plan[i, order[:k]] = b.max_charge_kw
        plan[i, order[::-1][:k]] = -b.max_discharge_kw
    for j, ev in enumerate(fleet.evs):
        left = ev.energy_needed_kwh
        for t in order:
            if ev.arrival_step <= t < ev.departure_step and left > 1e-9:
                plan[nb + j, t] = min(ev.max_kw, left / DT)
                left -= plan[nb + j, t] * DT
    return execute(fleet, lambda t, *_: plan[:, t])


def problem_for(
    fleet: Fleet,
    t0: int,
    soc: np.ndarray[Any, Any],
    evs: list[EvPlan],
    tx_base: np.ndarray[Any, Any],
    margin: float,
) -> ScheduleProblem:
    n = N - t0
    bats = [
        BatteryPlan(
            b.device_id,
            b.capacity_kwh,
            float(soc[i]),
            b.max_charge_kw,
            b.max_discharge_kw,
            reserve_kwh=b.reserve_kwh,
            end_min_kwh=min(max(fleet.bats[i].soc_kwh, b.reserve_kwh), b.capacity_kwh),
        )
        for i, b in enumerate(fleet.bats)
    ]
    ev_tx = {ev.device_id: fleet.ev_tx[int(ev.device_id.split("#")[0][2:])] for ev in evs}
    groups = []
    for k in range(tx_base.shape[0]):
        members = frozenset(
            [b.device_id for i, b in enumerate(bats) if fleet.bat_tx[i] == k]
            + [ev.device_id for ev in evs if ev_tx[ev.device_id] == k]
        )
        groups.append(
            GroupLimits(
                f"transformer:t{k}",
                members,
                tx_base[k, t0:],
                import_limit_kw=np.full(n, fleet.tx_limit * (1 - margin)),
            )
        )
    groups.append(
        GroupLimits(
            "feeder:f1",
            frozenset(b.device_id for b in bats) | frozenset(ev.device_id for ev in evs),
            tx_base[:, t0:].sum(axis=0),
            import_limit_kw=np.full(n, fleet.feeder_limit * (1 - margin)),
            export_limit_kw=np.full(n, fleet.feeder_export * (1 - margin)),
        )
    )
    return ScheduleProblem(
        step_s=STEP_S, prices=fleet.prices[t0:], batteries=bats, evs=evs, groups=groups
    )


def offline(fleet: Fleet) -> Outcome:
    soc = np.array([b.soc_kwh for b in fleet.bats])
    began = time.perf_counter()
    plan = solve_schedule(
        problem_for(fleet, 0, soc, list(fleet.evs), fleet.tx_base, 0.0), decompose=DECOMPOSE
    )
    took = time.perf_counter() - began
    out = execute(fleet, lambda t, *_: plan.setpoints_kw[:, t])
    out.solve_s = [took]
    return out


def rolling(fleet: Fleet, every: int, margin: float, rng: np.random.Generator) -> Outcome:
    nb = len(fleet.bats)
    # One forecast per re-plan: baseline error growing with lead time (1 % → 6 % sd, AR(1)),
    # and the not-yet-arrived EVs as forecast (kept with p 0.9, shifted, need scaled; phantoms).
    plan = np.zeros((nb + len(fleet.evs), N))
    solve_s: list[float] = []
    current: dict[int, np.ndarray[Any, Any]] = {}

    def replan(t: int, soc: Any, delivered: Any, plugged: Any) -> None:
        lead = np.arange(N - t)
        sd = 0.01 + 0.05 * np.minimum(lead / 32.0, 1.0)
        shocks = rng.normal(0, 1, (fleet.tx_base.shape[0], N - t))
        ar = np.zeros_like(shocks)
        for k in range(N - t):
            ar[:, k] = (0.8 * ar[:, k - 1] if k else 0) + 0.6 * shocks[:, k]
        base = fleet.tx_base.copy()
        base[:, t:] = fleet.tx_base[:, t:] * (1 + sd * ar)
        evs: list[EvPlan] = []
        for j, ev in enumerate(fleet.evs):
            if plugged[j]:
                left = max(ev.energy_needed_kwh - float(delivered[j]), 0.0)
                evs.append(EvPlan(ev.device_id, ev.max_kw, left, ev.departure_step - t))
            elif ev.arrival_step > t and rng.random() < 0.9:
                shift = int(rng.integers(-2, 3))
                arrival = max(ev.arrival_step + shift, t + 1) - t
                need = ev.energy_needed_kwh * float(rng.uniform(0.8, 1.2))
                evs.append(
                    EvPlan(
                        f"{ev.device_id}#f", ev.max_kw, need, ev.departure_step - t,
                        arrival_step=arrival,
                    )
                )
        for j in rng.choice(len(fleet.evs), size=len(fleet.evs) // 10, replace=False):
            ev = fleet.evs[j]
            if ev.arrival_step > t:
                evs.append(
                    EvPlan(
                        f"{ev.device_id}#p", ev.max_kw, ev.energy_needed_kwh,
                        ev.departure_step - t, arrival_step=ev.arrival_step - t,
                    )
                )
        began = time.perf_counter()
        sched = solve_schedule(problem_for(fleet, t, soc, evs, base, margin), decompose=DECOMPOSE)
        solve_s.append(time.perf_counter() - began)
        plan[:, t:] = 0.0
        plan[:nb, t:] = sched.setpoints_kw[:nb]
        row = {d: i for i, d in enumerate(sched.device_ids)}
        for j, ev in enumerate(fleet.evs):
            if ev.device_id in row:  # plugged in now; forecast EVs get their plan at a re-plan
                plan[nb + j, t:] = sched.setpoints_kw[row[ev.device_id]]
        current[t] = sched.setpoints_kw

    def plan_at(t: int, soc: Any, delivered: Any, plugged: Any) -> Any:
        if t % every == 0:
            replan(t, soc, delivered, plugged)
            print(f"  re-plan at step {t}: {solve_s[-1]:.1f} s", file=sys.stderr, flush=True)
        return plan[:, t]

    out = execute(fleet, plan_at)
    out.solve_s = solve_s
    return out


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser("bench.grid_services", __doc__)
    parser.add_argument("--evs", type=int, default=1000)
    parser.add_argument("--batteries", type=int, default=1000)
    parser.add_argument("--transformers", type=int, default=20)
    parser.add_argument("--replan-every", type=int, default=4)
    parser.add_argument("--margin", type=float, default=0.04)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--only", default="unmanaged,greedy,offline,rolling", help="strategies to run, in order"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--whole", action="store_true", help="one LP over the feeder, not per transformer"
    )
    args = parser.parse_args(argv)
    global DECOMPOSE  # noqa: PLW0603 (one run, one setting)
    DECOMPOSE = not args.whole
    rng = np.random.default_rng(args.seed)
    fleet = build(args.evs, args.batteries, args.transformers, rng)
    print(machine_summary())
    print(
        f"{args.evs} EVs, {args.batteries} batteries, {args.transformers} transformers; "
        f"limits: transformer {fleet.tx_limit:.0f} kW, feeder import {fleet.feeder_limit:.0f} kW,"
        f" export {fleet.feeder_export:.0f} kW; prices {fleet.prices.min():.3f}–"
        f"{fleet.prices.max():.3f} $/kWh; EV need {sum(e.energy_needed_kwh for e in fleet.evs):.0f}"
        " kWh"
    )
    runs = {
        "unmanaged": lambda: unmanaged(fleet),
        "greedy": lambda: greedy(fleet),
        "offline": lambda: offline(fleet),
        "rolling": lambda: rolling(
            fleet, args.replan_every, args.margin, np.random.default_rng(args.seed)
        ),
    }
    results = {}
    for name in ["unmanaged", *[n for n in args.only.split(",") if n != "unmanaged"]]:
        began = time.perf_counter()
        results[name] = runs[name]()
        print(f"  {name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    ref = results["unmanaged"].cost
    best = ref - results["offline"].cost if "offline" in results else float("nan")
    print(
        "\n| strategy | energy cost $ | saved vs unmanaged $ (share of the offline optimum's)"
        " | envelope stage interventions | "
        "violations after it | departure energy delivered | feeder peak kW | solve s p50 / p95 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, out in results.items():
        solve = (
            f"{np.percentile(out.solve_s, 50):.1f} / {np.percentile(out.solve_s, 95):.1f}"
            f" ({len(out.solve_s)})"
            if out.solve_s
            else "–"
        )
        print(
            f"| {name} | {out.cost:,.0f} | {ref - out.cost:,.0f}"
            f" ({100 * (ref - out.cost) / best:.0f} %) | "
            f"{out.interventions} | {out.violations} | {out.delivered_pct:.2f} % | "
            f"{out.feeder_peak_kw:,.0f} | {solve} |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({k: vars(v) for k, v in results.items()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
