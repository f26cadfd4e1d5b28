"""OCPP MeterValues → one reading in kW / kWh / % (pure: no clock, no I/O).

A MeterValues (or TransactionEvent) message carries a list of ``{timestamp, sampled_value: [...]}``
entries with the snake_case keys the ``ocpp`` package hands its handlers. From it we keep the
latest import power, energy register and SoC at the connector: a value with a ``phase`` is one
phase (or one phase pair) of the same measurand and is skipped, never summed, since a charger
that reports phases reports the total too. A value in a unit we do not know is ignored rather
than guessed, and so is one that is not a (finite) number.

1.6 spells the unit as ``unit`` (default Wh); 2.0.1 as ``unit_of_measure: {unit, multiplier}``
(default Wh, ×10^0). A sampled value without a measurand is the energy register, as both
versions define.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from protocols.ocpp.primitives import OcppVersion, number, parse_time

__all__ = ["MeterReading", "decode_meter_values", "register_kwh"]

_TO_KILO: Final = {"W": 1e-3, "kW": 1.0, "Wh": 1e-3, "kWh": 1.0}


@dataclass(frozen=True, slots=True)
class MeterReading:
    """What one MeterValues list said, in kW / kWh / %; None: it did not say."""

    measured_at: datetime | None
    """The latest timestamp among the entries that carried a kept value."""
    power_kw: float | None
    energy_kwh: float | None
    soc_pct: float | None


def decode_meter_values(meter_values: object, version: OcppVersion) -> MeterReading | None:
    """The latest import power, energy register and SoC in a MeterValues list; None when it
    has none of them (or is not a list)."""
    if not isinstance(meter_values, list):
        return None
    power = energy = soc = None
    measured: datetime | None = None
    for entry in meter_values:
        if not isinstance(entry, dict):
            continue
        stamp = parse_time(entry.get("timestamp"))
        sampled = entry.get("sampled_value")
        for sv in sampled if isinstance(sampled, list) else ():
            if not isinstance(sv, dict) or sv.get("phase") is not None:
                continue
            measurand = sv.get("measurand", "Energy.Active.Import.Register")
            value = number(sv.get("value"))
            if value is None:
                continue
            if version == "ocpp1.6":
                unit = sv.get("unit", "Wh")
            else:
                uom = sv.get("unit_of_measure") or {}
                if not isinstance(uom, dict):
                    continue
                try:
                    value *= 10.0 ** int(uom.get("multiplier", 0))
                except (TypeError, ValueError, OverflowError):
                    continue
                if not math.isfinite(value):
                    continue
                unit = uom.get("unit", "Wh")
            if measurand == "Power.Active.Import" and unit in ("W", "kW"):
                power = value * _TO_KILO[unit]
            elif measurand == "Energy.Active.Import.Register" and unit in ("Wh", "kWh"):
                energy = value * _TO_KILO[unit]
            elif measurand == "SoC" and 0 <= value <= 100:
                soc = value
            else:
                continue
            if stamp is not None and (measured is None or stamp > measured):
                measured = stamp
    if power is None and energy is None and soc is None:
        return None
    return MeterReading(measured, power, energy, soc)


def register_kwh(meter_wh: int) -> float:
    """A 1.6 StartTransaction ``meter_start`` / StopTransaction ``meter_stop`` (integer Wh)."""
    return meter_wh / 1000
