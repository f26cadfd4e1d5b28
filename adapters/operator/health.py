"""Liveness and readiness: what an orchestrator (systemd, Kubernetes, a load balancer) asks.

*Live*: the event loop answers (it does, if this code runs) and the control loop finished a
cycle within ``stall_periods`` of its period (before its first cycle: within the start-up
grace). A gateway that is not live should be restarted.

*Ready*: live, and it can do its job: the Grid DERMS broker link is up, the command store can
be written (a commanded setpoint must be stored before it is acked), and the control and
telemetry loops are ticking. A gateway that is not ready says which check failed.

The store check touches the disk, so it runs off the event loop on a period of its own and the
endpoints read its last result; a check that has not come back for two periods (a hung disk)
counts as failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.cycles import CycleStats

__all__ = ["Check", "StoreProbe", "Verdict", "loop_check", "probe_store_dir"]

log = logging.getLogger(__name__)

_MIN_STALL_S = 5.0
"""A loop is never called stalled sooner than this (a long GC pause, a fleet-wide fan-out)."""


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Verdict:
    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, c in self.checks.items() if not c.ok]

    def as_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "checks": {name: c.as_json() for name, c in self.checks.items()},
        }


def loop_check(
    name: str,
    stats: CycleStats,
    stall_periods: float,
    *,
    started_for_s: float,
    grace_s: float | None = None,
) -> Check:
    """Whether a periodic loop is ticking: its last cycle ended within ``stall_periods`` of its
    period (at least 5 s). Before its first cycle it is starting while ``started_for_s`` is
    within ``grace_s`` (default: that same limit), and stalled after."""
    limit = max(_MIN_STALL_S, stall_periods * stats.period_s)
    age = stats.age_s()
    if age is None:
        if started_for_s <= (limit if grace_s is None else grace_s):
            return Check(True, f"{name} loop starting ({started_for_s:.0f} s since start)")
        return Check(False, f"{name} loop has not finished a cycle in {started_for_s:.0f} s")
    if age > limit:
        return Check(
            False, f"{name} loop stalled: last cycle ended {age:.1f} s ago (> {limit:g} s)"
        )
    took = 1000 * (stats.last_s or 0.0)
    return Check(True, f"last cycle ended {age:.1f} s ago, took {took:.1f} ms")


def probe_store_dir(store: Path, min_free_bytes: float) -> Check:
    """Can the command store's folder take a write now? Blocking: run it in a thread.

    A real write (a small file created and removed beside the store, where SQLite keeps its
    journal) is the only test that a read-only remount, a failing card or a quota cannot fool;
    permission bits are no test for root. Then the free space.
    """
    folder = store.parent
    probe = folder / f".{store.name}.ready-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        os.unlink(probe)
        fs = os.statvfs(folder)
    except OSError as exc:
        return Check(False, f"cannot write beside {store}: {exc.strerror or exc}")
    free = fs.f_bavail * fs.f_frsize
    if free < min_free_bytes:
        return Check(False, f"{free / 2**20:.1f} MiB free beside {store}")
    return Check(True, f"writable, {free / 2**30:.1f} GiB free")


class StoreProbe:
    """The command store's writability, checked every ``every_s`` in a thread; :meth:`result`
    is the last answer, or a failure when none came back within two periods."""

    def __init__(
        self,
        store: Path,
        *,
        every_s: float,
        min_free_bytes: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.every_s = every_s
        self.min_free_bytes = min_free_bytes
        self._monotonic = monotonic
        self._last: Check | None = None
        self._at: float | None = None
        self._started = monotonic()

    def result(self) -> Check:
        now = self._monotonic()
        since = now - (self._at if self._at is not None else self._started)
        if since > max(2 * self.every_s, 10.0):
            return Check(False, f"store check has not answered for {since:.0f} s (disk hung?)")
        if self._last is None:
            return Check(False, "store not checked yet")
        return self._last

    async def check_once(self) -> Check:
        result = await asyncio.to_thread(probe_store_dir, self.store, self.min_free_bytes)
        if self._last is not None and result.ok != self._last.ok:
            if result.ok:
                log.info("command store writable again: %s", result.detail)
            else:
                log.warning("command store not writable: %s", result.detail)
        elif self._last is None and not result.ok:
            log.warning("command store not writable: %s", result.detail)
        self._last, self._at = result, self._monotonic()
        return result

    async def run(self) -> None:
        """Check until cancelled. A hung check is waited for (never a second thread piling up
        on the same disk); meanwhile :meth:`result` reports it."""
        while True:
            try:
                await self.check_once()
            except Exception:  # a bug, not the disk (that is a failed check): keep probing
                log.exception("command store check failed")
            await asyncio.sleep(self.every_s)
