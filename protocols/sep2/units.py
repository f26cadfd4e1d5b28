"""Unit helpers: 2030.5 power as ``value × 10^multiplier``, percentages in hundredths.

Arithmetic goes through ``Decimal`` so that 1919 × 10^-2 is exactly 19.19 W (and not
19.190000000000001), and ``from_watts(to_watts(p))`` gives back envoy's own encodings.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Final

from protocols.sep2.errors import InvalidValue
from protocols.sep2.models import (
    ActivePower,
    AmpereHour,
    ApparentPower,
    CurrentRMS,
    ReactivePower,
    ReactiveSusceptance,
    VoltageRMS,
    WattHour,
)

__all__ = [
    "from_percent",
    "from_watts",
    "scaled_value",
    "to_percent",
    "to_watts",
]

_INT16_MIN: Final = -0x8000
_INT16_MAX: Final = 0x7FFF
_MIN_AUTO_MULTIPLIER: Final = -2  # centiwatts: finer resolution means nothing for a DER limit
_MAX_MULTIPLIER: Final = 9

ScaledQuantity = (
    ActivePower
    | ApparentPower
    | ReactivePower
    | CurrentRMS
    | VoltageRMS
    | WattHour
    | AmpereHour
    | ReactiveSusceptance
)


def scaled_value(quantity: ScaledQuantity) -> float:
    """``value × 10^multiplier`` of any 2030.5 unit value (W, VA, var, A, V, Wh, Ah, S)."""
    return float(Decimal(quantity.value).scaleb(quantity.multiplier))


def to_watts(power: ActivePower) -> float:
    """Watts of an ActivePower. Always apply the multiplier: envoy varies it per value."""
    return scaled_value(power)


def _scaled_int(watts: Decimal, multiplier: int) -> int:
    # to_integral_value, not quantize: quantize raises beyond 28 digits (1e30 W).
    return int(watts.scaleb(-multiplier).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_watts(watts: float, multiplier: int | None = None) -> ActivePower:
    """An ActivePower for ``watts``, rounded to the nearest unit of ``10^multiplier`` W.

    With ``multiplier=None`` the finest multiplier from 10^-2 upward whose value fits in Int16
    is chosen; that is envoy's rule too (1500 W → 15000×10^-1, 7000 W → 7000×10^0, 0 W →
    0×10^-2), except that envoy truncates where we round. Raises ``InvalidValue`` for NaN,
    infinities and values that do not fit the requested multiplier.
    """
    if not math.isfinite(watts):
        raise InvalidValue("ActivePower", watts, "not a finite number of watts")
    exact = Decimal(repr(float(watts)))
    candidates = (
        range(_MIN_AUTO_MULTIPLIER, _MAX_MULTIPLIER + 1) if multiplier is None else (multiplier,)
    )
    for m in candidates:
        value = _scaled_int(exact, m)
        if _INT16_MIN <= value <= _INT16_MAX:
            return ActivePower(multiplier=m, value=value)
    raise InvalidValue("ActivePower", watts, f"does not fit Int16 with multiplier {multiplier}")


def to_percent(hundredths: int) -> float:
    """Percent from 2030.5 hundredths of a percent (opModFixedW/opModMaxLimW: 5000 → 50.0)."""
    return hundredths / 100


def from_percent(percent: float, *, signed: bool = False) -> int:
    """Hundredths of a percent for opModMaxLimW (0..10000) or, ``signed``, opModFixedW
    (-10000..10000); rounded to the nearest hundredth."""
    if not math.isfinite(percent):
        raise InvalidValue("PerCent", percent, "not a finite percentage")
    value = int(Decimal(repr(float(percent))).scaleb(2).to_integral_value(ROUND_HALF_EVEN))
    low = -10000 if signed else 0
    if not low <= value <= 10000:
        raise InvalidValue("PerCent", percent, f"outside {low / 100:g}..100 %")
    return value
