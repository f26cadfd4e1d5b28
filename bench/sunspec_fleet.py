"""Fleet benchmark: a real gateway polling N SunSpec battery simulators over Modbus/TCP.

    python -m bench.sunspec_fleet [--devices 50,200] [--seconds 10] [--reps 4] [--json FILE]

Three kinds of process, so that no side's CPU pollutes another's figures:

* the **orchestrator** (what you run) starts one *worker* per fleet size and prints the table;
* a **worker** (``--worker N``) is the gateway process: it starts a sims child and mosquitto,
  runs the gateway phases and the raw pymodbus baseline, and prints one JSON result. A fresh
  process per N keeps the RSS-per-device figure clean (no arenas left over from a previous N);
* a **sims child** (``--sims N``) serves N ``SunSpecBatterySimulator``s in one event loop, prints
  their ports as JSON and answers "watch" requests on stdin: it reports the moment
  (``time.time()``, stamped when the simulator accepted the write) by which every simulator's
  704 controls hold a given setpoint, or are released.

Phases in each worker, in this order:

1. gateway at ``poll_interval_s = 1`` (the production-like setting): connect time, RSS/device,
   achieved polls/s vs the ideal N/s, gateway CPU%; then command latency with a Grid DERMS client:
   publish → last simulator holding the setpoint, publish → ``active`` ack, cancel → last
   simulator released (``--reps`` times);
2. gateway at ``poll_interval_s = 0.001`` (supervisors poll flat out): polls/s and CPU%;
3. raw pymodbus baseline: one ``AsyncModbusTcpClient`` per device doing the same two 1-register
   reads (701 ``W``, 713 ``SoC``) flat out. Ratio = gateway / raw.

A "poll" is one complete pair of reads (for the gateway: one ``DeviceState``). Every loop is
bounded in time and count; every process started is stopped (children also exit when their stdin
closes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    HOST,
    arg_parser,
    cpu_s,
    emit,
    fmt,
    print_command,
    profile_report,
    read_commands,
    rss_bytes,
    run,
    run_worker,
    setup_logging,
    start_child,
    stop_child,
    write_results,
)

log = logging.getLogger("bench.sunspec_fleet")

# Bounds: no loop in this file may run longer or more often than these.
MAX_POLLS_PER_CLIENT = 10_000_000
WATCH_TICK_S = 0.005
CHILD_MAX_LIFE_S = 900.0


# =============================================================================== sims child


async def _sims_main(n: int, step_s: float) -> None:
    from simulators.sunspec_battery import SunSpecBatterySimulator

    sims = [
        SunSpecBatterySimulator(host=HOST, port=0, serial=f"BENCH-{i:04d}", step_s=step_s)
        for i in range(n)
    ]
    watches: set[asyncio.Task[None]] = set()
    # When each simulator last accepted a write: wrapping the (private) write hook here, in the
    # bench's own child, stamps the exact moment instead of the next tick of the watch loop.
    stamps = [0.0] * n

    def stamp(i: int, sim: SunSpecBatterySimulator) -> None:
        write = sim._write

        def stamped(address: int, values: list[int]) -> Any:
            code = write(address, values)
            if code is None:
                stamps[i] = time.time()
            return code

        sim._write = stamped  # type: ignore[method-assign]

    for i, sim in enumerate(sims):
        stamp(i, sim)

    def holds(sim: SunSpecBatterySimulator, kind: str, watts: float) -> bool:
        if kind == "released":
            return not sim.wset_enabled
        wset = sim.wset_w
        return sim.wset_enabled and wset is not None and abs(wset - watts) <= 1 + 0.02 * watts

    async def watch(wid: str, kind: str, watts: float, timeout_s: float) -> None:
        # Only a simulator whose write counter moved can have changed its controls, so each tick
        # decodes just those: cheap enough to tick every 5 ms with 200 simulators.
        pending = list(range(n))
        seen = [-1] * n
        held_at = 0.0
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            still = []
            for i in pending:
                sim = sims[i]
                if sim.write_count != seen[i]:
                    seen[i] = sim.write_count
                    if holds(sim, kind, watts):
                        held_at = max(held_at, stamps[i])
                        continue
                still.append(i)
            pending = still
            if pending:
                await asyncio.sleep(WATCH_TICK_S)
        emit({"id": wid, "t": held_at, "ok": not pending, "pending": len(pending)})

    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(stack.enter_async_context(s) for s in sims))
        emit({"ports": [s.port for s in sims], "pid": os.getpid()})
        async for msg in read_commands(time.monotonic() + CHILD_MAX_LIFE_S):
            if msg.get("op") == "watch":
                task = asyncio.create_task(
                    watch(msg["id"], msg["kind"], float(msg.get("watts", 0)), msg["timeout_s"])
                )
                watches.add(task)
                task.add_done_callback(watches.discard)
                emit({"id": msg["id"], "armed": True})
        for task in list(watches):
            task.cancel()


class SimsChild:
    """The sims child process, seen from the worker."""

    def __init__(self, n: int, step_s: float) -> None:
        self.n = n
        self.step_s = step_s
        self.ports: list[int] = []
        self.pid = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}

    async def __aenter__(self) -> SimsChild:
        self._proc, first = await start_child(
            "bench.sunspec_fleet",
            ["--sims", str(self.n), "--sim-step-s", str(self.step_s)],
            ready_timeout_s=30 + 0.1 * self.n,
            stop_timeout_s=5,
        )
        self.pid = self._proc.pid
        self.ports = list(first["ports"])
        self._reader = asyncio.create_task(self._read(), name="sims-child-reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self._proc is not None:
            await stop_child(self._proc, 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            msg = json.loads(line)
            waiters = self._waiters.get(str(msg.get("id")), [])
            if waiters:
                fut = waiters.pop(0)
                if not fut.done():
                    fut.set_result(msg)

    def _expect(self, wid: str, count: int) -> list[asyncio.Future[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(count)]
        self._waiters[wid] = list(futs)
        return futs

    async def watch(
        self, kind: str, watts: float = 0.0, timeout_s: float = 20.0
    ) -> asyncio.Future[dict[str, Any]]:
        """Arm a watch; returns the future of its result ({"t": time.time(), "ok": ...})."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        wid = uuid.uuid4().hex[:8]
        armed, result = self._expect(wid, 2)
        msg = {"op": "watch", "id": wid, "kind": kind, "watts": watts, "timeout_s": timeout_s}
        self._proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await self._proc.stdin.drain()
        async with asyncio.timeout(10):
            await armed
        return result

    def cpu_s(self) -> float:
        return cpu_s(self.pid)


# =============================================================================== worker helpers


def _children_cpu_s(name: str) -> float:
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if name in child.name():
                times = child.cpu_times()
                total += times.user + times.system
    return total


@dataclass
class Window:
    """CPU and wall clock over one measurement window."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    sims_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0

    def pct(self, cpu: float) -> float:
        return 100.0 * cpu / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self, rate: float) -> dict[str, float | None]:
        polls = rate * self.wall_s
        return {
            "wall_s": round(self.wall_s, 3),
            # Our CPU per poll: robust to the sims child being the bottleneck.
            "cpu_us_per_poll": round(1e6 * self.cpu_s / polls, 1) if polls else None,
            "cpu_pct": round(self.pct(self.cpu_s), 1),
            "sims_cpu_pct": round(self.pct(self.sims_cpu_s), 1),
            "broker_cpu_pct": round(self.pct(self.broker_cpu_s), 1),
        }


async def measure(
    seconds: float, sims: SimsChild, count: Callable[[], int]
) -> tuple[float, Window]:
    """Rate of ``count()`` over ``seconds``, plus CPU of us, the sims and mosquitto."""
    c0, w0, p0 = count(), time.monotonic(), time.process_time()
    s0, b0 = sims.cpu_s(), _children_cpu_s("mosquitto")
    await asyncio.sleep(seconds)
    c1, w1, p1 = count(), time.monotonic(), time.process_time()
    s1, b1 = sims.cpu_s(), _children_cpu_s("mosquitto")
    win = Window(w1 - w0, p1 - p0, s1 - s0, b1 - b0)
    return (c1 - c0) / win.wall_s, win


def gateway_config(
    ports: list[int], broker_port: int, store: Path, *, poll_s: float, control_s: float
) -> Any:
    from composition.config import parse_config

    devices = [
        {
            "device_id": f"bat-{i + 1}",
            "der_class": "battery",
            "location": {"substation": "s1", "feeder": f"f{i % 4 + 1}"},
            "adapter": "sunspec_battery",
            # The simulators' defaults: 5 kW each way, 13.5 kWh.
            "ratings": {"max_charge_kw": 5.0, "max_discharge_kw": 5.0, "capacity_kwh": 13.5},
            "constraints": {"reserve_soc_pct": 20.0},
            "sunspec": {"host": HOST, "port": port, "timeout_s": 2.0},
        }
        for i, port in enumerate(ports)
    ]
    return parse_config(
        {
            "gateway_id": f"bench-{uuid.uuid4().hex[:8]}",
            "broker": {"host": HOST, "port": broker_port, "protocol": "5"},
            "store": {"path": str(store)},
            "settlement": {"timezone": "UTC"},
            "timing": {
                "poll_interval_s": poll_s,
                "control_period_s": control_s,
                "telemetry_period_s": 5.0,
                "stale_after_s": 15.0,
                "io_timeout_s": 3.0,
                "backoff_max_s": 2.0,
            },
            "devices": devices,
        }
    )


@dataclass
class StateCounter:
    """Counts DeviceStates through the gateway's public ``state_listeners`` hook."""

    count: int = 0

    def hit(self, _state: object) -> None:
        self.count += 1

    def attach(self, gateway: Any) -> None:
        gateway.state_listeners.append(self.hit)

    def __call__(self) -> int:
        return self.count


@dataclass
class RunningGateway:
    gateway: Any
    task: asyncio.Task[None]
    counter: StateCounter
    connect_s: float


async def start_gateway(config: Any, timeout_s: float) -> RunningGateway:
    from composition.app import GatewayApp

    app = GatewayApp(config)
    gateway = app.core
    counter = StateCounter()
    counter.attach(gateway)
    t0 = time.monotonic()
    task = asyncio.create_task(app.run(), name="gateway-under-bench")
    deadline = t0 + timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            await app.northbound.connected.wait()
        while not all(s.available for s in gateway.supervisors.values()):
            if task.done():
                task.result()  # raises whatever stopped it
                raise RuntimeError("gateway stopped before all devices were online")
            if time.monotonic() > deadline:
                up = sum(s.available for s in gateway.supervisors.values())
                raise TimeoutError(f"only {up}/{len(gateway.supervisors)} devices online")
            await asyncio.sleep(0.01)
    except BaseException:
        await stop_gateway(task)
        raise
    return RunningGateway(gateway, task, counter, time.monotonic() - t0)


async def stop_gateway(task: asyncio.Task[None]) -> None:
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=15)
    if not done:
        raise RuntimeError("gateway did not stop within 15 s of cancellation")
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "max_ms": None}
    return {
        "p50_ms": round(1000 * statistics.median(values), 1),
        "max_ms": round(1000 * max(values), 1),
    }


@dataclass
class AckClock:
    """Wall-clock arrival of the first ack of each (command id, state)."""

    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    shortfall: dict[str, float | None] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_ack(self, ack: Any) -> None:
        key = (ack.command_id, str(ack.state))
        self.seen.setdefault(key, time.time())
        if str(ack.state) == "active":
            self.shortfall.setdefault(ack.command_id, ack.shortfall_kw)
        self.changed.set()

    async def wait(self, command_id: str, state: str, timeout_s: float) -> float | None:
        key = (command_id, state)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while key not in self.seen:
                    self.changed.clear()
                    await self.changed.wait()
        return self.seen.get(key)


async def all_written(gateway: Any, timeout_s: float) -> float | None:
    """Wall-clock time at which every supervisor has completed one more write than now."""
    before = {k: s.writes for k, s in gateway.supervisors.items()}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(s.writes > before[k] for k, s in gateway.supervisors.items()):
            return time.time()
        await asyncio.sleep(WATCH_TICK_S)
    return None


async def command_latency(
    sims: SimsChild, gateway: Any, broker_port: int, n: int, reps: int, profile: bool = False
) -> dict[str, Any]:
    """Dispatch to the whole substation, wait for every simulator to hold it, cancel, repeat."""
    from simulators.grid_derms import GridDermsClient
    from unified.model import utcnow

    clock = AckClock()
    gateway_id = gateway.config.gateway_id
    written_s: list[float] = []
    dispatch_s: list[float] = []
    release_s: list[float] = []
    ack_s: list[float] = []
    failures: list[str] = []
    shortfalls: list[float] = []
    async with GridDermsClient(HOST, broker_port, gateway_id, on_ack=clock.on_ack) as grid:
        await asyncio.sleep(0.5)  # let the subscription settle
        for rep in range(reps):
            per_device_kw = (2.0, 3.0)[rep % 2]  # discharge, within the 5 kW rating
            cid = grid.new_id("bench")
            done = await sims.watch("holds", watts=per_device_kw * 1000, timeout_s=20)
            command = {
                "type": "dispatch",
                "command_id": cid,
                "program": "bench",
                "target": {"group_id": "substation:s1"},
                "kw": -per_device_kw * n,
                "start": utcnow().isoformat(),
                "duration_s": 120,
            }
            profiler = cProfile.Profile() if profile and rep == reps - 1 else None
            if profiler is not None:
                profiler.enable()
            written = asyncio.create_task(all_written(gateway, 25))
            t0 = time.time()
            await grid.send(command)
            try:
                async with asyncio.timeout(25):
                    res = await done
            except TimeoutError:
                res = {"ok": False, "pending": "?"}
            if (t_written := await written) is not None:
                written_s.append(t_written - t0)
            if profiler is not None:
                profiler.disable()
                sys.stderr.write(f"---- cProfile, publish -> all {n} devices hold a dispatch\n")
                sys.stderr.write(profile_report(profiler, 30))
            if res["ok"]:
                dispatch_s.append(res["t"] - t0)
            else:
                failures.append(f"{cid}: {res['pending']} devices never held the setpoint")
            active = await clock.wait(cid, "active", 10)
            if active is None:
                failures.append(f"{cid}: no active ack")
            else:
                ack_s.append(active - t0)
                shortfalls.append(clock.shortfall.get(cid) or 0.0)

            released = await sims.watch("released", timeout_s=20)
            t0 = time.time()
            await grid.send({"type": "cancel", "command_id": grid.new_id("cancel"), "cancels": cid})
            try:
                async with asyncio.timeout(25):
                    res = await released
            except TimeoutError:
                res = {"ok": False, "pending": "?"}
            if res["ok"]:
                release_s.append(res["t"] - t0)
            else:
                failures.append(f"cancel {cid}: {res['pending']} devices never released")
            await clock.wait(cid, "cancelled", 10)
            await asyncio.sleep(0.3)
    return {
        "reps": reps,
        "dispatch": _stats_ms(dispatch_s),
        "active_ack": _stats_ms(ack_s),
        "gateway_wrote_all": _stats_ms(written_s),
        "release": _stats_ms(release_s),
        "dispatch_s": [round(x, 4) for x in dispatch_s],
        "active_ack_s": [round(x, 4) for x in ack_s],
        "gateway_wrote_all_s": [round(x, 4) for x in written_s],
        "release_s": [round(x, 4) for x in release_s],
        "max_shortfall_kw": max(shortfalls, default=None),
        "failures": failures,
    }


async def discover_addresses(port: int) -> tuple[int, int]:
    """The registers the adapter polls: 701 ``W`` and 713 ``SoC``, found by its own connect()."""
    from adapters.sunspec.battery import SunSpecBattery, SunSpecEndpoint
    from protocols.sunspec import (
        MODEL_DER_MEASURE_AC,
        MODEL_DER_STORAGE_CAPACITY,
        load_model_def,
    )

    adapter = SunSpecBattery("probe", SunSpecEndpoint(host=HOST, port=port))
    await adapter.connect()
    try:
        layout = adapter.layout
        assert layout is not None
        w_off, _ = load_model_def(MODEL_DER_MEASURE_AC).span("W")
        soc_off, _ = load_model_def(MODEL_DER_STORAGE_CAPACITY).span("SoC")
        return (
            layout.find(MODEL_DER_MEASURE_AC).address + w_off,
            layout.find(MODEL_DER_STORAGE_CAPACITY).address + soc_off,
        )
    finally:
        await adapter.close()


class RawBaseline:
    """One plain ``AsyncModbusTcpClient`` per device, polling the adapter's two registers."""

    def __init__(self, sims: SimsChild) -> None:
        self.sims = sims
        self.clients: list[Any] = []
        self.addr_w = self.addr_soc = 0

    async def __aenter__(self) -> RawBaseline:
        from pymodbus.client import AsyncModbusTcpClient

        self.addr_w, self.addr_soc = await discover_addresses(self.sims.ports[0])
        self.clients = [
            AsyncModbusTcpClient(HOST, port=p, timeout=2.0, retries=0, reconnect_delay=0)
            for p in self.sims.ports
        ]
        try:
            async with asyncio.timeout(30):
                ok = await asyncio.gather(*(c.connect() for c in self.clients))
            if not all(ok):
                raise RuntimeError(f"raw baseline: {ok.count(False)} clients could not connect")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            c.close()

    async def window(self, seconds: float, warmup_s: float) -> tuple[float, Window, int]:
        """Poll flat out for ``warmup_s + seconds``; rate over the last ``seconds``."""
        polls = 0
        errors = 0
        stop_at = time.monotonic() + warmup_s + seconds + 30  # moved up once measured

        async def poll(client: Any) -> None:
            nonlocal polls, errors
            for _ in range(MAX_POLLS_PER_CLIENT):
                if time.monotonic() > stop_at:
                    return
                w = await client.read_holding_registers(self.addr_w, count=1, device_id=1)
                soc = await client.read_holding_registers(self.addr_soc, count=1, device_id=1)
                if w.isError() or soc.isError():
                    errors += 1
                else:
                    polls += 1

        tasks = [asyncio.create_task(poll(c)) for c in self.clients]
        try:
            await asyncio.sleep(warmup_s)
            rate, win = await measure(seconds, self.sims, lambda: polls)
            # Let every loop finish its poll: a request cancelled in flight makes pymodbus warn
            # about the answer that still arrives, and leaves the connection out of step.
            stop_at = time.monotonic()
            await asyncio.wait(tasks, timeout=5)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return rate, win, errors


async def _worker(n: int, seconds: float, reps: int, step_s: float, profile: bool) -> dict:
    from simulators.broker import MosquittoBroker

    warmup = min(1.0, seconds / 5)
    start_timeout = 30 + 0.15 * n
    result: dict[str, Any] = {"devices": n, "seconds": seconds}
    async with (
        SimsChild(n, step_s) as sims,
        MosquittoBroker() as broker,
    ):
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            # ---- 1. production-like gateway: memory, 1 s polling, command latency
            config = gateway_config(
                sims.ports, broker.port, Path(tmp) / "a.sqlite", poll_s=1.0, control_s=1.0
            )
            gc.collect()
            rss0 = rss_bytes()
            gw = await start_gateway(config, start_timeout)
            try:
                result["connect_s"] = round(gw.connect_s, 3)
                await asyncio.sleep(1.0)
                gc.collect()
                rss1 = rss_bytes()
                result["rss_before_mib"] = round(rss0 / 2**20, 1)
                result["rss_after_mib"] = round(rss1 / 2**20, 1)
                result["rss_per_device_kib"] = round((rss1 - rss0) / n / 1024, 1)
                rate, win = await measure(seconds, sims, gw.counter)
                result["slow"] = {
                    "poll_interval_s": 1.0,
                    "polls_per_s": round(rate, 1),
                    "ideal_per_s": float(n),
                    **win.summary(rate),
                }
                result["latency"] = await command_latency(
                    sims, gw.gateway, broker.port, n, reps, profile
                )
            finally:
                await stop_gateway(gw.task)

            # ---- 2. raw baseline, gateway flat out, raw baseline again (brackets the noise)
            half = seconds / 2
            async with RawBaseline(sims) as raw:
                raw_a = await raw.window(half, warmup)
                config = gateway_config(
                    sims.ports, broker.port, Path(tmp) / "b.sqlite", poll_s=0.001, control_s=1.0
                )
                gw = await start_gateway(config, start_timeout)
                try:
                    await asyncio.sleep(warmup)
                    rate, win = await measure(seconds, sims, gw.counter)
                    result["fast"] = {"polls_per_s": round(rate, 1), **win.summary(rate)}
                    if profile:
                        profiler = cProfile.Profile()
                        profiler.enable()
                        await asyncio.sleep(min(seconds, 5.0))
                        profiler.disable()
                        sys.stderr.write(f"---- cProfile, gateway flat out, N={n}\n")
                        sys.stderr.write(profile_report(profiler, 30))
                finally:
                    await stop_gateway(gw.task)
                raw_b = await raw.window(half, warmup)

        rates = [raw_a[0], raw_b[0]]
        wins = [raw_a[1], raw_b[1]]
        both = Window(
            sum(w.wall_s for w in wins),
            sum(w.cpu_s for w in wins),
            sum(w.sims_cpu_s for w in wins),
            sum(w.broker_cpu_s for w in wins),
        )
        raw_rate = statistics.fmean(rates)
        result["raw"] = {
            "polls_per_s": round(raw_rate, 1),
            "before_after": [round(r, 1) for r in rates],
            "errors": raw_a[2] + raw_b[2],
            **both.summary(raw_rate),
        }
        fast = result["fast"]["polls_per_s"]
        result["ratio"] = round(fast / raw_rate, 3) if raw_rate else None
    return result


# =============================================================================== orchestrator


def print_table(results: list[dict[str, Any]]) -> None:
    ok = [r for r in results if "error" not in r]
    print()
    print("Scan rate (flat out: raw pymodbus vs gateway with poll_interval_s=0.001)")
    head = (
        f"{'devices':>7}  {'raw polls/s':>11}  {'raw before/after':>16}  "
        f"{'gateway polls/s':>15}  {'ratio':>5}  "
        f"{'CPU µs/poll raw/gw':>18}  {'gw CPU%':>7}  {'sims CPU% raw/gw':>16}  "
        f"{'broker CPU%':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in ok:
        raw, fast = r["raw"], r["fast"]
        sims = f"{raw['sims_cpu_pct']:.0f}/{fast['sims_cpu_pct']:.0f}"
        cpu = f"{fmt(raw['cpu_us_per_poll'], '.0f')}/{fmt(fast['cpu_us_per_poll'], '.0f')}"
        spread = "/".join(f"{x:.0f}" for x in raw["before_after"])
        print(
            f"{r['devices']:>7}  {raw['polls_per_s']:>11.0f}  {spread:>16}  "
            f"{fast['polls_per_s']:>15.0f}  "
            f"{fmt(r['ratio'], '.2f'):>5}  {cpu:>18}  {fast['cpu_pct']:>7.0f}  {sims:>16}  "
            f"{fast['broker_cpu_pct']:>11.1f}"
        )
    print()
    print("Production-like (poll_interval_s=1, control_period_s=1)")
    head = (
        f"{'devices':>7}  {'connect s':>9}  {'polls/s (ideal)':>15}  {'gw CPU%':>7}  "
        f"{'dispatch p50/max ms':>19}  {'active ack p50/max':>18}  {'release p50/max':>15}  "
        f"{'RSS/device KiB':>14}"
    )
    print(head)
    print("-" * len(head))
    for r in ok:
        slow, lat = r["slow"], r["latency"]

        def pair(key: str, lat: dict[str, Any] = lat) -> str:
            return f"{fmt(lat[key]['p50_ms'], '.0f')}/{fmt(lat[key]['max_ms'], '.0f')}"

        polls = f"{slow['polls_per_s']:.1f} ({slow['ideal_per_s']:.0f})"
        print(
            f"{r['devices']:>7}  {r['connect_s']:>9.2f}  {polls:>15}  {slow['cpu_pct']:>7.1f}  "
            f"{pair('dispatch'):>19}  {pair('active_ack'):>18}  {pair('release'):>15}  "
            f"{r['rss_per_device_kib']:>14.1f}"
        )
    print()
    for r in ok:
        lat = r["latency"]
        print(
            f"N={r['devices']}: {lat['reps']} reps; dispatch s {lat['dispatch_s']} "
            f"(gateway had all write replies at {lat['gateway_wrote_all_s']}); "
            f"active ack s {lat['active_ack_s']}; release s {lat['release_s']}; "
            f"max shortfall {lat['max_shortfall_kw']} kW; raw errors {r['raw']['errors']}; "
            f"RSS {r['rss_before_mib']} -> {r['rss_after_mib']} MiB"
        )
        for failure in lat["failures"]:
            print(f"  FAILURE: {failure}")
    if len(ok) >= 2:
        lo, hi = min(ok, key=lambda r: r["devices"]), max(ok, key=lambda r: r["devices"])
        grow = (hi["rss_after_mib"] - hi["rss_before_mib"]) - (
            lo["rss_after_mib"] - lo["rss_before_mib"]
        )
        marginal = 1024 * grow / (hi["devices"] - lo["devices"])
        print(
            f"marginal RSS per device (N={lo['devices']} -> {hi['devices']}, fixed costs "
            f"cancelled): {marginal:.1f} KiB"
        )
    for r in results:
        if "error" in r:
            print(f"N={r['devices']}: FAILED: {r['error']}")


def orchestrate(args: argparse.Namespace) -> int:
    devices = [int(x) for x in args.devices.split(",") if x.strip()]
    print_command("bench.sunspec_fleet")
    print(
        f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
        f"({platform.python_implementation()}) {platform.system()} {platform.machine()}"
    )
    try:
        import pymodbus

        print(f"pymodbus {pymodbus.__version__}; sims step_s={args.sim_step_s}")
    except ImportError:
        pass
    print(
        f"per N: {args.seconds:g} s per measurement window, {args.reps} dispatch/cancel reps; "
        f"sims in a child process, gateway + raw client in a worker process",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    for n in devices:
        bound = 90 + 5 * args.seconds + 10 * args.reps + 0.2 * n
        cmd = [
            sys.executable,
            "-m",
            "bench.sunspec_fleet",
            "--worker",
            str(n),
            "--seconds",
            str(args.seconds),
            "--reps",
            str(args.reps),
            "--sim-step-s",
            str(args.sim_step_s),
        ]
        if args.profile:
            cmd.append("--profile")
        print(f"... N={n}", flush=True)
        result = run_worker(cmd, bound, "worker")
        results.append({"devices": n, **result} if "error" in result else result)
    print_table(results)
    if args.json:
        write_results(args.json, results, cpu=False)
    return 0 if all("error" not in r for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser("bench.sunspec_fleet", __doc__)
    parser.add_argument("--devices", default="50,200", help="comma-separated fleet sizes")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    parser.add_argument("--reps", type=int, default=4, help="dispatch/cancel repetitions")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the flat-out gateway (extra window; report on stderr)",
    )
    parser.add_argument(
        "--sim-step-s",
        type=float,
        default=1.0,
        help="simulator physics step (larger = less simulator CPU)",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sims", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 120 or not 1 <= args.reps <= 50:
        parser.error("--seconds must be in (0, 120] and --reps in [1, 50]")
    setup_logging()
    if args.sims is not None:
        run(_sims_main(args.sims, args.sim_step_s))
        return 0
    if args.worker is not None:
        result = run(_worker(args.worker, args.seconds, args.reps, args.sim_step_s, args.profile))
        emit(result)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
