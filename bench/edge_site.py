"""Edge-site benchmark: the metered site loop on a 10-device site, and the outbox's rates.

    python -m bench.edge_site [--seconds 20] [--period 1.0] [--records 5000] [--json FILE]

Two processes, so that the simulators' CPU and memory are not counted as the edge agent's:

* a **sims child** (``--serve``) serves a site meter, 4 PV inverters (two on the 7xx map, two on
  the legacy one, under cloud steps) and 5 batteries (one legacy), the meter measuring a load
  profile plus all nine, on 127.0.0.1 until its stdin closes;
* the **edge process** (what you run) connects one adapter per device (10), runs the site loop
  (4 PV caps + 1 battery, export limit 4 kW) at ``--period`` and polls the other 4 batteries
  each period as the core would, for ``--seconds``; then times the outbox.

It reports the loop step duration percentiles (read 10 devices + decide + write), the worst
export beyond the limit seen at the meter, the outbox's durable write rate (``synchronous=FULL``,
one transaction per record) and drain rate (forwarder to a null uplink), and the edge process's
resident memory with everything connected (target ≤ 80 MB).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.sunspec.battery import SunSpecBattery
from adapters.sunspec.connection import SunSpecEndpoint
from adapters.sunspec.pv_inverter import SunSpecPvInverter
from adapters.sunspec.site_meter import SunSpecSiteMeter
from bench.common import arg_parser, emit, pct, rss_bytes, start_child, stop_child
from edge_agent.outbox import Forwarder, Outbox, Record
from edge_agent.site_loop import SiteLoop, SiteLoopConfig
from simulators.site_meter import SiteLoadProfile, SiteMeterSimulator
from simulators.sunspec_battery import SunSpecBatterySimulator
from simulators.sunspec_pv import CloudStep, IrradianceProfile, SunSpecPvSimulator

EXPORT_LIMIT_KW = 4.0


async def serve() -> None:
    clouds = tuple(CloudStep(10.0 * k + 3, 10.0 * k + 6, 0.3) for k in range(60))
    pvs = [
        SunSpecPvSimulator(
            rated_kw=5.0,
            profile=IrradianceProfile(clear_sky_pu=0.9, clouds=clouds),
            legacy=i % 2 == 1,
        )
        for i in range(4)
    ]
    bats = [
        SunSpecBatterySimulator(port=0, legacy=i == 4, max_charge_kw=3.0, max_discharge_kw=3.0)
        for i in range(5)
    ]
    meter = SiteMeterSimulator(devices=[*pvs, *bats], load=SiteLoadProfile(base_kw=2.0))
    sims: list[SunSpecPvSimulator | SunSpecBatterySimulator | SiteMeterSimulator] = [
        *pvs,
        *bats,
        meter,
    ]
    for sim in sims:
        await sim.start()
    emit({"meter": meter.port, "pv": [p.port for p in pvs], "bat": [b.port for b in bats]})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for sim in sims:
        await sim.stop()


def _ep(port: int) -> SunSpecEndpoint:
    return SunSpecEndpoint(port=port, timeout_s=1.0)


async def measure(seconds: float, period: float, records: int) -> dict[str, Any]:
    proc, ports = await start_child(
        "bench.edge_site", ["--serve"], ready_timeout_s=20, stop_timeout_s=5
    )
    try:
        rss_before = rss_bytes()
        meter = SunSpecSiteMeter("meter", _ep(ports["meter"]))
        pvs = [SunSpecPvInverter(f"pv-{i}", _ep(p)) for i, p in enumerate(ports["pv"])]
        bats = [SunSpecBattery(f"bat-{i}", _ep(p)) for i, p in enumerate(ports["bat"])]
        adapters: list[SunSpecSiteMeter | SunSpecPvInverter | SunSpecBattery] = [
            meter,
            *pvs,
            *bats,
        ]
        for adapter in adapters:
            await adapter.connect()
        loop = SiteLoop(
            meter,
            pvs,
            bats[0],
            lambda now: (None, EXPORT_LIMIT_KW),
            config=SiteLoopConfig(period_s=period),
        )
        worst = 0.0
        deadline = time.monotonic() + seconds
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            sample = await loop.step_once()
            for other in bats[1:]:
                await other.read()
            # The first steps see the site before any control: the limit is judged after them.
            settled = len(loop.samples) > 3
            if settled and sample.net_kw == sample.net_kw:  # not NaN
                worst = max(worst, -sample.net_kw - EXPORT_LIMIT_KW)
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        rss = rss_bytes()
        for adapter in adapters:
            await adapter.close()
    finally:
        await stop_child(proc, 5)
    durations = [s.duration_s for s in loop.samples]

    with tempfile.TemporaryDirectory() as tmp:
        box = Outbox(Path(tmp) / "outbox.sqlite", max_records=records * 2)
        started = time.perf_counter()
        for i in range(records):
            box.append(f"stream-{i % 4}", b"x" * 200)
        write_s = time.perf_counter() - started

        async def null_send(record: Record, floor: int) -> None:
            return None

        forwarder = Forwarder(box, null_send)
        started = time.perf_counter()
        while box.depth:
            await forwarder.drain_once()
        drain_s = time.perf_counter() - started
        box.close()
    return {
        "devices": 10,
        "period_s": period,
        "loop_steps": len(durations),
        "loop_p50_ms": 1000 * (pct(durations, 0.5) or 0),
        "loop_p95_ms": 1000 * (pct(durations, 0.95) or 0),
        "loop_p99_ms": 1000 * (pct(durations, 0.99) or 0),
        "loop_max_ms": 1000 * max(durations, default=0),
        "worst_export_over_limit_kw": worst,
        "net_kw_per_step": [round(s.net_kw, 2) for s in loop.samples],
        "outbox_writes_per_s": records / write_s,
        "outbox_drain_per_s": records / drain_s,
        "rss_mb": rss / 2**20,
        "rss_connected_delta_mb": (rss - rss_before) / 2**20,
    }


def main() -> None:
    parser = arg_parser("bench.edge_site", __doc__)
    parser.add_argument("--serve", action="store_true", help=argparse_hidden())
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--period", type=float, default=1.0)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    result = asyncio.run(measure(args.seconds, args.period, args.records))
    for key, value in result.items():
        print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def argparse_hidden() -> str:
    return "internal: run the simulators' child"


if __name__ == "__main__":
    main()
