"""Dispatch delivery against the counterfactual: closed loop vs open loop, same run, same seed.

The gateway's own control path (planner, closed loop, thermostat offset mapping, staggered
release) over the in-process fleet of :mod:`simulators.vpp` (house and battery physics, noisy
readings, dropouts). Each scenario runs without the command (the counterfactual) and with it,
closed loop (the gateway as configured: the release after the event paced on the measured
rebound), open loop (``closed_loop = false``, every house released at the end at once: what the
gateway did before the loop), and closed loop with the release on a fixed one-hour schedule
instead (what it did before the release governor); delivered = with − without.

Scenarios: a 10,000-house thermostat-only fleet and a 10,000-device mixed fleet (6,500
thermostats, 2,500 water heaters, 1,000 batteries), each asked to shed a share of its baseline
for ``--hours`` (open loop and closed loop; ``--schedule`` and ``--slow-loop`` add the closed loop
with the release on a fixed schedule and with the loop's earlier tuning); an import envelope at
85 % of a smaller mixed feeder's baseline; and the plan + loop time of one control period for a
10,000-device fleet (8,000 thermostats and 2,000 batteries over 20 feeders) under a dispatch and
an envelope.

``--warming C`` runs instead a thermostat fleet (``--warming-thermostats``) in an afternoon
warming by C °C an hour, so the counterfactual drifts up over the event: the closed loop on the
flat pre-event baseline against the closed loop on each house's same-hour profile, learnt
through the gateway's own rule (:func:`gateway.flex.profiles.loop_profiles`) from
``--profile-days`` earlier weekdays of the same houses under the same afternoon.

    python -m bench.dispatch_delivery [--thermostats 10000] [--mixed 6500,2500,1000] [--hours 3]
        [--after 1] [--share 0.2] [--seed 7] [--period 30] [--schedule] [--slow-loop]
        [--envelope-mixed 800,200] [--plan-devices 10000] [--json FILE]
    python -m bench.dispatch_delivery --warming 0.5 [--warming-thermostats 2000]
        [--profile-days 10]
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import arg_parser
from composition.runtime import settle_heap
from gateway.delivery import DeliveryTuning
from gateway.flex.baseline import DeviceHistory, EventCalendar
from gateway.flex.profiles import BaselineProfile, loop_profiles
from simulators.vpp import FleetSpec, Sample, VirtualPowerPlant
from unified.model import (
    Dispatch,
    EnvelopeInterval,
    OperatingEnvelope,
    ScheduledCommand,
    Target,
)

T0 = datetime(2026, 7, 1, 13, 0, tzinfo=UTC)
WARM_UP = timedelta(hours=1)
GROUP = "feeder:f1"
F = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Scenario:
    spec: FleetSpec
    hours: float
    share: float
    period_s: float
    after_h: float | None = None
    """How long to run after the event; ``None``: twice the event and an hour."""

    @property
    def start(self) -> datetime:
        return T0 + WARM_UP

    @property
    def end(self) -> datetime:
        return self.start + timedelta(hours=self.hours)

    @property
    def until(self) -> datetime:
        # Long enough for a release spread over twice the event, and an hour after it.
        after = 2 * self.hours + 1 if self.after_h is None else self.after_h
        return self.end + timedelta(hours=after)


def feeder(samples: list[Sample]) -> F:
    return np.array([s.power_kw[GROUP] for s in samples])


def run(
    sc: Scenario,
    commands: list[ScheduledCommand],
    profiles: dict[str, BaselineProfile] | None = None,
    **kwargs: Any,
) -> list[Sample]:
    vpp = VirtualPowerPlant(sc.spec, T0, control_period_s=sc.period_s, **kwargs)
    vpp.profiles = profiles or {}
    vpp.add(commands)
    # Without a command the control path changes nothing: the counterfactual is the physics.
    return vpp.run(sc.until, physics_only=not commands)


def fives(x: F) -> F:
    return x[: len(x) // 5 * 5].reshape(-1, 5).mean(axis=1)


MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("open", {"closed_loop": False, "release_s": 0.0}),
    # The release on a fixed schedule (one by one over an hour), as before the governor.
    ("closed, 1 h schedule", {"govern_release": False, "release_s": 3600.0}),
    ("closed", {}),
    # The loop as tuned before the 10,000-device scenarios (120 s smoothing, 300 s integral).
    ("closed, slow loop", {"tuning": DeliveryTuning(smoothing_s=120.0, integral_s=300.0)}),
)


def dispatch_scenario(
    sc: Scenario, modes: tuple[tuple[str, dict[str, Any]], ...] = MODES
) -> dict[str, Any]:
    base = feeder(run(sc, []))
    w = int(WARM_UP.total_seconds() // 60)
    m = int(sc.hours * 60)
    request = -round(sc.share * base[:w].mean(), 1)
    command = Dispatch(
        command_id="d1",
        target=Target(group_id=GROUP),
        kw=request,
        start=sc.start,
        duration_s=sc.hours * 3600,
    )
    # The baseline's own noise floor: how far its 5-minute means wander from the level just
    # before the event (what any baseline learnt before the event must assume), over |request|.
    floor = float(np.std(fives(base[w + 1 : w + 1 + m]) - base[w - 15 : w].mean()) / abs(request))
    out: dict[str, Any] = {
        "base": base,
        "baseline_kw": round(float(base[:w].mean()), 1),
        "request_kw": request,
        "noise_floor": round(floor, 3),
    }
    out["modes"] = [mode for mode, _ in modes]
    for mode, kwargs in modes:
        samples = run(sc, [command], **kwargs)
        delta = feeder(samples) - base
        event = delta[w + 1 : w + 1 + m]
        after = delta[w + 1 + m : w + 1 + m + 60]
        later = delta[w + 1 + m :]
        five = fives(event)
        out[mode] = {
            "hourly_kw": [
                round(float(event[h * 60 : (h + 1) * 60].mean()), 1) for h in range(int(sc.hours))
            ],
            "within_5": round(float(np.mean(np.abs(five - request) <= 0.05 * abs(request))), 3),
            "within_10": round(float(np.mean(np.abs(five - request) <= 0.1 * abs(request))), 3),
            "within_15": round(float(np.mean(np.abs(five - request) <= 0.15 * abs(request))), 3),
            # The highest 5-minute mean above the baseline in the hour after, over |request|.
            "rebound_peak": round(float(fives(after).max()) / abs(request), 3),
            # ... and at any time after the event (a release spread out moves it later).
            "rebound_peak_any": round(float(fives(later).max()) / abs(request), 3),
            "comfort_breaches": max(s.comfort_breaches for s in samples),
            "reserve_breaches": max(s.reserve_breaches for s in samples),
        }
    return out


def similar_day_profiles(sc: Scenario, days: int) -> dict[str, BaselineProfile]:
    """The houses' same-hour profiles from ``days`` earlier weekdays of the same fleet under the
    same afternoon (each day its own draw of starting temperatures and cycles), hourly, through
    the gateway's rule: what the gateway would learn from its reading history."""
    dates = []
    day = T0.date()
    while len(dates) < days:
        day -= timedelta(days=1)
        if day.weekday() < 5:
            dates.append(day)
    first = datetime.combine(dates[-1], clock(), UTC)
    n = sc.spec.thermostats
    span = int(np.ceil((sc.end - T0).total_seconds() / 3600))
    kw = np.full((n, (T0.date() - dates[-1]).days * 24), np.nan)
    for k, day in enumerate(dates, 1):
        vpp = VirtualPowerPlant(replace(sc.spec, day=k), T0, control_period_s=sc.period_s)
        sums, count = np.zeros((n, span)), np.zeros(span)
        while vpp.now < T0 + timedelta(hours=span):
            h = int((vpp.now - T0).total_seconds() // 3600)
            sums[:, h] += vpp.thermostat_power()
            count[h] += 1
            vpp.advance()
        at = (datetime.combine(day, clock(T0.hour), UTC) - first) // timedelta(hours=1)
        kw[:, at : at + span] = sums / count
    histories = {f"t{i}": DeviceHistory(f"t{i}", first, 3600, kw[i]) for i in range(n)}
    return loop_profiles(histories, EventCalendar(), T0, sc.end, list(histories))


def warming_scenario(args: Any) -> dict[str, Any]:
    sc = Scenario(
        FleetSpec(
            thermostats=args.warming_thermostats, seed=args.seed, warming_c_per_h=args.warming
        ),
        args.hours,
        args.share,
        args.period,
        args.after,
    )
    t = time.perf_counter()
    profiles = similar_day_profiles(sc, args.profile_days)
    print(
        f"(profiles of {len(profiles)} houses from {args.profile_days} similar days: "
        f"{time.perf_counter() - t:.0f} s)",
        flush=True,
    )
    modes: tuple[tuple[str, dict[str, Any]], ...] = (
        ("closed, flat", {}),
        ("closed, profiles", {"profiles": profiles}),
    )
    return dispatch_scenario(sc, modes)


def envelope_scenario(sc: Scenario) -> dict[str, Any]:
    base = feeder(run(sc, []))
    w = int(WARM_UP.total_seconds() // 60)
    m = int(sc.hours * 60)
    limit = round(0.85 * base[:w].mean(), 1)
    envelope = OperatingEnvelope(
        command_id="cap",
        target=Target(group_id=GROUP),
        intervals=(EnvelopeInterval(start=sc.start, end=sc.end, import_limit_kw=limit),),
    )
    samples = run(sc, [envelope])
    with_env = fives(feeder(samples)[w + 1 : w + 1 + m])
    without = fives(base[w + 1 : w + 1 + m])
    return {
        "limit_kw": limit,
        "intervals": len(with_env),
        "over_2pct_without": int(np.sum(without > 1.02 * limit)),
        "over_2pct": int(np.sum(with_env > 1.02 * limit)),
        "worst_pct": round(float((with_env.max() / limit - 1) * 100), 2),
        "reserve_breaches": max(s.reserve_breaches for s in samples),
    }


def plan_time(devices: int, seed: int) -> dict[str, float]:
    thermostats = devices * 4 // 5
    spec = FleetSpec(
        thermostats=thermostats, batteries=devices - thermostats, feeders=20, seed=seed
    )
    vpp = VirtualPowerPlant(spec, T0, control_period_s=10.0)
    start = T0 + timedelta(minutes=2)
    vpp.add(
        [
            Dispatch(
                command_id="d1",
                target=Target(group_id="substation:s1"),
                kw=-0.1 * devices,
                start=start,
                duration_s=3600,
            ),
            OperatingEnvelope(
                command_id="cap",
                target=Target(group_id="feeder:f1"),
                intervals=(
                    EnvelopeInterval(
                        start=start, end=start + timedelta(hours=1), import_limit_kw=devices / 40
                    ),
                ),
            ),
        ]
    )
    vpp.run(start)
    threshold = gc.get_threshold()
    settle_heap()  # as `derms-gateway run` does after start-up (freeze, fewer young collections)
    took = []
    for _ in range(60):
        states = vpp.states()
        t = time.perf_counter()
        vpp.control(states)
        took.append(time.perf_counter() - t)
        vpp.advance()
    gc.unfreeze()
    gc.set_threshold(*threshold)
    ms = np.array(took) * 1000
    return {
        "devices": devices,
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser("bench.dispatch_delivery", __doc__)
    parser.add_argument("--thermostats", type=int, default=10_000)
    parser.add_argument(
        "--mixed",
        default="6500,2500,1000",
        help="thermostats,water heaters,batteries (or thermostats,batteries)",
    )
    parser.add_argument("--hours", type=float, default=3.0)
    parser.add_argument("--after", type=float, default=1.0, help="hours run after the event")
    parser.add_argument("--share", type=float, default=0.2, help="request / baseline")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--period", type=float, default=30.0, help="control period, s")
    parser.add_argument(
        "--schedule", action="store_true", help="also the closed loop with a 1 h release schedule"
    )
    parser.add_argument(
        "--slow-loop", action="store_true", help="also the closed loop as tuned before"
    )
    parser.add_argument(
        "--envelope-mixed",
        default="800,200",
        help="the envelope scenario's fleet: thermostats,batteries",
    )
    parser.add_argument("--plan-devices", type=int, default=10_000)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--warming", type=float, default=0.0, help="°C/h: run the warming-afternoon scenario only"
    )
    parser.add_argument("--warming-thermostats", type=int, default=2000)
    parser.add_argument("--profile-days", type=int, default=10)
    args = parser.parse_args(argv)
    if args.warming:
        result = warming_scenario(args)
        print_dispatch(
            f"{args.warming_thermostats} thermostats, afternoon warming {args.warming} °C/h",
            result,
        )
        result.pop("base", None)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"warming": result}, f, indent=2)
        return 0
    counts = [int(x) for x in args.mixed.split(",")]
    n_t, n_w, n_b = counts if len(counts) == 3 else (counts[0], 0, counts[1])
    modes = tuple(
        m
        for m in MODES
        if m[0] in ("open", "closed")
        or (args.schedule and m[0] == "closed, 1 h schedule")
        or (args.slow_loop and m[0] == "closed, slow loop")
    )
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    if args.thermostats:
        results["thermostats"] = dispatch_scenario(
            Scenario(
                FleetSpec(thermostats=args.thermostats, seed=args.seed),
                args.hours,
                args.share,
                args.period,
                args.after,
            ),
            modes,
        )
        print_dispatch(f"{args.thermostats} thermostats", results["thermostats"])
    mixed = Scenario(
        FleetSpec(thermostats=n_t, water_heaters=n_w, batteries=n_b, seed=args.seed),
        args.hours,
        args.share,
        args.period,
        args.after,
    )
    results["mixed"] = dispatch_scenario(mixed, modes)
    print_dispatch(f"{n_t} thermostats + {n_w} water heaters + {n_b} batteries", results["mixed"])
    e_t, e_b = (int(x) for x in args.envelope_mixed.split(","))
    results["envelope"] = envelope_scenario(
        Scenario(
            FleetSpec(thermostats=e_t, batteries=e_b, seed=args.seed),
            args.hours,
            args.share,
            args.period,
        )
    )
    e = results["envelope"]
    print(
        f"\nimport envelope at 85 % of baseline ({e['limit_kw']} kW), {e_t} thermostats + "
        f"{e_b} batteries: "
        f"5-minute intervals above it by > 2 %: {e['over_2pct']} of {e['intervals']} "
        f"(without the envelope: {e['over_2pct_without']}); worst {e['worst_pct']:+.2f} %; "
        f"reserve breaches {e['reserve_breaches']}"
    )
    print(f"\n(delivery scenarios {time.perf_counter() - t0:.0f} s)", flush=True)
    results["plan"] = plan_time(args.plan_devices, args.seed)
    p = results["plan"]
    print(
        f"\nplan + loop per control period, {p['devices']} devices (a dispatch and an envelope): "
        f"p50 {p['p50_ms']} ms, p95 {p['p95_ms']} ms"
    )
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    for r in results.values():
        r.pop("base", None)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


def print_dispatch(title: str, r: dict[str, Any]) -> None:
    print(
        f"\n{title}: baseline {r['baseline_kw']} kW, request {r['request_kw']} kW, "
        f"baseline noise floor (5-min std / request) {r['noise_floor']:.1%}"
    )
    print(
        f"{'mode':20} {'hourly mean kW':22} {'5-min ±5%':>9} {'±10%':>6} {'±15%':>6} "
        f"{'rebound':>8} {'later':>6} {'comfort':>8} {'reserve':>8}"
    )
    for mode in r["modes"]:
        x = r[mode]
        hourly = " / ".join(f"{v:.0f}" for v in x["hourly_kw"])
        print(
            f"{mode:20} {hourly:22} {x['within_5']:>9.0%} {x['within_10']:>6.0%} "
            f"{x['within_15']:>6.0%} "
            f"{x['rebound_peak']:>8.0%} {x['rebound_peak_any']:>6.0%} "
            f"{x['comfort_breaches']:>8} {x['reserve_breaches']:>8}"
        )


if __name__ == "__main__":
    sys.exit(main())
