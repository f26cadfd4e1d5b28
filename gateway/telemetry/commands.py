"""The commands in force, as telemetry needs to know them.

Screening and estimation judge a reading differently when the plan asks something of the device:
a battery held at −1 kW should read about −1 kW (one frozen at −0.7 kW is not doing what it is
told, and its steady value is no proof of health); a thermostat shed at 17:00 steps down *at*
17:00, so a reading taken at 16:59 is no longer its current value, and until reports after the
step arrive, the command's expected response is the best prior there is.

The core owns the plan and tells the board (``CommandBoard.update``) after every control cycle;
the quality classifier and the group estimator read the board. Nothing here imports the core:
the arrow runs core → telemetry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt

from gateway.telemetry.fleet import FleetIndex, FloatArray, IntArray


@dataclass(frozen=True, slots=True)
class CommandInForce:
    """What the plan asks of one device now.

    ``cohort`` names the devices that step together (one dispatch's devices; a released
    dispatch's devices under ``release:<id>``); ``expected_kw`` is the power the device should
    draw in response (its setpoint, or the level a released thermal load returns to), ``None``
    when the plan cannot say; ``held`` is true for a power setpoint the device should hold
    steady (a battery), false for commands a device follows on its own terms (a thermostat's
    offset, a limit).
    """

    cohort: str
    expected_kw: float | None = None
    held: bool = False


class CommandBoard:
    """Per-device arrays of the commands in force, and when each last changed."""

    def __init__(self, index: FleetIndex, *, step_kw: float = 0.25) -> None:
        self.index = index
        self.step_kw = step_kw
        n = len(index)
        self.expected_kw: FloatArray = np.full(n, np.nan)
        self.cohort: IntArray = np.zeros(n, dtype=np.intp)
        """0: no command; otherwise a code of ``cohort_names``."""
        self.held: npt.NDArray[np.bool_] = np.zeros(n, dtype=bool)
        self.changed_at: FloatArray = np.full(n, -np.inf)
        """Epoch seconds of the last start, change or end of a device's command."""
        self._codes: dict[str, int] = {}
        self.cohort_names: list[str] = [""]

    def extend(self, index: FleetIndex) -> None:
        """Devices were enrolled (appended to the index): they start with no command."""
        grow = len(index) - len(self.index)
        self.index = index
        self.expected_kw = np.r_[self.expected_kw, np.full(grow, np.nan)]
        self.cohort = np.r_[self.cohort, np.zeros(grow, dtype=np.intp)]
        self.held = np.r_[self.held, np.zeros(grow, dtype=bool)]
        self.changed_at = np.r_[self.changed_at, np.full(grow, -np.inf)]

    @property
    def n_cohorts(self) -> int:
        """Number of cohort codes, including 0 (none)."""
        return len(self.cohort_names)

    def code(self, cohort: str) -> int:
        code = self._codes.get(cohort)
        if code is None:
            code = self._codes[cohort] = len(self.cohort_names)
            self.cohort_names.append(cohort)
        return code

    def update(self, now: float | datetime, commands: Mapping[str, CommandInForce]) -> int:
        """The complete set of commands in force at ``now`` (devices absent have none).

        Returns how many devices' commands started, changed or ended.
        """
        t = now.timestamp() if isinstance(now, datetime) else float(now)
        n = len(self.index)
        expected = np.full(n, np.nan)
        cohort = np.zeros(n, dtype=np.intp)
        held = np.zeros(n, dtype=bool)
        row = self.index.row
        for device_id, command in commands.items():
            r = row.get(device_id)
            if r is None:
                continue
            cohort[r] = self.code(command.cohort)
            held[r] = command.held
            if command.expected_kw is not None:
                expected[r] = command.expected_kw
        return self.set_rows(t, cohort, expected, held)

    def set_rows(
        self, now: float, cohort: IntArray, expected: FloatArray, held: npt.NDArray[np.bool_]
    ) -> int:
        """Vectorised :meth:`update`: one cohort code, expectation and hold per device row.

        A *step* (``changed_at`` = ``now``) is a device joining a cohort (a command starting, a
        release), its expected power moving by more than ``step_kw``, or a hold let go. A
        dispatch ramping its setpoints by small amounts is no step, and a device leaving a
        release cohort for autonomy is none either: the step was its release.
        """
        old_nan, new_nan = np.isnan(self.expected_kw), np.isnan(expected)
        with np.errstate(invalid="ignore"):
            moved = np.abs(expected - self.expected_kw) > self.step_kw
        moved |= old_nan != new_nan
        joined = (cohort != self.cohort) & (cohort != 0)
        changed = joined | moved | (self.held & ~held)
        self.changed_at = np.where(changed, now, self.changed_at)
        self.expected_kw = np.asarray(expected, dtype=np.float64).copy()
        self.cohort = np.asarray(cohort, dtype=np.intp).copy()
        self.held = np.asarray(held, dtype=bool).copy()
        return int(changed.sum())
