"""Wall-clock steps: noticed, said, and kept out of the control loop's sense of elapsed time.

Commands are in wall-clock time ("16:00 for 3 h"), so their lifecycle follows the wall clock,
and a wall clock that is stepped (NTP correcting a drifted RTC after a site reboot, an operator
setting the date, a VM resumed from a snapshot) moves their start and end as seen from here.
That is right, since the new clock is the one that agrees with Grid DERMS, but it must never
happen silently: a command would end an hour early, or run an hour long, and nobody would know.

:class:`ClockWatch` compares the wall clock's progress with the monotonic clock's between
control cycles. A difference beyond what NTP's slewing can produce (500 ppm) and a tolerance is
a step: the core logs it, moves the timestamps its control state keeps (a dispatch loop's last
update, a thermostat's turn, a staggered release) by the step so that elapsed time stays true,
and every open command's next ack says the clock moved and by how much.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["STEP_DETAIL", "ClockStep", "ClockWatch"]

STEP_DETAIL = "the gateway's wall clock stepped"
"""How an ack's detail starts when it tells of a step."""
SLEW_PPM = 500.0
"""The largest rate at which NTP slews a clock instead of stepping it."""


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The wall clock moved by ``step`` more than the time that passed, seen at ``at``."""

    at: datetime
    step: timedelta

    def describe(self) -> str:
        seconds = self.step.total_seconds()
        way = "forward" if seconds > 0 else "back"
        return (
            f"{STEP_DETAIL} {way} by {abs(seconds):.0f} s at "
            f"{self.at.isoformat()}; command times are kept by the new clock"
        )


class ClockWatch:
    """Detects steps of the wall clock between successive :meth:`observe` calls."""

    def __init__(
        self, tolerance_s: float = 2.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.tolerance_s = tolerance_s
        self._monotonic = monotonic
        self._last: tuple[datetime, float] | None = None
        self.steps = 0
        """Steps seen since start (for status and metrics)."""

    def observe(self, now: datetime) -> ClockStep | None:
        """The step since the previous call, if the wall clock made one."""
        mono = self._monotonic()
        last, self._last = self._last, (now, mono)
        if last is None:
            return None
        wall_s = (now - last[0]).total_seconds()
        mono_s = mono - last[1]
        drift_s = wall_s - mono_s
        if abs(drift_s) <= self.tolerance_s + mono_s * SLEW_PPM * 1e-6:
            return None
        self.steps += 1
        return ClockStep(now, timedelta(seconds=drift_s))
