"""Keeps one device adapter connected, polled and obeying its latest setpoint.

One supervisor task per device. It owns the device's transport, so polls and writes never
interleave on it; it reconnects with jittered exponential backoff; it logs once when the device
becomes unavailable and once when it recovers; and it re-applies the desired setpoint after a
reconnect, so a device that blinked does not silently drop out of an event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from gateway.aio import raise_if_cancelling
from gateway.devices import (
    AdapterError,
    CommandsLapse,
    DeviceAdapter,
    DeviceRejected,
    UnsafeCommand,
)
from unified.model import DeviceCommand, DeviceState

log = logging.getLogger(__name__)
T = TypeVar("T")

StateListener = Callable[[DeviceState], None]
ResultListener = Callable[[DeviceCommand, AdapterError | None], None]


class DeviceSupervisor:
    def __init__(
        self,
        adapter: DeviceAdapter,
        *,
        poll_interval_s: float,
        io_timeout_s: float,
        refresh_s: float,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_state: StateListener | None = None,
        on_result: ResultListener | None = None,
    ) -> None:
        self.adapter = adapter
        self.device_id = adapter.device_id
        self._poll_interval_s = poll_interval_s
        self._io_timeout_s = io_timeout_s
        self._refresh_s = refresh_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._on_state = on_state
        self._on_result = on_result
        self._wake = asyncio.Event()
        self._desired: DeviceCommand | None = None
        self._applied: DeviceCommand | None = None
        self._in_doubt = False  # a write failed without a verdict: the device may hold it
        self._applied_at = 0.0
        self._refused: DeviceCommand | None = None
        self._refusing = False
        """The device refused writing ``_refused`` (None: the release): not asked again until
        the planner wants something else or the device reconnects."""
        self._must_write = True
        self._release_on_connect = not isinstance(adapter, CommandsLapse)
        self._served_ok = False
        self.available = False
        self._announced_down = False
        self.latest: DeviceState | None = None
        self.last_error: str | None = None
        self.writes = 0

    # ------------------------------------------------------------------ control side
    @property
    def desired(self) -> DeviceCommand | None:
        return self._desired

    @property
    def released(self) -> bool:
        """Nothing asked of the device and nothing left on it (a release was written)."""
        return self._desired is None and self._applied is None and not self._in_doubt

    def command(self, command: DeviceCommand | None) -> None:
        """Ask for a new setpoint; it is written as soon as the device can take it."""
        if command == self._desired:
            return
        self._desired = command
        self._wake.set()

    # ------------------------------------------------------------------ the task
    async def run(self) -> None:
        failures = 0
        try:
            while True:
                await self._connect_with_backoff()
                try:
                    await self._serve()
                except AdapterError as exc:
                    self._mark_down(exc)
                    await self._safe_close()
                # A device that accepts the connection but fails every poll (or an adapter whose
                # connect is local, like a 2030.5 client that has not posted yet) would otherwise
                # spin here without ever yielding: back off as for a failed connect.
                failures = 0 if self._served_ok else failures + 1
                self._served_ok = False
                await asyncio.sleep(self._backoff_s(failures))
        finally:
            await self._safe_close()

    def _backoff_s(self, failures: int) -> float:
        if failures == 0:
            return 0.0
        ceiling = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(failures - 1, 16))
        return random.uniform(0.0, ceiling)

    async def _connect_with_backoff(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(AdapterError),
            wait=wait_random_exponential(
                multiplier=self._backoff_initial_s, max=self._backoff_max_s
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    async with asyncio.timeout(self._io_timeout_s * 3):
                        await self.adapter.connect()
                except TimeoutError:
                    await self._safe_close()
                    exc: AdapterError = AdapterError(self.device_id, "connect timed out")
                    self._mark_down(exc)
                    raise exc from None
                except AdapterError as err:
                    await self._safe_close()
                    self._mark_down(err)
                    raise
        raise_if_cancelling()
        # Whatever the device was doing (an old setpoint, a revert), it must be told again what
        # we want after a reconnect: a setpoint, or an explicit release. Devices whose commands
        # lapse by themselves (:class:`gateway.devices.CommandsLapse`: MQTT devices with hold
        # timers) need no release, and a fleet of them reconnecting at once must not storm the
        # broker. Devices whose commands lapse by themselves still hold one until its hold time runs
        # out: if a command reached the device (or a write failed half-way, so it may have),
        # release it now rather than leave a cancelled event running for up to its hold time.
        holding = self._applied is not None or self._in_doubt
        self._applied = None
        self._refusing = False  # a device that came back may take what it refused
        self._must_write = self._desired is not None or self._release_on_connect or holding

    async def _serve(self) -> None:
        interval = self._poll_interval_s
        next_poll = time.monotonic()  # poll at once after a connect: the planner needs the SoC
        first = True
        while True:
            now = time.monotonic()
            if self._needs_write(now):
                await self._write()
            if now >= next_poll:
                state = await self._io(self.adapter.read())
                if first:
                    # A random phase per device spreads a fleet's polls over the interval
                    # instead of polling every device in one burst.
                    next_poll = time.monotonic() + interval * random.uniform(0.25, 1.0)
                    first = False
                else:
                    # A fixed cadence: the read time must not stretch the interval. After a
                    # stall, skip the missed polls rather than catch up in a burst.
                    next_poll += interval
                    if next_poll <= time.monotonic():
                        next_poll = time.monotonic() + interval
                self.latest = state
                self._served_ok = True
                self._mark_up()
                if self._on_state is not None:
                    self._on_state(state)
            timeout = max(0.0, next_poll - time.monotonic())
            if self._refresh_due():
                timeout = min(timeout, max(0.0, self._applied_at + self._refresh_s - now))
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    def _refresh_due(self) -> bool:
        """The desired setpoint is the one on the device and will be written again at
        ``refresh_s``: only then does the loop wake for it (a refused one is not refreshed, so
        the wait is never computed from a refresh that will not happen)."""
        desired = self._desired
        return (
            desired is not None
            and desired == self._applied
            and not (self._refusing and desired == self._refused)
        )

    def _needs_write(self, now: float) -> bool:
        desired = self._desired
        if self._refusing and desired == self._refused:
            return False
        if self._must_write:
            return True
        if desired is None and self._applied is None:
            return False
        if desired != self._applied:
            return True
        return desired is not None and now - self._applied_at >= self._refresh_s

    async def _write(self) -> None:
        desired = self._desired
        release = DeviceCommand(device_id=self.device_id, power_kw=None)
        command = desired if desired is not None else release
        self._in_doubt = True
        try:
            await self._io(self.adapter.apply(command))
        except (DeviceRejected, UnsafeCommand) as exc:
            self._in_doubt = False
            # The device is fine but refuses this setpoint (or the release): do not hammer it
            # with the same one, and say so once.
            self._refused = desired
            self._refusing = True
            log.warning("%s refused setpoint %s kW: %s", self.device_id, command.power_kw, exc)
            if self._on_result is not None:
                self._on_result(command, exc)
            return
        self.writes += 1
        self._in_doubt = False
        self._must_write = False
        self._refused = None
        self._refusing = False
        self._applied = desired
        self._applied_at = time.monotonic()
        if self._on_result is not None:
            self._on_result(command, None)

    async def _io(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._io_timeout_s):
                result = await awaitable
        except TimeoutError:
            raise AdapterError(self.device_id, f"no answer within {self._io_timeout_s} s") from None
        raise_if_cancelling()
        return result

    async def _safe_close(self) -> None:
        try:
            async with asyncio.timeout(self._io_timeout_s):
                await self.adapter.close()
        except (AdapterError, TimeoutError, OSError) as exc:
            log.debug("%s: close failed: %s", self.device_id, exc)

    # ------------------------------------------------------------------ availability
    def _mark_down(self, exc: AdapterError) -> None:
        self.last_error = str(exc)
        if self.available or not self._announced_down:
            log.warning("device %s unavailable: %s", self.device_id, exc)
            self._announced_down = True
        self.available = False

    def _mark_up(self) -> None:
        if not self.available:
            if self._announced_down:
                log.info("device %s recovered", self.device_id)
            else:
                log.info("device %s online", self.device_id)
            self.available = True
            self._announced_down = False
            self.last_error = None

    def fresh_state(self, max_age_s: float, now: datetime | None = None) -> DeviceState | None:
        if not self.available or self.latest is None:
            return None
        now = now or datetime.now(UTC)
        if (now - self.latest.timestamp).total_seconds() > max_age_s:
            return None
        return self.latest
