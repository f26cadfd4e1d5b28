"""Registry benchmark: enrol 10,000 batteries through the registry API while the gateway runs.

In process, with the core's real loops (control every 1 s, telemetry, the reading history)
over a base fleet of polled batteries (instant in-memory adapters, no network): the registry
requests go to :meth:`Gateway.registry_request` exactly as the uplink hands them over. Measured:

* time to done: one bulk request of N devices; then M requests of one device each;
* control-loop lag while it runs: each control cycle's duration (p50 / p99 / max) and the event
  loop's lag (a 50 ms ticker's overshoot, p99 / max);
* no loss of a device's history: every base battery's 1-s history buckets over the run, against
  the number of seconds it ran (a gap would show as missing buckets).

``python -m bench.registry_enrolment [--bulk 10000] [--single 2000] [--base 200]``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import arg_parser, machine_summary, pct
from composition.config import parse_config
from gateway.core import Gateway
from unified.model import Device, DeviceCommand, DeviceState, utcnow
from unified.registry import REGISTRY_REQUEST_ADAPTER


class InstantBattery:
    """A battery that answers every poll at once (the bench measures the core, not Modbus)."""

    def __init__(self, device_id: str) -> None:
        self._id = device_id
        self._kw = 0.0

    @property
    def device_id(self) -> str:
        return self._id

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def read(self) -> DeviceState:
        return DeviceState(
            device_id=self._id,
            timestamp=utcnow(),
            power_kw=self._kw,
            soc_pct=60.0,
            capacity_kwh=10.0,
            max_charge_kw=5.0,
            max_discharge_kw=5.0,
            source="bench",
        )

    async def apply(self, command: DeviceCommand) -> None:
        self._kw = command.power_kw or 0.0


def factory(device: Device, reach: Mapping[str, Any]) -> InstantBattery:
    return InstantBattery(device.device_id)


def battery(device_id: str, i: int, **extra: Any) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "der_class": "battery",
        "adapter": "sunspec_battery",
        "location": {"substation": f"s{i % 4}", "feeder": f"f{i % 40}"},
        "ratings": {"max_charge_kw": 5, "max_discharge_kw": 5, "capacity_kwh": 10},
        **extra,
    }


class Publisher:
    def ack(self, *args: object) -> None: ...
    def group_telemetry(self, *args: object) -> None: ...
    def device_telemetry(self, *args: object) -> None: ...
    def flex_forecast(self, *args: object) -> None: ...
    def performance_report(self, *args: object) -> None: ...


async def bench(bulk: int, single: int, base: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            {
                "store": {"path": str(Path(tmp) / "gw.sqlite")},
                "history": {"interval_s": 1, "flush_s": 1.0},
                "settlement": {"enabled": False},
                "audit": {"enabled": False},
                "timing": {"control_period_s": 1.0, "poll_interval_s": 2.0},
                "devices": [
                    battery(f"base-{i}", i, sunspec={"port": 1000 + i}) for i in range(base)
                ],
            }
        )
        core = Gateway(
            config,
            devices=[d.as_device() for d in config.devices],
            adapters={f"base-{i}": InstantBattery(f"base-{i}") for i in range(base)},
            publisher=Publisher(),
            adapter_factory=factory,
        )
        cycles: list[float] = []
        control_once = core.control_once

        async def timed_control() -> Any:
            t0 = time.perf_counter()
            try:
                return await control_once()
            finally:
                cycles.append(time.perf_counter() - t0)

        core.control_once = timed_control  # type: ignore[method-assign]
        lags: list[float] = []

        async def ticker() -> None:
            while True:
                t0 = time.perf_counter()
                await asyncio.sleep(0.05)
                lags.append(time.perf_counter() - t0 - 0.05)

        task = asyncio.create_task(core.run())
        await asyncio.wait_for(core.ready.wait(), 30)
        await asyncio.sleep(3.0)  # the base fleet polled, the history writing
        started = utcnow()
        tick = asyncio.create_task(ticker())
        cycles.clear()
        out: dict[str, Any] = {"base": base}
        try:
            if bulk:
                devices = [battery(f"bulk-{i}", i, reach={}) for i in range(bulk)]
                request = REGISTRY_REQUEST_ADAPTER.validate_python(
                    {"request_id": "bulk", "op": "enrol", "devices": devices}
                )
                t0 = time.perf_counter()
                ack, _ = await core.registry_request(request)
                out["bulk"] = {"devices": bulk, "state": ack.state, "s": time.perf_counter() - t0}
            if single:
                t0 = time.perf_counter()
                for i in range(single):
                    request = REGISTRY_REQUEST_ADAPTER.validate_python(
                        {
                            "request_id": f"one-{i}",
                            "op": "enrol",
                            "devices": [battery(f"one-{i}", i, reach={})],
                        }
                    )
                    ack, _ = await core.registry_request(request)
                    assert ack.state == "applied", ack
                took = time.perf_counter() - t0
                out["single"] = {
                    "devices": single,
                    "s": took,
                    "per_request_ms": took / single * 1e3,
                }
            await asyncio.sleep(3.0)  # a few control cycles over the whole fleet
        finally:
            tick.cancel()
            ended = utcnow()
            assert core.history is not None
            await core.history.flush()
            gaps = 0
            seconds = int((ended - started).total_seconds()) - 2
            for i in range(base):
                rows = await core.history.buckets(
                    f"base-{i}", started + timedelta(seconds=1), ended - timedelta(seconds=1)
                )
                # Polled every 2 s into 1-s buckets: at most one empty bucket in two.
                gaps += max(0, seconds // 2 - 1 - len(rows))
            out["history"] = {"base_devices": base, "seconds": seconds, "missing_buckets": gaps}
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        out["devices_after"] = len(core.registry)
        out["control_cycle_s"] = {
            "n": len(cycles),
            "p50": pct(cycles, 0.5),
            "p99": pct(cycles, 0.99),
            "max": max(cycles, default=None),
        }
        out["loop_lag_s"] = {"p99": pct(lags, 0.99), "max": max(lags, default=None)}
        return out


def main() -> None:
    parser = arg_parser("bench.registry_enrolment", __doc__)
    parser.add_argument("--bulk", type=int, default=10_000)
    parser.add_argument("--single", type=int, default=2_000)
    parser.add_argument("--base", type=int, default=200)
    args = parser.parse_args()
    print(machine_summary())
    result = asyncio.run(bench(args.bulk, args.single, args.base))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
