"""OCPP 1.6J and 2.0.1 payloads for EV chargers: a pure codec (no I/O, no clock, no RNG).

Everything OCPP measures in W, Wh, A, V or ``value × 10^multiplier`` is converted here, so the
central system (:mod:`adapters.ocpp.central`) and the charger adapter see kW / kWh / % only:

* :mod:`~protocols.ocpp.profiles`: our limits (kW) → SetChargingProfile / ClearChargingProfile
  payloads, in W or in A per phase (the charger's unit, voltage and phases are arguments);
* :mod:`~protocols.ocpp.meter`: MeterValues sampled values → a :class:`MeterReading`;
* :mod:`~protocols.ocpp.needs`: the driver's charging needs (2.0.1 NotifyEVChargingNeeds, or our
  1.6 DataTransfer) → :class:`EvChargingNeeds`;
* :mod:`~protocols.ocpp.primitives`: timestamps and numbers as OCPP-J writes them;
* :mod:`~protocols.ocpp.auth`: HTTP Basic credentials of security profiles 1 and 2.

Payloads are dicts with the snake_case keys the ``ocpp`` package takes and gives (it converts
to and from camelCase on the wire); this package does not import it. Time is always an
argument (``now``), and so are the charger's settings: no configuration object comes in.
"""

from protocols.ocpp.auth import (
    BasicCredentials,
    accepted_passwords,
    authorization_header,
    parse_authorization,
    secret_problem,
    wire_password,
)
from protocols.ocpp.meter import MeterReading, decode_meter_values, register_kwh
from protocols.ocpp.needs import (
    NEEDS_MESSAGE_ID,
    NEEDS_VENDOR_ID,
    EvChargingNeeds,
    InvalidChargingNeeds,
    decode_data_transfer_needs,
    decode_ev_charging_needs,
)
from protocols.ocpp.primitives import OcppVersion, format_time, parse_time
from protocols.ocpp.profiles import (
    CLOCK_SKEW_ALLOWANCE,
    PROFILE_IDS,
    ChargingProfileLimit,
    ProfilePurpose,
    RateUnit,
    clear_charging_profile,
    profile_rate,
    set_charging_profile,
)

__all__ = [
    "CLOCK_SKEW_ALLOWANCE",
    "NEEDS_MESSAGE_ID",
    "NEEDS_VENDOR_ID",
    "PROFILE_IDS",
    "BasicCredentials",
    "ChargingProfileLimit",
    "EvChargingNeeds",
    "InvalidChargingNeeds",
    "MeterReading",
    "OcppVersion",
    "ProfilePurpose",
    "RateUnit",
    "accepted_passwords",
    "authorization_header",
    "clear_charging_profile",
    "decode_data_transfer_needs",
    "decode_ev_charging_needs",
    "decode_meter_values",
    "format_time",
    "parse_authorization",
    "parse_time",
    "profile_rate",
    "register_kwh",
    "secret_problem",
    "set_charging_profile",
    "wire_password",
]
