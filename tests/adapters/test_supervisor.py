"""The supervisor's own rules, with a scripted adapter (the e2e tests use real devices)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from adapters.base import DeviceUnavailable
from adapters.supervisor import DeviceSupervisor
from gateway.model import DeviceCommand, DeviceState, utcnow


class ConnectsButNeverReads:
    """Like a 2030.5 client that has not posted yet: connect succeeds, every read fails."""

    def __init__(self) -> None:
        self.connects = 0
        self.reads = 0

    @property
    def device_id(self) -> str:
        return "d1"

    async def connect(self) -> None:
        self.connects += 1

    async def close(self) -> None:
        return None

    async def read(self) -> DeviceState:
        self.reads += 1
        raise DeviceUnavailable("d1", "nothing reported yet")

    async def apply(self, command: DeviceCommand) -> None:
        return None


async def test_failing_reads_back_off_and_never_starve_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="adapters.supervisor")
    adapter = ConnectsButNeverReads()
    supervisor = DeviceSupervisor(
        adapter,
        poll_interval_s=0.05,
        io_timeout_s=1,
        refresh_s=60,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    task = asyncio.create_task(supervisor.run())
    started = time.monotonic()
    await asyncio.sleep(1.0)  # must come back on time: the supervisor yields
    elapsed = time.monotonic() - started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert elapsed < 1.5
    assert 3 <= adapter.reads <= 60, adapter.reads  # retried, but with backoff, not spinning
    down = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == 1


async def test_fresh_state_expires() -> None:
    supervisor = DeviceSupervisor(
        ConnectsButNeverReads(), poll_interval_s=1, io_timeout_s=1, refresh_s=60
    )
    supervisor.available = True
    supervisor.latest = DeviceState(device_id="d1", timestamp=utcnow(), power_kw=1.0, source="t")
    assert supervisor.fresh_state(10) is not None
    assert supervisor.fresh_state(-1) is None


class ReadsFine(ConnectsButNeverReads):
    def __init__(self, release_on_connect: bool) -> None:
        super().__init__()
        self.release_on_connect = release_on_connect
        self.applied: list[DeviceCommand] = []

    async def read(self) -> DeviceState:
        self.reads += 1
        return DeviceState(device_id="d1", timestamp=utcnow(), power_kw=0.0, source="t")

    async def apply(self, command: DeviceCommand) -> None:
        self.applied.append(command)


@pytest.mark.parametrize("release_on_connect", [True, False])
async def test_release_on_connect_only_where_commands_do_not_lapse(
    release_on_connect: bool,
) -> None:
    adapter = ReadsFine(release_on_connect)
    supervisor = DeviceSupervisor(adapter, poll_interval_s=0.05, io_timeout_s=1, refresh_s=60)
    task = asyncio.create_task(supervisor.run())
    try:
        for _ in range(100):  # up to 2 s, for three polls
            if adapter.reads >= 3:
                break
            await asyncio.sleep(0.02)
        # A battery is told "release" after every connect; an MQTT device with hold timers is
        # not (a fleet reconnecting at once would storm the broker), ...
        assert len(adapter.applied) == (1 if release_on_connect else 0)
        # ... but either gets a real command as soon as there is one.
        supervisor.command(DeviceCommand(device_id="d1", power_kw=-1.0))
        deadline = time.monotonic() + 2
        while not any(c.power_kw == -1.0 for c in adapter.applied):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
