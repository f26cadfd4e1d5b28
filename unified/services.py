"""What a grid service did, once it has ended (``performance/{command_id}``, retained).

The wire model only; the ledger that fills it is :mod:`gateway.services.settlement`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unified.model import SCHEMA_VERSION, Frozen, Identifier, ServiceMode, UtcDatetime

__all__ = ["ServiceReport"]


class ServiceReport(Frozen):
    """A ``service`` command's settlement: the metered energy cost of the devices it scheduled
    against the unmanaged counterfactual at the same prices and times (EVs charging flat out
    from plug-in until full, batteries idle), the energy it shifted, the EV energy delivered
    against the need, and how often an envelope over its devices was found exceeded."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    type: Literal["service_settlement"] = "service_settlement"
    command_id: Identifier
    group_id: str
    mode: ServiceMode
    start: UtcDatetime
    end: UtcDatetime
    generated_at: UtcDatetime
    devices: int = Field(ge=0, description="Devices the service scheduled at some time")
    seconds_metered: float = Field(ge=0)
    energy_import_kwh: float = Field(ge=0, description="Metered, the scheduled devices")
    energy_export_kwh: float = Field(ge=0)
    energy_cost: float = Field(description="Metered energy at the prices in force")
    unmanaged_import_kwh: float = Field(ge=0)
    unmanaged_cost: float = Field(description="The counterfactual at the same prices")
    battery_energy_change_kwh: float = Field(
        description="Batteries' net metered energy (charged minus discharged, at the meter)"
    )
    battery_energy_value: float = Field(
        description="That energy at the mean import price seen: a service that ends with its "
        "batteries emptier sold energy it did not buy"
    )
    cost_saved: float = Field(
        description="unmanaged_cost - energy_cost + battery_energy_value"
    )
    energy_shifted_kwh: float = Field(
        ge=0, description="Energy the counterfactual drew in steps where the devices drew less"
    )
    ev_energy_needed_kwh: float = Field(ge=0, description="EVs' need when first scheduled")
    ev_energy_delivered_kwh: float = Field(ge=0, description="Metered, each capped at its need")
    ev_delivered_pct: float | None = Field(default=None, ge=0, le=100)
    envelope_checks: int = Field(ge=0, description="Envelope-and-time checks made")
    envelope_violations: int = Field(ge=0, description="Checks that found a limit exceeded")
    worst_envelope_excess_kw: float = Field(ge=0)
    schedule_solves: int = Field(ge=0)
