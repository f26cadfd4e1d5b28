"""The supervisor's own rules, with a scripted adapter (the e2e tests use real devices)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from gateway.devices import DeviceRejected, DeviceUnavailable
from gateway.supervisor import DeviceSupervisor
from unified.model import DeviceCommand, DeviceState, utcnow


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
    caplog.set_level(logging.INFO, logger="gateway.supervisor")
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
    def __init__(self) -> None:
        super().__init__()
        self.applied: list[DeviceCommand] = []

    async def read(self) -> DeviceState:
        self.reads += 1
        return DeviceState(device_id="d1", timestamp=utcnow(), power_kw=0.0, source="t")

    async def apply(self, command: DeviceCommand) -> None:
        self.applied.append(command)


class LapsesByItself(ReadsFine):
    """Commands carry a hold time (an MQTT device): a ``CommandsLapse``."""

    hold_s = 300.0


@pytest.mark.parametrize("release_on_connect", [True, False])
async def test_release_on_connect_only_where_commands_do_not_lapse(
    release_on_connect: bool,
) -> None:
    adapter = ReadsFine() if release_on_connect else LapsesByItself()
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


class DropsOnce(LapsesByItself):
    """A device with hold timers whose link drops once while it holds a command, and whose
    command is cancelled while it is away (``apply`` can be made to hang: a lost answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_reads = 0
        self.fail_connects = 0
        self.hang_applies = 0

    async def connect(self) -> None:
        if self.fail_connects:
            raise DeviceUnavailable("d1", "unreachable")
        await super().connect()

    async def read(self) -> DeviceState:
        if self.fail_reads:
            self.fail_reads -= 1
            raise DeviceUnavailable("d1", "link lost")
        return await super().read()

    async def apply(self, command: DeviceCommand) -> None:
        self.applied.append(command)
        if self.hang_applies:
            self.hang_applies -= 1
            await asyncio.sleep(10)  # the answer never comes: the supervisor times out


async def _until(predicate: object, seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("answer_lost", [False, True])
async def test_a_command_the_device_may_hold_is_released_after_a_reconnect(
    answer_lost: bool,
) -> None:
    """Hold-timer devices are not released on every connect (no storm), but one that got (or
    may have got) a command that was cancelled while it was away is released at once, rather
    than left running the cancelled event until its hold time ends."""
    adapter = DropsOnce()
    supervisor = DeviceSupervisor(
        adapter, poll_interval_s=0.05, io_timeout_s=0.3, refresh_s=60, backoff_max_s=0.1
    )
    task = asyncio.create_task(supervisor.run())
    try:
        await _until(lambda: adapter.reads >= 2)
        if answer_lost:  # the command goes out, its answer never comes, the device is gone
            adapter.hang_applies, adapter.fail_connects = 1, 1
        supervisor.command(DeviceCommand(device_id="d1", power_kw=-1.0))
        await _until(lambda: len(adapter.applied) == 1)
        if not answer_lost:
            adapter.fail_reads = 1_000  # the link drops after the command got through
        await _until(lambda: not supervisor.available)
        supervisor.command(None)  # cancelled while the device is away
        adapter.fail_reads = adapter.fail_connects = 0  # it comes back
        await _until(lambda: any(c.power_kw is None for c in adapter.applied))
        release = adapter.applied[-1]
        assert release.power_kw is None
        assert release.import_limit_kw is None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_device_never_commanded_is_not_released_after_a_reconnect() -> None:
    adapter = DropsOnce()
    supervisor = DeviceSupervisor(
        adapter, poll_interval_s=0.05, io_timeout_s=0.3, refresh_s=60, backoff_max_s=0.1
    )
    task = asyncio.create_task(supervisor.run())
    try:
        await _until(lambda: adapter.reads >= 2)
        adapter.fail_reads = 3
        await _until(lambda: adapter.fail_reads == 0 and adapter.reads >= 6)
        assert adapter.applied == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class RefusesSome(ReadsFine):
    """Takes the first setpoint, then refuses what ``refuse`` says (Modbus exception 4)."""

    def __init__(self, refuse: Callable[[DeviceCommand], bool]) -> None:
        super().__init__()
        self.refuse = refuse
        self.attempts: list[DeviceCommand] = []

    async def apply(self, command: DeviceCommand) -> None:
        self.attempts.append(command)
        if self.refuse(command):
            raise DeviceRejected("d1", "exception 4 (server device failure)", code=4)
        self.applied.append(command)


async def test_a_refused_change_after_the_refresh_time_does_not_spin_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An override refuses a changed setpoint while the earlier one is applied and its refresh
    time has passed: the supervisor waits for its next poll, it does not busy-loop."""
    adapter = RefusesSome(lambda c: c.power_kw == -2.0)
    supervisor = DeviceSupervisor(adapter, poll_interval_s=0.2, io_timeout_s=1, refresh_s=0.1)
    task = asyncio.create_task(supervisor.run())
    try:
        supervisor.command(DeviceCommand(device_id="d1", power_kw=-1.0))
        await _until(lambda: len(adapter.applied) >= 1)
        await asyncio.sleep(0.15)  # the applied setpoint's refresh time passes
        caplog.set_level(logging.WARNING, logger="gateway.supervisor")
        supervisor.command(DeviceCommand(device_id="d1", power_kw=-2.0))
        await _until(lambda: any(c.power_kw == -2.0 for c in adapter.attempts))
        cpu = time.process_time()
        reads = adapter.reads
        await asyncio.sleep(1.0)
        cpu = time.process_time() - cpu
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert cpu < 0.4, f"{cpu:.2f} s of CPU in 1 s: the supervisor spins"
    assert 3 <= adapter.reads - reads <= 7  # still polled at its interval
    assert sum(c.power_kw == -2.0 for c in adapter.attempts) == 1  # refused once, not retried
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1


async def test_a_refused_release_is_not_rewritten_every_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.supervisor")
    adapter = RefusesSome(lambda c: c.power_kw is None)
    supervisor = DeviceSupervisor(adapter, poll_interval_s=0.05, io_timeout_s=1, refresh_s=60)
    task = asyncio.create_task(supervisor.run())
    try:
        await _until(lambda: adapter.reads >= 10)  # 0.5 s of polls after the refused release
        supervisor.command(DeviceCommand(device_id="d1", power_kw=-1.0))
        await _until(lambda: len(adapter.applied) == 1)  # a new setpoint is still written
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    releases = [c for c in adapter.attempts if c.power_kw is None]
    assert len(releases) == 1, f"release written {len(releases)} times"
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
