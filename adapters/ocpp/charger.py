"""An EV charger connected to the gateway's OCPP central system (1.6J or 2.0.1).

Like a 2030.5 DER, the charger is reached through a server the gateway hosts
(:class:`adapters.ocpp.central.OcppCentral`): ``read`` returns what the charger last reported,
``apply`` sends charging profiles. The planner's one instruction per device becomes:

* a setpoint (``power_kw``) → a **TxProfile** for the running transaction, or a
  **TxDefaultProfile** when no EV is charging (it then applies to the next session);
* autonomous operation with an import limit → a **site cap**: ChargePointMaxProfile (1.6) /
  ChargingStationMaxProfile (2.0.1), at the tighter of the limit and the configured standing cap.
  An export limit needs no action: a charger without V2G never exports;
* autonomous operation without limits → our Tx/TxDefault profiles are cleared
  (ClearChargingProfile by their ids) and the site cap returns to the standing cap (or is
  cleared when none is configured).

New limits are sent before old ones are cleared, so a change never leaves a moment without the
tighter of the two. Profiles other systems set on the charger are never touched (ours have their
own ids).

**The driver's departure need.** When the charger (2.0.1 NotifyEVChargingNeeds, or a 1.6
DataTransfer, see :data:`protocols.ocpp.NEEDS_MESSAGE_ID`) or an app told the central how
much energy the EV needs by when, a setpoint is never below the power that still meets it
(remaining kWh / hours to departure, at most the rating). Only an envelope may hold an EV
below that floor: a setpoint whose provenance names an envelope, or an import limit, is obeyed
as sent, and the shortfall is logged and recorded in :attr:`OcppCharger.decision`.

**What the planner sees**: an EV charger's nature (:class:`unified.model.EvSession`), not a
battery's:

* ``max_discharge_kw = 0``: no V2G, so no command ever asks a charger to export;
* no EV plugged in: ``max_charge_kw = 0`` and no ``ev``, so nothing is committed to it;
* ``ev.energy_needed_kwh``: the driver's remaining need when it is known (with its departure);
  else, when the EV reports its SoC (MeterValues ``SoC``), the energy to a full battery (of the
  capacity in its charging needs, else the configured nominal ``ev_capacity_kwh``); else None,
  and the planner commits nothing to it;
* ``soc_pct`` is only ever the EV's own reported SoC (telemetry), never derived.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from adapters.ocpp.central import (
    ChargerCallFailed,
    ChargerNotConnected,
    ChargerRejected,
    ChargerSnapshot,
    OcppCentral,
    OcppCentralError,
)
from gateway.devices import DeviceRejected, DeviceUnavailable, UnsafeCommand
from protocols.ocpp import ChargingProfileLimit, ProfilePurpose
from unified.model import DeviceCommand, DeviceState, EvSession, utcnow

__all__ = [
    "DEPARTURE_FLOOR",
    "MIN_DEPARTURE_HORIZON_S",
    "RATING_TOLERANCE",
    "ChargingDecision",
    "OcppCharger",
]

log = logging.getLogger(__name__)

#: A setpoint may exceed the charger's rating by this fraction (allocation rounding); it is then
#: clipped to the rating. Anything further is refused as unsafe.
RATING_TOLERANCE: Final = 0.01
#: Closer to departure than this (or past it), an EV still short of its need gets all the
#: charger can give: the floor's division by the time left would only amplify timing noise.
MIN_DEPARTURE_HORIZON_S: Final = 1.0
#: Label of the departure-energy floor in :attr:`ChargingDecision.limited_by`.
DEPARTURE_FLOOR: Final = "departure_energy"

_Sent = tuple[float, str | None] | None  # (limit kW, transaction id), or None when cleared


@dataclass(frozen=True, slots=True)
class ChargingDecision:
    """What the adapter last sent for a command, and why it differs from the request."""

    command: DeviceCommand
    at: datetime
    purpose: ProfilePurpose | None
    """Which of our profiles carries the limit (None: no limit of ours)."""
    limit_kw: float | None
    departure_floor_kw: float | None
    limited_by: tuple[str, ...] = ()
    """Why ``limit_kw`` differs from what was asked: ``rating``, :data:`DEPARTURE_FLOOR`."""
    departure_at_risk: bool = False
    """An envelope holds the EV below what meets its departure need."""


class OcppCharger:
    """:class:`gateway.devices.DeviceAdapter` for one charger of an :class:`OcppCentral`."""

    def __init__(self, device_id: str, charge_point_id: str, central: OcppCentral) -> None:
        self._device_id = device_id
        self._charge_point_id = charge_point_id
        self._central = central
        self._generation: int | None = None
        self._sent: dict[ProfilePurpose, _Sent] = {}
        """What we know to be on the charger; a purpose missing here is unknown (cleared once)."""
        self._setpoint_kw: float | None = None
        self.decision: ChargingDecision | None = None

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def charge_point_id(self) -> str:
        return self._charge_point_id

    @property
    def source(self) -> str:
        return f"ocpp:{self._charge_point_id}"

    @property
    def stale_after_s(self) -> float:
        """Readings are fresh this long (chargers report at their own MeterValues interval)."""
        return self._central.config.stale_after_s

    # ----------------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        """There is no per-device connection to open: the charger connects to the central.
        "Connected" means it has an accepted session; until then this raises, and the
        supervisor retries with backoff."""
        snap = self._session()
        self._generation = snap.generation
        self._sent = {}
        self._setpoint_kw = None

    async def close(self) -> None:
        """Nothing to release; our profiles stay on the charger (the site cap must not lapse
        because the gateway went away)."""
        self._generation = None
        self._sent = {}

    def _session(self) -> ChargerSnapshot:
        snap = self._central.snapshot(self._charge_point_id)
        if snap is None or not snap.connected:
            raise DeviceUnavailable(self._device_id, "charger not connected")
        if not snap.booted:
            raise DeviceUnavailable(self._device_id, "charger has not booted")
        return snap

    def _current(self) -> ChargerSnapshot:
        snap = self._session()
        if self._generation is None:
            raise DeviceUnavailable(self._device_id, "not connected")
        if snap.generation != self._generation:
            # It reconnected or rebooted and may have dropped our profiles: make the supervisor
            # reconnect, which re-sends what we want.
            raise DeviceUnavailable(self._device_id, "charger reconnected; profiles to resend")
        return snap

    # ----------------------------------------------------------------------- polling

    async def read(self) -> DeviceState:
        snap = self._current()
        now = utcnow()
        max_age = self._central.config.stale_after_s
        sample = snap.sample
        if (
            sample is not None
            and sample.power_kw is not None
            and (now - sample.received_at).total_seconds() <= max_age
        ):
            power, stamp = sample.power_kw, sample.received_at
        elif (
            not snap.plugged
            and snap.last_seen is not None
            and (now - snap.last_seen).total_seconds() <= max_age
        ):
            power, stamp = 0.0, snap.last_seen  # nothing plugged in draws nothing
        else:
            raise DeviceUnavailable(self._device_id, f"no meter values for {max_age:g} s")
        ev_soc = snap.sample.soc_pct if snap.plugged and snap.sample is not None else None
        return DeviceState(
            device_id=self._device_id,
            timestamp=stamp,
            power_kw=max(0.0, power) + 0.0,
            soc_pct=ev_soc,
            capacity_kwh=self._ev_capacity_kwh(snap) if ev_soc is not None else None,
            ev=self._ev_session(snap),
            max_charge_kw=self._max_charge_kw(snap) if snap.plugged else 0.0,
            max_discharge_kw=0.0,
            setpoint_kw=self._setpoint_kw,
            source=self.source,
        )

    def _max_charge_kw(self, snap: ChargerSnapshot) -> float:
        limits = [snap.settings.max_kw]
        if snap.need is not None and snap.need.ev_max_kw is not None:
            limits.append(snap.need.ev_max_kw)
        standing = self._central.site_cap_kw(self._charge_point_id)
        if standing is not None:
            limits.append(standing)
        return min(limits)

    @staticmethod
    def _ev_capacity_kwh(snap: ChargerSnapshot) -> float:
        if snap.need is not None and snap.need.ev_capacity_kwh:
            return snap.need.ev_capacity_kwh
        return snap.settings.ev_capacity_kwh

    def _ev_session(self, snap: ChargerSnapshot) -> EvSession | None:
        """The plugged-in EV's need for the planner; see the module docstring."""
        if not snap.plugged:
            return None
        need = snap.need
        if need is not None:
            register = snap.sample.energy_kwh if snap.sample else None
            return EvSession(
                energy_needed_kwh=need.remaining_kwh(register), departure=need.departure
            )
        if snap.sample is not None and snap.sample.soc_pct is not None:
            to_full = (100.0 - snap.sample.soc_pct) / 100.0 * self._ev_capacity_kwh(snap)
            return EvSession(energy_needed_kwh=max(0.0, to_full))
        return EvSession()

    def departure_floor_kw(self, snap: ChargerSnapshot | None = None) -> float | None:
        """The power that still meets the driver's need by departure (None: not known)."""
        snap = snap or self._central.snapshot(self._charge_point_id)
        if snap is None or snap.need is None or snap.need.departure is None or not snap.plugged:
            return None
        register = snap.sample.energy_kwh if snap.sample else None
        remaining = snap.need.remaining_kwh(register)
        if remaining <= 0:
            return 0.0
        most = self._max_charge_kw(snap)
        seconds = (snap.need.departure - utcnow()).total_seconds()
        if seconds <= MIN_DEPARTURE_HORIZON_S:
            return most  # (nearly) due or overdue: all the charger can give
        return min(remaining / (seconds / 3600.0), most)

    # ----------------------------------------------------------------------- control

    async def apply(self, command: DeviceCommand) -> None:
        if command.device_id != self._device_id:
            raise UnsafeCommand(self._device_id, f"command is for {command.device_id}")
        snap = self._current()
        floor = self.departure_floor_kw(snap)
        if command.power_kw is not None:
            await self._apply_setpoint(snap, command, floor)
        else:
            await self._apply_autonomous(snap, command, floor)

    def _checked_kw(self, snap: ChargerSnapshot, power_kw: float) -> tuple[float, list[str]]:
        rating = snap.settings.max_kw
        if not math.isfinite(power_kw):
            raise UnsafeCommand(self._device_id, f"setpoint {power_kw} kW is not a number")
        if power_kw < -rating * RATING_TOLERANCE:
            raise UnsafeCommand(self._device_id, f"setpoint {power_kw} kW: charger cannot export")
        if power_kw > rating * (1 + RATING_TOLERANCE):
            raise UnsafeCommand(
                self._device_id, f"setpoint {power_kw} kW beyond the rating of {rating} kW"
            )
        clipped = min(max(power_kw, 0.0), rating)
        return clipped, (["rating"] if clipped != power_kw and power_kw > 0 else [])

    async def _apply_setpoint(
        self, snap: ChargerSnapshot, command: DeviceCommand, floor: float | None
    ) -> None:
        assert command.power_kw is not None
        kw, limited_by = self._checked_kw(snap, command.power_kw)
        envelopes = [p.command_id for p in command.provenance if p.kind == "envelope"]
        at_risk = False
        if floor is not None and kw < floor - 1e-6:
            if envelopes:
                at_risk = True
                log.warning(
                    "%s: envelope %s holds the EV at %.2f kW, below the %.2f kW its departure "
                    "needs",
                    self._device_id,
                    ",".join(envelopes),
                    kw,
                    floor,
                )
            else:
                kw = floor
                limited_by.append(DEPARTURE_FLOOR)
        if snap.transaction is not None:
            purpose, other = ProfilePurpose.TX, ProfilePurpose.TX_DEFAULT
            limit = ChargingProfileLimit(
                purpose,
                kw,
                transaction_id=snap.transaction.transaction_id,
                connector_id=snap.transaction.connector_id,
            )
        else:
            purpose, other = ProfilePurpose.TX_DEFAULT, ProfilePurpose.TX
            limit = ChargingProfileLimit(purpose, kw)
        await self._set(limit)
        await self._clear(other)
        await self._standing_cap()
        self._setpoint_kw = kw
        self.decision = ChargingDecision(
            command, utcnow(), purpose, kw, floor, tuple(limited_by), at_risk
        )

    async def _apply_autonomous(
        self, snap: ChargerSnapshot, command: DeviceCommand, floor: float | None
    ) -> None:
        standing = self._central.site_cap_kw(self._charge_point_id)
        caps = [c for c in (command.import_limit_kw, standing) if c is not None]
        cap = min(caps) if caps else None
        at_risk = cap is not None and floor is not None and cap < floor - 1e-6
        if at_risk:
            log.warning(
                "%s: import limit %.2f kW holds the EV below the %.2f kW its departure needs",
                self._device_id,
                cap,
                floor,
            )
        if cap is None:
            await self._clear(ProfilePurpose.SITE_CAP)
        else:
            await self._set(ChargingProfileLimit(ProfilePurpose.SITE_CAP, cap))
        await self._clear(ProfilePurpose.TX)
        await self._clear(ProfilePurpose.TX_DEFAULT)
        self._setpoint_kw = None
        self.decision = ChargingDecision(
            command,
            utcnow(),
            None if cap is None else ProfilePurpose.SITE_CAP,
            cap,
            floor,
            (),
            at_risk,
        )

    async def _standing_cap(self) -> None:
        standing = self._central.site_cap_kw(self._charge_point_id)
        if standing is None:
            await self._clear(ProfilePurpose.SITE_CAP)
        else:
            await self._set(ChargingProfileLimit(ProfilePurpose.SITE_CAP, standing))

    async def _set(self, limit: ChargingProfileLimit) -> None:
        wanted: _Sent = (round(limit.limit_kw, 4), limit.transaction_id)
        if self._sent.get(limit.purpose, ...) == wanted:
            return
        self._sent.pop(limit.purpose, None)  # unknown until the charger answers
        await self._translate(self._central.set_charging_profile(self._charge_point_id, limit))
        self._sent[limit.purpose] = wanted

    async def _clear(self, purpose: ProfilePurpose) -> None:
        if purpose in self._sent and self._sent[purpose] is None:
            return
        self._sent.pop(purpose, None)
        await self._translate(self._central.clear_charging_profile(self._charge_point_id, purpose))
        self._sent[purpose] = None

    async def _translate(self, request: Awaitable[None]) -> None:
        """The one place central errors become adapter errors."""
        try:
            await request
        except ChargerNotConnected as exc:
            raise DeviceUnavailable(self._device_id, str(exc)) from exc
        except ChargerCallFailed as exc:
            if exc.error_code is None:
                raise DeviceUnavailable(self._device_id, str(exc)) from exc
            raise DeviceRejected(self._device_id, str(exc)) from exc
        except ChargerRejected as exc:
            raise DeviceRejected(self._device_id, str(exc)) from exc
        except OcppCentralError as exc:
            raise DeviceUnavailable(self._device_id, str(exc)) from exc
