"""A real gateway over real mosquitto and real Modbus TCP battery simulators, for e2e tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from composition.app import GatewayApp
from composition.config import GatewayConfig, parse_config
from gateway.core import Gateway
from simulators.broker import BrokerEndpoint
from simulators.grid_derms import GridDermsClient
from simulators.sunspec_battery import SunSpecBatterySimulator
from unified.model import utcnow

FAST_TIMING = {
    "control_period_s": 0.2,
    "poll_interval_s": 0.3,
    "telemetry_period_s": 0.5,
    "stale_after_s": 2.0,
    "io_timeout_s": 1.0,
    "backoff_max_s": 1.0,
}


def iso(seconds_from_now: float) -> str:
    return (utcnow() + timedelta(seconds=seconds_from_now)).isoformat()


async def eventually(
    check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


class Fleet:
    """Simulators + gateway + Grid DERMS client; the gateway can be stopped and restarted."""

    def __init__(
        self,
        broker: BrokerEndpoint,
        store: Path,
        sims: list[SunSpecBatterySimulator],
        *,
        feeders: tuple[str, ...] = ("f1", "f2"),
        reserve_soc_pct: float = 20.0,
        extra_config: dict[str, Any] | None = None,
        sections: tuple[str | None, ...] = (),
    ) -> None:
        self.broker = broker
        self.store = store
        self.sims = sims
        self.gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        self.feeders = feeders
        self.reserve = reserve_soc_pct
        self.extra_config = extra_config or {}
        self.sections = sections
        """Feeder section of each simulator's battery (none when not given)."""
        self.app: GatewayApp | None = None
        self.gateway: Gateway | None = None
        """The running app's core."""
        self._task: asyncio.Task[None] | None = None
        self.client: GridDermsClient | None = None
        self._stack = contextlib.AsyncExitStack()

    def device_id(self, i: int) -> str:
        return f"bat-{i + 1}"

    def feeder_of(self, i: int) -> str:
        return self.feeders[i % len(self.feeders)]

    def location_of(self, i: int) -> dict[str, str]:
        location = {"substation": "s1", "feeder": self.feeder_of(i)}
        section = self.sections[i] if i < len(self.sections) else None
        if section is not None:
            location["feeder_section"] = section
        return location

    def config(self) -> GatewayConfig:
        devices: list[dict[str, Any]] = []
        for i, sim in enumerate(self.sims):
            devices.append(
                {
                    "device_id": self.device_id(i),
                    "der_class": "battery",
                    "location": self.location_of(i),
                    "adapter": "sunspec_battery",
                    "ratings": {
                        "max_charge_kw": sim.max_charge_kw,
                        "max_discharge_kw": sim.max_discharge_kw,
                        "capacity_kwh": sim.capacity_kwh,
                    },
                    "constraints": {"reserve_soc_pct": self.reserve},
                    "sunspec": {"port": sim.port, "timeout_s": 1.0},
                }
            )
        return parse_config(
            {
                "gateway_id": self.gateway_id,
                "broker": {
                    "host": self.broker.host,
                    "port": self.broker.port,
                    "protocol": self.broker.protocol,
                },
                "store": {"path": str(self.store)},
                "settlement": {"timezone": "UTC"},
                "timing": FAST_TIMING,
                "devices": devices,
            }
            | self.extra_config
        )

    async def __aenter__(self) -> Fleet:
        for sim in self.sims:
            await self._stack.enter_async_context(sim)
        self.client = await self._stack.enter_async_context(
            GridDermsClient(
                self.broker.host, self.broker.port, self.gateway_id, protocol=self.broker.protocol
            )
        )
        await self.start_gateway()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_gateway()
        await self._stack.aclose()

    async def start_gateway(self) -> Gateway:
        app = GatewayApp(self.config())
        self.app, self.gateway = app, app.core
        gateway = app.core
        self._task = asyncio.create_task(app.run(), name="gateway-under-test")
        await asyncio.wait_for(app.northbound.connected.wait(), 10)
        # Every device polled at least once, so the planner knows its SoC.
        # (Those retired through the registry API stay out of it.)
        own = [self.device_id(i) for i in range(len(self.sims))]
        own = [d for d in own if d in gateway.registry]
        await eventually(
            lambda: all(gateway.supervisors[d].available for d in own), 10, "all devices online"
        )
        return gateway

    async def stop_gateway(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            if not done:
                for t in asyncio.all_tasks():
                    t.print_stack(limit=6)
                raise RuntimeError("gateway did not stop within 5 s of cancellation")
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def grid(self) -> GridDermsClient:
        assert self.client is not None
        return self.client

    def feeder_power_kw(self, feeder: str) -> float:
        return sum(s.power_kw for i, s in enumerate(self.sims) if self.feeder_of(i) == feeder)
