"""Our charging limits as OCPP SetChargingProfile / ClearChargingProfile payloads (pure).

A limit is one of three purposes (:class:`ProfilePurpose`), each sent as its own profile with
its own id (:data:`PROFILE_IDS`), so clearing ours never clears a profile the site installer or
another system put on the charger. A profile is one absolute schedule with a single period from
its start, in W or in A per phase; both are rounded *down* to 0.1 (1.6 allows one decimal), so
rounding never lets a charger exceed a cap.

Payloads have the snake_case keys the ``ocpp`` package's request classes take (it writes them
camelCase on the wire): ``call.SetChargingProfile(**set_charging_profile(...))``. Time is an
argument (``now``); nothing here reads a clock or a configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal

from protocols.ocpp.primitives import OcppVersion, format_time

__all__ = [
    "CLOCK_SKEW_ALLOWANCE",
    "PROFILE_IDS",
    "ChargingProfileLimit",
    "ProfilePurpose",
    "RateUnit",
    "clear_charging_profile",
    "profile_rate",
    "set_charging_profile",
]

RateUnit = Literal["W", "A"]


class ProfilePurpose(StrEnum):
    SITE_CAP = "site_cap"
    """ChargePointMaxProfile (1.6) / ChargingStationMaxProfile (2.0.1), on the whole charger."""
    TX_DEFAULT = "tx_default"
    TX = "tx"


#: Our charging profiles use these ids (one per purpose).
PROFILE_IDS: Final = {
    ProfilePurpose.SITE_CAP: 90_001,
    ProfilePurpose.TX_DEFAULT: 90_002,
    ProfilePurpose.TX: 90_003,
}
#: An absolute schedule starts this long before the caller's "now", so a charger whose clock
#: runs slightly behind ours does not ignore a new limit until its clock catches up.
CLOCK_SKEW_ALLOWANCE: Final = timedelta(seconds=60)

_PURPOSE_NAMES: Final[dict[OcppVersion, dict[ProfilePurpose, str]]] = {
    "ocpp1.6": {
        ProfilePurpose.SITE_CAP: "ChargePointMaxProfile",
        ProfilePurpose.TX_DEFAULT: "TxDefaultProfile",
        ProfilePurpose.TX: "TxProfile",
    },
    "ocpp2.0.1": {
        ProfilePurpose.SITE_CAP: "ChargingStationMaxProfile",
        ProfilePurpose.TX_DEFAULT: "TxDefaultProfile",
        ProfilePurpose.TX: "TxProfile",
    },
}


@dataclass(frozen=True, slots=True)
class ChargingProfileLimit:
    """One of our limits, in kW, as the charger adapter decides it; rendered per version by
    :func:`set_charging_profile`."""

    purpose: ProfilePurpose
    limit_kw: float
    transaction_id: str | None = None
    """The running transaction's id (a TxProfile only; an integer in 1.6)."""
    connector_id: int = 0
    """Connector (1.6) / EVSE (2.0.1) of a TxProfile; the other purposes go to 0 (the charger)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.limit_kw) or self.limit_kw < 0:
            raise ValueError(f"limit {self.limit_kw} kW is not valid")
        if (self.purpose is ProfilePurpose.TX) != (self.transaction_id is not None):
            raise ValueError("a transaction id is needed for, and only for, a TxProfile")


def profile_rate(limit_kw: float, rate_unit: RateUnit, *, voltage_v: float, phases: int) -> float:
    """The schedule's ``limit``: W, or A per phase over ``phases`` at ``voltage_v`` (phase
    voltage), rounded down to 0.1."""
    if rate_unit == "A" and not (voltage_v > 0 and 1 <= phases <= 3):
        raise ValueError(f"{phases} phase(s) at {voltage_v} V cannot carry a limit in A")
    watts = limit_kw * 1000
    rate = watts / (voltage_v * phases) if rate_unit == "A" else watts
    return math.floor(rate * 10 + 1e-6) / 10


def set_charging_profile(
    version: OcppVersion,
    limit: ChargingProfileLimit,
    *,
    rate_unit: RateUnit,
    voltage_v: float,
    phases: int,
    stack_level: int,
    now: datetime,
) -> dict[str, Any]:
    """The payload of a SetChargingProfile request carrying ``limit``.

    1.6: ``{"connector_id", "cs_charging_profiles"}``; 2.0.1: ``{"evse_id",
    "charging_profile"}``. The schedule starts :data:`CLOCK_SKEW_ALLOWANCE` before ``now``;
    ``voltage_v`` and ``phases`` matter only when ``rate_unit`` is A.
    """
    rate = profile_rate(limit.limit_kw, rate_unit, voltage_v=voltage_v, phases=phases)
    period: dict[str, Any] = {"start_period": 0, "limit": rate}
    if rate_unit == "A":
        period["number_phases"] = phases
    schedule: dict[str, Any] = {
        "start_schedule": format_time(now - CLOCK_SKEW_ALLOWANCE),
        "charging_rate_unit": rate_unit,
        "charging_schedule_period": [period],
    }
    profile_id = PROFILE_IDS[limit.purpose]
    purpose = _PURPOSE_NAMES[version][limit.purpose]
    connector = 0 if limit.purpose is not ProfilePurpose.TX else limit.connector_id
    if version == "ocpp1.6":
        profile: dict[str, Any] = {
            "charging_profile_id": profile_id,
            "stack_level": stack_level,
            "charging_profile_purpose": purpose,
            "charging_profile_kind": "Absolute",
            "charging_schedule": schedule,
        }
        if limit.transaction_id is not None:
            profile["transaction_id"] = int(limit.transaction_id)
        return {"connector_id": connector, "cs_charging_profiles": profile}
    profile = {
        "id": profile_id,
        "stack_level": stack_level,
        "charging_profile_purpose": purpose,
        "charging_profile_kind": "Absolute",
        "charging_schedule": [{"id": profile_id, **schedule}],
    }
    if limit.transaction_id is not None:
        profile["transaction_id"] = limit.transaction_id
    return {"evse_id": connector, "charging_profile": profile}


def clear_charging_profile(version: OcppVersion, purpose: ProfilePurpose) -> dict[str, Any]:
    """The payload of a ClearChargingProfile request for our profile of ``purpose`` (by id)."""
    profile_id = PROFILE_IDS[purpose]
    if version == "ocpp1.6":
        return {"id": profile_id}
    return {"charging_profile_id": profile_id}
