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
an envelope, with the optimised allocation (``[dispatch] allocator = "lp"``) and the
proportional one in the same run.

``--warming C`` runs instead a thermostat fleet (``--warming-thermostats``) in an afternoon
warming by C °C an hour, so the counterfactual drifts up over the event: the closed loop on the
flat pre-event baseline against the closed loop on each house's same-hour profile, learnt
through the gateway's own rule (:func:`gateway.flex.profiles.loop_profiles`) from
``--profile-days`` earlier weekdays of the same houses under the same afternoon.

    python -m bench.dispatch_delivery [--thermostats 10000] [--mixed 6500,2500,1000] [--hours 3]
        [--after 1] [--share 0.2] [--seed 7] [--period 30] [--schedule] [--slow-loop]
        [--envelope-mixed 800,200] [--plan-devices 10000] [--json FILE] [--plan-only]
        [--flex-all 650,250,100]
    python -m bench.dispatch_delivery --warming 0.5 [--warming-thermostats 2000]
        [--profile-days 10]

Each dispatch scenario's hourly delivery (closed loop) is also checked against the group's
flexibility forecast (``gateway.flex.forecast.forecast_group``, built at the event's start as
the core builds it), and a smaller mixed fleet asked for its whole baseline checks the
forecast's flex_down p10..p90 against what it could deliver (15-minute intervals).
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
from gateway import dispatch
from gateway.delivery import DeliveryTuning
from gateway.flex.baseline import DeviceHistory, EventCalendar
from gateway.flex.forecast import (
    DeviceFlexInput,
    FlexForecast,
    FlexRequest,
    availability_ratio,
    forecast_group,
)
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
    """Plan + loop time per control period, the optimised allocation (``lp``, the default)
    against the proportional one, each on its own copy of the same fleet, interleaved period by
    period in one process (the same machine load for both)."""
    fleets = {name: _timed_fleet(devices, seed, name) for name in ("lp", "proportional")}
    threshold = gc.get_threshold()
    settle_heap()  # as `derms-gateway run` does after start-up (freeze, fewer young collections)
    took: dict[str, list[float]] = {name: [] for name in fleets}
    for _ in range(60):
        for name, vpp in fleets.items():
            states = vpp.states()
            t = time.perf_counter()
            vpp.control(states)
            took[name].append(time.perf_counter() - t)
            vpp.advance()
    gc.unfreeze()
    gc.set_threshold(*threshold)
    lp, prop = (np.array(took[name]) * 1000 for name in ("lp", "proportional"))
    return {
        "devices": devices,
        "p50_ms": round(float(np.percentile(lp, 50)), 1),
        "p95_ms": round(float(np.percentile(lp, 95)), 1),
        "proportional_p50_ms": round(float(np.percentile(prop, 50)), 1),
        "proportional_p95_ms": round(float(np.percentile(prop, 95)), 1),
        "ratio_p50": round(float(np.percentile(lp, 50) / np.percentile(prop, 50)), 2),
        "ratio_p95": round(float(np.percentile(lp, 95) / np.percentile(prop, 95)), 2),
    }


def _timed_fleet(devices: int, seed: int, allocator: dispatch.Allocator) -> VirtualPowerPlant:
    thermostats = devices * 4 // 5
    spec = FleetSpec(
        thermostats=thermostats, batteries=devices - thermostats, feeders=20, seed=seed
    )
    vpp = VirtualPowerPlant(spec, T0, control_period_s=10.0, allocator=allocator)
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
    return vpp


# --------------------------------------------------------------------------- flex forecast


def flex_forecast_at_start(sc: Scenario, interval_s: int) -> FlexForecast:
    """The group's flexibility forecast for the event window, built at the event's start as
    the core's ``_flex_job`` builds it: each member's Device and newest DeviceState, its
    availability (the share of the last hour's reports that arrived), the configured outdoor
    temperature; no history (the fleet has none). A fleet of its own, run to the start without
    a command: the same physics as the scenario's runs, and its readings draw no numbers the
    scenario's runs draw."""
    vpp = VirtualPowerPlant(sc.spec, T0, control_period_s=sc.period_s)
    vpp.run(sc.start, physics_only=True)
    states = vpp.states()
    expected = int(3600 // sc.period_s)
    rng = np.random.default_rng(sc.spec.seed + 2)
    members = vpp.registry.members(GROUP)
    got = rng.binomial(expected, 1.0 - sc.spec.dropout, len(members)).tolist()
    inputs = [
        DeviceFlexInput(
            device=d,
            state=states.get(d.device_id),
            availability=availability_ratio(k, expected),
        )
        for d, k in zip(members, got, strict=True)
    ]
    horizon = round(sc.hours * 3600 / interval_s) * interval_s
    request = FlexRequest(
        group_id=GROUP,
        start=sc.start,
        horizon_s=horizon,
        interval_s=interval_s,
        window_start=sc.start,
        window_end=sc.start + timedelta(seconds=horizon),
    )
    return forecast_group(inputs, request, now=sc.start, outdoor_temp_c=sc.spec.outdoor_c)


def flex_bands(forecast: FlexForecast) -> F:
    """flex_down p10/p50/p90 per interval, kW (a reduction is positive)."""
    return np.array(
        [[i.flex_down_kw.p10, i.flex_down_kw.p50, i.flex_down_kw.p90] for i in forecast.intervals]
    )


def flex_coverage(bands: F, delivered_down: F, asked_kw: float) -> dict[str, Any]:
    """Per interval: was the delivered reduction within p10..p90, and how far from p50.

    As :class:`gateway.flex.forecast.FlexCoverage` counts it, an interval whose request was
    below its p10 says nothing about the band (the group was not asked for what it could
    give); both shares are reported."""
    p10, p50, p90 = bands.T
    within = (delivered_down >= p10) & (delivered_down <= p90)
    counted = abs(asked_kw) >= p10
    return {
        "p10_kw": [round(float(x), 1) for x in p10],
        "p50_kw": [round(float(x), 1) for x in p50],
        "p90_kw": [round(float(x), 1) for x in p90],
        "delivered_kw": [round(float(x), 1) for x in delivered_down],
        "within": round(float(within.mean()), 3),
        "counted": int(counted.sum()),
        "within_counted": round(float(within[counted].mean()), 3) if counted.any() else None,
        "below_p10": round(float((delivered_down < p10).mean()), 3),
        "above_p90": round(float((delivered_down > p90).mean()), 3),
        # The p50's bias over the event: energy delivered over energy promised, less one.
        "p50_bias": round(float(delivered_down.sum() / max(float(p50.sum()), 1e-9) - 1.0), 3),
    }


def flex_check_dispatch(sc: Scenario, r: dict[str, Any], mode: str = "closed") -> dict[str, Any]:
    """A dispatch scenario's hourly delivery against the hourly forecast made at its start."""
    t = time.perf_counter()
    forecast = flex_forecast_at_start(sc, 3600)
    out = flex_coverage(
        flex_bands(forecast), -np.array(r[mode]["hourly_kw"]), float(r["request_kw"])
    )
    out["request_kw"] = r["request_kw"]
    out["forecast_s"] = round(time.perf_counter() - t, 1)
    return out


def flex_check_all(sc: Scenario, interval_s: int = 900) -> dict[str, Any]:
    """Ask the group for more than it can give (its whole baseline, and half again the
    forecast's highest p90: batteries can shed beyond the load by exporting): what it
    delivers is then what it could, which the forecast's flex_down band claims to bound."""
    t = time.perf_counter()
    forecast = flex_forecast_at_start(sc, interval_s)
    bands = flex_bands(forecast)
    base = feeder(run(sc, []))
    w = int(WARM_UP.total_seconds() // 60)
    request = -round(max(float(base[:w].mean()), 1.5 * float(bands[:, 2].max())), 1)
    command = Dispatch(
        command_id="all",
        target=Target(group_id=GROUP),
        kw=request,
        start=sc.start,
        duration_s=sc.hours * 3600,
    )
    delta = feeder(run(sc, [command])) - base
    per = interval_s // 60
    event = delta[w + 1 : w + 1 + per * len(bands)]
    delivered = -event.reshape(len(bands), per).mean(axis=1)
    out = flex_coverage(bands, delivered, request)
    out["request_kw"] = request
    out["interval_s"] = interval_s
    out["took_s"] = round(time.perf_counter() - t, 1)
    return out


def print_flex(title: str, x: dict[str, Any]) -> None:
    bands = zip(x["delivered_kw"], x["p10_kw"], x["p50_kw"], x["p90_kw"], strict=True)
    rows = " | ".join(f"{d:.0f} in {a:.0f}/{b:.0f}/{c:.0f}" for d, a, b, c in bands)
    counted = (
        "; the request below p10 in every one: FlexCoverage counts none"
        if x["within_counted"] is None
        else f" ({x['within_counted']:.0%} of the {x['counted']} FlexCoverage counts)"
    )
    print(
        f"flex forecast, {title} (request {x['request_kw']} kW): delivered within p10..p90 in "
        f"{x['within']:.0%} of {len(x['p50_kw'])} intervals{counted}; below p10 "
        f"{x['below_p10']:.0%}, above p90 {x['above_p90']:.0%}; p50 bias {x['p50_bias']:+.1%}"
    )
    print(f"  delivered in p10/p50/p90, kW: {rows}")


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
    parser.add_argument(
        "--flex-all",
        default="650,250,100",
        help="thermostats,water heaters,batteries asked for everything ('': skip)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--plan-only", action="store_true", help="only the plan time (lp against proportional)"
    )
    parser.add_argument(
        "--warming", type=float, default=0.0, help="°C/h: run the warming-afternoon scenario only"
    )
    parser.add_argument("--warming-thermostats", type=int, default=2000)
    parser.add_argument("--profile-days", type=int, default=10)
    args = parser.parse_args(argv)
    if args.plan_only:
        p = plan_time(args.plan_devices, args.seed)
        print(json.dumps(p))
        return 0
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
        houses = Scenario(
            FleetSpec(thermostats=args.thermostats, seed=args.seed),
            args.hours,
            args.share,
            args.period,
            args.after,
        )
        results["thermostats"]["flex"] = flex_check_dispatch(houses, results["thermostats"])
        print_flex("closed loop", results["thermostats"]["flex"])
    mixed = Scenario(
        FleetSpec(thermostats=n_t, water_heaters=n_w, batteries=n_b, seed=args.seed),
        args.hours,
        args.share,
        args.period,
        args.after,
    )
    results["mixed"] = dispatch_scenario(mixed, modes)
    print_dispatch(f"{n_t} thermostats + {n_w} water heaters + {n_b} batteries", results["mixed"])
    results["mixed"]["flex"] = flex_check_dispatch(mixed, results["mixed"])
    print_flex("closed loop", results["mixed"]["flex"])
    if args.flex_all:
        a_t, a_w, a_b = (int(x) for x in args.flex_all.split(","))
        results["flex_all"] = flex_check_all(
            Scenario(
                FleetSpec(thermostats=a_t, water_heaters=a_w, batteries=a_b, seed=args.seed),
                args.hours,
                1.0,
                args.period,
                0.25,  # a few minutes past the end: the last interval's samples
            )
        )
        print_flex(f"{a_t} + {a_w} + {a_b} asked for everything", results["flex_all"])
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
        f"lp p50 {p['p50_ms']} ms, p95 {p['p95_ms']} ms; proportional p50 "
        f"{p['proportional_p50_ms']} ms, p95 {p['proportional_p95_ms']} ms (lp / proportional: "
        f"{p['ratio_p50']} at p50, {p['ratio_p95']} at p95)"
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
