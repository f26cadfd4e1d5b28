"""The driver's charging needs (energy by a departure time) → kWh / kW (pure: no clock, no I/O).

2.0.1 has a message for them, NotifyEVChargingNeeds (AC or DC parameters, in Wh, W, A and V).
1.6 has none, so a 1.6 charger (or its app backend) may send them in a DataTransfer with
:data:`NEEDS_VENDOR_ID` / :data:`NEEDS_MESSAGE_ID`, whose ``data`` is a JSON object
``{"energyAmountWh", "departureTime", "evEnergyCapacityWh", "evMaxPowerW"}``. The energy amount
is required; the rest is optional and dropped when it is not a number (or not a timestamp).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from protocols.ocpp.primitives import number, parse_time

__all__ = [
    "NEEDS_MESSAGE_ID",
    "NEEDS_VENDOR_ID",
    "EvChargingNeeds",
    "InvalidChargingNeeds",
    "decode_data_transfer_needs",
    "decode_ev_charging_needs",
]

NEEDS_VENDOR_ID: Final = "org.derms-gateway"
NEEDS_MESSAGE_ID: Final = "EVChargingNeeds"


@dataclass(frozen=True, slots=True)
class EvChargingNeeds:
    energy_kwh: float
    departure: datetime | None
    ev_capacity_kwh: float | None
    ev_max_kw: float | None


class InvalidChargingNeeds(ValueError):
    """The message carries no usable energy amount (``field`` is its name on the wire)."""

    def __init__(self, field: str, problem: Literal["missing", "invalid"]) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _kilo(value: float | None) -> float | None:
    return None if value is None else value / 1000


def decode_data_transfer_needs(data: str | None) -> EvChargingNeeds:
    """The needs in a 1.6 DataTransfer's ``data``; raises :class:`InvalidChargingNeeds`."""
    try:
        payload = json.loads(data or "")
        energy_wh = number(payload["energyAmountWh"])
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: "[[[[..."
        raise InvalidChargingNeeds("energyAmountWh", "missing") from None
    if energy_wh is None or energy_wh < 0:
        raise InvalidChargingNeeds("energyAmountWh", "invalid")
    return EvChargingNeeds(
        energy_kwh=energy_wh / 1000,
        departure=parse_time(payload.get("departureTime")),
        ev_capacity_kwh=_kilo(number(payload.get("evEnergyCapacityWh"))),
        ev_max_kw=_kilo(number(payload.get("evMaxPowerW"))),
    )


def decode_ev_charging_needs(charging_needs: Mapping[str, Any], *, phases: int) -> EvChargingNeeds:
    """The needs in a 2.0.1 NotifyEVChargingNeeds' ``charging_needs`` (snake_case keys).

    Without a DC ``ev_max_power``, the EV's maximum is its AC current × voltage × ``phases``
    (the charger's phases); raises :class:`InvalidChargingNeeds`.
    """
    ac = charging_needs.get("ac_charging_parameters") or {}
    dc = charging_needs.get("dc_charging_parameters") or {}
    if not isinstance(ac, Mapping) or not isinstance(dc, Mapping):
        raise InvalidChargingNeeds("charging_parameters", "invalid")
    energy_wh = number(ac.get("energy_amount", dc.get("energy_amount")))
    if energy_wh is None or energy_wh < 0:
        raise InvalidChargingNeeds("energy_amount", "invalid")
    max_w = number(dc.get("ev_max_power"))
    if max_w is None and ac:
        amps, volts = number(ac.get("ev_max_current")), number(ac.get("ev_max_voltage"))
        # Two finite numbers may still multiply past any float: no maximum, then.
        max_w = None if amps is None or volts is None else number(amps * volts * phases)
    return EvChargingNeeds(
        energy_kwh=energy_wh / 1000,
        departure=parse_time(charging_needs.get("departure_time")),
        ev_capacity_kwh=_kilo(number(dc.get("ev_energy_capacity"))),
        ev_max_kw=_kilo(max_w),
    )
