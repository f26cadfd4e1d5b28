"""Power multipliers and hundredths-of-percent helpers."""

from __future__ import annotations

import math

import pytest

from protocols.sep2 import (
    ActivePower,
    InvalidValue,
    VoltageRMS,
    from_percent,
    from_watts,
    scaled_value,
    to_percent,
    to_watts,
)


@pytest.mark.parametrize(
    ("value", "multiplier", "watts"),
    [
        (15000, -1, 1500.0),
        (7000, 0, 7000.0),
        (0, -2, 0.0),
        (5000, 1, 50000.0),
        (1919, -2, 19.19),
        (-25000, -1, -2500.0),
        (3, 3, 3000.0),
    ],
)
def test_to_watts(value: int, multiplier: int, watts: float) -> None:
    assert to_watts(ActivePower(multiplier=multiplier, value=value)) == watts


@pytest.mark.parametrize(
    ("watts", "expected"),
    [
        # The same encodings envoy produced for these requests (README table).
        (1500, (15000, -1)),
        (7000, (7000, 0)),
        (0, (0, -2)),
        (3000, (30000, -1)),
        (50000, (5000, 1)),
        (19.19, (1919, -2)),
        (-2500, (-25000, -1)),
        # Envoy truncates to 12345; we round to the nearest unit.
        (12345.67, (12346, 0)),
        (32767, (32767, 0)),
        (32768, (3277, 1)),
    ],
)
def test_from_watts_picks_finest_fitting_multiplier(
    watts: float, expected: tuple[int, int]
) -> None:
    power = from_watts(watts)
    assert (power.value, power.multiplier) == expected


def test_from_watts_with_fixed_multiplier() -> None:
    assert from_watts(1500, multiplier=0) == ActivePower(multiplier=0, value=1500)
    assert from_watts(1234, multiplier=1) == ActivePower(multiplier=1, value=123)
    with pytest.raises(InvalidValue):
        from_watts(1500, multiplier=-2)  # 150000 does not fit Int16


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30])
def test_from_watts_refuses_unrepresentable(bad: float) -> None:
    with pytest.raises(InvalidValue):
        from_watts(bad)


def test_scaled_value_of_other_units() -> None:
    assert scaled_value(VoltageRMS(multiplier=-1, value=2530)) == 253.0


def test_percent_helpers() -> None:
    assert to_percent(5000) == 50.0
    assert to_percent(-10000) == -100.0
    assert from_percent(50) == 5000
    assert from_percent(12.345) == 1234  # nearest hundredth, ties to even
    assert from_percent(-25.5, signed=True) == -2550
    with pytest.raises(InvalidValue):
        from_percent(-1)
    with pytest.raises(InvalidValue):
        from_percent(100.01)
    with pytest.raises(InvalidValue):
        from_percent(math.nan)
