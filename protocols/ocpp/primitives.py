"""OCPP's primitive values as this codec reads and writes them (pure: no clock, no I/O).

OCPP-J timestamps are RFC 3339 strings; we write UTC to the second with a ``Z`` (what every
charger parses) and read any offset, but not a naive time: a charger's local clock without an
offset says nothing about when. Numbers arrive as JSON numbers, as strings (1.6 sampled values)
or as ``Decimal`` (the ``ocpp`` package parses 1.6 decimals so); a boolean, NaN or infinity is
not a number here.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from unified.model import in_sane_range

__all__ = ["OcppVersion", "format_time", "number", "parse_time"]

OcppVersion = Literal["ocpp2.0.1", "ocpp1.6"]
"""An OCPP-J version, spelled as its websocket subprotocol."""


def format_time(when: datetime) -> str:
    """``when`` in UTC to the second, with a ``Z``: ``2026-03-04T05:06:07Z``."""
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: object) -> datetime | None:
    """An aware datetime in UTC, or None for anything that is not a timestamp with an offset
    inside the model's sane range (a far-future offset time would overflow converting to UTC)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return in_sane_range(parsed)


def number(value: object) -> float | None:
    """A finite float, or None for anything else (booleans, NaN, infinities, garbage)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | Decimal | str):
        try:
            result = float(value)
        except (ValueError, OverflowError):  # OverflowError: an int beyond any float
            return None
        return result if math.isfinite(result) else None
    return None
